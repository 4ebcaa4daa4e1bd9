"""The fused decoder (csrc/decode.c): a step's decode rows through every layer in one native call,
against the eager model's layers, on tiny models of every weight format and on the default model."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from helpers import random_model, tiny_config

from minicpm import SamplingParams
from minicpm.engine import EngineConfig, LLMEngine, layers
from minicpm.engine.cpu_kernels import native_kernels

pytestmark = pytest.mark.skipif(native_kernels() is None, reason="no C compiler: the native kernels cannot be built")


@pytest.fixture
def panels(monkeypatch):
    """Every float linear layer on the native panels (what the fused decoder needs), whatever the
    start-up probe would pick for a tiny model."""
    monkeypatch.setattr(layers, "cpu_linear", lambda model: "panel")


def _engines(model, settings: EngineConfig) -> tuple[LLMEngine, LLMEngine]:
    fused = LLMEngine(model, None, settings)
    assert fused.runner.fused is not None
    eager = LLMEngine(model, None, dataclasses.replace(settings, fused_decode=False))
    assert eager.runner.fused is None
    return fused, eager


def _kept_logits(engine: LLMEngine) -> list[torch.Tensor]:
    """From now on, each step's sampled logits into the returned list."""
    seen = []
    sample = engine.runner.sampler.sample

    def keep(rows, seqs):
        seen.append(rows.clone())
        return sample(rows, seqs)

    engine.runner.sampler.sample = keep
    return seen


def _step_logits(engine: LLMEngine, prompts, params) -> tuple[list, list[torch.Tensor]]:
    seen = _kept_logits(engine)
    return engine.generate(prompts, params), seen


