"""The quantized KV cache (``kv_cache_dtype`` int8 / int4): the reference quantizer's round trip,
the C quantizer bit for bit against it, every CPU kernel reading codes in place against attention
over the dequantized cache (float32 and bfloat16 queries, GQA and MHA, head sizes on both the
AVX-512 and the portable paths, shuffled and partial blocks), and the engine: every backend gives
the reference backend's greedy tokens, prefix hits, preemption and ``n`` choices included."""

from __future__ import annotations

import pytest
import torch
from helpers import random_model, tiny_config
from test_cpu_kernels import make_case, needs_native, prefill_dtypes, prefill_reference, reference

from minicpm import SamplingParams
from minicpm.engine import EngineConfig, LLMEngine
from minicpm.engine.attention.kv_format import (
    FORMATS,
    GROUP,
    INT4_FITS,
    VALUE_GROUP,
    int4_fit,
    resolve_kv_format,
    writer_fits,
)
from minicpm.engine.cpu_kernels import (
    _DTYPES,
    KV_KINDS,
    kv_quantize,
    native_kernels,
    paged_attention,
    paged_prefill,
    prefill_available,
)
from minicpm.errors import UserError

QUANTIZED = ["int8", "int4"]


def plain_int4(x: torch.Tensor, group: int = GROUP) -> torch.Tensor:
    """x through int4 with each group's plain (min, (max - min) / 15) pair."""
    g = x.reshape(*x.shape[:-1], -1, group)
    lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    s, m = ((hi - lo) / 15).half().float(), lo.half().float()
    return (torch.clamp(torch.round((g - m) / torch.where(s == 0, 1, s)), 0, 15) * s + m).reshape(x.shape)


