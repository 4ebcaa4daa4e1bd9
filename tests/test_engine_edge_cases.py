"""Edge cases of the engine found in review: interleaved LLM streams and batches, step errors and
close() racing submissions in the background engine, near-zero temperatures, KV writes never landing
in shared or cached blocks, re-admission after preemption, decode attention over mixed block
layouts with garbage in unused slots, text deltas with stop strings, batch-independent sampling."""

from __future__ import annotations

import math
import threading
from collections.abc import Callable

import pytest
import torch
from helpers import random_model, tiny_config

from minicpm import SamplingParams
from minicpm.engine import EngineConfig, LLMEngine
from minicpm.engine import async_engine as async_engine_module
from minicpm.engine.async_engine import BackgroundEngine, EngineError, RequestStream
from minicpm.engine.block_manager import BlockManager
from minicpm.engine.sampler import Sampled, Sampler
from minicpm.engine.scheduler import ScheduledBatch
from minicpm.engine.sequence import Sequence
from minicpm.llm import LLM

BLOCK = 4
LETTERS = "abcdefghijklmnopqrstuvwxyz"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    return random_model(tiny_config(num_hidden_layers=1, num_key_value_heads=2, max_length=128), seed=5)


def engine_config(model, blocks: int = 40, **overrides) -> EngineConfig:
    fields = dict(
        block_size=BLOCK,
        max_num_seqs=4,
        max_num_batched_tokens=16,
        kv_cache_memory=blocks * BLOCK * model.config.kv_bytes_per_token(model.dtype.itemsize),
    )
    fields.update(overrides)
    return EngineConfig(**fields)


def make_engine(model, blocks: int = 40, tokenizer=None, **overrides) -> LLMEngine:
    return LLMEngine(model, tokenizer, engine_config(model, blocks, **overrides))


class CharTokenizer:
    """One lowercase letter per id: enough of a tokenizer for LLM and the engine's text path."""

    eos_token_id = None
    special_tokens: dict[str, str] = {}  # noqa: RUF012

    def token_to_id(self, token: str) -> int | None:
        return None

    def resolve_chat_template(self, chat_format: str = "auto") -> str:
        return ""

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [LETTERS.index(c) for c in text]

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return "".join(LETTERS[i % 26] for i in ids)


