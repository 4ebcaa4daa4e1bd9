"""``minicpm eval perplexity``: windows as llama.cpp's tool cuts them, against a direct computation
from the plain model's logits, on the embedded default model."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from minicpm import MiniCPMForCausalLM
from minicpm.cli import main
from minicpm.eval.perplexity import window_plan
from minicpm.tokenizer import Tokenizer

TEXT = (
    "The river rose in the spring, as it did every year, and the people of the valley moved their "
    "sheep to the high meadows. Old Marta, who had seen sixty floods, said this one would be gentle; "
    "the miller said otherwise, and for once the village listened to the miller. By the third day the "
    "water had reached the church steps, and the children floated paper boats down the main street. "
) * 4


def test_window_plan_scores_each_token_once() -> None:
    assert window_plan(10, 4, 4) == [(0, 2), (4, 2)]  # non-overlapping: the second half of each
    assert window_plan(10, 4, 1) == [(s, 3) for s in range(7)]  # every window scores its last token
    scored = [start + j for start, first in window_plan(100, 16, 8) for j in range(first, 16)]
    assert len(scored) == len(set(scored))
    with pytest.raises(ValueError, match="shorter than one window"):
        window_plan(10, 16, 16)
    with pytest.raises(ValueError, match="--stride must be from 1 to --context"):
        window_plan(100, 16, 17)


def direct(model: MiniCPMForCausalLM, ids: list[int], context: int, stride: int) -> float:
    nll = []
    with torch.no_grad():
        for start, first in window_plan(len(ids), context, stride):
            window = torch.tensor([ids[start : start + context]])
            logp = torch.log_softmax(model(window)[0].double(), dim=-1)
            nll += [-logp[p - 1, window[0, p]].item() for p in range(first, context)]
    return math.exp(sum(nll) / len(nll))


@pytest.mark.parametrize(("context", "stride"), [(64, None), (48, 16)])
def test_perplexity_equals_a_direct_computation(default_model_dir: Path, tmp_path, capsys, context, stride) -> None:
    text = tmp_path / "text.txt"
    text.write_text(TEXT, encoding="utf-8")
    args = ["eval", "perplexity", str(text), "--context", str(context), "--json"]
    assert main(args + (["--stride", str(stride)] if stride else [])) == 0
    got = json.loads(capsys.readouterr().out)
    ids = Tokenizer.from_pretrained(default_model_dir).encode(TEXT)
    model = MiniCPMForCausalLM.from_pretrained(default_model_dir)
    expected = direct(model, ids, context, stride or context)
    assert got["perplexity"] == pytest.approx(expected, rel=1e-4)
    assert got["text_tokens"] == len(ids) and got["windows"] == len(window_plan(len(ids), context, stride or context))
    assert 0 < got["stderr"] < got["perplexity"] and 1 < got["perplexity"] < 100  # a coherent English text


def test_perplexity_line_and_errors(default_model_dir: Path, tmp_path, capsys) -> None:
    text = tmp_path / "text.txt"
    text.write_text(TEXT, encoding="utf-8")
    assert main(["eval", "perplexity", str(text), "--context", "64", "--quantize", "int8"]) == 0
    assert capsys.readouterr().out.startswith("PPL = ")
    assert main(["eval", "perplexity", str(text), "--context", "100000"]) == 2
    assert "longer than the model's context" in capsys.readouterr().err
    (tmp_path / "empty.txt").write_text(" \n", encoding="utf-8")
    assert main(["eval", "perplexity", str(tmp_path / "empty.txt")]) == 2
    assert "is empty" in capsys.readouterr().err