@pytest.mark.parametrize("value", [False, True], ids=["keys", "values"])
@pytest.mark.parametrize("name", QUANTIZED)
def test_round_trip_error_is_within_half_a_step_of_each_group(name, value) -> None:
    """int8: every value within half a step; int4: every group's squared error at most the plain
    min/max pair's (which rounds every value within half a step), 10% less over many groups (5% in 64s).
    Keys in groups of 32; int4's values in groups of 64 (32 where head_dim is not a multiple of 64)."""
    fmt = FORMATS[name]
    n = fmt.group(128, value)
    assert n == (VALUE_GROUP if value and name == "int4" else GROUP) and fmt.group(96, value) == GROUP
    x = torch.randn(7, 3, 128) * torch.linspace(0.1, 10, 128)  # channels of very different sizes
    x[0, 0, :n] = 0.0  # an all-zero group: scale 0, exact zeros back
    codes, scales = fmt.quantize(x, value=value)
    assert codes.dtype == fmt.dtype and codes.shape[-1] == fmt.code_width(128)
    assert scales.dtype == torch.float16 and scales.shape[-1] == fmt.scale_width(128, value) == 128 // n * fmt.scales
    back = fmt.dequantize(codes, scales, torch.float32, value)
    step = scales.float().reshape(7, 3, 128 // n, -1)[..., 0].repeat_interleave(n, -1)
    # half a step, and float16's rounding of the scale and minimum (relative 2^-11 of the group's size)
    slack = x.abs().reshape(7, 3, -1, n).amax(-1).repeat_interleave(n, -1) * 2e-3
    if name == "int8":
        assert ((back - x).abs() <= step / 2 + slack + 1e-6).all()
    else:
        ours = (back - x).square().reshape(7, 3, -1, n).sum(-1)
        theirs = (plain_int4(x, n) - x).square().reshape(7, 3, -1, n).sum(-1)
        assert (ours <= theirs * (1 + 1e-5)).all()
        many = torch.randn(2000, 64)
        plain = plain_int4(many, n)
        bound = 0.9 if n == GROUP else 0.95  # measured: 12% less in groups of 32, 9% in 64s
        assert (many - fmt.round_trip(many, value)).square().sum() < bound * (many - plain).square().sum()
        # no refits: the plain pair (what a CUDA cache writes, kv_format.writer_fits)
        plain_x = fmt.dequantize(*fmt.quantize(x, fits=0, value=value), torch.float32, value)
        assert torch.equal(plain_x, plain_int4(x, n))
        assert (writer_fits("cpu"), writer_fits("cuda:0")) == (INT4_FITS, 0)
        # the codes are packed in runs of 32 whatever the group: byte j holds values j and j + 16
        want = int4_fit(x.reshape(7, 3, -1, n))[2]
        runs = want.reshape(7, 3, -1, GROUP).to(torch.uint8)
        assert torch.equal(codes.reshape(7, 3, -1, GROUP // 2), runs[..., :16] | (runs[..., 16:] << 4))
    assert (back[0, 0, :n] == 0).all()
    again = fmt.dequantize(*fmt.quantize(back, value=value), torch.float32, value)
    assert torch.equal(fmt.round_trip(back, value), again)


def test_bytes_per_token_at_minicpm_2b_128k_shape() -> None:
    """40 layers x 36 kv heads x 64: bfloat16 360 KiB a token, int8 191.25 KiB, int4 106.875 KiB
    (keys 40 bytes a row, values 36)."""
    per = {n: FORMATS[n].bytes_per_token(40, 36, 64) for n in ("bfloat16", "int8", "int4")}
    assert per == {"bfloat16": 368640, "int8": 195840, "int4": 109440}
    assert (FORMATS["int4"].bytes_per_row(64), FORMATS["int4"].bytes_per_row(64, value=True)) == (40, 36)


def test_formats_are_resolved_or_refused_with_the_reason() -> None:
    assert resolve_kv_format("auto", torch.bfloat16, "cpu", 64).name == "bfloat16"
    assert resolve_kv_format("int4", torch.float32, "cpu", 64).name == "int4"
    with pytest.raises(UserError, match="a bfloat16 KV cache needs a bfloat16 model"):
        resolve_kv_format("bfloat16", torch.float32, "cpu", 64)
    with pytest.raises(UserError, match="fp8 runs on CUDA only"):
        resolve_kv_format("fp8", torch.bfloat16, "cpu", 64)
    with pytest.raises(UserError, match="multiple of 32"):
        resolve_kv_format("int8", torch.float32, "cpu", 48)
    with pytest.raises(UserError, match="kv_cache_dtype"):
        EngineConfig(kv_cache_dtype="int2")


def test_fp8_reference_round_trip() -> None:
    fmt = FORMATS["fp8"]
    x = torch.randn(4, 2, 64)
    back = fmt.round_trip(x)
    assert ((back - x).abs() <= x.abs() * 0.07 + 1e-3).all()  # e4m3: 3 mantissa bits


@needs_native
@pytest.mark.parametrize("value", [False, True], ids=["keys", "values"])
@pytest.mark.parametrize("name", QUANTIZED)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_c_quantizer_writes_the_reference_codes_bit_for_bit(name, dtype, value) -> None:
    lib, fmt = native_kernels(), FORMATS[name]
    rows, kv_heads, d = 9, 3, 64
    x = (torch.randn(rows, kv_heads, d) * torch.linspace(0.01, 30, d)).to(dtype)
    x[2, 1, :32] = 0
    slots = torch.tensor([5, 0, 3, 7, 1, 2, 8, 4, 6], dtype=torch.int64)
    codes = torch.zeros(rows, kv_heads, fmt.code_width(d), dtype=fmt.dtype)
    scales = torch.zeros(rows, kv_heads, fmt.scale_width(d, value), dtype=torch.float16)
    assert lib.minicpm_kv_quantize(
        _DTYPES[dtype], KV_KINDS[fmt.dtype], int(value), x.data_ptr(), kv_heads * d, rows, kv_heads, d,
        slots.data_ptr(), rows, codes.data_ptr(), scales.data_ptr(),
    ) == 0  # fmt: skip
    want_codes, want_scales = fmt.quantize(x, value=value)
    assert torch.equal(codes[slots], want_codes)
    assert torch.equal(scales[slots].view(torch.int16), want_scales.view(torch.int16))
    # many groups of several kinds (the int4 writer's refits and ties), through the Python wrapper
    gen = torch.Generator().manual_seed(1)
    many = torch.cat(
        (
            torch.randn(300, kv_heads, d, generator=gen),
            torch.randn(300, kv_heads, d, generator=gen) ** 3,  # heavy tails
            torch.randn(300, kv_heads, d, generator=gen) * 1e-3 + 50,  # a large offset
            torch.randint(-2, 3, (300, kv_heads, d), generator=gen).float(),  # few distinct values
        )
    ).to(dtype)
    order = torch.randperm(many.shape[0], generator=gen)
    codes = torch.zeros(many.shape[0], kv_heads, fmt.code_width(d), dtype=fmt.dtype)
    scales = torch.zeros(many.shape[0], kv_heads, fmt.scale_width(d, value), dtype=torch.float16)
    kv_quantize(many, codes, scales, order, value=value)
    want_codes, want_scales = fmt.quantize(many, value=value)
    assert torch.equal(codes[order], want_codes)
    assert torch.equal(scales[order].view(torch.int16), want_scales.view(torch.int16))
    with pytest.raises(ValueError, match="slot"):  # refused before anything is written
        kv_quantize(many[:2], codes, scales, torch.tensor([0, many.shape[0]]), value=value)
    assert torch.equal(codes[order], want_codes)
    if name == "int4":  # the scales' width says which groups they are: the other part's is refused
        with pytest.raises(ValueError, match="scales must be"):
            kv_quantize(many[:2], codes, scales, torch.tensor([0, 1]), value=not value)


def quantized_case(name, heads, kv_heads, d, bs, lens, dtype, seed=0):
    q, kc, vc, tables, row_seq, row_len = make_case(heads, kv_heads, d, bs, lens, dtype, seed)
    fmt = FORMATS[name]
    (kq, ks), (vq, vs) = fmt.quantize(kc), fmt.quantize(vc, value=True)
    # what a reference backend reads: dequantized to the activation dtype
    k, v = fmt.dequantize(kq, ks, dtype), fmt.dequantize(vq, vs, dtype, value=True)
    return q, (kq, vq, ks, vs), k, v, tables, row_seq, row_len


@needs_native
@pytest.mark.parametrize("name", QUANTIZED)
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 3e-6), (torch.bfloat16, 1.6e-2)])
@pytest.mark.parametrize(
    ("heads", "kv_heads", "d"),
    [(4, 4, 64), (9, 3, 64), (8, 2, 128), (4, 2, 32), (10, 2, 64), (36, 36, 64), (20, 5, 128)],
)
@pytest.mark.parametrize("bs", [16, 128])
def test_decode_kernel_reads_codes_in_place(name, dtype, tol, heads, kv_heads, d, bs) -> None:
    """Rows of lengths around block edges and across the AVX-512 path's partitions (and d=32: the
    portable path) give attention over the dequantized cache; MiniCPM's 36 heads (the VNNI path's
    value weights 16 heads a vector, the last vector partial) and a wide GQA shape included."""
    lens = [1, bs - 1, bs + 1, 3 * bs + 5, 700]
    q, (kq, vq, ks, vs), kd, vd, tables, row_seq, row_len = quantized_case(name, heads, kv_heads, d, bs, lens, dtype)
    got = paged_attention(q, kq, vq, tables, row_seq, row_len, bs, d**-0.5, None, ks, vs)
    want = reference(q, kd, vd, tables, row_seq, row_len, bs)
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), want, atol=tol, rtol=tol)


