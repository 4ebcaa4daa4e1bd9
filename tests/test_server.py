"""``minicpm serve``: the official openai client against a live server on 127.0.0.1 (the default
model), the error envelope, disconnects, metrics and a graceful SIGTERM."""

from __future__ import annotations

import asyncio
import json
import random
import signal
import time
from pathlib import Path

import httpx
import pytest
import torch

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

from fastapi.testclient import TestClient  # noqa: E402
from helpers import LiveServer, serve_llm, serve_process, stop_process  # noqa: E402

from minicpm import LLM, SamplingParams  # noqa: E402
from minicpm.engine import EngineConfig  # noqa: E402
from minicpm.engine.async_engine import BackgroundEngine  # noqa: E402
from minicpm.server.app import ServerState, build_app  # noqa: E402

NAME = "smol"
QUESTIONS = [f"Question {i}: what is {i} plus {i + 1}?" for i in range(32)]


@pytest.fixture(scope="module")
def llm(default_model_dir: Path) -> LLM:
    return LLM.from_pretrained(default_model_dir, engine_config=EngineConfig(max_num_seqs=32))


@pytest.fixture(scope="module")
def server(llm: LLM):
    live = serve_llm(llm, NAME, sampling_defaults=llm.sampling_defaults)
    yield live
    live.stop()


@pytest.fixture(scope="module")
def offline(default_model_dir: Path) -> LLM:
    """A second engine on the same weights: what a request gets alone."""
    return LLM.from_pretrained(default_model_dir)


def client(server: LiveServer):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def metric(server: LiveServer, name: str) -> float:
    text = httpx.get(server.url + "/metrics").text
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


