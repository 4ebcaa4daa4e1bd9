"""A CPU step's decode rows through every decoder layer in one native call (``csrc/decode.c``).

Contract:

* :meth:`FusedDecoder.build` returns a decoder for a model :func:`~minicpm.engine.layers.prepare_model`
  has prepared, on CPU, when every linear layer of its decoder is the native kernel's panels (float32,
  bfloat16, int8 or int4; parts of a :class:`~minicpm.model.ConcatLinear` too) and the native kernels
  built; else None (and the engine's eager path runs every row). ``EngineConfig.fused_decode=False`` turns it off.
* :meth:`FusedDecoder.hidden_states` takes rows of one token each (their ids, positions, rotary
  frequencies, cache slots and block tables) and returns the last layer's hidden states (rows,
  hidden) in the activation dtype, having written each row's keys and values into the cache (rotated
  where the cache is), as the eager model would: the same operators in the same order and roundings,
  the same panel and attention kernels. The three reductions it computes itself (RMSNorm's mean of
  squares, silu's exp, the Hadamard rotation's sums) may differ from torch's in the last bit of float32.
* A row's result does not depend on the other rows (each kernel computes rows independently), and
  the per-operator cost of every layer's torch calls becomes one call.
"""

from __future__ import annotations

import ctypes

import torch
from torch import Tensor, nn

from ..model import ConcatLinear, MiniCPMForCausalLM, rope_cos_sin, signed_sin
from .attention import PagedKVCache
from .cpu_kernels import _DTYPES, KV_KINDS, NativeKernels, native_kernels, panel_format, refusal
from .layers import PanelLinear, RowSplitLinear


def _panels(module: nn.Module) -> list[PanelLinear] | None:
    """The panel layers computing ``module`` stacked by output, or None if any part is not one."""
    if isinstance(module, RowSplitLinear):
        module = module.inner
    if isinstance(module, PanelLinear):
        return [module]
    if isinstance(module, ConcatLinear):
        parts = [_panels(p) for p in module.parts]
        if all(p is not None for p in parts):
            return [q for p in parts for q in p]
    return None


def _linear(module: nn.Module, lib: NativeKernels) -> ctypes.Structure | None:
    """``module`` as the library's ``Linear`` struct, or None where it is not panels the fused
    decoder takes (or has more parts than the library's ``max_parts``)."""
    panels = _panels(module)
    if panels is None or len(panels) > lib.max_parts:
        return None
    out = lib.Linear(parts=len(panels))
    offset = 0
    for i, p in enumerate(panels):
        out.wtype[i], out.group[i] = panel_format(p.packed, p.scales, p.mins)
        out.n[i], out.offset[i] = p.out_features, offset
        out.packed[i] = p.packed.data_ptr()
        out.scales[i] = 0 if p.scales is None else p.scales.data_ptr()
        out.mins[i] = 0 if p.mins is None else p.mins.data_ptr()
        offset += p.out_features
    return out


class FusedDecoder:
    """See the module docstring."""

    def __init__(
        self, model: MiniCPMForCausalLM, cache: PagedKVCache, lib: NativeKernels, layers: ctypes.Array
    ) -> None:
        self.model, self.cache, self.lib, self.layers = model, cache, lib, layers
        self.config = model.config
        self.dtype = model.dtype
        self.max_rows = 0
        self.work = self.scratch = torch.empty(0, dtype=torch.uint8)

    @classmethod
    def build(cls, model: MiniCPMForCausalLM, cache: PagedKVCache) -> FusedDecoder | None:
        lib = native_kernels()
        c = model.config
        if lib is None or model.device.type != "cpu" or model.dtype not in _DTYPES:
            return None
        if (
            c.head_dim % 2
            or c.head_dim > lib.max_head_dim
            or (cache.k.dtype != model.dtype and not cache.format.quantized)
        ):
            return None
        specs = []
        for layer in model.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            norms = (layer.input_layernorm.weight, layer.post_attention_layernorm.weight)
            if any(w.dtype != model.dtype or not w.is_contiguous() for w in norms):
                return None
            linears = [_linear(m, lib) for m in (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)]
            if attn.qkv_proj is None or any(x is None for x in linears):
                return None
            specs.append(lib.Layer(norms[0].data_ptr(), norms[1].data_ptr(), *linears))
        return cls(model, cache, lib, (lib.Layer * len(specs))(*specs))

    def _buffers(self, rows: int) -> None:
        """Work and scratch buffers for ``rows`` rows, of the sizes the library asks for."""
        if rows <= self.max_rows:
            return
        c = self.config
        sizes = (ctypes.c_int64 * 2)()
        dims = (c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.intermediate_size)
        self.lib.minicpm_decode_buffer_bytes(_DTYPES[self.dtype], rows, *dims, ctypes.addressof(sizes))
        self.work = torch.empty(sizes[0], dtype=torch.uint8)
        self.scratch = torch.empty(sizes[1], dtype=torch.uint8)
        self.max_rows = rows

    @torch.inference_mode()
    def hidden_states(
        self,
        ids: Tensor,
        positions: Tensor,
        inv_freq: Tensor,
        slots: Tensor,
        block_tables: Tensor,
        row_seq: Tensor,
        row_len: Tensor,
    ) -> Tensor:
        """(rows, hidden) after the last layer for ``ids`` (rows,) at ``positions`` (rows,), with
        ``inv_freq`` (rows, head_dim / 2) float32, new-token ``slots`` (rows,) int64 and the paged
        attention's ``block_tables`` / ``row_seq`` / ``row_len`` (int32, contiguous)."""
        c, cache = self.config, self.cache
        m = ids.shape[0]
        self._buffers(m)
        h = self.model.model.embed_tokens(ids)
        if c.scale_emb != 1:
            h = h * c.scale_emb
        h = h.contiguous()
        cos, sin = rope_cos_sin(c, positions, inv_freq=inv_freq, dtype=self.dtype)
        sin = signed_sin(sin).contiguous()
        cos = cos.contiguous()
        slots = slots.to(torch.int64).contiguous()
        k = cache.k
        code = self.lib.minicpm_decode_layers(
            _DTYPES[self.dtype],
            m,
            c.num_hidden_layers,
            self.layers,
            h.data_ptr(),
            cos.data_ptr(),
            sin.data_ptr(),
            slots.data_ptr(),
            k.data_ptr(),
            cache.v.data_ptr(),
            k[0].nbytes,
            KV_KINDS.get(k.dtype, 0),
            None if cache.k_scale is None else cache.k_scale.data_ptr(),
            None if cache.v_scale is None else cache.v_scale.data_ptr(),
            0 if cache.k_scale is None else cache.k_scale[0].numel(),
            0 if cache.v_scale is None else cache.v_scale[0].numel(),
            int(cache.rotation is not None),
            k.shape[1],
            block_tables.data_ptr(),
            block_tables.shape[0],
            block_tables.shape[1],
            row_seq.data_ptr(),
            row_len.data_ptr(),
            cache.block_size,
            c.hidden_size,
            c.num_attention_heads,
            c.num_key_value_heads,
            c.head_dim,
            c.intermediate_size,
            c.rms_norm_eps,
            c.residual_scale,
            cache.scale,
            self.work.data_ptr(),
            self.work.numel(),
            self.scratch.data_ptr(),
            self.scratch.numel(),
        )
        if code != 0:
            raise ValueError(f"fused decode: {refusal(code)}")
        return h