@needs_native
@pytest.mark.parametrize("name", QUANTIZED)
@pytest.mark.parametrize(
    ("heads", "kv_heads", "d"), [(4, 4, 64), (9, 3, 64), (8, 2, 128), (10, 2, 64), (36, 36, 64), (20, 5, 128)]
)
def test_bfloat16_decode_over_a_quantized_cache_keeps_every_row_to_bfloat16_rounding(name, heads, kv_heads, d) -> None:
    """Row by row, not just overall: each row's error stays within 2^-7 of its own largest output.
    Bfloat16 queries read int8 / int4 codes by integer dot products where the CPU has VNNI (the
    query as 15-bit integers, each window's probability-times-scale weights as 16-bit ones); a long
    row's small outputs are where coarser rounding (8-bit weights) showed, at 5-20% of the row."""
    lens = [1, 15, 17, 53, 700]
    q, (kq, vq, ks, vs), kd, vd, tables, row_seq, row_len = quantized_case(
        name, heads, kv_heads, d, 16, lens, torch.bfloat16
    )
    got = paged_attention(q, kq, vq, tables, row_seq, row_len, 16, d**-0.5, None, ks, vs).float()
    want = reference(q, kd, vd, tables, row_seq, row_len, 16)
    per_row = (got - want).abs().amax(dim=(-1, -2)) / want.abs().amax(dim=(-1, -2))
    assert per_row.max().item() <= 2**-7, per_row.tolist()


