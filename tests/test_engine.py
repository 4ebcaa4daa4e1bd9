"""The paged, continuously batching engine on a tiny random model: greedy parity with the plain
model's full recompute (chunked prefill, preemption, prefix caching, dynamic NTK per request),
block accounting, request validation, sampling parameters, and the block manager and scheduler
on their own."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from helpers import assert_close_rel, random_model, tiny_config

from minicpm import MiniCPMForCausalLM, SamplingParams
from minicpm.engine import block_manager as block_manager_module
from minicpm.engine.block_manager import BlockManager
from minicpm.engine.config import EngineConfig
from minicpm.engine.llm_engine import LLMEngine
from minicpm.engine.scheduler import Scheduler
from minicpm.engine.sequence import Sequence, SequenceStatus

BLOCK = 8
MAX_POS = 64  # max_position_embeddings: prompts longer than this get their own NTK base
CONTEXT = 160  # max_length


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model() -> MiniCPMForCausalLM:
    config = tiny_config(
        num_hidden_layers=2, num_key_value_heads=2, max_position_embeddings=MAX_POS, max_length=CONTEXT
    )
    return random_model(config, seed=1)


def prompt_of(n: int, seed: int) -> list[int]:
    return torch.randint(0, 97, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def kv_bytes(model: MiniCPMForCausalLM, blocks: int) -> int:
    return blocks * BLOCK * model.config.kv_bytes_per_token(model.dtype.itemsize)


def make_engine(model: MiniCPMForCausalLM, blocks: int = 80, **overrides) -> LLMEngine:
    fields = dict(block_size=BLOCK, max_num_seqs=4, max_num_batched_tokens=16, kv_cache_memory=kv_bytes(model, blocks))
    fields.update(overrides)
    return LLMEngine(model, None, EngineConfig(**fields))


_reference: dict[tuple[int, tuple[int, ...]], list[tuple[int, float]]] = {}


def reference_greedy(model: MiniCPMForCausalLM, prompt: list[int], n: int) -> list[int]:
    """Greedy tokens by full recompute with the prompt's NTK base (memoized per model and prompt)."""
    steps = _reference.setdefault((id(model), tuple(prompt)), [])
    ids = list(prompt) + [t for t, _ in steps]
    with torch.no_grad():
        while len(steps) < n:
            logits = model(torch.tensor([ids]), rope_lengths=len(prompt))[0, -1]
            top = logits.topk(2).values
            token = int(logits.argmax())
            steps.append((token, float(top[0] - top[1])))
            ids.append(token)
    return [t for t, _ in steps[:n]]


def assert_matches_reference(model: MiniCPMForCausalLM, prompt: list[int], got: list[int], n: int) -> None:
    expected = reference_greedy(model, prompt, n)
    assert len(got) == n, f"prompt of {len(prompt)}: {len(got)} tokens, expected {n}"
    for i, (a, b) in enumerate(zip(got, expected, strict=True)):
        margin = _reference[(id(model), tuple(prompt))][i][1]
        assert a == b, f"prompt of {len(prompt)}: token {i} is {a}, reference {b} (reference top-2 margin {margin:.3g})"


def check_blocks(engine: LLMEngine) -> None:
    """Reference counts equal what the running sequences hold; the free list is exactly the unheld blocks."""
    bm = engine.block_manager
    held = Counter(b for s in engine.scheduler.running for b in s.block_table)
    for block in bm.blocks:
        assert block.ref_count == held.get(block.block_id, 0), block
    assert set(bm.free_ids) == {b.block_id for b in bm.blocks if b.ref_count == 0}
    assert all(not s.block_table for s in engine.scheduler.waiting)
    for s in engine.scheduler.running:
        assert len(s.block_table) * BLOCK >= s.num_computed_tokens


def check_idle(engine: LLMEngine) -> None:
    bm = engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks
    assert all(b.ref_count == 0 for b in bm.blocks)
    assert not engine.scheduler.running and not engine.scheduler.waiting
    assert not engine.requests and not engine.has_unfinished_requests()
    assert engine.stats()["free_blocks"] == engine.stats()["num_blocks"]


def run_to_end(engine: LLMEngine) -> dict[str, list]:
    """Step until idle, checking block accounting each step; returns request id -> [token ids, finish reason]."""
    results: dict[str, list] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            entry = results.setdefault(out.request_id, [[], None])
            entry[0] += out.token_ids
            if out.finished:
                entry[1] = out.finish_reason
        check_blocks(engine)
    return results


GREEDY_LENGTHS = (1, 5, 8, 24, 40, 66, 80, 100)  # 1, < block, a block, blocks, chunked (> 16), > max_pos (NTK)
GREEDY_NEW = (6, 9, 4, 12, 7, 20, 10, 5)
GREEDY_SEEDS = (101, 105, 108, 124, 140, 2066, 180, 200)


def greedy_batch() -> tuple[list[list[int]], list[SamplingParams]]:
    prompts = [prompt_of(n, seed=seed) for n, seed in zip(GREEDY_LENGTHS, GREEDY_SEEDS, strict=True)]
    params = [SamplingParams(max_new_tokens=k, ignore_eos=True) for k in GREEDY_NEW]
    return prompts, params


# ---------------------------------------------------------------------------------------------- parity


