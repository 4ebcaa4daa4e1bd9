"""The persistent prefix cache: :class:`DiskKVStore` (block files on disk) and :class:`PrefixStore`
(an engine's link to it). Opt-in: ``EngineConfig.kv_cache_dir`` (``--kv-cache-dir``).

Contract:

* What is stored: full KV blocks of prompts of at least ``MIN_PROMPT_BLOCKS`` full blocks, in the
  cache's own format (every tensor of ``PagedKVCache.storage``: codes and scales for a quantized
  format), prompt tokens only, never generated ones.
* Keys are stable across processes: ``key_0 = sha256(identity, repr(hash_seed), ids of block 0)``,
  ``key_i = sha256(key_{i-1}, ids of block i)`` (ids as little-endian int32), so a key names a
  block's ids and everything before them. The identity (:func:`store_identity`) digests the model
  (:func:`model_fingerprint`: its config and each weight's name, shape, dtype and an evenly strided
  sample of its values, taken before the engine prepares it), the compute dtype, the weight
  quantization setting, the KV format, the block size, the head layout and ``FORMAT_VERSION``. A
  block lives at ``DIR/<identity[:16]>/<key[:2]>/<key>.kvb``: another model or KV format never opens
  another's files.
* A file is a header (magic, format version, identity, key, the block's token ids, each tensor's
  name, dtype, shape and offset, the payload length, the payload's CRC-32) and the payload. A read
  checks every one of them against what the live cache expects; a file that fails (truncated,
  foreign, corrupt, unparsable, or unreadable) is skipped, counted in ``skipped``, logged at
  WARNING once per kind of failure with its path, and removed (an unreadable one is left): never
  loaded. A read never raises into a step.
* Writes never delay a step: the engine thread only clones the block (on its device) and queues it
  for the store's one writer thread; with more than ``queue_bytes`` queued the block is dropped
  (``dropped``), never waited for. The writer writes a temporary file beside the final name and
  renames it into place (a reader sees a whole file or none); a failed write (a full disk, a
  read-only directory) leaves no temporary file, is counted in ``write_errors`` and logged once.
  ``flush()`` waits until the queue is written; ``close()`` flushes and stops the writer (later
  blocks are dropped); every store still open is closed at interpreter exit.
* Bounded: when the directory's total (every identity's files) exceeds ``max_bytes`` the least
  recently used files (by mtime; a read hit touches its file) are removed until it is under 90% of
  the bound. The writer keeps the total in memory and rescans the directory every
  ``RESCAN_WRITES`` writes or ``RESCAN_SECONDS`` (other processes write too). The default bound:
  20 GiB or half of what the cache may use on its filesystem (free space plus its own files),
  whichever is smaller.
* Several processes may share a directory: renames are atomic, readers need no lock (a file
  removed while open stays readable), and eviction passes take ``flock`` on ``DIR/.lock``.
* :class:`PrefixStore`: on a sequence's admission (after its in-memory prefix hits) it loads the
  next prompt blocks from disk in order, stopping at the first miss and leaving at least one
  prompt token to compute, into the sequence's new blocks; marks them computed (they count in
  ``num_cached_tokens``) and registers them in the in-memory prefix cache. After each step it
  queues the sequence's newly computed full prompt blocks that this process has not seen on disk.
  Requests that score their prompt (``prompt_logprobs``) are never served from disk.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import struct
import threading
import time
import uuid
import weakref
import zlib
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ..plan import format_bytes

try:
    import fcntl
except ImportError:  # not POSIX: eviction passes are not serialized across processes
    fcntl = None

if TYPE_CHECKING:
    from .attention.cache import PagedKVCache
    from .block_manager import BlockManager
    from .config import EngineConfig
    from .model_runner import ModelRunner
    from .sequence import Sequence as Seq

log = logging.getLogger("minicpm.engine")

FORMAT_VERSION = 1
MAGIC = b"MCPMKVB\x00"
PREFIX = struct.Struct("<8sI")  # magic, header length
ALIGN = 64  # the payload and each tensor in it start at a multiple of this
SUFFIX = ".kvb"
MIN_PROMPT_BLOCKS = 2
DEFAULT_MAX_BYTES = 20 * 2**30
QUEUE_BYTES = 512 * 2**20
RESCAN_WRITES = 256
RESCAN_SECONDS = 30.0
EVICT_TO = 0.9
STALE_TMP_SECONDS = 600.0  # a temporary file this old was left by a writer that died
SAMPLE = 4096  # values sampled from each weight for the model fingerprint
HEADER_LIMIT = 2**20  # a header (magic, JSON) takes at most this
KNOWN_LIMIT = 2**20  # keys remembered as on disk
STATS = ("hits", "writes", "skipped", "dropped", "write_errors", "evicted", "bytes")

_IDENTITY_DIR = re.compile(r"[0-9a-f]{16}")
_SHARD_DIR = re.compile(r"[0-9a-f]{2}")


# ---------------------------------------------------------------------------------------- keys
def model_fingerprint(model: torch.nn.Module) -> str:
    """A digest of ``model``'s config and weights (each parameter's and buffer's name, shape,
    dtype and up to ``SAMPLE`` evenly spaced values), computed once per model and kept on it (so
    an engine over a model another engine has prepared gets the same one)."""
    memo = getattr(model, "_kv_fingerprint", None)
    if memo is not None:
        return memo
    h = hashlib.sha256()
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_dict"):
        h.update(json.dumps(config.to_dict(), sort_keys=True, default=str).encode())
    for kind, items in (("param", model.named_parameters()), ("buffer", model.named_buffers())):
        for name, t in items:
            h.update(f"{kind} {name} {tuple(t.shape)} {t.dtype}\n".encode())
            if t.device.type == "meta" or t.numel() == 0:
                continue
            flat = t.detach().reshape(-1)
            n = flat.numel()
            index = torch.linspace(0, n - 1, min(n, SAMPLE), dtype=torch.float64).long().to(flat.device)
            h.update(flat.index_select(0, index).cpu().contiguous().view(torch.uint8).numpy().tobytes())
    fingerprint = h.hexdigest()
    model._kv_fingerprint = fingerprint
    return fingerprint


def store_identity(fingerprint: str, **layout: object) -> str:
    """The store's identity (hex sha256) for a model ``fingerprint`` and what decides the bytes
    of a block (``layout``: KV format, block size, head layout, compute dtype, quantization)."""
    text = json.dumps({"version": FORMAT_VERSION, "model": fingerprint, **layout}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _ids_bytes(ids: Sequence[int]) -> bytes:
    return struct.pack(f"<{len(ids)}i", *ids)


def first_key(identity: str, hash_seed: object, ids: Sequence[int]) -> bytes:
    """Key of a sequence's first block (``hash_seed`` must have a stable ``repr``)."""
    return hashlib.sha256(b"\0".join((identity.encode(), repr(hash_seed).encode(), _ids_bytes(ids)))).digest()


