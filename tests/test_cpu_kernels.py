"""The native CPU paged-attention kernel: against a plain reference (dtypes, GQA and MHA, head
sizes, shuffled blocks, lengths around block edges), its refusals, its fallback, and the engine on
it: same greedy tokens as the torch path, one kernel call per layer, and a decode row's logits
bitwise the same whether or not a neighbour is prefilling in the same step."""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import random_model, tiny_config

from minicpm import SamplingParams
from minicpm.engine import EngineConfig, LLMEngine, cpu_kernels
from minicpm.engine.cpu_kernels import native_kernels, paged_attention

needs_native = pytest.mark.skipif(native_kernels() is None, reason="no C compiler: the native kernel cannot be built")


def reference(q, kc, vc, tables, row_seq, row_len, bs):
    """Per row: gather the sequence's first keys through its table, float32 softmax attention."""
    rows, heads = q.shape[:2]
    groups = heads // kc.shape[1]
    out = []
    for r in range(rows):
        table, n = tables[row_seq[r]].tolist(), int(row_len[r])
        slots = torch.tensor([table[p // bs] * bs + p % bs for p in range(n)])
        k = kc[slots].float().transpose(0, 1).repeat_interleave(groups, 0)
        v = vc[slots].float().transpose(0, 1).repeat_interleave(groups, 0)
        out.append(F.scaled_dot_product_attention(q[r].float()[:, None], k, v)[:, 0])
    return torch.stack(out)


def make_case(heads, kv_heads, d, bs, lens, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    width = max(-(-n // bs) for n in lens)
    num_blocks = max(64, len(lens) * width)
    kc = torch.randn(num_blocks * bs, kv_heads, d, generator=gen).to(dtype)
    vc = torch.randn(num_blocks * bs, kv_heads, d, generator=gen).to(dtype)
    order = torch.randperm(num_blocks, generator=gen).to(torch.int32)  # scattered blocks
    tables = order[: len(lens) * width].view(len(lens), width).contiguous()
    q = torch.randn(len(lens), heads, d, generator=gen).to(dtype)
    row_seq = torch.arange(len(lens), dtype=torch.int32)
    row_len = torch.tensor(lens, dtype=torch.int32)
    return q, kc, vc, tables, row_seq, row_len


@needs_native
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 2e-6), (torch.bfloat16, 1.6e-2)])
@pytest.mark.parametrize(("heads", "kv_heads"), [(4, 4), (9, 3), (8, 1)])
@pytest.mark.parametrize("d", [64, 128, 48])
def test_kernel_matches_the_reference(dtype, tol, heads, kv_heads, d) -> None:
    bs = 16
    lens = [1, bs - 1, bs, bs + 1, 5 * bs + 3, 2]
    q, kc, vc, tables, row_seq, row_len = make_case(heads, kv_heads, d, bs, lens, dtype, seed=heads + d)
    got = paged_attention(q, kc, vc, tables, row_seq, row_len, bs, d**-0.5)
    assert got.dtype == dtype and got.shape == q.shape
    expected = reference(q, kc, vc, tables, row_seq, row_len, bs)
    assert (got.float() - expected).abs().max().item() <= tol * max(1.0, expected.abs().max().item())


def on_one_thread(fn):
    """fn() with torch (and the kernels' OpenMP) on one thread, the thread count restored after"""
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        return fn()
    finally:
        torch.set_num_threads(threads)


@needs_native
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 2e-6), (torch.bfloat16, 1.6e-2)])
@pytest.mark.parametrize(
    ("heads", "kv_heads", "d", "bs"),
    [(36, 36, 64, 64), (20, 4, 128, 16), (9, 3, 64, 8), (16, 2, 64, 512)],
)
def test_long_rows_match_the_reference_across_partitions(dtype, tol, heads, kv_heads, d, bs) -> None:
    """Rows longer than a partition (256 keys; a block where blocks are larger), lengths off every
    edge, heads that are and aren't a multiple of 16, blocks smaller than a window (16 keys)."""
    lens = [1, 255, 256, 257, 700, 1100, 33]
    q, kc, vc, tables, row_seq, row_len = make_case(heads, kv_heads, d, bs, lens, dtype, seed=heads + d + bs)
    got = paged_attention(q, kc, vc, tables, row_seq, row_len, bs, d**-0.5)
    expected = reference(q, kc, vc, tables, row_seq, row_len, bs)
    assert (got.float() - expected).abs().max().item() <= tol * max(1.0, expected.abs().max().item())
    # a row's result is its own: the same bits alone, and with one thread
    alone = paged_attention(q[4:5], kc, vc, tables, row_seq[4:5], row_len[4:5], bs, d**-0.5)
    assert torch.equal(alone, got[4:5])
    assert torch.equal(on_one_thread(lambda: paged_attention(q, kc, vc, tables, row_seq, row_len, bs, d**-0.5)), got)


@needs_native
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 2e-6), (torch.bfloat16, 1.6e-2)])
def test_partitions_grow_with_a_long_row_and_stay_its_own(dtype, tol) -> None:
    """Partitions of 512 keys from 8k and 1024 from 32k: lengths off both edges match the
    reference, and a row's bits are the same alone, beside others and on one thread."""
    bs, d = 64, 64
    lens = [8191, 8192, 8193, 32767, 32768, 33000, 300]
    q, kc, vc, tables, row_seq, row_len = make_case(4, 4, d, bs, lens, dtype, seed=7)
    got = paged_attention(q, kc, vc, tables, row_seq, row_len, bs, d**-0.5)
    expected = reference(q, kc, vc, tables, row_seq, row_len, bs)
    assert (got.float() - expected).abs().max().item() <= tol * max(1.0, expected.abs().max().item())
    for r in (2, 5):
        alone = paged_attention(q[r : r + 1], kc, vc, tables, row_seq[r : r + 1], row_len[r : r + 1], bs, d**-0.5)
        assert torch.equal(alone, got[r : r + 1])
    assert torch.equal(on_one_thread(lambda: paged_attention(q, kc, vc, tables, row_seq, row_len, bs, d**-0.5)), got)


@needs_native
def test_rows_of_one_sequence_see_their_own_prefixes_and_threads_do_not_change_bits() -> None:
    """Chunk-like rows (one sequence, lengths 5..12) and a long row over many blocks; the result is
    the same bits with one thread or two (what a row computes never depends on the threads)."""
    bs, heads, kv_heads, d = 4, 6, 2, 64
    q, kc, vc, tables, _, _ = make_case(heads, kv_heads, d, bs, [60, 12], torch.float32, seed=3)
    row_seq = torch.tensor([1] * 8 + [0], dtype=torch.int32)
    row_len = torch.tensor([*range(5, 13), 60], dtype=torch.int32)
    q = torch.randn(9, heads, d)
    expected = reference(q, kc, vc, tables, row_seq, row_len, bs)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            results.append(paged_attention(q, kc, vc, tables, row_seq, row_len, bs, d**-0.5))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(results[0], results[1])
    assert (results[0] - expected).abs().max().item() < 2e-6


@needs_native
def test_query_rows_may_be_strided_views() -> None:
    """The engine passes q as a view of the fused q/k projection: rows (heads + kv_heads) * d apart."""
    bs, heads, kv_heads, d = 8, 4, 2, 64
    _, kc, vc, tables, row_seq, row_len = make_case(heads, kv_heads, d, bs, [9, 30], torch.float32)
    wide = torch.randn(2, heads + kv_heads, d)
    view = wide[:, :heads]
    got = paged_attention(view, kc, vc, tables, row_seq, row_len, bs, 0.125)
    assert torch.equal(got, paged_attention(view.contiguous(), kc, vc, tables, row_seq, row_len, bs, 0.125))


