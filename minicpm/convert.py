"""Checkpoint conversion: ``pytorch_model.bin`` to safetensors, and GGUF to a checkpoint directory.

Contract:

* :func:`convert_checkpoint` reads a checkpoint directory (any weight layout :mod:`minicpm.weights`
  reads), checks every tensor against its config, and writes config.json and safetensors weights;
  every other file of the directory (tokenizer, ``generation_config.json``, chat template, README,
  license) is carried over as it is, but for remote-code ``.py`` files and other weight formats.
* Both go tensor by tensor (read, convert, write, then the next), so a conversion holds about
  one tensor in memory whatever the model's size.
* Both take ``quantize``: "auto" (default) writes weights as the source stores them, "none"
  dequantizes, "int8" / "int4" (with ``group_size``) quantize every linear layer
  (:func:`minicpm.quant.quantize_weight`): a quantized checkpoint stores ``.qweight`` /
  ``.scales`` / ``.mins`` beside the float tensors and loads back bit for bit.
* :func:`convert_gguf` reads a GGUF file of architecture ``llama`` or ``minicpm`` with the
  ``gguf`` package; keeps Q8_0, Q6_K, Q4_0, Q4_1 and Q4_K tensors as they are, their very blocks
  (``<name>.gguf_<TYPE>``, so the weights take no more room than in the GGUF; or dequantizes
  every tensor type that package dequantizes, with ``quantize="none"``), undoes llama.cpp's Q/K
  row permutation, and writes config.json, safetensors weights and the tokenizer:
  ``tokenizer.json`` for GGUF "gpt2" (byte-level BPE) vocabularies, ``tokenizer.model`` for
  "llama" (SentencePiece) vocabularies, plus ``tokenizer_config.json`` (special tokens,
  ``add_bos_token``, ``chat_template``) and ``generation_config.json`` (the sampling the file
  carries, else its family's recommendation: :func:`gguf_generation_config`).
* A full disk or quota (ENOSPC, EDQUOT) while writing is an ``OSError`` / :class:`ConversionError`
  naming the destination, and leaves nothing behind, like any other failure.
* Output is built in a temporary sibling directory (``.NAME.partial-PID-*``) and renamed into
  place at the end: a failed or interrupted conversion (an exception, Ctrl-C, or SIGTERM, which
  the CLI turns into the same unwinding) leaves nothing at the destination; partial directories
  left by a killed process (whose PID is gone) are removed by the next conversion to the same
  place. An existing non-empty destination or an unwritable parent is refused, naming it. What
  is written gets the permissions of the user's umask, like any file the user creates.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import MiniCPMConfig
from .errors import UserError
from .quant import GGUF_TYPES, QuantizedLinear, check_quantize, from_gguf, quantize_weight
from .weights import (
    check_tensors,
    gguf_name,
    load_weight,
    open_checkpoint,
    read_exactly,
    resolve_dtype,
    save_checkpoint,
    stored_names,
)

# What a conversion does not carry over from a checkpoint directory: the weights (written anew),
# config.json (rewritten) and remote code. Everything else (tokenizer, generation_config.json, chat
# template, README, license, ...) is copied as it is.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx", ".npz")
NOT_CARRIED = ("config.json", "model.safetensors.index.json", "pytorch_model.bin.index.json")
# GGUF's sampling metadata and the generation_config.json fields it stands for
GGUF_SAMPLING = {
    "general.sampling.temp": "temperature",
    "general.sampling.top_p": "top_p",
    "general.sampling.top_k": "top_k",
    "general.sampling.penalty_repeat": "repetition_penalty",
}


def carried_files(src: Path) -> list[Path]:
    """The files of checkpoint directory ``src`` that a conversion copies (see :data:`NOT_CARRIED`)."""
    return sorted(
        p
        for p in src.iterdir()
        if p.is_file()
        and not p.name.startswith(".")
        and p.name not in NOT_CARRIED
        and not p.name.endswith(WEIGHT_SUFFIXES)
        and p.suffix != ".py"
    )


def _written_names(blocks: dict[str, str | None]) -> list[str]:
    """Every tensor name a conversion may write, for the safetensors header's room: a weight kept as
    GGUF blocks (its type in ``blocks``) under its block name, any other under each name it may be
    stored as (float, or quantized: a weight quantized on the way is three tensors)."""
    return [s for n, kind in blocks.items() for s in ([gguf_name(n, kind)] if kind else stored_names(n))]


class ConversionError(UserError):
    """The source can't be converted; the message says what is wrong with it."""


