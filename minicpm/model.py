"""The MiniCPM decoder (and Llama, as MiniCPM with neutral scales), with the reference numerics.

Contract:

* ``MiniCPMForCausalLM(config)(input_ids)`` on a (batch, seq) LongTensor, with no cache, returns
  float32 logits of shape (batch, seq, vocab): the plain path that parity checks use.
* ``forward(input_ids, positions=None, cache=None, rope_lengths=None, logits_to_keep=None)``:
  ``positions`` (batch, seq) are absolute token positions (default ``arange(seq)`` continuing the
  cache); ``cache`` is any object with ``attend(layer, q, k, v) -> out`` (see
  :class:`AttentionCache`): it stores the new keys/values wherever it keeps them and returns the
  attention output, so a dense cache and a paged engine plug in the same way;
  ``rope_lengths`` is the sequence length that decides the dynamic-NTK base (broadcastable to
  ``positions``; default: the largest position + 1), or ``inv_freq`` gives the rotary frequencies
  per token directly (the engine's way: no host sync, CUDA-graph safe); ``logits_to_keep`` picks the positions whose
  logits are computed (None: every position without a cache, the last one with a cache; an int
  ``n``: the last ``n``; a 1-D LongTensor: those indices along the sequence).
* MiniCPM's quirks live here and only here: the embedding times ``scale_emb``, every residual
  branch times ``scale_depth / sqrt(layers)``, the final hidden state divided by
  ``hidden_size / dim_model_base`` before the head, RMSNorm and RoPE in float32, attention softmax
  in float32, and the dynamic-NTK base (:meth:`MiniCPMConfig.rope_base`).

Dynamic NTK while decoding: the base of a sequence is decided once, from the length of its
prompt (``rope_lengths``), and every position of that sequence, cached or new, uses it. Prefill
therefore matches the reference at every length, and keys never disagree with each other.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import MiniCPMConfig
from .quant import QuantizedEmbedding, QuantizedLinear, stack


class AttentionCache(Protocol):
    """Keeps keys/values across forward calls and computes attention over them.

    ``attend`` receives rotated ``q`` (batch, heads, new, head_dim) and ``k``/``v``
    (batch, kv_heads, new, head_dim) of one layer and returns (batch, heads, new, head_dim): the
    causal attention of the new queries over everything cached for their sequence plus the new
    keys. It is called once per layer per forward, in layer order.
    """

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor: ...

    @property
    def length(self) -> int: ...


def causal_attention(q: Tensor, k: Tensor, v: Tensor, past: int = 0) -> Tensor:
    """softmax(q k^T / sqrt(d)) v with query i seeing keys 0..past+i (GQA by head grouping)."""
    t, s = q.shape[-2], k.shape[-2]
    gqa = q.shape[1] != k.shape[1]
    if past == 0 and t == s:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    if t == 1:
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
    # bottom-right aligned causal bias: flash / cuDNN kernels take it without a (t, s) mask (imported
    # here: the module pulls in torch._dynamo, over a second of start-up that most runs never need)
    from torch.nn.attention.bias import causal_lower_right

    return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(t, s), enable_gqa=gqa)


class DenseKVCache:
    """A contiguous per-layer KV cache for a batch of equally long sequences (generation)."""

    def __init__(
        self,
        config: MiniCPMConfig,
        batch_size: int,
        max_length: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        shape = (config.num_hidden_layers, batch_size, config.num_key_value_heads, max_length, config.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_length = max_length
        self.num_layers = config.num_hidden_layers
        self._length = 0

    @property
    def length(self) -> int:
        return self._length

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        start, end = self._length, self._length + k.shape[-2]
        if end > self.max_length:
            raise ValueError(f"KV cache holds {self.max_length} tokens; {end} were asked for")
        self.k[layer, :, :, start:end] = k
        self.v[layer, :, :, start:end] = v
        out = causal_attention(q, self.k[layer, :, :, :end], self.v[layer, :, :, :end], past=start)
        if layer == self.num_layers - 1:
            self._length = end
        return out


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        # x * rsqrt(mean(x^2) + eps) in float32, cast back, times the weight: fused, bitwise the same
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        return F.rms_norm(x.float(), self.weight.shape, eps=self.eps).to(x.dtype) * self.weight


def rope_inv_freq(config: MiniCPMConfig, rope_length: int, device: torch.device | str = "cpu") -> Tensor:
    """float32 inverse frequencies (head_dim/2,) of a sequence whose NTK base is decided by
    ``rope_length``, computed as the reference does: a Python-float base raised to float32
    exponents (a float32 power), then one float32 division."""
    exponent = torch.arange(0, config.head_dim, 2).float().to(device) / config.head_dim
    return 1.0 / (config.rope_base(int(rope_length)) ** exponent)


def rope_cos_sin(
    config: MiniCPMConfig,
    positions: Tensor,
    rope_lengths: Tensor | None = None,
    inv_freq: Tensor | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[Tensor, Tensor]:
    """float32 cos/sin of shape positions.shape + (head_dim,), rotate-half layout, with the
    reference's roundings: angles ``float32(position) * inv_freq`` in float32, cos/sin computed in
    float32 and rounded to the activation ``dtype`` (the reference casts its cos/sin cache to the
    dtype of the values), then used in the float32 rotation.

    The frequencies come from ``inv_freq`` (broadcastable to positions.shape + (head_dim/2,), as
    the engine passes them per token with no host sync) or else from ``rope_lengths``.
    """
    if inv_freq is None:
        lengths = rope_lengths.to(positions.device).expand_as(positions)
        unique, inverse = torch.unique(lengths, return_inverse=True)
        table = torch.stack([rope_inv_freq(config, n, positions.device) for n in unique.tolist()])
        inv_freq = table[inverse]
    pos = positions.float()
    if config.rope_type == "linear":
        pos = pos / config.rope_factor
    angles = pos[..., None] * inv_freq
    emb = torch.cat((angles, angles), dim=-1)
    cos, sin = emb.cos(), emb.sin()
    if dtype != torch.float32:
        cos, sin = cos.to(dtype).float(), sin.to(dtype).float()
    return cos, sin


def signed_sin(sin: Tensor) -> Tensor:
    """``sin`` with its first half negated: what :func:`apply_rope` takes, computed once per forward."""
    half = sin.shape[-1] // 2
    return torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin_signed: Tensor) -> Tensor:
    """x: (batch, heads, seq, d); cos/sin_signed: (batch, seq, d). Rotation in float32.

    Rotate-half, ``x * cos + cat(-x2, x1) * sin``, written as ``x * cos + cat(x2, x1) * sin_signed``
    (a sign moved, so bitwise the same) to save operations per layer."""
    xf = x.float()
    half = xf.shape[-1] // 2
    swapped = xf.unflatten(-1, (2, half)).flip(-2).flatten(-2)
    return (xf * cos[:, None] + swapped * sin_signed[:, None]).to(x.dtype)


class ConcatLinear(nn.Module):
    """Linear layers over one input, outputs side by side: a fusion of layers whose weights cannot
    be stacked (quantized in different formats)."""

    def __init__(self, parts: list[nn.Module]) -> None:
        super().__init__()
        self.parts = nn.ModuleList(parts)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([p(x) for p in self.parts], dim=-1)


def fuse_linears(parts: list[nn.Module]) -> nn.Module:
    """One layer computing bias-free ``parts`` (float ``nn.Linear`` or :class:`QuantizedLinear`)
    stacked by output: one weight where they share a format, else a :class:`ConcatLinear`."""
    if all(type(p) is nn.Linear for p in parts):
        weight = torch.cat([p.weight for p in parts]).detach()
        fused = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
        fused.weight = nn.Parameter(weight, requires_grad=False)
        return fused
    if all(isinstance(p, QuantizedLinear) for p in parts):
        fused = stack(parts)
        if fused is not None:
            return fused
    return ConcatLinear(parts)


class Attention(nn.Module):
    def __init__(self, config: MiniCPMConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)
        self.qkv_proj: nn.Linear | None = None

    def fuse(self) -> None:
        """One ``qkv_proj`` with the q, k and v weights stacked (same function, fewer calls)."""
        self.qkv_proj = fuse_linears([self.q_proj, self.k_proj, self.v_proj])
        del self.q_proj, self.k_proj, self.v_proj

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, cache: AttentionCache | None) -> Tensor:
        b, t, _ = x.shape
        h, kv, d = self.num_heads, self.num_kv_heads, self.head_dim
        if self.qkv_proj is not None:
            qkv = self.qkv_proj(x).view(b, t, h + 2 * kv, d).transpose(1, 2)
            qk = apply_rope(qkv[:, : h + kv], cos, sin)  # q and k rotated in one pass
            q, k, v = qk[:, :h], qk[:, h:], qkv[:, h + kv :]
        else:
            q = self.q_proj(x).view(b, t, h, d).transpose(1, 2)
            k = self.k_proj(x).view(b, t, kv, d).transpose(1, 2)
            v = self.v_proj(x).view(b, t, kv, d).transpose(1, 2)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = causal_attention(q, k, v) if cache is None else cache.attend(self.layer, q, k, v)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, config: MiniCPMConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.gate_up_proj: nn.Linear | None = None

    def fuse(self) -> None:
        """One ``gate_up_proj`` with the gate and up weights stacked."""
        self.gate_up_proj = fuse_linears([self.gate_proj, self.up_proj])
        del self.gate_proj, self.up_proj

    def forward(self, x: Tensor) -> Tensor:
        if self.gate_up_proj is not None:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
            return self.down_proj(F.silu(gate) * up)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: MiniCPMConfig, layer: int) -> None:
        super().__init__()
        self.self_attn = Attention(config, layer)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.residual_scale = config.residual_scale

    def forward(self, h: Tensor, cos: Tensor, sin: Tensor, cache: AttentionCache | None) -> Tensor:
        scale = self.residual_scale
        branch = self.self_attn(self.input_layernorm(h), cos, sin, cache)
        h = h + (branch * scale if scale != 1 else branch)
        branch = self.mlp(self.post_attention_layernorm(h))
        return h + (branch * scale if scale != 1 else branch)


class MiniCPMModel(nn.Module):
    def __init__(self, config: MiniCPMConfig) -> None:
        super().__init__()
        weight = torch.empty(config.vocab_size, config.hidden_size)
        if not weight.is_meta:  # nn.Embedding's own initialisation; on the meta device (every
            nn.init.normal_(weight)  # checkpoint load) it would import torch._dynamo, a large share of start-up
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, _weight=weight)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class MiniCPMForCausalLM(nn.Module):
    """MiniCPM-2B-128k (and any MiniCPM / Llama checkpoint) as a torch module."""

    def __init__(self, config: MiniCPMConfig) -> None:
        super().__init__()
        self.config = config
        self.model = MiniCPMModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()

    def tie_weights(self) -> None:
        """A tied head shares the embedding table (a quantized table: its codes); a head quantized
        on its own (an engine's or a converter's ``quantize``) stays as it is."""
        if self.config.tie_word_embeddings:
            embed = self.model.embed_tokens
            if isinstance(embed, QuantizedEmbedding):
                self.lm_head = embed.table
            elif type(self.lm_head) is nn.Linear:
                self.lm_head.weight = embed.weight

    @property
    def fused(self) -> bool:
        return self.model.layers[0].self_attn.qkv_proj is not None

    def fuse_projections(self) -> None:
        """Stack q/k/v and gate/up weights into one linear each, in place (the inference engine's
        layout: fewer, larger matrix products). Checkpoint names no longer apply afterwards, so
        :meth:`save_pretrained` refuses a fused model."""
        if not self.fused:
            for layer in self.model.layers:
                layer.self_attn.fuse()
                layer.mlp.fuse()

    @property
    def dtype(self) -> torch.dtype:
        """The activation dtype (the norms' and the residual stream's; weights may be quantized)."""
        return self.model.norm.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.model.norm.weight.device

    def forward(
        self,
        input_ids: Tensor,
        positions: Tensor | None = None,
        cache: AttentionCache | None = None,
        rope_lengths: Tensor | int | None = None,
        logits_to_keep: int | Tensor | None = None,
        inv_freq: Tensor | None = None,
    ) -> Tensor:
        """float32 logits of ``input_ids`` (batch, seq): :meth:`hidden_states`, then :meth:`logits`
        of the positions ``logits_to_keep`` names (default: all without a cache, the last with one)."""
        h = self.hidden_states(input_ids, positions, cache, rope_lengths, inv_freq)
        if logits_to_keep is None:
            logits_to_keep = 0 if cache is None else 1
        return self.logits(h, logits_to_keep)

    def hidden_states(
        self,
        input_ids: Tensor,
        positions: Tensor | None = None,
        cache: AttentionCache | None = None,
        rope_lengths: Tensor | int | None = None,
        inv_freq: Tensor | None = None,
    ) -> Tensor:
        """The last decoder layer's output (batch, seq, hidden), before the final norm."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, seq), got shape {tuple(input_ids.shape)}")
        b, t = input_ids.shape
        if positions is None:
            start = cache.length if cache is not None else 0
            positions = torch.arange(start, start + t, device=input_ids.device).expand(b, t)
        if inv_freq is None:
            if rope_lengths is None:
                rope_lengths = positions.amax(dim=-1, keepdim=True) + 1
            elif isinstance(rope_lengths, int):
                rope_lengths = torch.tensor(rope_lengths)
            elif rope_lengths.dim() == 1:
                rope_lengths = rope_lengths[:, None]
        cos, sin = rope_cos_sin(self.config, positions, rope_lengths, inv_freq, self.dtype)
        sin = signed_sin(sin)

        h = self.model.embed_tokens(input_ids)
        if self.config.scale_emb != 1:
            h = h * self.config.scale_emb
        for layer in self.model.layers:
            h = layer(h, cos, sin, cache)
        return h

    def logits(self, h: Tensor, logits_to_keep: int | Tensor = 0) -> Tensor:
        """float32 logits from :meth:`hidden_states`: of the last ``logits_to_keep`` positions
        (0: all), or of the positions a tensor of indices names; final norm, the reference's
        division by hidden / dim_model_base, the head."""
        if isinstance(logits_to_keep, int):
            h = h[:, -logits_to_keep:] if logits_to_keep > 0 else h
        else:
            h = h[:, logits_to_keep.to(h.device)]
        h = self.model.norm(h)
        if self.config.logit_scale != 1:  # a division, as the reference writes it
            h = h / (self.config.hidden_size / self.config.dim_model_base)
        return self.lm_head(h).float()

    # ------------------------------------------------------------------ checkpoints
    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        dtype: torch.dtype | str | None = None,
        device: torch.device | str = "cpu",
        quantize: str = "auto",
        group_size: int | None = None,
    ) -> MiniCPMForCausalLM:
        """Load a checkpoint directory (config.json + safetensors or pytorch_model.bin, sharded or not).

        Default dtype: bfloat16 on GPU, float32 on CPU (the activations' and float weights'). The
        module is built on the meta device and the checkpoint's tensors are read, converted (and
        quantized) and assigned one at a time, so the peak stays near what the model keeps
        (:func:`minicpm.weights.load_model`). ``quantize``: "auto" keeps quantized weights as
        stored (CPU), "none" dequantizes them, "int8" / "int4" quantize every linear layer
        (:func:`minicpm.quant.quantize_model`).
        """
        from .weights import load_model

        return load_model(cls, path, dtype=dtype, device=device, quantize=quantize, group_size=group_size)

    def save_pretrained(self, path: str | Path, max_shard_bytes: int | None = None) -> None:
        """Write config.json and safetensors weights (sharded above ``max_shard_bytes``)."""
        from .weights import save_model

        save_model(self, path, max_shard_bytes=max_shard_bytes)