def test_greedy_matches_full_recompute(model: MiniCPMForCausalLM) -> None:
    config = model.config
    assert len({config.rope_base(n) for n in GREEDY_LENGTHS if n > MAX_POS}) == 3  # three stretched NTK bases
    engine = make_engine(model)
    prompts, params = greedy_batch()
    outs = engine.generate(prompts, params)
    for prompt, p, out in zip(prompts, params, outs, strict=True):
        assert out.finish_reason == "length" and out.prompt_tokens == len(prompt)
        assert_matches_reference(model, prompt, out.token_ids, p.max_new_tokens)
    assert engine.stats()["preemptions"] == 0
    check_idle(engine)
    # the prompt's base matters here: with the base of the growing length (the plain model's default),
    # the 66-token prompt's answer differs, so the parity above pins the dynamic-NTK rule
    prompt, n = prompts[5], GREEDY_NEW[5]
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    assert ids[len(prompt) :] != outs[5].token_ids


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_greedy_parity_under_preemption(model: MiniCPMForCausalLM, prefix_caching: bool) -> None:
    engine = make_engine(model, blocks=12, enable_prefix_caching=prefix_caching)  # 96 tokens of KV in all
    assert engine.max_model_len == 96
    lengths, news = (20, 70, 13, 30, 9, 26), (20, 12, 25, 18, 30, 14)
    prompts = [prompt_of(n, seed=200 + n) for n in lengths]
    for prompt, n in zip(prompts, news, strict=True):
        engine.add_request(prompt, SamplingParams(max_new_tokens=n, ignore_eos=True), request_id=f"r{len(prompt)}")
    results = run_to_end(engine)
    assert engine.stats()["preemptions"] > 0
    for prompt, n in zip(prompts, news, strict=True):
        tokens, reason = results[f"r{len(prompt)}"]
        assert reason == "length"
        assert_matches_reference(model, prompt, tokens, n)
    check_idle(engine)


def test_prefix_cache_hits_keep_parity(model: MiniCPMForCausalLM) -> None:
    engine = make_engine(model)
    shared = prompt_of(32, seed=300)  # 4 full blocks
    new = SamplingParams(max_new_tokens=8, ignore_eos=True)

    first = shared + prompt_of(5, seed=301)
    (out,) = engine.generate([first], new)
    assert out.cached_tokens == 0
    assert_matches_reference(model, first, out.token_ids, 8)

    # after the first finished: its freed blocks are picked up again
    later = [shared + prompt_of(k, seed=310 + k) for k in (1, 7, 12)]
    before = engine.stats()["cached_prompt_tokens"]
    outs = engine.generate(later, new)
    for prompt, out in zip(later, outs, strict=True):
        assert out.cached_tokens == 32, out
        assert_matches_reference(model, prompt, out.token_ids, 8)
    assert engine.stats()["cached_prompt_tokens"] - before == 3 * 32

    # submitted together with a fresh prefix: the later ones hit what the first has computed so far
    fresh = prompt_of(24, seed=320)
    together = [fresh + prompt_of(k, seed=330 + k) for k in (3, 10, 4)]
    outs = engine.generate(together, new)
    assert outs[0].cached_tokens == 0
    assert sum(o.cached_tokens for o in outs[1:]) > 0
    for prompt, out in zip(together, outs, strict=True):
        assert out.cached_tokens % BLOCK == 0 and out.cached_tokens < len(prompt)
        assert_matches_reference(model, prompt, out.token_ids, 8)
    check_idle(engine)


def test_prefix_cache_respects_ntk_base(model: MiniCPMForCausalLM) -> None:
    """Prompts past max_position_embeddings have a base per length: same ids, other keys, no sharing."""
    engine = make_engine(model)
    shared = prompt_of(64, seed=400)
    new = SamplingParams(max_new_tokens=6, ignore_eos=True)
    a, b = shared + prompt_of(8, seed=401), shared + prompt_of(24, seed=402)  # 72 and 88 tokens
    assert model.config.rope_base(len(a)) != model.config.rope_base(len(b))
    (out_a,) = engine.generate([a], new)
    (out_b,) = engine.generate([b], new)
    assert out_a.cached_tokens == 0 and out_b.cached_tokens == 0
    assert engine.stats()["cached_prompt_tokens"] == 0
    assert_matches_reference(model, a, out_a.token_ids, 6)
    assert_matches_reference(model, b, out_b.token_ids, 6)
    # concurrently, too
    c, d = shared + prompt_of(10, seed=403), shared + prompt_of(20, seed=404)
    outs = engine.generate([c, d], new)
    assert [o.cached_tokens for o in outs] == [0, 0]
    assert_matches_reference(model, c, outs[0].token_ids, 6)
    assert_matches_reference(model, d, outs[1].token_ids, 6)
    # the same length past max_pos is the same base: those do share
    e = shared + prompt_of(8, seed=405)
    (out_e,) = engine.generate([e], new)
    assert out_e.cached_tokens == 64
    assert_matches_reference(model, e, out_e.token_ids, 6)
    check_idle(engine)


def capture_logits(engine: LLMEngine) -> dict[tuple[str, int], tuple[list[int], torch.Tensor]]:
    """(request id, tokens so far) -> (those tokens, the float32 logits row the sampler got)."""
    seen: dict[tuple[str, int], tuple[list[int], torch.Tensor]] = {}
    sample = engine.runner.sampler.sample

    def wrapped(logits, seqs):
        for row, seq in zip(logits, seqs, strict=True):
            seen[(seq.request_id, seq.num_tokens)] = (list(seq.token_ids), row.detach().clone())
        return sample(logits, seqs)

    engine.runner.sampler.sample = wrapped
    return seen