@needs_native
def test_bad_arguments_raise_naming_the_problem() -> None:
    bs, heads, kv_heads, d = 8, 4, 2, 16
    q, kc, vc, tables, row_seq, row_len = make_case(heads, kv_heads, d, bs, [9, 30], torch.float32)

    def call(**changes):
        args = dict(q=q, k_cache=kc, v_cache=vc, block_tables=tables, row_seq=row_seq, row_len=row_len)
        args.update(changes)
        return paged_attention(**args, block_size=bs, scale=0.25)

    with pytest.raises(ValueError, match="row_len entry"):
        call(row_len=torch.tensor([9, 33], dtype=torch.int32))  # beyond 4 blocks of 8
    with pytest.raises(ValueError, match="row_len entry"):
        call(row_len=torch.tensor([0, 3], dtype=torch.int32))
    with pytest.raises(ValueError, match="block id outside the cache"):
        bad = tables.clone()
        bad[1, 0] = 64
        call(block_tables=bad)
    with pytest.raises(ValueError, match="row_seq entry"):
        call(row_seq=torch.tensor([0, 2], dtype=torch.int32))
    with pytest.raises(ValueError, match="int32"):
        call(row_len=row_len.long())
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        call(q=q.double())
    with pytest.raises(ValueError, match="in q's dtype"):
        call(k_cache=kc.bfloat16())
    with pytest.raises(ValueError, match="multiple of kv_heads"):
        call(q=torch.randn(2, 3, d), k_cache=kc, v_cache=vc)


def thp_eligible(address: int) -> bool:
    """Whether the mapping holding ``address`` may get transparent huge pages (/proc/self/smaps)."""
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split(" ", 1)[0]
            if "-" in head and ":" not in head:
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo <= address < hi
            elif inside and line.startswith("THPeligible:"):
                return line.split()[1] == "1"
    return False


def thp_mode() -> str:
    try:
        text = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return "none"
    return text[text.index("[") + 1 : text.index("]")]


@pytest.mark.skipif(thp_mode() != "madvise", reason="transparent huge pages are not in madvise mode here")
def test_a_large_cpu_cache_asks_for_huge_pages_and_a_small_one_does_not(monkeypatch) -> None:
    """Decode attention streams scattered blocks: a cache of at least 64 MiB a layer is advised onto
    transparent huge pages (fewer TLB misses); a small one is never advised, so it stays on 4 KiB
    pages, where touching one block of each layer commits 4 KiB, not 2 MiB.

    The small cache is checked by what the engine asks for, not by the kernel's flag: a small tensor
    comes from the heap, whose mapping may already carry the flag from whatever shared it before
    (seen once in CI, order-dependent), which says nothing about this cache."""
    from minicpm.engine.attention import HUGE_PAGE_LAYER_BYTES, PagedKVCache
    from minicpm.engine.attention import cache as attention

    # 64 MiB: above glibc's largest mmap threshold (32 MiB), so the probe is a mapping of its own and
    # goes with it when freed
    t = torch.empty(64 * 2**20, dtype=torch.uint8)
    middle = t.data_ptr() + 32 * 2**20
    assert not thp_eligible(middle)
    assert cpu_kernels.advise_huge_pages(t) and thp_eligible(middle)
    del t
    assert not cpu_kernels.advise_huge_pages(torch.empty(1000))  # no whole 2 MiB page inside
    advised: list[int] = []

    def advise(t: torch.Tensor) -> bool:
        advised.append(t.data_ptr())
        return cpu_kernels.advise_huge_pages(t)

    monkeypatch.setattr(attention, "advise_huge_pages", advise)
    config = tiny_config(num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2, hidden_size=32)
    per_block = 64 * 2 * 16 * 4  # block_size x kv_heads x head_dim x float32
    large = PagedKVCache(config, HUGE_PAGE_LAYER_BYTES // per_block, 64, torch.float32, "cpu")
    assert large.k[0].nbytes >= HUGE_PAGE_LAYER_BYTES
    assert advised == [large.k.data_ptr(), large.v.data_ptr()]
    for t in (large.k, large.v):
        assert thp_eligible(t.data_ptr() + t.nbytes // 2)
    small = PagedKVCache(config, 64, 64, torch.float32, "cpu")
    assert small.k[0].nbytes < HUGE_PAGE_LAYER_BYTES
    assert advised == [large.k.data_ptr(), large.v.data_ptr()]  # nothing asked for the small one


def test_switched_off_or_unbuildable_means_none_and_a_warning(monkeypatch, tmp_path, caplog) -> None:
    monkeypatch.setenv("MINICPM_CACHE", str(tmp_path))
    native_kernels.cache_clear()
    try:
        monkeypatch.setenv("MINICPM_CPU_KERNELS", "off")
        assert native_kernels() is None
        native_kernels.cache_clear()
        monkeypatch.setenv("MINICPM_CPU_KERNELS", "on")
        monkeypatch.setattr(cpu_kernels, "_compiler", lambda: None)
        assert native_kernels() is None
        assert "no C compiler" in caplog.text
        assert not list(tmp_path.glob("kernels/*.so"))  # nothing half-written left behind
    finally:
        native_kernels.cache_clear()


def generate_with_calls(engine: LLMEngine, prompts, params, monkeypatch):
    calls = []
    real = cpu_kernels.paged_attention

    def counted(q, *args, **kwargs):
        calls.append(q.shape[0])
        return real(q, *args, **kwargs)

    monkeypatch.setattr("minicpm.engine.attention.cpu.paged_attention", counted)
    return engine.generate(prompts, params), calls


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_engine_on_the_native_kernel_gives_the_torch_path_tokens(dtype, monkeypatch, one_thread) -> None:
    """Mixed steps (decodes beside prefill chunks), scattered blocks, preemption: the same greedy
    tokens with the kernel as without, and decode rows reach the kernel once per layer per step."""
    config = tiny_config(num_hidden_layers=2, num_key_value_heads=2, max_length=256)
    model = random_model(config, seed=11).to(dtype)
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 97, (n,), generator=gen).tolist() for n in (40, 90, 7, 23, 61)]
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    engine_config = EngineConfig(block_size=8, max_num_seqs=4, max_num_batched_tokens=24, kv_cache_memory=2**20)
    plain = LLMEngine(model, None, dataclasses.replace(engine_config, attention_backend="cpu-torch"))
    expected = plain.generate(prompts, params)
    # decode rows through the model's layers (the fused decoder: test_fused_decode)
    engine = LLMEngine(
        model, None, dataclasses.replace(engine_config, attention_backend="cpu-native", fused_decode=False)
    )
    got, calls = generate_with_calls(engine, prompts, params, monkeypatch)
    assert [c.token_ids for c in got] == [c.token_ids for c in expected]
    assert calls and len(calls) % config.num_hidden_layers == 0
    assert max(calls) > 1  # several decode rows shared a call


@needs_native
def test_a_decode_rows_logits_do_not_depend_on_a_neighbours_prefill(one_thread) -> None:
    model = random_model(tiny_config(num_hidden_layers=2, max_length=256), seed=5)
    gen = torch.Generator().manual_seed(2)
    first, second = (torch.randint(0, 97, (n,), generator=gen).tolist() for n in (30, 50))
    logits = []
    for neighbour in (False, True):
        engine = LLMEngine(model, None, EngineConfig(block_size=8, max_num_batched_tokens=64))
        engine.add_request(first, SamplingParams(max_new_tokens=8, ignore_eos=True))
        for _ in range(3):  # the prompt, then two decode steps
            engine.step()
        if neighbour:
            engine.add_request(second, SamplingParams(max_new_tokens=2, ignore_eos=True))
        seen = []

        def keep(rows, seqs, seen=seen, sample=engine.runner.sampler.sample):
            seen.append(rows.clone())
            return sample(rows, seqs)

        engine.runner.sampler.sample = keep
        engine.step()
        assert len(seen[0]) == 1 + neighbour  # with a neighbour: its whole prompt ran in this step
        logits.append(seen[0][0])
    assert torch.equal(logits[0], logits[1])