def current_umask() -> int:
    """The process umask, read without changing it where Linux allows (``/proc/self/status``)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)  # elsewhere: read it by setting it, and put it back at once
    os.umask(mask)
    return mask


def apply_umask(root: Path) -> None:
    """Give ``root`` and everything in it the modes a plain ``mkdir`` / ``open`` would have:
    ``mkdtemp`` and temporary files are private (0700 / 0600) whatever the umask."""
    mask = current_umask()
    root.chmod(0o777 & ~mask)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames:
            Path(dirpath, name).chmod(0o777 & ~mask)
        for name in filenames:
            Path(dirpath, name).chmod(0o666 & ~mask)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale_partials(dst: Path) -> None:
    """Remove ``.NAME.partial-PID-*`` siblings of ``dst`` whose process no longer exists."""
    prefix = f".{dst.name}.partial-"
    with contextlib.suppress(OSError):
        for entry in dst.parent.iterdir():
            if not entry.name.startswith(prefix):
                continue
            pid = entry.name[len(prefix) :].split("-", 1)[0]
            if pid.isdigit() and not _pid_alive(int(pid)):
                shutil.rmtree(entry, ignore_errors=True)


def check_destination(dst: Path) -> None:
    """Refuse a non-empty destination, and clear what killed conversions left beside it."""
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise ConversionError(f"destination {dst} already exists and is not empty")
    if dst.parent.is_dir():
        remove_stale_partials(dst)


def _build_into(dst: Path, build: Callable[[Path], None]) -> Path:
    """Run ``build(tmp_dir)`` and move the result to ``dst`` only if it succeeds; directories it
    had to create for ``dst`` are removed again if it fails."""
    dst = Path(dst)
    check_destination(dst)
    created = [p for p in [dst.parent, *dst.parent.parents] if not p.exists()]
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConversionError(f"cannot create {dst.parent} (for {dst}): {exc.strerror}") from None
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.partial-{os.getpid()}-", dir=dst.parent))
    except OSError as exc:
        _remove_empty(created)
        raise ConversionError(f"cannot write to {dst.parent} (for {dst}): {exc.strerror}") from None
    try:
        try:
            build(tmp)
        except OSError as exc:
            where = f" ({exc.strerror})" if exc.strerror else f" ({exc})"
            raise ConversionError(f"writing {dst} failed{where}") from exc
        apply_umask(tmp)
        if dst.exists():
            dst.rmdir()
        tmp.rename(dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_empty(created)
        raise
    return dst


def _remove_empty(dirs: list[Path]) -> None:
    for d in dirs:  # deepest first
        with contextlib.suppress(OSError):
            d.rmdir()


def convert_checkpoint(
    src: str | Path,
    dst: str | Path,
    dtype: torch.dtype | str | None = None,
    max_shard_bytes: int | None = None,
    quantize: str = "auto",
    group_size: int | None = None,
) -> Path:
    """A checkpoint directory (e.g. with pytorch_model.bin) to a safetensors checkpoint directory;
    ``quantize`` as :func:`minicpm.quant.quantize_weight` (default: weights as stored). Tensor
    by tensor: each is read, converted and written before the next is read."""
    src = Path(src)
    check_quantize(quantize, group_size)
    check_destination(Path(dst))
    target = None if dtype is None else resolve_dtype(dtype, torch.device("cpu"))
    checkpoint = open_checkpoint(src)
    tied = checkpoint.config.tie_word_embeddings
    raw_config = json.loads((src / "config.json").read_text(encoding="utf-8"))

    def weights() -> Iterator[tuple[str, torch.Tensor | QuantizedLinear]]:
        for name, w in checkpoint.weights.items():
            if quantize == "auto" and w.gguf_kind:  # GGUF blocks as stored
                yield gguf_name(name, w.gguf_kind), next(iter(w.parts.values())).read()
                continue
            value = load_weight(w, target, quantize, tied, group_size)
            if value is not None:
                yield name, value

    def build(tmp: Path) -> None:
        kept = {n: w.gguf_kind if quantize == "auto" else None for n, w in checkpoint.weights.items()}
        save_checkpoint(weights(), raw_config, tmp, max_shard_bytes, names=_written_names(kept))
        for file in carried_files(src):
            shutil.copy2(file, tmp / file.name)

    return _build_into(Path(dst), build)


# ---------------------------------------------------------------------------------------- GGUF
def _field(reader: Any, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    if field is None:
        return default
    return field.contents()


def _unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's Q/K row permutation (GGUF interleaved pairs back to rotate-half)."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


GGUF_TENSOR_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
GGUF_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}


def _logical_shape(t: torch.Tensor | QuantizedLinear) -> tuple[int, ...]:
    return (t.out_features, t.in_features) if isinstance(t, QuantizedLinear) else tuple(t.shape)


def _hf_name(name: str) -> str | None:
    if name in GGUF_TENSOR_NAMES:
        return GGUF_TENSOR_NAMES[name]
    parts = name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in GGUF_LAYER_NAMES and parts[3] == "weight":
        return f"model.layers.{parts[1]}.{GGUF_LAYER_NAMES[parts[2]]}.weight"
    return None


def gguf_config(reader: Any) -> dict[str, Any]:
    """config.json fields from GGUF metadata."""
    arch = _field(reader, "general.architecture")
    if arch not in ("llama", "minicpm"):
        raise ConversionError(f"GGUF architecture {arch!r} is not supported (supported: llama, minicpm)")

    def get(key: str, default: Any = None, required: bool = False) -> Any:
        value = _field(reader, f"{arch}.{key}", default)
        if required and value is None:
            raise ConversionError(f"GGUF metadata key {arch}.{key} is missing")
        return value

    hidden = int(get("embedding_length", required=True))
    layers = int(get("block_count", required=True))
    heads = int(get("attention.head_count", required=True))
    tokens = _field(reader, "tokenizer.ggml.tokens")
    vocab = get("vocab_size") or (len(tokens) if tokens else None)
    if vocab is None:
        vocab = next(int(t.shape[-1]) for t in reader.tensors if t.name == "token_embd.weight")
    head_dim = hidden // heads
    rope_dims = get("rope.dimension_count")
    if rope_dims is not None and int(rope_dims) != head_dim:
        raise ConversionError(
            f"GGUF rope.dimension_count {rope_dims} != head_dim {head_dim}: partial RoPE is not supported"
        )
    config: dict[str, Any] = {
        "architectures": ["MiniCPMForCausalLM" if arch == "minicpm" else "LlamaForCausalLM"],
        "model_type": arch,
        "vocab_size": int(vocab),
        "hidden_size": hidden,
        "intermediate_size": int(get("feed_forward_length", required=True)),
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": int(get("attention.head_count_kv", heads)),
        "max_position_embeddings": int(get("context_length", 2048)),
        "rope_theta": float(get("rope.freq_base", 10000.0)),
        "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon", 1e-5)),
        "tie_word_embeddings": not any(t.name == "output.weight" for t in reader.tensors),
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id"),
        "torch_dtype": "float32",
    }
    scaling = get("rope.scaling.type", "none")
    if scaling == "linear":
        config["rope_scaling"] = {"type": "linear", "factor": float(get("rope.scaling.factor", required=True))}
    elif scaling not in ("none", None):
        raise ConversionError(f"GGUF rope scaling type {scaling!r} is not supported (known: none, linear)")
    if arch == "minicpm":
        config["scale_emb"] = float(get("embedding_scale", 1.0))
        config["scale_depth"] = float(get("residual_scale", 1.0 / math.sqrt(layers))) * math.sqrt(layers)
        config["dim_model_base"] = hidden / float(get("logit_scale", hidden))
    return config


@dataclasses.dataclass
class GGUFWeight:
    """One tensor of a GGUF file by checkpoint name, not read yet."""

    name: str
    tensor: Any  # the reader's ReaderTensor
    shape: tuple[int, ...]  # logical, rows first
    kind: str  # the GGUF type's name
    heads: int | None  # Q / K: the heads whose rows llama.cpp permuted

    def raw(self, src: Path) -> np.ndarray:
        """The tensor's bytes, read from ``src`` into memory of their own (no mapped pages kept)."""
        t = self.tensor
        buf = np.empty(int(t.n_bytes), np.uint8)
        try:
            read_exactly(src, int(t.data_offset), memoryview(buf))
        except EOFError:
            raise ConversionError(f"GGUF file {src} ends inside tensor {t.name}: it is truncated") from None
        return buf

    def blocks(self, src: Path) -> torch.Tensor:
        """A quantized tensor's blocks, uint8 (rows, bytes per row), its rows in checkpoint order."""
        rows = self.raw(src).reshape(self.shape[0], -1)
        if self.heads is not None:
            rows = rows[_unpermute(torch.arange(self.shape[0]), self.heads).numpy()]
        return torch.from_numpy(rows)

    def floats(self, src: Path, dtype: torch.dtype | None) -> torch.Tensor:
        """The tensor in ``dtype`` (None: a float type as stored, float64 and quantized types in
        float32), its rows in checkpoint order."""
        from gguf.quants import dequantize

        raw = self.raw(src)
        if self.kind in ("F32", "F16", "F64"):
            w = torch.from_numpy(raw.view({"F32": np.float32, "F16": np.float16, "F64": np.float64}[self.kind]))
        elif self.kind == "BF16":
            w = torch.from_numpy(raw).view(torch.bfloat16)
        elif self.kind in GGUF_TYPES and len(self.shape) == 2:  # decoded by rows: no whole float32 copy
            layer = from_gguf(raw, self.kind, self.shape)
            del raw
            w = layer.dequantize(dtype or torch.float32)
        else:
            try:
                array = dequantize(raw.reshape(self.tensor.data.shape), self.tensor.tensor_type)
            except NotImplementedError:
                raise ConversionError(
                    f"GGUF tensor {self.tensor.name} has type {self.kind}, which the gguf package cannot dequantize"
                ) from None
            w = torch.from_numpy(np.asarray(array, dtype=np.float32))
        w = w.reshape(self.shape)
        if self.heads is not None:
            w = _unpermute(w, self.heads)
        if dtype is None and w.dtype == torch.float64:
            dtype = torch.float32
        return w.to(dtype) if dtype is not None else w