def test_chunked_prefill_logits_equal_one_shot(model: MiniCPMForCausalLM) -> None:
    prompts = {"short": prompt_of(3, seed=500), "mid": prompt_of(40, seed=501), "long": prompt_of(90, seed=502)}
    logs = []
    for chunk in (5, 256):
        engine = make_engine(model, max_num_batched_tokens=chunk)
        seen = capture_logits(engine)
        for rid, prompt in prompts.items():
            engine.add_request(prompt, SamplingParams(max_new_tokens=4, ignore_eos=True), request_id=rid)
        results = run_to_end(engine)
        assert all(len(results[rid][0]) == 4 for rid in prompts)
        logs.append(seen)
    small, large = logs
    assert set(small) == set(large) and len(small) == 3 * 4  # the prompt's last token, then 3 decode steps
    with torch.no_grad():
        for key, (ids, logits) in small.items():
            ids_large, logits_large = large[key]
            assert ids == ids_large, key
            assert_close_rel(logits, logits_large, 1e-5)
            plain = model(torch.tensor([ids]), rope_lengths=len(prompts[key[0]]))[0, -1]
            assert_close_rel(logits, plain, 1e-5)


# ---------------------------------------------------------------------------------------------- accounting


def test_blocks_are_returned_after_finish_and_abort(model: MiniCPMForCausalLM) -> None:
    engine = make_engine(model, blocks=24)
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    lengths = {"prefill": 60, "decode": 6, "third": 20, "done": 10, "late": 33}
    for rid, n in lengths.items():
        if rid != "late":
            engine.add_request(prompt_of(n, seed=600 + n), params, request_id=rid)
    seqs = {rid: r.seq for rid, r in engine.requests.items()}

    engine.step()
    check_blocks(engine)
    assert seqs["prefill"].status is SequenceStatus.RUNNING
    assert 0 < seqs["prefill"].num_computed_tokens < 60
    # abort mid-prefill, with some blocks already committed to the prefix cache
    engine.step()
    assert BLOCK <= seqs["prefill"].num_computed_tokens < 60
    out = engine.abort_request("prefill")
    assert out is not None and out.finished and out.finish_reason == "abort" and out.output_tokens == 0
    check_blocks(engine)
    assert engine.abort_request("prefill") is None and engine.abort_request("no-such-id") is None

    while len(seqs["decode"].output_ids) < 3:
        engine.step()
        check_blocks(engine)
    out = engine.abort_request("decode")  # mid-decode
    assert out is not None and out.finish_reason == "abort" and out.output_tokens >= 3
    assert seqs["decode"].status is SequenceStatus.FINISHED and not seqs["decode"].block_table

    engine.add_request(prompt_of(33, seed=633), params, request_id="late")
    out = engine.abort_request("third")  # part-way, with "late" queued behind it
    assert out is not None and out.finish_reason == "abort"
    check_blocks(engine)

    done_seq = seqs["done"]
    results = run_to_end(engine)
    assert results["done"][1] == "length" and results["late"][1] == "length"
    assert_matches_reference(model, prompt_of(10, seed=610), done_seq.output_ids, 12)
    assert_matches_reference(model, prompt_of(33, seed=633), results["late"][0], 12)
    check_idle(engine)
    engine.abort_request("done")  # finished: nothing to do
    check_idle(engine)


def test_waiting_abort_and_generate_abort_free_everything(model: MiniCPMForCausalLM) -> None:
    engine = make_engine(model, max_num_seqs=1)
    params = SamplingParams(max_new_tokens=5, ignore_eos=True)
    engine.add_request(prompt_of(12, seed=700), params, request_id="a")
    engine.add_request(prompt_of(30, seed=701), params, request_id="b")
    engine.step()
    assert engine.stats()["running"] == 1 and engine.stats()["waiting"] == 1
    assert engine.abort_request("b").finish_reason == "abort"  # never admitted
    assert engine.stats()["waiting"] == 0
    engine.abort_request("a")
    check_idle(engine)

    # an exception inside generate() aborts its requests
    def boom(*_args, **_kwargs):
        raise RuntimeError("boom")

    engine.runner.run = boom
    with pytest.raises(RuntimeError, match="boom"):
        engine.generate([prompt_of(9, seed=702), prompt_of(3, seed=703)], params)
    check_idle(engine)


# ---------------------------------------------------------------------------------------------- validation


