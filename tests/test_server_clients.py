"""``minicpm serve`` against what real and hostile clients do: the end-of-sequence token as a
generated token (what lm-eval's loglikelihoods rely on), oversized bodies, answers cut by the
SIGTERM drain, and requests that must be refused with a clear 400."""

from __future__ import annotations

import json
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch

openai = pytest.importorskip("openai")

from fastapi.testclient import TestClient  # noqa: E402
from helpers import LiveServer, serve_llm, serve_process, stop_process  # noqa: E402

from minicpm import LLM, MiniCPMForCausalLM  # noqa: E402
from minicpm.engine.async_engine import BackgroundEngine  # noqa: E402
from minicpm.server.app import ServerState, build_app, default_max_request_bytes  # noqa: E402

NAME = "smol"
CHAT = "/v1/chat/completions"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
ANSWER = "The capital of France is Paris."  # the default model's greedy answer, then <|im_end|>


@pytest.fixture(scope="module")
def llm(default_model_dir: Path) -> LLM:
    return LLM.from_pretrained(default_model_dir)


@pytest.fixture(scope="module")
def server(llm: LLM):
    live = serve_llm(llm, NAME, api_keys=["sk-right"])
    yield live
    live.stop()


@pytest.fixture(scope="module")
def plain(default_model_dir: Path) -> MiniCPMForCausalLM:
    return MiniCPMForCausalLM.from_pretrained(default_model_dir)


def _client(server: LiveServer):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="sk-right", max_retries=0)


def _log_softmax(model: MiniCPMForCausalLM, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids]))[0].double(), -1)


