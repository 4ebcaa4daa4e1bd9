"""Quantized checkpoints end to end: convert --quantize, load back bit for bit, the engine's setting,
and the embedded default model run as it ships (Q4_1 / Q8_0 GGUF) without a float copy."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import random_model, tiny_config
from safetensors import safe_open

from minicpm import MiniCPMForCausalLM, SamplingParams
from minicpm import weights as weights_module
from minicpm.cli import main as cli_main
from minicpm.engine import EngineConfig, LLMEngine
from minicpm.engine.cpu_kernels import native_kernels
from minicpm.quant import QuantizedEmbedding, QuantizedLinear

needs_native = pytest.mark.skipif(native_kernels() is None, reason="no C compiler: the native kernel cannot be built")
IDS = torch.tensor([[5, 17, 3, 88, 42, 9, 61, 23, 70, 11, 2, 95, 36, 48, 7, 30]])


@pytest.mark.parametrize(("fmt", "group", "tied"), [("int8", None, True), ("int4", 64, False), ("int8", 32, False)])
def test_convert_quantize_writes_a_checkpoint_that_loads_back_bit_for_bit(
    tmp_path: Path, fmt: str, group, tied: bool, monkeypatch
) -> None:
    config = tiny_config(tie_word_embeddings=tied, hidden_size=128, intermediate_size=256)
    random_model(config, seed=3).save_pretrained(tmp_path / "float")
    flags = ["--quantize", fmt] + (["--group-size", str(group)] if group else [])

    def moved(self, need: int) -> None:  # the header's room is reserved for every tensor the conversion writes
        raise AssertionError(f"{self.file}: the header outgrew its room ({need} bytes): the data was written twice")

    monkeypatch.setattr(weights_module._SafetensorsWriter, "_move_data", moved)
    assert cli_main(["convert", str(tmp_path / "float"), str(tmp_path / "q"), *flags]) == 0

    with safe_open(str(tmp_path / "q" / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    assert "model.layers.0.self_attn.q_proj.qweight" in names
    if tied:  # the table is the head: quantized once, embeddings looked up from its codes
        assert "model.embed_tokens.qweight" in names and not any(n.startswith("lm_head") for n in names)
    else:  # an untied table is quantized on its own, in the head's format
        assert {"lm_head.qweight", "model.embed_tokens.qweight"} <= names and "model.embed_tokens.weight" not in names
    qconfig = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    layers = f"{fmt}-g{group}" if group else f"{fmt}-per-channel"
    assert qconfig["formats"] == sorted({layers, "int8-per-channel" if fmt == "int4" else layers})  # int4: 8-bit head

    in_memory = MiniCPMForCausalLM.from_pretrained(tmp_path / "float", quantize=fmt, group_size=group)
    loaded = MiniCPMForCausalLM.from_pretrained(tmp_path / "q")
    head_group = config.hidden_size if fmt == "int4" else group or config.hidden_size
    assert isinstance(loaded.lm_head, QuantizedLinear) and loaded.lm_head.group == head_group
    assert isinstance(loaded.model.embed_tokens, QuantizedEmbedding)
    assert (loaded.lm_head is loaded.model.embed_tokens.table) == tied
    assert loaded.model.embed_tokens.table.group == head_group
    with torch.no_grad():
        assert torch.equal(loaded(IDS), in_memory(IDS))
        for name, t in in_memory.named_buffers():
            assert torch.equal(t, loaded.get_buffer(name)), name
    # a second conversion of the quantized checkpoint changes nothing; "none" writes the dequantized weights
    assert cli_main(["convert", str(tmp_path / "q"), str(tmp_path / "again")]) == 0
    assert torch.equal(MiniCPMForCausalLM.from_pretrained(tmp_path / "again")(IDS), loaded(IDS))
    assert cli_main(["convert", str(tmp_path / "q"), str(tmp_path / "deq"), "--quantize", "none"]) == 0
    deq = MiniCPMForCausalLM.from_pretrained(tmp_path / "deq")
    assert type(deq.lm_head) is torch.nn.Linear
    if tied:  # the table dequantized, the head tied to it
        assert deq.lm_head.weight is deq.model.embed_tokens.weight
        assert torch.equal(deq.lm_head.weight, loaded.lm_head.dequantize())
    else:
        assert torch.equal(deq.lm_head.weight, loaded.lm_head.dequantize())
        assert torch.equal(deq.model.embed_tokens.weight, loaded.model.embed_tokens.table.dequantize())
    assert torch.equal(deq.model.layers[1].mlp.down_proj.weight, loaded.model.layers[1].mlp.down_proj.dequantize())


def test_bad_quantize_settings_are_named(tmp_path: Path, capsys) -> None:
    random_model(tiny_config()).save_pretrained(tmp_path / "float")
    assert (
        cli_main(["convert", str(tmp_path / "float"), str(tmp_path / "q"), "--quantize", "int4", "--group-size", "16"])
        == 2
    )
    assert "int4 group size must be one of 32, 64, 128, got 16" in capsys.readouterr().err
    assert not (tmp_path / "q").exists()
    with pytest.raises(ValueError, match="multiple of it"):  # intermediate 96 is no multiple of 64
        MiniCPMForCausalLM.from_pretrained(tmp_path / "float", quantize="int4", group_size=64)
    with pytest.raises(ValueError, match="a group size applies to quantize int8 or int4, not 'none'"):
        MiniCPMForCausalLM.from_pretrained(tmp_path / "float", quantize="none", group_size=32)


@needs_native
def test_engine_setting_and_loader_quantize_alike(tmp_path: Path, one_thread) -> None:
    """EngineConfig(quantize=...) over a float model and a checkpoint loaded quantized give the same
    panels, hence the same greedy tokens."""
    config = tiny_config(num_key_value_heads=2)
    random_model(config, seed=5).save_pretrained(tmp_path / "float")
    settings = EngineConfig(block_size=8, quantize="int4")
    float_model = MiniCPMForCausalLM.from_pretrained(tmp_path / "float")
    loaded = MiniCPMForCausalLM.from_pretrained(tmp_path / "float", quantize="int4")
    prompts = [(IDS[0] % 97).tolist(), (IDS[0, :9] % 97).tolist()]
    params = SamplingParams(max_new_tokens=8, ignore_eos=True)
    a = LLMEngine(float_model, None, settings).generate(prompts, params)
    b = LLMEngine(loaded, None, EngineConfig(block_size=8)).generate(prompts, params)
    assert [c.token_ids for c in a] == [c.token_ids for c in b]
    with pytest.raises(ValueError, match="prepared with quantize='int4', not 'int8'"):
        LLMEngine(float_model, None, EngineConfig(block_size=8, quantize="int8"))


@needs_native
def test_default_model_runs_as_it_ships(default_model_dir: Path, one_thread) -> None:
    """The embedded SmolLM2 GGUF (Q4_1 layers, a Q8_0 table tied to the head) loads quantized with
    no float copy of its weights, and decodes the greedy tokens of its dequantized float32 self."""
    from minicpm import LLM
    from minicpm.engine.layers import PanelEmbedding, PanelLinear

    shipped = LLM.from_pretrained(default_model_dir, device="cpu")
    model = shipped.engine.runner.model
    embed = model.model.embed_tokens
    assert isinstance(embed, PanelEmbedding) and embed.head is model.lm_head.inner  # one copy of the table
    assert (embed.head.weights, embed.head.group) == ("int8", 32)
    panels = [m for m in model.modules() if isinstance(m, PanelLinear)]
    assert {p.weights for p in panels} == {"int4", "int8"} and len(
        panels
    ) == 4 * 30 + 1  # qkv, o, gate-up, down; the head
    floats = [n for n, p in model.named_parameters() if p.dim() == 2]
    assert floats == []  # every matrix is quantized: norms only

    float32 = LLM.from_pretrained(default_model_dir, device="cpu", engine_config=EngineConfig(quantize="none"))
    assert not any(isinstance(m, QuantizedLinear) for m in float32.engine.runner.model.modules())
    params = SamplingParams(max_new_tokens=12)
    prompt = "The capital of France is"
    assert shipped.generate([prompt], params)[0].token_ids == float32.generate([prompt], params)[0].token_ids


@needs_native
@pytest.mark.parametrize(
    ("dtype", "fmt", "group"),
    [
        (torch.float32, None, None),
        (torch.bfloat16, None, None),
        (torch.float32, "int8", None),
        (torch.float32, "int8", 32),
        (torch.bfloat16, "int4", 64),
    ],
)
def test_a_tied_table_is_read_from_the_heads_panels(dtype, fmt, group, monkeypatch) -> None:
    """Tied embeddings, float or quantized: the engine keeps one copy of the table (the head's
    panels) and looks rows up from it bit for bit as the table itself gives them."""
    from minicpm.engine import layers
    from minicpm.engine.layers import PanelEmbedding
    from minicpm.quant import quantize

    monkeypatch.setattr(layers, "cpu_linear", lambda model: "panel")
    config = tiny_config(tie_word_embeddings=True, hidden_size=128, intermediate_size=256)
    model = random_model(config, seed=8).to(dtype)
    if fmt is not None:
        model.model.embed_tokens = QuantizedEmbedding(quantize(model.model.embed_tokens.weight, fmt, group), dtype)
        model.tie_weights()
        assert model.lm_head is model.model.embed_tokens.table
    ids = torch.arange(config.vocab_size)[None]
    expected = model.model.embed_tokens(ids)
    engine = LLMEngine(model, None, EngineConfig(block_size=8))
    embed = engine.runner.model.model.embed_tokens
    assert isinstance(embed, PanelEmbedding) and embed.head is engine.runner.model.lm_head.inner
    assert torch.equal(embed(ids), expected)