def test_request_that_cannot_fit_is_refused_and_engine_keeps_serving(model: MiniCPMForCausalLM) -> None:
    engine = make_engine(model, blocks=10)  # 80 tokens of KV, the model's context is 160
    assert engine.kv_capacity == 80 and engine.max_model_len == 80
    params = SamplingParams(max_new_tokens=10, ignore_eos=True)
    before = prompt_of(20, seed=800)
    engine.add_request(before, params, request_id="before")
    engine.step()
    for n in (80, 120):
        with pytest.raises(ValueError, match=rf"prompt is {n} tokens.*holds 80 tokens.*context is 160"):
            engine.add_request(prompt_of(n, seed=801), params, request_id="too-long")
    with pytest.raises(ValueError, match=r"prompt is 200 tokens"):
        engine.add_request(prompt_of(200, seed=802), params)
    with pytest.raises(ValueError, match="needs an idle engine; 1 requests are in flight"):
        engine.generate([prompt_of(5, seed=802)], params)  # it would drop the other request's outputs
    with pytest.raises(ValueError, match="empty"):
        engine.add_request([], params)
    with pytest.raises(ValueError, match=r"outside the vocabulary \(size 97\)"):
        engine.add_request([1, 97], params)
    with pytest.raises(ValueError, match="already in flight"):
        engine.add_request([1, 2], params, request_id="before")
    assert set(engine.requests) == {"before"}
    check_blocks(engine)

    after = prompt_of(36, seed=803)
    edge = prompt_of(79, seed=804)  # the longest prompt that fits: room for exactly one token
    engine.add_request(after, params, request_id="after")
    engine.add_request(edge, params, request_id="edge")
    results = run_to_end(engine)
    assert_matches_reference(model, before, results["before"][0], 10)
    assert_matches_reference(model, after, results["after"][0], 10)
    assert results["edge"][1] == "length"
    assert_matches_reference(model, edge, results["edge"][0], 1)
    check_idle(engine)


# ---------------------------------------------------------------------------------------------- sampling


def test_mixed_sampling_params_in_one_batch(model: MiniCPMForCausalLM) -> None:
    greedy = SamplingParams(max_new_tokens=10, ignore_eos=True)
    g_prompts = [prompt_of(7, seed=900), prompt_of(26, seed=901)]
    s_prompts = [prompt_of(11, seed=902), prompt_of(70, seed=903)]
    sampled = [SamplingParams(max_new_tokens=12, temperature=0.8, seed=s, ignore_eos=True) for s in (7, 8)]

    alone = [o.token_ids for o in make_engine(model).generate(g_prompts, greedy)]
    prompts = [g_prompts[0], s_prompts[0], g_prompts[1], s_prompts[1]]
    params = [greedy, sampled[0], greedy, sampled[1]]
    mixed = make_engine(model).generate(prompts, params)
    again = make_engine(model).generate(prompts, params)
    assert [mixed[0].token_ids, mixed[2].token_ids] == alone
    for prompt, tokens in zip(g_prompts, alone, strict=True):
        assert_matches_reference(model, prompt, tokens, 10)
    assert [o.token_ids for o in mixed] == [o.token_ids for o in again]  # seeded: reproducible
    assert all(len(o.token_ids) == 12 and o.finish_reason == "length" for o in (mixed[1], mixed[3]))
    other_seed = SamplingParams(max_new_tokens=12, temperature=0.8, seed=99, ignore_eos=True)
    (other,) = make_engine(model).generate([s_prompts[0]], other_seed)
    assert other.token_ids != mixed[1].token_ids
    # the sampled rows are not greedy
    assert mixed[1].token_ids != reference_greedy(model, s_prompts[0], 12)


def test_stop_token_ids_and_length(model: MiniCPMForCausalLM) -> None:
    prompt = prompt_of(15, seed=1000)
    free = reference_greedy(model, prompt, 16)
    k = next(i for i in range(3, 16) if free[i] not in free[:i])
    stop_id = free[k]
    engine = make_engine(model)
    stopped, capped = engine.generate(
        [prompt, prompt],
        [
            SamplingParams(max_new_tokens=16, stop_token_ids=(stop_id,), ignore_eos=True),
            SamplingParams(max_new_tokens=k, ignore_eos=True),
        ],
    )
    # the stop id was generated: it ends the token ids (vLLM's and transformers' outputs keep it too)
    assert stopped.finish_reason == "stop" and stopped.token_ids == free[: k + 1] and stopped.token_ids[-1] == stop_id
    assert capped.finish_reason == "length" and capped.token_ids == free[:k]
    # a stop id as the very first token: it alone is output
    (first,) = engine.generate([prompt], SamplingParams(max_new_tokens=5, stop_token_ids=(free[0],), ignore_eos=True))
    assert first.token_ids == [free[0]] and first.finish_reason == "stop" and first.text == ""
    # the model's eos stops unless ignore_eos; ignore_eos keeps explicit stop ids
    assert engine.stop_token_ids(SamplingParams()) >= set(model.config.eos_token_ids)
    assert engine.stop_token_ids(SamplingParams(ignore_eos=True, stop_token_ids=(5,))) == {5}
    check_idle(engine)


# ---------------------------------------------------------------------------------------------- block manager


def seq_of(ids: list[int], hash_seed: int = 0, request_id: str = "s") -> Sequence:
    return Sequence(
        request_id=request_id,
        prompt_ids=list(ids),
        params=SamplingParams(),
        stop_ids=frozenset(),
        max_tokens=8,
        rope_length=len(ids),
        hash_seed=hash_seed,
    )


def compute_all(bm: BlockManager, seq: Sequence) -> None:
    """What the engine does after a forward: mark every token computed and commit full blocks."""
    seq.num_computed_tokens = seq.num_tokens
    bm.commit(seq)


