"""Attention backends on CPU: the log-sum-exp split of a chunk's attention (what CUDA uses to reach
the cuDNN kernel) against the plain bottom-right causal path, its start-up probe, the choice of a
backend (:func:`select_backend`), each backend's engine against the ``torch`` reference, and what a
kernel failing mid-serving does."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close_rel, random_model, tiny_config

from minicpm import SamplingParams
from minicpm.engine import EngineConfig, LLMEngine
from minicpm.engine.attention import (
    AttentionMetadata,
    CpuTorchBackend,
    PagedKVCache,
    TorchBackend,
    block_runs,
    chunk_over_pasts,
    cpu_attention_with_lse,
    merge_by_lse,
    probe_lse_attention,
    select_backend,
    split_causal_attention,
)
from minicpm.model import causal_attention


def cached(n: int, heads: int = 4, d: int = 16, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(n, heads, d, dtype=dtype).transpose(0, 1)[None]  # strided like the paged cache


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize(("past", "new"), [(70, 30), (1, 5), (64, 64), (200, 2)])
@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_split_attention_equals_the_bottom_right_causal_path(dtype, tol, past: int, new: int, kv_heads: int) -> None:
    torch.manual_seed(past + new)
    q = cached(new, dtype=dtype)
    k, v = cached(past + new, kv_heads, dtype=dtype), cached(past + new, kv_heads, dtype=dtype)
    expected = causal_attention(q, k, v, past=past)
    got = split_causal_attention(
        cpu_attention_with_lse, q, k[:, :, :past], v[:, :, :past], k[:, :, past:], v[:, :, past:]
    )
    assert got.dtype == dtype and got.shape == expected.shape
    assert_close_rel(got.float(), expected.float(), tol)


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_a_past_read_in_pieces_is_merged_one_piece_at_a_time(kv_heads: int) -> None:
    """A chunk over a past handed over as a generator of pieces (as cpu-torch dequantizes a
    quantized cache) gives the bottom-right causal attention over the whole past, and no piece is
    still alive when the next one is read: the merge keeps a running sum, not every part."""
    import weakref

    torch.manual_seed(kv_heads)
    past, new = 100, 12
    q = cached(new)
    k, v = cached(past + new, kv_heads), cached(past + new, kv_heads)
    alive: list[weakref.ref] = []
    read = []

    def pieces():
        for first in range(0, past, 16):
            assert all(r() is None for r in alive), "an earlier piece is still alive"
            end = min(first + 16, past)
            kk = k[:, :, first:end].clone()  # a fresh tensor, as a dequantized piece is
            vv = v[:, :, first:end].clone()
            alive[:] = [weakref.ref(kk), weakref.ref(vv)]
            read.append(first)
            yield kk, vv
            del kk, vv

    got = chunk_over_pasts(cpu_attention_with_lse, q, pieces(), k[:, :, past:], v[:, :, past:])
    assert read == list(range(0, past, 16))
    assert_close_rel(got, causal_attention(q, k, v, past=past), 1e-5)
    one = torch.randn(1, 4, 3, 16)
    assert merge_by_lse(iter([(one, torch.zeros(1, 4, 3))]), torch.float32) is one  # one part: as it is
    with pytest.raises(ValueError, match="no parts"):
        merge_by_lse(iter([]), torch.float32)


def test_probe_takes_the_first_kernel_that_agrees_and_skips_broken_ones() -> None:
    def raises(q, k, v, is_causal):
        raise RuntimeError("not on this card")

    def wrong_lse(q, k, v, is_causal):
        out, lse = cpu_attention_with_lse(q, k, v, is_causal)
        return out, lse + 1.0 if is_causal else lse

    cpu = torch.device("cpu")
    for kv_heads in (4, 2):
        candidates = (raises, wrong_lse, cpu_attention_with_lse)
        assert probe_lse_attention(cpu, torch.float32, 4, kv_heads, 16, candidates) is cpu_attention_with_lse
        assert probe_lse_attention(cpu, torch.float32, 4, kv_heads, 16, (raises, wrong_lse)) is None
    assert probe_lse_attention(cpu, torch.float32, 4, 4, 16) is None  # the CUDA kernels do not run here


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_every_cpu_backend_gives_the_reference_greedy_tokens(kv_heads: int, monkeypatch) -> None:
    """The same prompts, chunked and batched, through each backend chosen by its EngineConfig name:
    ``cpu-torch`` (chunks with a past by the split path) and ``cpu-native`` (where it builds) give
    the ``torch`` reference's greedy tokens."""
    from minicpm.engine.attention import cpu

    model = random_model(tiny_config(num_hidden_layers=2, num_key_value_heads=kv_heads, max_length=256), seed=7)
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 97, (n,), generator=gen).tolist() for n in (40, 90, 7)]
    params = SamplingParams(max_new_tokens=8, ignore_eos=True)

    def engine(backend: str) -> LLMEngine:
        config = EngineConfig(block_size=8, max_num_seqs=2, max_num_batched_tokens=16, attention_backend=backend)
        made = LLMEngine(model, None, config)
        assert made.runner.attention_backend == made.stats()["attention_backend"] == backend
        return made

    expected = [c.token_ids for c in engine("torch").generate(prompts, params)]
    calls = []

    def counted(q, k, v, is_causal):
        calls.append(q.shape[2])
        return cpu_attention_with_lse(q, k, v, is_causal)

    monkeypatch.setattr(cpu, "cpu_attention_with_lse", counted)
    assert [c.token_ids for c in engine("cpu-torch").generate(prompts, params)] == expected
    assert calls, "no chunk went through the split path"
    if select_backend("cpu", torch.float32, model.config).name == "cpu-native":
        assert [c.token_ids for c in engine("cpu-native").generate(prompts, params)] == expected


