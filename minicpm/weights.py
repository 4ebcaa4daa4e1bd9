"""Checkpoint files: find, read, check and write model weights.

Contract: a checkpoint directory holds ``config.json`` and one of ``model.safetensors``,
``model.safetensors.index.json`` (+ shards), ``pytorch_model.bin`` or
``pytorch_model.bin.index.json`` (+ shards); tensors use Llama's names. Reading is lazy
(safetensors ``safe_open``, ``torch.load(weights_only=True, mmap=True)``), nothing executes code
from the checkpoint, and a checkpoint whose tensors don't match the config fails with a
:class:`CheckpointError` that lists every missing, unexpected and mis-shaped tensor. Writing goes
to temporary names that are renamed into place once complete, so an interrupted save leaves no
half-written file under a final name.

Quantized checkpoints (:mod:`minicpm.quant`) store a weight ``<name>.weight`` as
``<name>.qweight``, ``<name>.scales`` and optionally ``<name>.mins``; they are checked against the
config by the weight's logical shape. :func:`load_model`'s ``quantize`` decides what runs: "auto"
keeps a stored format on CPU (elsewhere it is dequantized), "none" dequantizes, "int8" / "int4"
quantize every linear layer (see :func:`minicpm.quant.quantize_model`).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .config import MiniCPMConfig
from .fileio import write_atomic, write_text_atomic
from .quant import QuantizedEmbedding, QuantizedLinear, check_quantize, quantize_model

if TYPE_CHECKING:
    from .model import MiniCPMForCausalLM

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"
# Tensors some checkpoints carry that the model derives itself.
IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)
DEFAULT_SHARD_BYTES = 4 * 1024**3


class CheckpointError(ValueError):
    """The checkpoint's files or tensors don't match what the config describes."""


def weight_files(path: Path) -> list[Path]:
    """The weight files of a checkpoint directory, in load order."""
    for index_name in (SAFETENSORS_INDEX, BIN_INDEX):
        index = path / index_name
        if index.exists():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise CheckpointError(f"{index} is not a valid shard index ({exc!r})") from None
            files = sorted(set(weight_map.values()))
            missing = [f for f in files if not (path / f).exists()]
            if missing:
                raise CheckpointError(f"{index} names shard files that are not there: {', '.join(missing)}")
            return [path / f for f in files]
    for name in (SAFETENSORS, BIN):
        if (path / name).exists():
            return [path / name]
    present = ", ".join(sorted(p.name for p in path.iterdir())) if path.is_dir() else "(not a directory)"
    raise CheckpointError(
        f"no weights in {path}: expected {SAFETENSORS}, {SAFETENSORS_INDEX}, {BIN} or {BIN_INDEX}; found: {present}"
    )


def iter_tensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) from safetensors or torch pickle files without loading all at once."""
    for file in files:
        if file.suffix == ".safetensors":
            yield from _safetensors_items(file)
        else:
            state = _torch_load(file)
            if not isinstance(state, dict):
                raise CheckpointError(f"{file} holds a {type(state).__name__}, not a dict of tensors")
            yield from state.items()