def test_block_manager_allocate_free_and_ref_counts() -> None:
    bm = BlockManager(num_blocks=6, block_size=4)
    a = seq_of(list(range(10)), request_id="a")
    assert bm.can_allocate(a)
    bm.allocate(a)
    assert len(a.block_table) == 3 and len(set(a.block_table)) == 3 and a.num_computed_tokens == 0
    assert bm.num_free_blocks == 3 and all(bm.blocks[b].ref_count == 1 for b in a.block_table)
    with pytest.raises(RuntimeError):
        bm.allocate(a)

    # growth: 10 tokens in 3 blocks; two more fit, a third needs a block
    a.num_computed_tokens = 10
    assert bm.can_append(a, 2)
    bm.append_slots(a, 2)
    assert len(a.block_table) == 3
    bm.append_slots(a, 3)
    assert len(a.block_table) == 4 and bm.num_free_blocks == 2

    b = seq_of(list(range(50, 62)), request_id="b")  # 3 blocks, 2 free
    assert not bm.can_allocate(b)
    with pytest.raises(RuntimeError):
        bm.allocate(b)
    assert not b.block_table and bm.num_free_blocks == 2  # a failed allocate changes nothing
    assert not bm.can_append(a, 4 * 4)
    assert bm.can_allocate(seq_of([1, 2, 3, 4, 5]), reserve=0)
    assert not bm.can_allocate(seq_of([1, 2, 3, 4, 5]), reserve=1)

    bm.free(a)
    assert not a.block_table and a.num_computed_tokens == 0
    assert bm.num_free_blocks == 6 and all(blk.ref_count == 0 for blk in bm.blocks)
    bm.allocate(b)
    assert bm.num_free_blocks == 3
    bm.free(b)
    assert bm.num_free_blocks == 6

    with pytest.raises(ValueError):
        BlockManager(0, 4)


def test_block_manager_prefix_hits_share_blocks() -> None:
    bm = BlockManager(num_blocks=16, block_size=4)
    ids = list(range(100, 112))  # 3 full blocks
    a = seq_of(ids, request_id="a")
    bm.allocate(a)
    compute_all(bm, a)
    assert a.num_hashed_blocks == 3

    # identical prompt: the last token is left to compute, so only 2 blocks are reused
    b = seq_of(ids, request_id="b")
    bm.allocate(b)
    assert b.num_cached_tokens == b.num_computed_tokens == 8
    assert b.block_table[:2] == a.block_table[:2] and b.block_table[2] != a.block_table[2]
    assert [bm.blocks[i].ref_count for i in a.block_table] == [2, 2, 1]

    # one token more: all 3 blocks are reused
    c = seq_of([*ids, 7], request_id="c")
    bm.allocate(c)
    assert c.num_cached_tokens == 12 and c.block_table[:3] == a.block_table
    assert len(c.block_table) == 4

    # differing inside the second block: only the first is reused
    d = seq_of([*ids[:4], 0, *ids[5:], 1], request_id="d")
    bm.allocate(d)
    assert d.num_cached_tokens == 4 and d.block_table[0] == a.block_table[0]

    # another hash seed (another NTK base): nothing is reused
    e = seq_of([*ids, 7], hash_seed=12345, request_id="e")
    bm.allocate(e)
    assert e.num_cached_tokens == 0 and not set(e.block_table) & set(a.block_table)

    for s in (a, b, c, d, e):
        bm.free(s)
    assert bm.num_free_blocks == 16 and all(blk.ref_count == 0 for blk in bm.blocks)

    off = BlockManager(num_blocks=10, block_size=4, enable_prefix_caching=False)
    a2 = seq_of(ids)
    off.allocate(a2)
    compute_all(off, a2)
    b2 = seq_of([*ids, 7])
    off.allocate(b2)
    assert b2.num_cached_tokens == 0


def test_block_manager_freed_blocks_keep_hash_and_are_reused_lru() -> None:
    bm = BlockManager(num_blocks=6, block_size=4)
    a = seq_of(list(range(8)), request_id="a")  # 2 blocks
    bm.allocate(a)
    compute_all(bm, a)
    a_blocks = list(a.block_table)
    bm.free(a)
    assert bm.num_free_blocks == 6
    assert all(bm.blocks[i].hash is not None for i in a_blocks)  # still cached

    # a later request with the same prefix picks the freed blocks up again
    b = seq_of([*range(8), 9], request_id="b")
    assert bm.can_allocate(b)
    bm.allocate(b)
    assert b.block_table[:2] == a_blocks and b.num_cached_tokens == 8
    assert bm.num_free_blocks == 3
    bm.free(b)

    # fresh blocks come from those never used first, then the least recently freed
    order = list(bm.free_ids)
    c = seq_of(list(range(50, 54)), request_id="c")
    bm.allocate(c)
    assert c.block_table == [order[0]]
    assert order[0] not in a_blocks  # unhashed blocks freed long ago go before the cached prefix
    bm.free(c)

    # fill the cache with other prompts: the cached prefix is evicted last-freed-last, then forgotten
    d = seq_of(list(range(60, 84)), request_id="d")  # 6 blocks: everything
    assert bm.can_allocate(d)
    bm.allocate(d)
    assert bm.num_free_blocks == 0
    assert all(bm.blocks[i].hash is None for i in a_blocks)
    bm.free(d)
    e = seq_of([*range(8), 9], request_id="e")
    bm.allocate(e)
    assert e.num_cached_tokens == 0


