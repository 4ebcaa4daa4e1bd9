"""Checkpoint files: find, read, check and write model weights.

Contract: a checkpoint directory holds ``config.json`` and one of ``model.safetensors``,
``model.safetensors.index.json`` (+ shards), ``pytorch_model.bin`` or
``pytorch_model.bin.index.json`` (+ shards); tensors use Llama's names. Nothing executes code from
the checkpoint, and a checkpoint whose tensors don't match the config fails with a
:class:`CheckpointError` that lists every missing, unexpected and mis-shaped tensor, before any
weight is read.

Loading goes tensor by tensor (:func:`load_model`): each weight is read into memory of its own
(safetensors with plain file reads, a ``.bin`` through ``torch.load(weights_only=True, mmap=True)``
with the pages it read handed back), converted to the model's dtype, quantized and packed with
``quantize`` int8 / int4, and put in the model before the next is read, largest first, with the
memory freed on the way handed back to the system. So the peak exceeds what the model keeps by
about one tensor and bounded temporaries, not by a copy of the model (``benchmarks/load_memory.py``
measures it; a test bounds it), and the running model never lies on file pages.
Writing goes tensor by tensor too, to temporary names that are renamed into place once complete,
so an interrupted save leaves no half-written file under a final name.

Quantized checkpoints (:mod:`minicpm.quant`) store a weight ``<name>.weight`` as
``<name>.qweight``, ``<name>.scales`` and optionally ``<name>.mins``, or as the blocks of a GGUF
tensor, ``<name>.gguf_<TYPE>`` (uint8, a row of blocks per output row; TYPE one of
:data:`~minicpm.quant.GGUF_TYPES`; decoded when loaded, see :func:`minicpm.quant.from_gguf`);
they are checked against the config by the weight's logical shape. :func:`load_model`'s
``quantize`` decides what runs: "auto" keeps a stored format on CPU (elsewhere it is dequantized),
"none" dequantizes, "int8" / "int4" quantize every linear layer (see
:func:`minicpm.quant.quantize_model`).
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import functools
import itertools
import json
import math
import mmap
import os
import pickle
import struct
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from .config import MiniCPMConfig
from .errors import UserError
from .fileio import write_text_atomic, writing
from .quant import (
    FORMATS,
    GGUF_BLOCKS,
    GGUF_TYPES,
    QuantizedEmbedding,
    QuantizedLinear,
    check_quantize,
    from_gguf,
    is_linear_weight,
    quantize_model,
    quantize_weight,
)

if TYPE_CHECKING:
    from .model import MiniCPMForCausalLM

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"
# Tensors some checkpoints carry that the model derives itself.
IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)
DEFAULT_SHARD_BYTES = 4 * 1024**3


class CheckpointError(UserError):
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


# safetensors dtype names -> torch dtypes (what a checkpoint of this project can hold)
SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_SAFETENSORS = {v: k for k, v in SAFETENSORS_DTYPES.items()}
READ_CHUNK = 8 * 2**20  # bytes read (and converted) at a time when a tensor changes dtype on the way in


@dataclasses.dataclass(eq=False)
class StoredTensor:
    """One tensor of a checkpoint file, not read yet; :meth:`read` gives it in its own memory.

    A safetensors tensor is read with plain file reads straight into its tensor (``offset``: where
    its bytes start), never through a mapping whose pages would count as the process's until it is
    closed; a torch pickle's (``mapped``, loaded with ``mmap=True``) is copied out of the mapping
    and the pages it read are handed back at once (``madvise``), so neither keeps a second copy of
    the checkpoint resident while the model is built."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    file: Path
    offset: int = 0
    mapped: torch.Tensor | None = None  # a torch pickle's tensor (over the file's pages, or in memory)
    file_backed: bool = False  # ``mapped`` lies on the file's pages (else it is memory of its own)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize

    def read(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The tensor in its own memory, in ``dtype`` (default: as stored); converted
        :data:`READ_CHUNK` bytes at a time, so a change of dtype costs no second whole copy."""
        dtype = dtype or self.dtype
        if self.mapped is not None and not self.file_backed:
            return self.mapped.to(dtype)  # a legacy pickle read whole: its memory is already its own
        out = torch.empty(self.shape, dtype=dtype)
        if self.numel == 0:
            return out
        if not self.shape:
            out.copy_(self.rows(0, 1))
        elif self.mapped is not None:
            for a, b in self.row_ranges(READ_CHUNK):
                part = self.mapped[a:b]
                out[a:b] = part
                _release_pages(part)
        elif dtype == self.dtype:
            self._read_into(out, 0)
        else:
            for a, b in self.row_ranges(READ_CHUNK):
                out[a:b] = self.rows(a, b)
        return out

    def row_ranges(self, nbytes: int) -> list[tuple[int, int]]:
        """``(start, stop)`` ranges of rows (the first dimension) of about ``nbytes`` each."""
        rows = self.shape[0] if self.shape else 1
        step = max(1, nbytes // max(1, self.nbytes // max(rows, 1)))
        return [(a, min(rows, a + step)) for a in range(0, rows, step)]

    def rows(self, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` (the first dimension) as stored, in memory of their own."""
        if self.mapped is not None:
            part = self.mapped if not self.shape else self.mapped[start:stop]
            out = part.clone(memory_format=torch.contiguous_format)
            if self.file_backed:
                _release_pages(part)
            return out
        shape = (stop - start, *self.shape[1:]) if self.shape else ()
        out = torch.empty(shape, dtype=self.dtype)
        self._read_into(out, start * (self.nbytes // max(self.shape[0], 1) if self.shape else 0))
        return out

    def _read_into(self, out: torch.Tensor, at: int) -> None:
        """Fill ``out`` (contiguous) from the file's bytes ``at`` bytes into this tensor."""
        view = memoryview(out.view(-1).view(torch.uint8).numpy()) if out.numel() else memoryview(b"")
        try:
            read_exactly(self.file, self.offset + at, view)
        except EOFError:
            raise _broken(self.file, EOFError(f"tensor {self.name} ends past the end of the file")) from None


def read_exactly(file: Path, offset: int, view: memoryview) -> None:
    """Fill ``view`` with ``file``'s bytes from ``offset`` by plain reads (no mapping whose pages
    would stay counted); ``EOFError`` where the file ends first."""
    with open(file, "rb", buffering=0) as f:
        f.seek(offset)
        done = 0
        while done < len(view):
            n = f.readinto(view[done:])
            if not n:
                raise EOFError(f"{file} ends {len(view) - done} bytes short")
            done += n


def _release_pages(t: torch.Tensor) -> None:
    """Hand back the pages of a file mapping that ``t`` lies on (whole pages only: a neighbour's
    edge stays), so that a checkpoint read through a mapping is not counted twice. The pages hold
    the file's bytes unchanged (a private mapping, never written): touched again, they are read
    again from the file. Linux only; elsewhere a no-op."""
    libc = _libc()
    if libc is None or t.numel() == 0:
        return
    start = t.data_ptr()
    extent = (sum((s - 1) * st for s, st in zip(t.shape, t.stride(), strict=True)) + 1) * t.element_size()
    page = mmap.PAGESIZE
    first, last = -(-start // page) * page, (start + extent) // page * page
    if last > first:
        libc.madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), MADV_DONTNEED)


MADV_DONTNEED = 4


@functools.cache
def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        return libc
    except (OSError, AttributeError):
        return None


def release_freed_memory() -> None:
    """Hand memory the process has freed back to the system: glibc keeps the pages of freed heap
    blocks (below its 32 MB mmap threshold) until asked, so a model built tensor by tensor would
    otherwise hold every temporary it freed (the peak, not the resident size, grows). Called after
    each weight while loading and each layer while the engine packs them (a millisecond or so); a
    no-op where there is no ``malloc_trim``."""
    libc = _libc()
    if libc is not None:
        with contextlib.suppress(AttributeError):
            libc.malloc_trim(0)


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
LOAD_MMAP_THRESHOLD = 1 << 20  # while loading: blocks from 1 MiB up get their own mapping
RUN_MMAP_THRESHOLD = 32 << 20  # afterwards: where glibc's own adjustment of the threshold tops out
_steady_depth = 0


@contextlib.contextmanager
def steady_heap() -> Iterator[None]:
    """While loading, every allocation of 1 MiB or more gets a mapping of its own, handed back to
    the system when freed. Left alone, glibc raises its mmap threshold to the largest block freed so
    far (up to 32 MiB), so whether a weight's temporaries went back at once depended on what had
    been freed before: the load's peak moved by tens of MB from run to run (int4 at the medium test
    shape: 1.28x to 1.51x the resident growth; pinned: 1.28x, six runs). On leaving the outermost
    use the threshold is set to 32 MiB, glibc's adjustment's ceiling (a fixed threshold ends that
    adjustment for good). A no-op without glibc's ``mallopt``."""
    global _steady_depth
    libc = _libc()
    mallopt = getattr(libc, "mallopt", None) if libc is not None else None
    if mallopt is None:
        yield
        return
    if _steady_depth == 0:
        mallopt(M_MMAP_THRESHOLD, LOAD_MMAP_THRESHOLD)
    _steady_depth += 1
    try:
        yield
    finally:
        _steady_depth -= 1
        if _steady_depth == 0:
            mallopt(M_MMAP_THRESHOLD, RUN_MMAP_THRESHOLD)


def stored_tensors(files: list[Path]) -> list[StoredTensor]:
    """Every tensor of ``files`` (safetensors or torch pickles), in file order, none read yet."""
    out: list[StoredTensor] = []
    for file in files:
        if file.suffix == ".safetensors":
            out += _safetensors_entries(file)
        else:
            state, mapped = _torch_load(file)
            if not isinstance(state, dict):
                raise CheckpointError(f"{file} holds a {type(state).__name__}, not a dict of tensors")
            for name, t in state.items():
                if not isinstance(t, torch.Tensor):
                    raise CheckpointError(f"{file}: {name} is a {type(t).__name__}, not a tensor")
                out.append(StoredTensor(name, tuple(t.shape), t.dtype, file, mapped=t, file_backed=mapped))
    return out


def iter_tensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) from safetensors or torch pickle files, one tensor in memory at a time."""
    for entry in stored_tensors(files):
        yield entry.name, entry.read()


def _broken(file: Path, exc: Exception) -> CheckpointError:
    size = file.stat().st_size if file.exists() else 0
    return CheckpointError(
        f"{file} is not a readable safetensors file ({size:,} bytes; {exc}): it is probably truncated or "
        "corrupt, e.g. an interrupted download; download or convert it again"
    )


def _safetensors_entries(file: Path) -> list[StoredTensor]:
    """The tensors of one safetensors file (from its header; nothing read); a truncated or corrupt
    file (the usual interrupted download) is a :class:`CheckpointError` that names it and its size."""
    try:  # safetensors' own checks of the header against the file's size
        with safe_open(str(file), framework="pt"):
            pass
    except SafetensorError as exc:  # its own error for a bad header or size (not an OSError)
        raise _broken(file, exc) from None
    try:
        with open(file, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
    except (OSError, ValueError, struct.error) as exc:
        raise _broken(file, exc) from None
    out = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = SAFETENSORS_DTYPES.get(info["dtype"])
        if dtype is None:
            raise CheckpointError(f"{file}: tensor {name} has dtype {info['dtype']}, which this loader does not read")
        begin, end = info["data_offsets"]
        entry = StoredTensor(name, tuple(info["shape"]), dtype, file, offset=8 + size + begin)
        if end - begin != entry.nbytes:
            raise _broken(file, ValueError(f"tensor {name} has {end - begin} bytes for its shape's {entry.nbytes}"))
        out.append(entry)
    return out


def _unreadable(file: Path, exc: Exception) -> CheckpointError:
    text = str(exc)
    lines = [x.strip() for x in text.split("WeightsUnpickler error:", 1)[-1].splitlines() if x.strip()]
    detail = lines[0] if lines else type(exc).__name__  # torch's own message runs to many lines
    return CheckpointError(
        f"{file} is not a readable weights-only PyTorch checkpoint, probably truncated or corrupt "
        f"({type(exc).__name__}: {detail})"
    )


# What torch.load raises on a file that is not a (weights-only) checkpoint, besides its RuntimeError
# for a broken zip archive: a bad pickle, one cut short, a refused global. An OSError (a file that
# cannot be read) propagates as it is.
TORCH_LOAD_FAILURES: tuple[type[Exception], ...] = (pickle.UnpicklingError, EOFError, ValueError, struct.error)


def _torch_load(file: Path) -> tuple[object, bool]:
    """A torch pickle's contents, mapped from the file where it allows (the bool says so)."""
    try:
        return torch.load(file, map_location="cpu", weights_only=True, mmap=True), True
    except RuntimeError as exc:
        if "mmap" not in str(exc):  # legacy (non-zip) files can't be mapped; read them whole
            raise _unreadable(file, exc) from None
    except TORCH_LOAD_FAILURES as exc:
        raise _unreadable(file, exc) from None
    try:
        return torch.load(file, map_location="cpu", weights_only=True), False
    except (RuntimeError, *TORCH_LOAD_FAILURES) as exc:
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
        raise UserError(f"unknown dtype {name!r}; use one of {', '.join(DTYPE_NAMES)}")
    return DTYPE_NAMES[name]


def resolve_dtype(dtype: torch.dtype | str | None, device: torch.device) -> torch.dtype:
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    return dtype_by_name(dtype)


QUANT_SUFFIXES = ("qweight", "scales", "mins")
GGUF_PREFIX = "gguf_"  # ``<name>.gguf_<TYPE>``: a GGUF tensor's blocks as the GGUF stores them


@dataclasses.dataclass(eq=False)
class StoredWeight:
    """One weight of a checkpoint, by the model's name and logical shape, not read yet: a float
    tensor (part ""), a quantized one (parts "qweight", "scales", "mins") or a GGUF tensor's
    blocks (one part "gguf_<TYPE>", :data:`~minicpm.quant.GGUF_TYPES`)."""

    name: str
    shape: tuple[int, ...]
    parts: dict[str, StoredTensor]

    @property
    def quantized(self) -> bool:
        return "" not in self.parts

    @property
    def gguf_kind(self) -> str | None:
        """The GGUF type of a weight stored as GGUF blocks, else None."""
        (first, *_) = self.parts
        return first.removeprefix(GGUF_PREFIX) if first.startswith(GGUF_PREFIX) else None

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.parts.values())

    @property
    def loaded_bytes(self) -> int:
        """Bytes it takes once loaded as stored: GGUF blocks decoded (codes, float32 scales and
        minimums), anything else as in the file."""
        kind = self.gguf_kind
        if kind is None:
            return self.nbytes
        n, k = self.shape
        _, _, fmt, group = GGUF_BLOCKS[kind]
        per_group = 2 if kind in ("Q4_0", "Q4_1", "Q4_K") else 1  # a scale, and a minimum
        return n * k // (1 if fmt == "int8" else 2) + 4 * per_group * n * (k // group)

    def load(self, dtype: torch.dtype | None = None) -> torch.Tensor | QuantizedLinear:
        """The weight in its own memory: a float tensor in ``dtype`` (default: as stored), or a
        :class:`~minicpm.quant.QuantizedLinear` (GGUF blocks decoded into its layout)."""
        if not self.quantized:
            return self.parts[""].read(dtype)
        if "qweight" in self.parts:
            mins = self.parts.get("mins")
            return QuantizedLinear(
                self.parts["qweight"].read(),
                self.parts["scales"].read(),
                None if mins is None else mins.read(),
                self.shape[1],
            )
        ((blocks),) = self.parts.values()
        return from_gguf(blocks.read().numpy(), self.gguf_kind, self.shape)


