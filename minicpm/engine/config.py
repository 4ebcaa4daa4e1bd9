"""Engine settings: :class:`EngineConfig` (frozen; every field validated, errors name the field).

``EngineConfig()`` means the same on every device: the fields whose best value depends on the
device (``block_size``, ``max_num_seqs``, ``max_num_batched_tokens``) default to None, "per
device", and the engine resolves them (:meth:`EngineConfig.resolved`): on CUDA blocks of 64
tokens, 64 sequences and 8192-token steps; on CPU blocks of 128, 16 and 512 (a CPU reads a block
placed anywhere slower the smaller it is; docs/engine.md has the measurements). So a GPU user who
sets only the KV budget gets GPU-sized batches and chunks.
The KV budget is per device too: on CUDA from ``gpu_memory_utilization``, on CPU a byte budget
(``kv_cache_memory``; default a quarter of the available memory, at most 4 GiB); CUDA graphs on
CUDA, eager steps on CPU.

``kv_cache_dtype`` decides how the cache stores keys and values ("auto": the activations' dtype;
"int8" / "int4" quantized on every device, "fp8" on CUDA; every backend reads its format in place;
a quantized cache is Hadamard-rotated unless ``kv_rotation`` is False).
The attention path is chosen once, at engine construction, from ``attention_backend`` ("auto":
the fastest that runs on the device; see :func:`minicpm.engine.attention.select_backend`);
``fused_decode`` decides the CPU fused decoder (None: wherever the ``cpu-native`` backend runs it;
True: required, an error where it cannot run; False: off). ``on_kernel_failure`` decides what a
kernel failing mid-serving does: "fallback" (the default; counted in ``stats()`` and /metrics,
logged, and the backend's fallback serves from then on) or "raise" (what the tests and CI use;
``MINICPM_ON_KERNEL_FAILURE`` sets the default, for processes started by a test).
``kv_cache_dir`` (with ``kv_cache_dir_bytes``) keeps the prefix cache's blocks on disk across
processes (:mod:`minicpm.engine.kv_store`); it needs ``enable_prefix_caching``.
"""

from __future__ import annotations

import dataclasses
import os

from ..errors import UserError
from ..quant import QUANTIZE_CHOICES, check_quantize

KV_CACHE_DTYPES = ("auto", "bfloat16", "float32", "int8", "int4", "fp8")
ATTENTION_BACKENDS = ("auto", "cpu-native", "cpu-torch", "triton", "torch")
KERNEL_FAILURE_CHOICES = ("fallback", "raise")


