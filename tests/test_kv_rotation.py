"""The Hadamard rotation of a quantized KV cache (minicpm.engine.attention.kv_format): attention is
unchanged by it, an outlier channel stops setting its group's scale, the engine rotates exactly the
quantized caches it should, the fused decoder rotates as the eager path does, and the persistent
prefix cache keeps rotated and unrotated blocks apart."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from helpers import random_model, tiny_config

from minicpm import SamplingParams
from minicpm.engine import EngineConfig, LLMEngine, layers
from minicpm.engine.attention.kv_format import FORMATS, hadamard, rotate_heads
from minicpm.engine.cpu_kernels import native_kernels
from minicpm.errors import UserError
from minicpm.eval.perplexity import RoundTripCache
from minicpm.model import causal_attention

QUANTIZED = ["int8", "int4"]


def _engine(model, kv: str = "int4", **fields) -> LLMEngine:
    fields = {"block_size": 8, "max_num_seqs": 3, "max_num_batched_tokens": 24, **fields}
    return LLMEngine(model, None, EngineConfig(kv_cache_dtype=kv, **fields))


@pytest.fixture(scope="module")
def model():
    config = tiny_config(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=256)
    return random_model(config, seed=7)  # head_dim 64


def test_the_rotation_is_orthonormal_and_leaves_attention_unchanged() -> None:
    h = hadamard(64)
    torch.testing.assert_close(h @ h, torch.eye(64), rtol=0, atol=1e-6)
    assert torch.equal(h, h.T) and set((h * 8).unique().tolist()) == {-1.0, 1.0}
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 37, 128, generator=gen, dtype=torch.float64) for _ in range(3))
    hd = h.double()
    plain = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    rotated = F.scaled_dot_product_attention(
        rotate_heads(q, hd), rotate_heads(k, hd), rotate_heads(v, hd), is_causal=True
    )
    torch.testing.assert_close(rotate_heads(rotated, hd), plain, rtol=1e-12, atol=1e-12)
    # per run of 64 values; float32 math, rounded once to the input's dtype (bfloat16 on the CPU: a
    # bfloat16 product, whose float32 sums of exact products give the same values)
    x = torch.randn(4000, 128, generator=gen).to(torch.bfloat16)
    want = torch.cat((x[:, :64].float() @ h, x[:, 64:].float() @ h), dim=-1).to(torch.bfloat16)
    assert torch.equal(rotate_heads(x, h), want)
    # channels of very different sizes: a few sums round in another order, by one bfloat16 step
    x = (torch.randn(4000, 128, generator=gen) * torch.logspace(-4, 2, 128)).to(torch.bfloat16)
    want = torch.cat((x[:, :64].float() @ h, x[:, 64:].float() @ h), dim=-1).to(torch.bfloat16)
    got = rotate_heads(x, h)
    print(f"{(got != want).float().mean().item():.2e} of the values differ")
    assert (got != want).float().mean() < 1e-3
    assert ((got.float() - want.float()).abs() <= want.float().abs() * 2**-7).all()


@pytest.mark.parametrize("kv", QUANTIZED)
def test_rotation_spreads_an_outlier_channel_over_the_group(kv) -> None:
    """Keys with a few large channels (as real models' rotated keys have): the scores through the
    quantized round trip are clearly closer to the float scores rotated; the perplexity
    harness's round trip rotates as the cache does."""
    gen = torch.Generator().manual_seed(1)
    heads, tokens, d = 2, 96, 64
    fmt, h = FORMATS[kv], hadamard(64)
    k = torch.randn(1, heads, tokens, d, generator=gen)
    k[..., [3, 40]] *= 30
    q, v = torch.randn(1, heads, tokens, d, generator=gen), torch.randn(1, heads, tokens, d, generator=gen)
    exact = q @ k.transpose(-1, -2)
    plain = q @ fmt.round_trip(k).transpose(-1, -2)
    rotated = rotate_heads(q, h) @ fmt.round_trip(rotate_heads(k, h)).transpose(-1, -2)
    err_plain, err_rotated = (plain - exact).abs().mean(), (rotated - exact).abs().mean()
    assert err_rotated < err_plain / 1.5, (err_plain, err_rotated)
    got = RoundTripCache(fmt, h).attend(0, q, k, v)
    values = fmt.round_trip(rotate_heads(v, h), value=True)  # int4's values: one pair per 64
    want = causal_attention(rotate_heads(q, h), fmt.round_trip(rotate_heads(k, h)), values)
    torch.testing.assert_close(got, rotate_heads(want, h))


def test_the_engine_rotates_quantized_caches_only(model) -> None:
    assert _engine(model, "int4").runner.cache.rotation is not None
    assert _engine(model, "int8").runner.cache.rotation is not None
    assert _engine(model, "auto").runner.cache.rotation is None
    assert _engine(model, "int4", kv_rotation=False).runner.cache.rotation is None
    odd = random_model(tiny_config(num_hidden_layers=1, hidden_size=96, num_attention_heads=3, num_key_value_heads=3))
    assert _engine(odd, "int4").runner.cache.rotation is None  # head_dim 32: not a multiple of 64
    with pytest.raises(UserError, match="kv_rotation"):
        EngineConfig(kv_rotation="yes")


def _first_logits(engine: LLMEngine, prompts: list[list[int]]) -> torch.Tensor:
    rows, sample = [], engine.runner.sampler.sample
    engine.runner.sampler.sample = lambda r, s: (rows.append(r.clone()), sample(r, s))[1]
    engine.generate(prompts, SamplingParams(max_new_tokens=2, ignore_eos=True))
    return rows[0]


def test_a_rotated_int8_cache_gives_the_float_caches_logits(model) -> None:
    """Every step rotates queries, keys and values and each output back: through a chunked prefill
    and a decode, an int8 cache rotated gives the float cache's logits to int8's rounding (an output
    left rotated would not be near them)."""
    gen = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, 97, (n,), generator=gen).tolist() for n in (21, 40)]
    want = _first_logits(_engine(model, "auto"), prompts)
    got = _first_logits(_engine(model, "int8"), prompts)
    torch.testing.assert_close(got, want, rtol=0.02, atol=0.02)
    scale = want.abs().mean()
    assert (got - want).abs().mean() < 0.01 * scale