# ---------------------------------------------------------------------------- native prefill


def _prefill_available(dtype: torch.dtype) -> bool:
    from minicpm.engine.cpu_kernels import prefill_available

    return prefill_available(native_kernels(), dtype, 64)


def prefill_dtypes() -> list:
    """float32 (AVX-512) and bfloat16 (AVX512-BF16), each skipped where this CPU lacks it."""
    why = "this CPU lacks the instructions the native prefill kernel needs for this dtype"
    return [
        pytest.param(
            dtype, marks=pytest.mark.skipif(native_kernels() is None or not _prefill_available(dtype), reason=why)
        )
        for dtype in (torch.float32, torch.bfloat16)
    ]


def prefill_reference(q, kc, vc, table, past, bs):
    """Row t of the chunk over keys 0..past+t, gathered through ``table``: float64 softmax attention."""
    m, heads, d = q.shape
    groups = heads // kc.shape[1]
    ctx = past + m
    slots = torch.tensor([int(table[p // bs]) * bs + p % bs for p in range(ctx)])
    k = kc[slots].double().transpose(0, 1).repeat_interleave(groups, 0)  # (heads, ctx, d)
    v = vc[slots].double().transpose(0, 1).repeat_interleave(groups, 0)
    scores = torch.einsum("mhd,hkd->hmk", q.double(), k) * d**-0.5
    hidden = torch.arange(ctx)[None] > (torch.arange(m) + past)[:, None]
    return torch.einsum("hmk,hkd->mhd", scores.masked_fill(hidden, float("-inf")).softmax(-1), v)


@pytest.mark.parametrize("dtype", prefill_dtypes())
@pytest.mark.parametrize(("heads", "kv_heads", "d"), [(9, 3, 64), (4, 4, 128), (8, 1, 64), (2, 2, 192)])
@pytest.mark.parametrize(("past", "m"), [(0, 1), (0, 45), (13, 40), (70, 7), (3, 100)])
def test_prefill_kernel_matches_the_reference(dtype, heads, kv_heads, d, past, m) -> None:
    """A chunk at any offset (a block's middle, tiles of 12 rows and their tails, GQA and MHA) over
    scattered blocks: as close to float64 attention as torch's own attention in that dtype."""
    from minicpm.engine.cpu_kernels import paged_prefill

    bs = 16
    gen = torch.Generator().manual_seed(past * 7 + m + d)
    num_blocks = 16
    kc = torch.randn(num_blocks * bs, kv_heads, d, generator=gen).to(dtype)
    vc = torch.randn(num_blocks * bs, kv_heads, d, generator=gen).to(dtype)
    table = torch.randperm(num_blocks, generator=gen).to(torch.int32)[: -(-(past + m) // bs)].contiguous()
    q = (2 * torch.randn(m, heads, d, generator=gen)).to(dtype)
    got = paged_prefill(q, kc, vc, table, past, bs, d**-0.5)
    assert got.dtype == dtype and got.shape == q.shape
    expected = prefill_reference(q, kc, vc, table, past, bs)
    ctx = past + m
    slots = torch.tensor([int(table[p // bs]) * bs + p % bs for p in range(ctx)])
    mask = torch.arange(ctx)[None] <= (torch.arange(m) + past)[:, None]
    torch_own = F.scaled_dot_product_attention(
        q.transpose(0, 1),
        kc[slots].transpose(0, 1).repeat_interleave(heads // kv_heads, 0),
        vc[slots].transpose(0, 1).repeat_interleave(heads // kv_heads, 0),
        attn_mask=mask,
    ).transpose(0, 1)
    ours, theirs = ((t.double() - expected).abs().max().item() for t in (got, torch_own))
    # bfloat16: an output's last bit; float32: another order of float32 sums than torch's, or 2e-6 of
    # the outputs' scale (about 16 ulp: torch's own error varies 3x between cases and CPUs, ours less)
    scale = expected.abs().max().item()
    bound = max(1.5 * theirs, 8e-3) if dtype == torch.bfloat16 else max(2 * theirs, 2e-6 * max(1.0, scale))
    assert ours <= bound, (ours, theirs, scale)


@pytest.mark.parametrize("dtype", prefill_dtypes())
def test_prefill_kernel_refuses_what_it_cannot_serve(dtype) -> None:
    from minicpm.engine.cpu_kernels import paged_prefill

    bs, d = 8, 64
    kc = torch.zeros(4 * bs, 2, d, dtype=dtype)
    q = torch.zeros(5, 4, d, dtype=dtype)
    table = torch.tensor([2, 0], dtype=torch.int32)
    assert paged_prefill(q, kc, kc, table, 3, bs, 0.125).shape == q.shape
    with pytest.raises(ValueError, match="beyond the table"):
        paged_prefill(q, kc, kc, table, 12, bs, 0.125)  # 17 keys over 2 blocks of 8
    with pytest.raises(ValueError, match="block id outside the cache"):
        paged_prefill(q, kc, kc, torch.tensor([4, 0], dtype=torch.int32), 3, bs, 0.125)
    with pytest.raises(ValueError, match=r"not available for torch\.float64"):
        paged_prefill(q.double(), kc.double(), kc.double(), table, 3, bs, 0.125)
    with pytest.raises(ValueError, match="head_dim 48"):
        paged_prefill(q[..., :48], kc[..., :48], kc[..., :48], table, 3, bs, 0.125)
    with pytest.raises(ValueError, match="int32"):
        paged_prefill(q, kc, kc, table.long(), 3, bs, 0.125)
    with pytest.raises(ValueError, match="in q's dtype"):
        other = torch.bfloat16 if dtype == torch.float32 else torch.float32
        paged_prefill(q, kc.to(other), kc.to(other), table, 3, bs, 0.125)


@pytest.mark.parametrize("dtype", prefill_dtypes())
@pytest.mark.parametrize("fused", [True, False])
def test_engine_prefill_on_the_kernel_is_as_close_to_float32_as_the_torch_path(dtype, fused, one_thread) -> None:
    """A model (head_dim 64) prefilling chunks beside other sequences' decode rows (in the fused
    decoder, or in the same forward), over scattered blocks: each sequence's first sampled logits
    are within the torch path's own error of the float32 model's, and the same greedy tokens follow
    as on the torch path."""
    config = tiny_config(hidden_size=256, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2)
    model = random_model(config, seed=3)
    gen = torch.Generator().manual_seed(4)
    prompts = [torch.randint(0, 97, (n,), generator=gen).tolist() for n in (5, 50, 9, 40, 27)]
    with torch.no_grad():
        truth = [model(torch.tensor([p]))[0, -1].float() for p in prompts]
    model = model.to(dtype)
    params = SamplingParams(max_new_tokens=6, ignore_eos=True)
    firsts, tokens = [], []
    for backend in ("cpu-native", "cpu-torch"):  # the kernel's prefill, then the torch path's
        native = backend == "cpu-native"
        settings = EngineConfig(
            block_size=8,
            max_num_seqs=4,
            max_num_batched_tokens=32,
            attention_backend=backend,
            fused_decode=fused and native,
        )
        engine = LLMEngine(model, None, settings)
        assert (engine.runner.cache.backend.prefill is not None) if native else engine.runner.fused is None
        first: dict[tuple[int, ...], torch.Tensor] = {}

        def keep(rows, seqs, first=first, sample=engine.runner.sampler.sample):
            for row, seq in zip(rows, seqs, strict=True):
                first.setdefault(tuple(seq.prompt_ids), row.float().clone())
            return sample(rows, seqs)

        engine.runner.sampler.sample = keep
        tokens.append([c.token_ids for c in engine.generate(prompts, params)])
        firsts.append([first[tuple(p)] for p in prompts])
    floor = 0.01 if dtype == torch.bfloat16 else 1e-4
    for ours, theirs, want in zip(*firsts, truth, strict=True):
        ours, theirs = (ours - want).abs().max().item(), (theirs - want).abs().max().item()
        assert ours <= max(1.5 * theirs, floor), (ours, theirs)
    if dtype == torch.float32:
        assert tokens[0] == tokens[1]
    else:  # bfloat16 decode rows on another path (cpu-torch's): near ties of a random tiny model can flip later
        assert [t[0] for t in tokens[0]] == [t[0] for t in tokens[1]]


# ---------------------------------------------------------------------------- panel linear


@needs_native
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-5), (torch.bfloat16, 8e-3)])
@pytest.mark.parametrize(("n", "k"), [(64, 48), (97, 33), (1, 5), (320, 200)])
def test_panel_linear_matches_a_float64_product(dtype, tol, n: int, k: int) -> None:
    """Any width (a last panel padded), any depth, 1 to 40 rows (tiles of 12 and their tails)."""
    from minicpm.engine.cpu_kernels import pack_panels, panel_linear

    gen = torch.Generator().manual_seed(n + k)
    weight = torch.randn(n, k, generator=gen).to(dtype)
    packed = pack_panels(weight)
    assert packed.shape == (-(-n // 32), k, 32)
    for m in (1, 5, 12, 13, 40):
        x = torch.randn(m, k, generator=gen).to(dtype)
        expected = x.double() @ weight.double().T
        scale = x.double().abs() @ weight.double().abs().T  # the size of the terms summed
        for prefill in (False, True):  # bfloat16 prefill: on the dot-product instruction where the CPU has it
            got = panel_linear(x, packed, n, native_kernels(), prefill=prefill)
            assert got.dtype == dtype and got.shape == (m, n)
            assert ((got.double() - expected).abs() <= tol * scale + 1e-6).all()


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_panel_linear_rows_do_not_depend_on_their_neighbours(dtype) -> None:
    """Each output is one in-order sum: a row alone, in any batch, at any position, with one
    thread or two, gives the same bits (what the engine's determinism in float32 rests on)."""
    from minicpm.engine.cpu_kernels import pack_panels, panel_linear

    lib = native_kernels()
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(200, 96, generator=gen).to(dtype)
    packed = pack_panels(weight)
    batch = torch.randn(37, 96, generator=gen).to(dtype)
    whole = panel_linear(batch, packed, 200, lib)
    threads = torch.get_num_threads()
    try:
        for t in (1, 2, 3):  # threads share the panels out and take each other's last ones
            torch.set_num_threads(t)
            for i in (0, 11, 12, 36):
                assert torch.equal(panel_linear(batch[i : i + 1], packed, 200, lib)[0], whole[i])
            assert torch.equal(panel_linear(batch[5:30], packed, 200, lib), whole[5:30])
            # prefill rows (many): bfloat16 ones take the dot-product instruction, rows still apart
            tall = panel_linear(batch, packed, 200, lib, prefill=True)
            assert torch.equal(panel_linear(batch[5:30], packed, 200, lib, prefill=True), tall[5:30])
    finally:
        torch.set_num_threads(threads)


@needs_native
def test_panel_linear_takes_views_and_batched_shapes_and_refuses_a_wrong_width() -> None:
    from minicpm.engine.cpu_kernels import pack_panels, panel_linear

    lib = native_kernels()
    weight = torch.randn(40, 24)
    packed = pack_panels(weight)
    x = torch.randn(2, 3, 30)[..., 3:27]  # (2, 3, 24) with a row stride of 30
    assert torch.allclose(panel_linear(x, packed, 40, lib), x @ weight.T, atol=1e-5)
    with pytest.raises(ValueError, match="24 features"):
        panel_linear(torch.randn(3, 25), packed, 40, lib)
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        pack_panels(weight.double())


def test_linear_choice_follows_the_override(monkeypatch) -> None:
    from minicpm.engine import layers

    monkeypatch.setenv("MINICPM_CPU_LINEAR", "blas")
    assert layers.linear_candidates(torch.float32) == ["blas"]
    monkeypatch.setenv("MINICPM_CPU_LINEAR", "onednn")
    assert all(c.startswith("onednn") for c in layers.linear_candidates(torch.float32))
    monkeypatch.setenv("MINICPM_CPU_LINEAR", "fastest")
    with pytest.raises(ValueError, match="MINICPM_CPU_LINEAR"):
        layers.linear_candidates(torch.float32)
    with pytest.raises(ValueError, match="unknown linear choice"):
        layers.make_linear(torch.nn.Linear(4, 4, bias=False), "mkl")


@needs_native
@pytest.mark.parametrize("choice", ["panel", "onednn-16", "blas"])
def test_every_linear_choice_gives_the_plain_models_greedy_tokens(choice, monkeypatch, one_thread) -> None:
    from minicpm.engine import layers

    model = random_model(tiny_config(num_hidden_layers=2, max_length=256), seed=9)
    gen = torch.Generator().manual_seed(4)
    prompts = [torch.randint(0, 97, (n,), generator=gen).tolist() for n in (20, 35)]
    params = SamplingParams(max_new_tokens=10, ignore_eos=True)
    expected = []
    with torch.no_grad():
        for prompt in prompts:
            ids = list(prompt)
            for _ in range(10):
                ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
            expected.append(ids[len(prompt) :])
    monkeypatch.setattr(layers, "cpu_linear", lambda m: choice)
    engine = LLMEngine(model, None, EngineConfig(block_size=8, max_num_batched_tokens=32))
    inner = {type(m.inner).__name__ for m in engine.runner.model.modules() if isinstance(m, layers.RowSplitLinear)}
    assert inner == {"PanelLinear" if choice == "panel" else "PackedLinear" if choice != "blas" else "Linear"}
    assert [c.token_ids for c in engine.generate(prompts, params)] == expected


@needs_native
def test_on_the_panels_a_decode_rows_logits_do_not_depend_on_the_batch(monkeypatch) -> None:
    """float32 on the native panels: the same request's logits, step by step, decoding alone or
    beside two others (rows of other lengths before and after it), are the same bits."""
    from minicpm.engine import layers

    monkeypatch.setattr(layers, "cpu_linear", lambda m: "panel")
    model = random_model(tiny_config(num_hidden_layers=2, num_key_value_heads=2, max_length=256), seed=6)
    gen = torch.Generator().manual_seed(8)
    others = [torch.randint(0, 97, (n,), generator=gen).tolist() for n in (17, 44)]
    mine = torch.randint(0, 97, (29,), generator=gen).tolist()
    runs = []
    for batch in ([mine], [others[0], mine, others[1]]):
        engine = LLMEngine(model, None, EngineConfig(block_size=8, max_num_batched_tokens=128))
        seen: list[torch.Tensor] = []

        def keep(rows, seqs, seen=seen, sample=engine.runner.sampler.sample):
            seen.extend(rows[i].clone() for i, s in enumerate(seqs) if s.token_ids[: len(mine)] == mine)
            return sample(rows, seqs)

        engine.runner.sampler.sample = keep
        engine.generate(batch, SamplingParams(max_new_tokens=6, ignore_eos=True))
        runs.append(seen)
    assert len(runs[0]) == len(runs[1]) == 6
    assert all(torch.equal(a, b) for a, b in zip(*runs, strict=True))


class _StepCounter:
    """Counts, inside one engine step, attention kernel calls (torch's SDPA family through a
    dispatch mode, the native kernel through its Python entry) and every new tensor at least
    ``limit`` elements large (a gathered context would be one)."""

    def __init__(self, limit: int, monkeypatch) -> None:
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_leaves

        self.limit, self.native, self.fused, self.torch_attention, self.big = limit, 0, 0, 0, []
        counter = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                name = str(func)
                if "scaled_dot_product" in name or "flash_attention" in name:
                    counter.torch_attention += 1
                owned = {
                    t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)
                }
                for t in tree_leaves(out):  # new memory (not a view of an input) the size of a context
                    big = isinstance(t, torch.Tensor) and t.numel() >= counter.limit
                    if big and t.untyped_storage().data_ptr() not in owned:
                        counter.big.append(f"{name} {tuple(t.shape)}")
                return out

        self.mode = Mode
        real = cpu_kernels.paged_attention

        def counted(*args, **kwargs):
            counter.native += 1
            return real(*args, **kwargs)

        monkeypatch.setattr("minicpm.engine.attention.cpu.paged_attention", counted)
        from minicpm.engine.fused_decode import FusedDecoder

        fused = FusedDecoder.hidden_states

        def counted_fused(*args, **kwargs):
            counter.fused += 1
            return fused(*args, **kwargs)

        monkeypatch.setattr(FusedDecoder, "hidden_states", counted_fused)

    def calls(self) -> tuple[int, int]:
        """(native attention calls per step for the decode rows, fused decoder calls)"""
        return self.native, self.fused

    def step(self, engine) -> None:
        self.native = self.fused = self.torch_attention = 0
        self.big = []
        with self.mode():
            engine.step()


@needs_native
@pytest.mark.parametrize("fused", [True, False])
def test_no_step_gathers_a_context_and_decode_rows_take_one_kernel_call_per_layer(fused, monkeypatch) -> None:
    """Decode-only, mixed (a chunk beside the decodes) and scattered batch-1 steps: the decode rows
    take one fused decoder call (or, without it, one native attention call per layer), torch
    attention runs only for a chunk, and no tensor the size of one layer's context is ever
    allocated."""
    layers, ctx = 2, 400
    config = tiny_config(num_hidden_layers=layers, num_key_value_heads=2, max_position_embeddings=1024, max_length=1024)
    model = random_model(config, seed=2)
    settings = EngineConfig(block_size=8, max_num_batched_tokens=32, kv_cache_memory=1 << 22, fused_decode=fused)
    engine = LLMEngine(model, None, settings)
    assert engine.runner.attention_backend == "cpu-native" and (engine.runner.fused is not None) == fused
    decode_calls = (0, 1) if fused else (layers, 0)
    engine.block_manager.enable_prefix_caching = False
    gen = torch.Generator().manual_seed(0)
    params = SamplingParams(max_new_tokens=200, ignore_eos=True)
    for _ in range(3):
        engine.add_request(torch.randint(0, 97, (ctx,), generator=gen).tolist(), params)
    while any(s.num_uncomputed > 1 for s in engine.scheduler.running) or engine.scheduler.waiting:
        engine.step()
    limit = ctx * config.num_key_value_heads * config.head_dim  # one layer's keys of one context
    count = _StepCounter(limit, monkeypatch)

    count.step(engine)  # decode only: three rows
    assert (count.calls(), count.torch_attention, count.big) == (decode_calls, 0, [])

    engine.add_request(torch.randint(0, 97, (60,), generator=gen).tolist(), params)
    count.step(engine)  # three decode rows + a first chunk of 29 tokens
    assert count.calls() == decode_calls and 0 < count.torch_attention <= layers and count.big == []
    count.step(engine)  # three decode rows + the chunk's second part, over its cached past
    assert count.calls() == decode_calls and count.torch_attention > 0 and count.big == []

    seq = engine.scheduler.running[0]
    for other in engine.scheduler.running[1:]:
        engine.abort_request(other.request_id)
    keep = len(seq.block_table) - 1
    seq.block_table[:keep] = seq.block_table[:keep][::-1]  # scattered: same blocks, reversed
    count.step(engine)
    assert (count.calls(), count.torch_attention, count.big) == (decode_calls, 0, [])


# ------------------------------------------------------------------------ quantized weights


def _has_bf16_dot() -> bool:
    """Whether the library runs bfloat16 rows on the dot-product tiles (built with AVX512-BF16, the
    same condition as the bfloat16 prefill attention kernel)."""
    from minicpm.engine.cpu_kernels import prefill_available

    return prefill_available(native_kernels(), torch.bfloat16, 64)


def _quantized_product(layer, x: torch.Tensor, prefill: bool = False) -> torch.Tensor:
    from minicpm.engine.cpu_kernels import panel_linear, quantized_panels

    packed, scales, mins = quantized_panels(layer)
    return panel_linear(x, packed, layer.out_features, native_kernels(), scales, mins, prefill)


def _assert_int4_records(layer, n: int, k: int, group: int) -> None:
    """int4 panels are one record per (panel, group), built here plainly: the codes in chunks of 4
    inputs x 32 columns, word 2c + e holding (j + e, c), (j + e, c + 16), (j + 2 + e, c) and
    (j + 2 + e, c + 16) from its low nibble up; then the 32 scales and the 32 minimums, float16
    (quantize makes them float16 values); and the codes read back for any column."""
    from minicpm.engine.cpu_kernels import int4_panel_rows, quantized_panels

    packed, scales, mins = quantized_panels(layer)
    panels = -(-n // 32)
    codes = torch.zeros(panels * 32, k, dtype=torch.uint8)
    codes[:n] = layer.codes()
    by_panel = codes.view(panels, 32, k // 4, 4).permute(0, 2, 3, 1)  # (panel, chunk, t, column)
    bytes_ = by_panel[..., :16] | (by_panel[..., 16:] << 4)  # (panel, chunk, t, c): (j + t, c) and (j + t, c + 16)
    words = bytes_.view(panels, k // 4, 2, 2, 16).permute(0, 1, 4, 3, 2)  # (panel, chunk, c, e, byte): t = e + 2 byte
    assert scales.dtype == mins.dtype == torch.float16 and packed.shape == (panels, k // group, group * 16 + 128)
    assert torch.equal(packed[..., : group * 16], words.reshape(panels, k // group, group * 16))
    padded = torch.ones(panels * 32, k // group)
    padded[:n] = layer.scales
    assert torch.equal(scales.float(), padded.view(panels, 32, -1).transpose(1, 2))
    padded = torch.zeros(panels * 32, k // group)
    padded[:n] = layer.mins
    assert torch.equal(mins.float(), padded.view(panels, 32, -1).transpose(1, 2))
    rows = torch.arange(n)
    codes, row_scales, row_mins = int4_panel_rows(packed, scales, mins, rows // 32, rows % 32)
    assert torch.equal(codes, layer.codes()) and torch.equal(row_scales, layer.scales)
    assert torch.equal(row_mins, layer.mins)


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int4_rows_are_the_same_bits_on_any_number_of_threads(dtype) -> None:
    """Decode rows over many int4 panels (the threads' shares, then each other's last panels):
    one, two or three threads give the same bits, a row alone as in a batch."""
    from minicpm.engine.cpu_kernels import panel_linear, quantized_panels
    from minicpm.quant import quantize

    gen = torch.Generator().manual_seed(2)
    packed, scales, mins = quantized_panels(quantize(torch.randn(1270, 64, generator=gen), "int4", 32))
    x = torch.randn(6, 64, generator=gen).to(dtype)
    lib = native_kernels()
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        want = panel_linear(x, packed, 1270, lib, scales, mins)
        for t in (2, 3):
            torch.set_num_threads(t)
            assert torch.equal(panel_linear(x, packed, 1270, lib, scales, mins), want)
            assert torch.equal(panel_linear(x[4:5], packed, 1270, lib, scales, mins)[0], want[4])
    finally:
        torch.set_num_threads(threads)


@needs_native
@pytest.mark.parametrize("kind", ["float16", "float32", "q4_0"])
def test_int4_records_of_every_kind_give_the_dequantized_product(kind: str) -> None:
    """int4 records keep float16 scales and minimums where every one is a float16 value
    (quantize's), float32 ones where not (e.g. Q4_K's products), and no minimums where each is -8 x
    its float16 scale (Q4_0): every kind multiplies as the dequantized weight, float32 and bfloat16
    rows, decode and prefill, and its rows read back for the tied embedding."""
    from minicpm.engine.cpu_kernels import int4_panel_rows, panel_format, quantized_panels
    from minicpm.quant import QuantizedLinear, dequantize_rows, quantize

    n, k, group = 70, 128, 32
    gen = torch.Generator().manual_seed(5)
    layer = quantize(torch.randn(n, k, generator=gen), "int4", group)
    if kind == "float32":  # one scale that float16 cannot hold
        scales = layer.scales.clone()
        scales[7, 1] *= 1 + 2**-20
        layer = QuantizedLinear(layer.qweight, scales, layer.mins, k)
    elif kind == "q4_0":
        layer = QuantizedLinear(layer.qweight, layer.scales, -8 * layer.scales, k)
    packed, scales, mins = quantized_panels(layer)
    assert panel_format(packed, scales, mins) == ({"float16": 5, "float32": 3, "q4_0": 6}[kind], group)
    assert (mins is None) == (kind == "q4_0")
    assert scales.dtype == (torch.float32 if kind == "float32" else torch.float16)
    deq = layer.dequantize()
    for m in (1, 5, 13):
        x = torch.randn(m, k, generator=gen)
        expected = x.double() @ deq.double().T
        mag = x.abs().double() @ deq.abs().double().T
        for prefill in (False, True):
            got = _quantized_product(layer, x, prefill)
            assert ((got.double() - expected).abs() <= 1e-5 * mag + 1e-5).all()
            xb = x.bfloat16()
            # bfloat16 prompt rows of more than one 12-row tile take the bfloat16 dot product over
            # the dequantized weights rounded to bfloat16 (pairs_panel); the others the exact ones
            rounded = prefill and m > 12 and _has_bf16_dot()
            weight = deq.bfloat16() if rounded else deq
            expected_b = xb.double() @ weight.double().T
            got = _quantized_product(layer, xb, prefill).double()
            assert ((got - expected_b).abs() <= 2**-8 * expected_b.abs() + 1e-5 * mag + 1e-6).all()
            if rounded:  # so within 2^-9 of each weight of the exact product (and the output's rounding)
                exact = xb.double() @ deq.double().T
                assert ((got - exact).abs() <= 2**-8 * exact.abs() + 2**-9 * mag).all()
    rows = torch.tensor([0, 17, 31, 32, 69])
    codes, row_scales, row_mins = int4_panel_rows(packed, scales, mins, rows // 32, rows % 32)
    assert torch.equal(dequantize_rows(codes, row_scales, row_mins, group), deq[rows])


@needs_native
@pytest.mark.parametrize(
    ("fmt", "group", "n", "k"),
    [
        ("int8", None, 64, 48),
        ("int8", None, 97, 33),
        ("int8", None, 320, 200),
        ("int8", 16, 70, 64),
        ("int8", 32, 40, 96),
        ("int8", 128, 33, 256),
        ("int4", 32, 200, 96),
        ("int4", 64, 97, 128),
        ("int4", 128, 64, 256),
    ],
)
def test_quantized_panels_equal_the_dequantized_product(fmt: str, group, n: int, k: int) -> None:
    """Every format and group size: the kernel's product is the float product with the dequantized
    weight (to float32 rounding), each weight within half a step of the original, rows independent."""
    from minicpm.engine.cpu_kernels import pack_panels, panel_linear
    from minicpm.quant import quantize

    gen = torch.Generator().manual_seed(n + k)
    weight = torch.randn(n, k, generator=gen)
    weight[3] = 0  # an all-zero row: scale 1, codes exact
    weight[5] = 0.25  # a constant row: int4 min 0.25, every code 0
    layer = quantize(weight, fmt, group)
    g = group or (k if fmt == "int8" else 32)
    assert layer.group == g and layer.scales.shape == (n, k // g)
    if fmt == "int4":
        _assert_int4_records(layer, n, k, g)
    deq = layer.dequantize()
    assert torch.equal(deq[3], weight[3]) and (fmt == "int8" or torch.equal(deq[5], weight[5].half().float()))
    step = layer.scales.repeat_interleave(g, 1)
    assert ((deq - weight).abs() <= step / 2 + 1e-6).all()
    for m in (1, 7, 13, 40):  # row tiles (12, or 6 for grouped) and their tails
        x = torch.randn(m, k, generator=gen)
        got = _quantized_product(layer, x)
        expected = x.double() @ deq.double().T
        assert ((got.double() - expected).abs() <= 1e-5 * (x.abs().double() @ deq.abs().double().T) + 1e-5).all()
        assert torch.equal(_quantized_product(layer, x[-1:])[0], got[-1])  # rows independent
        # prefill rows: the panels widened to their dequantized weights first (from two row tiles)
        wide = _quantized_product(layer, x, prefill=True)
        assert ((wide.double() - expected).abs() <= 1e-5 * (x.abs().double() @ deq.abs().double().T) + 1e-5).all()
        if m > 12:  # bit for bit the float32 panels' product with the dequantized weight
            assert torch.equal(wide, panel_linear(x, pack_panels(deq), n, native_kernels()))
        xb = x.bfloat16()  # int4: on the dot product where the CPU has it; the result rounded once to bfloat16
        expected = xb.double() @ deq.double().T
        bound = 2**-8 * expected.abs() + 1e-5 * (xb.abs().double() @ deq.abs().double().T) + 1e-6
        assert ((_quantized_product(layer, xb).double() - expected).abs() <= bound).all()
        assert torch.equal(_quantized_product(layer, xb[-1:])[0], _quantized_product(layer, xb)[-1])
        # bfloat16 prompt rows of more than one 12-row tile: the bfloat16 dot product over the
        # weights as bfloat16 pairs, int8 per-column codes exactly (scaled after), grouped
        # formats' dequantized weights rounded to bfloat16 (without the instruction: exact)
        rounded = m > 12 and group is not None and _has_bf16_dot()
        expected = xb.double() @ (deq.bfloat16() if rounded else deq).double().T
        bound = 2**-8 * expected.abs() + 1e-5 * (xb.abs().double() @ deq.abs().double().T) + 1e-6
        assert ((_quantized_product(layer, xb, prefill=True).double() - expected).abs() <= bound).all()


@needs_native
@pytest.mark.parametrize("kind", ["Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q6_K"])
def test_gguf_blocks_load_as_the_gguf_package_dequantizes_them(kind: str) -> None:
    """GGUF blocks map onto a format with no float copy: the dequantized weight equals the gguf
    package's bit for bit, and the kernel's product matches it."""
    import gguf
    import numpy as np

    from minicpm.quant import from_gguf

    n, k = 48, 512
    rng = np.random.default_rng(len(kind))
    qtype = gguf.GGMLQuantizationType[kind]
    if kind in ("Q4_K", "Q6_K"):  # the gguf package does not quantize these: random blocks, sane scales
        size = {"Q4_K": 144, "Q6_K": 210}[kind]
        data = rng.integers(0, 256, (n * k // 256, size), dtype=np.uint8)
        for at in (0, 2) if kind == "Q4_K" else (208,):
            data[:, at : at + 2] = rng.uniform(1e-3, 0.1, (len(data), 1)).astype(np.float16).view(np.uint8)
        data = data.reshape(n, -1)
    else:
        data = gguf.quants.quantize(rng.standard_normal((n, k)).astype(np.float32), qtype)
    expected = torch.from_numpy(gguf.quants.dequantize(data, qtype).astype(np.float32))
    layer = from_gguf(data, kind, (n, k))
    assert (layer.fmt, layer.group) == (
        ("int8", 16) if kind == "Q6_K" else ("int8", 32) if kind == "Q8_0" else ("int4", 32)
    )
    assert torch.equal(layer.dequantize(), expected)
    x = torch.randn(5, k, generator=torch.Generator().manual_seed(1))
    got = _quantized_product(layer, x).double()
    ref = x.double() @ expected.double().T
    assert ((got - ref).abs() <= 1e-5 * (x.abs().double() @ expected.abs().double().T) + 1e-5).all()


@needs_native
@pytest.mark.parametrize("kind", ["Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q6_K"])
def test_native_gguf_decoding_is_numpys_bit_for_bit(kind: str, monkeypatch) -> None:
    """The C decoder (csrc/linear.c) gives numpy's codes, scales and minimums bit for bit on random
    blocks whose float16 fields take every value: subnormals, infinities and NaNs included."""
    import numpy as np

    from minicpm import quant

    per_block, size, _, _ = quant.GGUF_BLOCKS[kind]
    count = 65536  # one block per float16 bit pattern
    data = np.random.default_rng(7).integers(0, 256, (count, size), dtype=np.uint8)
    patterns = np.arange(count, dtype=np.uint16).view(np.uint8).reshape(count, 2)
    for at in {"Q8_0": (0,), "Q4_0": (0,), "Q4_1": (0, 2), "Q4_K": (0, 2), "Q6_K": (208,)}[kind]:
        data[:, at : at + 2] = patterns if at != 2 else patterns[::-1]
    n = 64
    shape = (n, count * per_block // n)
    native = quant.from_gguf(data.reshape(n, -1), kind, shape)
    monkeypatch.setattr(quant, "_native", lambda: None)
    with np.errstate(invalid="ignore"):  # inf x 0 scales
        reference = quant.from_gguf(data.reshape(n, -1), kind, shape)
    assert torch.equal(native.qweight, reference.qweight)
    assert torch.equal(native.scales.view(torch.int32), reference.scales.view(torch.int32))
    assert (native.mins is None) == (reference.mins is None)
    if native.mins is not None:
        assert torch.equal(native.mins.view(torch.int32), reference.mins.view(torch.int32))


def test_unmappable_gguf_type_and_bad_settings_are_named() -> None:
    import numpy as np

    from minicpm.quant import UnmappableQuantizationError, from_gguf, quantize

    with pytest.raises(UnmappableQuantizationError, match="GGUF type Q5_1 has no quantized format"):
        from_gguf(np.zeros((4, 24), np.uint8), "Q5_1", (4, 32))
    with pytest.raises(ValueError, match="int4 group size must be one of 32, 64, 128, got 48"):
        quantize(torch.randn(4, 96), "int4", 48)
    with pytest.raises(ValueError, match="multiple of it"):
        quantize(torch.randn(4, 80), "int4", 64)
    with pytest.raises(ValueError, match="quantize must be one of auto, none, int8, int4, got 'int2'"):
        quantize(torch.randn(4, 64), "int2")
    with pytest.raises(ValueError, match="'quantize' must be 'auto' or 'none' or 'int8' or 'int4'"):
        EngineConfig(quantize="int2")
    with pytest.raises(ValueError, match=r"group_size.*int4 group size must be one of"):
        EngineConfig(quantize="int4", group_size=16)


@needs_native
@pytest.mark.parametrize(("quantize", "group"), [("int8", None), ("int4", 32), ("int4", 128), ("int8", 32)])
def test_quantized_engine_gives_the_greedy_tokens_of_its_dequantized_weights(quantize, group, one_thread) -> None:
    """quantize="int8" / "int4" (any group size): every linear layer (the head too) becomes
    quantized panels; the engine's greedy tokens are those of the plain model with each weight
    replaced by its dequantized copy."""
    from minicpm.engine.layers import PanelLinear, RowSplitLinear
    from minicpm.quant import quantize as quantize_weight

    config = tiny_config(
        num_hidden_layers=2, num_key_value_heads=2, max_length=256, hidden_size=128, intermediate_size=256
    )
    model = random_model(config, seed=12)
    reference = random_model(config, seed=12)
    with torch.no_grad():
        for module in reference.modules():
            if isinstance(module, torch.nn.Linear):  # int4 keeps the head at 8 bits (per channel)
                fmt, g = ("int8", None) if module is reference.lm_head and quantize == "int4" else (quantize, group)
                module.weight.copy_(quantize_weight(module.weight, fmt, g).dequantize())
    gen = torch.Generator().manual_seed(7)
    prompts = [torch.randint(0, 97, (n,), generator=gen).tolist() for n in (25, 40)]
    expected = []
    with torch.no_grad():
        for prompt in prompts:
            ids = list(prompt)
            for _ in range(8):
                ids.append(int(reference(torch.tensor([ids]))[0, -1].argmax()))
            expected.append(ids[len(prompt) :])
    settings = EngineConfig(block_size=8, max_num_batched_tokens=32, quantize=quantize, group_size=group)
    engine = LLMEngine(model, None, settings)
    wrapped = [m.inner for m in engine.runner.model.modules() if isinstance(m, RowSplitLinear)]
    head = engine.runner.model.lm_head.inner
    assert head.weights == "int8" and (quantize == "int8" or head.group == config.hidden_size)
    assert wrapped and all(isinstance(m, PanelLinear) and m.weights == quantize for m in wrapped if m is not head)
    got = engine.generate(prompts, SamplingParams(max_new_tokens=8, ignore_eos=True))
    assert [c.token_ids for c in got] == expected


@needs_native
def test_a_bfloat16_int4_engine_is_as_close_to_its_float32_weights_as_torch_bfloat16(one_thread) -> None:
    """quantize="int4" in bfloat16: the int4 panels' dot-product tiles (the prompt's rows, then the
    fused decoder's decode rows) give every sampled row's logits within the error of torch's own
    bfloat16 forward, both against the float32 model with the same dequantized weights (within 2x:
    the engine rounds its bfloat16 activations at other points than torch, so its error is of
    torch's order, 1.0-1.6x it over these rows with and without AVX512-BF16)."""
    from minicpm.quant import quantize as quantize_weight

    config = tiny_config(
        num_hidden_layers=2, num_key_value_heads=2, max_length=256, hidden_size=128, intermediate_size=256
    )
    model = random_model(config, seed=21).to(torch.bfloat16)
    reference = random_model(config, seed=21).to(torch.bfloat16).float()
    with torch.no_grad():
        for module in reference.modules():
            if isinstance(module, torch.nn.Linear):  # the head at 8 bits
                fmt, g = ("int8", None) if module is reference.lm_head else ("int4", 32)
                module.weight.copy_(quantize_weight(module.weight, fmt, g).dequantize())
        table = reference.model.embed_tokens.weight  # untied: the table takes the head's format
        table.copy_(quantize_weight(table, "int8", None).dequantize())
    engine = LLMEngine(model, None, EngineConfig(block_size=8, quantize="int4"))
    assert engine.runner.fused is not None
    rows: list[torch.Tensor] = []

    def keep(logits, seqs, sample=engine.runner.sampler.sample):
        rows.append(logits[0].float().clone())
        return sample(logits, seqs)

    engine.runner.sampler.sample = keep
    prompt = torch.randint(0, 97, (30,), generator=torch.Generator().manual_seed(8)).tolist()
    out = engine.generate([prompt], SamplingParams(max_new_tokens=6, ignore_eos=True))[0].token_ids
    ids = torch.tensor([prompt + out[:-1]])
    with torch.no_grad():
        truth = reference(ids)[0, len(prompt) - 1 :]
        plain = reference.to(torch.bfloat16)(ids)[0, len(prompt) - 1 :].float()
    assert len(rows) == 6
    for ours, want, theirs in zip(rows, truth, plain, strict=True):
        err, floor = (ours - want).abs().max().item(), 0.01 * want.abs().max().item()
        assert err <= max(2 * (theirs - want).abs().max().item(), floor), err


# ---------------------------------------------------------------------------- the native interface


def _fused_decoder(monkeypatch):
    from minicpm.engine import layers

    monkeypatch.setattr(layers, "cpu_linear", lambda model: "panel")
    engine = LLMEngine(random_model(tiny_config(), seed=1), None, EngineConfig(block_size=8))
    fused = engine.runner.fused
    assert fused is not None
    fused.cache.k.zero_()  # uninitialized memory may hold NaNs, which would not compare equal
    fused.cache.v.zero_()
    return fused


def _decode(fused, slot: int, block: int, length: int = 4):
    ids, positions, inv_freq = torch.tensor([1]), torch.tensor([length - 1]), torch.ones(1, fused.config.head_dim // 2)
    table = torch.tensor([[block]], dtype=torch.int32)
    rows = torch.tensor([0], dtype=torch.int32), torch.tensor([length], dtype=torch.int32)
    return fused.hidden_states(ids, positions, inv_freq, torch.tensor([slot]), table, *rows)


@needs_native
@pytest.mark.parametrize(
    ("slot", "block", "named"),
    [
        (-1, 0, "a slot outside the cache"),
        (10**6, 0, "a slot outside the cache"),
        (3, 10**6, "a block id outside the cache"),  # a good slot: once written before the table was checked
        (3, -1, "a block id outside the cache"),
    ],
)
def test_fused_decode_refuses_an_index_outside_the_cache_before_writing(slot, block, named, monkeypatch) -> None:
    fused = _fused_decoder(monkeypatch)
    slots_in_cache = fused.cache.k.shape[1] * fused.cache.block_size
    assert slot >= slots_in_cache or slot < 0 or block != 0
    with pytest.raises(ValueError, match=f"fused decode: {named}"):
        _decode(fused, slot, block)
    assert not fused.cache.k.any() and not fused.cache.v.any()  # nothing written, in any layer
    _decode(fused, 3, 0)  # and a good index is written
    assert fused.cache.k.flatten(1, 2)[:, 3].any() and fused.cache.v.flatten(1, 2)[:, 3].any()


@needs_native
def test_fused_decode_refuses_small_buffers_and_malformed_layers(monkeypatch) -> None:
    fused = _fused_decoder(monkeypatch)
    fused._buffers(1)
    fused.work = fused.work[:-1]  # a byte short of what the library asked for
    with pytest.raises(ValueError, match="fused decode: a work or scratch buffer smaller than the kernel needs"):
        _decode(fused, 3, 0)
    fused.max_rows = 0
    fused._buffers(1)
    fused.layers[1].down.parts = fused.lib.max_parts + 1
    with pytest.raises(ValueError, match="fused decode: a layer's linear with no parts, too many"):
        _decode(fused, 3, 0)
    assert not fused.cache.k.any() and not fused.cache.v.any()


def _prototypes() -> dict[str, int]:
    """csrc/minicpm.h's functions: name -> number of parameters."""
    header = (cpu_kernels.CSRC / "minicpm.h").read_text()
    header = re.sub(r"/\*.*?\*/", "", header, flags=re.S)
    found = {}
    for name, params in re.findall(r"^\w[\w\s\*]*?\b(minicpm_\w+)\(([^)]*)\);", header, flags=re.M):
        params = params.strip()
        found[name] = 0 if params in ("", "void") else params.count(",") + 1
    return found


def test_the_signature_table_declares_every_header_function_with_its_arity() -> None:
    declared = {name: len(args) for name, (_, args) in cpu_kernels._SIGNATURES.items()}
    assert declared == _prototypes()
    assert len(declared) >= 12
    sources = [(cpu_kernels.CSRC / name).read_text() for name in cpu_kernels.SOURCES]
    assert all('#include "minicpm.h"' in text for text in sources)
    for name in declared:  # declared in the header only: a .c file defines it, never re-declares it
        assert not any(re.search(rf"^\w[^\n;{{]*\b{name}\([^;{{]*\);", t, flags=re.M) for t in sources), name


@needs_native
def test_a_library_of_another_interface_is_refused_with_one_warning(monkeypatch, caplog) -> None:
    path = cpu_kernels._build()
    monkeypatch.setattr(cpu_kernels, "ABI_VERSION", cpu_kernels.ABI_VERSION + 1)
    with pytest.raises(cpu_kernels.ABIMismatchError, match="ABI version"):
        cpu_kernels._load(path)
    monkeypatch.undo()
    real = cpu_kernels._structs
    monkeypatch.setattr(cpu_kernels, "_structs", lambda max_parts: real(max_parts + 1))  # a struct of another size
    with pytest.raises(cpu_kernels.ABIMismatchError, match=r"Linear is .* bytes, here"):
        cpu_kernels._load(path)
    native_kernels.cache_clear()
    try:
        assert native_kernels() is None
        assert "Linear is" in caplog.text and "Linear is" in cpu_kernels.build_failure
    finally:
        monkeypatch.undo()
        native_kernels.cache_clear()
    assert native_kernels() is not None


_LOAD = "from minicpm.engine.cpu_kernels import native_kernels; assert native_kernels() is not None"


def _logging_compiler(tmp_path: Path) -> tuple[Path, Path]:
    """A compiler that logs each call's arguments, then runs gcc at -O0 (fast to build, loads the
    same); with ``SLOW_CC`` set, a compile touches ``started`` and sleeps instead of finishing."""
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("gcc is not installed")
    log, cc = tmp_path / "cc.log", tmp_path / "cc"
    cc.write_text(
        f'#!/bin/bash\necho "$*" >> {log}\n'
        f'if [[ -n "$SLOW_CC" && " $* " == *" -c "* ]]; then touch {tmp_path}/started; sleep 60; fi\n'
        f'[[ " $* " == *" -c "* ]] && sleep 1\nexec {gcc} "${{@/-O3/-O0}}"\n'
    )
    cc.chmod(0o755)
    return cc, log


def _env(tmp_path: Path, cc: Path, **extra: str) -> dict[str, str]:
    root = str(Path(__file__).resolve().parents[1])
    path = os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))
    return dict(os.environ, MINICPM_CACHE=str(tmp_path / "cache"), CC=str(cc), PYTHONPATH=path, **extra)


@needs_native
def test_concurrent_first_builds_compile_once_and_both_load(tmp_path) -> None:
    cc, log = _logging_compiler(tmp_path)
    env = _env(tmp_path, cc)
    procs = [subprocess.Popen([sys.executable, "-c", _LOAD], env=env, stderr=subprocess.PIPE) for _ in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err.decode()[-2000:]
    calls = log.read_text().splitlines()
    assert sum(" -c " in f" {c} " for c in calls) == len(cpu_kernels.SOURCES)  # each source compiled once
    assert sum("-shared" in c for c in calls) == 1
    assert len(list((tmp_path / "cache" / "kernels").glob("*.so"))) == 1


@needs_native
def test_a_build_killed_mid_compile_leaves_nothing_after_the_next(tmp_path) -> None:
    cc, _ = _logging_compiler(tmp_path)
    killed = subprocess.Popen(
        [sys.executable, "-c", _LOAD], env=_env(tmp_path, cc, SLOW_CC="1"), start_new_session=True
    )
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "started").exists():
            assert killed.poll() is None and time.monotonic() < deadline, "the build never reached the compiler"
            time.sleep(0.1)
    finally:
        os.killpg(killed.pid, signal.SIGKILL)
        killed.wait()
    kernels = tmp_path / "cache" / "kernels"
    assert any(p.is_dir() for p in kernels.iterdir())  # the killed build's directory, left for the next
    done = subprocess.run([sys.executable, "-c", _LOAD], env=_env(tmp_path, cc), capture_output=True, timeout=300)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    left = sorted(p.name for p in kernels.iterdir())
    assert len(left) == 2 and left[0] == ".build.lock" and left[1].endswith(".so"), left
