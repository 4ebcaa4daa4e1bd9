"""The Triton kernels reading a quantized KV cache in place (int8, int4, fp8), run on CPU in Triton's
interpreter: the paged decode and varlen prefill kernels against attention over
``KVFormat.dequantize`` of the same codes (float32 and bfloat16 queries, GQA and MHA, shuffled and
partial blocks, several partition sizes), the wrappers' checks of codes and scales, and engines on
the Triton backend with an int8 / int4 cache giving the torch backend's greedy tokens over the same
format (fp8 is CUDA-only in an engine: its kernel path is tested directly here).

TRITON_INTERPRET is set before triton decorates the kernels (see tests/test_triton_attention.py,
whose case builders and bfloat16-dot fixture this module shares)."""

from __future__ import annotations

import dataclasses
import os

os.environ["TRITON_INTERPRET"] = "1"

import pytest
import torch

pytest.importorskip("triton")

from helpers import random_model, tiny_config
from test_triton_attention import TOLS, _interpreter_bf16_dot, make_case, prefill_case, ta  # noqa: F401

from minicpm import SamplingParams
from minicpm.engine import EngineConfig, LLMEngine
from minicpm.engine.attention.kv_format import FORMATS

FORMAT_NAMES = ["int8", "int4", "fp8"]


def quantize_case(name: str, k: torch.Tensor, v: torch.Tensor, dtype: torch.dtype):
    """Codes and scales of ``k`` / ``v`` (float32, NaN where no sequence may read: a NaN row's scales
    are NaN, so a stray read still poisons) and what a reference backend reads: the dequantized
    cache in the activation dtype."""
    fmt = FORMATS[name]
    (kq, ks), (vq, vs) = fmt.quantize(k.float()), fmt.quantize(v.float(), value=True)
    return (kq, vq, ks, vs), fmt.dequantize(kq, ks, dtype), fmt.dequantize(vq, vs, dtype, value=True)


# (query dtype, query heads, kv heads, partition size): GQA and MHA, several partitions and one
DECODE_CASES = [
    (torch.float32, 4, 2, 32),
    (torch.float32, 2, 2, 16),
    (torch.bfloat16, 4, 2, 512),
    (torch.bfloat16, 2, 2, 32),
]


@pytest.mark.parametrize("name", FORMAT_NAMES)
@pytest.mark.parametrize(
    ("dtype", "h", "kv", "partition"),
    DECODE_CASES,
    ids=[f"{str(d)[6:]}-{'mha' if h == kv else 'gqa'}-p{p}" for d, h, kv, p in DECODE_CASES],
)
def test_decode_kernel_reads_codes_in_place(name, dtype, h, kv, partition):
    """Lengths 1, a block less one, a block, 0 (a padded graph row), and several blocks across
    partitions, over shuffled blocks; head dim 64 (two scale groups a row)."""
    q, k, v, bt, ctx = make_case([1, 15, 16, 0, 50, 90], h=h, kv=kv, d=64, block_size=16, max_blocks=6, dtype=dtype)
    (kq, vq, ks, vs), kd, vd = quantize_case(name, k, v, dtype)
    out = ta.paged_decode_attention(
        q, kq, vq, bt, ctx, 0.125, partition_size=partition, k_scale=ks, v_scale=vs, kv_format=name
    )
    ref = ta.paged_decode_attention_reference(q, kd, vd, bt, ctx, 0.125)
    assert out.dtype == dtype and torch.isfinite(out.float()).all()
    torch.testing.assert_close(out.float(), ref.float(), **TOLS[dtype])
    assert torch.equal(out[3].float(), torch.zeros_like(out[3].float()))


