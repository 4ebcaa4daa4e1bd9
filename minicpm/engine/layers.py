"""Inference-time module swaps, applied by the model runner after loading (the model file stays as is).

Contract: :func:`prepare_model` fuses q/k/v and gate/up projections (same function, fewer matrix
products) and wraps every linear layer in :class:`RowSplitLinear`, which multiplies a step's decode
rows apart from its prefill rows when the runner says where they split (:class:`StepRows`): GEMM
libraries pick their blocking, and with it the summation order, by row count, and this way a
decode row's products do not depend on whether a prompt is being prefilled beside it.

On CPU, each linear layer's product is one of these for the model's dtype (:func:`linear_choice`):

* ``panel`` (the default where the native kernels build): :func:`~minicpm.engine.cpu_kernels.panel_linear`
  over weights packed in column panels: float32, bfloat16, or weight-only quantized
  (:mod:`minicpm.quant`: int8 per channel or in groups, int4 in groups). Each output is one
  in-order sum, so a row's result does not depend on the rows beside it; rows of prompts (none a
  decode row) may first widen the panel to float32 weights, faster for many rows. The fused decoder
  (:mod:`~minicpm.engine.fused_decode`) needs every layer on panels, which is why they are the
  default (docs/kernels.md, "Linear layers on CPU").
* ``onednn-1`` / ``onednn-16``: oneDNN with the weight pre-packed for that many rows. In bfloat16
  it uses the CPU's bfloat16 dot products, faster from 4 rows up (no fused decoder then).
* ``blas``: plain ``F.linear`` (float32 only; MKL's sgemm takes a slow path on AMD CPUs).

``MINICPM_CPU_LINEAR=panel|onednn|blas`` chooses (``onednn`` / ``blas``: the faster of their
variants, by a start-up probe at 1 and 16 rows). Float32 results differ between the choices in the
last bits (other summation orders). Quantized layers are panels where the native kernels build,
else they stay :class:`~minicpm.quant.QuantizedLinear` (each weight dequantized at every use, never
held in float: a warning says so); the model file is
untouched, and the embeddings, norms, KV cache and residual stream stay in the activation dtype.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import time

import torch
from torch import Tensor, nn

from ..errors import UserError
from ..model import MiniCPMForCausalLM
from ..quant import FORMATS as QUANTIZED
from ..quant import QuantizedEmbedding, QuantizedLinear, dequantize_rows, linear_slots, quantize_model
from ..weights import release_freed_memory, steady_heap
from .cpu_kernels import PANEL, int4_panel_rows, native_kernels, pack_panels, panel_linear, quantized_panels

log = logging.getLogger("minicpm.engine")


class PackedLinear(nn.Module):
    """A bias-free linear layer over a oneDNN-packed bfloat16 or float32 weight (CPU only),
    packed for ``rows`` rows per product."""

    def __init__(self, linear: nn.Linear, rows: int = 16) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.rows = rows
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), rows)

    def forward(self, x: Tensor) -> Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, None, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, oneDNN for {self.rows} rows"


class PanelLinear(nn.Module):
    """A bias-free linear layer over a weight in the native kernel's column panels
    (:func:`~minicpm.engine.cpu_kernels.panel_linear`; CPU): an ``nn.Linear``'s float32 or bfloat16
    weight, or a :class:`~minicpm.quant.QuantizedLinear`'s codes with their scales (and minimums);
    activations and sums stay in float. ``weights`` names the format ("float", "int8" or "int4")."""

    def __init__(self, linear: nn.Linear | QuantizedLinear, lib: object) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.lib = lib
        self.scales = self.mins = None
        if isinstance(linear, QuantizedLinear):
            self.weights, self.group = linear.fmt, linear.group
            self.packed, self.scales, self.mins = quantized_panels(linear)
        else:
            self.weights, self.group = "float", None
            self.packed = pack_panels(linear.weight)

    def forward(self, x: Tensor, prefill: bool = False) -> Tensor:
        return panel_linear(x, self.packed, self.out_features, self.lib, self.scales, self.mins, prefill)

    def extra_repr(self) -> str:
        group = "" if self.group in (None, self.in_features) else f" in groups of {self.group}"
        return f"in_features={self.in_features}, out_features={self.out_features}, native {self.weights} panels{group}"


class PanelEmbedding(nn.Module):
    """A tied embedding table looked up from the head's panels (:class:`PanelLinear`): one copy of
    the table for both. A row is the head's weight row, dequantized as
    :class:`~minicpm.quant.QuantizedEmbedding` dequantizes it, in ``dtype``."""

    def __init__(self, head: PanelLinear, dtype: torch.dtype) -> None:
        super().__init__()
        self.head, self.dtype = head, dtype

    def forward(self, ids: Tensor) -> Tensor:
        h = self.head
        flat = ids.reshape(-1)
        panel, col = flat // PANEL, flat % PANEL
        if h.weights == "int4":
            rows = dequantize_rows(*int4_panel_rows(h.packed, h.scales, h.mins, panel, col), h.group)
        elif h.scales is None:
            rows = h.packed[panel, :, col]
        else:
            codes = h.packed[panel, :, col]
            scales = h.scales.view(-1)[flat, None] if h.scales.dim() == 1 else h.scales[panel, :, col]
            mins = None if h.mins is None else h.mins[panel, :, col]
            rows = dequantize_rows(codes, scales, mins, h.group)
        return rows.to(self.dtype).view(*ids.shape, h.in_features)


def make_linear(linear: nn.Linear | QuantizedLinear, choice: str) -> nn.Module:
    """``linear`` as ``choice`` computes it: "panel" (float or quantized), "onednn-<rows>" or
    "blas" (itself)."""
    if choice == "panel" or isinstance(linear, QuantizedLinear):
        lib = native_kernels()
        if lib is None:
            raise RuntimeError("the native CPU kernels are not available here")
        return PanelLinear(linear, lib)
    if choice.startswith("onednn-"):
        return PackedLinear(linear, int(choice.split("-")[1]))
    if choice == "blas":
        return linear
    raise ValueError(f"unknown linear choice {choice!r}: panel, onednn-<rows> or blas")


class StepRows(threading.local):
    """Where a step's rows split for the linear layers: rows ``[0, split)`` (the step's decode
    rows, which the scheduler puts first) and the rest are multiplied apart; 0 means no decode
    row, a split at or past the last row only decode rows. One per model, and per thread: engines
    sharing a model, each stepping on its own thread, never see each other's split."""

    def __init__(self) -> None:
        self.split = 0


