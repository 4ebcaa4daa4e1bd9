"""Loading, saving and converting checkpoints; errors that name the bad field or tensor."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import assert_close_rel, random_model, reference_logits, tiny_config

from minicpm import CheckpointError, ConfigError, MiniCPMConfig, MiniCPMForCausalLM
from minicpm.cli import main as cli_main
from minicpm.config import MINICPM_2B_128K
from minicpm.convert import ConversionError, convert_checkpoint, convert_gguf
from minicpm.default_model import SMOLLM2_SAMPLING
from minicpm.quant import QuantizedLinear
from minicpm.sampling import checkpoint_sampling_defaults

IDS = torch.randint(0, 97, (2, 90), generator=torch.Generator().manual_seed(0))


pytestmark = pytest.mark.usefixtures("one_thread")


def logits_of(path: Path) -> torch.Tensor:
    with torch.no_grad():
        return MiniCPMForCausalLM.from_pretrained(path)(IDS)


@pytest.fixture(params=["untied", "tied"])
def model(request) -> MiniCPMForCausalLM:
    return random_model(tiny_config(num_key_value_heads=2, tie_word_embeddings=request.param == "tied"))


def test_bin_safetensors_and_shards_load_identically(model, tmp_path: Path) -> None:
    with torch.no_grad():
        expected = model(IDS)
    model.save_pretrained(tmp_path / "single")
    model.save_pretrained(tmp_path / "sharded", max_shard_bytes=20_000)
    shards = sorted(p.name for p in (tmp_path / "sharded").glob("*.safetensors"))
    assert len(shards) > 2 and (tmp_path / "sharded" / "model.safetensors.index.json").exists()

    state = {k: v.clone() for k, v in model.state_dict().items()}
    (tmp_path / "bin").mkdir()
    model.config.save(tmp_path / "bin" / "config.json")
    torch.save(state, tmp_path / "bin" / "pytorch_model.bin")

    # sharded .bin with an index, as transformers writes it
    (tmp_path / "binshards").mkdir()
    model.config.save(tmp_path / "binshards" / "config.json")
    names = list(state)
    halves = {"pytorch_model-00001-of-00002.bin": names[::2], "pytorch_model-00002-of-00002.bin": names[1::2]}
    weight_map = {}
    for file, part in halves.items():
        torch.save({n: state[n] for n in part}, tmp_path / "binshards" / file)
        weight_map.update({n: file for n in part})
    (tmp_path / "binshards" / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))

    for name in ("single", "sharded", "bin", "binshards"):
        loaded = MiniCPMForCausalLM.from_pretrained(tmp_path / name)
        for key, tensor in model.state_dict().items():
            assert torch.equal(loaded.state_dict()[key], tensor), (name, key)
        assert torch.equal(logits_of(tmp_path / name), expected), name


def test_default_dtype_and_explicit_bfloat16(model, tmp_path: Path) -> None:
    model.save_pretrained(tmp_path)
    assert MiniCPMForCausalLM.from_pretrained(tmp_path).dtype == torch.float32
    bf16 = MiniCPMForCausalLM.from_pretrained(tmp_path, dtype="bfloat16")
    assert bf16.dtype == torch.bfloat16
    assert all(p.device.type == "cpu" for p in bf16.parameters())


def _write_bin(path: Path, config: MiniCPMConfig, state: dict[str, torch.Tensor]) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    config.save(path / "config.json")
    torch.save(state, path / "pytorch_model.bin")
    return path


def test_missing_unexpected_and_misshaped_tensors_are_named(tmp_path: Path) -> None:
    config = tiny_config()
    state = dict(random_model(config).state_dict())
    del state["model.layers.1.mlp.up_proj.weight"]
    state["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(64)
    state["model.layers.2.self_attn.k_proj.weight"] = torch.zeros(32, 64)
    state["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.zeros(8)  # derived: ignored
    path = _write_bin(tmp_path / "bad", config, state)
    with pytest.raises(CheckpointError) as err:
        MiniCPMForCausalLM.from_pretrained(path)
    msg = str(err.value)
    assert "missing tensor model.layers.1.mlp.up_proj.weight" in msg
    assert "unexpected tensor model.layers.0.self_attn.q_proj.bias" in msg
    assert "model.layers.2.self_attn.k_proj.weight has shape [32, 64], expected [64, 64]" in msg
    assert "inv_freq" not in msg


def test_missing_weights_and_shards_are_reported(tmp_path: Path) -> None:
    tiny_config().save(tmp_path / "config.json")
    with pytest.raises(CheckpointError, match="no weights in"):
        MiniCPMForCausalLM.from_pretrained(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "model-1.safetensors"}}))
    with pytest.raises(CheckpointError, match=r"model-1\.safetensors"):
        MiniCPMForCausalLM.from_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="does not exist"):
        MiniCPMForCausalLM.from_pretrained(tmp_path / "nowhere")


@pytest.mark.parametrize(
    "change, field",
    [
        ({"num_attention_heads": 5}, "hidden_size"),
        ({"num_key_value_heads": 3}, "num_key_value_heads"),
        ({"hidden_size": -64}, "hidden_size"),
        ({"num_hidden_layers": 0}, "num_hidden_layers"),
        ({"vocab_size": "many"}, "vocab_size"),
        ({"rope_scaling": {"type": "yarn", "factor": 4.0}}, "rope_scaling"),
        ({"rope_scaling": {"type": "dynamic", "factor": -1}}, "rope_scaling.factor"),
        ({"rms_norm_eps": 0}, "rms_norm_eps"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"model_type": "gpt2"}, "model_type"),
    ],
)
def test_bad_config_names_the_field(tmp_path: Path, change: dict, field: str) -> None:
    raw = tiny_config().to_dict() | change
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match=f"'{field}'"):
        MiniCPMForCausalLM.from_pretrained(tmp_path)


def test_config_defaults_and_llama_mapping() -> None:
    minicpm = MiniCPMConfig.from_dict(
        {
            "architectures": ["MiniCPMForCausalLM"],
            "hidden_size": 64,
            "num_attention_heads": 4,
            "intermediate_size": 8,
            "vocab_size": 10,
            "num_hidden_layers": 2,
        }
    )
    # the reference MiniCPMConfig defaults
    assert (minicpm.scale_emb, minicpm.scale_depth, minicpm.dim_model_base) == (1.0, 1.0, 1.0)
    assert minicpm.tie_word_embeddings and minicpm.rms_norm_eps == 1e-6 and minicpm.rope_theta == 10000.0
    llama = MiniCPMConfig.from_dict(
        {
            "model_type": "llama",
            "hidden_size": 64,
            "num_attention_heads": 4,
            "num_hidden_layers": 9,
            "intermediate_size": 8,
            "vocab_size": 10,
        }
    )
    assert llama.residual_scale == pytest.approx(1.0) and llama.logit_scale == 1.0 and llama.scale_emb == 1.0
    assert not llama.tie_word_embeddings


# The config.json of MiniCPM-2B-128k as OpenBMB publishes it, with only the sizes made tiny.
PUBLISHED_CONFIG = MINICPM_2B_128K | {
    "hidden_size": 72,
    "intermediate_size": 180,
    "max_position_embeddings": 64,
    "num_attention_heads": 6,
    "num_hidden_layers": 4,
    "num_key_value_heads": 6,
    "vocab_size": 120,
    "dim_model_base": 8,
}


def test_checkpoint_in_the_published_layout(tmp_path: Path) -> None:
    """A bf16 pytorch_model.bin written by plain torch code (not ours) with the real field names."""
    c = PUBLISHED_CONFIG
    g = torch.Generator().manual_seed(7)
    h, m, L = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"]

    def w(*shape):
        return (torch.randn(*shape, generator=g) * 0.08).to(torch.bfloat16)

    state = {
        "model.embed_tokens.weight": w(c["vocab_size"], h),
        "model.norm.weight": (1 + w(h)),
        "lm_head.weight": w(c["vocab_size"], h),
    }
    for i in range(L):
        p = f"model.layers.{i}."
        state |= {
            p + "self_attn.q_proj.weight": w(h, h),
            p + "self_attn.k_proj.weight": w(h, h),
            p + "self_attn.v_proj.weight": w(h, h),
            p + "self_attn.o_proj.weight": w(h, h),
            p + "mlp.gate_proj.weight": w(m, h),
            p + "mlp.up_proj.weight": w(m, h),
            p + "mlp.down_proj.weight": w(h, m),
            p + "input_layernorm.weight": 1 + w(h),
            p + "post_attention_layernorm.weight": 1 + w(h),
        }
    (tmp_path / "config.json").write_text(json.dumps(c))
    torch.save(state, tmp_path / "pytorch_model.bin")
    model = MiniCPMForCausalLM.from_pretrained(tmp_path)
    config = model.config
    assert config.model_type == "minicpm" and config.rope_type == "dynamic" and config.head_dim == 12
    assert config.residual_scale == pytest.approx(1.4 / 2) and config.logit_scale == pytest.approx(8 / 72)
    ids = torch.randint(0, c["vocab_size"], (1, 100), generator=g)  # beyond max_position_embeddings
    with torch.no_grad():
        ours = model(ids)
    assert_close_rel(ours, reference_logits(config, state, ids), 1e-4)


def test_convert_bin_to_safetensors(tmp_path: Path, capsys) -> None:
    model = random_model(tiny_config())
    src = _write_bin(tmp_path / "src", model.config, dict(model.state_dict()))
    carried = ("tokenizer_config.json", "generation_config.json", "chat_template.jinja", "README.md", "LICENSE")
    for name in carried:
        (src / name).write_text(f"{{}} {name}")
    (src / "modeling_minicpm.py").write_text("raise SystemExit")  # remote code: never carried
    (src / ".gitattributes").write_text("*.bin filter=lfs")
    (src / "model.gguf").write_text("another format's weights")
    assert cli_main(["convert", str(src), str(tmp_path / "dst")]) == 0
    assert "wrote" in capsys.readouterr().out
    files = sorted(p.name for p in (tmp_path / "dst").iterdir())
    assert files == sorted(["config.json", "model.safetensors", *carried])
    assert all((tmp_path / "dst" / name).read_text() == f"{{}} {name}" for name in carried)
    assert torch.equal(logits_of(tmp_path / "dst"), logits_of(src))
    # an existing destination is refused, a broken source leaves nothing behind
    assert cli_main(["convert", str(src), str(tmp_path / "dst")]) == 2
    assert "already exists" in capsys.readouterr().err
    state = dict(model.state_dict())
    del state["model.norm.weight"]
    bad = _write_bin(tmp_path / "bad", model.config, state)
    with pytest.raises(CheckpointError, match=r"missing tensor model\.norm\.weight"):
        convert_checkpoint(bad, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if "partial" in p.name]


# ------------------------------------------------------------------------------------- GGUF
gguf = pytest.importorskip("gguf")


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's HF-to-GGUF permutation of Q/K rows (written independently for the test)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _spm_file() -> Path:
    spec = importlib.util.find_spec("mistral_common")
    if spec is None or spec.origin is None:
        pytest.skip("mistral-common (tokenizer.model test data) is not installed")
    return Path(spec.origin).parent / "data" / "tokenizer.model.v1"


# GGUF types by layer for the round trip: q / k / v in three formats (their fusion cannot stack
# them), gate / up alike (stacked), down in float
MIXED_TYPES = {
    "q_proj": "Q8_0",
    "k_proj": "Q4_1",
    "v_proj": "Q4_0",
    "o_proj": "Q8_0",
    "gate_proj": "Q4_1",
    "up_proj": "Q4_1",
    "embed_tokens": "Q8_0",
    "lm_head": "Q4_0",
}


def _write_gguf(path: Path, arch: str, config, state, tokens, scores, types, qtypes: dict[str, str]) -> dict:
    """A GGUF of ``state`` with each 2-D weight in ``qtypes``' type for its layer (else F32);
    returns what each weight dequantizes to, by checkpoint name."""
    import gguf

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_dimension_count(config.head_dim)
    if arch == "minicpm":
        writer.add_embedding_scale(config.scale_emb)
        writer.add_residual_scale(config.scale_depth / math.sqrt(config.num_hidden_layers))
        writer.add_logit_scale(config.hidden_size / config.dim_model_base)
        writer.add_float32("general.sampling.temp", 0.6)  # the file's own sampling settings
        writer.add_float32("general.sampling.top_p", 0.75)
        writer.add_int32("general.sampling.top_k", 30)
    else:
        writer.add_string("general.basename", "SmolLM2")  # none: its family's card recommends some
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_add_bos_token(True)
    writer.add_chat_template("{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}")
    gg_names = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    layer_names = {
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
        "input_layernorm": "attn_norm",
        "post_attention_layernorm": "ffn_norm",
    }
    expected = {}
    for name, w in state.items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        if name.startswith("model.layers."):
            _, _, i, *rest = name.split(".")
            gname = f"blk.{i}.{layer_names['.'.join(rest[:-1])]}.weight"
        else:
            gname = gg_names[name]
        if name.endswith("q_proj.weight"):
            w = _permute(w, config.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            w = _permute(w, config.num_key_value_heads)
        qtype = gguf.GGMLQuantizationType[qtypes.get(name.split(".")[-2], "F32") if w.ndim == 2 else "F32"]
        if qtype == gguf.GGMLQuantizationType.F32:
            writer.add_tensor(gname, w.astype(np.float32))
            expected[name] = torch.from_numpy(state[name])
        else:
            writer.add_tensor(gname, gguf.quants.quantize(w, qtype), raw_dtype=qtype)
            back = gguf.quants.dequantize(gguf.quants.quantize(state[name], qtype), qtype)
            expected[name] = torch.from_numpy(back)  # blocks lie along rows: permutation commutes
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return expected


@pytest.mark.parametrize("arch", ["minicpm", "llama"])
def test_convert_gguf_roundtrip(tmp_path: Path, arch: str) -> None:
    from sentencepiece import SentencePieceProcessor
    from sentencepiece import sentencepiece_model_pb2 as spm_pb

    proto = spm_pb.ModelProto()
    proto.ParseFromString(_spm_file().read_bytes())
    tokens = [p.piece for p in proto.pieces] + ["<|im_end|>", "<|im_start|>"]
    scores = [p.score for p in proto.pieces] + [0.0, 0.0]
    types = [int(p.type) for p in proto.pieces] + [4, 4]
    config = tiny_config(
        vocab_size=len(tokens),
        num_key_value_heads=2,
        rope_scaling=None,
        tie_word_embeddings=arch == "llama",
        max_position_embeddings=256,
    )
    if arch == "llama":
        config = MiniCPMConfig.from_dict(config.to_dict() | {"model_type": "llama", "architectures": []})
    model = random_model(config)
    state = {k: v.numpy() for k, v in model.state_dict().items()}

    expected = _write_gguf(tmp_path / "m.gguf", arch, config, state, tokens, scores, types, MIXED_TYPES)

    assert cli_main(["convert", str(tmp_path / "m.gguf"), str(tmp_path / "out")]) == 0
    out = MiniCPMForCausalLM.from_pretrained(tmp_path / "out", quantize="none")  # Q8_0 kept; dequantized here
    kept = MiniCPMForCausalLM.from_pretrained(tmp_path / "out")
    assert isinstance(kept.model.layers[0].self_attn.q_proj, QuantizedLinear)
    assert out.config.model_type == arch
    assert out.config.residual_scale == pytest.approx(config.residual_scale)
    assert out.config.logit_scale == pytest.approx(config.logit_scale)
    for name, tensor in out.state_dict().items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        assert torch.equal(tensor, expected[name]), name
    ref = MiniCPMForCausalLM(config)
    ref.load_state_dict(
        expected | ({"lm_head.weight": expected["model.embed_tokens.weight"]} if config.tie_word_embeddings else {})
    )
    with torch.no_grad():
        assert torch.equal(out(IDS[:, :20] % 100), ref(IDS[:, :20] % 100))
        assert torch.equal(kept(IDS[:, :20] % 100), ref(IDS[:, :20] % 100))
    _assert_engine_follows(kept, ref)

    sp_orig = SentencePieceProcessor(model_file=str(_spm_file()))
    sp_conv = SentencePieceProcessor(model_file=str(tmp_path / "out" / "tokenizer.model"))
    for text in ["Hello world", "  two  spaces\nnewline", "中文 🙂 ünïcode"]:
        assert sp_conv.encode(text) == sp_orig.encode(text), text
    assert sp_conv.encode("x<|im_end|>") == [*sp_orig.encode("x"), 32000]  # the added token is one piece
    tok_config = json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())
    assert tok_config["bos_token"] == "<s>" and tok_config["add_bos_token"] is True
    assert "<|im_start|>" in tok_config["chat_template"]
    generation = json.loads((tmp_path / "out" / "generation_config.json").read_text())
    sampling = {"temperature": 0.6, "top_p": 0.75, "top_k": 30} if arch == "minicpm" else SMOLLM2_SAMPLING
    assert generation == pytest.approx({"bos_token_id": 1, "eos_token_id": 2, "do_sample": True} | sampling)
    assert checkpoint_sampling_defaults(tmp_path / "out") == pytest.approx(sampling)


def _assert_engine_follows(model: MiniCPMForCausalLM, ref: MiniCPMForCausalLM) -> None:
    """The engine over ``model`` (its weights as loaded: quantized panels on CPU) decodes ``ref``'s
    greedy tokens."""
    from minicpm import SamplingParams
    from minicpm.engine import EngineConfig, LLMEngine

    prompt = (IDS[0, :15] % 100).tolist()
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(6):
            ids.append(int(ref(torch.tensor([ids]))[0, -1].argmax()))
    engine = LLMEngine(model, None, EngineConfig(block_size=8))
    got = engine.generate([prompt], SamplingParams(max_new_tokens=6, ignore_eos=True))
    assert got[0].token_ids == ids[len(prompt) :]


def test_gguf_type_without_a_format_is_named_and_converts_dequantized(tmp_path: Path) -> None:
    from sentencepiece import sentencepiece_model_pb2 as spm_pb

    proto = spm_pb.ModelProto()
    proto.ParseFromString(_spm_file().read_bytes())
    tokens = [p.piece for p in proto.pieces]
    config = tiny_config(vocab_size=len(tokens), rope_scaling=None, max_position_embeddings=256)
    state = {k: v.numpy() for k, v in random_model(config).state_dict().items()}
    scores, types = [p.score for p in proto.pieces], [int(p.type) for p in proto.pieces]
    expected = _write_gguf(tmp_path / "m.gguf", "minicpm", config, state, tokens, scores, types, {"up_proj": "Q5_1"})
    with pytest.raises(ConversionError, match=r"blk\.0\.ffn_up\.weight: GGUF type Q5_1 has no quantized format"):
        convert_gguf(tmp_path / "m.gguf", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    convert_gguf(tmp_path / "m.gguf", tmp_path / "out", quantize="none")
    loaded = MiniCPMForCausalLM.from_pretrained(tmp_path / "out")
    assert torch.equal(loaded.model.layers[0].mlp.up_proj.weight, expected["model.layers.0.mlp.up_proj.weight"])


def test_a_converted_gguf_keeps_its_blocks_and_takes_no_more_room(tmp_path: Path) -> None:
    """Quantized GGUF tensors are stored as their very blocks (``<name>.gguf_<TYPE>``, Q/K rows in
    checkpoint order), so the weights take no more room than the GGUF; converting that checkpoint
    again keeps the blocks byte for byte ("auto") or dequantizes them ("none") to what the loader
    decodes."""
    from safetensors import safe_open
    from safetensors.torch import load_file
    from sentencepiece import sentencepiece_model_pb2 as spm_pb

    proto = spm_pb.ModelProto()
    proto.ParseFromString(_spm_file().read_bytes())
    tokens = [p.piece for p in proto.pieces]
    scores, types = [p.score for p in proto.pieces], [int(p.type) for p in proto.pieces]
    config = tiny_config(vocab_size=len(tokens), num_key_value_heads=2, rope_scaling=None, max_position_embeddings=256)
    state = {k: v.numpy() for k, v in random_model(config).state_dict().items()}
    _write_gguf(tmp_path / "m.gguf", "minicpm", config, state, tokens, scores, types, MIXED_TYPES)
    convert_gguf(tmp_path / "m.gguf", tmp_path / "out")
    with safe_open(str(tmp_path / "out" / "model.safetensors"), framework="pt") as f:
        names = set(f.keys())
        q = f.get_tensor("model.layers.0.self_attn.q_proj.gguf_Q8_0")
    assert {"lm_head.gguf_Q4_0", "model.embed_tokens.gguf_Q8_0", "model.layers.1.mlp.up_proj.gguf_Q4_1"} <= names
    assert not [n for n in names if n.endswith((".qweight", ".scales", ".mins"))]
    assert q.dtype == torch.uint8 and q.shape == (config.hidden_size, config.hidden_size // 32 * 34)
    assert (tmp_path / "out" / "model.safetensors").stat().st_size <= (tmp_path / "m.gguf").stat().st_size
    config_json = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config_json["quantization_config"]["formats"] == ["gguf-Q4_0", "gguf-Q4_1", "gguf-Q8_0"]

    convert_checkpoint(tmp_path / "out", tmp_path / "again")
    again, first = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("again", "out"))
    assert again.keys() == first.keys() and all(torch.equal(again[n], t) for n, t in first.items())
    convert_checkpoint(tmp_path / "out", tmp_path / "float", quantize="none")
    decoded = MiniCPMForCausalLM.from_pretrained(tmp_path / "out", quantize="none").state_dict()
    for name, tensor in MiniCPMForCausalLM.from_pretrained(tmp_path / "float").state_dict().items():
        assert torch.equal(tensor, decoded[name]), name


def test_streamed_writes_shard_and_outgrow_the_room_kept_for_their_header(tmp_path: Path) -> None:
    """save_tensors takes tensors made one at a time; shards are cut as they come, and a header
    larger than the room its names promised moves the data behind it."""
    from safetensors.torch import load_file

    from minicpm.weights import iter_tensors, save_tensors, weight_files

    tensors = {f"t{i}": torch.randn(300 + i, 7, generator=torch.Generator().manual_seed(i)) for i in range(6)}
    tensors["flag"] = torch.tensor([True, False])
    tensors["scalar"] = torch.tensor(3.5, dtype=torch.bfloat16)
    save_tensors(iter(tensors.items()), tmp_path / "small", names=["t0"])  # promised far too little room
    assert {k: v for k, v in load_file(str(tmp_path / "small" / "model.safetensors")).items()}.keys() == tensors.keys()
    for name, tensor in load_file(str(tmp_path / "small" / "model.safetensors")).items():
        assert torch.equal(tensor, tensors[name]) and tensor.dtype == tensors[name].dtype, name
    save_tensors(iter(tensors.items()), tmp_path / "shards", max_shard_bytes=20_000, names=list(tensors))
    assert len(weight_files(tmp_path / "shards")) > 2
    read = dict(iter_tensors(weight_files(tmp_path / "shards")))
    assert read.keys() == tensors.keys() and all(torch.equal(read[n], t) for n, t in tensors.items())


def test_convert_gguf_rejects_bad_input(tmp_path: Path) -> None:
    (tmp_path / "x.gguf").write_bytes(b"not a gguf file at all")
    with pytest.raises(ConversionError, match="not a readable GGUF"):
        convert_gguf(tmp_path / "x.gguf", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    writer = gguf.GGUFWriter(str(tmp_path / "g.gguf"), "gpt2")
    writer.add_block_count(1)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ConversionError, match="architecture 'gpt2'"):
        convert_gguf(tmp_path / "g.gguf", tmp_path / "out")


def test_real_minicpm_2b_128k_config_numbers() -> None:
    """The published config at full size: derived scales, NTK base, context, KV bytes per token."""
    raw = MINICPM_2B_128K
    config = MiniCPMConfig.from_dict(raw)
    assert config.head_dim == 64 and config.context_length == 131072
    assert config.residual_scale == pytest.approx(0.221359, abs=1e-6) and config.logit_scale == pytest.approx(1 / 9)
    assert config.rope_base(65536) == 1e6
    assert config.rope_base(131072) == pytest.approx(5.27e6, rel=1e-3)
    assert config.kv_bytes_per_token(2) == 360 * 1024


def test_steady_heap_pins_the_mmap_threshold_while_loading_and_fixes_it_after(monkeypatch) -> None:
    """weights.steady_heap: glibc's mmap threshold at 1 MiB for the outermost use only (a load
    inside an engine's preparation does not end it early), 32 MiB once it ends, also after an error."""
    from minicpm import weights

    calls: list[tuple[int, int]] = []

    class FakeLibc:
        def mallopt(self, param: int, value: int) -> int:
            calls.append((param, value))
            return 1

    monkeypatch.setattr(weights, "_libc", lambda: FakeLibc())
    with weights.steady_heap():
        with weights.steady_heap():
            assert calls == [(weights.M_MMAP_THRESHOLD, 1 << 20)]
        assert calls == [(weights.M_MMAP_THRESHOLD, 1 << 20)]
    assert calls == [(weights.M_MMAP_THRESHOLD, 1 << 20), (weights.M_MMAP_THRESHOLD, 32 << 20)]
    with pytest.raises(RuntimeError), weights.steady_heap():
        raise RuntimeError("a load that fails")
    assert calls[-1] == (weights.M_MMAP_THRESHOLD, 32 << 20) and weights._steady_depth == 0
    monkeypatch.setattr(weights, "_libc", lambda: None)  # no glibc: nothing to do
    with weights.steady_heap():
        pass
    assert len(calls) == 4
