"""Native CPU kernels, compiled on first use: :func:`paged_attention` (decode rows) and
:func:`paged_prefill` (prefill chunks) in ``csrc/paged_attention.c``, :func:`panel_linear`
(``csrc/linear.c``), the fused decoder's layers (``csrc/decode.c``) and :func:`kv_quantize`, the
quantized KV cache's writer (``csrc/kv_quant.c``).

Contract:

* :func:`native_kernels` builds the C source with the system's C compiler (``$CC``, else ``cc``)
  at ``-O3 -march=native -fopenmp`` into ``$MINICPM_CACHE/kernels/`` (default ``~/.cache/minicpm``),
  keyed by the source, the compiler's version and this CPU's flags, so a second start loads it in
  milliseconds. One process builds at a time (``fcntl.flock`` on ``kernels/.build.lock``; the others
  wait, then load its library), in a directory of its own that the next build removes should this
  one be killed, and renames the library into place, so no process loads half a library. Where there
  is no compiler, the build fails, the library speaks another interface, or ``MINICPM_CPU_KERNELS=off``,
  it returns None (after one warning for a failure, its reason in :data:`build_failure`) and callers
  use their torch path; a full disk or quota under the kernel cache is an ``OSError`` naming it (the
  user's to fix, not a slower run).
* The interface is ``csrc/minicpm.h``: at load the library's ABI version, struct sizes and shared
  constants must match this module's (:data:`ABI_VERSION`, :func:`_structs`, :data:`PANEL`), and
  every function is declared from one table (:data:`_SIGNATURES`). The kernels check every index
  (slots, rows, block ids) and buffer size before any write; a refusal is a ``ValueError`` naming it.
* The library links the OpenMP runtime by soname, so inside a torch process it shares torch's
  (torch's own ``libgomp.so.1`` is already loaded): the kernel's threads are torch's, and
  ``torch.set_num_threads`` governs both.
* :func:`paged_attention` checks every shape, dtype and layout before calling into C: a mismatch
  raises ``ValueError`` naming it, never a crash.
* :func:`advise_huge_pages` asks Linux for transparent huge pages under a large, untouched tensor
  (the KV cache), so that reading scattered blocks costs fewer TLB misses.
"""

from __future__ import annotations

import ctypes
import fcntl
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from torch import Tensor

from ..fileio import DISK_FULL, is_disk_full, writing
from ..quant import CHUNK, QuantizedLinear

log = logging.getLogger("minicpm.engine")

CSRC = Path(__file__).with_name("csrc")
# per source, the floating-point flags beyond -O3 (never -ffast-math: no flush-to-zero start-up
# code and no finite-math assumptions, so the process's floating-point state is left alone)
SOURCES = {
    # attention: reassociation, so a vector's lanes are summed as a tree
    "paged_attention.c": ["-fno-math-errno", "-fno-trapping-math", "-fno-signed-zeros", "-fassociative-math"],
    # linear: no reassociation, so each output's sum runs in one order whatever the row count
    "linear.c": [],
    # the fused decode layers: no contraction either, so products and sums round as torch's operators
    "decode.c": ["-ffp-contract=off"],
    # the KV cache's writer: likewise, so its codes are the reference quantizer's bit for bit
    "kv_quant.c": ["-ffp-contract=off"],
    # the interface's identity: version, struct sizes, shared constants
    "abi.c": [],
}
_COMMON_FLAGS = ["-O3", "-march=native", "-fopenmp", "-fPIC", "-std=gnu11", "-Wall", "-Wno-psabi", "-ffp-contract=fast"]
_DTYPES = {torch.float32: 0, torch.bfloat16: 1}
_REFUSALS = {  # csrc/minicpm.h's refusal codes
    -1: "more than 64 query heads per kv head",
    -2: "a dtype the kernel was not built for",
    -3: "out of memory for the kernel's scratch",
    -4: "a row_seq entry is not a row of block_tables",
    -5: "a row_len entry is below 1 or beyond the table width times block_size",
    -6: "a block id outside the cache",
    -7: "a head_dim the kernel does not serve (prefill: a multiple of 64; fused decode: even, at most 512)",
    -8: "a slot outside the cache",
    -9: "a work or scratch buffer smaller than the kernel needs",
    -10: "a layer's linear with no parts, too many, or columns outside its output",
    -11: "a size below 1, or a cache layer smaller than its blocks",
    -12: "a KV cache kind not known, its scales missing, or a head_dim not a multiple of 32",
}

ABI_VERSION = 7  # csrc/minicpm.h's MINICPM_ABI_VERSION: a library built from another is refused

