"""Triton paged decode attention vs. the PyTorch reference, run on CPU in Triton's interpreter.

TRITON_INTERPRET must be set before triton decorates the kernels (at import of
minicpm.engine.triton_attention), so it is set at the top of this module and left set
(triton asserts the flag stays consistent once it has been read).
"""

import os

os.environ["TRITON_INTERPRET"] = "1"

import dataclasses
import importlib

import pytest
import torch

pytest.importorskip("triton")

import triton.language as tl
from triton.runtime import interpreter as triton_interpreter

from minicpm.engine import triton_attention as ta

if not ta._kernels_interpreted():  # imported earlier without the flag: rebuild the kernels interpreted
    ta = importlib.reload(ta)

paged_decode_attention = ta.paged_decode_attention
paged_decode_attention_reference = ta.paged_decode_attention_reference

TOLS = {
    torch.float32: {"atol": 1e-5, "rtol": 1e-5},
    torch.float16: {"atol": 2e-3, "rtol": 2e-3},
    torch.bfloat16: {"atol": 2e-2, "rtol": 2e-2},
}


@pytest.fixture(autouse=True)
def _interpreter_bf16_dot(monkeypatch):
    """The interpreter stores bf16 as uint16 and its tl.dot multiplies the bit patterns
    (unsupported upstream, triton-lang/triton#11584). Upcast bf16 dot operands to fp32, which
    matches the GPU (exact bf16 products, fp32 accumulation). fp16 dots run unpatched."""
    original = triton_interpreter.InterpreterBuilder.create_dot

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if a.dtype.scalar == tl.bfloat16:
            a = self.cast_impl(a, tl.float32)
        if b.dtype.scalar == tl.bfloat16:
            b = self.cast_impl(b, tl.float32)
        return original(self, a, b, d, input_precision, max_num_imprecise_acc)

    monkeypatch.setattr(triton_interpreter.InterpreterBuilder, "create_dot", create_dot)