def next_key(previous: bytes, ids: Sequence[int]) -> bytes:
    """Key of the block holding ``ids`` after the block keyed ``previous``."""
    return hashlib.sha256(previous + _ids_bytes(ids)).digest()


def default_max_bytes(directory: Path, used: int) -> int:
    """20 GiB, or half of free space plus ``used`` (the cache's own files) there if smaller."""
    free = shutil.disk_usage(directory).free
    return max(1, min(DEFAULT_MAX_BYTES, (free + used) // 2))


# ---------------------------------------------------------------------------------------- store
class _BadFileError(Exception):
    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(detail)
        self.kind, self.detail = kind, detail


@dataclass
class _Item:
    key: bytes
    ids: list[int]
    data: dict[str, Tensor]
    nbytes: int


Layout = dict[str, tuple[torch.dtype, tuple[int, ...]]]


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


class DiskKVStore:
    """Block files under ``directory`` for one ``identity`` (see the module docstring).
    ``max_bytes`` None: the default bound. Thread-safe: one engine thread reads and queues, the
    store's writer thread writes and evicts."""

    def __init__(
        self,
        directory: str | os.PathLike[str],
        identity: str,
        max_bytes: int | None = None,
        queue_bytes: int = QUEUE_BYTES,
    ) -> None:
        self.directory = Path(directory).expanduser()
        self.directory.mkdir(parents=True, exist_ok=True)  # an OSError names the directory
        self.identity = identity
        self.root = self.directory / identity[:16]
        self.queue_bytes = queue_bytes
        self.counts = dict.fromkeys(STATS, 0)
        files = self._scan()
        self.counts["bytes"] = sum(size for _, size, _ in files)
        self.max_bytes = max_bytes if max_bytes is not None else default_max_bytes(self.directory, self.counts["bytes"])
        self._scanned, self._since_scan = time.monotonic(), 0
        self._known: set[bytes] = set()  # keys this process has seen on disk, or queued
        self._warned: set[str] = set()
        self._queue: deque[_Item] = deque()
        self._queued_bytes = 0
        self._cond = threading.Condition()
        self._stopping = self._closed = False
        self._thread = threading.Thread(target=self._run, name="minicpm-kv-store", daemon=True)
        self._thread.start()
        _STORES.add(self)
        log.info(
            "kv cache dir %s: at most %s (%s in %d files now)",
            self.directory,
            format_bytes(self.max_bytes),
            format_bytes(self.counts["bytes"]),
            len(files),
        )

    def path(self, key: bytes) -> Path:
        name = key.hex()
        return self.root / name[:2] / f"{name}{SUFFIX}"

    def stats(self) -> dict[str, int]:
        return dict(self.counts)

    def _remember(self, key: bytes) -> None:
        if len(self._known) >= KNOWN_LIMIT:  # forgetting costs a rewrite at most
            self._known.clear()
        self._known.add(key)

    def known(self, key: bytes) -> bool:
        """Whether this process has seen ``key`` on disk (read, written or queued)."""
        return key in self._known

    # ------------------------------------------------------------------ reading (engine thread)
    def load(self, key: bytes, ids: Sequence[int], layout: Layout) -> dict[str, Tensor] | None:
        """The block stored under ``key`` as CPU tensors, if its file holds exactly ``ids`` in
        ``layout`` (name -> dtype, shape); None for a miss or a file that fails a check."""
        path = self.path(key)
        limit = sum(dtype.itemsize * _numel(shape) + ALIGN for dtype, shape in layout.values()) + HEADER_LIMIT
        try:
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size > limit:  # not read: no block of this cache is that large
                    raise _BadFileError("foreign", f"{size} bytes, a block of this cache takes at most {limit}")
                buf = bytearray(size)
                got = f.readinto(buf)
        except FileNotFoundError:
            self._known.discard(key)  # evicted, maybe by another process: write it again
            return None
        except OSError as exc:
            self._skip(path, key, "unreadable", exc.strerror or str(exc), remove=False)
            return None
        except _BadFileError as bad:
            self._skip(path, key, bad.kind, bad.detail, remove=True)
            return None
        try:
            data = self._parse(memoryview(buf)[:got], key, ids, layout)
        except _BadFileError as bad:
            self._skip(path, key, bad.kind, bad.detail, remove=True)
            return None
        with contextlib.suppress(OSError):
            os.utime(path)  # used now: the last to be evicted
        self._remember(key)
        self.counts["hits"] += 1
        return data

    def _parse(self, buf: memoryview, key: bytes, ids: Sequence[int], layout: Layout) -> dict[str, Tensor]:
        if len(buf) < PREFIX.size:
            raise _BadFileError("truncated", f"{len(buf)} bytes, shorter than a header")
        magic, length = PREFIX.unpack_from(buf)
        if magic != MAGIC:
            raise _BadFileError("foreign", "not a block file (no magic number)")
        start = PREFIX.size + length
        if len(buf) < start:
            raise _BadFileError("truncated", f"{len(buf)} bytes, the header alone needs {start}")
        try:
            header = json.loads(bytes(buf[PREFIX.size : start]))
            version, identity, stored_key = header["version"], header["identity"], header["key"]
            stored_ids, tensors = header["ids"], header["tensors"]
            payload, checksum = int(header["payload"]), int(header["crc32"])
            entries = [(str(n), str(d), tuple(int(x) for x in s), int(o)) for n, d, s, o in tensors]
        except (ValueError, TypeError, KeyError) as exc:
            raise _BadFileError("corrupt", f"unreadable header ({type(exc).__name__}: {exc})") from None
        if version != FORMAT_VERSION:
            raise _BadFileError("foreign", f"format version {version!r}, not {FORMAT_VERSION}")
        if identity != self.identity:
            raise _BadFileError("foreign", "written for another model or KV format")
        if stored_key != key.hex() or stored_ids != list(ids):
            raise _BadFileError("foreign", "holds another block")
        if len(buf) != start + payload:
            kind = "truncated" if len(buf) < start + payload else "corrupt"
            raise _BadFileError(kind, f"{len(buf)} bytes, the header says {start + payload}")
        expected = {name: (_dtype_name(dtype), shape) for name, (dtype, shape) in layout.items()}
        if {n: (d, s) for n, d, s, _ in entries} != expected or len(entries) != len(expected):
            raise _BadFileError("foreign", f"tensors {[e[:3] for e in entries]}, the cache's are {expected}")
        if zlib.crc32(buf[start:]) != checksum:
            raise _BadFileError("corrupt", "the payload's checksum does not match")
        out = {}
        for name, _, shape, offset in entries:
            dtype = layout[name][0]
            nbytes = dtype.itemsize * _numel(shape)
            if offset % ALIGN or offset < 0 or offset + nbytes > payload:
                raise _BadFileError("corrupt", f"tensor {name} at offset {offset} lies outside the payload")
            raw = torch.frombuffer(buf, dtype=torch.uint8, count=nbytes, offset=start + offset)
            out[name] = raw.view(dtype).view(shape)
        return out

    def _skip(self, path: Path, key: bytes, kind: str, detail: str, remove: bool) -> None:
        self.counts["skipped"] += 1
        self._known.discard(key)
        if remove:
            with contextlib.suppress(OSError):
                path.unlink()
        if kind not in self._warned:
            self._warned.add(kind)
            log.warning(
                "kv cache dir: skipped %s (%s: %s)%s; further %s files are skipped without a warning",
                path,
                kind,
                detail,
                "; removed it" if remove else "",
                kind,
            )

    # ------------------------------------------------------------------ writing
    def save(self, key: bytes, ids: Sequence[int], data: dict[str, Tensor]) -> bool:
        """Queue ``data`` (cloned already: the caller must not reuse it) for writing under
        ``key``; False (counted as dropped) when the queue is full or the store closed."""
        nbytes = sum(t.nbytes for t in data.values())
        with self._cond:
            if self._stopping or self._queued_bytes + nbytes > self.queue_bytes:
                self.counts["dropped"] += 1
                return False
            self._queue.append(_Item(key, list(ids), data, nbytes))
            self._queued_bytes += nbytes
            self._remember(key)
            self._cond.notify_all()
        return True

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every queued block is written (or failed); False on ``timeout``."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._queue or not self._thread.is_alive(), timeout)

    def close(self) -> None:
        """Flush, then stop the writer; later blocks are dropped. Logs what the store did."""
        if self._closed:
            return
        self.flush()
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._thread.join()
        self._closed = True
        _STORES.discard(self)
        c = self.counts
        log.info(
            "kv cache dir %s: %d blocks read, %d written, %d skipped, %d dropped, %d write errors, %d evicted",
            self.directory,
            c["hits"],
            c["writes"],
            c["skipped"],
            c["dropped"],
            c["write_errors"],
            c["evicted"],
        )

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._queue or self._stopping)
                if not self._queue:
                    return
                item = self._queue[0]
            try:
                if self._write(item):
                    self._maybe_evict()
            except Exception as exc:  # the writer never dies: counted and logged like a write error
                self._write_failed(self.path(item.key), item.key, exc)
            with self._cond:
                self._queue.popleft()
                self._queued_bytes -= item.nbytes
                self._cond.notify_all()

    def _write(self, item: _Item) -> bool:
        path = self.path(item.key)
        tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
        chunks, entries, offset = [], [], 0
        crc = 0
        for name, t in item.data.items():
            raw = t.detach().to("cpu").contiguous().view(torch.uint8).reshape(-1).numpy()
            pad = bytes(_align(offset) - offset)
            offset += len(pad)
            entries.append([name, _dtype_name(t.dtype), list(t.shape), offset])
            for chunk in (pad, raw):
                crc = zlib.crc32(chunk, crc)
                chunks.append(chunk)
            offset += raw.nbytes
        header = {
            "version": FORMAT_VERSION,
            "identity": self.identity,
            "key": item.key.hex(),
            "ids": item.ids,
            "tensors": entries,
            "payload": offset,
            "crc32": crc,
        }
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (_align(PREFIX.size + len(text)) - PREFIX.size - len(text))
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as f:
                f.write(PREFIX.pack(MAGIC, len(text)))
                f.write(text)
                for chunk in chunks:
                    f.write(chunk)
            os.replace(tmp, path)
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            self._write_failed(path, item.key, exc)
            return False
        self.counts["writes"] += 1
        self.counts["bytes"] += PREFIX.size + len(text) + offset
        self._since_scan += 1
        return True

    def _write_failed(self, path: Path, key: bytes, exc: Exception) -> None:
        self.counts["write_errors"] += 1
        self._known.discard(key)
        if "write" not in self._warned:
            self._warned.add("write")
            detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else f"{type(exc).__name__}: {exc}"
            log.warning(
                "kv cache dir: cannot write %s (%s); the block is not stored, serving goes on "
                "(further write errors are counted without a warning)",
                path,
                detail,
            )

    # ------------------------------------------------------------------ size bound (writer thread)
    def _maybe_evict(self) -> None:
        due = self._since_scan >= RESCAN_WRITES or time.monotonic() - self._scanned >= RESCAN_SECONDS
        if self.counts["bytes"] <= self.max_bytes and not due:
            return
        files = self._scan()
        total = sum(size for _, size, _ in files)
        if total > self.max_bytes:
            with self._dir_lock():
                files = self._scan()  # what other processes left, now that none evicts beside us
                total = sum(size for _, size, _ in files)
                target = int(self.max_bytes * EVICT_TO)
                for _, size, path in sorted(files):
                    if total <= target:
                        break
                    try:
                        path.unlink()
                    except FileNotFoundError:
                        pass
                    except OSError:
                        continue
                    else:
                        self.counts["evicted"] += 1
                        with contextlib.suppress(ValueError):
                            self._known.discard(bytes.fromhex(path.stem))
                    total -= size
        self.counts["bytes"] = total
        self._scanned, self._since_scan = time.monotonic(), 0

    @contextlib.contextmanager
    def _dir_lock(self) -> Iterator[None]:
        if fcntl is None:
            yield
            return
        fd = os.open(self.directory / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def _scan(self) -> list[tuple[int, int, Path]]:
        """(mtime ns, size, path) of every block file under the directory, of every identity;
        removes the temporary files of writers that died (those being written are left alone)."""
        found, now = [], time.time_ns()
        for ident in _subdirs(self.directory, _IDENTITY_DIR):
            for shard in _subdirs(ident, _SHARD_DIR):
                with contextlib.suppress(OSError), os.scandir(shard) as entries:
                    for entry in entries:
                        name = entry.name
                        try:
                            st = entry.stat(follow_symlinks=False)
                        except OSError:
                            continue
                        if name.startswith(".") and name.endswith(".tmp"):
                            if now - st.st_mtime_ns > STALE_TMP_SECONDS * 1e9:
                                with contextlib.suppress(OSError):
                                    os.unlink(entry.path)
                        elif name.endswith(SUFFIX) and entry.is_file(follow_symlinks=False):
                            found.append((st.st_mtime_ns, st.st_size, Path(entry.path)))
        return found


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _subdirs(path: Path, pattern: re.Pattern[str]) -> list[Path]:
    try:
        with os.scandir(path) as entries:
            return [Path(e.path) for e in entries if pattern.fullmatch(e.name) and e.is_dir(follow_symlinks=False)]
    except OSError:
        return []


_STORES: weakref.WeakSet[DiskKVStore] = weakref.WeakSet()


@atexit.register
def _close_stores() -> None:
    """At interpreter exit, every open store writes what it has queued. Registered before the
    engine's router threads' exit hook (this module is imported first), so it runs after it:
    the routers have stopped stepping by then."""
    for store in list(_STORES):
        with contextlib.suppress(Exception):
            store.close()


# ---------------------------------------------------------------------------------------- engine link
@dataclass
class _SeqKeys:
    keys: list[bytes] = field(default_factory=list)
    queued: int = 0  # prompt blocks already handed to the store (or found on disk)


class PrefixStore:
    """An engine's persistent prefix cache: ``admit(seq)`` after the block manager allocates a
    waiting sequence, ``computed(seq)`` after it commits a step's tokens (module docstring)."""

    def __init__(
        self, store: DiskKVStore, block_manager: BlockManager, cache: PagedKVCache, min_blocks: int = MIN_PROMPT_BLOCKS
    ) -> None:
        self.store = store
        self.block_manager = block_manager
        self.cache = cache
        self.block_size = block_manager.block_size
        self.min_blocks = min_blocks
        self.layout: Layout = {n: (t.dtype, (t.shape[0], *t.shape[2:])) for n, t in cache.storage.items()}
        self._seqs: weakref.WeakKeyDictionary[Seq, _SeqKeys] = weakref.WeakKeyDictionary()

    @classmethod
    def open(cls, config: EngineConfig, runner: ModelRunner, block_manager: BlockManager) -> PrefixStore:
        """The store of ``config.kv_cache_dir`` for ``runner``'s model and cache."""
        c = runner.model_config
        identity = store_identity(
            runner.fingerprint,
            kv_format=runner.kv_format.name,
            block_size=config.block_size,
            layers=c.num_hidden_layers,
            kv_heads=c.num_key_value_heads,
            head_dim=c.head_dim,
            compute_dtype=str(runner.dtype),
            quantize=[config.quantize, config.group_size],
            rotated=runner.cache.rotation is not None,
            # how the int4 writer picks its scales, and the values' group (absent for other formats:
            # their stores stay valid)
            **(
                {"int4_fits": runner.cache.int4_fits, "value_group": runner.kv_format.group(c.head_dim, True)}
                if runner.kv_format.name == "int4"
                else {}
            ),
        )
        store = DiskKVStore(config.kv_cache_dir, identity, config.kv_cache_dir_bytes)
        return cls(store, block_manager, runner.cache)

    def stats(self) -> dict[str, int]:
        return self.store.stats()

    def close(self) -> None:
        self.store.close()

    def _keys(self, seq: Seq, count: int) -> list[bytes]:
        """``seq``'s state, its first ``count`` prompt block keys computed."""
        state = self._seqs.get(seq)
        if state is None:
            state = self._seqs[seq] = _SeqKeys()
        bs, keys = self.block_size, state.keys
        for i in range(len(keys), count):
            ids = seq.prompt_ids[i * bs : (i + 1) * bs]
            keys.append(next_key(keys[-1], ids) if keys else first_key(self.store.identity, seq.hash_seed, ids))
        return keys

    def admit(self, seq: Seq) -> int:
        """Load what the store holds of ``seq``'s prompt after its in-memory hits; the number of
        blocks loaded."""
        bs = self.block_size
        full = seq.num_prompt_tokens // bs
        if full < self.min_blocks or seq.params.prompt_logprobs is not None:
            return 0
        start, end = seq.num_computed_tokens // bs, min(full, (seq.num_tokens - 1) // bs)
        if start >= end or seq.num_computed_tokens % bs:
            return 0
        keys = self._keys(seq, end)
        loaded = 0
        for i in range(start, end):
            data = self.store.load(keys[i], seq.prompt_ids[i * bs : (i + 1) * bs], self.layout)
            if data is None:
                break
            self.cache.load_block(seq.block_table[i], data)
            loaded += 1
        if loaded:
            seq.num_computed_tokens += loaded * bs
            if seq.num_preemptions == 0:  # as the block manager counts prompt tokens saved
                seq.num_cached_tokens = seq.num_computed_tokens
            self.block_manager.commit(seq)
        return loaded

    def computed(self, seq: Seq) -> None:
        """Queue ``seq``'s full prompt blocks computed so far that are not known on disk."""
        bs = self.block_size
        full = seq.num_prompt_tokens // bs
        if full < self.min_blocks:
            return
        end = min(full, seq.num_computed_tokens // bs)
        state = self._seqs.get(seq)
        if end <= (state.queued if state is not None else 0):
            return
        keys = self._keys(seq, end)
        state = self._seqs[seq]
        for i in range(state.queued, end):
            if not self.store.known(keys[i]):
                ids = seq.prompt_ids[i * bs : (i + 1) * bs]
                self.store.save(keys[i], ids, self.cache.block_data(seq.block_table[i]))
        state.queued = end