def test_a_backend_is_chosen_once_and_a_named_one_that_cannot_run_says_why() -> None:
    config = tiny_config()
    assert select_backend("cpu", torch.float32, config, "cpu-torch").name == "cpu-torch"
    assert select_backend("cpu", torch.float32, config, "torch").name == "torch"
    with pytest.raises(ValueError, match="runs on CPU, not cuda"):
        select_backend("cuda", torch.float32, config, "cpu-native")
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        select_backend("cpu", torch.float16, config, "cpu-native")
    with pytest.raises(ValueError, match="attention backend must be one of"):
        select_backend("cpu", torch.float32, config, "flash")
    with pytest.raises(ValueError, match="engine setting 'attention_backend'"):
        EngineConfig(attention_backend="flash")
    with pytest.raises(ValueError, match="engine setting 'on_kernel_failure'"):
        EngineConfig(on_kernel_failure="ignore")
    model = random_model(tiny_config(num_hidden_layers=1), seed=0)
    with pytest.raises(ValueError, match="the fused decoder runs on the cpu-native attention backend, not cpu-torch"):
        LLMEngine(model, None, EngineConfig(attention_backend="cpu-torch", fused_decode=True))
    assert LLMEngine(model, None, EngineConfig(fused_decode=False)).runner.fused is None


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_cpu_steps_read_scattered_blocks_in_place(kv_heads: int, monkeypatch) -> None:
    """A mixed step (a decode row, a chunk with a past, a first chunk) whose sequences own blocks
    in scattered order equals the plain causal path on contiguous keys, and nothing is gathered."""
    torch.manual_seed(kv_heads)
    bs, heads, d = 4, 4, 16
    config = tiny_config(num_attention_heads=heads, num_key_value_heads=kv_heads, hidden_size=heads * d)
    cache = PagedKVCache(
        config, num_blocks=32, block_size=bs, dtype=torch.float32, device="cpu", backend=CpuTorchBackend()
    )
    tables = [[7, 3, 4, 5, 20], [9, 10, 2, 11], [30, 31]]  # runs: 3, 3 and 1
    ctx = [19, 15, 6]  # context after this step
    new = [1, 5, 6]  # a decode row, a chunk with a past of 10, a first chunk
    full_k = [cached(c, kv_heads) for c in ctx]
    full_v = [cached(c, kv_heads) for c in ctx]
    for table, n, k, v in zip(tables, new, full_k, full_v, strict=True):  # the past is in the cache already
        for p in range(k.shape[2] - n):
            slot = table[p // bs] * bs + p % bs
            cache.k[0].view(-1, kv_heads, d)[slot] = k[0, :, p]
            cache.v[0].view(-1, kv_heads, d)[slot] = v[0, :, p]
    slots = [t[p // bs] * bs + p % bs for t, c, n in zip(tables, ctx, new, strict=True) for p in range(c - n, c)]
    q = torch.cat([cached(n, heads) for n in new], dim=2)
    k_new = torch.cat([k[:, :, k.shape[2] - n :] for k, n in zip(full_k, new, strict=True)], dim=2)
    v_new = torch.cat([v[:, :, v.shape[2] - n :] for v, n in zip(full_v, new, strict=True)], dim=2)
    cache.metadata = cache.prepare(
        AttentionMetadata(
            slot_mapping=torch.tensor(slots),
            block_tables=torch.zeros(3, 5, dtype=torch.int32),
            context_lens=torch.tensor(ctx, dtype=torch.int32),
            decode_only=False,
            query_lens=new,
            context_lens_host=ctx,
            tables=tables,
            leading_decodes=1,
        )
    )
    assert cache.metadata.seq_runs == [block_runs(t, c, bs) for t, c in zip(tables, ctx, strict=True)]
    assert [len(r) for r in cache.metadata.seq_runs] == [3, 3, 1]
    monkeypatch.setattr(torch.Tensor, "index_select", lambda *a, **k: pytest.fail("a gather"))
    got = cache.attend(0, q, k_new, v_new)
    start, expected = 0, []
    for n, c, k, v in zip(new, ctx, full_k, full_v, strict=True):
        expected.append(causal_attention(q[:, :, start : start + n], k, v, past=c - n))
        start += n
    assert_close_rel(got, torch.cat(expected, dim=2), 1e-5)


def _chunk_case(
    ctx: int,
    new: int,
    table: list[int],
    backend: TorchBackend,
    bs: int = 4,
    heads: int = 4,
    kv_heads: int = 2,
    d: int = 16,
):
    """A CPU cache holding ``ctx - new`` tokens of one sequence in ``table``'s blocks and the
    ``torch`` backend's metadata of a ``new``-token chunk after them (the GPU's per-sequence path):
    (cache, q, k_new, v_new, the plain path's answer)."""
    config = tiny_config(num_attention_heads=heads, num_key_value_heads=kv_heads, hidden_size=heads * d)
    cache = PagedKVCache(config, num_blocks=64, block_size=bs, dtype=torch.float32, device="cpu", backend=backend)
    k_full, v_full = cached(ctx, kv_heads), cached(ctx, kv_heads)
    for p in range(ctx - new):
        cache.k[0, table[p // bs], p % bs] = k_full[0, :, p]
        cache.v[0, table[p // bs], p % bs] = v_full[0, :, p]
    q = cached(new, heads)
    cache.metadata = cache.prepare(
        AttentionMetadata(
            slot_mapping=torch.tensor([table[p // bs] * bs + p % bs for p in range(ctx - new, ctx)]),
            block_tables=torch.tensor([table[: -(-ctx // bs)]], dtype=torch.int32),
            context_lens=torch.tensor([ctx], dtype=torch.int32),
            decode_only=False,
            query_lens=[new],
            context_lens_host=[ctx],
            tables=[table[: -(-ctx // bs)]],
        )
    )
    expected = causal_attention(q, k_full, v_full, past=ctx - new)
    return cache, q, k_full[:, :, ctx - new :], v_full[:, :, ctx - new :], expected


def test_a_failing_split_prefill_kernel_falls_back_to_the_plain_path(caplog) -> None:
    """The split kernel raises: the chunk is computed by the plain bottom-right causal path, the
    failure is counted, and the kernel is not tried again for that shape class."""
    torch.manual_seed(0)
    calls = []

    def broken(q, k, v, is_causal):
        calls.append(1)
        raise RuntimeError("cuDNN: no kernel for this shape")

    backend = TorchBackend((broken,))
    cache, q, k, v, expected = _chunk_case(14, 6, [5, 2, 9, 11], backend)
    assert_close_rel(cache.attend(0, q, k, v), expected, 1e-5)
    assert calls == [1] and backend.failures == {"broken": 1} and "broken failed" in caplog.text
    cache.attend(0, q, k, v)
    assert calls == [1]


def test_split_prefill_kernels_are_chosen_per_shape_class() -> None:
    """The GPU's choice (here with CPU stand-ins): per (past, chunk) class by powers of two, the
    first candidate that runs and agrees with the plain path on the class's first chunk; a wrong
    or failing kernel is passed over, a chosen one failing later hands its class to the next."""
    calls: list[str] = []

    def broken(q, k, v, is_causal):
        calls.append("broken")
        raise RuntimeError("no kernel for this shape")

    def wrong(q, k, v, is_causal):
        calls.append("wrong")
        out, lse = cpu_attention_with_lse(q, k, v, is_causal)
        return out * 1.5, lse

    def right(q, k, v, is_causal):
        calls.append("right")
        return cpu_attention_with_lse(q, k, v, is_causal)

    torch.manual_seed(1)
    table = list(range(40, 0, -2))
    by_class: dict = {}
    for ctx, new, tried in (
        (30, 6, ["broken", "wrong", "right"]),
        (31, 7, ["right"]),
        (70, 6, ["broken", "wrong", "right"]),
    ):
        backend = TorchBackend((broken, wrong, right))
        backend.lse_by_class = by_class
        cache, q, k, v, expected = _chunk_case(ctx, new, table, backend)
        calls.clear()
        assert_close_rel(cache.attend(0, q, k, v), expected, 1e-5)
        assert list(dict.fromkeys(calls)) == tried  # in order of first call (each runs for past and chunk)
    assert set(by_class.values()) == {right} and len(by_class) == 2  # pasts 24/24 share a class; 64 another

    flaky_calls = []

    def flaky(q, k, v, is_causal):  # chosen, then failing
        flaky_calls.append(1)
        if len(flaky_calls) > 2:
            raise RuntimeError("out of workspace")
        return cpu_attention_with_lse(q, k, v, is_causal)

    backend = TorchBackend((flaky, right))
    cache, q, k, v, expected = _chunk_case(30, 6, table, backend)
    assert_close_rel(cache.attend(0, q, k, v), expected, 1e-5)
    assert backend.lse_by_class[(24).bit_length(), (6).bit_length()] is flaky
    cache, q, k, v, expected = _chunk_case(30, 6, table, backend)
    assert_close_rel(cache.attend(0, q, k, v), expected, 1e-5)
    assert backend.lse_by_class[(24).bit_length(), (6).bit_length()] is right and backend.failures == {"flaky": 1}


def test_a_kernel_failure_falls_back_by_default_and_the_environment_can_make_it_raise(monkeypatch) -> None:
    """Users get the fallback (counted in stats and /metrics); MINICPM_ON_KERNEL_FAILURE sets another
    default (the test suite's "raise"); a setting given wins over it."""
    monkeypatch.delenv("MINICPM_ON_KERNEL_FAILURE", raising=False)
    assert EngineConfig().on_kernel_failure == "fallback"
    monkeypatch.setenv("MINICPM_ON_KERNEL_FAILURE", "raise")
    assert EngineConfig().on_kernel_failure == "raise"
    assert EngineConfig(on_kernel_failure="fallback").on_kernel_failure == "fallback"
    monkeypatch.setenv("MINICPM_ON_KERNEL_FAILURE", "ignore")
    with pytest.raises(ValueError, match="engine setting 'on_kernel_failure' must be 'fallback' or 'raise'"):
        EngineConfig()