def test_chat_completion_and_stream_with_the_openai_client(server: LiveServer, offline: LLM) -> None:
    c = client(server)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    done = c.chat.completions.create(model=NAME, messages=messages, temperature=0, max_tokens=24)
    expected = offline.generate(offline.chat_prompt(messages), SamplingParams(max_new_tokens=24))
    assert done.choices[0].message.content == expected.text and "Paris" in expected.text
    assert done.id.startswith("chatcmpl-") and done.object == "chat.completion" and done.model == NAME
    assert done.choices[0].finish_reason == ("length" if expected.finish_reason == "length" else "stop")
    assert done.usage.prompt_tokens == expected.prompt_tokens
    assert done.usage.completion_tokens == len(expected.token_ids)
    assert done.usage.total_tokens == done.usage.prompt_tokens + done.usage.completion_tokens

    chunks = list(
        c.chat.completions.create(
            model=NAME,
            messages=messages,
            temperature=0,
            max_tokens=24,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].choices[0].delta.content == ""
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == expected.text
    finals = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert finals == [done.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(expected.token_ids)
    assert all(ch.usage is None for ch in chunks[:-1])

    models = c.models.list().data
    assert [m.id for m in models] == [NAME]
    card = httpx.get(server.url + "/v1/models").json()["data"][0]
    assert card["max_model_len"] == server.state.max_model_len
    assert card["sampling_defaults"] == {"temperature": 0.2, "top_p": 0.9}  # SmolLM2's card


def test_completions_prompt_forms_echo_and_streaming(server: LiveServer, offline: LLM) -> None:
    c = client(server)
    prompt = "The capital of France is"
    ids = offline.tokenizer.encode(prompt)
    expected = offline.generate(prompt, SamplingParams(max_new_tokens=8, ignore_eos=True)).text
    for form in (prompt, ids):
        out = c.completions.create(
            model=NAME, prompt=form, max_tokens=8, temperature=0, extra_body={"ignore_eos": True}
        )
        assert out.choices[0].text == expected and out.object == "text_completion" and out.id.startswith("cmpl-")
    both = c.completions.create(model=NAME, prompt=[prompt, "Once upon a time"], max_tokens=4, temperature=0)
    alone = [offline.generate(p, SamplingParams(max_new_tokens=4)).text for p in (prompt, "Once upon a time")]
    assert [ch.index for ch in both.choices] == [0, 1] and [ch.text for ch in both.choices] == alone
    echoed = c.completions.create(model=NAME, prompt=prompt, max_tokens=8, temperature=0, echo=True)
    assert echoed.choices[0].text.startswith(prompt)
    streamed = c.completions.create(
        model=NAME, prompt=prompt, max_tokens=8, temperature=0, stream=True, extra_body={"ignore_eos": True}
    )
    assert "".join(ch.choices[0].text for ch in streamed if ch.choices) == expected


def test_32_concurrent_greedy_clients_get_the_offline_text(server: LiveServer, offline: LLM) -> None:
    expected = [
        offline.generate(offline.chat_prompt([{"role": "user", "content": q}]), max_new_tokens=16) for q in QUESTIONS
    ]

    async def main() -> list[str]:
        ac = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)

        async def ask(q: str) -> str:
            r = await ac.chat.completions.create(
                model=NAME, messages=[{"role": "user", "content": q}], temperature=0, max_tokens=16
            )
            return r.choices[0].message.content

        return await asyncio.gather(*(ask(q) for q in QUESTIONS))

    got = asyncio.run(main())
    assert got == [e.text for e in expected]


def test_seeded_sampling_is_reproducible_and_n_gives_n_choices(server: LiveServer) -> None:
    c = client(server)
    messages = [{"role": "user", "content": "Tell me a story."}]
    runs = [
        c.chat.completions.create(model=NAME, messages=messages, temperature=1.0, seed=7, max_tokens=20, n=3)
        for _ in range(2)
    ]
    texts = [[ch.message.content for ch in r.choices] for r in runs]
    assert texts[0] == texts[1] and len(texts[0]) == 3 and [ch.index for ch in runs[0].choices] == [0, 1, 2]
    assert len(set(texts[0])) > 1  # three different draws
    assert runs[0].usage.completion_tokens >= 3 and runs[0].usage.prompt_tokens == runs[1].usage.prompt_tokens


def test_logprobs_equal_the_plain_models_log_softmax(server: LiveServer, llm: LLM, default_model_dir: Path) -> None:
    from minicpm import MiniCPMForCausalLM

    c = client(server)
    messages = [{"role": "user", "content": "Name a colour."}]
    r = c.chat.completions.create(
        model=NAME, messages=messages, temperature=0, max_tokens=8, logprobs=True, top_logprobs=3
    )
    content = r.choices[0].logprobs.content
    prompt = httpx.post(server.url + "/tokenize", json={"messages": messages}).json()["tokens"]
    plain = MiniCPMForCausalLM.from_pretrained(default_model_dir)
    tok = llm.tokenizer
    ids = list(prompt)
    with torch.no_grad():
        for entry in content:
            logp = torch.log_softmax(plain(torch.tensor([ids]))[0, -1].float(), -1)
            best = int(logp.argmax())
            assert entry.token == tok.decode([best])
            assert entry.logprob == pytest.approx(logp[best].item(), abs=1e-4)
            top = logp.topk(3)
            assert [t.token for t in entry.top_logprobs] == [tok.decode([i]) for i in top.indices.tolist()]
            assert [t.logprob for t in entry.top_logprobs] == pytest.approx(top.values.tolist(), abs=1e-4)
            assert entry.bytes == list(entry.token.encode())
            ids.append(best)
    # echo + logprobs + max_tokens 0: the prompt's own logprobs (what evaluation harnesses send)
    scored = c.completions.create(model=NAME, prompt=prompt, max_tokens=0, echo=True, logprobs=2, temperature=0)
    lp = scored.choices[0].logprobs
    assert scored.usage.completion_tokens == 0 and lp.token_logprobs[0] is None and len(lp.tokens) == len(prompt)
    with torch.no_grad():
        full = torch.log_softmax(plain(torch.tensor([prompt]))[0].float(), -1)
    expected = [full[p, prompt[p + 1]].item() for p in range(len(prompt) - 1)]
    assert lp.token_logprobs[1:] == pytest.approx(expected, abs=1e-4)
    assert lp.tokens == [tok.decode([t]) for t in prompt]
    assert list(lp.top_logprobs[1]) == [tok.decode([i]) for i in full[0].topk(2).indices.tolist()]
    streamed = list(c.completions.create(model=NAME, prompt=prompt, max_tokens=0, echo=True, logprobs=2, stream=True))
    first = streamed[0].choices[0]
    assert first.text == tok.decode(prompt) and first.logprobs.token_logprobs[1:] == pytest.approx(expected, abs=1e-4)
    comp = c.completions.create(model=NAME, prompt=prompt, max_tokens=4, temperature=0, logprobs=2)
    lp = comp.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    assert lp.text_offset[0] == 0 and "".join(lp.tokens) == comp.choices[0].text


@pytest.fixture(scope="module")
def small(default_model_dir: Path) -> LLM:
    return LLM.from_pretrained(default_model_dir, engine_config=EngineConfig(max_model_len=256))


@pytest.fixture
def api(small: LLM):
    """The app in-process (no socket), 256-token context, with a key and a queue of 0 places."""
    state = ServerState(
        engine=BackgroundEngine(small.engine),
        tokenizer=small.tokenizer,
        served_names=[NAME],
        api_keys=["sk-right"],
        max_queued_requests=0,
    )
    with TestClient(build_app(state), raise_server_exceptions=False) as tc:
        tc.headers["Authorization"] = "Bearer sk-right"
        yield tc, state
    state.engine.close()


def _error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["code"] == status
    return body["error"]


CHAT = "/v1/chat/completions"
MSG = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize(
    ("body", "param", "words"),
    [
        ({"messages": MSG, "temperature": "hot"}, "temperature", "valid number"),
        ({"messages": MSG, "top_p": 2}, "top_p", "less than or equal to 1"),
        ({"messages": MSG, "n": 100}, "n", "less than or equal to 16"),
        ({"messages": MSG, "logprobs": True, "top_logprobs": 21}, "top_logprobs", "less than or equal to 20"),
        ({"messages": MSG, "top_logprobs": 2}, None, "top_logprobs needs logprobs"),
        ({"messages": MSG, "stream_options": {"include_usage": True}}, None, "stream_options"),
        ({"messages": []}, "messages", "at least 1"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, None, "'image_url' part"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role", "Input should be"),
        ({"messages": MSG, "seed": -1}, "seed", "greater than or equal to 0"),
    ],
)
def test_bad_requests_are_400_in_the_envelope(api, body: dict, param: str | None, words: str) -> None:
    tc, _ = api
    err = _error(tc.post(CHAT, json=body), 400)
    assert err["type"] == "invalid_request_error" and words in err["message"]
    if param:
        assert err["param"] == param


def test_envelope_for_json_auth_routes_models_length_and_queue(api) -> None:
    tc, state = api
    assert _error(tc.post(CHAT, content=b"{not json", headers={"content-type": "application/json"}), 400)
    assert _error(tc.post(CHAT, json=MSG), 400)  # a list, not an object
    for headers in ({"Authorization": ""}, {"Authorization": "Bearer sk-wrong"}):
        err = _error(tc.post(CHAT, json={"messages": MSG}, headers=headers), 401)
        assert err["type"] == "authentication_error"
        _error(tc.get("/v1/models", headers=headers), 401)
    assert tc.get("/health", headers={"Authorization": ""}).status_code == 200
    assert tc.get("/version", headers={"Authorization": ""}).json()["version"]
    assert tc.get("/metrics", headers={"Authorization": ""}).status_code == 200
    assert _error(tc.post(CHAT, json={"messages": MSG, "model": "gpt-5"}), 404)["param"] == "model"
    assert _error(tc.get("/v1/nothing"), 404)["type"] == "not_found_error"
    long = " ".join(["word"] * (state.max_model_len + 10))
    err = _error(tc.post("/v1/completions", json={"prompt": long}), 400)
    assert (
        f"maximum context length is {state.max_model_len} tokens" in err["message"] and "input tokens" in err["message"]
    )
    almost = list(range(1000, 1000 + state.max_model_len - 4))
    ok = tc.post("/v1/completions", json={"prompt": almost, "max_tokens": 10**9, "ignore_eos": True, "unknown": 1})
    assert ok.status_code == 200, ok.text  # clamped to the room left; unknown fields ignored
    assert ok.json()["usage"]["completion_tokens"] == 4 and ok.json()["choices"][0]["finish_reason"] == "length"
    state.in_flight = state.engine.engine.config.max_num_seqs  # the queue (0 places) is full
    busy = tc.post(CHAT, json={"messages": MSG})
    assert _error(busy, 503)["type"] == "unavailable_error" and busy.headers["Retry-After"]
    state.in_flight, state.draining = 0, True
    assert _error(tc.post(CHAT, json={"messages": MSG}), 503) and tc.get("/health").status_code == 503
    state.draining = False
    ids = tc.post("/tokenize", json={"prompt": "Hello world"}).json()
    assert ids["count"] == len(ids["tokens"]) and tc.post("/detokenize", json={"tokens": ids["tokens"]}).json() == {
        "prompt": "Hello world"
    }
    assert _error(tc.post("/detokenize", json={"tokens": [10**9]}), 400)["param"] == "tokens"
    spec = tc.get("/openapi.json").json()
    assert {"/v1/chat/completions", "/v1/completions", "/v1/models", "/tokenize"} <= set(spec["paths"])
    state.engine.close()  # an engine that stopped is not healthy
    assert tc.get("/health").status_code == 503 and tc.get("/health").text == "the engine stopped"


def test_50_clients_that_disconnect_leave_nothing_running(server: LiveServer) -> None:
    rng = random.Random(0)

    async def one(client: httpx.AsyncClient, i: int) -> None:
        body = {
            "model": NAME,
            "messages": [{"role": "user", "content": f"Write a long poem number {i}."}],
            "max_tokens": 200,
            "stream": i % 5 != 0,
        }
        if not body["stream"]:  # non-streaming: give up while the answer is computed (or, on a
            # busy machine, while the connection is still being accepted: a give-up all the same)
            with pytest.raises((httpx.ReadTimeout, httpx.ConnectTimeout)):
                await client.post(CHAT, json=body, timeout=rng.uniform(0.2, 1.5))
            return
        async with client.stream("POST", CHAT, json=body) as response:
            limit = rng.randint(0, 12)
            n = 0
            async for _line in response.aiter_lines():
                n += 1
                if n > limit:
                    break

    async def main() -> None:
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            await asyncio.gather(*(one(client, i) for i in range(50)))

    asyncio.run(main())
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if metric(server, "minicpm:num_requests_running") == 0 and metric(server, "minicpm:kv_cache_blocks_used") == 0:
            break
        time.sleep(0.2)
    assert metric(server, "minicpm:num_requests_running") == 0
    assert metric(server, "minicpm:num_requests_waiting") == 0
    assert metric(server, "minicpm:kv_cache_blocks_used") == 0
    assert server.state.in_flight == 0
    assert metric(server, 'minicpm:request_success_total{finished_reason="abort"}') >= 40
    # the engine's health beside its load: its attention backend, nothing failed
    backend = server.state.engine.stats()["attention_backend"]
    assert metric(server, f'minicpm:attention_backend_info{{backend="{backend}"}}') == 1
    assert metric(server, "minicpm:kernel_failures_total") == 0 and metric(server, "minicpm:request_errors_total") == 0
    s = server.state.engine.stats()
    labels = f'bytes_per_token="{s["kv_bytes_per_token"]}",capacity_tokens="{s["kv_capacity_tokens"]}"'
    labels += f',dtype="{s["kv_cache_dtype"]}"'  # (the exposition sorts them)
    assert metric(server, f"minicpm:kv_cache_info{{{labels}}}") == 1
    # the CPU engine's threads, and its drops under other load, as the engine counts them
    assert metric(server, "minicpm:cpu_threads") == s["cpu_threads"] >= 1
    assert metric(server, "minicpm:cpu_thread_drops_total") == s["cpu_thread_drops"]


def test_sigterm_drains_then_exits_0(default_model_dir: Path) -> None:
    proc, url = serve_process(default_model_dir.parent, "--shutdown-timeout", "60")
    try:
        body = {
            "messages": [{"role": "user", "content": "Count to fifty."}],
            "max_tokens": 60,
            "stream": True,
            "temperature": 0,
            "ignore_eos": True,
        }
        lines = []
        with httpx.stream("POST", url + CHAT, json=body, timeout=60) as response:
            for line in response.iter_lines():
                lines.append(line)
                if len(lines) == 6:  # mid-answer
                    proc.send_signal(signal.SIGTERM)
                    time.sleep(0.3)
                    late = httpx.post(url + CHAT, json={"messages": MSG})
                    assert late.status_code == 503 and late.json()["error"]["type"] == "unavailable_error"
        data = [json.loads(x[6:]) for x in lines if x.startswith("data: {")]
        assert [x for x in lines if x][-1] == "data: [DONE]"
        assert data[-1]["choices"][0]["finish_reason"] == "length"  # the running answer finished
        assert proc.wait(timeout=60) == 0
    finally:
        err = stop_process(proc)
    assert "Traceback" not in err, err


def test_a_client_gone_before_its_stream_starts_leaves_nothing(small: LLM) -> None:
    state = ServerState(engine=BackgroundEngine(small.engine), tokenizer=small.tokenizer, served_names=[NAME])
    app = build_app(state)
    body = json.dumps({"messages": MSG, "max_tokens": 50, "stream": True, "ignore_eos": True}).encode()
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": CHAT,
        "raw_path": CHAT.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 2),
    }

    async def main() -> None:
        messages = [{"type": "http.request", "body": body, "more_body": False}, {"type": "http.disconnect"}]

        async def receive() -> dict:
            if messages:
                return messages.pop(0)
            await asyncio.sleep(3600)
            return {}

        async def send(message: dict) -> None:
            pass

        await asyncio.wait_for(app(scope, receive, send), 30)

    try:
        asyncio.run(main())
        deadline = time.monotonic() + 10
        while (state.engine.stats()["running"] or state.in_flight) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert state.in_flight == 0 and state.engine.stats()["running"] == 0
        s = state.engine.stats()
        assert s["free_blocks"] == s["num_blocks"]
    finally:
        state.engine.close()