def test_block_manager_lru_order_of_freed_blocks() -> None:
    """Unhashed free blocks go first (lowest id first); then cached ones, least recently freed first."""
    bm = BlockManager(num_blocks=4, block_size=2)
    a, b = seq_of([1, 2, 3], request_id="a"), seq_of([4, 5, 6], request_id="b")  # 2 blocks each
    bm.allocate(a)
    bm.allocate(b)
    compute_all(bm, a)
    compute_all(bm, b)
    a_blocks, b_blocks = list(a.block_table), list(b.block_table)
    bm.free(b)
    bm.free(a)  # b freed first: its cached block is evicted before a's
    assert bm.free_ids == [*sorted([a_blocks[1], b_blocks[1]]), b_blocks[0], a_blocks[0]]
    c = seq_of([7, 8, 9], request_id="c")
    bm.allocate(c)  # takes the two unhashed tail blocks: both cached prefixes survive
    assert set(c.block_table) == {a_blocks[1], b_blocks[1]}
    d = seq_of([9, 9], request_id="d")
    bm.allocate(d)  # now the least recently freed cached block: b's
    assert d.block_table == [b_blocks[0]] and bm.blocks[b_blocks[0]].hash is None
    assert bm.blocks[a_blocks[0]].hash is not None
    bm.free(d)
    a_again = seq_of([1, 2, 3], request_id="a2")
    bm.allocate(a_again)
    assert a_again.num_cached_tokens == 2 and a_again.block_table[0] == a_blocks[0]


def test_block_manager_hash_collision_with_other_ids_is_not_a_hit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(block_manager_module, "chain_hash", lambda prev, ids: 42)
    bm = BlockManager(num_blocks=8, block_size=4)
    a = seq_of([1, 2, 3, 4, 5, 6, 7, 8, 9], request_id="a")
    bm.allocate(a)
    compute_all(bm, a)
    b = seq_of([9, 9, 9, 9, 5, 6, 7, 8, 9], request_id="b")  # every block hashes like a's
    bm.allocate(b)
    assert b.num_cached_tokens == 0 and not set(b.block_table) & set(a.block_table)
    c = seq_of([1, 2, 3, 4, 0, 0, 0, 0, 1], request_id="c")
    bm.allocate(c)
    assert c.num_cached_tokens == 4  # the genuine first block is still a hit


def test_block_manager_hash_collision_with_other_prefix_is_not_a_hit(monkeypatch: pytest.MonkeyPatch) -> None:
    """A block's own ids do not confirm a hit: the same ids after another prefix (other positions,
    other attention context) hold other keys/values."""
    monkeypatch.setattr(block_manager_module, "chain_hash", lambda prev, ids: 42)
    bm = BlockManager(num_blocks=8, block_size=4)
    a = seq_of([1, 2, 3, 4, 5, 6, 7, 8, 9], request_id="a")
    bm.allocate(a)
    compute_all(bm, a)
    b = seq_of([1, 2, 3, 4, 1, 2, 3, 4, 0], request_id="b")  # block 1 holds the ids of a's block 0
    bm.allocate(b)
    assert len(set(b.block_table)) == len(b.block_table), f"one block twice in {b.block_table}"
    assert b.num_cached_tokens == 4, "block 1 of b (positions 4..7) is not a's block 0 (positions 0..3)"


def test_block_manager_hash_collision_with_other_seed_is_not_a_hit(monkeypatch: pytest.MonkeyPatch) -> None:
    """The same ids under another hash seed (another NTK base) hold other keys: not a hit."""
    monkeypatch.setattr(block_manager_module, "chain_hash", lambda prev, ids: 42)
    bm = BlockManager(num_blocks=8, block_size=4)
    a = seq_of([1, 2, 3, 4, 5], hash_seed=1, request_id="a")
    bm.allocate(a)
    compute_all(bm, a)
    e = seq_of([1, 2, 3, 4, 0], hash_seed=2, request_id="e")
    bm.allocate(e)
    assert e.num_cached_tokens == 0, "another hash seed (NTK base) must not share a's blocks"


def test_engine_forced_hash_collision_keeps_parity(model: MiniCPMForCausalLM, monkeypatch: pytest.MonkeyPatch) -> None:
    """End to end with every chained hash equal: hits must still be confirmed, so logits stay exact."""
    monkeypatch.setattr(block_manager_module, "chain_hash", lambda prev, ids: 42)
    x, y = prompt_of(8, seed=1300), prompt_of(8, seed=1301)
    shared = prompt_of(64, seed=1302)
    groups = [
        # q's block 1 has the ids of p's block 0 (at other positions): q may reuse 8 tokens, not 16
        {"p": x + y + prompt_of(3, seed=1303), "q": x + x + prompt_of(3, seed=1304)},
        # 72 and 88 tokens: two NTK bases, nothing to share
        {"a": shared + prompt_of(8, seed=1305), "b": shared + prompt_of(24, seed=1306)},
    ]
    errors, cached = {}, {}
    for prompts in groups:
        engine = make_engine(model)
        seen = capture_logits(engine)
        for rid, prompt in prompts.items():  # one after the other: the second can hit what the first left
            engine.add_request(prompt, SamplingParams(max_new_tokens=2, ignore_eos=True), request_id=rid)
            seq = engine.requests[rid].seq
            run_to_end(engine)
            cached[rid] = seq.num_cached_tokens
        with torch.no_grad():
            for (rid, _), (ids, logits) in seen.items():
                plain = model(torch.tensor([ids]), rope_lengths=len(prompts[rid]))[0, -1]
                err = ((logits - plain).abs().max() / plain.abs().max()).item()
                errors[rid] = max(errors.get(rid, 0.0), err)
        check_idle(engine)
    assert all(err < 1e-5 for err in errors.values()), f"relative logit errors {errors}, cached tokens {cached}"
    assert cached == {"p": 0, "q": 8, "a": 0, "b": 0}