def gguf_weights(reader: Any, config: MiniCPMConfig) -> dict[str, GGUFWeight]:
    """The GGUF file's tensors by checkpoint name (nothing read); a tensor this converter does not
    know is a :class:`ConversionError` naming it."""
    out: dict[str, GGUFWeight] = {}
    unknown = []
    for t in reader.tensors:
        name = _hf_name(t.name)
        if name is None:
            if t.name != "rope_freqs.weight":
                unknown.append(t.name)
            continue
        heads = (
            config.num_attention_heads
            if name.endswith("q_proj.weight")
            else config.num_key_value_heads
            if name.endswith("k_proj.weight")
            else None
        )
        out[name] = GGUFWeight(name, t, tuple(int(d) for d in reversed(t.shape)), t.tensor_type.name, heads)
    if unknown:
        raise ConversionError(f"GGUF file has tensors this converter does not know: {', '.join(unknown)}")
    return out


def _check_mappable(w: GGUFWeight) -> None:
    if w.kind not in GGUF_TYPES:
        raise ConversionError(
            f"GGUF tensor {w.tensor.name}: GGUF type {w.kind} has no quantized format here (mapped: "
            f"{', '.join(GGUF_TYPES)}); convert with --quantize none (float), int8 or int4 instead"
        )


FLOAT_TYPES = ("F32", "F16", "BF16", "F64")