def test_json_schema_output_validates(server: LiveServer) -> None:
    pytest.importorskip("llguidance")
    jsonschema = pytest.importorskip("jsonschema")
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 20}, "age": {"type": "integer"}},
        "required": ["name", "age"],
        "additionalProperties": False,
    }
    c = client(server)
    for prompt, temperature in [("Describe a person called Ann, aged 31, as JSON.", 0), ("Invent a person.", 1.0)]:
        r = c.chat.completions.create(
            model=NAME,
            messages=[{"role": "user", "content": prompt}],
            temperature=temperature,
            seed=3,
            max_tokens=60,
            response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": schema}},
        )
        assert r.choices[0].finish_reason == "stop", r.choices[0].message.content
        jsonschema.validate(json.loads(r.choices[0].message.content), schema)
    free = c.chat.completions.create(
        model=NAME, messages=[{"role": "user", "content": "Hi"}], max_tokens=40, response_format={"type": "json_object"}
    )
    text = free.choices[0].message.content
    assert text.lstrip().startswith("{")
    if free.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(text), dict)
    bad = httpx.post(
        server.url + CHAT,
        json={
            "messages": MSG,
            "response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "bogus"}}},
        },
    )
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "response_format"


def test_the_openai_client_on_a_tiny_model(default_model_dir: Path, tmp_path: Path) -> None:
    """The same API on a tiny random MiniCPM (real tokenizer): greedy text equals the engine's."""
    import shutil

    from helpers import random_model, tiny_config

    path = tmp_path / "tiny"
    random_model(tiny_config(vocab_size=49152, max_position_embeddings=256, rope_scaling=None)).save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(default_model_dir / name, path / name)
    llm = LLM.from_pretrained(path)
    live = LiveServer(ServerState(engine=BackgroundEngine(llm.engine), tokenizer=llm.tokenizer, served_names=["tiny"]))
    try:
        offline = LLM.from_pretrained(path)
        c = openai.OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0)
        messages = [{"role": "user", "content": "Hello there"}]
        expected = offline.generate(offline.chat_prompt(messages), SamplingParams(max_new_tokens=12, ignore_eos=True))
        done = c.chat.completions.create(
            model="tiny", messages=messages, temperature=0, max_tokens=12, extra_body={"ignore_eos": True}
        )
        assert done.choices[0].message.content == expected.text and done.usage.completion_tokens == 12
        streamed = c.chat.completions.create(
            model="tiny", messages=messages, temperature=0, max_tokens=12, stream=True, extra_body={"ignore_eos": True}
        )
        assert "".join(ch.choices[0].delta.content or "" for ch in streamed if ch.choices) == expected.text
        comp = c.completions.create(model="tiny", prompt="Once upon", max_tokens=5, temperature=0, logprobs=1)
        assert len(comp.choices[0].logprobs.tokens) == comp.usage.completion_tokens
    finally:
        live.stop()


