"""lm-evaluation-harness through ``minicpm serve`` scores a multiple-choice task as lm-eval on
transformers does, item by item and choice by choice (benchmarks/lm_eval_parity.py at full size).

lm-eval's ``local-completions`` scores a continuation with ``echo``, ``logprobs: 1`` and
``max_tokens: 1`` and reads ``token_logprobs[ctxlen:-1]``: it counts on exactly one generated entry
after the prompt's. The items are chat-formatted questions with one-sentence answers, after which
the model's greedy next token is its end of sequence (``<|im_end|>``): a server that left that
generated token out of the logprobs had lm-eval drop every such continuation's last token.
"""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("lm_eval")
pytest.importorskip("transformers")

from gguf_peer import float_checkpoint
from lm_eval_parity import (
    LmEval,
    compare,
    eos_is_next,
    hf_model_args,
    make_items,
    minicpm_server,
    run_lm_eval,
    server_model_args,
    write_task,
)

ITEMS = 6
TOLERANCE = 1e-3


@pytest.fixture(scope="module")
def float_model(default_model_dir: Path) -> Path:
    """The embedded model's weights in float32 as a Llama checkpoint transformers loads."""
    return float_checkpoint()  # into the session's MINICPM_CACHE, which default_model_dir set


def test_local_completions_gives_transformers_loglikelihoods(float_model: Path, tmp_path: Path) -> None:
    items = make_items(ITEMS)
    task = write_task(tmp_path / "task", items, float_model)
    name = "smol-f32"
    hf_args = ["--device", "cpu", "--batch_size", "8"]
    # the lm-eval runs overlap what comes before their results (each spends seconds starting up on one core)
    with LmEval("hf", hf_model_args(float_model), task, tmp_path / "hf", hf_args) as hf_run:
        eos_next = eos_is_next(float_model, task, right_only=True)
        # the case that broke lm-eval: the end of sequence is the greedy token after the right answers
        assert sum(eos_next) >= ITEMS // 2, eos_next
        with minicpm_server(float_model, name, log=tmp_path / "server.log") as url:
            margs = server_model_args(url, name, float_model, concurrent=2)
            served = run_lm_eval("local-completions", margs, task, tmp_path / "served")
        hf = hf_run.result()

    assert sorted(hf["lls"]) == sorted(served["lls"]) == list(range(ITEMS))
    assert all(len(v) == 4 for v in hf["lls"].values())
    far = [
        (doc, i, got, want)
        for doc in hf["lls"]
        for i, ((got, _), (want, _)) in enumerate(zip(served["lls"][doc], hf["lls"][doc], strict=True))
        if abs(got - want) > TOLERANCE
    ]
    assert not far, f"(item, choice, served, transformers) beyond {TOLERANCE}: {far}"
    diff = compare(served, hf, TOLERANCE)
    assert diff["compared"] == 4 * ITEMS and diff["over_tolerance"] == 0 and diff["is_greedy_differs"] == 0
    assert (served["acc"], served["acc_norm"]) == (hf["acc"], hf["acc_norm"])
    # a real task: the scores tell the choices apart, and the right one wins somewhere
    assert all(len({round(ll, 3) for ll, _ in v}) == 4 for v in hf["lls"].values())
    assert hf["acc"] > 0