@pytest.mark.parametrize("name", FORMAT_NAMES)
@pytest.mark.parametrize(
    ("dtype", "h", "kv"), [(torch.float32, 4, 2), (torch.bfloat16, 2, 2)], ids=["fp32-gqa", "bf16-mha"]
)
def test_prefill_kernel_reads_codes_in_place(name, dtype, h, kv):
    """A first chunk, a chunk whose past ends inside a block, a decode row, a chunk over two query
    tiles, each over shuffled blocks."""
    contexts, query_lens = [20, 45, 33, 70], [20, 13, 1, 40]
    q, k, v, tables, cu, ctx = prefill_case(contexts, query_lens, h=h, kv=kv, d=64, block_size=16, dtype=dtype)
    (kq, vq, ks, vs), kd, vd = quantize_case(name, k, v, dtype)
    out = ta.paged_prefill_attention(
        q, kq, vq, tables, cu, ctx, 0.125, max(query_lens), 16, 16, k_scale=ks, v_scale=vs, kv_format=name
    )
    ref = ta.paged_prefill_attention_reference(q, kd, vd, tables, cu, ctx, 0.125)
    assert out.dtype == dtype and torch.isfinite(out.float()).all()
    torch.testing.assert_close(out.float(), ref.float(), **TOLS[dtype])


def test_fp8_codes_are_decoded_exactly_as_torch_reads_them():
    """Every finite e4m3 code (subnormals and negative zero included) as a value, scale 1, one token
    a sequence: the output is that token's value, decoded from its bits exactly as torch does."""
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    codes[codes.view(torch.float8_e4m3fn).float().isnan()] = 0  # the two NaN codes: never stored
    values = codes.view(torch.float8_e4m3fn).reshape(8, 1, 1, 32)  # (blocks, block_size 1, kv 1, 32)
    keys = torch.zeros_like(values)
    scales = torch.ones(8, 1, 1, 1, dtype=torch.float16)
    tables = torch.arange(8, dtype=torch.int32)[:, None]
    ctx = torch.ones(8, dtype=torch.int32)
    q = torch.zeros(8, 1, 32)
    out = ta.paged_decode_attention(q, keys, values, tables, ctx, 1.0, k_scale=scales, v_scale=scales, kv_format="fp8")
    assert torch.equal(out, values.float().reshape(8, 1, 32))


def test_every_cache_format_is_one_the_kernels_serve():
    """No format reaches the Triton backend only to be refused (or read as values): float formats
    take the plain path, quantized ones their own."""
    for fmt in FORMATS.values():
        scales = torch.zeros(1) if fmt.quantized else None
        assert (ta._format_tag(fmt.name, scales, scales) > 0) == fmt.quantized, fmt.name
        if fmt.quantized:
            assert ta._CODE_DTYPES[fmt.name] == fmt.dtype
            assert ta._code_width(fmt.name, 64) == fmt.code_width(64)
            for d in (64, 96, 128):
                for value in (False, True):
                    assert ta._scale_width(fmt.name, d, value) == fmt.scale_width(d, value), (fmt.name, d, value)


def _quant_args(name="int8", d=64, **over):
    fmt = FORMATS[name]
    k = torch.zeros(3, 16, 2, fmt.code_width(d), dtype=fmt.dtype)
    s = torch.zeros(3, 16, 2, fmt.scale_width(d), dtype=torch.float16)
    vs = torch.zeros(3, 16, 2, fmt.scale_width(d, value=True), dtype=torch.float16)
    args = {
        "q": torch.zeros(2, 4, d),
        "k_cache": k,
        "v_cache": k.clone(),
        "block_tables": torch.zeros(2, 2, dtype=torch.int32),
        "context_lens": torch.ones(2, dtype=torch.int32),
        "scale": 1.0,
        "k_scale": s,
        "v_scale": vs,
        "kv_format": name,
    }
    args.update(over)
    return args


@pytest.mark.parametrize(
    ("over", "match"),
    [
        ({"k_scale": None}, "needs its float16 scales"),
        ({"v_scale": torch.zeros(3, 16, 2, 2)}, "v_scale must be float16"),
        ({"k_scale": torch.zeros(3, 16, 2, 4, dtype=torch.float16)}, r"k_scale must be \(3, 16, 2, 2\)"),
        ({"k_scale": torch.zeros(3, 16, 2, 4, dtype=torch.float16)[..., ::2]}, "contiguous last dimension"),
        ({"k_cache": torch.zeros(3, 16, 2, 64, dtype=torch.uint8)}, r"holds torch\.int8 codes"),
        (
            {
                "k_cache": torch.zeros(3, 16, 2, 32, dtype=torch.int8),
                "v_cache": torch.zeros(3, 16, 2, 32, dtype=torch.int8),
            },
            "row holds 64 codes",
        ),
        ({"kv_format": "int2"}, "kv_format must be"),
        ({"kv_format": None}, "k_scale / v_scale given for a float cache"),
        ({"q": torch.zeros(2, 4, 16)}, "multiple of 32"),
    ],
)
def test_decode_validation_names_the_problem_with_codes_and_scales(over, match):
    with pytest.raises(ValueError, match=match):
        ta.paged_decode_attention(**_quant_args(**over))