def test_n_choices_share_the_prompts_kv_blocks(server: LiveServer) -> None:
    c = client(server)
    story = " ".join(f"line {i} of a long and unique prompt about otters." for i in range(20))
    prompt_ids = httpx.post(server.url + "/tokenize", json={"messages": [{"role": "user", "content": story}]}).json()
    full_blocks = (prompt_ids["count"] - 1) // 64 * 64
    assert full_blocks >= 128
    before = metric(server, "minicpm:prefix_cache_hits_total")
    r = c.chat.completions.create(
        model=NAME, messages=[{"role": "user", "content": story}], n=3, temperature=0.8, seed=1, max_tokens=8
    )
    assert len(r.choices) == 3 and r.usage.prompt_tokens == prompt_ids["count"]
    assert metric(server, "minicpm:prefix_cache_hits_total") - before == 2 * full_blocks  # choices 2 and 3


def test_a_chat_template_given_to_the_server_replaces_the_models(small: LLM) -> None:
    template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}{{ '<bot>' }}"
    broken = "{{ messages[0]['content'] / 2 }}"
    for source, expect in ((template, 200), (broken, 400)):
        state = ServerState(
            engine=BackgroundEngine(small.engine), tokenizer=small.tokenizer, served_names=[NAME], chat_template=source
        )
        try:
            with TestClient(build_app(state), raise_server_exceptions=False) as tc:
                r = tc.post("/tokenize", json={"messages": MSG})
                assert r.status_code == expect, r.text
                if expect == 200:
                    assert r.json()["tokens"] == small.tokenizer.encode("<user>hi<bot>")
                else:
                    assert "chat template failed on these messages" in r.json()["error"]["message"]
        finally:
            state.engine.close()
