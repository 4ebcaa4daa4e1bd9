"""Inference-time module swaps, applied by the model runner after loading (the model file stays as is).

Contract: :func:`prepare_model` fuses q/k/v and gate/up projections (same function, fewer matrix
products) and, on CPU in bfloat16 where oneDNN supports it, replaces every linear layer with
:class:`PackedLinear`, whose weight is pre-packed in oneDNN's blocked layout: the same products
(bitwise, in our tests) at about twice the matrix-vector speed of ``F.linear``, which is what
batch-1 decode spends its time on.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..model import MiniCPMForCausalLM


class PackedLinear(nn.Module):
    """A bias-free linear layer over a oneDNN-packed bfloat16 weight (CPU only)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), 1)

    def forward(self, x: Tensor) -> Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, None, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, packed=oneDNN"


def can_pack(model: MiniCPMForCausalLM) -> bool:
    return (
        model.device.type == "cpu"
        and model.dtype == torch.bfloat16
        and torch.backends.mkldnn.is_available()
        and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    )


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