# ------------------------------------------------------------------------ end of sequence
def test_a_generated_end_of_sequence_is_a_generated_token(server: LiveServer, llm: LLM, plain) -> None:
    """lm-eval scores a continuation with echo + logprobs + max_tokens 1 and reads
    token_logprobs[ctxlen:-1]: exactly one generated entry must follow the prompt's, eos or not."""
    tok, c = llm.tokenizer, _client(server)
    eos = tok.token_to_id("<|im_end|>")
    context = llm.chat_prompt(QUESTION)
    continuation = tok.encode(ANSWER, add_special_tokens=False)
    prompt = context + continuation
    full = _log_softmax(plain, prompt)
    assert int(full[-1].argmax()) == eos  # the case that broke: the next token is the end of sequence

    for stream in (False, True):
        kwargs = dict(model=NAME, prompt=prompt, max_tokens=1, echo=True, logprobs=1, temperature=0)
        if stream:
            chunks = [ch for ch in c.completions.create(**kwargs, stream=True) if ch.choices]
            entries = [x for ch in chunks if ch.choices[0].logprobs for x in ch.choices[0].logprobs.token_logprobs]
            text = "".join(ch.choices[0].text for ch in chunks)
            finish = chunks[-1].choices[0].finish_reason
        else:
            r = c.completions.create(**kwargs)
            entries, text, finish = r.choices[0].logprobs.token_logprobs, r.choices[0].text, r.choices[0].finish_reason
            assert r.usage.completion_tokens == 1 and r.choices[0].logprobs.tokens[-1] == "<|im_end|>"
        assert len(entries) == len(prompt) + 1, stream  # the prompt's, then the generated eos
        assert entries[-1] == pytest.approx(full[-1, eos].item(), abs=1e-4)
        assert text == tok.decode(prompt) and finish == "stop"  # the eos adds no text
        # lm-eval's arithmetic: the continuation's loglikelihood, every one of its tokens counted
        ctxlen = len(context)
        expected = sum(full[p - 1, prompt[p]].item() for p in range(ctxlen, len(prompt)))
        assert sum(entries[ctxlen:-1]) == pytest.approx(expected, abs=1e-3)

    # chat, streamed or not: the eos is counted and scored, and not in the content
    done = c.chat.completions.create(model=NAME, messages=QUESTION, temperature=0, max_tokens=30, logprobs=True)
    content = done.choices[0].logprobs.content
    assert done.choices[0].message.content == ANSWER and done.choices[0].finish_reason == "stop"
    assert done.usage.completion_tokens == len(content) == len(continuation) + 1
    assert content[-1].token == "<|im_end|>" and content[-1].logprob == pytest.approx(full[-1, eos].item(), abs=1e-4)
    streamed = list(
        c.chat.completions.create(
            model=NAME,
            messages=QUESTION,
            temperature=0,
            max_tokens=30,
            logprobs=True,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    scored = [
        x.token for ch in streamed if ch.choices and ch.choices[0].logprobs for x in ch.choices[0].logprobs.content
    ]
    assert scored == [x.token for x in content] and streamed[-1].usage.completion_tokens == len(content)
    assert "".join(ch.choices[0].delta.content or "" for ch in streamed if ch.choices) == ANSWER
    # a stop string still ends the text before it
    cut = c.chat.completions.create(model=NAME, messages=QUESTION, temperature=0, max_tokens=30, stop=["Paris"])
    assert cut.choices[0].message.content == "The capital of France is " and cut.choices[0].finish_reason == "stop"


# ------------------------------------------------------------------------ refusals
def _error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["code"] == status
    return body["error"]


@pytest.fixture
def api(llm: LLM):
    state = ServerState(engine=BackgroundEngine(llm.engine), tokenizer=llm.tokenizer, served_names=[NAME])
    with TestClient(build_app(state), raise_server_exceptions=False) as tc:
        yield tc, state
    state.engine.close()


def test_requests_that_cannot_be_answered_are_400_naming_the_problem(api) -> None:
    pytest.importorskip("llguidance")
    tc, _ = api
    for schema in ({"$ref": "#"}, {"$defs": {"a": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"}):
        fmt = {"type": "json_schema", "json_schema": {"name": "loop", "schema": schema}}
        err = _error(tc.post(CHAT, json={"messages": QUESTION, "response_format": fmt}), 400)
        assert err["param"] == "response_format" and "no output can satisfy it" in err["message"]
    for field in ("max_tokens", "max_completion_tokens"):
        err = _error(tc.post(CHAT, json={"messages": QUESTION, field: 0}), 400)
        assert err["param"] == field and "at least 1" in err["message"]
    for literal, name in (("NaN", "NaN"), ("Infinity", "Infinity"), ("-Infinity", "-Infinity")):
        raw = b'{"messages": [{"role": "user", "content": "hi"}], "temperature": ' + literal.encode() + b"}"
        err = _error(tc.post(CHAT, content=raw, headers={"content-type": "application/json"}), 400)
        assert err["param"] == "temperature" and f"{name} is not a number" in err["message"]
    raw = b'{"messages": [{"role": "user", "content": "hi"}], "top_p": NaN}'
    assert "NaN" in _error(tc.post(CHAT, content=raw, headers={"content-type": "application/json"}), 400)["message"]
    err = _error(tc.put(CHAT, json={"messages": QUESTION}), 405)  # a client's mistake, not the server's
    assert err["type"] == "invalid_request_error"


def test_a_prompt_that_cannot_fit_is_refused_before_it_is_tokenized(api, monkeypatch) -> None:
    tc, state = api
    calls = []
    encode = state.tokenizer.encode
    monkeypatch.setattr(state.tokenizer, "encode", lambda *a, **k: calls.append(1) or encode(*a, **k))
    text = "word " * (state.max_model_len * state.tokenizer.max_token_chars // 5 + 1)  # under the body limit
    assert len(text) < state.max_request_bytes
    for path, body in (
        ("/v1/completions", {"prompt": text}),
        (CHAT, {"messages": [{"role": "user", "content": text}]}),
    ):
        err = _error(tc.post(path, json=body), 400)
        assert err["param"] == "input_tokens" and f"{len(text):,} characters, at least" in err["message"]
    assert calls == []  # neither was tokenized
    with pytest.raises(ValueError, match="characters, at least"):  # the Python API too
        state.engine.engine.make_request(text)


# ------------------------------------------------------------------------ a live server process
def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_a_20_mb_body_gets_413_unparsed_while_health_answers(default_model_dir: Path) -> None:
    proc, url = serve_process(default_model_dir.parent)
    try:
        limit = default_max_request_bytes(8192)  # the default model's context
        gaps, stop = [], threading.Event()

        def poll_health() -> None:
            while not stop.is_set():
                t = time.monotonic()
                assert httpx.get(url + "/health", timeout=10).status_code == 200
                gaps.append(time.monotonic() - t)
                time.sleep(0.05)

        httpx.post(url + CHAT, json={"messages": QUESTION, "max_tokens": 4}, timeout=60).raise_for_status()  # warm
        before = _rss(proc.pid)
        poller = threading.Thread(target=poll_health)
        poller.start()
        body = json.dumps({"prompt": "word " * (4 << 20)}).encode()  # 20 MiB
        try:
            for _ in range(3):
                start = time.monotonic()
                r = httpx.post(url + "/v1/completions", content=body, headers={"content-type": "application/json"})
                err = _error(r, 413)
                assert time.monotonic() - start < 10 and err["type"] == "invalid_request_error"
                assert f"{len(body):,} bytes" in err["message"] and f"{limit:,}" in err["message"]
            chunked = httpx.post(  # no Content-Length: refused once the running size passes the limit
                url + "/v1/completions",
                content=(body[i : i + (1 << 20)] for i in range(0, len(body), 1 << 20)),
                headers={"content-type": "application/json"},
            )
            assert "over" in _error(chunked, 413)["message"]
        finally:
            stop.set()
            poller.join()
        assert gaps and max(gaps) < 1.0, f"/health took up to {max(gaps):.2f} s"
        assert _rss(proc.pid) - before < 64 << 20  # nothing of the bodies was kept
        ok = httpx.post(url + CHAT, json={"messages": QUESTION, "max_tokens": 4, "temperature": 0})
        assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["content"]
    finally:
        err = stop_process(proc)
    assert "Traceback" not in err, err


def test_answers_cut_by_the_drain_are_not_passed_off_as_complete(default_model_dir: Path) -> None:
    proc, url = serve_process(default_model_dir.parent, "--shutdown-timeout", "1")
    try:
        long = {"messages": [{"role": "user", "content": "Count to ten thousand."}], "max_tokens": 4000}
        long |= {"ignore_eos": True, "temperature": 0}
        result: dict = {}

        def blocking() -> None:
            result["response"] = httpx.post(url + CHAT, json=long, timeout=60)

        waiter = threading.Thread(target=blocking)
        waiter.start()
        lines = []
        with httpx.stream("POST", url + CHAT, json=long | {"stream": True}, timeout=60) as response:
            for line in response.iter_lines():
                lines.append(line)
                if len(lines) == 8:  # mid-answer
                    proc.send_signal(signal.SIGTERM)
        waiter.join(60)
        frames = [json.loads(x[6:]) for x in lines if x.startswith("data: {")]
        assert [x for x in lines if x][-1] == "data: [DONE]"
        finishes = [f["choices"][0]["finish_reason"] for f in frames if f.get("choices")]
        assert finishes[-1] == "abort" and "stop" not in finishes
        assert frames[-1]["error"]["code"] == 503 and "cut after" in frames[-1]["error"]["message"]
        cut = result["response"]
        assert "cut after" in _error(cut, 503)["message"] and cut.headers["Retry-After"]
        assert proc.wait(timeout=60) == 0
    finally:
        err = stop_process(proc)
    assert "Traceback" not in err, err


def test_the_readme_openai_example_runs_as_written(default_model_dir: Path) -> None:
    """The README's `openai` example against `minicpm serve` of the README's first command (the
    default model): it must not ask for a model name the server does not serve."""
    import contextlib
    import io
    import re

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    serving = readme[readme.index("## Serving (OpenAI-compatible)") :]
    code = re.search(r"```python\n(.*?)```", serving, re.S).group(1)
    assert "from openai import OpenAI" in code and "http://127.0.0.1:8000/v1" in code
    proc, url = serve_process(default_model_dir.parent, "--api-key", "sk-local")
    try:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            exec(compile(code.replace("http://127.0.0.1:8000", url), "README.md", "exec"), {})
    finally:
        err = stop_process(proc)
    printed = out.getvalue()
    assert "completion_tokens=" in printed and len(printed.split("CompletionUsage")[0].strip()) > 2, printed
    assert "Traceback" not in err, err