_V, _I, _I64, _F = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_float
# Every exported function of csrc/minicpm.h: name -> (result type, ((argument, type), ...)), applied
# once at load. Pointers are c_void_p (callers pass data_ptr()); the names say what each points to.
# fmt: off
_SIGNATURES: dict[str, tuple[type | None, tuple[tuple[str, type], ...]]] = {
    "minicpm_abi_version": (_I, ()),
    "minicpm_struct_size": (_I64, (("which", _I),)),
    "minicpm_constant": (_I, (("which", _I),)),
    "minicpm_linear": (
        None,
        (
            ("wtype", _I), ("xtype", _I), ("x", _V), ("x_stride", _I64), ("packed", _V), ("scales_f32", _V),
            ("mins_f32", _V), ("group", _I), ("m", _I), ("n", _I), ("k", _I), ("y", _V), ("y_stride", _I64),
            ("scratch_f32", _V), ("prefill", _I),
        ),
    ),
    "minicpm_pack_int4_panels": (
        None,
        (
            ("q_u8", _V), ("scales", _V), ("mins", _V), ("n", _I), ("k", _I), ("group", _I), ("wtype", _I),
            ("out_u8", _V),
        ),
    ),
    "minicpm_gguf_decode": (
        _I,
        (("kind", _I), ("blocks_u8", _V), ("count", _I64), ("codes", _V), ("scales_f32", _V), ("mins_f32", _V)),
    ),
    "minicpm_paged_attention": (
        _I,
        (
            ("dtype", _I), ("q", _V), ("q_stride", _I64), ("k_cache", _V), ("v_cache", _V), ("kvkind", _I),
            ("k_scale_f16", _V), ("v_scale_f16", _V), ("num_blocks", _I64),
            ("tables_i32", _V), ("seqs", _I), ("width", _I), ("row_seq_i32", _V), ("row_len_i32", _V),
            ("rows", _I), ("heads", _I), ("kv_heads", _I), ("head_dim", _I), ("block_size", _I), ("scale", _F),
            ("out", _V),
        ),
    ),
    "minicpm_paged_prefill_available": (_I, (("dtype", _I),)),
    "minicpm_paged_prefill": (
        _I,
        (
            ("dtype", _I), ("q", _V), ("q_stride", _I64), ("k_cache", _V), ("v_cache", _V), ("kvkind", _I),
            ("k_scale_f16", _V), ("v_scale_f16", _V), ("num_blocks", _I64), ("table_i32", _V), ("width", _I),
            ("past", _I), ("m", _I), ("heads", _I), ("kv_heads", _I), ("head_dim", _I), ("block_size", _I),
            ("scale", _F), ("out", _V),
        ),
    ),
    "minicpm_kv_quantize": (
        _I,
        (
            ("xtype", _I), ("kvkind", _I), ("value", _I), ("x", _V), ("x_stride", _I64), ("rows", _I), ("kv_heads", _I),
            ("head_dim", _I), ("slots_i64", _V), ("num_slots", _I64), ("codes", _V), ("scales_f16", _V),
        ),
    ),
    "minicpm_check_rows": (
        _I,
        (
            ("num_blocks", _I64), ("tables_i32", _V), ("seqs", _I), ("width", _I), ("row_seq_i32", _V),
            ("row_len_i32", _V), ("rows", _I), ("block_size", _I),
        ),
    ),
    "minicpm_decode_buffer_bytes": (
        None,
        (
            ("xtype", _I), ("m", _I), ("hidden", _I), ("heads", _I), ("kv_heads", _I), ("head_dim", _I),
            ("inter", _I), ("sizes_i64x2", _V),
        ),
    ),
    "minicpm_decode_layers": (
        _I,
        (
            ("xtype", _I), ("m", _I), ("n_layers", _I), ("layers", _V), ("h", _V), ("cos_f32", _V),
            ("sin_signed_f32", _V), ("slots_i64", _V), ("k_cache", _V), ("v_cache", _V), ("layer_bytes", _I64),
            ("kvkind", _I), ("k_scale_f16", _V), ("v_scale_f16", _V), ("k_scale_layer_stride", _I64),
            ("v_scale_layer_stride", _I64),
            ("rotate", _I), ("num_blocks", _I64), ("tables_i32", _V), ("seqs", _I), ("width", _I),
            ("row_seq_i32", _V), ("row_len_i32", _V), ("block_size", _I), ("hidden", _I), ("heads", _I),
            ("kv_heads", _I), ("head_dim", _I), ("inter", _I), ("eps", _F), ("residual_scale", _F), ("attn_scale", _F),
            ("work", _V), ("work_bytes", _I64), ("scratch_f32", _V), ("scratch_bytes", _I64),
        ),
    ),
}
# fmt: on


def _cache_dir() -> Path:
    return Path(os.environ.get("MINICPM_CACHE") or Path.home() / ".cache" / "minicpm") / "kernels"