def make_case(context_lens, *, h, kv, d, block_size, max_blocks, dtype, pad=-1, seed=0):
    """Random q and cache; each sequence gets shuffled physical blocks. Every cache slot that
    no sequence may read (free blocks, slots past a context's end) is NaN, so any stray read
    poisons the output."""
    g = torch.Generator().manual_seed(seed)
    B, H, KV, D = len(context_lens), h, kv, d
    need = [-(-n // block_size) for n in context_lens]
    num_blocks = sum(need) + 3  # a few free (poisoned) blocks
    perm = torch.randperm(num_blocks, generator=g)
    k = torch.full((num_blocks, block_size, KV, D), float("nan"))
    v = torch.full((num_blocks, block_size, KV, D), float("nan"))
    block_tables = torch.full((B, max_blocks), pad, dtype=torch.int32)
    used = 0
    for b, n in enumerate(context_lens):
        ids = perm[used : used + need[b]]
        used += need[b]
        block_tables[b, : need[b]] = ids.int()
        flat_k = torch.randn(n, KV, D, generator=g)
        flat_v = torch.randn(n, KV, D, generator=g)
        for i, blk in enumerate(ids.tolist()):
            chunk = slice(i * block_size, min((i + 1) * block_size, n))
            k[blk, : chunk.stop - chunk.start] = flat_k[chunk]
            v[blk, : chunk.stop - chunk.start] = flat_v[chunk]
    q = torch.randn(B, H, D, generator=g)
    ctx = torch.tensor(context_lens, dtype=torch.int32)
    return q.to(dtype), k.to(dtype), v.to(dtype), block_tables, ctx


def check(case, scale, partition_size, dtype):
    q, k, v, bt, ctx = case
    out = paged_decode_attention(q, k, v, bt, ctx, scale, partition_size=partition_size)
    ref = paged_decode_attention_reference(q, k, v, bt, ctx, scale)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert torch.isfinite(out.float()).all()
    torch.testing.assert_close(out.float(), ref.float(), **TOLS[dtype])
    for b in range(len(ctx)):
        if ctx[b] == 0:
            assert torch.equal(out[b].float(), torch.zeros_like(out[b].float()))
    return out


def test_runs_in_interpreter_on_cpu():
    assert ta.TRITON_AVAILABLE
    assert type(ta._paged_decode_partial_kernel).__name__ == "InterpretedFunction"
    assert type(ta._paged_decode_reduce_kernel).__name__ == "InterpretedFunction"


# block_size 16, max 6 blocks (96 tokens), partition 32 -> 3 partitions. Lengths: 1, bs-1, bs,
# 0 (padded CUDA-graph row), several blocks inside one partition boundary, spanning all partitions.
MIXED = [1, 15, 16, 0, 50, 90]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize(("h", "kv"), [(4, 2), (2, 2)], ids=["gqa", "mha"])
def test_mixed_lengths_match_reference(h, kv, dtype):
    case = make_case(MIXED, h=h, kv=kv, d=32, block_size=16, max_blocks=6, dtype=dtype)
    check(case, scale=32**-0.5, partition_size=32, dtype=dtype)


@pytest.mark.parametrize(
    ("block_size", "partition_size", "lens", "max_blocks"),
    [
        (32, 16, [33, 5, 64], 2),  # partition smaller than a block, context == capacity
        (16, 512, [47, 0, 3], 4),  # single partition (default partition_size)
        (16, 16, [80, 17], 5),  # one partition per block, 5 partitions
    ],
)
def test_partitioning_variants(block_size, partition_size, lens, max_blocks):
    case = make_case(lens, h=2, kv=1, d=32, block_size=block_size, max_blocks=max_blocks, dtype=torch.float32)
    check(case, scale=0.3, partition_size=partition_size, dtype=torch.float32)


def test_head_dim_64_group_4_zero_padding():
    # pad=0: padding entries point at a real (other sequence's / poisoned) block and must be ignored.
    case = make_case([70, 1, 0], h=8, kv=2, d=64, block_size=16, max_blocks=5, dtype=torch.float32, pad=0)
    check(case, scale=0.125, partition_size=32, dtype=torch.float32)


def test_non_contiguous_q_and_context_clamped_to_capacity():
    q, k, v, bt, ctx = make_case([40, 9], h=4, kv=2, d=32, block_size=16, max_blocks=3, dtype=torch.float32)
    q_strided = torch.cat([q, torch.full_like(q, float("nan"))], dim=-1)[..., :32]  # e.g. a slice of qkv
    assert not q_strided.is_contiguous()
    check((q_strided, k, v, bt, ctx), scale=0.2, partition_size=16, dtype=torch.float32)
    # context_lens beyond max_blocks * block_size is clamped to the table's capacity (row 0: 40 -> 32).
    out = paged_decode_attention(q, k, v, bt[:, :2].contiguous(), ctx, 0.2, partition_size=16)
    ref = paged_decode_attention_reference(q, k, v, bt[:, :2].contiguous(), ctx, 0.2)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_all_rows_empty_gives_zeros():
    q, k, v, bt, ctx = make_case([0, 0], h=2, kv=2, d=32, block_size=16, max_blocks=2, dtype=torch.bfloat16)
    out = paged_decode_attention(q, k, v, bt, ctx, 1.0, partition_size=16)
    assert torch.equal(out, torch.zeros_like(out))


def _args(**over):
    args = {
        "q": torch.zeros(2, 4, 32),
        "k_cache": torch.zeros(3, 16, 2, 32),
        "v_cache": torch.zeros(3, 16, 2, 32),
        "block_tables": torch.zeros(2, 2, dtype=torch.int32),
        "context_lens": torch.ones(2, dtype=torch.int32),
        "scale": 1.0,
    }
    args.update(over)
    return args


@pytest.mark.parametrize(
    ("over", "match"),
    [
        ({"q": torch.zeros(2, 4, 32, dtype=torch.bfloat16)}, "dtype mismatch"),
        ({"q": torch.zeros(2, 3, 32)}, "multiple of num kv heads"),
        ({"q": torch.zeros(2, 4, 16)}, "head dim mismatch"),
        ({"q": torch.zeros(2, 4)}, "q must be"),
        ({"v_cache": torch.zeros(3, 16, 2, 16)}, "v_cache shape"),
        ({"block_tables": torch.zeros(2, 2, dtype=torch.int64)}, "int32"),
        ({"block_tables": torch.zeros(3, 2, dtype=torch.int32)}, "block_tables must be"),
        ({"context_lens": torch.ones(2, dtype=torch.int64)}, "int32"),
        ({"context_lens": torch.ones(3, dtype=torch.int32)}, "context_lens must be"),
        ({"partition_size": 48}, "partition_size"),
        (
            {"q": torch.zeros(2, 4, 48), "k_cache": torch.zeros(3, 16, 2, 48), "v_cache": torch.zeros(3, 16, 2, 48)},
            "power of two",
        ),
        ({"q": torch.zeros(2, 4, 32, dtype=torch.int32)}, "dtype must be"),
    ],
)
def test_validation_errors(over, match):
    with pytest.raises(ValueError, match=match):
        paged_decode_attention(**_args(**over))


# ---------------------------------------------------------------------------- varlen paged prefill

paged_prefill_attention = ta.paged_prefill_attention
paged_prefill_attention_reference = ta.paged_prefill_attention_reference


def prefill_case(contexts, query_lens, *, h, kv, d, block_size, dtype, seed=0):
    """A step of several sequences: sequence s has contexts[s] tokens cached (its chunk's last
    query_lens[s] included), in shuffled blocks; unused slots are NaN (a stray read poisons)."""
    case = make_case(
        contexts,
        h=h,
        kv=kv,
        d=d,
        block_size=block_size,
        dtype=dtype,
        seed=seed,
        pad=0,
        max_blocks=max(-(-n // block_size) for n in contexts),
    )
    _, k, v, tables, ctx = case
    g = torch.Generator().manual_seed(seed + 1)
    q = torch.randn(sum(query_lens), h, d, generator=g).to(dtype)
    cu = torch.tensor([0, *torch.tensor(query_lens).cumsum(0).tolist()], dtype=torch.int32)
    return q, k, v, tables, cu, ctx


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(("h", "kv"), [(4, 2), (2, 2)], ids=["gqa", "mha"])
def test_prefill_chunks_and_decode_rows_match_reference(h, kv, dtype):
    """A first chunk (no past), a chunk whose past ends inside a block, a decode row, a chunk
    spanning two query tiles, each over shuffled blocks."""
    contexts, query_lens = [20, 45, 33, 70], [20, 13, 1, 40]
    q, k, v, tables, cu, ctx = prefill_case(contexts, query_lens, h=h, kv=kv, d=32, block_size=16, dtype=dtype)
    out = paged_prefill_attention(q, k, v, tables, cu, ctx, 32**-0.5, max(query_lens), block_m=16, block_n=16)
    ref = paged_prefill_attention_reference(q, k, v, tables, cu, ctx, 32**-0.5)
    assert out.shape == q.shape and out.dtype == dtype and torch.isfinite(out.float()).all()
    torch.testing.assert_close(out.float(), ref.float(), **TOLS[dtype])


def test_prefill_reference_is_causal_attention_over_the_sequence() -> None:
    """The reference itself, against plain causal attention over a contiguous sequence."""
    from minicpm.model import causal_attention

    q, k, v, tables, cu, ctx = prefill_case([37], [12], h=4, kv=2, d=16, block_size=8, dtype=torch.float32)
    blocks = tables[0, : -(-37 // 8)].long()
    keys = k[blocks].reshape(-1, 2, 16)[:37].transpose(0, 1)[None]
    values = v[blocks].reshape(-1, 2, 16)[:37].transpose(0, 1)[None]
    expected = causal_attention(q.transpose(0, 1)[None], keys, values, past=25)[0].transpose(0, 1)
    got = paged_prefill_attention_reference(q, k, v, tables, cu, ctx, 16**-0.5)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_prefill_validation_names_the_problem():
    q, k, v, tables, cu, ctx = prefill_case([20], [4], h=4, kv=2, d=16, block_size=8, dtype=torch.float32)
    with pytest.raises(ValueError, match="cu_q must be"):
        paged_prefill_attention(q, k, v, tables, cu[:1], ctx, 0.25, 4)
    with pytest.raises(ValueError, match="context_lens must be int32"):
        paged_prefill_attention(q, k, v, tables, cu, ctx.long(), 0.25, 4)
    with pytest.raises(ValueError, match="dtypes must match"):
        paged_prefill_attention(q.double(), k, v, tables, cu, ctx, 0.25, 4)


def triton_engine_case(dtype, seed, **settings):
    """A tiny engine whose cache takes the Triton path (in the interpreter), three prompts that make
    mixed steps (decode rows beside chunks with a cached past), and the plain CPU engine's answers."""
    import sys

    sys.path.insert(0, os.path.dirname(__file__))
    from helpers import random_model, tiny_config

    from minicpm import SamplingParams
    from minicpm.engine import EngineConfig, LLMEngine

    model = random_model(tiny_config(num_hidden_layers=2, num_key_value_heads=2, max_length=256), seed=seed)
    model = model.to(dtype)
    gen = torch.Generator().manual_seed(seed - 1)
    prompts = [torch.randint(0, 97, (n,), generator=gen).tolist() for n in (30, 21, 9)]
    params = SamplingParams(max_new_tokens=6, ignore_eos=True)
    config = EngineConfig(block_size=8, max_num_seqs=3, max_num_batched_tokens=16, kv_cache_memory=1 << 20)
    expected = LLMEngine(model, None, config).generate(prompts, params)
    engine = LLMEngine(model, None, dataclasses.replace(config, attention_backend="triton", **settings))
    assert engine.runner.fused is None  # the GPU's path, which has no fused CPU decoder
    return engine, prompts, params, expected


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_engine_steps_on_the_triton_kernels_give_the_cpu_paths_tokens(dtype, monkeypatch):
    """An engine whose cache takes the Triton path (the GPU's; here in the interpreter): mixed
    steps of decode rows and chunks with a cached past go to the decode and varlen prefill
    kernels, and the greedy tokens are the CPU paths'."""
    engine, prompts, params, expected = triton_engine_case(dtype, seed=4)
    backend = engine.runner.cache.backend
    calls = {"decode": 0, "prefill": 0}
    for name in calls:
        real = getattr(backend, f"{name}_kernel")

        def counted(*args, _real=real, _name=name, **kwargs):
            calls[_name] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(backend, f"{name}_kernel", counted)
    monkeypatch.setattr(torch.Tensor, "index_select", lambda *a, **k: pytest.fail("a gather"))
    got = engine.generate(prompts, params)
    assert calls["decode"] and calls["prefill"]
    if dtype == torch.float32:
        assert [c.token_ids for c in got] == [c.token_ids for c in expected]
    else:  # bfloat16: near ties of a random tiny model can flip later; the prompts' answers start alike
        assert [c.token_ids[0] for c in got] == [c.token_ids[0] for c in expected]


@pytest.mark.parametrize("max_splits", [1, 4, 16])
def test_decode_splits_walk_256_partitions_and_follow_real_lengths(max_splits):
    """A 4096-token row is 256 partitions of 16 tokens walked by at most ``max_splits`` programs
    each; beside it, short rows in the same wide table (their programs stop at their lengths)."""
    lens = [4096, 3, 17, 0, 40]
    case = make_case(lens, h=4, kv=2, d=16, block_size=16, max_blocks=256, dtype=torch.float32)
    q, k, v, bt, ctx = case
    out = paged_decode_attention(q, k, v, bt, ctx, 0.25, partition_size=16, max_splits=max_splits)
    ref = paged_decode_attention_reference(q, k, v, bt, ctx, 0.25)
    torch.testing.assert_close(out.float(), ref.float(), **TOLS[torch.float32])
    assert torch.equal(out[3], torch.zeros_like(out[3]))
    with pytest.raises(ValueError, match="max_splits"):
        paged_decode_attention(q, k, v, bt, ctx, 0.25, partition_size=16, max_splits=0)


def flaky_prefill(engine, fail_on: int) -> dict:
    """The engine's varlen prefill kernel, raising on its ``fail_on``-th call; the count of calls."""
    backend = engine.runner.cache.backend
    calls = {"n": 0}
    real = backend.prefill_kernel

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == fail_on:
            raise RuntimeError("an illegal memory access was encountered")
        return real(*args, **kwargs)

    backend.prefill_kernel = flaky
    return calls


def test_a_triton_kernel_failing_mid_serving_falls_back_to_the_torch_path_when_configured(caplog):
    """``on_kernel_failure="fallback"``: the varlen kernel raises on its third call; that step and
    the later ones go through the torch backend (a warning, counted in stats, Triton left for good)
    and the greedy tokens are the plain engine's."""
    engine, prompts, params, expected = triton_engine_case(torch.float32, seed=6, on_kernel_failure="fallback")
    calls = flaky_prefill(engine, 3)
    assert engine.stats()["attention_backend"] == "triton" and engine.stats()["kernel_failures"] == 0
    got = engine.generate(prompts, params)
    assert [c.token_ids for c in got] == [c.token_ids for c in expected]
    assert calls["n"] == 3 and engine.stats()["attention_backend"] == "torch"
    assert engine.stats()["kernel_failures"] == 1
    assert "the triton attention backend failed (RuntimeError: an illegal memory access" in caplog.text


def test_a_triton_kernel_failing_mid_serving_raises_when_configured():
    """``on_kernel_failure="raise"`` (what the tests run with): the failure reaches the caller."""
    engine, prompts, params, _ = triton_engine_case(torch.float32, seed=6, on_kernel_failure="raise")
    flaky_prefill(engine, 3)
    with pytest.raises(RuntimeError, match="illegal memory access"):
        engine.generate(prompts, params)
    assert engine.stats()["attention_backend"] == "triton" and engine.stats()["kernel_failures"] == 0
