"""Model numerics: parity with HF transformers' Llama (scales folded in) and an eager reference."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close_rel, random_model, reference_logits, tiny_config

from minicpm import DenseKVCache

transformers = pytest.importorskip("transformers")
from hf_peer import hf_llama  # noqa: E402  (benchmarks/: the benchmarks' peer, tested here)

CASES = {
    "mha-untied": dict(),
    "gqa-untied": dict(num_key_value_heads=2),
    "mha-tied": dict(tie_word_embeddings=True),
    "gqa-tied": dict(num_key_value_heads=1, tie_word_embeddings=True),
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("seq_len", [40, 150])  # below and above max_position_embeddings (64)
def test_parity_with_hf_llama(case: str, seq_len: int) -> None:
    config = tiny_config(**CASES[case])
    model = random_model(config)
    state = {k: v.detach() for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        state.pop("lm_head.weight")
    hf = hf_llama(model, "eager")  # transformers' Llama carrying MiniCPM's three scales in its weights
    ids = torch.randint(0, config.vocab_size, (2, seq_len), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model(ids)
        theirs = hf(ids).logits
    assert ours.dtype == torch.float32 and ours.shape == (2, seq_len, config.vocab_size)
    assert_close_rel(ours, theirs, 1e-4)
    assert_close_rel(ours, reference_logits(config, state, ids), 1e-4)


def test_dynamic_ntk_changes_logits_only_beyond_max_positions() -> None:
    config = tiny_config()
    plain = tiny_config(rope_scaling=None)
    model, plain_model = random_model(config), random_model(plain)
    ids = torch.randint(0, config.vocab_size, (1, 150), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(model(ids[:, :64]), plain_model(ids[:, :64]))
        long_dyn, long_plain = model(ids), plain_model(ids)
    assert (long_dyn - long_plain).abs().max() > 1e-3
    # the base at S = 2 * max_pos, factor 4: theta * (4*2 - 3) ** (16/14)
    assert config.rope_base(128) == pytest.approx(1e6 * 5 ** (16 / 14))
    assert config.rope_base(64) == 1e6


@pytest.mark.parametrize("scaling", [None, {"type": "linear", "factor": 2.0}])
def test_plain_and_linear_rope_match_reference(scaling) -> None:
    config = tiny_config(rope_scaling=scaling, num_key_value_heads=2)
    model = random_model(config)
    ids = torch.randint(0, config.vocab_size, (1, 90), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert_close_rel(model(ids), reference_logits(config, model.state_dict(), ids), 1e-4)
        hf = hf_llama(model, "eager")
        assert_close_rel(model(ids), hf(ids).logits, 1e-4)


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_kv_cache_decode_matches_full_recompute(kv_heads: int) -> None:
    config = tiny_config(num_key_value_heads=kv_heads)
    model = random_model(config)
    ids = torch.randint(0, config.vocab_size, (2, 30), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        full = model(ids)
        cache = DenseKVCache(config, batch_size=2, max_length=32)
        first = model(ids[:, :20], cache=cache, logits_to_keep=torch.arange(20))
        steps = [model(ids[:, 20:25], cache=cache, logits_to_keep=5)]
        steps += [model(ids[:, i : i + 1], cache=cache) for i in range(25, 30)]
    assert cache.length == 30
    assert_close_rel(first, full[:, :20], 1e-5)
    assert_close_rel(torch.cat(steps, 1), full[:, 20:], 1e-5)


def test_logits_to_keep_selects_positions() -> None:
    config = tiny_config()
    model = random_model(config)
    ids = torch.randint(0, config.vocab_size, (1, 12))
    with torch.no_grad():
        full = model(ids)
        assert torch.allclose(model(ids, logits_to_keep=1), full[:, -1:], atol=1e-6)
        assert torch.allclose(model(ids, logits_to_keep=torch.tensor([0, 5])), full[:, [0, 5]], atol=1e-6)


def test_rope_base_fixed_per_sequence_while_decoding_past_max_positions() -> None:
    """The documented rule: a sequence keeps the base of its prompt length for every position."""
    config = tiny_config()
    model = random_model(config)
    ids = torch.randint(0, config.vocab_size, (1, 100), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        full = model(ids, rope_lengths=80)  # every position with base(80)
        cache = DenseKVCache(config, 1, 100)
        first = model(ids[:, :80], cache=cache, logits_to_keep=0)  # prompt of 80: base(80)
        rest = torch.cat([model(ids[:, i : i + 1], cache=cache, rope_lengths=80) for i in range(80, 100)], 1)
    assert_close_rel(first, full[:, :80], 1e-5)
    assert_close_rel(rest, full[:, 80:], 1e-5)
    assert_close_rel(first, reference_logits(config, model.state_dict(), ids[:, :80]), 1e-4)


def test_bfloat16_close_to_float32() -> None:
    config = tiny_config(num_key_value_heads=2)
    model = random_model(config)
    ids = torch.randint(0, config.vocab_size, (2, 100), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        ref = model(ids)
        bf16 = model.to(torch.bfloat16)(ids)
    assert bf16.dtype == torch.float32
    # measured 7.1e-3 of the logit scale on this tiny model (bf16 keeps 8 mantissa bits)
    err = assert_close_rel(bf16, ref, 4e-2)
    assert err > 0  # the bf16 path really ran in bf16
    agree = (bf16.argmax(-1) == ref.argmax(-1)).float().mean().item()
    assert agree >= 0.9


def _reference_at(model, ids: torch.Tensor, position_ids: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, ...]:
    """One decoder layer as the reference's ``modeling_minicpm.py`` computes it, in the model's
    dtype: its dynamic-NTK cos/sin cache for ``seq_len`` (float32 power for ``inv_freq``, float32
    angles, cos/sin cast to the values' dtype), its float32 rotation, eager attention with a float32
    softmax, its RMSNorm, and the head on the hidden state *divided* by hidden / dim_model_base.
    Returns (cos, sin, logits)."""
    c, dtype = model.config, model.dtype
    sd = {k: v for k, v in model.state_dict().items()}
    dim = c.head_dim
    base = c.rope_theta
    if seq_len > c.max_position_embeddings:
        factor = c.rope_factor
        base = base * ((factor * seq_len / c.max_position_embeddings) - (factor - 1)) ** (dim / (dim - 2))
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2).float() / dim))
    t = torch.arange(seq_len, dtype=inv_freq.dtype)
    emb = torch.cat((torch.outer(t, inv_freq),) * 2, dim=-1)
    cos, sin = emb.cos().to(dtype)[position_ids], emb.sin().to(dtype)[position_ids]

    def rms(x, w):
        variance = x.to(torch.float32).pow(2).mean(dim=-1, keepdim=True)
        return (x * torch.rsqrt(variance + c.rms_norm_eps)).to(x.dtype) * w

    def rotate(x):
        half = x.shape[-1] // 2
        xf = x.float()
        turned = torch.cat((-xf[..., half:], xf[..., :half]), dim=-1)
        return ((xf * cos) + (turned * sin)).to(x.dtype)

    b, s = ids.shape
    h = F.embedding(ids, sd["model.embed_tokens.weight"]) * c.scale_emb
    p = "model.layers.0."
    x = rms(h, sd[p + "input_layernorm.weight"])
    heads, kv = c.num_attention_heads, c.num_key_value_heads
    q = F.linear(x, sd[p + "self_attn.q_proj.weight"]).view(b, s, heads, dim).transpose(1, 2)
    k = F.linear(x, sd[p + "self_attn.k_proj.weight"]).view(b, s, kv, dim).transpose(1, 2)
    v = F.linear(x, sd[p + "self_attn.v_proj.weight"]).view(b, s, kv, dim).transpose(1, 2)
    q, k = rotate(q), rotate(k)
    k, v = k.repeat_interleave(heads // kv, 1), v.repeat_interleave(heads // kv, 1)
    scores = torch.matmul(q, k.transpose(2, 3)) / math.sqrt(dim)
    scores = scores + torch.full((s, s), torch.finfo(dtype).min, dtype=dtype).triu(1)
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(dtype)
    att = torch.matmul(weights, v).transpose(1, 2).reshape(b, s, heads * dim)
    h = h + F.linear(att, sd[p + "self_attn.o_proj.weight"]) * (c.scale_depth / math.sqrt(c.num_hidden_layers))
    x = rms(h, sd[p + "post_attention_layernorm.weight"])
    mlp = F.silu(F.linear(x, sd[p + "mlp.gate_proj.weight"])) * F.linear(x, sd[p + "mlp.up_proj.weight"])
    h = h + F.linear(mlp, sd[p + "mlp.down_proj.weight"]) * (c.scale_depth / math.sqrt(c.num_hidden_layers))
    h = rms(h, sd["model.norm.weight"])
    logits = F.linear(h / (c.hidden_size / c.dim_model_base), sd["lm_head.weight"]).float()
    return cos, sin, logits


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 2e-6), (torch.bfloat16, 3e-2)])
def test_rope_and_logits_follow_the_references_arithmetic_near_100k(dtype, tol) -> None:
    """Positions around 100k with dynamic NTK active (max_position_embeddings 65536): cos/sin the
    same bits as the reference's cache, logits to rounding; a float64 inv_freq would be off."""
    from minicpm.model import rope_cos_sin, rope_inv_freq

    config = tiny_config(num_hidden_layers=1, num_key_value_heads=2, max_position_embeddings=65536, max_length=131072)
    model = random_model(config, seed=21).to(dtype)
    seq_len = 100_008
    positions = torch.arange(100_000, seq_len)
    ids = torch.randint(0, config.vocab_size, (1, 8), generator=torch.Generator().manual_seed(0))
    ref_cos, ref_sin, ref_logits = _reference_at(model, ids, positions, seq_len)
    inv_freq = rope_inv_freq(config, seq_len)
    cos, sin = rope_cos_sin(config, positions, inv_freq=inv_freq, dtype=dtype)
    assert torch.equal(cos, ref_cos.float()) and torch.equal(sin, ref_sin.float())
    with torch.no_grad():
        logits = model(ids, positions[None], rope_lengths=seq_len)[0]
    assert_close_rel(logits, ref_logits[0], tol)
    # the teeth: inverse frequencies from a float64 power (this project's earlier arithmetic) give
    # other angles at these positions (here ~1e-5 rad; ~4e-3 at head_dim 64 near 100k), other cos
    exponent = torch.arange(0, config.head_dim, 2, dtype=torch.float64) / config.head_dim
    wide = (1.0 / torch.tensor(config.rope_base(seq_len), dtype=torch.float64) ** exponent).float()
    assert not torch.equal(rope_cos_sin(config, positions, inv_freq=wide)[0], ref_cos.float())
