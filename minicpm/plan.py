"""Memory planning: will a checkpoint and N tokens of KV cache fit, and how many times over?

Contract: :func:`plan_memory` is pure arithmetic on a :class:`~minicpm.config.MiniCPMConfig`
(nothing is loaded or allocated) and returns a :class:`MemoryPlan` with exact byte counts:

* parameters and weight bytes in the compute dtype, counted from the shapes the model declares
  (:func:`minicpm.weights.expected_shapes`: embeddings, per-layer q/k/v/o, gate/up/down, both
  norms, the final norm, and ``lm_head`` unless tied);
* KV-cache bytes per token (:meth:`MiniCPMConfig.kv_bytes_per_token`; MiniCPM-2B-128k in bf16:
  2 x 40 layers x 36 heads x 64 x 2 bytes = 360 KiB) and for one context of ``context`` tokens;
* the model's context limit (:attr:`MiniCPMConfig.context_length`) and whether ``context``
  exceeds it;
* given a memory budget: an activation/workspace reserve (:func:`estimate_activation_reserve`),
  the KV budget ``memory - weights - reserve``, the KV tokens that fit, how many concurrent
  ``context``-token contexts fit (floor), and whether one 128k (131072-token) context fits. A
  negative KV budget is reported, not clipped, with how far the weights (or weights + reserve)
  overshoot.

:func:`available_memory` finds a budget when none is given (CUDA: free device memory x 0.9; CPU:
``MemAvailable`` from /proc/meminfo, else ``sysconf``) and :func:`format_plan` renders a plan as a
table. Bad input (context or memory not positive, unknown dtype, no way to measure memory) raises
``ValueError`` with a message naming it.
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import Any

import torch

from .config import MiniCPMConfig
from .errors import UserError
from .weights import dtype_by_name, expected_shapes

FULL_CONTEXT = 131072  # "128k": MiniCPM-2B-128k's max_length
CUDA_UTILIZATION = 0.9  # share of the free device memory a plan without --memory may use
PREFILL_CHUNK = 8192  # prompt tokens pushed through the model per forward during prefill
LOGIT_ROWS = 64  # sequences sampled per decode step whose float32 logits are live at once
WORKSPACE_BYTES = 256 * 1024**2  # cuBLAS/oneDNN workspaces and allocator slack
PREFILL_SPAN = 64  # keys a CPU native prefill packs at a time (csrc/paged_attention.c's SPAN)


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """Exact byte counts of one plan; fields that need a budget are None without one."""

    dtype: str
    bytes_per_element: int
    kv_cache_dtype: str
    parameters: int
    weight_bytes: int
    kv_bytes_per_token: int
    context: int
    context_kv_bytes: int  # KV cache of one context of ``context`` tokens
    context_limit: int  # config.context_length
    context_limit_source: str  # "max_length" or "max_position_embeddings"
    context_exceeds_limit: bool
    memory_bytes: int | None = None
    memory_source: str | None = None  # "given", "cuda free memory x 0.9", "MemAvailable", ...
    activation_reserve_bytes: int | None = None
    activation_reserve_estimated: bool | None = None  # False: the caller gave the reserve
    kv_budget_bytes: int | None = None  # memory - weights - reserve; negative when it doesn't fit
    kv_tokens: int | None = None  # tokens of KV cache that fit (0 when the budget is negative)
    concurrent_contexts: int | None = None  # floor(kv_tokens / context)
    fits_full_context: bool | None = None  # one 131072-token context fits
    checkpoint_bytes: int | None = None  # size of the weight files on disk, when known
    messages: tuple[str, ...] = ()  # problems worth saying in words
    quantize: str = "none"  # the weights' format the plan counts
    gathered_kv_heads: int | None = None  # the reserve's kv heads read outside the cache (None: see gathered_tokens)
    gathered_tokens: int | None = None  # else its tokens of every kv head (None with no heads: a layer's)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["messages"] = list(self.messages)
        out["full_context"] = FULL_CONTEXT
        return out


def resolve_plan_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if not dtype.is_floating_point:
            raise UserError(f"dtype {dtype} is not a floating-point dtype")
        return dtype
    return dtype_by_name(dtype)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def parameter_count(config: MiniCPMConfig) -> int:
    """Parameters of the model the config describes (a tied head counted once)."""
    return sum(math.prod(shape) for shape in expected_shapes(config).values())


def quantized_weight_bytes(
    config: MiniCPMConfig,
    dtype: torch.dtype | str,
    quantize: str,
    group_size: int | None,
    layout: str = "tensors",
) -> int:
    """Bytes of the weights quantized with ``quantize`` (int8 / int4; "none" or "auto", a float
    checkpoint: parameters x bytes per element), held one of two ways:

    * ``layout="tensors"``: as ``quantize_model(model, quantize, group_size)`` leaves them (and a
      GPU engine holds them): every linear layer's codes with float32 scales (and minimums for
      int4), the head and the embedding table at 8 bits per channel under int4 (a tied table is the
      head: counted once), norms in ``dtype``.
    * ``layout="cpu-panels"``: as the CPU engine holds them on its native kernels
      (:mod:`minicpm.engine.layers`): q/k/v and gate/up fused, every product's outputs padded to
      whole 32-column panels; int4 as records of float16 scales and minimums (0.625 bytes a weight
      at groups of 32; a group whose scale or minimum is past float16's range would keep float32
      ones, which no trained checkpoint has), int8 with float32 scales per column or per (column,
      group); a tied table is the head's panels, an untied one stays a table in the head's format.
    """
    from .engine.cpu_kernels import PANEL
    from .quant import check_quantize, default_group

    check_quantize(quantize, group_size)
    if layout not in ("tensors", "cpu-panels"):
        raise ValueError(f"layout must be 'tensors' or 'cpu-panels', got {layout!r}")
    b = resolve_plan_dtype(dtype).itemsize
    shapes = expected_shapes(config)
    if quantize not in ("int8", "int4"):
        return parameter_count(config) * b
    head_fmt, head_group = ("int8", None) if quantize == "int4" else (quantize, group_size)

    def tensors(out: int, inp: int, fmt: str, group: int | None) -> int:
        group = group or default_group(fmt, inp)
        codes = out * inp if fmt == "int8" else out * inp // 2
        return codes + out * (inp // group) * 4 * (2 if fmt == "int4" else 1)

    def panels(out: int, inp: int, fmt: str, group: int | None) -> int:
        group = group or default_group(fmt, inp)
        out = -(-out // PANEL) * PANEL
        if fmt == "int4":  # per (panel, group): the codes, a float16 scale and minimum per column
            return out * inp // 2 + out * (inp // group) * 4
        return out * inp + out * (inp // group) * 4  # int8 codes, float32 scales

    if layout == "tensors":
        total = 0
        for name, shape in shapes.items():
            if name in ("lm_head.weight", "model.embed_tokens.weight"):  # head_format
                total += tensors(*shape, head_fmt, head_group)
            elif len(shape) == 2:
                total += tensors(*shape, quantize, group_size)
            else:
                total += math.prod(shape) * b
        return total
    c = config
    hidden, head_dim = c.hidden_size, c.head_dim
    products = [
        ((c.num_attention_heads + 2 * c.num_key_value_heads) * head_dim, hidden),  # q/k/v fused
        (hidden, c.num_attention_heads * head_dim),  # o
        (2 * c.intermediate_size, hidden),  # gate/up fused
        (hidden, c.intermediate_size),  # down
    ]
    total = c.num_hidden_layers * sum(panels(out, inp, quantize, group_size) for out, inp in products)
    total += panels(c.vocab_size, hidden, head_fmt, head_group)  # the head (a tied table's lookups too)
    if not c.tie_word_embeddings:
        total += tensors(c.vocab_size, hidden, head_fmt, head_group)  # the table, in the head's format
    norms = sum(math.prod(shape) for shape in shapes.values() if len(shape) == 1)
    return total + norms * b


def estimate_activation_reserve(
    config: MiniCPMConfig,
    dtype: torch.dtype | str,
    context: int,
    prefill_chunk: int = PREFILL_CHUNK,
    logit_rows: int = LOGIT_ROWS,
    gathered_kv_heads: int | None = None,
    gathered_tokens: int | None = None,
) -> int:
    """Bytes to keep free beside weights and KV cache: a deliberately simple upper bound.

    With ``c = min(prefill_chunk, context)`` prompt tokens per prefill forward and ``b`` bytes per
    element of ``dtype``:

    * one layer's intermediates, summed as if all were alive at once, in ``dtype``: residual,
      normed input and branch output (3 x hidden), q/k/v ((heads + 2 x kv_heads) x head_dim), the
      attention output (heads x head_dim) and the MLP's gate, up and gated product
      (3 x intermediate); plus the float32 temporaries: RMSNorm's upcast (hidden) and RoPE's
      upcast q/k with their rotated halves (2 x (heads + kv_heads) x head_dim), 4 bytes each.
      Times ``c`` tokens.
    * the keys and values of the context that a prefill chunk with a cached past reads outside the
      paged cache, in ``dtype``, by its attention path:
        - ``gathered_kv_heads`` heads' (the CPU's native prefill kernel packs one kv head's at a
          time, in whole 64-key spans: 1); no merge;
        - else ``gathered_tokens`` tokens of every kv head of one layer (cpu-torch dequantizes a
          quantized cache a piece at a time: its piece; 0 where a float cache is read in place),
          or by default the whole context's (a path that gathers or dequantizes a layer's), plus
          the float32 running sum that merges the pieces' attention (``c x heads x head_dim x
          4``).
      The causal bias is bottom-right aligned and never materialized, and attention scores are
      fused (flash / cuDNN / memory-efficient kernels).
    * float32 logits of ``logit_rows`` sampled rows (only the sampled positions get logits, never
      the whole prompt) plus one same-sized working copy for softmax/top-p: 2 x rows x vocab x 4.
    * a fixed :data:`WORKSPACE_BYTES` for GEMM workspaces and allocator slack.
    """
    if context <= 0:
        raise UserError(f"context must be a positive number of tokens, got {context}")
    if gathered_kv_heads is not None and gathered_tokens is not None:
        raise UserError("gathered_kv_heads and gathered_tokens describe two different prefill paths: give one")
    b = resolve_plan_dtype(dtype).itemsize
    c = min(prefill_chunk, context)
    qkv = (config.num_attention_heads + 2 * config.num_key_value_heads) * config.head_dim
    elements = 3 * config.hidden_size + qkv + config.num_attention_heads * config.head_dim
    elements += 3 * config.intermediate_size
    fp32 = config.hidden_size + 2 * (config.num_attention_heads + config.num_key_value_heads) * config.head_dim
    per_token = elements * b + fp32 * 4
    if gathered_kv_heads is not None:
        if gathered_kv_heads < 1:
            raise UserError(f"gathered_kv_heads must be a positive number of heads, got {gathered_kv_heads}")
        heads = min(gathered_kv_heads, config.num_key_value_heads)
        gather = 2 * heads * config.head_dim * b * -(-context // PREFILL_SPAN) * PREFILL_SPAN
    else:
        if gathered_tokens is not None and gathered_tokens < 0:
            raise UserError(f"gathered_tokens must not be negative, got {gathered_tokens}")
        tokens = context if gathered_tokens is None else min(gathered_tokens, context)
        gather = tokens * config.kv_bytes_per_token(b) // config.num_hidden_layers
        gather += c * config.num_attention_heads * config.head_dim * 4  # the merge's float32 sum
    logits = 2 * logit_rows * config.vocab_size * 4
    return c * per_token + gather + logits + WORKSPACE_BYTES


def prefill_reads(native_prefill: bool, kv_quantized: bool) -> dict[str, int]:
    """What a CPU engine's prefill path reads outside its cache at once for a chunk with a past,
    as :func:`estimate_activation_reserve`'s keywords: ``gathered_kv_heads=1`` for the native
    prefill kernel (it packs one kv head's keys and values at a time); else cpu-torch's
    ``gathered_tokens``: a quantized cache's piece
    (:data:`~minicpm.engine.attention.cpu.QUANTIZED_PIECE`), 0 for a float cache (read in place)."""
    from .engine.attention.cpu import QUANTIZED_PIECE

    if native_prefill:
        return {"gathered_kv_heads": 1}
    return {"gathered_tokens": QUANTIZED_PIECE if kv_quantized else 0}


def cpu_prefill_reads(dtype: torch.dtype | str, head_dim: int, kv_cache_dtype: str = "auto") -> dict[str, int]:
    """:func:`prefill_reads` of this machine's CPU engine: the native prefill kernel where it
    serves ``dtype`` and ``head_dim`` here, for a ``kv_cache_dtype`` cache."""
    from .engine.attention.kv_format import resolve_kv_format
    from .engine.cpu_kernels import native_kernels, prefill_available

    torch_dtype = resolve_plan_dtype(dtype)
    native = prefill_available(native_kernels(), torch_dtype, head_dim)
    return prefill_reads(native, resolve_kv_format(kv_cache_dtype, torch_dtype, "cpu", head_dim).quantized)


def available_memory(device: str | torch.device) -> tuple[int, str]:
    """A memory budget when none is given, and where it came from.

    CUDA: the device's free memory (``torch.cuda.mem_get_info``) times :data:`CUDA_UTILIZATION`.
    CPU: ``MemAvailable`` from /proc/meminfo, else ``sysconf`` available pages x page size.
    """
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError("CUDA is not available here; pass --memory GiB or --device cpu")
        free, _total = torch.cuda.mem_get_info(device)
        return int(free * CUDA_UTILIZATION), f"cuda free memory x {CUDA_UTILIZATION}"
    if device.type != "cpu":
        raise UserError(f"cannot measure the memory of device {device}; pass --memory GiB")
    found = available_cpu_memory()
    if found is None:
        raise UserError("cannot measure the available memory here; pass --memory GiB")
    return found


SYSTEM_ROOM_MIN = 1024**3  # memory a default CPU KV budget leaves to the rest of the machine, at least


def system_room() -> int:
    """Memory a default CPU KV budget leaves to the operating system and other programs: a tenth
    of the machine's memory, at least :data:`SYSTEM_ROOM_MIN`."""
    total = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                total = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        total = 0
    return max(SYSTEM_ROOM_MIN, total // 10)


def available_cpu_memory() -> tuple[int, str] | None:
    """Available system memory in bytes and where it came from: ``MemAvailable`` from
    /proc/meminfo, else ``sysconf`` available pages x page size; None where neither can be read."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                value, unit = line.split()[1:3]
                if unit.lower() == "kb":
                    return int(value) * 1024, "MemAvailable in /proc/meminfo"
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "available pages (sysconf)"
    except (AttributeError, ValueError, OSError):
        return None


def plan_memory(
    config: MiniCPMConfig,
    context: int,
    memory_bytes: int | None,
    dtype: torch.dtype | str,
    weight_bytes: int | None = None,
    activation_reserve_bytes: int | None = None,
    *,
    memory_source: str | None = None,
    checkpoint_bytes: int | None = None,
    kv_cache_dtype: str = "auto",
    quantize: str | None = None,
    group_size: int | None = None,
    device: str = "cpu",
    gathered_kv_heads: int | None = None,
    gathered_tokens: int | None = None,
) -> MemoryPlan:
    """Plan ``context``-token contexts of ``config`` in ``memory_bytes`` (None: sizes only).

    ``weight_bytes`` overrides parameters x bytes per element (e.g. a quantized checkpoint);
    ``activation_reserve_bytes`` overrides :func:`estimate_activation_reserve`. ``kv_cache_dtype``
    counts the cache in that format (:mod:`minicpm.engine.attention.kv_format`, scales included;
    "auto": ``dtype``) and ``quantize`` the weights as that device's engine holds them
    (:func:`quantized_weight_bytes`: CPU panels on "cpu", quantize_model's tensors else);
    ``device`` also decides which formats exist (fp8: CUDA). ``gathered_kv_heads`` or
    ``gathered_tokens`` go to the reserve's estimate (:func:`cpu_prefill_reads`: what this machine's
    CPU engine reads at once).
    """
    if isinstance(context, bool) or not isinstance(context, int) or context <= 0:
        raise UserError(f"context must be a positive number of tokens, got {context!r}")
    if memory_bytes is not None and (isinstance(memory_bytes, bool) or memory_bytes <= 0):
        raise UserError(f"memory must be a positive number of bytes, got {memory_bytes!r}")
    for name, value in (("weight_bytes", weight_bytes), ("activation_reserve_bytes", activation_reserve_bytes)):
        if value is not None and value < 0:
            raise UserError(f"{name} must not be negative, got {value!r}")
    torch_dtype = resolve_plan_dtype(dtype)
    b = torch_dtype.itemsize
    parameters = parameter_count(config)
    if weight_bytes is not None:
        weights = int(weight_bytes)
    elif quantize is not None:
        layout = "cpu-panels" if torch.device(device).type == "cpu" else "tensors"
        weights = quantized_weight_bytes(config, torch_dtype, quantize, group_size, layout)
    else:
        weights = parameters * b
    from .engine.attention.kv_format import resolve_kv_format

    kv_format = resolve_kv_format(kv_cache_dtype, torch_dtype, device, config.head_dim)
    per_token = kv_format.bytes_per_token(config.num_hidden_layers, config.num_key_value_heads, config.head_dim)
    limit = config.context_length
    limit_source = "max_length" if config.max_length else "max_position_embeddings"
    messages = []
    exceeds = context > limit
    if exceeds:
        messages.append(
            f"context {context} exceeds the model's limit of {limit} tokens (config {limit_source}); "
            "the model is not meant to run longer contexts"
        )
    fields: dict[str, Any] = {}
    if memory_bytes is not None:
        memory_bytes = int(memory_bytes)
        if activation_reserve_bytes is None:
            reserve = estimate_activation_reserve(
                config, torch_dtype, context, gathered_kv_heads=gathered_kv_heads, gathered_tokens=gathered_tokens
            )
        else:
            reserve = int(activation_reserve_bytes)
        budget = memory_bytes - weights - reserve
        tokens = max(budget, 0) // per_token
        contexts = tokens // context
        if weights > memory_bytes:
            messages.append(
                f"the weights alone ({format_bytes(weights)}) do not fit in {format_bytes(memory_bytes)}: "
                f"{format_bytes(weights - memory_bytes)} short"
            )
        elif budget < 0:
            messages.append(
                f"the weights fit, but weights + activation reserve ({format_bytes(weights + reserve)}) "
                f"exceed {format_bytes(memory_bytes)} by {format_bytes(-budget)}; no room for KV cache"
            )
        elif contexts == 0:
            messages.append(
                f"one {context}-token context needs {format_bytes(context * per_token)} of KV cache; "
                f"only {format_bytes(budget)} is left ({tokens} tokens)"
            )
        fields = dict(
            memory_bytes=memory_bytes,
            memory_source=memory_source or "given",
            activation_reserve_bytes=reserve,
            activation_reserve_estimated=activation_reserve_bytes is None,
            gathered_kv_heads=gathered_kv_heads,
            gathered_tokens=gathered_tokens,
            kv_budget_bytes=budget,
            kv_tokens=tokens,
            concurrent_contexts=contexts,
            fits_full_context=tokens >= FULL_CONTEXT,
        )
    return MemoryPlan(
        dtype=_dtype_name(torch_dtype),
        bytes_per_element=b,
        kv_cache_dtype=kv_format.name,
        quantize=quantize or "none",
        parameters=parameters,
        weight_bytes=weights,
        kv_bytes_per_token=per_token,
        context=context,
        context_kv_bytes=context * per_token,
        context_limit=limit,
        context_limit_source=limit_source,
        context_exceeds_limit=exceeds,
        checkpoint_bytes=checkpoint_bytes,
        messages=tuple(messages),
        **fields,
    )


def format_bytes(n: int) -> str:
    """GiB at or above 1 GiB, else MiB, else KiB, else bytes (binary units; sign kept)."""
    sign, n = ("-" if n < 0 else ""), abs(n)
    for unit, size in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= size:
            return f"{sign}{n / size:.2f} {unit}"
    return f"{sign}{n} B"


def format_plan(plan: MemoryPlan) -> str:
    """The plan as an aligned two-column table, then its messages (one ``note:`` line each)."""
    yes_no = {True: "yes", False: "no"}
    limit_note = "EXCEEDS the limit" if plan.context_exceeds_limit else "within the limit"
    rows: list[tuple[str, str]] = [
        ("dtype", f"{plan.dtype} ({plan.bytes_per_element} bytes/element)"),
        ("parameters", f"{plan.parameters:,} ({plan.parameters / 1e9:.3f} B)"),
        ("weights", format_bytes(plan.weight_bytes) + (f" ({plan.quantize})" if plan.quantize != "none" else "")),
    ]
    if plan.checkpoint_bytes is not None:
        rows.append(("weights on disk", format_bytes(plan.checkpoint_bytes)))
    rows += [
        ("KV cache per token", f"{plan.kv_bytes_per_token / 1024:g} KiB ({plan.kv_cache_dtype})"),
        (f"KV cache for {plan.context:,} tokens", format_bytes(plan.context_kv_bytes)),
        ("context limit", f"{plan.context_limit:,} tokens ({plan.context_limit_source}); {limit_note}"),
    ]
    if plan.memory_bytes is not None:
        if plan.gathered_kv_heads is not None:
            heads = plan.gathered_kv_heads
            gathered = "one kv head's packed KV" if heads == 1 else f"{heads} kv heads' packed KV"
        elif plan.gathered_tokens == 0:
            gathered = "the KV read in place"
        elif plan.gathered_tokens is not None:
            gathered = f"{min(plan.gathered_tokens, plan.context):,} tokens' dequantized KV at a time"
        else:
            gathered = "one layer's gathered KV"
        reserve_note = (
            f" (prefill chunk of {min(PREFILL_CHUNK, plan.context):,} tokens, {gathered}, "
            f"float32 logits of {LOGIT_ROWS} rows, {format_bytes(WORKSPACE_BYTES)} workspace)"
            if plan.activation_reserve_estimated
            else " (given)"
        )
        beyond = (
            f" (beyond the model's {plan.context_limit:,}-token limit)" if plan.context_limit < FULL_CONTEXT else ""
        )
        rows += [
            ("memory budget", f"{format_bytes(plan.memory_bytes)} ({plan.memory_source})"),
            ("activation reserve", format_bytes(plan.activation_reserve_bytes) + reserve_note),
            ("KV budget", f"{format_bytes(plan.kv_budget_bytes)} (memory - weights - reserve)"),
            ("KV tokens that fit", f"{plan.kv_tokens:,}"),
            (f"concurrent {plan.context:,}-token contexts", f"{plan.concurrent_contexts:,}"),
            (f"one {FULL_CONTEXT:,}-token (128k) context fits", yes_no[plan.fits_full_context] + beyond),
        ]
    width = max(len(label) for label, _ in rows)
    lines = [f"{label:<{width}}  {value}" for label, value in rows]
    lines += [f"note: {message}" for message in plan.messages]
    return "\n".join(lines)
