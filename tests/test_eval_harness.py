"""The evaluation harness without a model: dispatch over targets (failover, item errors), endpoint
retries, resumable run directories, shards and merging, truncation and the InfiniteBench prompts."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
import pytest

from minicpm.eval import harness, infinitebench
from minicpm.eval.harness import Generation, Item, RunDir


def make_items(n: int, group: str = "passkey") -> list[Item]:
    return [Item(i, group, f"id{i}", [1, 2, i + 3], None, 4, [str(i)], {"task": group}) for i in range(n)]


class Fake(harness.Target):
    def __init__(self, name: str, concurrency: int = 2, down_after: int | None = None, refuse=(), stop_after=None):
        self.name, self.concurrency = name, concurrency
        self.down_after, self.refuse, self.stop_after = down_after, set(refuse), stop_after
        self.served: list[int] = []

    async def generate(self, item: Item) -> Generation:
        await asyncio.sleep(0.001)
        if self.down_after is not None and len(self.served) >= self.down_after:
            raise harness.TargetDownError("connection refused")
        if item.index in self.refuse:
            raise harness.ItemError("HTTP 400: the prompt is too long")
        if self.stop_after is not None and len(self.served) >= self.stop_after:
            raise KeyboardInterrupt
        self.served.append(item.index)
        return Generation(f"answer {item.index}", len(item.prompt_ids), 2, "stop")


def score(item: Item, prediction: str) -> float:
    return float(prediction.endswith(item.ground_truth[0]))


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


def test_work_is_balanced_and_a_failed_target_hands_its_items_over(tmp_path: Path) -> None:
    items = make_items(40)
    a, b = Fake("a", down_after=3), Fake("b")
    records, errors = harness.run(items, [a, b], RunDir(tmp_path), score, progress=False)
    assert not errors and sorted(records) == list(range(40))
    assert len(a.served) == 3 and len(b.served) == 37
    assert all(r["score"] == 1.0 for r in records.values())
    rows = [json.loads(x) for x in lines(tmp_path / "preds_passkey.jsonl")]
    assert [r["index"] for r in rows] == list(range(40))  # finalized in index order
    assert rows[0] == {
        "index": 0,
        "group": "passkey",
        "id": "id0",
        "prediction": "answer 0",
        "ground_truth": ["0"],
        "prompt_tokens": 3,
        "output_tokens": 2,
        "finish_reason": "stop",
        "score": 1.0,
        "task": "passkey",
    }


def test_when_every_target_fails_what_was_done_is_kept(tmp_path: Path) -> None:
    with pytest.raises(harness.AllTargetsFailedError, match="a: connection refused"):
        harness.run(make_items(10), [Fake("a", concurrency=1, down_after=4)], RunDir(tmp_path), score, progress=False)
    assert len(RunDir(tmp_path).records()) == 4
    records, _ = harness.run(make_items(10), [Fake("b")], RunDir(tmp_path), score, progress=False)
    assert len(records) == 10


def test_a_refused_item_is_reported_and_left_for_the_next_run(tmp_path: Path) -> None:
    records, errors = harness.run(make_items(6), [Fake("a", refuse={2})], RunDir(tmp_path), score, progress=False)
    assert [e[0].index for e in errors] == [2] and "too long" in errors[0][1] and 2 not in records
    assert len(lines(tmp_path / "preds_passkey.jsonl")) == 5
    records, errors = harness.run(make_items(6), [Fake("b")], RunDir(tmp_path), score, progress=False)
    assert not errors and sorted(records) == list(range(6))
    assert [json.loads(x)["index"] for x in lines(tmp_path / "preds_passkey.jsonl")] == list(range(6))


def test_an_interrupted_run_resumed_gives_the_uninterrupted_files(tmp_path: Path) -> None:
    items = make_items(30, "kv_retrieval") + [
        Item(30 + i, "passkey", i, [5], None, 3, ["x"], {"task": "passkey"}) for i in range(5)
    ]
    whole = tmp_path / "whole"
    harness.run(items, [Fake("a", concurrency=4)], RunDir(whole), score, progress=False)
    cut = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        harness.run(items, [Fake("a", concurrency=4, stop_after=11)], RunDir(cut), score, progress=False)
    assert 0 < len(RunDir(cut).records()) < len(items)
    with (cut / "preds_kv_retrieval.jsonl").open("a") as f:
        f.write('{"index": 29, "group": "kv_retr')  # a kill in the middle of a line
    harness.run(items, [Fake("b", concurrency=3)], RunDir(cut), score, progress=False)
    for name in ("preds_kv_retrieval.jsonl", "preds_passkey.jsonl"):
        assert (cut / name).read_bytes() == (whole / name).read_bytes()


def test_run_dirs_refuse_other_settings_and_garbage(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    run.begin({"suite": "infinitebench", "style": "chat", "targets": ["a"]})
    run.begin({"suite": "infinitebench", "style": "chat", "targets": ["b"]})  # other targets: fine
    with pytest.raises(ValueError, match="style: 'chat' there, 'completion' now"):
        run.begin({"suite": "infinitebench", "style": "completion"})
    (tmp_path / "preds_x.jsonl").write_text("hello\n")
    with pytest.raises(ValueError, match=r"preds_x\.jsonl:1: not a prediction line"):
        run.records()
    with pytest.raises(ValueError, match="not a run directory"):
        RunDir(tmp_path / "nothing").settings()


def test_shards_partition_the_work_and_merge_back(tmp_path: Path) -> None:
    items = make_items(11)
    settings = {"suite": "infinitebench", "num_items": 11}
    dirs = []
    for i in range(3):
        d = RunDir(tmp_path / f"s{i}")
        d.begin(dict(settings, shard=[i, 3]))
        mine = harness.select_shard(items, (i, 3))
        assert [it.index for it in mine] == list(range(i, 11, 3))
        harness.run(mine, [Fake("a")], d, score, progress=False)
        dirs.append(d.path)
    whole = RunDir(tmp_path / "whole")
    harness.run(items, [Fake("a")], whole, score, progress=False)
    merged_settings, records = harness.merge(dirs, tmp_path / "merged")
    assert merged_settings["shard"] is None and len(records) == 11
    assert (tmp_path / "merged" / "preds_passkey.jsonl").read_bytes() == (
        whole.path / "preds_passkey.jsonl"
    ).read_bytes()
    with pytest.raises(ValueError, match=r"shard\(s\) 2/3 missing"):
        harness.merge(dirs[:2], tmp_path / "m2")
    other = RunDir(tmp_path / "other")
    other.begin({"suite": "needle", "num_items": 11, "shard": [2, 3]})
    with pytest.raises(ValueError, match="other settings"):
        harness.merge([*dirs[:2], other.path], tmp_path / "m3")
    lines_2 = lines(dirs[2] / "preds_passkey.jsonl")
    (dirs[2] / "preds_passkey.jsonl").write_text(lines_2[0] + "\n")
    with pytest.raises(ValueError, match="hold 9 of 11 items"):
        harness.merge(dirs, tmp_path / "m4")
    with pytest.raises(ValueError, match="I/N"):
        harness.parse_shard("3")
    with pytest.raises(ValueError, match=r"\[0, N\)"):
        harness.parse_shard("3/3")


def _endpoint(handler) -> harness.EndpointTarget:
    return harness.EndpointTarget(
        "http://test/v1", "m", "key", concurrency=2, retries=2, backoff=0.001, transport=httpx.MockTransport(handler)
    )


def test_the_endpoint_retries_server_errors_and_sends_raw_prompts_as_ids() -> None:
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append((request.url.path, json.loads(request.content), request.headers["authorization"]))
        if len(calls) < 3:
            return httpx.Response(503, json={"error": {"message": "busy"}})
        return httpx.Response(
            200,
            json={
                "choices": [{"text": " 42", "finish_reason": "length"}],
                "usage": {"prompt_tokens": 3, "completion_tokens": 1},
            },
        )

    gen = asyncio.run(_endpoint(handler).generate(make_items(1)[0]))
    assert gen == Generation(" 42", 3, 1, "length") and len(calls) == 3
    path, body, auth = calls[-1]
    assert (
        path == "/v1/completions" and body["prompt"] == [1, 2, 3] and body["temperature"] == 0 and auth == "Bearer key"
    )


def test_the_endpoint_sends_chat_items_as_messages_and_sorts_failures() -> None:
    def chat(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        assert request.url.path == "/v1/chat/completions" and body["messages"] == [{"role": "user", "content": "hi"}]
        return httpx.Response(200, json={"choices": [{"message": {"content": "yo"}, "finish_reason": "stop"}]})

    item = Item(0, "g", 0, [1], [{"role": "user", "content": "hi"}], 5, None)
    assert asyncio.run(_endpoint(chat).generate(item)).text == "yo"
    refused = _endpoint(lambda r: httpx.Response(400, json={"error": {"message": "prompt too long"}}))
    with pytest.raises(harness.ItemError, match="HTTP 400: prompt too long"):
        asyncio.run(refused.generate(item))
    with pytest.raises(harness.TargetDownError, match="HTTP 401"):
        asyncio.run(_endpoint(lambda r: httpx.Response(401, json={"error": {"message": "bad key"}})).generate(item))
    with pytest.raises(harness.TargetDownError, match="after 3 attempts"):
        asyncio.run(_endpoint(lambda r: httpx.Response(500, text="oops")).generate(item))


class CharTokenizer:
    """One token per character: truncation arithmetic is visible."""

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [ord(c) for c in text]

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return "".join(chr(i) for i in ids)


def test_truncation_keeps_the_head_and_tail_halves() -> None:
    tok = CharTokenizer()
    text = "".join(chr(ord("a") + i % 26) for i in range(100))
    assert infinitebench.truncate_middle(tok, text, 100) == (text, 100)
    cut, n = infinitebench.truncate_middle(tok, text, 21)
    assert n == 21 and cut == text[:10] + text[-11:]
    with pytest.raises(ValueError, match="budget"):
        infinitebench.truncate_middle(tok, text, 1)


def test_truncation_with_a_real_tokenizer_fits_the_budget(default_model_dir: Path) -> None:
    from minicpm.tokenizer import Tokenizer

    tok = Tokenizer.from_pretrained(default_model_dir)
    text = "Once upon a time, " + " ".join(f"word{i}" for i in range(3000)) + " The end."
    for budget in (100, 257, 1000):
        cut, n = infinitebench.truncate_middle(tok, text, budget)
        assert n == len(tok.encode(cut, add_special_tokens=False)) <= budget and n >= budget - 3
        assert cut.startswith("Once upon a time") and cut.endswith("The end.")


def test_prompts_fill_the_benchmarks_templates() -> None:
    ex = {"id": 0, "context": "CTX", "input": "The largest number of the list is: ", "answer": [9], "options": []}
    assert (
        infinitebench.fill("math_find", ex)
        == "What is the largest number in the following list?\n\nCTX\n\n" + ex["input"]
    )
    ex = {"id": 1, "context": "CODE", "input": "func_12(-3)", "answer": [1], "options": []}
    assert infinitebench.fill("code_run", ex, "completion") == (
        "There is a function called func_12 in the following Python code.\n\nCODE\n\n"
        "Please compute the exact value of func_12(-3). The value of func_12(-3) is"
    )
    ex = {"id": 2, "context": "BOOK", "input": "Who?", "answer": ["b"], "options": ["a", "b", "c", "d"]}
    assert infinitebench.fill("longbook_choice_eng", ex).endswith("Don't say anything else.\nA. a\nB. b\nC. c\nD. d")
    assert infinitebench.fill("passkey", {"context": "N", "input": "Q?"}, "completion").endswith(
        "Q?\n\nThe pass key is"
    )
    with pytest.raises(ValueError, match="4 options"):
        infinitebench.fill("code_debug", {"id": 3, "context": "", "input": "", "options": ["a"]})
    with pytest.raises(ValueError, match="prompt style"):
        infinitebench.fill("passkey", ex, "gpt4")
    with pytest.raises(ValueError, match="unknown InfiniteBench task"):
        infinitebench.check_tasks(["passkey", "pass_key"])


def test_loading_names_the_file_and_line(tmp_path: Path) -> None:
    (tmp_path / "passkey.jsonl").write_text('{"id": 0, "context": "c", "input": "i", "answer": ["1"]}\n{oops\n')
    with pytest.raises(ValueError, match=r"passkey.jsonl:2: not JSON"):
        infinitebench.load_task(tmp_path, "passkey")
    assert len(infinitebench.load_task(tmp_path, "passkey", limit=1)) == 1
    with pytest.raises(ValueError, match=r"kv_retrieval\.jsonl: no such file"):
        infinitebench.load_task(tmp_path, "kv_retrieval")
    (tmp_path / "math_calc.jsonl").write_text('{"id": 0, "context": "c"}\n')
    with pytest.raises(ValueError, match="missing field"):
        infinitebench.load_task(tmp_path, "math_calc")