def test_cached_tokens_count_only_prompt_tokens(model: MiniCPMForCausalLM) -> None:
    """Completion.cached_tokens and stats()["cached_prompt_tokens"] count prompt tokens read from the
    prefix cache: never more than the prompt, even when a preempted request is recomputed."""
    engine = make_engine(model, blocks=12)  # two requests of 9 + 50 tokens need 14 blocks: one is preempted
    prompts = [prompt_of(9, seed=1400), prompt_of(9, seed=1401)]
    outs = engine.generate(prompts, SamplingParams(max_new_tokens=50, ignore_eos=True))
    stats = engine.stats()
    assert stats["preemptions"] > 0
    for prompt, out in zip(prompts, outs, strict=True):
        assert_matches_reference(model, prompt, out.token_ids, 50)
    assert [o.cached_tokens <= o.prompt_tokens for o in outs] == [True, True], [
        (o.prompt_tokens, o.cached_tokens) for o in outs
    ]
    assert stats["cached_prompt_tokens"] <= stats["prompt_tokens"], stats


# ---------------------------------------------------------------------------------------------- scheduler


def test_scheduler_puts_decodes_before_prefill_chunks() -> None:
    bm = BlockManager(num_blocks=40, block_size=4)
    sched = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=16)
    a = seq_of([1, 2, 3], request_id="a")
    sched.add(a)
    batch = sched.schedule()
    assert batch.seqs == [a] and batch.num_tokens == [3]
    a.num_computed_tokens += 3
    a.token_ids.append(9)  # sampled: a decodes from now on

    b = seq_of(list(range(50)), request_id="b")
    sched.add(b)
    fed = 0
    while fed < 50:
        batch = sched.schedule()
        assert batch.seqs[0] is a and batch.num_tokens[0] == 1, batch
        assert batch.seqs[1:] == [b] and batch.total_tokens <= 16
        assert not batch.decode_only
        n = batch.num_tokens[1]
        assert n == min(15, 50 - fed)
        a.num_computed_tokens += 1
        a.token_ids.append(9)
        b.num_computed_tokens += n
        fed += n
    batch = sched.schedule()
    assert batch.decode_only and batch.seqs == [a]


def test_scheduler_respects_max_num_seqs_and_budget() -> None:
    bm = BlockManager(num_blocks=100, block_size=4)
    sched = Scheduler(bm, max_num_seqs=2, max_num_batched_tokens=16)
    seqs = [seq_of([i] * 5, request_id=str(i)) for i in range(5)]
    for s in seqs:
        sched.add(s)
    batch = sched.schedule()
    assert batch.seqs == seqs[:2] and batch.num_tokens == [5, 5]
    assert len(sched.running) == 2 and list(sched.waiting) == seqs[2:]
    sched.finish(seqs[0], "length")
    assert seqs[0].status is SequenceStatus.FINISHED and not seqs[0].block_table
    batch = sched.schedule()  # seqs[1] continues its prefill, seqs[2] takes the freed place
    assert len(batch.seqs) <= 2 and batch.total_tokens <= 16 and seqs[2] in batch.seqs
    with pytest.raises(ValueError):
        Scheduler(bm, max_num_seqs=0, max_num_batched_tokens=16)


def test_engine_long_prefill_does_not_stall_decoding(model: MiniCPMForCausalLM) -> None:
    engine = make_engine(model)
    short, long = prompt_of(4, seed=1100), prompt_of(60, seed=1101)
    engine.add_request(short, SamplingParams(max_new_tokens=12, ignore_eos=True), request_id="short")
    first = engine.step()
    engine.add_request(long, SamplingParams(max_new_tokens=3, ignore_eos=True), request_id="long")
    long_seq = engine.requests["long"].seq
    tokens = {"short": list(first[0].token_ids), "long": []}
    prefill_steps = 0
    while long_seq.num_computed_tokens < 60:
        computed = long_seq.num_computed_tokens
        outs = {o.request_id: o for o in engine.step()}
        prefill_steps += 1
        assert "short" in outs and len(outs["short"].token_ids) == 1, "the decoding request got no token"
        assert long_seq.num_computed_tokens - computed <= 15  # 16 tokens a step, one went to the decode
        for rid, o in outs.items():
            tokens[rid] += o.token_ids
    assert prefill_steps == 4  # 60 tokens in chunks of 15
    results = run_to_end(engine)
    for rid, (more, _) in results.items():
        tokens[rid] += more
    assert_matches_reference(model, short, tokens["short"], 12)
    assert_matches_reference(model, long, tokens["long"], 3)
    check_idle(engine)