def _gguf_bpe_tokenizer(reader: Any, tokens: list[str], types: list[int]) -> Any:
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges", [])]
    pre = _field(reader, "tokenizer.ggml.pre", "default")
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in ("smollm", "starcoder", "refact", "codeshell", "command-r", "exaone", "minerva"):
        pre_tok = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    elif pre in ("default", "gpt-2", "gpt2", "phi-2", "jina-es", "olmo"):
        pre_tok = byte_level
    elif pre in ("llama-bpe", "llama3", "smaug-bpe"):
        pattern = (
            r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
            r"|\s*[\r\n]+|\s+(?!\S)|\s+"
        )
        from tokenizers import Regex

        pre_tok = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    else:
        raise ConversionError(f"GGUF BPE pre-tokenizer {pre!r} is not supported")
    vocab = {tok: i for i, tok in enumerate(tokens)}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    tokenizer.pre_tokenizer = pre_tok
    tokenizer.decoder = decoders.ByteLevel()
    special = [
        AddedToken(tokens[i], special=types[i] == 3, normalized=False) for i in range(len(tokens)) if types[i] in (3, 4)
    ]
    tokenizer.add_tokens(special)
    bos = _field(reader, "tokenizer.ggml.bos_token_id")
    if _field(reader, "tokenizer.ggml.add_bos_token", False) and bos is not None:
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{tokens[bos]} $A", pair=f"{tokens[bos]} $A {tokens[bos]} $B", special_tokens=[(tokens[bos], bos)]
        )
    else:
        tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    return tokenizer