@needs_native
@pytest.mark.parametrize("name", QUANTIZED)
def test_decode_over_a_quantized_cache_across_the_long_rows_partitions(name) -> None:
    """Rows past 8k and 32k keys (larger partitions; MHA at head_dim 64: int4's paired keys and
    int8's 16-row sums) give attention over the dequantized cache, row by row."""
    lens = [8193, 32768, 33000, 5]
    q, (kq, vq, ks, vs), kd, vd, tables, row_seq, row_len = quantized_case(name, 4, 4, 64, 64, lens, torch.bfloat16)
    got = paged_attention(q, kq, vq, tables, row_seq, row_len, 64, 64**-0.5, None, ks, vs).float()
    want = reference(q, kd, vd, tables, row_seq, row_len, 64)
    per_row = (got - want).abs().amax(dim=(-1, -2)) / want.abs().amax(dim=(-1, -2))
    assert per_row.max().item() <= 2**-7, per_row.tolist()


@needs_native
def test_a_quantized_cache_without_its_scales_is_refused() -> None:
    q, (kq, vq, ks, vs), *_ = quantized_case("int8", 4, 4, 64, 16, [20], torch.float32)
    tables, row_seq, row_len = (
        torch.zeros(1, 4, dtype=torch.int32),
        torch.zeros(1, dtype=torch.int32),
        torch.ones(1, dtype=torch.int32),
    )
    with pytest.raises(ValueError, match="float16 scales"):
        paged_attention(q, kq, vq, tables, row_seq, row_len, 16, 0.125, None, None, None)
    with pytest.raises(ValueError, match="float16 scales"):
        paged_attention(q, kq, vq, tables, row_seq, row_len, 16, 0.125, None, ks.float(), vs)


@pytest.mark.parametrize("name", QUANTIZED)
@pytest.mark.parametrize("dtype", prefill_dtypes())
@pytest.mark.parametrize(("heads", "kv_heads", "d"), [(9, 3, 64), (4, 4, 128)])
@pytest.mark.parametrize(("past", "m"), [(0, 45), (70, 7), (13, 40)])
def test_prefill_kernel_dequantizes_as_the_reference_reads(name, dtype, heads, kv_heads, d, past, m) -> None:
    bs = 16
    q, (kq, vq, ks, vs), kd, vd, tables, _, _ = quantized_case(name, heads, kv_heads, d, bs, [past + m], dtype, seed=3)
    q = torch.randn(m, heads, d, generator=torch.Generator().manual_seed(1)).to(dtype)
    table = tables[0].contiguous()
    got = paged_prefill(q, kq, vq, table, past, bs, d**-0.5, native_kernels(), ks, vs)
    want = prefill_reference(q, kd, vd, table, past, bs)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.double(), want, atol=tol, rtol=tol)


def _engine(model, backend: str, kv: str, **fields) -> LLMEngine:
    fields = {"block_size": 8, "max_num_seqs": 3, "max_num_batched_tokens": 24, **fields}
    return LLMEngine(model, None, EngineConfig(attention_backend=backend, kv_cache_dtype=kv, **fields))


def _backends() -> list[str]:
    return ["cpu-torch"] + (["cpu-native"] if native_kernels() is not None else [])


@pytest.mark.parametrize("kv", QUANTIZED)
@pytest.mark.parametrize("kv_heads", [4, 2])
def test_every_cpu_backend_gives_the_reference_tokens_on_a_quantized_cache(kv, kv_heads) -> None:
    """float32 (bfloat16's kernels are checked against the reference above: a random model's near-ties
    would flip greedy tokens). Prompts chunked (a past read from the quantized cache) and batched,
    head_dim 64 (the native prefill and AVX-512 decode paths): cpu-torch and cpu-native, with and
    without the fused decoder, give the torch reference's greedy tokens over the same cache."""
    config = tiny_config(
        num_hidden_layers=2, hidden_size=256, num_attention_heads=4, num_key_value_heads=kv_heads, max_length=256
    )
    model = random_model(config, seed=11)
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 97, (n,), generator=gen).tolist() for n in (41, 90, 7)]
    params = SamplingParams(max_new_tokens=10, ignore_eos=True)
    expected = [c.token_ids for c in _engine(model, "torch", kv).generate(prompts, params)]
    runs = {b: _engine(model, b, kv) for b in _backends()}
    if native_kernels() is not None:
        runs["cpu-native unfused"] = _engine(model, "cpu-native", kv, fused_decode=False)
    for name, engine in runs.items():
        assert engine.runner.cache.format.name == kv
        got = [c.token_ids for c in engine.generate(prompts, params)]
        assert got == expected, name
    if native_kernels() is not None:
        assert runs["cpu-native"].runner.fused is not None  # the fused decoder ran on the quantized cache