def test_prefill_validation_names_the_problem_with_codes_and_scales():
    args = _quant_args("int4")
    fixed = {"q": torch.zeros(4, 4, 64), "cu_q": torch.tensor([0, 4], dtype=torch.int32), "max_query_len": 4}
    base = {k: v for k, v in args.items() if k not in ("q",)}
    base["block_tables"], base["context_lens"] = args["block_tables"][:1], args["context_lens"][:1]
    ok = ta.paged_prefill_attention(**fixed, **base)
    assert ok.shape == (4, 4, 64)
    with pytest.raises(ValueError, match=r"holds torch\.uint8 codes"):
        ta.paged_prefill_attention(**fixed, **{**base, "k_cache": base["k_cache"].view(torch.int8)})
    with pytest.raises(ValueError, match=r"v_scale must be \(3, 16, 2, 2\)"):  # int4 values: a pair per 64
        ta.paged_prefill_attention(**fixed, **{**base, "v_scale": base["k_scale"]})
    with pytest.raises(ValueError, match="needs its float16 scales"):
        ta.paged_prefill_attention(**fixed, **{**base, "v_scale": None})


# ------------------------------------------------------------------------------------ the engine
@pytest.mark.parametrize("kv_cache_dtype", ["int8", "int4"])
def test_engine_on_a_quantized_cache_gives_the_torch_backends_tokens(kv_cache_dtype, monkeypatch):
    """float32, head dim 32, GQA: mixed steps (decode rows beside chunks with a cached past) go to
    both kernels, which read the codes in place (no gather, no dequantized copy), and the greedy
    tokens are the torch backend's over the same format."""
    config = tiny_config(
        num_hidden_layers=2, hidden_size=128, num_attention_heads=4, num_key_value_heads=2, max_length=256
    )
    model = random_model(config, seed=4)
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 97, (n,), generator=gen).tolist() for n in (30, 21, 9)]
    params = SamplingParams(max_new_tokens=6, ignore_eos=True)
    settings = EngineConfig(
        block_size=8,
        max_num_seqs=3,
        max_num_batched_tokens=16,
        kv_cache_memory=1 << 20,
        kv_cache_dtype=kv_cache_dtype,
        attention_backend="torch",
    )
    expected = [c.token_ids for c in LLMEngine(model, None, settings).generate(prompts, params)]
    engine = LLMEngine(model, None, dataclasses.replace(settings, attention_backend="triton"))
    cache = engine.runner.cache
    assert cache.format.name == kv_cache_dtype and cache.backend.name == "triton"
    backend = cache.backend
    calls = {"decode": 0, "prefill": 0}
    for kernel in calls:
        real = getattr(backend, f"{kernel}_kernel")

        def counted(*args, _real=real, _kernel=kernel, **kwargs):
            calls[_kernel] += 1
            assert kwargs["kv_format"] == kv_cache_dtype and kwargs["k_scale"] is not None
            return _real(*args, **kwargs)

        monkeypatch.setattr(backend, f"{kernel}_kernel", counted)
    monkeypatch.setattr(torch.Tensor, "index_select", lambda *a, **k: pytest.fail("a gather"))
    monkeypatch.setattr(type(cache), "read_blocks", lambda *a, **k: pytest.fail("a dequantized copy"))
    got = [c.token_ids for c in engine.generate(prompts, params)]
    assert calls["decode"] and calls["prefill"]
    assert got == expected
    assert engine.stats()["attention_backend"] == "triton" and engine.stats()["kernel_failures"] == 0
