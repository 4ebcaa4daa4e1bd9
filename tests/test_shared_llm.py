"""One ``LLM`` shared by threads, cancelled streams, and text that is not valid Unicode."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from minicpm import LLM, SamplingParams
from minicpm.engine.async_engine import BackgroundEngine, EngineError
from minicpm.tokenizer import clean_text

QUESTIONS = [
    "What is the capital of France?",
    "Name a primary colour.",
    "How many legs does a spider have?",
    "What is 2 + 2?",
    "Say hello in Spanish.",
    "What is the opposite of hot?",
    "Which planet is closest to the sun?",
    "What do bees make?",
]
GREEDY = SamplingParams(max_new_tokens=24, temperature=0)


@pytest.fixture(scope="module")
def llm(default_model_dir: Path) -> LLM:
    return LLM.from_pretrained(default_model_dir)


def _all_blocks_free(llm: LLM) -> bool:
    bm = llm.engine.block_manager
    return not llm.engine.requests and bm.num_free_blocks == bm.num_blocks


def _run_threads(target, n: int) -> list:
    results: list = [None] * n
    barrier = threading.Barrier(n)

    def worker(i: int) -> None:
        barrier.wait()
        try:
            results[i] = target(i)
        except BaseException as exc:  # reported to the test, not lost in the thread
            results[i] = exc

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    return results


def test_eight_threads_on_one_llm_get_their_solo_answers(llm: LLM) -> None:
    solo = [llm.chat(q, temperature=0, max_new_tokens=24) for q in QUESTIONS]
    solo_generate = [llm.generate(q, GREEDY).token_ids for q in QUESTIONS]

    def call(i: int):
        if i % 3 == 0:  # streaming chat: the per-thread last_history must be this thread's
            deltas = list(llm.chat_stream(QUESTIONS[i], params=GREEDY))
            return "".join(deltas), llm.last_history
        if i % 3 == 1:
            return llm.chat(QUESTIONS[i], temperature=0, max_new_tokens=24)
        return llm.generate(QUESTIONS[i], GREEDY).token_ids

    for _ in range(2):
        results = _run_threads(call, len(QUESTIONS))
        for i, got in enumerate(results):
            assert not isinstance(got, BaseException), got
            expected = solo_generate[i] if i % 3 == 2 else solo[i]
            assert got == expected, f"thread {i}"
        assert llm.engine.stats()["steps"] > 0 and _all_blocks_free(llm)


def test_a_failing_step_fails_every_caller_and_the_llm_recovers(llm: LLM, monkeypatch) -> None:
    real_step = llm.engine.step
    calls = {"n": 0}

    def flaky_step():
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("injected device error")
        return real_step()

    monkeypatch.setattr(llm.engine, "step", flaky_step)
    results = _run_threads(lambda i: llm.generate(QUESTIONS[i], GREEDY).token_ids, 4)
    failed = [r for r in results if isinstance(r, EngineError)]
    assert failed and all(isinstance(r, (EngineError, list)) for r in results)
    assert "injected device error" in str(failed[0])
    assert _all_blocks_free(llm)
    monkeypatch.setattr(llm.engine, "step", real_step)
    assert llm.chat(QUESTIONS[0], temperature=0, max_new_tokens=24)[0].startswith("The capital of France is Paris")


def test_cancel_ends_a_stream_at_a_step_boundary_keeping_its_text(llm: LLM) -> None:
    """Cancelled after its third delta, the answer ends within a few steps, even though its outputs
    never pause long enough for a read to time out (steps of a few ms)."""
    cancel = threading.Event()
    deltas = []
    params = SamplingParams(max_new_tokens=400, temperature=0, ignore_eos=True)
    for delta in llm.chat_stream("Write a long story about a dragon.", params=params, cancel=cancel):
        deltas.append(delta)
        if len(deltas) == 3:
            cancel.set()
    done = llm.last_completion
    assert done.finish_reason == "abort" and done.text == "".join(deltas) and 3 <= len(done.token_ids) < 12
    assert llm.last_history[-1] == {"role": "assistant", "content": done.text}
    assert _all_blocks_free(llm)


def test_text_that_is_not_unicode_is_read_as_replacement_characters(llm: LLM) -> None:
    raw = b"caf\xe9 \xff\xfe and \xc3\xa9"  # Latin-1 bytes and stray bytes among valid UTF-8
    escaped = raw.decode("utf-8", "surrogateescape")  # what Python makes of such a command-line argument
    replaced = raw.decode("utf-8", "replace")
    assert clean_text(escaped) == replaced and clean_text("a\ud800b") == "a\ufffdb"
    tok = llm.tokenizer
    assert tok.encode(escaped) == tok.encode(replaced)
    assert llm.generate(escaped, GREEDY).token_ids == llm.generate(replaced, GREEDY).token_ids
    reply, history = llm.chat("lone \ud83d surrogate", temperature=0, max_new_tokens=8)
    assert reply and history[0]["content"] == "lone \ud83d surrogate"
    with llm.client() as engine:
        outputs = list(engine.add_request(escaped, GREEDY))
    assert outputs[-1].finished and outputs[-1].finish_reason in ("stop", "length")


def test_a_client_of_the_llm_shares_its_engine_router_and_closing_it_leaves_the_llm_working(llm: LLM) -> None:
    """A server over an LLM (llm.client(), or BackgroundEngine(llm.engine)) is one more client of
    the LLM's router: one engine thread, one KV cache; its close() ends only its own requests."""
    before = [t.name for t in threading.enumerate()].count("minicpm-engine")
    client = llm.client()
    other = BackgroundEngine(llm.engine)
    assert client._router is other._router is llm._client._router
    assert [t.name for t in threading.enumerate()].count("minicpm-engine") == before >= 1
    long = SamplingParams(max_new_tokens=200, ignore_eos=True)
    outputs = iter(other.add_request(QUESTIONS[0], long))
    next(outputs)  # running
    assert client.limits().max_model_len == llm.engine.max_model_len
    other.close()  # aborts its own request, waiting until it is
    assert list(outputs)[-1].finish_reason == "abort"
    assert not other.alive and client.alive
    assert llm.generate(QUESTIONS[3], GREEDY).token_ids  # the LLM and its router go on
    client.close()
    assert llm.chat(QUESTIONS[0], temperature=0, max_new_tokens=24)[0].startswith("The capital of France is Paris")
    assert _all_blocks_free(llm)


def test_a_stream_closed_inside_a_step_does_not_deadlock(llm: LLM, monkeypatch) -> None:
    """The garbage collector may finalize a dropped stream while its own thread is inside a step
    (holding the lock): the request is aborted at the next step instead of deadlocking."""
    dropped = llm.stream("Write a long story.", SamplingParams(max_new_tokens=50, ignore_eos=True))
    next(iter(dropped))
    real_step = llm.engine.step
    fired = []

    def step_with_a_finalizer():
        if not fired:
            fired.append(True)
            dropped.close()  # what the GC does to an unreachable generator
        return real_step()

    monkeypatch.setattr(llm.engine, "step", step_with_a_finalizer)
    eight = SamplingParams(max_new_tokens=8, ignore_eos=True)
    result = _run_threads(lambda i: llm.generate(QUESTIONS[0], eight).token_ids, 1)[0]
    assert fired and isinstance(result, list) and len(result) == 8, result
    assert _all_blocks_free(llm)
