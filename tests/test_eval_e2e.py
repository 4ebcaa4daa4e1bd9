"""``minicpm eval`` end to end on a tiny random model with a real tokenizer: the in-process engine,
one ``minicpm serve``, two servers at once and two merged shards give the same predictions; the
file tools (generate, score, compare) on what those runs wrote."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

pytest.importorskip("uvicorn")

from helpers import LiveServer, random_model, tiny_config

from minicpm import LLM
from minicpm.cli import main
from minicpm.engine.async_engine import BackgroundEngine
from minicpm.server.app import ServerState

TASKS = "passkey,kv_retrieval"
FILES = ("preds_passkey.jsonl", "preds_kv_retrieval.jsonl")


@pytest.fixture(scope="module")
def tiny(default_model_dir: Path, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny")
    config = tiny_config(vocab_size=49152, max_position_embeddings=2048, rope_scaling=None)
    random_model(config, seed=3).save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(default_model_dir / name, path / name)
    return path


@pytest.fixture(scope="module")
def data(tiny: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("data")
    for task, length in (("passkey", 600), ("kv_retrieval", 900)):
        args = ["eval", "generate", task, "--length", str(length), "--count", "3", "--model", str(tiny)]
        assert main([*args, "--output", str(out)]) == 0
    return out


def evaluate(tiny: Path, data: Path, out: Path, *extra: str) -> None:
    args = ["eval", "infinitebench", "--data", str(data), "--tasks", TASKS, "--model", str(tiny)]
    assert main([*args, "--output", str(out), "--no-progress", *extra]) == 0


def server(tiny: Path) -> LiveServer:
    llm = LLM.from_pretrained(tiny)
    return LiveServer(ServerState(engine=BackgroundEngine(llm.engine), tokenizer=llm.tokenizer, served_names=["tiny"]))


def test_engine_server_two_servers_and_merged_shards_agree(tiny: Path, data: Path, tmp_path: Path, capsys) -> None:
    evaluate(tiny, data, tmp_path / "engine")
    table = capsys.readouterr().out
    assert "| model | avg | avg w/o code&math | passkey | kv |" in table
    rows = [json.loads(x) for x in (tmp_path / "engine" / "preds_passkey.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(r["prompt_tokens"] > 500 and r["output_tokens"] <= 6 for r in rows)
    a, b = server(tiny), server(tiny)
    try:
        evaluate(tiny, data, tmp_path / "one", "--endpoint", a.url)
        evaluate(tiny, data, tmp_path / "two", "--endpoint", a.url, "--endpoint", b.url + "/v1", "--concurrency", "2")
    finally:
        a.stop()
        b.stop()
    evaluate(tiny, data, tmp_path / "s0", "--shard", "0/2")
    evaluate(tiny, data, tmp_path / "s1", "--shard", "1/2")
    assert main(["eval", "merge", str(tmp_path / "s0"), str(tmp_path / "s1"), "--output", str(tmp_path / "m")]) == 0
    for run in ("one", "two", "m"):
        for name in FILES:
            assert (tmp_path / run / name).read_bytes() == (tmp_path / "engine" / name).read_bytes(), (run, name)
    report = json.loads((tmp_path / "m" / "report.json").read_text())
    assert report["settings"]["num_items"] == 6 and set(report["scores"]) >= {"passkey", "kv_retrieval"}
    # answers that reached the benchmark's answer limit are counted per task, and the table says so
    cut = {
        t: sum(json.loads(x)["finish_reason"] == "length" for x in (tmp_path / "m" / f).read_text().splitlines())
        for t, f in zip(TASKS.split(","), FILES, strict=True)
    }
    assert {t: report["tasks"][t]["cut_by_limit"] for t in cut} == cut and cut["passkey"] > 0  # a random model rambles
    assert f"| passkey | 3 | {report['tasks']['passkey']['mean_prompt_tokens']:.0f} | 6 | {cut['passkey']} |" in table
    assert f"passkey {cut['passkey']} of 3" in table and "`--style completion` prompts end where" in table
    capsys.readouterr()
    assert main(["eval", "compare", str(tmp_path / "engine"), str(tmp_path / "two")]) == 0
    compared = capsys.readouterr().out
    assert compared.splitlines()[0] == "| | engine | two |"
    assert "| passkey |" in compared and "| targets | minicpm engine" in compared
    assert (
        main(
            ["eval", "score", str(tmp_path / "engine" / "preds_kv_retrieval.jsonl"), "--task", "kv_retrieval", "--json"]
        )
        == 0
    )
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last["task"] == "kv_retrieval" and last["n"] == 3
    assert last["score"] == pytest.approx(report["scores"]["kv_retrieval"])


def test_a_rerun_skips_what_is_done_and_other_settings_are_refused(tiny: Path, data: Path, tmp_path: Path, capsys):
    evaluate(tiny, data, tmp_path / "r", "--limit", "1")
    before = (tmp_path / "r" / "preds_passkey.jsonl").read_bytes()
    evaluate(tiny, data, tmp_path / "r", "--limit", "1")
    assert "(2 done before)" in capsys.readouterr().err
    assert (tmp_path / "r" / "preds_passkey.jsonl").read_bytes() == before
    args = ["eval", "infinitebench", "--data", str(data), "--tasks", TASKS, "--model", str(tiny)]
    assert main([*args, "--output", str(tmp_path / "r"), "--style", "completion", "--limit", "1"]) == 2
    assert "holds a run with other settings (style: 'chat' there, 'completion' now)" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, words",
    [
        (["eval", "infinitebench", "--data", "D", "--shard", "2/2"], "--shard: I must be in [0, N)"),
        (["eval", "infinitebench", "--data", "D", "--served-model", "x"], "--served-model needs --endpoint"),
        (["eval", "infinitebench", "--data", "D", "--endpoint", "localhost:8000"], "expected an http://"),
        (["eval", "infinitebench", "--data", "D", "--tasks", "passkey,nope"], "unknown InfiniteBench task(s) nope"),
        (["eval", "ruler", "--lengths", "4096,x"], "--lengths: expected comma-separated integers"),
        (["eval", "score", "missing.jsonl", "--task", "passkey"], "missing.jsonl: No such file"),
        (["eval", "score", "x.jsonl", "--task", "pass"], "--task pass: unknown"),
        (["eval", "generate", "longbook_qa_eng", "--length", "100", "--output", "o"], "no generator for"),
        (["eval", "compare", "nowhere"], "nowhere: no report.json"),
    ],
)
def test_bad_flags_are_one_line(argv: list[str], words: str, capsys, tmp_path: Path, monkeypatch, default_model_dir):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert words in err and err.count("\n") == 1, err


def test_ray_replicas_give_the_same_predictions(tiny: Path, data: Path, tmp_path: Path) -> None:
    ray = pytest.importorskip("ray")
    evaluate(tiny, data, tmp_path / "engine")
    try:
        evaluate(tiny, data, tmp_path / "ray", "--ray", "2")
    finally:
        ray.shutdown()
    for name in FILES:
        assert (tmp_path / "ray" / name).read_bytes() == (tmp_path / "engine" / name).read_bytes()