class RowSplitLinear(nn.Module):
    """``inner`` applied to rows ``[0, rows.split)`` and the rest separately, then joined."""

    def __init__(self, inner: nn.Module, rows: StepRows) -> None:
        super().__init__()
        self.inner = inner
        self.rows = rows

    def forward(self, x: Tensor) -> Tensor:
        at = self.rows.split
        if at >= x.shape[-2]:  # decode rows only
            return self.inner(x)
        if at == 0:  # none: rows of prompts (the panels may widen their weights for them)
            return self._rest(x)
        return torch.cat((self.inner(x[..., :at, :]), self._rest(x[..., at:, :])), dim=-2)

    def _rest(self, x: Tensor) -> Tensor:
        return self.inner(x, prefill=True) if isinstance(self.inner, PanelLinear) else self.inner(x)


def linear_candidates(dtype: torch.dtype) -> list[str]:
    """What can multiply ``dtype`` weights on this CPU, per ``MINICPM_CPU_LINEAR`` (default: all)."""
    found = []
    if native_kernels() is not None:
        found.append("panel")
    if torch.backends.mkldnn.is_available() and (
        dtype == torch.float32 or (dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    ):
        found += ["onednn-1", "onednn-16"]
    if dtype == torch.float32 or not found:
        found.append("blas")
    wanted = os.environ.get("MINICPM_CPU_LINEAR", "auto").lower()
    if wanted != "auto":
        if wanted not in ("panel", "onednn", "blas"):
            raise UserError(f"MINICPM_CPU_LINEAR must be panel, onednn, blas or auto, got {wanted!r}")
        kept = [c for c in found if c.split("-")[0] == wanted]
        if not kept:
            raise UserError(f"MINICPM_CPU_LINEAR={wanted} cannot run {dtype} here (available: {', '.join(found)})")
        found = kept
    return found


@functools.cache  # once per shape, dtype and process: every engine of a process gets the same answer
def linear_choice(in_features: int, out_features: int, dtype: torch.dtype) -> str:
    """The native panels where they build (the fused decoder runs on them), unless
    ``MINICPM_CPU_LINEAR`` names another; then
    the fastest of :func:`linear_candidates` on a layer-sized weight, timed at 1 and 16 rows."""
    candidates = linear_candidates(dtype)
    if len(candidates) == 1 or candidates[0] == "panel":
        return candidates[0]
    gen = torch.Generator().manual_seed(0)
    linear = nn.Linear(in_features, out_features, bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(out_features, in_features, generator=gen))
        linear = linear.to(dtype)
        times = {}
        for choice in candidates:
            fn = make_linear(linear, choice)
            total = 0.0
            for rows in (1, 16):
                x = torch.randn(rows, in_features, generator=gen).to(dtype)
                fn(x)  # warm up
                runs = []
                for _ in range(5):
                    start = time.perf_counter()
                    for _ in range(8):
                        fn(x)
                    runs.append(time.perf_counter() - start)
                total += min(runs)
            times[choice] = total
    return min(candidates, key=lambda c: times[c])


def cpu_linear(model: MiniCPMForCausalLM) -> str | None:
    """How :func:`prepare_model` multiplies ``model``'s layers here (see :func:`linear_choice`);
    None off the CPU or for a dtype other than float32 / bfloat16 (``F.linear``)."""
    if model.device.type != "cpu" or model.dtype not in (torch.float32, torch.bfloat16):
        return None
    c = model.config
    return linear_choice(c.hidden_size, c.intermediate_size, model.dtype)


def head_is_table(model: MiniCPMForCausalLM) -> bool:
    """Whether the head computes with the embedding table itself (tied, in one format)."""
    embed, head = model.model.embed_tokens, model.lm_head
    if isinstance(embed, QuantizedEmbedding):
        return head is embed.table
    return type(head) is nn.Linear and head.weight is embed.weight


def prepare_model(
    model: MiniCPMForCausalLM, quantize: str = "auto", group_size: int | None = None
) -> MiniCPMForCausalLM:
    """Bring the weights to ``quantize``'s format (:func:`~minicpm.quant.quantize_model`), fuse
    projections, give each linear layer this machine's product (:func:`cpu_linear`; quantized
    layers the native kernel's panels: CPU only) and wrap it in a :class:`RowSplitLinear` reading
    the model's one :class:`StepRows` (``model.step_rows``); in place, once per model. A second
    engine over a prepared model changes nothing in it (it must ask for the same format)."""
    prepared = getattr(model, "prepared_quantize", None)
    if prepared is not None:
        if quantize not in ("auto", prepared):
            raise UserError(f"this model was prepared with quantize={prepared!r}, not {quantize!r}; load it again")
        return model
    quantized = any(isinstance(m, QuantizedLinear) for m in model.modules())
    if quantize in QUANTIZED or (quantize == "auto" and quantized):
        where = f"quantize={quantize!r}" if quantize != "auto" else "this model's quantized weights"
        if model.device.type != "cpu":
            raise UserError(f"{where} run on the CPU; the model is on {model.device}")
        if native_kernels() is None:  # kept quantized: never a float copy the user did not ask for
            log.warning(
                "no native CPU kernels here (%s): the quantized layers run through torch, each weight "
                "dequantized at every use (slower; install a C compiler for the native kernels, or "
                "pass --quantize none to hold them in %s)",
                where,
                model.dtype,
            )
    with steady_heap():  # the packing's temporaries handed back as they are freed (weights.steady_heap)
        _pack(model, quantize, group_size, quantized)
    return model


def _pack(model: MiniCPMForCausalLM, quantize: str, group_size: int | None, quantized: bool) -> None:
    """prepare_model's work once its checks pass."""
    rows = StepRows()
    quantize_model(model, quantize, group_size)
    if not model.fused:  # model.fuse_projections(), handing each layer's parts back as it goes
        for layer in model.model.layers:
            layer.self_attn.fuse()
            layer.mlp.fuse()
            release_freed_memory()
    choice = cpu_linear(model)
    shared_table = head_is_table(model)
    slots = linear_slots(model)  # a tied quantized head once, as the head
    slots.reverse()
    while slots:  # popped one by one: a layer's weight is freed once its packed copy replaces it
        parent, name, child = slots.pop()
        if isinstance(child, QuantizedLinear):
            inner = child if native_kernels() is None else make_linear(child, "panel")
        else:
            inner = child if choice is None else make_linear(child, choice)
        setattr(parent, name, RowSplitLinear(inner, rows))
        del child, inner
        release_freed_memory()
    inner = model.lm_head.inner
    if shared_table and isinstance(inner, PanelLinear):  # one copy of the table: the head's panels
        model.model.embed_tokens = PanelEmbedding(inner, model.dtype)
    model.step_rows = rows
    model.prepared_quantize = quantize if quantize != "auto" else ("quantized" if quantized else "none")