@pytest.mark.parametrize("kv", QUANTIZED)
def test_cpu_torch_reads_a_long_quantized_past_a_piece_at_a_time(kv, monkeypatch) -> None:
    """cpu-torch dequantizes a quantized context QUANTIZED_PIECE tokens at a time (here 16: a
    90-token prompt's chunks and its decode rows read five or more pieces, merged one at a time)
    and gives the torch reference's greedy tokens over the same cache."""
    from minicpm.engine.attention import cpu as cpu_attention

    monkeypatch.setattr(cpu_attention, "QUANTIZED_PIECE", 16)
    config = tiny_config(
        num_hidden_layers=2, hidden_size=256, num_attention_heads=4, num_key_value_heads=2, max_length=256
    )
    model = random_model(config, seed=12)
    gen = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, 97, (n,), generator=gen).tolist() for n in (90, 41)]
    params = SamplingParams(max_new_tokens=8, ignore_eos=True)
    expected = [c.token_ids for c in _engine(model, "torch", kv).generate(prompts, params)]
    reads = []
    original = cpu_attention._read
    monkeypatch.setattr(cpu_attention, "_read", lambda *a: reads.append(a[2]) or original(*a))
    got = [c.token_ids for c in _engine(model, "cpu-torch", kv).generate(prompts, params)]
    assert got == expected
    assert reads and max(end - first for first, end in reads) <= 16


@pytest.mark.parametrize("kv", QUANTIZED)
def test_prefix_hits_preemption_and_choices_work_on_a_quantized_cache(kv) -> None:
    """The same prompts give the same tokens whether their shared prefix is a cache hit, whether a
    tight cache preempts and recomputes, and each of ``n`` choices is its own sequence's."""
    model = random_model(tiny_config(num_hidden_layers=2, max_length=512, hidden_size=128, num_attention_heads=4))
    gen = torch.Generator().manual_seed(5)
    shared = torch.randint(0, 97, (40,), generator=gen).tolist()
    prompts = [shared + torch.randint(0, 97, (n,), generator=gen).tolist() for n in (5, 9, 13)]
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    plain = [c.token_ids for c in _engine(model, "torch", kv, enable_prefix_caching=False).generate(prompts, params)]
    cached = _engine(model, "cpu-torch", kv)
    cached.generate(prompts[:1], params)
    got = [c.token_ids for c in cached.generate(prompts, params)]
    assert got == plain
    assert cached.stats()["cached_prompt_tokens"] >= 3 * 40 // 8 * 8  # every prompt's shared blocks were hits
    # a cache of 14 blocks of 8 tokens for three sequences of up to 65 tokens: someone is preempted
    tight = _engine(model, "cpu-torch", kv, kv_cache_memory=14 * 8 * cached.runner.kv_bytes_per_token)
    assert [c.token_ids for c in tight.generate(prompts, params)] == plain
    assert tight.stats()["preemptions"] > 0
    # n choices: one prompt as n sequences sharing its blocks, each sampled with its own seed
    choices = [SamplingParams(max_new_tokens=6, ignore_eos=True, temperature=1.0, seed=s) for s in (1, 2, 3)]
    shared_run = _engine(model, "cpu-torch", kv)
    a = [c.token_ids for c in shared_run.generate([prompts[0]] * 3, choices)]
    b = [
        c.token_ids
        for c in _engine(model, "torch", kv, enable_prefix_caching=False).generate([prompts[0]] * 3, choices)
    ]
    assert a == b and len({tuple(t) for t in a}) > 1
    assert shared_run.stats()["cached_prompt_tokens"] > 0


