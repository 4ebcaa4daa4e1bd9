"""The one place an attention backend is chosen: :func:`select_backend`.

Contract: ``select_backend(device, dtype, config, name)`` returns one backend object for a cache on
``device`` in ``dtype`` for a model of ``config``. ``name="auto"`` picks, in order: on CUDA
``triton`` where Triton imports (falling back to ``torch``), else ``torch``; on CPU ``cpu-native``
for float32 and bfloat16 where the native kernels build, else ``cpu-torch``; on any other device
``torch``. A named backend that cannot run here (wrong device, wrong dtype, kernels that do not
build) is a ``ValueError`` that says why, never a silent substitute.
"""

from __future__ import annotations

import torch

from ...config import MiniCPMConfig
from ...errors import UserError
from .. import cpu_kernels
from ..config import ATTENTION_BACKENDS
from ..cpu_kernels import native_kernels, prefill_available
from .base import AttentionBackend
from .cpu import CpuNativeBackend, CpuTorchBackend
from .torch_backend import TorchBackend
from .triton_backend import TritonBackend, triton_available

BACKEND_CHOICES = ATTENTION_BACKENDS
NATIVE_DTYPES = (torch.float32, torch.bfloat16)


def select_backend(
    device: torch.device | str, dtype: torch.dtype, config: MiniCPMConfig, name: str = "auto"
) -> AttentionBackend:
    """See the module docstring."""
    if name not in BACKEND_CHOICES:
        raise UserError(f"attention backend must be one of {', '.join(BACKEND_CHOICES)}, got {name!r}")
    device = torch.device(device)
    if name == "auto":
        if device.type == "cuda":
            name = "triton" if triton_available() else "torch"
        elif device.type == "cpu":
            native = dtype in NATIVE_DTYPES and native_kernels() is not None
            name = "cpu-native" if native else "cpu-torch"
        else:
            name = "torch"
    if name in ("cpu-native", "cpu-torch") and device.type != "cpu":
        raise UserError(f"the {name} attention backend runs on CPU, not {device.type}")
    if name == "cpu-native":
        if dtype not in NATIVE_DTYPES:
            raise UserError(f"the cpu-native attention backend takes float32 or bfloat16, not {dtype}")
        lib = native_kernels()
        if lib is None:
            why = cpu_kernels.build_failure or "switched off by MINICPM_CPU_KERNELS"
            raise UserError(
                f"the cpu-native attention backend needs the native CPU kernels, which are not here ({why})"
            )
        return CpuNativeBackend(lib, lib if prefill_available(lib, dtype, config.head_dim) else None)
    if name == "cpu-torch":
        return CpuTorchBackend()
    torch_backend = TorchBackend.for_device(
        device, dtype, config.num_attention_heads, config.num_key_value_heads, config.head_dim
    )
    if name == "torch":
        return torch_backend
    if not triton_available():
        raise UserError("the triton attention backend needs the triton package (pip install 'minicpm[gpu]')")
    if device.type != "cuda":
        from ..triton_attention import _kernels_interpreted

        if not _kernels_interpreted():
            raise UserError(
                f"the triton attention backend runs on CUDA, not {device.type} (or in Triton's interpreter: "
                "TRITON_INTERPRET=1 before start)"
            )
    return TritonBackend(fallback=torch_backend)
