"""The engine end to end with the native CPU kernels off (``MINICPM_CPU_KERNELS=off``, as on a
machine without a C compiler), float and quantized, in a fresh process: the ``cpu-torch`` backend is
chosen, nothing native runs, quantized layers stay quantized (never a silent float copy), and the
greedy tokens of paged, chunked, batched decoding are the plain model's (full recompute, no cache)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = r"""
import json, sys
import torch
from helpers import random_model, tiny_config
from minicpm import SamplingParams
from minicpm.engine import EngineConfig, LLMEngine
from minicpm.engine import cpu_kernels
from minicpm.quant import QuantizedLinear

torch.manual_seed(0)
quantize = sys.argv[1]
model = random_model(tiny_config(num_hidden_layers=2, num_key_value_heads=2, max_length=256), seed=3)
gen = torch.Generator().manual_seed(1)
prompts = [torch.randint(0, 97, (n,), generator=gen).tolist() for n in (37, 9, 60)]
config = EngineConfig(block_size=8, max_num_seqs=2, max_num_batched_tokens=16, quantize=quantize)
engine = LLMEngine(model, None, config)
got = [c.token_ids for c in engine.generate(prompts, SamplingParams(max_new_tokens=6, ignore_eos=True))]
expected = []
with torch.inference_mode():
    for ids in prompts:
        ids = list(ids)
        for _ in range(6):
            logits = model(torch.tensor([ids]))[0, -1]
            ids.append(int(logits.argmax()))
        expected.append(ids[-6:])
print(json.dumps({
    "native": cpu_kernels.native_kernels() is not None,
    "backend": engine.stats()["attention_backend"],
    "fused": engine.runner.fused is not None,
    "quantized_layers": sum(isinstance(m, QuantizedLinear) for m in model.modules()),
    "got": got,
    "expected": expected,
}))
"""


@pytest.mark.parametrize("quantize", ["none", "int8", "int4"])
def test_the_engine_runs_without_native_kernels(quantize: str, tmp_path: Path) -> None:
    env = {**os.environ, "MINICPM_CPU_KERNELS": "off", "MINICPM_CACHE": str(tmp_path)}
    tests = Path(__file__).parent
    env["PYTHONPATH"] = os.pathsep.join([str(tests), str(tests.parent), env.get("PYTHONPATH", "")])
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, quantize], capture_output=True, text=True, env=env, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["native"] is False and out["backend"] == "cpu-torch" and out["fused"] is False
    assert not list(tmp_path.iterdir())  # nothing was built
    if quantize == "none":
        assert out["quantized_layers"] == 0
    else:  # every decoder linear and the head stay quantized, run through torch
        assert out["quantized_layers"] >= 2 * 4 + 1
        assert "the quantized layers run through torch" in done.stderr
    assert out["got"] == out["expected"]


def test_a_linear_override_that_cannot_run_here_says_so(monkeypatch) -> None:
    """``MINICPM_CPU_LINEAR`` naming a product this dtype cannot use here is an error, not a quiet
    return to the default."""
    import torch

    from minicpm.engine import layers

    monkeypatch.delenv("MINICPM_CPU_LINEAR", raising=False)
    available = layers.linear_candidates(torch.bfloat16)
    monkeypatch.setenv("MINICPM_CPU_LINEAR", "blas")
    assert layers.linear_candidates(torch.float32) == ["blas"]
    if "blas" in available:
        assert layers.linear_candidates(torch.bfloat16) == ["blas"]
    else:
        with pytest.raises(ValueError, match=r"MINICPM_CPU_LINEAR=blas cannot run torch\.bfloat16 here"):
            layers.linear_candidates(torch.bfloat16)
