"""Checkpoint files: find, read, check and write model weights.

Contract: a checkpoint directory holds ``config.json`` and one of ``model.safetensors``,
``model.safetensors.index.json`` (+ shards), ``pytorch_model.bin`` or
``pytorch_model.bin.index.json`` (+ shards); tensors use Llama's names. Reading is lazy
(safetensors ``safe_open``, ``torch.load(weights_only=True, mmap=True)``), nothing executes code
from the checkpoint, and a checkpoint whose tensors don't match the config fails with a
:class:`CheckpointError` that lists every missing, unexpected and mis-shaped tensor. Writing goes
to temporary names that are renamed into place once complete, so an interrupted save leaves no
half-written file under a final name.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .config import MiniCPMConfig

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


def read_checkpoint(path: Path) -> tuple[MiniCPMConfig, dict[str, torch.Tensor], set[str]]:
    """A checkpoint directory's config, its tensors (lazily mapped where the format allows) and the
    names to skip, after checking every tensor against the config."""
    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory {path} does not exist")
    config = MiniCPMConfig.from_pretrained(path)
    tensors = dict(iter_tensors(weight_files(path)))
    skip = check_tensors(config, {n: tuple(t.shape) for n, t in tensors.items()}, path)
    return config, tensors, skip


def load_model(
    cls: type[MiniCPMForCausalLM],
    path: str | Path,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str = "cpu",
) -> MiniCPMForCausalLM:
    path = Path(path)
    device = torch.device(device)
    dtype = resolve_dtype(dtype, device)
    config, tensors, skip = read_checkpoint(path)
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
    if config.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    model.tie_weights()
    return model.eval()


def _atomic_save(tensors: dict[str, torch.Tensor], file: Path) -> None:
    tmp = file.with_name(file.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, file)


def _atomic_write_text(text: str, file: Path) -> None:
    tmp = file.with_name(file.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, file)


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
    _atomic_write_text(json.dumps(index, indent=2) + "\n", path / SAFETENSORS_INDEX)
    return written


def save_model(model: MiniCPMForCausalLM, path: str | Path, max_shard_bytes: int | None = None) -> None:
    if model.fused:
        raise ValueError("this model's projections are fused for inference; save the checkpoint it was loaded from")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = dict(model.named_parameters())  # a tied head appears once, as the embedding
    save_tensors(state, path, max_shard_bytes)
    model.config.save(path / "config.json")