def gguf_name(name: str, kind: str) -> str:
    """The tensor name that holds weight ``name`` as GGUF blocks of type ``kind``."""
    return f"{name.removesuffix('.weight')}.{GGUF_PREFIX}{kind}"


def _meta(t: StoredTensor | None) -> torch.Tensor | None:
    return None if t is None else torch.empty(t.shape, dtype=t.dtype, device="meta")


def stored_weights(entries: list[StoredTensor], where: Path | str) -> dict[str, StoredWeight]:
    """``entries`` by weight: every ``<name>.qweight`` / ``.scales`` / ``.mins`` triple and every
    ``<name>.gguf_<TYPE>`` as one ``<name>.weight``, checked (shapes and dtypes, nothing read); a
    partial or inconsistent one is a :class:`CheckpointError` naming it."""
    weights: dict[str, StoredWeight] = {}
    groups: dict[str, dict[str, StoredTensor]] = {}
    for entry in entries:
        base, _, suffix = entry.name.rpartition(".")
        if base and (suffix in QUANT_SUFFIXES or suffix.startswith(GGUF_PREFIX)):
            groups.setdefault(base, {})[suffix] = entry
        else:
            weights[entry.name] = StoredWeight(entry.name, entry.shape, {"": entry})
    for base, parts in groups.items():
        name = f"{base}.weight"
        if name in weights:
            raise CheckpointError(f"checkpoint {where}: {name} is stored both as a float and as a quantized tensor")
        blocks = [s for s in parts if s.startswith(GGUF_PREFIX)]
        if blocks:
            kind = blocks[0].removeprefix(GGUF_PREFIX)
            entry = parts[blocks[0]]
            if len(parts) > 1 or kind not in GGUF_BLOCKS:
                raise CheckpointError(
                    f"checkpoint {where}: quantized tensor {base} has parts {', '.join(sorted(parts))}; "
                    f"GGUF blocks are one {GGUF_PREFIX}<TYPE> tensor, TYPE one of {', '.join(GGUF_TYPES)}"
                )
            per_block, block_bytes, _, _ = GGUF_BLOCKS[kind]
            if entry.dtype != torch.uint8 or len(entry.shape) != 2 or entry.shape[1] % block_bytes:
                raise CheckpointError(
                    f"checkpoint {where}: {entry.name} must be uint8 rows of whole {block_bytes}-byte {kind} "
                    f"blocks, got {entry.dtype} {list(entry.shape)}"
                )
            weights[name] = StoredWeight(name, (entry.shape[0], entry.shape[1] // block_bytes * per_block), parts)
            continue
        if "qweight" not in parts or "scales" not in parts:
            raise CheckpointError(f"checkpoint {where}: quantized tensor {base} needs both .qweight and .scales")
        q = parts["qweight"]
        in_features = q.shape[1] * (2 if q.dtype == torch.uint8 else 1) if len(q.shape) == 2 else 0
        try:  # QuantizedLinear's own checks, on the meta device: nothing is read
            QuantizedLinear(_meta(q), _meta(parts["scales"]), _meta(parts.get("mins")), in_features)
        except ValueError as exc:
            raise CheckpointError(f"checkpoint {where}: quantized tensor {base}: {exc}") from None
        weights[name] = StoredWeight(name, (q.shape[0], in_features), parts)
    return weights


@dataclasses.dataclass
class Checkpoint:
    """A checkpoint directory opened and checked against its config, no weight read yet."""

    path: Path
    config: MiniCPMConfig
    weights: dict[str, StoredWeight]  # what the model takes, by name (derived buffers and a tied head left out)
    skipped: dict[str, StoredWeight]  # what it does not


def open_checkpoint(path: str | Path) -> Checkpoint:
    """``path``'s config and weights (read lazily, see :class:`StoredTensor`), after checking
    every tensor against the config."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory {path} does not exist")
    config = MiniCPMConfig.from_pretrained(path)
    weights = stored_weights(stored_tensors(weight_files(path)), path)
    skip = check_tensors(config, {n: w.shape for n, w in weights.items()}, path)
    return Checkpoint(
        path,
        config,
        {n: w for n, w in weights.items() if n not in skip},
        {n: w for n, w in weights.items() if n in skip},
    )


def _same_values(a: StoredWeight, b: StoredWeight) -> bool:
    """Whether two stored weights hold the same values (read a few MB at a time)."""
    if a.parts.keys() != b.parts.keys():
        return False
    for key, x in a.parts.items():
        y = b.parts[key]
        if x.shape != y.shape:
            return False
        dtype = torch.promote_types(x.dtype, y.dtype)
        for start, stop in x.row_ranges(READ_CHUNK):
            if not torch.equal(x.rows(start, stop).to(dtype), y.rows(start, stop).to(dtype)):
                return False
    return True


def check_tied_head(checkpoint: Checkpoint) -> None:
    """A tied config with an ``lm_head.weight`` stored beside the table: they must be equal."""
    head = checkpoint.skipped.get("lm_head.weight")
    table = checkpoint.weights.get("model.embed_tokens.weight")
    tied = checkpoint.config.tie_word_embeddings and head is not None and table is not None
    if tied and not _same_values(head, table):
        raise CheckpointError(
            f"checkpoint {checkpoint.path}: config ties the embeddings but lm_head.weight differs from "
            "model.embed_tokens.weight; set tie_word_embeddings to false"
        )


def _exact_in(stored: torch.dtype, dtype: torch.dtype) -> bool:
    """Whether every ``stored`` value is exactly a ``dtype`` value (bfloat16 in float32, say)."""
    return stored == dtype or (stored.is_floating_point and torch.promote_types(stored, dtype) == dtype)


def load_weight(
    weight: StoredWeight, dtype: torch.dtype | None, quantize: str, tied: bool, group_size: int | None = None
) -> torch.Tensor | QuantizedLinear | None:
    """One weight read and brought to what runs (:func:`minicpm.quant.quantize_weight`): float
    ones in ``dtype`` (None: as stored; dequantized ones then float32), a linear weight to be
    quantized straight from what is stored where that widens exactly into ``dtype`` (as if
    converted first, without the float copy). None: a tied head, which is the table."""
    if weight.quantized:
        value = weight.load()
    else:
        stored = weight.parts[""].dtype
        quantized_next = quantize in FORMATS and (
            is_linear_weight(weight.name) or weight.name == "model.embed_tokens.weight"
        )
        exact = dtype is None or (quantized_next and _exact_in(stored, dtype))
        value = weight.load(None if exact else dtype)
    return quantize_weight(weight.name, value, quantize, dtype or torch.float32, tied, group_size)


def _install(model: nn.Module, name: str, value: torch.Tensor | QuantizedLinear, dtype: torch.dtype) -> None:
    """Put ``value`` in ``model`` (built on the meta device) as its weight ``name``."""
    owner_name, _, attr = name.rpartition(".")
    if isinstance(value, QuantizedLinear):  # the layer itself is replaced
        parent_name, _, layer = owner_name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, layer, QuantizedEmbedding(value, dtype) if layer == "embed_tokens" else value)
        return
    owner = model.get_submodule(owner_name)
    old = getattr(owner, attr)
    if tuple(old.shape) != tuple(value.shape):  # check_tensors has seen every shape: this is a bug
        raise CheckpointError(f"{name}: loaded shape {list(value.shape)}, the model's {list(old.shape)}")
    setattr(owner, attr, nn.Parameter(value, requires_grad=old.requires_grad))


def load_model(
    cls: type[MiniCPMForCausalLM],
    path: str | Path,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str = "cpu",
    quantize: str = "auto",
    group_size: int | None = None,
) -> MiniCPMForCausalLM:
    """``cls`` with the checkpoint's weights in ``dtype`` on ``device``; quantized weights as
    ``quantize`` says (module docstring). Weight-only quantized layers run on the CPU only.

    Tensor by tensor: each is read into its own memory, converted (quantized, with int8 / int4)
    and put in the model before the next is read, largest first, so the peak stays near what the
    model keeps (:data:`READ_CHUNK` and :data:`~minicpm.quant.CHUNK` bound the temporaries)."""
    path = Path(path)
    device = torch.device(device)
    dtype = resolve_dtype(dtype, device)
    check_quantize(quantize, group_size)
    if quantize in ("int8", "int4") and device.type != "cpu":
        raise UserError(f"quantize={quantize!r} runs on the CPU; the model is to load on {device}")
    checkpoint = open_checkpoint(path)
    config = checkpoint.config
    if device.type != "cpu":
        quantize = "none"
    check_tied_head(checkpoint)
    with torch.device("meta"):
        model = cls(config)
    tied = config.tie_word_embeddings
    with steady_heap():
        for weight in sorted(checkpoint.weights.values(), key=lambda w: -w.nbytes):
            value = load_weight(weight, dtype, quantize, tied, group_size)
            if value is None:
                continue
            if device.type != "cpu":
                value = value.to(device)
            _install(model, weight.name, value, dtype)
            del value
            release_freed_memory()
    model.tie_weights()
    left = [n for n, t in itertools.chain(model.named_parameters(), model.named_buffers()) if t.is_meta]
    if left:  # check_tensors has seen every name: a weight missing here is a bug
        raise CheckpointError(f"checkpoint {path}: not loaded: {left}")
    quantize_model(model, quantize, group_size)  # every weight is in its format already: nothing to do
    return model.to(device).eval()


class _SafetensorsWriter:
    """One safetensors file written a tensor at a time: the data goes after room kept for the
    header (``reserve`` bytes), which is written last, padded with spaces as the format allows;
    a header larger than the room moves the data once. Tensors are written in the order given
    (safetensors reads any order; a tensor may then start at an offset its element size does not
    divide, which safetensors reads as well)."""

    def __init__(self, file: Path, reserve: int) -> None:
        self.file = file
        self.reserve = reserve + (-(8 + reserve) % 64)  # the data starts 64-byte aligned
        self.f = open(file, "wb")  # noqa: SIM115 - closed by finish / abandon
        self.f.seek(8 + self.reserve)
        self.entries: dict[str, dict] = {}
        self.size = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        t = tensor.detach()
        t = (t if t.device.type == "cpu" else t.cpu()).contiguous()
        if t.dtype not in DTYPE_SAFETENSORS:
            raise ValueError(f"{name}: dtype {t.dtype} cannot be written to safetensors here")
        if name in self.entries:
            raise ValueError(f"tensor {name} written twice")
        nbytes = t.numel() * t.element_size()
        if nbytes:
            self.f.write(memoryview(t.view(-1).view(torch.uint8).numpy()))
        self.entries[name] = {
            "dtype": DTYPE_SAFETENSORS[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [self.size, self.size + nbytes],
        }
        self.size += nbytes

    def finish(self) -> None:
        header = json.dumps({"__metadata__": {"format": "pt"}, **self.entries}, separators=(",", ":")).encode()
        if len(header) > self.reserve:  # more than the room kept: write the file again behind a bigger header
            self._move_data(len(header))
        header += b" " * (self.reserve - len(header))
        self.f.seek(0)
        self.f.write(struct.pack("<Q", len(header)) + header)
        self.f.close()

    def _move_data(self, need: int) -> None:
        start = 8 + self.reserve
        self.f.close()
        self.reserve = need + (-(8 + need) % 64)
        moved = self.file.with_name(self.file.name + ".moved")
        with open(self.file, "rb") as src, open(moved, "wb") as dst:
            src.seek(start)
            dst.seek(8 + self.reserve)
            while chunk := src.read(READ_CHUNK):
                dst.write(chunk)
        os.replace(moved, self.file)
        self.f = open(self.file, "r+b")  # noqa: SIM115 - closed by finish

    def abandon(self) -> None:
        self.f.close()
        self.file.unlink(missing_ok=True)


def header_room(names: Iterable[str]) -> int:
    """Bytes a safetensors header needs at most for tensors ``names`` (up to 4 dimensions)."""
    return 64 + sum(len(json.dumps(n)) + 170 for n in names)


def save_tensors(
    tensors: dict[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
    path: Path,
    max_shard_bytes: int | None = None,
    names: Iterable[str] | None = None,
) -> list[Path]:
    """Write ``tensors`` (a dict, or (name, tensor) pairs made one at a time: then ``names`` lists
    every name that may come) as model.safetensors, or as shards + index above
    ``max_shard_bytes``; each tensor goes to disk as it comes (one in memory at a time)."""
    path.mkdir(parents=True, exist_ok=True)
    limit = max_shard_bytes or DEFAULT_SHARD_BYTES
    if isinstance(tensors, dict):
        names, items = list(tensors), tensors.items()
    else:
        if names is None:
            raise ValueError("save_tensors: give the names of the tensors that a stream may hold")
        items = tensors
    room = header_room(names)
    for stale in (SAFETENSORS_INDEX, BIN_INDEX, BIN, SAFETENSORS):
        if (path / stale).exists():
            (path / stale).unlink()
    shards: list[_SafetensorsWriter] = []
    try:
        with writing(path):  # a full disk names the directory
            for name, tensor in items:
                nbytes = tensor.numel() * tensor.element_size()
                if not shards or (shards[-1].entries and shards[-1].size + nbytes > limit):
                    if shards:
                        shards[-1].finish()
                    shards.append(_SafetensorsWriter(path / f".shard-{len(shards) + 1}.safetensors.tmp", room))
                shards[-1].add(name, tensor)
                del tensor
            if not shards:
                shards.append(_SafetensorsWriter(path / ".shard-1.safetensors.tmp", room))
            shards[-1].finish()
    except BaseException:
        for shard in shards:
            shard.abandon()
        raise
    if len(shards) == 1:
        os.replace(shards[0].file, path / SAFETENSORS)
        return [path / SAFETENSORS]
    n = len(shards)
    weight_map, written = {}, []
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{n:05d}.safetensors"
        os.replace(shard.file, path / name)
        weight_map.update({t: name for t in shard.entries})
        written.append(path / name)
    index = {"metadata": {"total_size": sum(s.size for s in shards)}, "weight_map": weight_map}
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


def stored_names(name: str) -> list[str]:
    """The tensor names weight ``name`` may be written as (float, or quantized)."""
    if not name.endswith(".weight"):
        return [name]
    base = name.removesuffix(".weight")
    return [name, *(f"{base}.{sfx}" for sfx in QUANT_SUFFIXES)]


def save_checkpoint(
    weights: dict[str, torch.Tensor | QuantizedLinear] | Iterable[tuple[str, torch.Tensor | QuantizedLinear]],
    config: dict,
    path: Path,
    max_shard_bytes: int | None = None,
    names: Iterable[str] | None = None,
) -> None:
    """Write ``weights`` (quantized ones as ``.qweight`` / ``.scales`` / ``.mins``; a dict, or
    (name, weight) pairs made one at a time, then ``names`` lists every tensor name that may be
    written, e.g. :func:`stored_names` of each weight that may come) and
    ``config`` (with a ``quantization_config`` naming the formats, when there are any) into
    ``path``. A tensor named ``<name>.gguf_<TYPE>`` is a GGUF tensor's blocks, written as given."""
    if isinstance(weights, dict):
        items = weights.items()
        names = [
            f"{n.removesuffix('.weight')}.{sfx}" if isinstance(w, QuantizedLinear) else n
            for n, w in weights.items()
            for sfx in (w.tensors() if isinstance(w, QuantizedLinear) else [""])
        ]
    elif names is None:
        raise ValueError("save_checkpoint: give the names of the weights that a stream may hold")
    else:
        items = weights
    formats = set()

    def tensors() -> Iterator[tuple[str, torch.Tensor]]:
        for name, w in items:
            if isinstance(w, QuantizedLinear):
                base = name.removesuffix(".weight")
                formats.add(f"{w.fmt}-g{w.group}" if w.group != w.in_features else f"{w.fmt}-per-channel")
                yield from ((f"{base}.{sfx}", t) for sfx, t in w.tensors().items())
            else:
                suffix = name.rpartition(".")[2]
                if suffix.startswith(GGUF_PREFIX):
                    formats.add(f"gguf-{suffix.removeprefix(GGUF_PREFIX)}")
                yield name, w

    save_tensors(tensors(), path, max_shard_bytes, names=names)
    config = {k: v for k, v in config.items() if k != "quantization_config"}
    if formats:  # informative (this loader reads the tensors' names), and a stop sign for other loaders
        config["quantization_config"] = {"quant_method": "minicpm-weight-only", "formats": sorted(formats)}
    write_text_atomic(path / "config.json", json.dumps(config, indent=2) + "\n")