@pytest.mark.parametrize("kv_heads", [2, 4])
@pytest.mark.parametrize(
    ("dtype", "quantize", "group"),
    [
        (torch.float32, "none", None),
        (torch.bfloat16, "none", None),
        (torch.float32, "int8", None),
        (torch.float32, "int4", 64),
        (torch.bfloat16, "int8", 32),
    ],
)
def test_fused_steps_give_the_eager_layers_logits(panels, one_thread, dtype, quantize, group, kv_heads) -> None:
    """Decode-only and mixed steps, several rows, block tables of several blocks: each step's
    logits match the eager layers' (float32: to rounding, the same greedy tokens; bfloat16: the
    first step's tokens, logits within bfloat16's rounding)."""
    config = tiny_config(num_hidden_layers=2, num_key_value_heads=kv_heads, hidden_size=128, intermediate_size=256)
    model = random_model(config, seed=21).to(dtype)
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 97, (n,), generator=gen).tolist() for n in (30, 9, 45)]
    params = SamplingParams(max_new_tokens=10, ignore_eos=True)
    settings = EngineConfig(
        block_size=8, max_num_seqs=3, max_num_batched_tokens=24, quantize=quantize, group_size=group
    )
    fused, eager = _engines(model, settings)
    got, fused_logits = _step_logits(fused, prompts, params)
    expected, eager_logits = _step_logits(eager, prompts, params)
    if dtype == torch.float32:
        assert [c.token_ids for c in got] == [c.token_ids for c in expected]
        for a, b in zip(fused_logits, eager_logits, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    else:
        assert [c.token_ids[:2] for c in got] == [c.token_ids[:2] for c in expected]
        torch.testing.assert_close(fused_logits[1], eager_logits[1], rtol=0.05, atol=0.05)


def test_mixed_fused_concat_weights_and_no_gathers(panels, one_thread, monkeypatch) -> None:
    """q / k / v quantized in different formats (a ConcatLinear of three panels) run fused; a step
    mixing decodes with a prefill chunk sends its decode rows to one fused call and only the chunk
    through the model's attention; no step gathers a context."""
    from minicpm import quant
    from minicpm.engine import fused_decode

    config = tiny_config(num_hidden_layers=2, num_key_value_heads=2, hidden_size=128, intermediate_size=256)
    model = random_model(config, seed=4)
    reference = random_model(config, seed=4)
    with torch.no_grad():
        for layer, ref in zip(model.model.layers, reference.model.layers, strict=True):
            for name, fmt, group in (("q_proj", "int8", None), ("k_proj", "int4", 32), ("v_proj", "int8", 32)):
                q = quant.quantize(getattr(layer.self_attn, name).weight, fmt, group)
                setattr(layer.self_attn, name, q)
                getattr(ref.self_attn, name).weight.copy_(q.dequantize())
    fused = LLMEngine(model, None, EngineConfig(block_size=8, max_num_seqs=3, max_num_batched_tokens=24))
    assert type(fused.runner.model.model.layers[0].self_attn.qkv_proj).__name__ == "ConcatLinear"
    calls = []
    real = fused_decode.FusedDecoder.hidden_states

    def counted(self, ids, *args):
        calls.append(ids.shape[0])
        return real(self, ids, *args)

    monkeypatch.setattr(fused_decode.FusedDecoder, "hidden_states", counted)
    monkeypatch.setattr(torch.Tensor, "index_select", lambda *a, **k: pytest.fail("a gather"))
    gen = torch.Generator().manual_seed(9)
    prompts = [torch.randint(0, 97, (n,), generator=gen).tolist() for n in (12, 50, 5)]
    params = SamplingParams(max_new_tokens=6, ignore_eos=True)
    got = fused.generate(prompts, params)
    assert calls and max(calls) > 1  # several decode rows in one call, beside prefill chunks too
    monkeypatch.undo()
    plain = LLMEngine(
        reference, None, EngineConfig(block_size=8, max_num_seqs=3, max_num_batched_tokens=24, fused_decode=False)
    )
    assert [c.token_ids for c in got] == [c.token_ids for c in plain.generate(prompts, params)]


def test_a_decode_rows_logits_do_not_depend_on_its_neighbours(panels, one_thread) -> None:
    """Fused: a decode row's logits are bitwise the same alone, beside a prefill, beside decodes."""
    model = random_model(tiny_config(num_hidden_layers=2, hidden_size=128, intermediate_size=256), seed=5)
    gen = torch.Generator().manual_seed(2)
    first, second = (torch.randint(0, 97, (n,), generator=gen).tolist() for n in (30, 50))
    logits = []
    for neighbour in ("none", "prefill", "decode"):
        engine = LLMEngine(model, None, EngineConfig(block_size=8, max_num_batched_tokens=64))
        engine.add_request(first, SamplingParams(max_new_tokens=8, ignore_eos=True))
        if neighbour == "decode":
            engine.add_request(second, SamplingParams(max_new_tokens=8, ignore_eos=True))
        for _ in range(3):  # the prompts, then decode steps
            engine.step()
        if neighbour == "prefill":
            engine.add_request(second, SamplingParams(max_new_tokens=2, ignore_eos=True))
        seen = _kept_logits(engine)
        engine.step()
        logits.append(seen[0][0])
    assert torch.equal(logits[0], logits[1]) and torch.equal(logits[0], logits[2])


def test_a_bad_block_table_is_refused_by_name(panels) -> None:
    engine = LLMEngine(random_model(tiny_config(), seed=1), None, EngineConfig(block_size=8))
    fused = engine.runner.fused
    args = (torch.tensor([1]), torch.tensor([3]), torch.ones(1, 8), torch.tensor([3]))
    with pytest.raises(ValueError, match="fused decode: a block id outside the cache"):
        fused.hidden_states(
            *args,
            torch.tensor([[10**6]], dtype=torch.int32),
            torch.tensor([0], dtype=torch.int32),
            torch.tensor([4], dtype=torch.int32),
        )


def test_default_model_decodes_fused_with_the_eager_tokens(default_model_dir, one_thread) -> None:
    """The default model in float32: the fused decoder is what the engine uses without being asked,
    and its greedy tokens are the eager layers'."""
    from minicpm import LLM

    llm = LLM.from_pretrained(default_model_dir, device="cpu", engine_config=EngineConfig(quantize="none"))
    assert llm.engine.runner.fused is not None
    prompts = ["The capital of France is", "def fibonacci(n):"]
    params = SamplingParams(max_new_tokens=24, ignore_eos=True)
    got = [c.token_ids for c in llm.generate(prompts, params)]
    del llm
    config = EngineConfig(quantize="none", fused_decode=False)
    eager = LLM.from_pretrained(default_model_dir, device="cpu", engine_config=config)
    assert eager.engine.runner.fused is None
    assert got == [c.token_ids for c in eager.generate(prompts, params)]