def _gguf_spm_model(reader: Any, tokens: list[str], types: list[int]) -> bytes:
    from sentencepiece import sentencepiece_model_pb2 as spm_pb

    scores = _field(reader, "tokenizer.ggml.scores") or [0.0] * len(tokens)
    proto = spm_pb.ModelProto()
    for tok, score, kind in zip(tokens, scores, types, strict=True):
        piece = proto.pieces.add()
        piece.piece, piece.score = tok, float(score)
        piece.type = kind if kind in (1, 2, 3, 4, 5, 6) else 1
    spec = proto.trainer_spec
    spec.model_type = spm_pb.TrainerSpec.BPE
    spec.vocab_size = len(tokens)
    spec.byte_fallback = 6 in types
    spec.unk_id = int(_field(reader, "tokenizer.ggml.unknown_token_id", 0))
    spec.bos_id = int(_field(reader, "tokenizer.ggml.bos_token_id", 1))
    spec.eos_id = int(_field(reader, "tokenizer.ggml.eos_token_id", 2))
    pad = _field(reader, "tokenizer.ggml.padding_token_id")
    spec.pad_id = -1 if pad is None or pad in (spec.unk_id, spec.bos_id, spec.eos_id) else int(pad)
    norm = proto.normalizer_spec
    norm.name = "identity"
    norm.add_dummy_prefix = bool(_field(reader, "tokenizer.ggml.add_space_prefix", True))
    norm.remove_extra_whitespaces = False
    norm.escape_whitespaces = True
    return proto.SerializeToString()