def reference_greedy(model, prompt: list[int], n: int, penalty: float = 1.0) -> list[int]:
    """Full recompute each token; Hugging Face's repetition penalty written out."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([ids]), rope_lengths=len(prompt))[0, -1]
            seen = torch.tensor(sorted(set(ids)))
            scores = logits[seen]
            logits[seen] = torch.where(scores < 0, scores * penalty, scores / penalty)
            ids.append(int(logits.argmax()))
    return ids[len(prompt) :]


def read_in_thread(stream: RequestStream, timeout: float) -> tuple[bool, list]:
    """Iterate ``stream`` in a thread; (ended within timeout, outputs or the exception raised).
    A stream still blocked is unblocked with an error so no thread is left behind."""
    got: list = []

    def read() -> None:
        try:
            got.extend(stream)
        except Exception as e:
            got.append(e)

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    thread.join(timeout)
    ended = not thread.is_alive()
    if not ended:
        stream.put(RuntimeError("unblocked by the test"))
        thread.join(5)
    return ended, got


def guard_idle_steps(engine: LLMEngine, limit: int = 200) -> None:
    """Make a caller that keeps stepping an idle engine (an endless loop) fail instead of hang."""
    step = engine.step
    idle = {"n": 0}

    def guarded():
        if not engine.has_unfinished_requests():
            idle["n"] += 1
            if idle["n"] > limit:
                raise AssertionError("stepping an idle engine forever: the caller waits for an output that was dropped")
        return step()

    engine.step = guarded


# ---------------------------------------------------------------------------------------------- found in review


def test_llm_generate_of_a_list_does_not_strand_an_open_stream(model) -> None:
    """An LLM.stream left open while LLM.generate([...]) runs a batch on the same engine still gets
    every delta and its end (outputs are kept per request, never dropped)."""
    llm = LLM(model, CharTokenizer(), engine_config=engine_config(model))
    params = SamplingParams(max_new_tokens=6, ignore_eos=True)
    expected = llm.generate([1, 2, 3], params).text
    guard_idle_steps(llm.engine)
    stream = llm.stream([1, 2, 3], params)
    first = next(stream)
    others = llm.generate([[4, 5, 6], [7, 8]], SamplingParams(max_new_tokens=10, ignore_eos=True))
    assert [len(o.token_ids) for o in others] == [10, 10]
    assert first + "".join(stream) == expected


def test_a_request_that_fails_while_its_token_is_finished_ends_alone(model) -> None:
    """A step is atomic per request: a fault injected while finishing one request's token ends that
    request with an error; the others of the same steps finish with exactly their tokens, and
    every block is free at the end."""
    prompts = [[1, 2, 3, 4, 5], [6, 7, 8], [9, 10, 11, 12]]
    params = SamplingParams(max_new_tokens=6, ignore_eos=True)
    expected = make_engine(model).generate(prompts, params)
    engine = make_engine(model)
    on_token = engine._on_token

    def failing(request, sampled):
        if request.seq.token_ids[:3] == [6, 7, 8] and len(request.seq.output_ids) == 2:
            raise RuntimeError("detokenizer failed")
        return on_token(request, sampled)

    engine._on_token = failing
    got = engine.generate(prompts, params)
    assert got[1].finish_reason == "error" and "detokenizer failed" in got[1].error
    assert got[1].token_ids == expected[1].token_ids[:2]
    for i in (0, 2):
        assert got[i].token_ids == expected[i].token_ids and got[i].finish_reason == "length"
    assert not engine.requests and not engine.scheduler.running
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    assert engine.generate([[3, 2, 1]], params)[0].finish_reason == "length"  # it goes on serving


def test_background_a_failed_request_gets_the_error_and_the_others_finish(model) -> None:
    engine = make_engine(model)
    on_token = engine._on_token

    def failing(request, token):
        if request.request_id == "y":
            raise RuntimeError("detokenizer failed")
        return on_token(request, token)

    engine._on_token = failing
    with BackgroundEngine(engine) as bg:
        x = bg.add_request([1, 2, 3], SamplingParams(max_new_tokens=4, ignore_eos=True), request_id="x")
        y = bg.add_request([4, 5, 6], SamplingParams(max_new_tokens=5, ignore_eos=True), request_id="y")
        y_ended, y_got = read_in_thread(y, timeout=5)
        assert y_ended and isinstance(y_got[-1], EngineError) and "detokenizer failed" in str(y_got[-1])
        x_ended, x_got = read_in_thread(x, timeout=5)
        assert x_ended and x_got[-1].finish_reason == "length" and sum(len(o.token_ids) for o in x_got) == 4
        assert not bg._router._streams


def test_background_a_stream_dropped_before_it_is_read_aborts_its_request(model) -> None:
    import gc
    import time

    engine = make_engine(model)
    with BackgroundEngine(engine) as bg:
        stream = bg.add_request([1, 2, 3], SamplingParams(max_new_tokens=10_000, ignore_eos=True))
        del stream
        gc.collect()
        deadline = time.monotonic() + 5
        while (engine.requests or bg.stats()["running"]) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not engine.requests and not bg._router._streams
        assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_background_if_the_engine_thread_dies_every_stream_gets_the_error(model) -> None:
    engine = make_engine(model)
    steps = {"n": 0}
    step = engine.step
    all_added = threading.Event()

    def dying_step():
        all_added.wait(10)  # on a busy machine the thread could otherwise die before the third request
        steps["n"] += 1
        if steps["n"] == 3:
            raise SystemExit("a fault no step handler catches")
        return step()

    engine.step = dying_step
    bg = BackgroundEngine(engine)
    try:
        streams = [bg.add_request([i + 1, 2, 3], SamplingParams(max_new_tokens=50, ignore_eos=True)) for i in range(3)]
        all_added.set()
        for stream in streams:
            ended, got = read_in_thread(stream, timeout=5)
            assert ended and isinstance(got[-1], EngineError) and "died" in str(got[-1])
        with pytest.raises(EngineError, match="died"):
            bg.add_request([1, 2], SamplingParams(max_new_tokens=2))
        assert not bg.alive
    finally:
        bg.close()


def test_background_add_request_racing_close_is_refused_or_answered(model, monkeypatch) -> None:
    """A close() from another thread while add_request runs either refuses the request or lets its
    stream end: never a stream that waits forever."""
    bg = BackgroundEngine(make_engine(model))

    class CloseMeanwhile(RequestStream):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            closer = threading.Thread(target=bg.close, daemon=True)  # another thread shuts down
            closer.start()
            closer.join(0.5)  # (a fix that makes close() wait for the submit lets this time out)

    monkeypatch.setattr(async_engine_module, "RequestStream", CloseMeanwhile)
    try:
        stream = bg.add_request([1, 2, 3], SamplingParams(max_new_tokens=3, ignore_eos=True))
    except RuntimeError:
        return  # refused: fine
    ended, _ = read_in_thread(stream, timeout=1.5)
    assert ended, "add_request returned a stream, the engine closed, and the stream never ends"


def test_a_near_zero_temperature_does_not_fail_the_whole_batch(model) -> None:
    """A temperature like 1e-40 (logits / T would overflow and fail the whole batch) acts as its
    limit, greedy."""
    greedy = SamplingParams(max_new_tokens=4, ignore_eos=True)
    try:
        cold = SamplingParams(max_new_tokens=4, temperature=1e-40, seed=0, ignore_eos=True)
    except ValueError:
        return  # refused up front: fine
    engine = make_engine(model)
    a, b = [1, 2, 3], [4, 5, 6, 7]
    outs = engine.generate([a, b], [greedy, cold])
    assert outs[0].token_ids == reference_greedy(model, a, 4)
    assert outs[1].token_ids == reference_greedy(model, b, 4)  # the limit T -> 0 is greedy


# ---------------------------------------------------------------------------------------------- checked in review


def test_no_kv_write_into_a_shared_or_hashed_block(model) -> None:
    """Prefix hits (including an exact-multiple prompt, an identical prompt and a prompt that is an
    earlier prompt plus its answer), chunked prefill and preemption: every slot a forward writes is
    in a block held by one sequence and not registered in the prefix cache; greedy parity holds."""
    engine = make_engine(model, blocks=10, max_num_seqs=3, max_num_batched_tokens=6)
    bm, run = engine.block_manager, engine.runner.run
    writes = {"n": 0}

    def checked(batch: ScheduledBatch):
        for seq, n in zip(batch.seqs, batch.num_tokens, strict=True):
            for p in range(seq.num_computed_tokens, seq.num_computed_tokens + n):
                block = bm.blocks[seq.block_table[p // BLOCK]]
                assert block.ref_count == 1 and block.hash is None, (seq, p, block)
                writes["n"] += 1
        return run(batch)

    engine.runner.run = checked
    base = [(3 * i + 1) % 97 for i in range(12)]
    first = {"a": base[:8], "b": base[:8], "c": base[:10]}  # 8 = two full blocks
    params = SamplingParams(max_new_tokens=10, ignore_eos=True)
    outs = dict(zip(first, engine.generate(list(first.values()), params), strict=True))
    assert engine.stats()["preemptions"] > 0
    for rid, prompt in first.items():
        assert outs[rid].token_ids == reference_greedy(model, prompt, 10), rid
    follow = first["a"] + outs["a"].token_ids  # 18 tokens: hits cover generated tokens
    (out,) = engine.generate([follow], SamplingParams(max_new_tokens=3, ignore_eos=True))
    assert out.cached_tokens == 16 and out.token_ids == reference_greedy(model, follow, 3)
    assert writes["n"] > 0 and bm.num_free_blocks == bm.num_blocks


def test_readmission_after_preemption_hits_generated_tokens_but_leaves_one_to_compute() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    params = SamplingParams()
    for total in (11, 13):  # computed tokens end mid-block / exactly on a block boundary
        seq = Sequence("s", list(range(10, 16)), params, frozenset(), 16, 6, hash_seed=("seed", total))
        bm.allocate(seq)
        assert seq.num_cached_tokens == 0
        seq.num_computed_tokens = 6  # prefill
        bm.commit(seq)
        while True:  # decode: a sampled token is appended, and computed on the next step
            seq.token_ids.append(50 + seq.num_tokens)
            if seq.num_tokens == total:
                break
            bm.append_slots(seq, 1)
            seq.num_computed_tokens += 1
            bm.commit(seq)
        assert seq.num_computed_tokens == total - 1
        held = list(seq.block_table)
        bm.free(seq)  # preemption
        seq.num_preemptions += 1
        bm.allocate(seq)
        hits = (total - 1) // BLOCK
        assert seq.num_computed_tokens == hits * BLOCK and seq.num_uncomputed >= 1
        assert seq.block_table[:hits] == held[:hits] and seq.num_cached_tokens == 0
        assert all(bm.blocks[b].ref_count == 1 and bm.blocks[b].hash is None for b in seq.block_table[hits:])
        bm.free(seq)
    assert bm.num_free_blocks == bm.num_blocks


@pytest.mark.parametrize(
    "layout",
    [
        {"a": ([2, 3, 4], 11), "b": ([7], 3), "c": ([9, 0, 5, 1], 16)},  # lengths differ: masked gather
        {"a": ([2, 3], 8), "b": ([6, 1], 8)},  # same lengths, one run and one scattered table
        {"a": ([5, 2, 8], 9)},  # one sequence, scattered blocks
    ],
)
def test_decode_attention_over_mixed_block_layouts_ignores_garbage(model, layout) -> None:
    """Decode attention straight from ModelRunner._prepare and PagedKVCache.attend against a
    softmax written out, with every slot that holds no key of the sequence set to NaN."""
    engine = make_engine(model, blocks=12)
    runner, cache, config = engine.runner, engine.runner.cache, model.config
    H, KV, D = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    gen = torch.Generator().manual_seed(0)
    cache.k.fill_(float("nan"))
    cache.v.fill_(float("nan"))
    seqs = []
    for rid, (table, length) in layout.items():
        seq = Sequence(rid, list(range(length)), SamplingParams(), frozenset(), 4, length, 0)
        seq.block_table, seq.num_computed_tokens = list(table), length - 1
        for p in range(length - 1):
            slot = (table[p // BLOCK], p % BLOCK)
            cache.k[0][slot] = torch.randn(KV, D, generator=gen)
            cache.v[0][slot] = torch.randn(KV, D, generator=gen)
        seqs.append(seq)
    batch = ScheduledBatch(seqs, [1] * len(seqs))
    md = runner._prepare(batch)[3]
    assert md.decode_only
    q = torch.randn(1, H, len(seqs), D, generator=gen)
    k = torch.randn(1, KV, len(seqs), D, generator=gen)
    v = torch.randn(1, KV, len(seqs), D, generator=gen)
    cache.metadata = md
    try:
        out = cache.attend(0, q, k, v)
    finally:
        cache.metadata = None
    for i, seq in enumerate(seqs):
        slots = [(seq.block_table[p // BLOCK], p % BLOCK) for p in range(seq.num_tokens)]
        keys = torch.stack([cache.k[0][s] for s in slots])  # (length, KV, D)
        values = torch.stack([cache.v[0][s] for s in slots])
        for h in range(H):
            kv = h // (H // KV)
            weights = torch.softmax(keys[:, kv] @ q[0, h, i] / math.sqrt(D), dim=0)
            torch.testing.assert_close(out[0, h, i], weights @ values[:, kv], rtol=1e-5, atol=1e-5)


class ScriptedSampler(Sampler):
    """Tokens from a script instead of the logits."""

    def __init__(self, script: dict[str, list[int]]) -> None:
        super().__init__(26, torch.device("cpu"))
        self.script = script

    def sample(self, logits, seqs):
        return [Sampled(self.script[s.request_id].pop(0)) for s in seqs]


def scripted(engine: LLMEngine, script: dict[str, list[int]]) -> None:
    engine.runner.sampler = ScriptedSampler(script)


CASES = [
    # (tokens as letters, stop strings, stop ids, expected text, reason)
    ("abcd", ("bc",), (), "a", "stop"),  # a stop string spanning two tokens
    ("abab", ("bx",), (), "abab", "length"),  # a held-back "b" released at the end
    ("xab", ("b",), (), "xa", "stop"),
    ("abc", ("a",), (), "", "stop"),  # a stop string in the first token
    ("kab", (), (LETTERS.index("k"),), "", "stop"),  # a stop id as the first token
    ("abk", ("bkz",), (LETTERS.index("k"),), "ab", "stop"),  # held-back "b" released at a stop id
    ("abcab", ("cb", "bca"), (), "a", "stop"),  # the earliest of two overlapping stops
]


@pytest.mark.parametrize(("letters", "stop", "stop_ids", "text", "reason"), CASES)
def test_text_deltas_concatenate_to_the_final_text(model, letters, stop, stop_ids, text, reason) -> None:
    engine = make_engine(model, tokenizer=CharTokenizer())
    scripted(engine, {"r": [LETTERS.index(c) for c in letters]})
    params = SamplingParams(max_new_tokens=len(letters), stop=stop, stop_token_ids=stop_ids, ignore_eos=True)
    engine.add_request([1, 2], params, request_id="r")
    outs = []
    while engine.has_unfinished_requests():
        outs += engine.step()
    assert "".join(o.text for o in outs) == text
    assert outs[-1].finished and outs[-1].finish_reason == reason
    assert all(not o.finished for o in outs[:-1])
    for o in outs:  # nothing is emitted that could still turn into a stop string
        assert not any(s in "".join(x.text for x in outs[: outs.index(o) + 1]) for s in stop)


def test_sampled_and_penalized_rows_do_not_depend_on_their_batch(model) -> None:
    prompts = [[1, 2, 3], [9, 8, 7, 6, 5], [4, 4, 4, 4, 4, 4, 4, 4, 4], [11, 12]]
    params = [
        SamplingParams(max_new_tokens=6, ignore_eos=True),
        SamplingParams(max_new_tokens=6, temperature=1.0, top_k=5, seed=3, ignore_eos=True),
        SamplingParams(max_new_tokens=6, repetition_penalty=1.5, ignore_eos=True),
        SamplingParams(max_new_tokens=6, temperature=0.7, top_p=0.5, repetition_penalty=1.2, seed=4, ignore_eos=True),
    ]
    mixed = make_engine(model).generate(prompts, params)
    for prompt, p, out in zip(prompts, params, mixed, strict=True):
        (alone,) = make_engine(model).generate([prompt], p)
        assert out.token_ids == alone.token_ids
    assert mixed[0].token_ids == reference_greedy(model, prompts[0], 6)
    assert mixed[2].token_ids == reference_greedy(model, prompts[2], 6, penalty=1.5)


def wait_for(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    done = threading.Event()
    for _ in range(int(timeout / 0.01)):
        if condition():
            return
        done.wait(0.01)
    raise AssertionError("timed out")


def test_background_close_aborts_waiting_requests_and_unknown_aborts_are_harmless(model) -> None:
    engine = make_engine(model, max_num_seqs=1)
    run = engine.runner.run
    slow = threading.Event()

    def slowly(batch):
        slow.wait(0.005)  # so that nothing finishes before close()
        return run(batch)

    engine.runner.run = slowly
    bg = BackgroundEngine(engine)
    bg.abort("no-such-request")
    short = list(bg.add_request([1, 2], SamplingParams(max_new_tokens=2, ignore_eos=True)))
    assert short[-1].finish_reason == "length"
    bg.abort(short[-1].request_id)  # after its finish: nothing happens
    long = SamplingParams(max_new_tokens=100, ignore_eos=True)
    streams = [bg.add_request([i + 1, i + 2, i + 3], long) for i in range(3)]
    next(iter(streams[0]))
    wait_for(lambda: len(engine.scheduler.waiting) == 2)
    bg.close()
    for stream in streams:
        ended, outs = read_in_thread(stream, timeout=5)
        assert ended and outs[-1].finished and outs[-1].finish_reason == "abort"
    assert not engine.requests and engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_engine_config_means_the_same_on_every_device() -> None:
    """Block size, batch size and step budget default to "per device" and are resolved by the
    engine (CPU blocks are larger: a CPU reads a block placed anywhere slower the smaller it is);
    what a user sets is kept, and bad values name the field."""
    budget_only = EngineConfig(kv_cache_memory=2**30)
    assert (budget_only.block_size, budget_only.max_num_seqs, budget_only.max_num_batched_tokens) == (None,) * 3
    gpu, cpu = budget_only.resolved("cuda:0"), budget_only.resolved(torch.device("cpu"))
    assert (gpu.block_size, gpu.max_num_seqs, gpu.max_num_batched_tokens, gpu.kv_cache_memory) == (64, 64, 8192, 2**30)
    assert (cpu.block_size, cpu.max_num_seqs, cpu.max_num_batched_tokens) == (128, 16, 512)
    assert EngineConfig(block_size=16).resolved("cpu").block_size == 16
    with pytest.raises(ValueError, match="'block_size' must be a power of two or None"):
        EngineConfig(block_size=48)
    assert EngineConfig(max_num_seqs=600).resolved("cpu").max_num_batched_tokens == 600
    assert EngineConfig(max_num_batched_tokens=100).resolved("cuda").max_num_seqs == 64
    assert EngineConfig.for_device("cuda", max_num_seqs=8) == EngineConfig(max_num_seqs=8).resolved("cuda")
    for bad in ({"max_num_seqs": 0}, {"max_num_batched_tokens": 2.5}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            EngineConfig(**bad)
    with pytest.raises(ValueError, match="at least 'max_num_seqs'"):
        EngineConfig(max_num_seqs=32, max_num_batched_tokens=16)


def test_an_engine_resolves_an_unset_config_for_its_device() -> None:
    model = random_model(tiny_config(num_hidden_layers=1))
    engine = LLMEngine(model, None, EngineConfig(block_size=8, kv_cache_memory=1 << 20))
    assert (engine.config.max_num_seqs, engine.config.max_num_batched_tokens) == (16, 512)
    assert engine.scheduler.max_num_seqs == 16