def test_the_kv_budget_counts_the_quantized_bytes() -> None:
    model = random_model(tiny_config(num_hidden_layers=2, hidden_size=128, num_attention_heads=4, max_length=4096))
    budget = 2**20
    blocks = {}
    for kv in ("auto", "int8", "int4"):
        runner = _engine(
            model, "cpu-torch", kv, kv_cache_memory=budget, max_num_seqs=64, max_num_batched_tokens=64
        ).runner
        blocks[kv] = runner.num_blocks
        assert runner.cache.nbytes <= budget + runner.bytes_per_block  # (plus the scratch block)
    assert blocks["auto"] < blocks["int8"] < blocks["int4"]
    assert blocks["int4"] >= 3 * blocks["auto"]  # float32 256 B a row against int4's 24 B: capped by max_num_seqs


def test_a_prompt_the_cache_cannot_hold_names_the_format_or_the_budget_that_would() -> None:
    model = random_model(tiny_config(num_hidden_layers=2, hidden_size=128, num_attention_heads=4, max_length=4096))
    per = FORMATS["float32"].bytes_per_token(2, 4, 32)
    engine = _engine(model, "cpu-torch", "auto", kv_cache_memory=40 * 8 * per)  # 320 tokens of float32
    assert "tokens in float32" in engine.capacity_line() and "320" in engine.capacity_line()
    with pytest.raises(UserError, match=r"'kv_cache_dtype' int8 holds \d+ tokens in the same memory"):
        engine.make_request([5] * 400)
    with pytest.raises(UserError, match=r"'kv_cache_dtype' int4 holds \d+ tokens in the same memory"):
        engine.make_request([5] * 1500)
    with pytest.raises(UserError, match=r"'kv_cache_memory' of at least .* \(or .* with 'kv_cache_dtype' int8"):
        engine.make_request([5] * 2500)


def test_the_default_cpu_budget_is_the_available_memory_less_reserve_and_room(monkeypatch) -> None:
    from minicpm.engine import model_runner

    monkeypatch.setattr(model_runner, "available_cpu_memory", lambda: (3 * 2**30, "a test"))
    monkeypatch.setattr(model_runner, "system_room", lambda: 2**30)
    model = random_model(tiny_config(num_hidden_layers=2, hidden_size=128, num_attention_heads=4, max_length=4096))
    runner = _engine(model, "cpu-torch", "int4", max_num_seqs=4096, max_num_batched_tokens=4096).runner
    assert 0 < 2 * 2**30 - runner.kv_budget < 2**29  # 3 GiB - 1 GiB of room - the activation reserve
    assert "available memory 3.00 GiB (a test)" in runner.kv_budget_source
    assert runner.num_blocks == runner.kv_budget // runner.bytes_per_block


def test_the_cpu_budget_reserves_what_its_prefill_path_reads_outside_the_cache(monkeypatch) -> None:
    """For a chunk with a past, cpu-torch dequantizes a quantized cache QUANTIZED_PIECE tokens of
    every kv head at a time and merges the pieces in a float32 running sum, and reads a float
    cache in place; the native prefill kernel packs one kv head's whole context at a time. Each
    engine's default budget reserves exactly what its own path reads."""
    from minicpm.engine import model_runner
    from minicpm.engine.attention.cpu import QUANTIZED_PIECE

    monkeypatch.setattr(model_runner, "available_cpu_memory", lambda: (3 * 2**30, "a test"))
    monkeypatch.setattr(model_runner, "system_room", lambda: 2**30)
    if not prefill_available(native_kernels(), torch.float32, 64):
        pytest.skip("no native prefill kernel for float32 here (AVX-512)")
    config = tiny_config(num_hidden_layers=2, hidden_size=256, num_attention_heads=4, max_length=65536)
    model = random_model(config)
    fields = {"max_num_seqs": 4, "max_num_batched_tokens": 512, "max_model_len": 65536}
    budget = {
        (backend, kv): _engine(model, backend, kv, **fields).runner.kv_budget
        for backend in ("cpu-torch", "cpu-native")
        for kv in ("int8", "auto")
    }
    per_token = 2 * 4 * 64 * 4  # one layer's keys and values of a token in float32, 4 kv heads of 64
    native = 65536 * per_token // 4  # one kv head's of the whole context
    merge = 512 * 4 * 64 * 4  # a 512-token chunk's float32 running sum, 4 heads of 64
    assert budget["cpu-native", "int8"] == budget["cpu-native", "auto"]  # the kernel packs either format alike
    assert budget["cpu-torch", "int8"] - budget["cpu-native", "int8"] == native - QUANTIZED_PIECE * per_token - merge
    assert budget["cpu-torch", "auto"] - budget["cpu-native", "auto"] == native - merge
