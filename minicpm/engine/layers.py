"""Inference-time module swaps, applied by the model runner after loading (the model file stays as is).

Contract: :func:`prepare_model` fuses q/k/v and gate/up projections (same function, fewer matrix
products) and, on CPU, replaces every linear layer with :class:`PackedLinear`, whose weight is
pre-packed in oneDNN's blocked layout, where that is faster:

* bfloat16 (where oneDNN supports it): always; the same products (bitwise, in our tests) at about
  twice the matrix-vector speed of ``F.linear``, which is what batch-1 decode spends its time on.
* float32: when a start-up probe (a few milliseconds on a layer-sized matrix, at 1 and 16 rows)
  finds oneDNN at least 10% faster than ``F.linear``'s BLAS: e.g. on AMD CPUs, where MKL's sgemm
  takes a slow path (1.4-1.5x here). Float32 results then differ from ``F.linear``'s in the last
  bits (another summation order). ``MINICPM_CPU_LINEAR=blas`` or ``=onednn`` overrides the probe.
"""

from __future__ import annotations

import functools
import os

import torch
from torch import Tensor, nn

from ..model import MiniCPMForCausalLM


class PackedLinear(nn.Module):
    """A bias-free linear layer over a oneDNN-packed bfloat16 or float32 weight (CPU only)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), 1)

    def forward(self, x: Tensor) -> Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, None, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, packed=oneDNN"


@functools.cache  # once per shape and process: every engine of a process gets the same answer
def _onednn_is_faster(in_features: int, out_features: int) -> bool:
    """Time oneDNN's packed float32 product against ``F.linear`` at 1 and 16 rows."""
    import time

    gen = torch.Generator().manual_seed(0)
    linear = nn.Linear(in_features, out_features, bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(out_features, in_features, generator=gen))
        packed = PackedLinear(linear)
        best = {}
        for name, fn in (("blas", linear), ("onednn", packed)):
            total = 0.0
            for rows in (1, 16):
                x = torch.randn(rows, in_features, generator=gen)
                fn(x)  # warm up
                times = []
                for _ in range(5):
                    start = time.perf_counter()
                    for _ in range(8):
                        fn(x)
                    times.append(time.perf_counter() - start)
                total += min(times)
            best[name] = total
    return best["onednn"] < 0.9 * best["blas"]


def can_pack(model: MiniCPMForCausalLM) -> bool:
    if model.device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    if model.dtype == torch.bfloat16:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    if model.dtype != torch.float32:
        return False
    choice = os.environ.get("MINICPM_CPU_LINEAR", "auto").lower()
    if choice in ("blas", "onednn"):
        return choice == "onednn"
    c = model.config
    return _onednn_is_faster(c.hidden_size, c.intermediate_size)


def prepare_model(model: MiniCPMForCausalLM, pack: bool | None = None) -> MiniCPMForCausalLM:
    """Fuse projections and, where it pays (see :func:`can_pack`), pack linear weights; in place."""
    model.fuse_projections()
    if pack is None:
        pack = can_pack(model)
    if pack:
        for parent in list(model.modules()):
            for name, child in list(parent.named_children()):
                if type(child) is nn.Linear and child.bias is None:
                    setattr(parent, name, PackedLinear(child))
    return model