def test_engine_respects_max_num_seqs(model: MiniCPMForCausalLM) -> None:
    engine = make_engine(model, max_num_seqs=2)
    sizes = []
    run = engine.runner.run

    def wrapped(batch):
        sizes.append(len(batch.seqs))
        assert len(engine.scheduler.running) <= 2
        return run(batch)

    engine.runner.run = wrapped
    prompts = [prompt_of(n, seed=1200 + n) for n in (3, 9, 17, 6, 2)]
    outs = engine.generate(prompts, SamplingParams(max_new_tokens=5, ignore_eos=True))
    assert max(sizes) == 2
    for prompt, out in zip(prompts, outs, strict=True):
        assert_matches_reference(model, prompt, out.token_ids, 5)
    check_idle(engine)


def test_contiguous_allocation_keeps_growing_sequences_in_one_run() -> None:
    """On CPU the block manager places prompts where their answers have room and extends a sequence
    with the block after its last one, so interleaved growth does not scatter a sequence's blocks."""
    from minicpm.engine.attention import block_runs as _runs
    from minicpm.engine.block_manager import BlockManager

    for contiguous, expect_one_run in ((True, True), (False, False)):
        bm = BlockManager(num_blocks=64, block_size=4, enable_prefix_caching=False, contiguous=contiguous)
        seqs = [seq_of(list(range(1, 9)), request_id=str(i)) for i in range(4)]
        for seq in seqs:
            bm.allocate(seq)
            seq.num_computed_tokens = seq.num_tokens
        for _ in range(8):  # all four grow together, a token each per step
            for seq in seqs:
                bm.append_slots(seq, 1)
                seq.token_ids.append(5)
                seq.num_computed_tokens += 1
        runs = [len(_runs(seq.block_table, seq.num_tokens, 4)) for seq in seqs]
        assert all(r == 1 for r in runs) == expect_one_run, runs
        for seq in seqs:
            bm.free(seq)
        assert bm.num_free_blocks == 64 and sorted(bm.free_ids) == list(range(64))


def test_bfloat16_greedy_follows_the_full_recompute_token_by_token(model: MiniCPMForCausalLM) -> None:
    """bfloat16, mixed steps (chunks beside decodes), preemption and prefix-cache hits: each token
    the engine picks is the full recompute's argmax given the engine's own prefix (teacher forced),
    or within bfloat16 rounding of it (a near tie); most are exactly it."""
    bf16 = random_model(model.config, seed=1).to(torch.bfloat16)
    engine = make_engine(bf16, blocks=10)
    shared = prompt_of(24, seed=900)
    prompts = [shared + prompt_of(n, seed=901 + n) for n in (9, 30, 3)] + [prompt_of(n, seed=950 + n) for n in (50, 17)]
    for i, prompt in enumerate(prompts):
        engine.add_request(prompt, SamplingParams(max_new_tokens=14, ignore_eos=True), request_id=f"r{i}")
    results = run_to_end(engine)
    assert engine.stats()["preemptions"] > 0 and engine.scheduler.num_cached_tokens > 0
    exact = total = 0
    with torch.no_grad():
        for i, prompt in enumerate(prompts):
            tokens, reason = results[f"r{i}"]
            assert reason == "length" and len(tokens) == 14
            for j, token in enumerate(tokens):
                logits = bf16(torch.tensor([prompt + tokens[:j]]), rope_lengths=len(prompt))[0, -1]
                best = int(logits.argmax())
                gap = float(logits[best] - logits[token])
                assert gap <= 2e-2 * (1 + float(logits.abs().max())), f"r{i} token {j}: {token} vs {best}, gap {gap}"
                exact += token == best
                total += 1
    assert exact >= 0.9 * total
    check_idle(engine)


def test_a_second_engine_over_a_model_changes_nothing_in_it_and_both_step_at_once() -> None:
    """The first engine prepares the model; a second one over it re-points nothing (the layers keep
    the model's one StepRows) and, each stepping on its own thread, both give the tokens of one
    engine alone (the row split is per thread)."""
    import threading

    from minicpm.engine.layers import RowSplitLinear

    model = random_model(tiny_config(num_hidden_layers=2, max_length=256), seed=21)
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 97, (n,), generator=gen).tolist() for n in (30, 70, 9)]
    params = SamplingParams(max_new_tokens=10, ignore_eos=True)
    config = EngineConfig(block_size=8, max_num_seqs=2, max_num_batched_tokens=16)
    first = LLMEngine(model, None, config)
    layers = {name: m for name, m in model.named_modules() if isinstance(m, RowSplitLinear)}
    assert layers and all(m.rows is model.step_rows for m in layers.values())
    expected = [c.token_ids for c in first.generate(prompts, params)]
    second = LLMEngine(model, None, config)
    after = {name: m for name, m in model.named_modules() if isinstance(m, RowSplitLinear)}
    assert after.keys() == layers.keys() and all(
        after[n] is layers[n] and m.rows is model.step_rows for n, m in after.items()
    )
    model.step_rows.split = 3  # a split set on this thread is not another thread's
    seen = []
    other = threading.Thread(target=lambda: seen.append(model.step_rows.split))
    other.start()
    other.join()
    model.step_rows.split = 0
    assert seen == [0]
    results: dict[int, list] = {}

    def run(i: int, engine: LLMEngine) -> None:
        results[i] = [[c.token_ids for c in engine.generate(prompts, params)] for _ in range(3)]

    threads = [threading.Thread(target=run, args=(i, e)) for i, e in enumerate((first, second))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results[0] == results[1] == [expected] * 3
