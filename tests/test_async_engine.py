"""The engine in its own thread (BackgroundEngine): many requests from threads and from asyncio
give the same greedy tokens as the engine alone; abort and client disconnects free blocks; bad
input fails in the caller; a failing step fails the requests in flight and the engine goes on."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
from helpers import random_model, tiny_config

from minicpm import SamplingParams
from minicpm.engine import EngineConfig, LLMEngine
from minicpm.engine.async_engine import BackgroundEngine, EngineError

PROMPTS = [[(7 * i + j) % 97 for j in range(n)] for i, n in enumerate((3, 9, 17, 30, 41, 5))]
PARAMS = SamplingParams(max_new_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def expected() -> list[list[int]]:
    engine = make_engine()
    return [c.token_ids for c in engine.generate(PROMPTS, PARAMS)]


def make_engine() -> LLMEngine:
    model = random_model(tiny_config(num_hidden_layers=2, max_length=128), seed=3)
    return LLMEngine(model, None, EngineConfig(block_size=8, max_num_seqs=4, max_num_batched_tokens=16))


def wait_idle(bg: BackgroundEngine, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while bg.engine.requests or bg.engine.scheduler.has_unfinished():
        assert time.monotonic() < deadline, "the engine did not go idle"
        time.sleep(0.01)


def assert_all_blocks_free(bg: BackgroundEngine) -> None:
    wait_idle(bg)
    bm = bg.engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks


def test_threads_get_the_same_tokens_as_the_engine_alone(expected: list[list[int]]) -> None:
    results: dict[int, list[int]] = {}
    with BackgroundEngine(make_engine()) as bg:

        def client(i: int) -> None:
            tokens: list[int] = []
            for out in bg.add_request(PROMPTS[i], PARAMS):
                tokens += out.token_ids
                if out.finished:
                    assert out.finish_reason == "length"
            results[i] = tokens

        threads = [threading.Thread(target=client, args=(i,)) for i in range(len(PROMPTS))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert [results[i] for i in range(len(PROMPTS))] == expected
        assert_all_blocks_free(bg)


def test_asyncio_clients_and_a_disconnect(expected: list[list[int]]) -> None:
    async def run(bg: BackgroundEngine) -> tuple[list[list[int]], list[int]]:
        async def client(i: int) -> list[int]:
            tokens: list[int] = []
            async for out in bg.generate(PROMPTS[i], PARAMS):
                tokens += out.token_ids
            return tokens

        async def leaves_early() -> list[int]:
            tokens: list[int] = []
            stream = bg.generate(PROMPTS[3], SamplingParams(max_new_tokens=100, ignore_eos=True))
            async for out in stream:
                tokens += out.token_ids
                if len(tokens) >= 3:
                    break
            await stream.aclose()  # what a server does when the client goes away
            return tokens

        *full, early = await asyncio.gather(*(client(i) for i in range(len(PROMPTS))), leaves_early())
        return full, early

    with BackgroundEngine(make_engine()) as bg:
        full, early = asyncio.run(run(bg))
        assert full == expected
        assert early == expected[3][: len(early)] and len(early) >= 3
        assert_all_blocks_free(bg)


def test_abort_ends_the_stream_and_frees_blocks() -> None:
    with BackgroundEngine(make_engine()) as bg:
        stream = bg.add_request(PROMPTS[4], SamplingParams(max_new_tokens=100, ignore_eos=True), request_id="r1")
        outs = []
        for out in stream:
            outs.append(out)
            if len(outs) == 2:
                bg.abort("r1")
        assert outs[-1].finished and outs[-1].finish_reason == "abort"
        assert sum(len(o.token_ids) for o in outs) < 100
        assert_all_blocks_free(bg)


def test_a_thread_that_stops_reading_aborts_its_request() -> None:
    with BackgroundEngine(make_engine()) as bg:
        for out in bg.add_request(PROMPTS[4], SamplingParams(max_new_tokens=100, ignore_eos=True)):
            if out.token_ids:
                break  # the generator is closed here, which aborts the request
        assert_all_blocks_free(bg)


def test_bad_input_fails_in_the_caller_and_duplicate_ids_fail_in_the_stream() -> None:
    with BackgroundEngine(make_engine()) as bg:
        with pytest.raises(ValueError, match="empty"):
            bg.add_request([], PARAMS)
        with pytest.raises(ValueError, match="outside the vocabulary"):
            bg.add_request([1, 500], PARAMS)
        first = bg.add_request(PROMPTS[0], SamplingParams(max_new_tokens=50, ignore_eos=True), request_id="same")
        second = bg.add_request(PROMPTS[1], PARAMS, request_id="same")
        with pytest.raises(ValueError, match="already in flight"):
            list(second)
        assert list(first)[-1].finished
        assert_all_blocks_free(bg)


def test_a_failing_step_fails_requests_in_flight_and_the_engine_goes_on(expected: list[list[int]]) -> None:
    engine = make_engine()
    run = engine.runner.run
    calls = {"n": 0}

    def flaky(batch):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("device lost")
        return run(batch)

    engine.runner.run = flaky
    with BackgroundEngine(engine) as bg:
        with pytest.raises(EngineError, match="device lost"):
            list(bg.add_request(PROMPTS[2], PARAMS))
        assert_all_blocks_free(bg)
        tokens = [t for out in bg.add_request(PROMPTS[2], PARAMS) for t in out.token_ids]
        assert tokens == expected[2]


def test_close_aborts_what_is_in_flight() -> None:
    bg = BackgroundEngine(make_engine())
    stream = bg.add_request(PROMPTS[5], SamplingParams(max_new_tokens=100_000, ignore_eos=True))
    next(iter(stream))
    bg.close()
    outs = list(stream)
    assert outs and outs[-1].finish_reason in ("abort", "length")
    with pytest.raises(RuntimeError, match="closed"):
        bg.add_request(PROMPTS[0], PARAMS)
    bm = bg.engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks and not bg.engine.requests


def test_stop_token_ids_outside_the_vocabulary_are_refused_in_the_caller() -> None:
    bad = r"stop_token_ids \[97\] are outside the vocabulary \(size 97\)"
    with BackgroundEngine(make_engine()) as bg, pytest.raises(ValueError, match=bad):
        bg.add_request(PROMPTS[0], SamplingParams(max_new_tokens=4, stop_token_ids=(3, 97)))


def test_a_cancel_is_seen_even_when_outputs_never_pause() -> None:
    """``RequestStream.until``: outputs every few ms (faster than its poll) still let a set cancel
    abort the request at the next read, not when a read first times out."""
    from minicpm.engine.async_engine import RequestStream
    from minicpm.engine.llm_engine import RequestOutput

    aborted = threading.Event()
    stream = RequestStream("r", None, lambda request_id: aborted.set())
    stop = threading.Event()

    def produce() -> None:
        n = 0
        while not stop.is_set():
            n += 1
            done = aborted.is_set()
            stream.put(RequestOutput("r", "x", [n], done, "abort" if done else None, 1, n, 0))
            if done:
                return
            time.sleep(0.005)

    producer = threading.Thread(target=produce, daemon=True)
    producer.start()
    cancel = threading.Event()
    seen = 0
    try:
        for _ in stream.until(cancel, poll=0.02):
            seen += 1
            cancel.set()
            assert seen < 10, "the cancel was not seen while outputs kept coming"
    finally:
        stop.set()
        producer.join()
    assert aborted.is_set() and stream.finished