def _default_on_kernel_failure() -> str:
    return os.environ.get("MINICPM_ON_KERNEL_FAILURE", "fallback")


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    block_size: int | None = None  # None: per device (see the module docstring)
    max_num_seqs: int | None = None  # None: per device (see the module docstring)
    max_num_batched_tokens: int | None = None
    kv_cache_memory: int | None = None
    gpu_memory_utilization: float = 0.9
    max_model_len: int | None = None
    enable_prefix_caching: bool = True
    enforce_eager: bool = False
    # weight-only, CPU (minicpm.quant): "auto" runs the weights as loaded (a quantized checkpoint
    # quantized), "none" in float, "int8" (one scale per output channel, or groups of group_size)
    # or "int4" (groups of group_size, default 32, with a scale and a minimum each: llama.cpp's Q4_1)
    quantize: str = "auto"
    group_size: int | None = None
    attention_backend: str = "auto"
    # how the KV cache stores keys and values: "auto" (the activations' dtype), "bfloat16",
    # "float32", "int8", "int4" or "fp8" (CUDA) (minicpm.engine.attention.kv_format)
    kv_cache_dtype: str = "auto"
    # a quantized cache holds queries, keys and values rotated by a Hadamard matrix (exact in float;
    # the quantizer loses less: minicpm.engine.attention.kv_format); False: stored as computed
    kv_rotation: bool = True
    fused_decode: bool | None = None
    on_kernel_failure: str = dataclasses.field(default_factory=_default_on_kernel_failure)
    # the persistent prefix cache (minicpm.engine.kv_store): a directory where full blocks of long
    # prompts are kept across processes, and its bound in bytes (None: 20 GiB, or half of what
    # the filesystem leaves it if smaller)
    kv_cache_dir: str | None = None
    kv_cache_dir_bytes: int | None = None

    def __post_init__(self) -> None:
        def bad(name: str, rule: str) -> UserError:
            return UserError(f"engine setting {name!r} must be {rule}, got {getattr(self, name)!r}")

        def positive_int(name: str) -> bool:
            value = getattr(self, name)
            return isinstance(value, int) and not isinstance(value, bool) and value >= 1

        if self.block_size is not None and (not positive_int("block_size") or self.block_size & (self.block_size - 1)):
            raise bad("block_size", "a power of two or None (per device)")
        for name in ("max_num_seqs", "max_num_batched_tokens"):
            if getattr(self, name) is not None and not positive_int(name):
                raise bad(name, "a positive integer or None (per device)")
        if (
            self.max_num_seqs is not None
            and self.max_num_batched_tokens is not None
            and (self.max_num_batched_tokens < self.max_num_seqs)
        ):
            raise UserError(
                f"engine setting 'max_num_batched_tokens' ({self.max_num_batched_tokens}) must be at least "
                f"'max_num_seqs' ({self.max_num_seqs}), or some decoding requests would never get a step"
            )
        if self.kv_cache_memory is not None and not positive_int("kv_cache_memory"):
            raise bad("kv_cache_memory", "a positive number of bytes or None")
        if self.max_model_len is not None and not positive_int("max_model_len"):
            raise bad("max_model_len", "a positive integer or None")
        if not isinstance(self.gpu_memory_utilization, (int, float)) or not 0 < self.gpu_memory_utilization <= 1:
            raise bad("gpu_memory_utilization", "in (0, 1]")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise bad("attention_backend", " or ".join(repr(c) for c in ATTENTION_BACKENDS))
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise bad("kv_cache_dtype", " or ".join(repr(c) for c in KV_CACHE_DTYPES))
        if self.kv_rotation not in (True, False):
            raise bad("kv_rotation", "True or False")
        if self.fused_decode not in (None, True, False):
            raise bad("fused_decode", "True, False or None (wherever it runs)")
        if self.on_kernel_failure not in KERNEL_FAILURE_CHOICES:
            raise bad("on_kernel_failure", " or ".join(repr(c) for c in KERNEL_FAILURE_CHOICES))
        if self.kv_cache_dir is not None:
            if isinstance(self.kv_cache_dir, os.PathLike):
                object.__setattr__(self, "kv_cache_dir", os.fspath(self.kv_cache_dir))
            if not isinstance(self.kv_cache_dir, str) or not self.kv_cache_dir:
                raise bad("kv_cache_dir", "a directory path or None")
            if not self.enable_prefix_caching:
                raise UserError(
                    "engine setting 'kv_cache_dir' keeps the prefix cache on disk: it cannot be used with prefix "
                    "caching off ('enable_prefix_caching')"
                )
        if self.kv_cache_dir_bytes is not None:
            if not positive_int("kv_cache_dir_bytes"):
                raise bad("kv_cache_dir_bytes", "a positive number of bytes or None")
            if self.kv_cache_dir is None:
                raise UserError("engine setting 'kv_cache_dir_bytes' bounds 'kv_cache_dir', which is not set")
        if self.quantize not in QUANTIZE_CHOICES:
            raise bad("quantize", " or ".join(repr(c) for c in QUANTIZE_CHOICES))
        try:
            check_quantize(self.quantize, self.group_size)
        except ValueError as exc:
            raise UserError(f"engine setting 'group_size': {exc}") from None

    def resolved(self, device: object) -> EngineConfig:
        """This config with its per-device fields filled in for ``device`` ("cpu", "cuda:0", a
        torch.device); a set field is kept (a token budget below the batch size is raised to it)."""
        cuda = str(device).startswith("cuda")
        block = self.block_size or (64 if cuda else 128)
        seqs = self.max_num_seqs or (64 if cuda else 16)
        tokens = self.max_num_batched_tokens or max(8192 if cuda else 512, seqs)
        return dataclasses.replace(self, block_size=block, max_num_seqs=seqs, max_num_batched_tokens=tokens)

    @classmethod
    def for_device(cls, device: str, **overrides: object) -> EngineConfig:
        """Defaults for ``device`` ("cpu" or "cuda..."), with ``overrides`` (None values ignored)."""
        return cls(**{k: v for k, v in overrides.items() if v is not None}).resolved(device)