def _cpu_signature() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            lines = [line for line in f if line.startswith(("flags", "model name"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return platform.processor() or platform.machine()


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CC") or "cc") or shutil.which("gcc")


_HEADERS = ("minicpm.h", "numeric.h")
_BUILD_PREFIX = ".build-"  # a build's own directory in the kernel cache, removed when it ends


def _build(csrc: Path = CSRC) -> Path:
    """Compile :data:`SOURCES` (from ``csrc``) into one library in the kernel cache (or find it
    there); raises on any failure. One process compiles at a time (a lock file in the cache): a
    second one waits, then loads what the first built; a build directory left by a killed build is
    removed by the next one."""
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (set CC, or install gcc)")
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    parts = [cc, version, " ".join(_COMMON_FLAGS), _cpu_signature(), *((csrc / h).read_text() for h in _HEADERS)]
    for name, flags in SOURCES.items():
        parts += [name, " ".join(flags), (csrc / name).read_text()]
    key = hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]
    target = _cache_dir() / f"minicpm-cpu-{key}.so"
    if target.exists():
        return target
    with writing(target.parent):  # a full disk names the kernel cache
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(target.parent / ".build.lock", "a+b") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or its process dies
            if target.exists():  # built by the process we waited for
                return target
            for stale in target.parent.glob(f"{_BUILD_PREFIX}*"):  # its builder died holding the lock
                shutil.rmtree(stale)
            tmp = Path(tempfile.mkdtemp(prefix=_BUILD_PREFIX, dir=target.parent))
            try:
                objects = []
                for name, flags in SOURCES.items():
                    obj = str(tmp / f"{Path(name).stem}.o")
                    _run([cc, *_COMMON_FLAGS, *flags, "-c", str(csrc / name), "-o", obj], cc, name, target.parent)
                    objects.append(obj)
                library = str(tmp / "lib.so")
                _run([cc, "-shared", "-fopenmp", *objects, "-o", library, "-lm"], cc, "the link", target.parent)
                os.replace(library, target)  # whole or not at all, for a process loading without the lock
            finally:  # (what this leaves, the next build removes)
                shutil.rmtree(tmp, ignore_errors=True)
    return target


def _run(cmd: list[str], cc: str, what: str, out_dir: Path) -> None:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        for code in DISK_FULL:  # the compiler could not write its output: the user's problem, not a build failure
            if os.strerror(code) in done.stderr:
                raise OSError(code, os.strerror(code), str(out_dir))
        raise RuntimeError(f"{cc} failed on {what}:\n{done.stderr.strip()[-2000:]}")


class NativeKernels(ctypes.CDLL):
    """The loaded library, its functions declared from :data:`_SIGNATURES`, with what it said at
    load: ``max_parts`` (weights stacked in one fused linear), ``max_head_dim`` (the fused
    decoder's), and the ctypes structs ``Linear`` and ``Layer`` of csrc/minicpm.h, of the sizes
    the library measured."""

    max_parts: int
    max_head_dim: int
    Linear: type[ctypes.Structure]
    Layer: type[ctypes.Structure]


def _structs(max_parts: int) -> tuple[type[ctypes.Structure], type[ctypes.Structure]]:
    """csrc/minicpm.h's ``minicpm_linear_t`` and ``minicpm_layer_t`` for ``max_parts`` parts."""
    ints, pointers = ctypes.c_int * max_parts, ctypes.c_void_p * max_parts

    class Linear(ctypes.Structure):
        _fields_ = [
            ("parts", ctypes.c_int),
            ("wtype", ints),
            ("group", ints),
            ("n", ints),
            ("offset", ints),
            ("packed", pointers),
            ("scales", pointers),
            ("mins", pointers),
        ]

    class Layer(ctypes.Structure):
        _fields_ = [
            ("norm1", ctypes.c_void_p),
            ("norm2", ctypes.c_void_p),
            ("qkv", Linear),
            ("o", Linear),
            ("gate_up", Linear),
            ("down", Linear),
        ]

    return Linear, Layer


class ABIMismatchError(RuntimeError):
    """A kernel library that does not speak this module's interface (csrc/minicpm.h)."""


def _load(path: Path) -> NativeKernels:
    """``path`` loaded, its functions declared and its interface checked; :class:`ABIMismatchError`
    naming what differs."""
    lib = NativeKernels(str(path))
    for name, (restype, args) in _SIGNATURES.items():
        try:
            fn = getattr(lib, name)
        except AttributeError:
            raise ABIMismatchError(f"{path} has no {name}") from None
        fn.restype = restype
        fn.argtypes = [kind for _, kind in args]
    version = lib.minicpm_abi_version()
    if version != ABI_VERSION:
        raise ABIMismatchError(f"{path} has ABI version {version}, this module speaks {ABI_VERSION}")
    panel, lib.max_parts, lib.max_head_dim = (lib.minicpm_constant(i) for i in range(3))
    if panel != PANEL or lib.max_parts < 1 or lib.max_head_dim < 2:
        raise ABIMismatchError(f"{path} has panels of {panel} columns (here {PANEL}), {lib.max_parts} parts at most")
    lib.Linear, lib.Layer = _structs(lib.max_parts)
    for which, struct in enumerate((lib.Linear, lib.Layer)):
        size = lib.minicpm_struct_size(which)
        if size != ctypes.sizeof(struct):
            raise ABIMismatchError(f"{path}'s {struct.__name__} is {size} bytes, here {ctypes.sizeof(struct)}")
    return lib


@functools.cache
def native_kernels() -> NativeKernels | None:
    """The compiled kernel library, or None where it is switched off or cannot be built here (no
    compiler, a failed build, an unloadable library or one of another interface: one warning, and
    :data:`build_failure` says why)."""
    global build_failure
    if os.environ.get("MINICPM_CPU_KERNELS", "on").lower() in ("off", "0", "false", "no"):
        return None
    try:
        return _load(_build())
    except OSError as exc:
        if is_disk_full(exc):  # the user's to fix (and say), not a reason to run slower
            raise
        build_failure = str(exc)
    except (RuntimeError, subprocess.SubprocessError) as exc:  # no compiler, a failed build, another ABI
        build_failure = str(exc)
    log.warning("native CPU kernels unavailable, using torch's: %s", build_failure)
    return None


build_failure: str | None = None  # why the last native_kernels() returned None though switched on


def kernels_from(csrc: Path) -> NativeKernels:
    """The kernel library built from another tree's C sources (``csrc``: a benchmark's peer
    revision's ``minicpm/engine/csrc``), with this module's flags and file list, cached and loaded
    like :func:`native_kernels`'s so both can run in one process. Raises instead of falling back:
    :class:`FileNotFoundError` naming a source file the tree lacks, :class:`ABIMismatchError` for
    a library of another interface, :class:`RuntimeError` for a failed build."""
    missing = [name for name in (*_HEADERS, *SOURCES) if not (csrc / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{csrc} lacks {', '.join(missing)}: not a kernel tree this module can build")
    return _load(_build(csrc))


PANEL = 32  # output columns per packed panel: csrc/minicpm.h's MINICPM_PANEL, checked at load


def _panel_rows(t: Tensor) -> Tensor:
    """``t`` (out, ...) zero-padded to whole panels of 32 output rows."""
    panels = -(-t.shape[0] // PANEL)
    padded = t.new_zeros(panels * PANEL, *t.shape[1:])
    padded[: t.shape[0]] = t
    return padded


def _streamed(*shape: int, dtype: torch.dtype) -> Tensor:
    """An empty tensor for weights that every decode step streams through, on transparent huge
    pages where Linux gives them (:func:`advise_huge_pages`): 4 KiB pages cost the int4 panels a
    TLB miss every 6 records, 1.1-1.4x their speed on the AMD EPYC (docs/kernels.md)."""
    t = torch.empty(*shape, dtype=dtype)
    advise_huge_pages(t)
    return t


def _panels(t: Tensor) -> Tensor:
    """(out, cols) -> (panels, cols, 32): each panel's 32 output rows side by side, zero-padded;
    written a megabyte or so at a time (no padded copy of ``t`` beside the result: for the
    head that would be a third copy of a large table while the model's own is still there)."""
    n, cols = t.shape
    full, panels = n // PANEL, -(-n // PANEL)
    out = _streamed(panels, cols, PANEL, dtype=t.dtype)
    step = max(1, CHUNK // (PANEL * max(cols, 1)))
    for a in range(0, full, step):
        b = min(full, a + step)
        out[a:b] = t[a * PANEL : b * PANEL].reshape(b - a, PANEL, cols).transpose(1, 2)
    if full < panels:
        out[full:] = _panels_of_rows(_panel_rows(t[full * PANEL :]))
    return out


def pack_panels(weight: Tensor) -> Tensor:
    """``weight`` (out, in), float32 or bfloat16, in :func:`panel_linear`'s layout: panels of 32
    output columns, each (in, 32), zero-padded to a whole panel."""
    if weight.dim() != 2 or weight.dtype not in _DTYPES or weight.device.type != "cpu":
        raise ValueError("pack_panels: weight must be a CPU float32 or bfloat16 (out, in) tensor")
    return _panels(weight.detach())


def quantized_panels(q: QuantizedLinear) -> tuple[Tensor, Tensor, Tensor | None]:
    """A :class:`~minicpm.quant.QuantizedLinear`'s weight in :func:`panel_linear`'s layout:
    ``(packed, scales, mins)``. int8: codes in :func:`pack_panels`' layout (int8, zero-padded),
    float32 scales and mins (panel, in / group, 32), padded with scale 1 and min 0; an int8 weight
    with one scale per output row and no minimums gets its scales flat (panels * 32). int4: one
    uint8 record per (panel, group), (panel, in / group, record bytes): the group's codes in
    csrc/linear.c's chunks, then its 32 scales and 32 minimums (zero where there are none),
    float16 where every scale and minimum is a float16 value (as :func:`~minicpm.quant.quantize`
    makes them), float32 otherwise; ``scales`` and ``mins`` are (panel, in / group, 32) views of
    them. Where every minimum is -8 x its float16 scale (GGUF's Q4_0) no minimums are stored and
    ``mins`` is None: see :func:`int4_panel_rows`."""
    scales = _panel_rows(q.scales)
    scales[q.out_features :] = 1
    mins = None if q.mins is None else _panels(q.mins)
    if q.fmt == "int8":
        if q.group == q.in_features and mins is None:
            return _panels(q.qweight), scales.view(-1), None
        return _panels(q.qweight), _panels_of_rows(scales), mins
    n, k, group = q.out_features, q.in_features, q.group
    scales = _panels_of_rows(scales)
    if mins is None:
        mins = torch.zeros_like(scales)
    half = _half_exact(scales) and _half_exact(mins)
    wtype = (6 if q.mins is not None and torch.equal(q.mins, -8 * q.scales) else 5) if half else 3
    dtype = torch.float16 if half else torch.float32
    codes_bytes, sb = group * PANEL // 2, PANEL * dtype.itemsize
    packed = _streamed(scales.shape[0], k // group, codes_bytes + sb * (1 if wtype == 6 else 2), dtype=torch.uint8)
    lib = native_kernels()
    if lib is None:
        raise RuntimeError("native CPU kernels are not available")
    scales, mins = scales.to(dtype), mins.to(dtype)
    lib.minicpm_pack_int4_panels(
        q.qweight.contiguous().data_ptr(), scales.data_ptr(), mins.data_ptr(), n, k, group, wtype, packed.data_ptr()
    )
    stored = packed[..., codes_bytes : codes_bytes + sb].view(dtype)
    return packed, stored, None if wtype == 6 else packed[..., codes_bytes + sb :].view(dtype)


def _half_exact(t: Tensor) -> bool:
    """Whether every value of float32 ``t`` is a float16 value (finite)."""
    h = t.to(torch.float16)
    return bool(torch.isfinite(h).all()) and torch.equal(h.to(t.dtype), t)


def int4_panel_rows(
    packed: Tensor, scales: Tensor, mins: Tensor | None, panel: Tensor, col: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Column ``col`` of panel ``panel`` (one pair per row) of int4 records
    (:func:`quantized_panels`) as :func:`~minicpm.quant.dequantize_rows` takes them: codes (rows,
    in), uint8 0..15, read back from the C packing's placement, and float32 scales and minimums
    (rows, in / group); no stored minimums (Q4_0's records) means -8 x the scale."""
    _, group = panel_format(packed, scales, mins)
    chunks = packed[panel, :, : group * PANEL // 2].reshape(len(panel), -1, PANEL, 2)  # (rows, k / 4, word, byte)
    words = 2 * (col % 16)[:, None] + torch.arange(2)  # inputs j and j + 1 (j + 2 and j + 3: the second byte)
    got = chunks.gather(2, words[:, None, :, None].expand(-1, chunks.shape[1], -1, 2))
    codes = (got >> (4 * (col // 16)).to(torch.uint8)[:, None, None, None]) & 15  # columns 16-31: the high nibbles
    s = scales[panel, :, col].float()
    return codes.transpose(2, 3).reshape(len(panel), -1), s, -8 * s if mins is None else mins[panel, :, col].float()


def _panels_of_rows(padded: Tensor) -> Tensor:
    """(panels * 32, cols), already padded, -> (panels, cols, 32)."""
    return padded.view(-1, PANEL, padded.shape[1]).transpose(1, 2).contiguous()


def panel_linear(
    x: Tensor,
    packed: Tensor,
    out_features: int,
    lib: ctypes.CDLL,
    scales: Tensor | None = None,
    mins: Tensor | None = None,
    prefill: bool = False,
) -> Tensor:
    """``x @ W.T`` for ``x`` (..., in) over ``packed`` (:func:`pack_panels`, or a quantized weight's
    :func:`quantized_panels` with its ``scales`` and ``mins``); float32 accumulation in a fixed
    order, so a row's result does not depend on the other rows. ``prefill`` (rows none of which is
    a decode row): quantized and bfloat16 panels are widened to float32 weights first, faster for
    many rows; a row's result then depends on how many rows there are (whether widening pays).
    bfloat16 inputs go instead, where the CPU has it (AVX512-BF16), through its bfloat16
    dot-product instruction: exact products summed in float32 a pair of inputs at a time, twice
    as fast, and not bitwise the decode rows' sums. For that, bfloat16 and int8 per-channel
    panels are taken exactly (codes scaled after), and grouped quantized panels (int4, int8 in
    groups) as their dequantized weights rounded to bfloat16, as torch's bfloat16 matmul takes a
    dequantized weight (within 2^-9 of each weight). bfloat16 decode rows on int4 panels take
    that instruction too, exactly (the codes are exact in bfloat16; each group's sum then scaled
    as the float tiles do)."""
    k = panel_in_features(packed, scales, mins)
    if x.dtype not in _DTYPES or x.shape[-1] != k or x.device.type != "cpu":
        raise ValueError(
            f"panel_linear: x must be CPU float32 or bfloat16 with {k} features, got {x.dtype} {tuple(x.shape)}"
        )
    rows = x.reshape(-1, k)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    m = rows.shape[0]
    y = torch.empty(m, out_features, dtype=x.dtype)
    scratch = torch.empty(m * k if x.dtype == torch.bfloat16 else 0, dtype=torch.float32)
    quantized = packed.dtype in (torch.int8, torch.uint8)
    if quantized != (scales is not None) or (mins is not None and not grouped_layout(scales)):
        raise ValueError(
            "panel_linear: quantized panels take their scales (and grouped ones their mins), float ones none"
        )
    wtype, group = panel_format(packed, scales, mins)
    lib.minicpm_linear(
        wtype,
        _DTYPES[x.dtype],
        rows.data_ptr(),
        rows.stride(0),
        packed.data_ptr(),
        None if scales is None else scales.data_ptr(),
        None if mins is None else mins.data_ptr(),
        group,
        m,
        out_features,
        k,
        y.data_ptr(),
        y.stride(0),
        scratch.data_ptr(),
        int(prefill),
    )
    return y.view(*x.shape[:-1], out_features)


def grouped_layout(scales: Tensor) -> bool:
    return scales.dim() == 3


def panel_format(packed: Tensor, scales: Tensor | None, mins: Tensor | None) -> tuple[int, int]:
    """The kernel's weight type code and group size for panels ``packed`` with ``scales`` and
    ``mins``: 0 float32, 1 bfloat16, 2 int8 per output column, 3 int4 records with float32 scales
    and minimums, 4 int8 in groups, 5 int4 records with float16 scales and minimums, 6 int4
    records with float16 scales and no minimums (-8 x the scale)."""
    if packed.dtype == torch.uint8:
        sb = PANEL * scales.dtype.itemsize
        wtype = 3 if sb == 4 * PANEL else 5 if mins is not None else 6
        return wtype, (packed.shape[2] - sb * (1 if wtype == 6 else 2)) * 2 // PANEL
    if packed.dtype == torch.int8:
        return (4, packed.shape[1] // scales.shape[1]) if grouped_layout(scales) else (2, 0)
    return _DTYPES[packed.dtype], 0


def panel_in_features(packed: Tensor, scales: Tensor | None, mins: Tensor | None) -> int:
    """The input size of panels ``packed`` (with their ``scales`` and ``mins``)."""
    if packed.dtype == torch.uint8:
        return packed.shape[1] * panel_format(packed, scales, mins)[1]
    return packed.shape[1]


_MADV_HUGEPAGE = 14  # Linux


@functools.cache
def _openmp_runtime() -> ctypes.CDLL | None:
    """The GNU OpenMP runtime this process has loaded (torch's, which the kernels share), or None
    (another runtime, or none: nothing to release)."""
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if "libgomp" in line and "/" in line}
    except OSError:
        return None
    for path in sorted(paths):
        lib = ctypes.CDLL(path)  # loaded already: the same handle
        if hasattr(lib, "omp_pause_resource_all"):
            lib.omp_pause_resource_all.argtypes = [ctypes.c_int]
            lib.omp_pause_resource_all.restype = ctypes.c_int
            return lib
    return None


def release_openmp_threads() -> bool:
    """Free the calling thread's OpenMP worker threads (``omp_pause_resource_all``; the next
    parallel region of this thread makes new ones). libgomp keeps a pool of workers per thread that
    starts parallel regions, and once more workers exist than CPUs, every pool's workers stop
    spinning between regions and sleep: each region of the engine's thread then pays a wake-up,
    which halves the speed of small decode kernels. A thread that loaded a model and hands the
    engine to another thread calls this, so that the engine's thread is the one with workers.
    False where there is nothing to release (not libgomp, or inside a parallel region)."""
    lib = _openmp_runtime()
    return lib is not None and lib.omp_pause_resource_all(1) == 0  # omp_pause_soft


_HUGE_PAGE = 2 * 1024 * 1024


def advise_huge_pages(t: Tensor) -> bool:
    """Ask Linux to back the 2 MiB-aligned interior of CPU tensor ``t`` with transparent huge pages
    (``madvise(MADV_HUGEPAGE)``); call it before the memory is first touched. Decode attention
    streams a sequence's scattered blocks, and 4 KiB pages cost it a TLB miss every page (see
    docs/engine.md). Returns False
    where nothing was advised (not Linux, too small, refused); memory use then follows 4 KiB pages
    as before."""
    if not sys.platform.startswith("linux") or t.device.type != "cpu":
        return False
    start = t.data_ptr()
    lo, hi = -(-start // _HUGE_PAGE) * _HUGE_PAGE, (start + t.nbytes) // _HUGE_PAGE * _HUGE_PAGE
    if hi <= lo:
        return False
    try:
        madvise = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return False
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    madvise.restype = ctypes.c_int
    return madvise(lo, hi - lo, _MADV_HUGEPAGE) == 0


def refusal(code: int) -> str:
    """What a nonzero code of the attention kernel (or a call that runs it) means."""
    return _REFUSALS.get(code, f"the kernel refused its arguments (code {code})")


def _require(name: str, checks: dict[str, bool]) -> None:
    """A ``ValueError`` naming ``name`` and the first of ``checks`` (message: holds) that fails."""
    for message, ok in checks.items():
        if not ok:
            raise ValueError(f"{name}: {message}")


KV_KINDS = {torch.int8: 1, torch.uint8: 2}  # csrc/minicpm.h's MINICPM_KV_INT8 / INT4, by the codes' dtype


def _kv_widths(kind: int, head_dim: int, value: bool = False) -> tuple[int, int]:
    """(codes, float16 scales) per (slot, kv head) row of keys, or of values (``value``), of a
    quantized cache of ``kind``: kv_format's widths (csrc/numeric.h's kv_width / kv_scales)."""
    from .attention.kv_format import FORMATS  # here: the attention package imports this module

    fmt = FORMATS["int4" if kind == 2 else "int8"]
    return fmt.code_width(head_dim), fmt.scale_width(head_dim, value)


def _kv_args(
    name: str, q: Tensor, k_cache: Tensor, v_cache: Tensor, k_scale: Tensor | None, v_scale: Tensor | None
) -> tuple:
    """(kvkind, k_scale pointer, v_scale pointer) for a layer of the cache, every layout checked: the
    activation dtype's values, or codes (int8: int8; int4: uint8, two to a byte) with float16 scales."""
    head_dim, kv_heads = q.shape[2], k_cache.shape[1]
    kind = KV_KINDS.get(k_cache.dtype, 0)
    width, scales = _kv_widths(kind, head_dim)
    value_scales = _kv_widths(kind, head_dim, value=True)[1]
    checks = {
        "k_cache/v_cache must be contiguous (slots, kv_heads, head_dim) in q's dtype, or int8 / int4 codes": all(
            c.is_contiguous() and c.dim() == 3 and c.shape[2] == width and c.dtype == k_cache.dtype
            for c in (k_cache, v_cache)
        )
        and (kind != 0 or k_cache.dtype == q.dtype),
    }
    if kind:
        checks["a quantized cache needs float16 scales (slots, kv_heads, head_dim / group [x 2]) beside it"] = (
            all(
                s is not None
                and s.dtype == torch.float16
                and s.is_contiguous()
                and s.shape == (k_cache.shape[0], kv_heads, n)
                for s, n in ((k_scale, scales), (v_scale, value_scales))
            )
            and head_dim % 32 == 0
        )
    _require(name, checks)
    return (kind, k_scale.data_ptr(), v_scale.data_ptr()) if kind else (0, None, None)


def paged_attention(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    block_tables: Tensor,
    row_seq: Tensor,
    row_len: Tensor,
    block_size: int,
    scale: float,
    lib: ctypes.CDLL | None = None,
    k_scale: Tensor | None = None,
    v_scale: Tensor | None = None,
) -> Tensor:
    """Softmax attention of each query row over a prefix of its sequence's paged keys, in place.

    ``q`` (rows, heads, head_dim), head-contiguous; ``k_cache``/``v_cache`` (slots, kv_heads,
    head_dim) contiguous, one layer, in ``q``'s dtype, or quantized codes (int8, or uint8 for int4)
    with ``k_scale``/``v_scale`` float16 beside them (:mod:`~minicpm.engine.attention.kv_format`),
    dequantized in registers; ``block_tables`` (seqs, width) int32; row ``r`` attends to the first
    ``row_len[r]`` (>= 1) keys of sequence ``row_seq[r]`` (int32 both). Returns (rows, heads,
    head_dim) in ``q``'s dtype. Indices are checked in C before any read: a row length beyond its
    table or a block id outside the cache is a ``ValueError``.
    """
    lib = lib or native_kernels()
    if lib is None:
        raise RuntimeError("native CPU kernels are not available")
    rows, heads, head_dim = q.shape
    kv_heads = k_cache.shape[1]
    checks = {
        "q must be a CPU float32 or bfloat16 tensor": q.device.type == "cpu" and q.dtype in _DTYPES,
        "q's heads and head_dim must be contiguous": q.stride(2) == 1 and q.stride(1) == head_dim,
        "heads must be a multiple of kv_heads": kv_heads > 0 and heads % kv_heads == 0,
        "block_tables, row_seq and row_len must be contiguous int32": all(
            t.dtype == torch.int32 and t.is_contiguous() for t in (block_tables, row_seq, row_len)
        ),
        "row_seq and row_len need one entry per row": row_seq.numel() == rows and row_len.numel() == rows,
    }
    _require("paged_attention", checks)
    kv = _kv_args("paged_attention", q, k_cache, v_cache, k_scale, v_scale)
    out = torch.empty(rows, heads, head_dim, dtype=q.dtype)
    code = lib.minicpm_paged_attention(
        _DTYPES[q.dtype],
        q.data_ptr(),
        q.stride(0),
        k_cache.data_ptr(),
        v_cache.data_ptr(),
        *kv,
        k_cache.shape[0] // block_size,
        block_tables.data_ptr(),
        block_tables.shape[0],
        block_tables.shape[1],
        row_seq.data_ptr(),
        row_len.data_ptr(),
        rows,
        heads,
        kv_heads,
        head_dim,
        block_size,
        scale,
        out.data_ptr(),
    )
    if code != 0:
        raise ValueError(f"paged_attention: {refusal(code)}")
    return out


def kv_quantize(
    x: Tensor, codes: Tensor, scales: Tensor, slots: Tensor, lib: ctypes.CDLL | None = None, value: bool = False
) -> None:
    """``x`` (tokens, kv_heads, head_dim), keys or values (``value``: their groups), float32 or
    bfloat16 with head-contiguous rows, quantized into one cache layer's ``codes`` (slots, kv_heads,
    code width: int8, or uint8 for int4) and float16 ``scales`` at ``slots`` (int64, one per token),
    as :meth:`~minicpm.engine.attention.kv_format.KVFormat.quantize` does, bit for bit. A slot
    outside the layer is a ``ValueError``, with nothing written."""
    lib = lib or native_kernels()
    if lib is None:
        raise RuntimeError("native CPU kernels are not available")
    tokens, kv_heads, head_dim = x.shape
    kind = KV_KINDS.get(codes.dtype, 0)
    width, per_row = _kv_widths(kind, head_dim, value)
    checks = {
        "x must be a CPU float32 or bfloat16 tensor": x.device.type == "cpu" and x.dtype in _DTYPES,
        "x's heads and head_dim must be contiguous": x.stride(2) == 1 and x.stride(1) == head_dim,
        "codes must be contiguous int8 / int4 codes (slots, kv_heads, code width)": kind != 0
        and codes.is_contiguous()
        and codes.shape[1:] == (kv_heads, width),
        "scales must be contiguous float16 (slots, kv_heads, head_dim / group [x 2])": scales.dtype == torch.float16
        and scales.is_contiguous()
        and scales.shape == (codes.shape[0], kv_heads, per_row),
        "slots must be contiguous int64, one per token": slots.dtype == torch.int64
        and slots.is_contiguous()
        and slots.numel() == tokens,
    }
    _require("kv_quantize", checks)
    code = lib.minicpm_kv_quantize(
        _DTYPES[x.dtype],
        kind,
        int(value),
        x.data_ptr(),
        x.stride(0),
        tokens,
        kv_heads,
        head_dim,
        slots.data_ptr(),
        codes.shape[0],
        codes.data_ptr(),
        scales.data_ptr(),
    )
    if code != 0:
        raise ValueError(f"kv_quantize: {refusal(code)}")


def prefill_available(lib: ctypes.CDLL | None, dtype: torch.dtype, head_dim: int) -> bool:
    """Whether :func:`paged_prefill` serves ``dtype`` queries of ``head_dim`` with ``lib``: head_dim
    a multiple of 64; float32 on a CPU with AVX-512, bfloat16 on one with AVX512-BF16."""
    if lib is None or dtype not in _DTYPES or head_dim % 64 != 0:
        return False
    return bool(lib.minicpm_paged_prefill_available(_DTYPES[dtype]))


def paged_prefill(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    table: Tensor,
    past: int,
    block_size: int,
    scale: float,
    lib: ctypes.CDLL | None = None,
    k_scale: Tensor | None = None,
    v_scale: Tensor | None = None,
) -> Tensor:
    """Causal attention of one sequence's chunk over its paged cache, in one native call (see
    :func:`prefill_available`). A quantized cache (codes with ``k_scale``/``v_scale``, as
    :func:`paged_attention` takes it) is dequantized as the context is regrouped for the tiles, to
    the values the reference reads (rounded to bfloat16 in a bfloat16 model).

    ``q`` (m, heads, head_dim) float32 or bfloat16, heads contiguous: the rows at positions
    ``past`` .. ``past + m - 1``, row t seeing keys 0 .. ``past + t``, all of them (the chunk's own
    too) already in ``k_cache``/``v_cache`` (slots, kv_heads, head_dim) at the blocks ``table``
    (int32) lists. Scores, softmax and sums in float32; in bfloat16 the products are exact (the
    dot-product instruction) and the probabilities are rounded to bfloat16 before weighing the
    values, as flash attention's bfloat16 kernels do. Returns (m, heads, head_dim) in ``q``'s dtype;
    a block id outside the cache or a chunk beyond its table is a ``ValueError``.
    """
    lib = lib or native_kernels()
    m, heads, head_dim = q.shape
    kv_heads = k_cache.shape[1]
    if not prefill_available(lib, q.dtype, head_dim):
        raise ValueError(f"paged_prefill: not available for {q.dtype} queries of head_dim {head_dim} on this CPU")
    checks = {
        "q must be a CPU tensor with heads and head_dim contiguous": q.device.type == "cpu"
        and q.stride(2) == 1
        and q.stride(1) == head_dim,
        "table must be contiguous int32": table.dtype == torch.int32 and table.is_contiguous() and table.dim() == 1,
    }
    _require("paged_prefill", checks)
    kv = _kv_args("paged_prefill", q, k_cache, v_cache, k_scale, v_scale)
    out = torch.empty(m, heads, head_dim, dtype=q.dtype)
    blocks = k_cache.shape[0] // block_size
    where = (k_cache.data_ptr(), v_cache.data_ptr(), *kv, blocks, table.data_ptr(), table.numel(), past)
    dims = (m, heads, kv_heads, head_dim, block_size)
    code = lib.minicpm_paged_prefill(_DTYPES[q.dtype], q.data_ptr(), q.stride(0), *where, *dims, scale, out.data_ptr())
    if code != 0:
        raise ValueError(f"paged_prefill: {refusal(code)}")
    return out