@pytest.mark.skipif(native_kernels() is None, reason="no C compiler: the native kernels cannot be built")
@pytest.mark.parametrize("kv", QUANTIZED)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_fused_decoder_rotates_as_the_eager_layers_do(monkeypatch, one_thread, kv, dtype) -> None:
    """The fused decoder's steps give the eager layers' logits over a rotated cache (float32: to
    rounding, the same tokens; bfloat16: the first tokens, logits within its rounding); with its
    rotation turned off (a mutant) the float32 logits differ."""
    from minicpm.engine import fused_decode

    monkeypatch.setattr(layers, "cpu_linear", lambda model: "panel")
    config = tiny_config(
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=256, intermediate_size=256
    )
    m = random_model(config, seed=21).to(dtype)
    settings = EngineConfig(block_size=8, max_num_seqs=3, max_num_batched_tokens=24, kv_cache_dtype=kv)
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 97, (n,), generator=gen).tolist() for n in (30, 9, 45)]
    params = SamplingParams(max_new_tokens=8, ignore_eos=True)

    def run(engine: LLMEngine) -> tuple[list, list[torch.Tensor]]:
        rows, sample = [], engine.runner.sampler.sample
        engine.runner.sampler.sample = lambda r, s: (rows.append(r.clone()), sample(r, s))[1]
        return [c.token_ids for c in engine.generate(prompts, params)], rows

    fused = LLMEngine(m, None, settings)
    assert fused.runner.fused is not None and fused.runner.cache.rotation is not None
    got, got_logits = run(fused)
    want, want_logits = run(LLMEngine(m, None, dataclasses.replace(settings, fused_decode=False)))
    if dtype == torch.float32:
        assert got == want
        # int4: the fast transform's last-bit differences may move a group's least-squares scale
        # by a float16 step (kv_format.int4_fit), a code or two
        tol = 1e-4 if kv == "int4" else 1e-5
        for a, b in zip(got_logits, want_logits, strict=True):
            torch.testing.assert_close(a, b, rtol=tol, atol=tol)
        # the mutant: the fused decoder told the cache is not rotated
        real = fused_decode.FusedDecoder.hidden_states

        def unrotated(self, *args):
            saved, self.cache.rotation = self.cache.rotation, None
            try:
                return real(self, *args)
            finally:
                self.cache.rotation = saved

        monkeypatch.setattr(fused_decode.FusedDecoder, "hidden_states", unrotated)
        _, bad_logits = run(LLMEngine(m, None, settings))
        assert any(
            not torch.allclose(a, b, rtol=1e-3, atol=1e-3) for a, b in zip(bad_logits, want_logits, strict=False)
        )
    else:
        assert [t[:2] for t in got] == [t[:2] for t in want]
        torch.testing.assert_close(got_logits[1], want_logits[1], rtol=0.05, atol=0.05)


def test_the_prefix_store_keeps_rotated_and_plain_blocks_apart(model, tmp_path, monkeypatch) -> None:
    from minicpm.engine.attention import cache as cache_module

    int8 = _engine(model, "int8", kv_cache_dir=str(tmp_path)).prefix_store.store.identity
    rotated = _engine(model, "int4", kv_cache_dir=str(tmp_path))
    # an int4 store also names how its writer fits the scales (a CUDA cache writes plain pairs);
    # an int8 store does not
    monkeypatch.setattr(cache_module, "writer_fits", lambda device: 0)
    refit = _engine(model, "int4", kv_cache_dir=str(tmp_path)).prefix_store.store.identity
    assert refit != rotated.prefix_store.store.identity
    assert _engine(model, "int8", kv_cache_dir=str(tmp_path)).prefix_store.store.identity == int8
    monkeypatch.undo()
    # and the values' group (int4 values in 64s since 3b53ce9: older stores are another layout)
    from minicpm.engine.attention import kv_format

    monkeypatch.setattr(kv_format, "VALUE_GROUP", 32)
    regrouped = _engine(model, "int4", kv_cache_dir=str(tmp_path)).prefix_store.store.identity
    assert regrouped != rotated.prefix_store.store.identity
    assert _engine(model, "int8", kv_cache_dir=str(tmp_path)).prefix_store.store.identity == int8
    monkeypatch.undo()
    plain = _engine(model, "int4", kv_cache_dir=str(tmp_path), kv_rotation=False)
    assert rotated.prefix_store.store.identity != plain.prefix_store.store.identity
    assert _engine(model, "int4", kv_cache_dir=str(tmp_path)).prefix_store.store.identity == (
        rotated.prefix_store.store.identity
    )