def _safetensors_items(file: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """The tensors of one safetensors file; a truncated or corrupt file (the usual interrupted
    download) is a :class:`CheckpointError` that names it and its size."""

    def broken(exc: Exception) -> CheckpointError:
        size = file.stat().st_size if file.exists() else 0
        return CheckpointError(
            f"{file} is not a readable safetensors file ({size:,} bytes; {exc}): it is probably truncated or "
            "corrupt, e.g. an interrupted download; download or convert it again"
        )

    try:
        handle = safe_open(str(file), framework="pt")
    except Exception as exc:  # safetensors raises its own SafetensorError (not an OSError)
        raise broken(exc) from None
    with handle as f:
        for name in f.keys():  # noqa: SIM118 - safe_open is not iterable
            try:
                tensor = f.get_tensor(name)
            except Exception as exc:
                raise broken(exc) from None
            yield name, tensor


def _unreadable(file: Path, exc: Exception) -> CheckpointError:
    text = str(exc)
    lines = [x.strip() for x in text.split("WeightsUnpickler error:", 1)[-1].splitlines() if x.strip()]
    detail = lines[0] if lines else type(exc).__name__  # torch's own message runs to many lines
    return CheckpointError(
        f"{file} is not a readable weights-only PyTorch checkpoint, probably truncated or corrupt "
        f"({type(exc).__name__}: {detail})"
    )


def _torch_load(file: Path) -> object:
    try:
        return torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as exc:
        if "mmap" not in str(exc):  # legacy (non-zip) files can't be mapped; read them whole
            raise _unreadable(file, exc) from None
    except Exception as exc:
        raise _unreadable(file, exc) from None
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise _unreadable(file, exc) from None


def expected_shapes(config: MiniCPMConfig) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor a checkpoint of this config must hold."""
    from .model import MiniCPMForCausalLM

    with torch.device("meta"):
        model = MiniCPMForCausalLM(config)
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}  # tied head listed once
    return shapes


def check_tensors(config: MiniCPMConfig, found: dict[str, tuple[int, ...]], where: Path | str) -> set[str]:
    """Raise :class:`CheckpointError` unless ``found`` (name -> shape) matches the config.

    Returns the names to skip (derived buffers, a tied head stored twice).
    """
    expected = expected_shapes(config)
    skip = {n for n in found if n.endswith(IGNORED_SUFFIXES)}
    if config.tie_word_embeddings and "lm_head.weight" in found:
        skip.add("lm_head.weight")
    problems = []
    for name in sorted(expected.keys() - found.keys()):
        problems.append(f"missing tensor {name} (expected shape {list(expected[name])})")
    for name in sorted(found.keys() - expected.keys() - skip):
        problems.append(f"unexpected tensor {name} (shape {list(found[name])})")
    for name in sorted(expected.keys() & found.keys()):
        if tuple(found[name]) != expected[name]:
            problems.append(f"tensor {name} has shape {list(found[name])}, expected {list(expected[name])}")
    if problems:
        shown = "; ".join(problems[:8]) + (f"; and {len(problems) - 8} more" if len(problems) > 8 else "")
        raise CheckpointError(f"checkpoint {where} does not match its config: {shown}")
    return skip


DTYPE_NAMES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def dtype_by_name(name: str) -> torch.dtype:
    if name not in DTYPE_NAMES:
        raise ValueError(f"unknown dtype {name!r}; use one of {', '.join(DTYPE_NAMES)}")
    return DTYPE_NAMES[name]


def resolve_dtype(dtype: torch.dtype | str | None, device: torch.device) -> torch.dtype:
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    return dtype_by_name(dtype)


QUANT_SUFFIXES = ("qweight", "scales", "mins")


def gather_quantized(tensors: dict[str, torch.Tensor], where: Path | str) -> dict[str, QuantizedLinear]:
    """Pop every ``<name>.qweight`` / ``.scales`` / ``.mins`` triple out of ``tensors`` into
    ``{"<name>.weight": QuantizedLinear}``; a partial or inconsistent triple is a
    :class:`CheckpointError` naming it."""
    bases = sorted({n.rsplit(".", 1)[0] for n in tensors if n.rsplit(".", 1)[-1] in QUANT_SUFFIXES})
    found = {}
    for base in bases:
        parts = {sfx: tensors.pop(f"{base}.{sfx}", None) for sfx in QUANT_SUFFIXES}
        if parts["qweight"] is None or parts["scales"] is None:
            raise CheckpointError(f"checkpoint {where}: quantized tensor {base} needs both .qweight and .scales")
        q = parts["qweight"]
        in_features = q.shape[1] * (2 if q.dtype == torch.uint8 else 1) if q.dim() == 2 else 0
        try:
            found[f"{base}.weight"] = QuantizedLinear(q, parts["scales"], parts["mins"], in_features)
        except ValueError as exc:
            raise CheckpointError(f"checkpoint {where}: quantized tensor {base}: {exc}") from None
    return found


def read_checkpoint(
    path: Path,
) -> tuple[MiniCPMConfig, dict[str, torch.Tensor], set[str], dict[str, QuantizedLinear]]:
    """A checkpoint directory's config, its float tensors (lazily mapped where the format allows),
    the names to skip and its quantized weights (by weight name), after checking every tensor
    against the config."""
    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory {path} does not exist")
    config = MiniCPMConfig.from_pretrained(path)
    tensors = dict(iter_tensors(weight_files(path)))
    quantized = gather_quantized(tensors, path)
    shapes = {n: tuple(t.shape) for n, t in tensors.items()}
    shapes |= {n: (q.out_features, q.in_features) for n, q in quantized.items()}
    skip = check_tensors(config, shapes, path)
    return config, tensors, skip, quantized


def load_model(
    cls: type[MiniCPMForCausalLM],
    path: str | Path,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str = "cpu",
    quantize: str = "auto",
    group_size: int | None = None,
) -> MiniCPMForCausalLM:
    """``cls`` with the checkpoint's weights in ``dtype`` on ``device``; quantized weights as
    ``quantize`` says (module docstring). Weight-only quantized layers run on the CPU only."""
    path = Path(path)
    device = torch.device(device)
    dtype = resolve_dtype(dtype, device)
    check_quantize(quantize, group_size)
    if quantize in ("int8", "int4") and device.type != "cpu":
        raise ValueError(f"quantize={quantize!r} runs on the CPU; the model is to load on {device}")
    config, tensors, skip, quantized = read_checkpoint(path)
    if device.type != "cpu":
        quantize = "none"
    tied_head = tensors.get("lm_head.weight") if config.tie_word_embeddings else None
    if tied_head is not None and not torch.equal(tied_head, tensors["model.embed_tokens.weight"]):
        raise CheckpointError(
            f"checkpoint {path}: config ties the embeddings but lm_head.weight differs from "
            "model.embed_tokens.weight; set tie_word_embeddings to false"
        )
    with torch.device("meta"):
        model = cls(config)
    state = {}
    for name in list(tensors):
        tensor = tensors.pop(name)
        if name not in skip:
            # An own copy: never file-mapped pages, so a checkpoint rewritten on disk can't change
            # the running model, and every tensor has the allocator's alignment.
            converted = tensor.to(device=device, dtype=dtype)
            state[name] = converted.clone() if converted.data_ptr() == tensor.data_ptr() else converted
        del tensor
    for name, layer in quantized.items():
        if name in skip:
            continue
        layer = _own_copy(layer)
        parent_name, _, attr = name.removesuffix(".weight").rpartition(".")
        parent = model.get_submodule(parent_name)
        if attr == "embed_tokens":
            setattr(parent, attr, QuantizedEmbedding(layer, dtype))
        else:
            setattr(parent, attr, layer)
    if config.tie_word_embeddings and "model.embed_tokens.weight" in state:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    if isinstance(model.model.embed_tokens, QuantizedEmbedding):
        model.tie_weights()  # a tied head is the table itself, not a float weight to load
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    missing = [n for n in missing if n.rsplit(".", 1)[-1] not in QUANT_SUFFIXES]
    if missing or unexpected:  # check_tensors has seen every name: a mismatch here is a bug
        raise CheckpointError(f"checkpoint {path}: not loaded: {missing or unexpected}")
    model.tie_weights()
    quantize_model(model, quantize, group_size)  # (off the CPU, "none": dequantized there, then moved)
    return model.to(device).eval()


def _own_copy(layer: QuantizedLinear) -> QuantizedLinear:
    """``layer`` over its own memory (never file-mapped pages)."""
    mins = None if layer.mins is None else layer.mins.clone()
    return QuantizedLinear(layer.qweight.clone(), layer.scales.clone(), mins, layer.in_features)


def _atomic_save(tensors: dict[str, torch.Tensor], file: Path) -> None:
    write_atomic(file, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))


def save_tensors(tensors: dict[str, torch.Tensor], path: Path, max_shard_bytes: int | None = None) -> list[Path]:
    """Write ``tensors`` as model.safetensors, or as shards + index above ``max_shard_bytes``."""
    path.mkdir(parents=True, exist_ok=True)
    limit = max_shard_bytes or DEFAULT_SHARD_BYTES
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][name] = tensor.detach().contiguous()
        size += nbytes
    for stale in (SAFETENSORS_INDEX, BIN_INDEX, BIN, SAFETENSORS):
        if (path / stale).exists():
            (path / stale).unlink()
    if len(shards) == 1:
        _atomic_save(shards[0], path / SAFETENSORS)
        return [path / SAFETENSORS]
    n = len(shards)
    weight_map, written = {}, []
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{n:05d}.safetensors"
        _atomic_save(shard, path / name)
        weight_map.update({t: name for t in shard})
        written.append(path / name)
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    write_text_atomic(path / SAFETENSORS_INDEX, json.dumps(index, indent=2) + "\n")
    return written


def save_model(model: MiniCPMForCausalLM, path: str | Path, max_shard_bytes: int | None = None) -> None:
    if model.fused:
        raise ValueError("this model's projections are fused for inference; save the checkpoint it was loaded from")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_checkpoint(model_weights(model), model.config.to_dict(), path, max_shard_bytes)


def model_weights(model: MiniCPMForCausalLM) -> dict[str, torch.Tensor | QuantizedLinear]:
    """``model``'s weights by checkpoint name, quantized layers as they are; a tied head once, as
    the embedding."""
    out: dict[str, torch.Tensor | QuantizedLinear] = dict(model.named_parameters())  # a tied float head once
    embed = model.model.embed_tokens
    for name, module in model.named_modules():  # a module registered twice (a tied head) once
        if isinstance(module, QuantizedLinear):
            base = "model.embed_tokens" if isinstance(embed, QuantizedEmbedding) and module is embed.table else name
            out[f"{base}.weight"] = module
    return out


def save_checkpoint(
    weights: dict[str, torch.Tensor | QuantizedLinear], config: dict, path: Path, max_shard_bytes: int | None = None
) -> None:
    """Write ``weights`` (quantized ones as ``.qweight`` / ``.scales`` / ``.mins``) and ``config``
    (with a ``quantization_config`` naming the formats, when there are any) into ``path``."""
    tensors: dict[str, torch.Tensor] = {}
    formats = set()
    for name, w in weights.items():
        if isinstance(w, QuantizedLinear):
            base = name.removesuffix(".weight")
            tensors |= {f"{base}.{sfx}": t for sfx, t in w.tensors().items()}
            formats.add(f"{w.fmt}-g{w.group}" if w.group != w.in_features else f"{w.fmt}-per-channel")
        else:
            tensors[name] = w
    config = {k: v for k, v in config.items() if k != "quantization_config"}
    if formats:  # informative (this loader reads the tensors' names), and a stop sign for other loaders
        config["quantization_config"] = {"quant_method": "minicpm-weight-only", "formats": sorted(formats)}
    save_tensors(tensors, path, max_shard_bytes)
    write_text_atomic(path / "config.json", json.dumps(config, indent=2) + "\n")