def gguf_tokenizer_files(reader: Any, out: Path) -> None:
    """Write the tokenizer files that GGUF metadata describes."""
    kind = _field(reader, "tokenizer.ggml.model")
    tokens = _field(reader, "tokenizer.ggml.tokens")
    if kind is None or tokens is None:
        raise ConversionError("GGUF file has no tokenizer (tokenizer.ggml.model / tokenizer.ggml.tokens missing)")
    types = _field(reader, "tokenizer.ggml.token_type") or [1] * len(tokens)
    special_ids = {
        "bos_token": _field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token": _field(reader, "tokenizer.ggml.eos_token_id"),
        "unk_token": _field(reader, "tokenizer.ggml.unknown_token_id"),
        "pad_token": _field(reader, "tokenizer.ggml.padding_token_id"),
    }
    tok_config: dict[str, Any] = {k: tokens[v] for k, v in special_ids.items() if v is not None}
    tok_config["add_bos_token"] = bool(_field(reader, "tokenizer.ggml.add_bos_token", kind == "llama"))
    tok_config["add_eos_token"] = bool(_field(reader, "tokenizer.ggml.add_eos_token", False))
    added = {
        str(i): {
            "content": tokens[i],
            "special": types[i] in (2, 3),
            "normalized": False,
            "lstrip": False,
            "rstrip": False,
            "single_word": False,
        }
        for i in range(len(tokens))
        if types[i] in (2, 3, 4)
    }
    if kind == "gpt2":
        _gguf_bpe_tokenizer(reader, tokens, types).save(str(out / "tokenizer.json"))
        tok_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    elif kind == "llama":
        (out / "tokenizer.model").write_bytes(_gguf_spm_model(reader, tokens, types))
        tok_config["tokenizer_class"] = "LlamaTokenizer"
        tok_config["legacy"] = True
        tok_config["add_prefix_space"] = bool(_field(reader, "tokenizer.ggml.add_space_prefix", True))
    else:
        raise ConversionError(f"GGUF tokenizer model {kind!r} is not supported (supported: gpt2, llama)")
    tok_config["added_tokens_decoder"] = added
    template = _field(reader, "tokenizer.chat_template")
    if template:
        tok_config["chat_template"] = template
    ctx = _field(reader, f"{_field(reader, 'general.architecture')}.context_length")
    if ctx:
        tok_config["model_max_length"] = int(ctx)
    (out / "tokenizer_config.json").write_text(
        json.dumps(tok_config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )


def gguf_generation_config(reader: Any) -> dict[str, Any]:
    """generation_config.json for a GGUF file: its bos / eos ids, and the sampling settings it
    carries (``general.sampling.*``), else what its family's card recommends
    (:data:`~minicpm.default_model.CARD_SAMPLING`), else none (the loader then takes the MiniCPM
    card's)."""
    from .default_model import CARD_SAMPLING

    config: dict[str, Any] = {}
    for key, name in (("tokenizer.ggml.bos_token_id", "bos_token_id"), ("tokenizer.ggml.eos_token_id", "eos_token_id")):
        value = _field(reader, key)
        if value is not None:
            config[name] = int(value)
    sampling = {name: _field(reader, key) for key, name in GGUF_SAMPLING.items() if _field(reader, key) is not None}
    if not sampling:
        sampling = dict(CARD_SAMPLING.get(str(_field(reader, "general.basename", "")).lower(), {}))
    if sampling:  # transformers samples only with do_sample
        config["do_sample"] = True
    return config | {k: int(v) if k == "top_k" else float(v) for k, v in sampling.items()}


def convert_gguf(
    src: str | Path,
    dst: str | Path,
    dtype: torch.dtype | str | None = None,
    quantize: str = "auto",
    group_size: int | None = None,
) -> Path:
    """A GGUF file (llama or minicpm architecture) to a checkpoint directory: quantized tensors as
    they are stored (``quantize="auto"``, types :data:`~minicpm.quant.GGUF_TYPES`: their blocks
    themselves, ``<name>.gguf_<TYPE>``, Q/K rows back in checkpoint order; the loader decodes
    them), dequantized ("none") or requantized ("int8" / "int4", see
    :func:`minicpm.quant.quantize_weight`); float tensors in ``dtype`` (default: float32, F16 /
    BF16 tensors as stored). Tensor by tensor: each is read from the file (no mapping kept),
    converted and written before the next, so the weights take no more room than in the GGUF and
    the conversion about one tensor's worth of memory."""
    from gguf import GGUFReader

    src = Path(src)
    check_quantize(quantize, group_size)
    if not src.is_file():
        raise ConversionError(f"GGUF file {src} does not exist")
    check_destination(Path(dst))
    try:
        reader = GGUFReader(str(src))
    except (ValueError, LookupError) as exc:  # bad magic or fields, a file cut short (an OSError propagates)
        raise ConversionError(f"{src} is not a readable GGUF file: {exc}") from None
    raw_config = gguf_config(reader)
    config = MiniCPMConfig.from_dict(raw_config)
    target = None if dtype is None else resolve_dtype(dtype, torch.device("cpu"))
    weights = gguf_weights(reader, config)
    check_tensors(config, {n: w.shape for n, w in weights.items()}, src)
    kept = {n: w for n, w in weights.items() if quantize == "auto" and w.kind not in FLOAT_TYPES}
    for w in kept.values():
        _check_mappable(w)
    raw_config["torch_dtype"] = str(target or torch.float32).removeprefix("torch.")
    tied = config.tie_word_embeddings
    floats_as = target if target is not None else None if quantize == "auto" else torch.float32

    def tensors() -> Iterator[tuple[str, torch.Tensor | QuantizedLinear]]:
        # float tensors first (4-byte elements before 1-byte blocks: every tensor aligned)
        for name, w in sorted(weights.items(), key=lambda item: item[0] in kept):
            if name in kept:
                yield gguf_name(name, w.kind), w.blocks(src)
                continue
            value = quantize_weight(name, w.floats(src, floats_as), quantize, target or torch.float32, tied, group_size)
            if value is not None:
                yield name, value

    def build(tmp: Path) -> None:
        names = _written_names({n: w.kind if n in kept else None for n, w in weights.items()})
        save_checkpoint(tensors(), raw_config, tmp, names=names)
        gguf_tokenizer_files(reader, tmp)
        (tmp / "generation_config.json").write_text(json.dumps(gguf_generation_config(reader), indent=2) + "\n")

    return _build_into(Path(dst), build)
