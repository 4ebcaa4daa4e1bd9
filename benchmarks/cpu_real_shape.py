"""MiniCPM-2B-128k's real shape on CPU, minicpm beside llama.cpp on the same files (issue 22, item 5).

``--prepare`` writes, under ``--dir`` (default ``~/.cache/minicpm/bench/real-shape``; with
``--layers L`` a sibling ``layers-L`` directory), every file the measurements read, each step
skipped when its output is there and each output written under a temporary name and renamed
into place (so an interrupted run resumes where it stopped):

* ``checkpoint/``: random bfloat16 weights (N(0, 0.02), norms 1, seed 0) with MiniCPM-2B-128k's
  exact config.json (:data:`minicpm.config.MINICPM_2B_128K`: 40 layers, hidden 2304, 36 heads of
  64, MLP 5760, untied head, ``max_length`` 131072, dynamic NTK ``rope_scaling``), as
  ``model.safetensors``; a SentencePiece ``tokenizer.model`` of exactly 122,760 pieces (``<unk>``
  ``<s>`` ``</s>``, 256 byte pieces, made-up words, and the checkpoint's 7 added tokens at their
  real ids 122753-122759, user-defined), ``added_tokens.json``, ``special_tokens_map.json`` and
  ``tokenizer_config.json`` as the published checkpoint has them;
* ``model.bf16.gguf``: llama.cpp's own ``convert_hf_to_gguf.py --outtype bf16`` on it (its log
  beside it: the converter writes no rope scaling for MiniCPM's "dynamic" type, so llama.cpp
  runs this model with plain RoPE past 64k); ``model.Q8_0.gguf`` and ``model.Q4_0.gguf``: its
  ``llama-quantize`` on the bf16 file;
* the minicpm cache entries of the two quantized GGUFs (their first use converts them once);
* a check that llama.cpp's build runs a batched product here. The sdist's build (``-march=native``)
  carries ggml's AMX kernels; on a VM that lists AMX but does not enable its tile state, llama.cpp
  dies (SIGILL / SIGSEGV in ``ggml_backend_amx_mul_mat``) on its first prompt through a quantized
  weight. Then ggml's three libraries are rebuilt from the same tree without AMX into
  ``build-noamx/bin`` (minutes; llama.cpp's x86 repacking stays on) and every llama.cpp process
  loads them first (``LD_LIBRARY_PATH``; ``--llama-lib`` overrides).

Then the measurements (``--only``, comma-separated; default all), each run in a process of its
own (minicpm: this script as a worker, on the engine, ``LLMEngine``, in its main thread; llama.cpp:
its own ``llama-bench`` or ``llama-server``, ``--threads`` threads), the two systems alternating
within each of ``--rounds`` rounds (which goes first flips every round). minicpm's engine follows
the machine's load with its thread count, as it ships; ``--fixed-threads`` turns that off. Peak
(``VmHWM``, the whole process) and resident memory (``VmRSS`` when the timed part ends;
llama-bench: when it starts, its KV cache is allocated up front) of every run:

* ``decode``: batch-1 greedy decode, ``--new-tokens`` after a 16-token prompt; minicpm's rate is
  (N - 1) / (time for N tokens - time for 1), llama-bench's ``tg N`` (N tokens from an empty
  cache). Rows (``--formats``): minicpm bf16 / llama.cpp bf16; minicpm running the Q8_0 GGUF and
  ``--quantize int8`` / Q8_0; minicpm running the Q4_0 GGUF, ``--quantize int4`` and
  ``--quantize int4 --group-size 64`` (Q4_0's bytes a weight) / Q4_0.
* ``decodepaired``: the decode section's rows with both systems loaded at once, measured in
  pairs: minicpm in a worker that holds its model, llama.cpp in ``llama-server`` (its own
  ``predicted_per_second``: N - 1 decode steps over their time), ``--pairs`` pairs of
  ``--new-tokens`` each, which goes first flipping every pair. On a host whose memory bandwidth
  moves with its neighbours' load from one minute to the next (this one: a 2-core VM), the two
  halves of a pair see the same machine; the row's ratio is the median of the pairs' ratios, with
  their range. Needs both models in memory (bf16: ~12 GiB).
* ``prefill2k``, ``prefill32k``: time to the first token of a ``--prefill-short`` /
  ``--prefill-long`` token prompt (random ids), same rows; llama-bench ``-p 64,N -n 0`` (the
  64-token test warms it up). KV caches: bfloat16 (minicpm) / f16 (llama.cpp), same bytes.
* ``decode32k``: decode at ``--depth`` tokens of context per KV format pair (``--kv``, minicpm
  dtype : llama.cpp ``-ctk/-ctv`` type, flash attention on), weights ``--depth-weights`` (both
  systems on the same GGUF, or minicpm's bf16 checkpoint against the bf16 GGUF). minicpm's cache
  is filled by a timing-only fast path (``--minicpm-fill fast``, labelled so in the output):
  the blocks are written with quantized random keys and values and the sequence is marked
  computed up to its last prompt token, so the first step is a real decode step at the full
  context; ``--minicpm-fill real`` prefills instead. llama.cpp runs in ``llama-server`` (llama-bench
  ``-d`` keeps a second copy of the cache in memory, 11 GiB at 32k in f16, which does not fit
  here): a real prefill of the same length (its time is reported), saved with the server's slot
  save (``slots/``), so later rounds and runs restore it from disk instead of prefilling again
  (``--no-slot-reuse`` prefills every time). ``--llama-fill extend`` is llama.cpp's timing-only
  counterpart of minicpm's fast path, for depths whose real prefill would take hours here: where
  no real prefill of ``--depth`` is saved, the deepest saved one of the same files and KV type
  (``d8192``, say) is written out with its cells repeated to the depth and restored
  (``extend_slot``; labelled ``extended`` with the depth it came from).
* ``capacity``: minicpm alone, ``--quantize int4`` and an int4 KV cache on the bf16 checkpoint
  (its dynamic NTK and 131072-token context), a KV budget of exactly one
  ``--capacity-context``-token sequence: the request admitted, its cache filled by the timing-only
  fast path, decode at that context timed, the process's peak against ``--capacity-gib`` (16);
  then real prefills of ``--capacity-prefill`` tokens (default 32k and 64k) in the same format,
  and the time of a ``--capacity-context`` prefill extrapolated from them
  (t = a n + b n^2 through the two points; labelled as extrapolated).

Past 64k (``max_position_embeddings``) llama.cpp runs this model as plain RoPE (the converter
drops the dynamic scaling); every figure at such a context says so.

``--layers L`` keeps the width and vocabulary and cuts the depth (validation; its own files).
Every finished run is appended to ``runs.jsonl`` in the directory; ``--resume`` reuses the runs
recorded there for the same case and round instead of running them again. Prints a table
(median [min, max] per cell; ratio = minicpm / llama.cpp: above 1 is faster for tokens/s,
below 1 is faster for seconds), then one JSON object as the last line.

    python benchmarks/cpu_real_shape.py --prepare
    python benchmarks/cpu_real_shape.py --only decode --rounds 3
    python benchmarks/cpu_real_shape.py --layers 2 --rounds 1 --prefill-long 4096 --depth 4096 \\
        --capacity-context 8192 --capacity-prefill 1024,2048          # validation, minutes
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROJECT = HERE.parent
LLAMA_CPP = Path.home() / ".cache" / "peers" / "llama_cpp_python-0.3.36" / "vendor" / "llama.cpp"
SECTIONS = ("decode", "decodepaired", "prefill2k", "prefill32k", "decode32k", "capacity")
MARK = "RESULT "
GIB = 2**30
BLOCK = 128  # minicpm's CPU block size (tokens); KV budgets are whole blocks
PROMPT = 16  # tokens before decoding, decode section
VOCAB_WORDS = 122753  # SentencePiece pieces before the added tokens
ADDED_TOKENS = {  # the published checkpoint's added_tokens.json
    "<|im_end|>": 122753,
    "\u2581<PRE>": 122754,
    "\u2581<MID>": 122755,
    "<|tool_call|>": 122756,
    "<|im_start|>": 122757,
    "\u2581<EOT>": 122758,
    "\u2581<SUF>": 122759,
}
# row -> (minicpm's weights: the checkpoint or a GGUF, its --quantize and --group-size, llama.cpp's GGUF)
FORMATS = {
    "bf16": ("checkpoint", "none", None, "bf16"),
    "q8_0": ("Q8_0", "auto", None, "Q8_0"),
    "int8": ("checkpoint", "int8", None, "Q8_0"),
    "q4_0": ("Q4_0", "auto", None, "Q4_0"),
    "int4": ("checkpoint", "int4", None, "Q4_0"),
    "int4g64": ("checkpoint", "int4", 64, "Q4_0"),
}
FORMAT_LABELS = {
    "bf16": "bf16 / bf16",
    "q8_0": "the Q8_0 GGUF / Q8_0",
    "int8": "--quantize int8 / Q8_0",
    "q4_0": "the Q4_0 GGUF / Q4_0",
    "int4": "--quantize int4 / Q4_0",
    "int4g64": "--quantize int4 --group-size 64 / Q4_0",
}
DEPTH_WEIGHTS = {"Q4_0": ("Q4_0", "auto"), "Q8_0": ("Q8_0", "auto"), "bf16": ("checkpoint", "none")}


# ------------------------------------------------------------------------------------ helpers
def status_bytes(field: str, pid: int | str = "self", source: str = "status") -> int | None:
    """``field`` (VmRSS, VmHWM; AnonHugePages from ``smaps_rollup``) of a process's /proc
    ``source``, in bytes; None once it is gone."""
    try:
        with open(f"/proc/{pid}/{source}") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def random_ids(n: int, seed: int) -> list[int]:
    """``n`` token ids, seeded, outside the special ones (the weights are random anyway)."""
    import random

    rng = random.Random(seed)
    return [rng.randrange(3, VOCAB_WORDS) for _ in range(n)]


def atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def clean_stale(path: Path) -> None:
    """Remove what a killed earlier run left half-written for ``path`` (``.NAME.partial-PID``, PID gone)."""
    for stale in path.parent.glob(f".{path.name}.partial-*"):
        pid = stale.name.rsplit("-", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and not Path(f"/proc/{pid}").exists():
            if stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)
            else:
                stale.unlink(missing_ok=True)


def layout(args: argparse.Namespace) -> dict[str, Path]:
    root = Path(args.dir).expanduser() if args.dir else default_dir()
    if args.layers:
        root = root / f"layers-{args.layers}"
    return {
        "root": root,
        "checkpoint": root / "checkpoint",
        "bf16": root / "model.bf16.gguf",
        "Q8_0": root / "model.Q8_0.gguf",
        "Q4_0": root / "model.Q4_0.gguf",
        "slots": root / "slots",
        "runs": root / "runs.jsonl",
        "manifest": root / "prepare.json",
    }


def default_dir() -> Path:
    sys.path.insert(0, str(PROJECT))
    from minicpm.default_model import cache_root

    return cache_root() / "bench" / "real-shape"


# ------------------------------------------------------------------------------------ prepare
def model_config(layers: int | None) -> dict:
    from minicpm.config import MINICPM_2B_128K

    return MINICPM_2B_128K | ({"num_hidden_layers": layers} if layers else {})


def write_tokenizer(path: Path) -> None:
    """A SentencePiece model of 122,760 pieces laid out as MiniCPM-2B-128k's: ``<unk>`` ``<s>``
    ``</s>``, 256 byte-fallback pieces, ``\u2581`` and made-up words up to id 122752, then the 7 added
    tokens at their real ids (user-defined), plus the side files the checkpoint ships."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    kinds = pb.ModelProto.SentencePiece

    def add(piece: str, score: float, kind: int) -> None:
        entry = proto.pieces.add()
        entry.piece, entry.score, entry.type = piece, score, kind

    add("<unk>", 0.0, kinds.UNKNOWN)
    add("<s>", 0.0, kinds.CONTROL)
    add("</s>", 0.0, kinds.CONTROL)
    for b in range(256):
        add(f"<0x{b:02X}>", 0.0, kinds.BYTE)
    add("\u2581", -1.0, kinds.NORMAL)  # the word boundary alone, so that text never falls back to bytes for it
    letters, i = "etaoinshrdlucmfwypvbgkjqxz", 0
    while len(proto.pieces) < VOCAB_WORDS:
        word, n = "", i
        while True:  # bijective base 26: a, b, ..., z, aa, ab, ...
            n, r = divmod(n, 26)
            word = letters[r] + word
            if n == 0:
                break
            n -= 1
        add("\u2581" + word if i % 3 else word, -float(len(proto.pieces)), kinds.NORMAL)
        i += 1
    for piece, token_id in ADDED_TOKENS.items():
        assert len(proto.pieces) == token_id
        add(piece, 0.0, kinds.USER_DEFINED)
    proto.trainer_spec.model_type = pb.TrainerSpec.BPE
    proto.trainer_spec.vocab_size = len(proto.pieces)
    proto.trainer_spec.byte_fallback = True
    proto.trainer_spec.unk_id, proto.trainer_spec.bos_id, proto.trainer_spec.eos_id = 0, 1, 2
    proto.trainer_spec.pad_id = -1
    proto.normalizer_spec.name = "identity"
    proto.normalizer_spec.add_dummy_prefix = True
    (path / "tokenizer.model").write_bytes(proto.SerializeToString())
    (path / "added_tokens.json").write_text(json.dumps(ADDED_TOKENS, ensure_ascii=False, indent=2))
    special = {
        "additional_special_tokens": list(ADDED_TOKENS),
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
    }
    (path / "special_tokens_map.json").write_text(json.dumps(special, ensure_ascii=False, indent=2))
    tok_config = {
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "legacy": True,
        "model_max_length": 131072,
        "tokenizer_class": "LlamaTokenizer",
    }
    (path / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2))


def write_checkpoint(path: Path, config: dict, seed: int = 0) -> None:
    """Random bfloat16 weights of ``config``'s shape (load_memory.py's, a tensor at a time), and the
    tokenizer; built in a sibling directory and renamed into place."""
    from load_memory import random_bf16_weights

    from minicpm.weights import save_checkpoint

    names, weights = random_bf16_weights(config, seed)
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        save_checkpoint(weights, config, tmp, max_shard_bytes=2**40, names=names)
        write_tokenizer(tmp)
        os.rename(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def convert_to_gguf(llama_cpp: Path, python: str, checkpoint: Path, out: Path) -> dict:
    """llama.cpp's ``convert_hf_to_gguf.py --outtype bf16``; its log kept beside the file."""
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    cmd = [
        python,
        str(llama_cpp / "convert_hf_to_gguf.py"),
        str(checkpoint),
        "--outtype",
        "bf16",
        "--outfile",
        str(tmp),
    ]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=llama_cpp)
    log = proc.stdout + proc.stderr
    out.with_suffix(".convert.log").write_text(log)
    if proc.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"convert_hf_to_gguf.py failed (rc {proc.returncode}):\n{log[-3000:]}")
    os.replace(tmp, out)
    rope = re.findall(r"rope scaling type = (\w+)", log)
    return {"seconds": time.perf_counter() - start, "rope_scaling_logged": rope[-1] if rope else None}


def quantize_gguf(llama_cpp: Path, src: Path, dst: Path, kind: str, threads: int) -> dict:
    tmp = dst.with_name(f".{dst.name}.partial-{os.getpid()}")
    cmd = [str(llama_bin(llama_cpp, "llama-quantize")), str(src), str(tmp), kind, str(threads)]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    dst.with_suffix(".quantize.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(
            f"llama-quantize {kind} failed (rc {proc.returncode}):\n{(proc.stdout + proc.stderr)[-3000:]}"
        )
    os.replace(tmp, dst)
    return {"seconds": time.perf_counter() - start}


def gguf_summary(path: Path) -> dict:
    """Tensor types (count of each) and the rope keys of a GGUF, read with llama.cpp's gguf-py."""
    import gguf

    reader = gguf.GGUFReader(path)
    types: dict[str, int] = {}
    for t in reader.tensors:
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
    head = next((t.tensor_type.name for t in reader.tensors if t.name == "output.weight"), None)
    rope = {k: _field_value(f) for k, f in reader.fields.items() if ".rope." in k or k.endswith(".context_length")}
    return {"bytes": path.stat().st_size, "tensor_types": types, "output.weight": head, "keys": rope}


def _field_value(field) -> object:
    try:
        return field.contents()
    except Exception:  # older gguf-py: the last part is the value
        return field.parts[-1].tolist()


NO_AMX = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"


def probe_llama(args: argparse.Namespace, gguf: Path) -> tuple[bool, str]:
    """Whether llama.cpp's batched (prompt) product runs here: a 32-token prompt in llama-bench."""
    cmd = [str(llama_bin(args.llama_cpp, "llama-bench")), "-m", str(gguf), "-p", "32", "-n", "0", "-r", "1"]
    proc = subprocess.run([*cmd, "-t", str(args.threads)], capture_output=True, text=True, env=llama_env(args))
    return proc.returncode == 0, f"rc {proc.returncode}"


def build_without_amx(llama_cpp: Path) -> Path:
    """ggml's libraries (base, cpu, registry) built again from the same tree with the machine's
    native flags but no AMX, into ``build-noamx`` (llama.cpp's own binaries load them first through
    LD_LIBRARY_PATH; they are the same version, so nothing else is rebuilt)."""
    build = llama_cpp / "build-noamx"
    configure = [
        "cmake",
        "-S",
        str(llama_cpp),
        "-B",
        str(build),
        "-DCMAKE_BUILD_TYPE=Release",
        "-DBUILD_SHARED_LIBS=ON",
    ]
    configure += ["-DGGML_NATIVE=ON", f"-DCMAKE_C_FLAGS={NO_AMX}", f"-DCMAKE_CXX_FLAGS={NO_AMX}", "-DLLAMA_CURL=OFF"]
    configure += ["-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_TOOLS=OFF"]
    configure += ["-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_COMMON=OFF"]
    subprocess.run(configure, check=True, capture_output=True)
    jobs = str(os.cpu_count() or 2)
    cmd = ["nice", "-n", "10", "cmake", "--build", str(build), "-j", jobs, "--target", "ggml-cpu", "ggml-base", "ggml"]
    subprocess.run(cmd, check=True, capture_output=True)
    return build / "bin"


def llama_libs(args: argparse.Namespace, gguf: Path) -> dict:
    """Which ggml libraries llama.cpp runs with here. The build from the sdist (``-march=native``)
    carries AMX kernels; where the CPU lists AMX but the virtual machine does not enable its tile
    state, llama.cpp dies on its first batched product of a quantized weight (SIGILL / SIGSEGV in
    ``ggml_backend_amx_mul_mat``). Then ggml is rebuilt without AMX (:func:`build_without_amx`)."""
    args.llama_lib = None
    ok, why = probe_llama(args, gguf)
    if ok:
        return {"llama_lib": None, "note": "llama.cpp's build runs here as built"}
    lib = args.llama_cpp / "build-noamx" / "bin"
    if not (lib / "libggml-cpu.so").exists():
        print(
            "prepare: llama.cpp's build crashes on a batched product here; rebuilding ggml without AMX ...",
            file=sys.stderr,
            flush=True,
        )
        lib = build_without_amx(args.llama_cpp)
    args.llama_lib = lib
    ok, why_after = probe_llama(args, gguf)
    if not ok:
        raise RuntimeError(f"llama.cpp crashes here with its own ggml ({why}) and without AMX ({why_after})")
    return {
        "llama_lib": str(lib),
        "note": f"llama.cpp's own ggml crashes on a batched product of a quantized weight here ({why}: its AMX "
        f"kernels; this VM lists AMX but does not enable the tile state); its binaries run with ggml rebuilt "
        f"without AMX ({NO_AMX}) from {lib}",
    }


def llama_bin(llama_cpp: Path, name: str) -> Path:
    return llama_cpp / "build" / "bin" / name


def prepare(args: argparse.Namespace, paths: dict[str, Path]) -> dict:
    root = paths["root"]
    root.mkdir(parents=True, exist_ok=True)
    manifest = json.loads(paths["manifest"].read_text()) if paths["manifest"].exists() else {}
    steps = manifest.setdefault("steps", {})

    def step(name: str, done: bool, fn) -> None:
        if done:
            return
        for key in ("checkpoint", "bf16", "Q8_0", "Q4_0", "manifest"):
            clean_stale(paths[key])
        print(f"prepare: {name} ...", file=sys.stderr, flush=True)
        start = time.perf_counter()
        info = fn() or {}
        steps[name] = info | {"seconds": round(time.perf_counter() - start, 1), "at": time.strftime("%Y-%m-%d %H:%M")}
        atomic_write(paths["manifest"], json.dumps(manifest, indent=2))

    config = model_config(args.layers)
    ckpt = paths["checkpoint"]
    step("checkpoint", (ckpt / "config.json").exists(), lambda: write_checkpoint(ckpt, config))
    step(
        "gguf bf16",
        paths["bf16"].exists(),
        lambda: convert_to_gguf(args.llama_cpp, args.convert_python, ckpt, paths["bf16"]),
    )
    for kind in ("Q8_0", "Q4_0"):
        step(
            f"gguf {kind}",
            paths[kind].exists(),
            lambda kind=kind: quantize_gguf(args.llama_cpp, paths["bf16"], paths[kind], kind, args.threads),
        )
    step("llama.cpp libraries", "llama.cpp libraries" in steps, lambda: llama_libs(args, paths["Q4_0"]))
    for kind in ("Q8_0", "Q4_0"):  # minicpm's first use of each GGUF converts it into its cache, once
        name = f"minicpm cache {kind}"
        done = name in steps and Path(steps[name]["path"], "config.json").exists()
        step(name, done, lambda kind=kind: run_minicpm({"task": "resolve", "model": str(paths[kind])}))
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(ckpt / "tokenizer.model"))
    manifest["files"] = {
        "checkpoint_bytes": sum(f.stat().st_size for f in ckpt.glob("*.safetensors")),
        "tokenizer_pieces": sp.get_piece_size(),
        "config": json.loads((ckpt / "config.json").read_text()),
        **{f"gguf {k}": gguf_summary(paths[k]) for k in ("bf16", "Q8_0", "Q4_0")},
    }
    manifest["rope_scaling_dropped"] = (
        not any("scaling" in key for key in manifest["files"]["gguf bf16"]["keys"])
        or steps.get("gguf bf16", {}).get("rope_scaling_logged") == "NONE"
    )
    atomic_write(paths["manifest"], json.dumps(manifest, indent=2, default=str))
    return manifest


# ------------------------------------------------------------------------------------ minicpm worker
def worker(spec: dict) -> dict | None:
    """One minicpm measurement in this (fresh) process (None: ``serve_decode`` answered on stdout)."""
    base = status_bytes("VmRSS")
    import torch

    sys.path.insert(0, str(PROJECT))
    from minicpm.default_model import resolve_model_path

    if spec["task"] == "resolve":
        start = time.perf_counter()
        path = resolve_model_path(spec["model"])
        return {"path": str(path), "seconds": time.perf_counter() - start, "peak": status_bytes("VmHWM")}

    from minicpm.engine import EngineConfig, LLMEngine
    from minicpm.engine.attention.kv_format import resolve_kv_format
    from minicpm.model import MiniCPMForCausalLM
    from minicpm.sampling import SamplingParams

    start = time.perf_counter()
    path = resolve_model_path(spec["model"])
    group = spec.get("group_size")
    model = MiniCPMForCausalLM.from_pretrained(
        path, dtype=spec["dtype"], device="cpu", quantize=spec["quantize"], group_size=group
    )
    c = model.config
    fmt = resolve_kv_format(spec["kv"], model.dtype, "cpu", c.head_dim)
    per_token = fmt.bytes_per_token(c.num_hidden_layers, c.num_key_value_heads, c.head_dim)
    blocks = -(-spec["kv_tokens"] // BLOCK) + 1
    config = EngineConfig(
        quantize=spec["quantize"],
        group_size=group,
        kv_cache_dtype=spec["kv"],
        kv_cache_memory=blocks * BLOCK * per_token,
        block_size=BLOCK,
        enable_prefix_caching=False,
    )
    engine = LLMEngine(model, None, config)
    out: dict = {
        "load_seconds": time.perf_counter() - start,
        "base": base,
        "fused": engine.runner.fused is not None,
        "attention": engine.runner.attention_backend,
        "kv_format": fmt.name,
        "kv_capacity_tokens": engine.kv_capacity,
        "kv_pool_bytes": engine.runner.cache.nbytes,
        "max_model_len": engine.max_model_len,
        "threads": torch.get_num_threads(),
    }
    vocab = c.vocab_size

    def generate(ids: list[int], n: int) -> float:
        t = time.perf_counter()
        engine.generate([ids], SamplingParams(max_new_tokens=n, ignore_eos=True))
        return time.perf_counter() - t

    generate(random_ids(16, 99), 4)  # warm-up: kernels built and loaded, pools started
    task = spec["task"]
    before = engine.stats()
    if task == "decode":
        out["tok_s"] = decode_rate(generate, spec["new_tokens"])
    elif task == "prefill":
        generate(random_ids(64, 98), 1)
        out["seconds"] = generate(random_ids(spec["length"], 2), 1)
        out["tok_s"] = spec["length"] / out["seconds"]
    elif task == "depth":
        out |= decode_at_depth(engine, spec, vocab)
    elif task == "serve_decode":
        serve_decode(engine, generate, out, before)
        return None
    else:
        raise ValueError(f"unknown task {task!r}")
    out |= thread_figures(before, engine.stats()) | {
        "resident": status_bytes("VmRSS"),
        "peak": status_bytes("VmHWM"),
        "huge_pages": status_bytes("AnonHugePages", source="smaps_rollup"),  # the weights' panels ask for them
    }
    return out


def decode_at_depth(engine, spec: dict, vocab: int) -> dict:
    """Decode ``new_tokens`` at ``depth`` tokens of context, the cache filled by the timing-only
    fast path (``fill`` "fast") or a real prefill ("real")."""
    from minicpm.engine.sequence import SequenceStatus
    from minicpm.sampling import SamplingParams

    depth, n = spec["depth"], spec["new_tokens"]
    out: dict = {"fill": spec["fill"]}
    try:
        request = engine.make_request(random_ids(depth, 3), SamplingParams(max_new_tokens=n, ignore_eos=True))
    except Exception as exc:  # refused: the context or the KV budget cannot hold it
        return out | {"admitted": False, "refused": f"{type(exc).__name__}: {exc}"}
    seq = request.seq
    # admitted: validated (it fits the context and the KV budget) and its blocks can be had now
    out["admitted"] = engine.block_manager.can_allocate(seq)
    if not out["admitted"]:
        return out | {"refused": "the KV cache has no room for its blocks"}
    engine.add(request)
    start = time.perf_counter()
    if spec["fill"] == "fast":
        scheduler = engine.scheduler
        scheduler.waiting.remove(seq)
        engine.block_manager.allocate(seq)
        seq.status = SequenceStatus.RUNNING
        seq.first_scheduled = time.monotonic()
        scheduler.running.append(seq)
        fill_blocks(engine.runner.cache, seq.block_table, depth - 1, spec.get("seed", 0))
        seq.num_computed_tokens = depth - 1  # the next step computes the last prompt token: a decode step
    else:
        while seq.num_computed_tokens < depth - 1:
            engine.step()
    out["fill_seconds"] = time.perf_counter() - start
    table = seq.block_table
    out["contiguous_blocks"] = table == list(range(table[0], table[0] + len(table))) if table else None
    steps = []
    while not seq.is_finished:
        t = time.perf_counter()
        engine.step()
        steps.append(time.perf_counter() - t)
    out["steps"] = len(steps)
    out["first_step_seconds"] = steps[0]
    out["tok_s"] = (len(steps) - 1) / sum(steps[1:]) if len(steps) > 1 else 1 / steps[0]
    out["context_at_end"] = seq.num_tokens
    return out


def fill_blocks(cache, blocks: list[int], tokens: int, seed: int) -> None:
    """Timing-only: write keys and values for the first ``tokens`` slots of ``blocks`` in every layer
    (a few blocks' worth of N(0, 1) rows, stored in the cache's format, repeated), so decode reads
    memory that is really there and holds plausible codes and scales."""
    import torch

    fmt, bs = cache.format, cache.block_size
    used = blocks[: -(-tokens // bs)]
    template = min(len(used), 8)
    gen = torch.Generator().manual_seed(seed)
    sources = {}
    for name in ("k", "v"):
        # a block at a time: the reference quantizer's float32 temporaries stay small (eight blocks
        # at once left 0.15 GiB of them in the heap at the capacity run's peak)
        shape = (bs, cache.kv_heads, cache.head_dim)
        parts = [
            fmt.quantize(torch.randn(shape, generator=gen).to(cache.dtype), value=name == "v") for _ in range(template)
        ]
        sources[name] = torch.stack([codes for codes, _ in parts])
        if parts[0][1] is not None:
            sources[f"{name}_scale"] = torch.stack([scales for _, scales in parts])
    runs, i = [], 0  # (first block, count) of consecutive stretches
    while i < len(used):
        j = i
        while j + 1 < len(used) and used[j + 1] == used[j] + 1 and j + 1 - i < template:
            j += 1
        runs.append((used[i], j - i + 1))
        i = j + 1
    with torch.inference_mode():
        for name, src in sources.items():
            store = cache.storage[name]
            for layer in range(store.shape[0]):
                for first, count in runs:
                    store[layer, first : first + count].copy_(src[:count])


def serve_decode(engine, generate, ready: dict, before: dict) -> None:
    """The paired decode's worker: says it is ready (``ready``: its load figures), then answers
    each ``{"new_tokens": N}`` line on stdin with one decode measurement (as the decode section's:
    (N - 1) / (time for N - time for 1)) until stdin closes."""
    print(MARK + json.dumps(ready | {"resident": status_bytes("VmRSS")}), flush=True)
    for line in sys.stdin:
        rate = decode_rate(generate, json.loads(line)["new_tokens"])
        figures = thread_figures(before, engine.stats())  # since the worker was ready: cumulative
        memory = {"resident": status_bytes("VmRSS"), "peak": status_bytes("VmHWM")}
        print(MARK + json.dumps({"tok_s": rate} | figures | memory), flush=True)


def decode_rate(generate, n: int) -> float:
    """Batch-1 decode rate of the decode sections: (N - 1) / (time for N tokens - time for 1),
    after the same 16-token prompt."""
    ids = random_ids(PROMPT, 1)
    first = generate(ids, 1)
    return (n - 1) / (generate(ids, n) - first)


def thread_figures(before: dict, after: dict) -> dict:
    """The engine on fewer threads while other processes kept a core busy, between two stats()."""
    return {
        "thread_drops": after["cpu_thread_drops"] - before["cpu_thread_drops"],
        "reduced_seconds": round(after["cpu_reduced_seconds"] - before["cpu_reduced_seconds"], 2),
    }


class ServedMinicpm:
    """A minicpm worker process holding its model, measuring on request (serve_decode)."""

    def __init__(self, spec: dict) -> None:
        cmd, env = worker_command(spec)
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
        )
        self.err: list[str] = []
        self.reader = threading.Thread(target=lambda: self.err.extend(self.proc.stderr), daemon=True)
        self.reader.start()
        self.ready = self._answer()

    def _answer(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith(MARK):
                return json.loads(line[len(MARK) :])
        self.proc.wait()
        raise RuntimeError(f"minicpm worker exited (rc {self.proc.returncode}):\n{''.join(self.err[-40:])}")

    def decode(self, n: int) -> dict:
        self.proc.stdin.write(json.dumps({"new_tokens": n}) + "\n")
        self.proc.stdin.flush()
        return self._answer()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def worker_command(spec: dict) -> tuple[list[str], dict]:
    """The command and environment of a minicpm worker (this script) for ``spec``."""
    env = dict(os.environ, PYTHONPATH=str(PROJECT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if spec.get("fixed_threads"):
        env["MINICPM_ADAPTIVE_THREADS"] = "0"  # the engine keeps its threads whatever the load
    return [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)], env


def run_minicpm(spec: dict, timeout: float | None = None) -> dict:
    cmd, env = worker_command(spec)
    proc = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )
    answers = [line[len(MARK) :] for line in proc.stdout.splitlines() if line.startswith(MARK)]
    if proc.returncode != 0 or not answers:
        raise RuntimeError(f"minicpm {spec['task']} failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(answers[-1])


# ------------------------------------------------------------------------------------ llama.cpp
class Watched:
    """A llama.cpp process whose peak memory comes from ``wait4`` (its ru_maxrss: the kernel's
    VmHWM at exit) and whose resident memory is read from /proc while it runs. Never reaped by
    Popen (its poll / wait would take the exit status and the usage away)."""

    def __init__(self, cmd: list[str], env: dict, stdout=subprocess.PIPE) -> None:
        self.proc = subprocess.Popen(
            cmd, stdout=stdout, stderr=subprocess.PIPE, text=True, start_new_session=True, env=env
        )
        self.err: list[str] = []
        self.marks: dict[str, int | None] = {}
        self.watch: re.Pattern | None = None
        self.exit: tuple[int, int] | None = None  # (exit status, peak bytes) once reaped
        self.reader = threading.Thread(target=self._read_err, daemon=True)
        self.reader.start()

    def _read_err(self) -> None:
        for line in self.proc.stderr:
            if self.watch is not None and self.watch.search(line):
                self.marks[line.strip()] = status_bytes("VmRSS", self.proc.pid)
            self.err.append(line)

    def rss(self) -> int | None:
        return status_bytes("VmRSS", self.proc.pid)

    def _reap(self, flags: int) -> bool:
        if self.exit is None:
            pid, status, usage = os.wait4(self.proc.pid, flags)
            if pid == 0:
                return False
            self.proc.returncode = os.waitstatus_to_exitcode(status)
            self.exit = (self.proc.returncode, usage.ru_maxrss * 1024)
        return True

    def exited(self) -> bool:
        return self._reap(os.WNOHANG)

    def finish(self, kill: bool = False) -> tuple[int, int]:
        """(exit status, peak bytes), after a SIGTERM with ``kill``."""
        if kill and not self.exited():
            self.proc.send_signal(signal.SIGTERM)
        self._reap(0)
        self.reader.join(timeout=5)
        return self.exit

    def tail(self) -> str:
        return "".join(self.err[-40:])


def llama_env(args: argparse.Namespace) -> dict:
    """The environment of llama.cpp's processes: ``LD_LIBRARY_PATH`` first on ``--llama-lib`` (a
    ggml build without AMX, see :func:`llama_libs`) where one is in use."""
    env = dict(os.environ)
    if args.llama_lib:
        env["LD_LIBRARY_PATH"] = str(args.llama_lib) + os.pathsep + env.get("LD_LIBRARY_PATH", "")
    return env


def llama_bench(args: argparse.Namespace, gguf: Path, extra: list[str], measured: int) -> dict:
    """One llama-bench process; the result of its ``measured``-th test (1-based; the others warm up)."""
    cmd = [str(llama_bin(args.llama_cpp, "llama-bench")), "-m", str(gguf), "-t", str(args.threads), "-r", "1"]
    cmd += ["-o", "jsonl", "--progress", *extra]
    w = Watched(cmd, llama_env(args))
    w.watch = re.compile(rf"benchmark {measured}/\d+: (prompt|generation) run 1/")
    lines = [line for line in w.proc.stdout if line.strip().startswith("{")]
    rc, peak = w.finish()
    if rc != 0 or len(lines) < measured:
        raise RuntimeError(f"llama-bench failed (rc {rc}): {' '.join(cmd)}\n{w.tail()}")
    r = json.loads(lines[measured - 1])
    resident = next(iter(w.marks.values()), None)
    out = {
        "peak": peak,
        "resident": resident,
        "flash_attn": r.get("flash_attn"),
        "type_k": r.get("type_k"),
        "threads": r.get("n_threads"),
        "build": r.get("build_commit"),
        "avg_ns": r["avg_ns"],
    }
    if r.get("n_gen"):
        out["tok_s"] = r["avg_ts"]
    else:
        out["seconds"] = r["avg_ns"] / 1e9
        out["tok_s"] = r["avg_ts"]
    return out


def http(url: str, body: dict | None = None, timeout: float | None = None) -> dict:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read() or b"{}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_llama_server(args: argparse.Namespace, gguf: Path, ctx: int, extra: list[str]) -> tuple[Watched, str]:
    """llama-server on ``gguf`` with one slot of ``ctx`` tokens, ``--threads`` threads, no prompt
    cache in RAM; once it answers /health: the process and its URL."""
    port = free_port()
    cmd = [str(llama_bin(args.llama_cpp, "llama-server")), "-m", str(gguf), "-c", str(ctx), "-np", "1"]
    cmd += ["-t", str(args.threads), "-tb", str(args.threads), *extra]
    cmd += ["--cache-ram", "0", "-ctxcp", "0", "--host", "127.0.0.1", "--port", str(port), "-b", "2048", "-ub", "512"]
    w = Watched(cmd, llama_env(args), stdout=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        while True:
            if w.exited():
                raise RuntimeError(f"llama-server exited (rc {w.proc.returncode}):\n{w.tail()}")
            try:
                if http(url + "/health", timeout=5).get("status") == "ok":
                    return w, url
            except (urllib.error.URLError, ConnectionError, TimeoutError, json.JSONDecodeError):
                pass
            time.sleep(0.5)
    except BaseException:
        w.finish(kill=True)
        raise


def llama_server_decode(url: str, n: int) -> float:
    """Tokens per second of ``n`` tokens decoded after a 16-token prompt: the server's own
    ``predicted_per_second``, its n - 1 decode steps over their time (the first token comes from
    the prompt's logits), as minicpm's (N - 1) / (time for N - time for 1)."""
    body = {"prompt": random_ids(PROMPT, 1), "n_predict": n, "cache_prompt": False, "ignore_eos": True}
    timings = http(url + "/completion", body | {"temperature": 0, "top_k": 1})["timings"]
    if timings["predicted_n"] != n:
        raise RuntimeError(f"llama-server decoded {timings['predicted_n']} tokens, not {n}")
    return timings["predicted_per_second"]  # (n - 1) / time: its first token came with the prompt


SLOT_MAGIC = 0x67677371  # "ggsq": llama.cpp's sequence state file (llama_state_seq_save_file)
SLOT_VERSION = 3  # LLAMA_STATE_SEQ_VERSION of the vendored llama.cpp


def _read_exact(f, n: int, what: str) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise ValueError(f"{f.name}: cut short in {what} ({len(data)} of {n} bytes)")
    return data


def extend_slot(src: Path, dst: Path, ids: list[int]) -> dict:
    """Timing-only: llama.cpp's saved state of one sequence ``src`` (a real prefill of C tokens, one
    stream, values not transposed: flash attention) written to ``dst`` as the state of ``len(ids)``
    >= C tokens: ``ids`` as its prompt (a plain token list), cells at positions 0..len(ids)-1 of
    sequence 0, each layer's key and value rows those of ``src`` repeated (C, C, ..., a prefix).
    Decode reads every cell whatever its contents, so decode at that depth is timed without a
    prefill of it; the scores are not those of a real prompt. Anything else in ``src`` (another
    version, several streams or sequences, transposed values, a cut-short file) is refused with a
    ValueError; ``dst`` is written whole or not at all."""
    import array
    import struct

    total = len(ids)
    tmp = dst.with_name(f".{dst.name}.partial-{os.getpid()}")
    with src.open("rb") as f:
        magic, version, n_tok = struct.unpack("<3I", _read_exact(f, 12, "the header"))
        if magic != SLOT_MAGIC or version != SLOT_VERSION:
            raise ValueError(f"{src}: not a version {SLOT_VERSION} sequence state ({magic:#x}, {version})")
        f.seek(4 * n_tok, 1)
        n_stream, cells = struct.unpack("<2I", _read_exact(f, 8, "the stream header"))
        if n_stream != 1 or not 0 < cells <= total:
            raise ValueError(f"{src}: {n_stream} streams of {cells} cells (one stream of 1..{total} expected)")
        meta = array.array("i")
        meta.frombytes(_read_exact(f, 12 * cells, "the cells"))  # per cell: pos, n_seq_id (1), seq_id
        if list(meta[0::3]) != list(range(cells)) or set(meta[1::3]) != {1} or set(meta[2::3]) != {0}:
            raise ValueError(f"{src}: its cells are not positions 0..{cells - 1} of one sequence")
        v_trans, n_layer = struct.unpack("<2I", _read_exact(f, 8, "the layer header"))
        if v_trans:
            raise ValueError(f"{src}: values stored transposed (saved without flash attention)")
        out_meta = array.array("i", [0]) * (3 * total)
        out_meta[0::3] = array.array("i", range(total))
        out_meta[1::3] = array.array("i", [1]) * total
        try:
            with tmp.open("wb") as g:
                g.write(struct.pack("<3I", SLOT_MAGIC, SLOT_VERSION, total))
                g.write(array.array("i", ids).tobytes())
                g.write(struct.pack("<2I", 1, total))
                g.write(out_meta.tobytes())
                g.write(struct.pack("<2I", 0, n_layer))
                for i in range(2 * n_layer):  # every layer's keys, then every layer's values
                    head = _read_exact(f, 12, f"tensor {i}'s header")
                    (row,) = struct.unpack("<Q", head[4:])
                    rows = _read_exact(f, cells * row, f"tensor {i}")
                    g.write(head)
                    for _ in range(total // cells):
                        g.write(rows)
                    g.write(rows[: total % cells * row])
                if f.read(1):
                    raise ValueError(f"{src}: bytes past its {2 * n_layer} tensors")
            os.replace(tmp, dst)
        finally:
            tmp.unlink(missing_ok=True)
    return {"extended_from": cells, "layers": n_layer, "bytes": dst.stat().st_size}


def shorter_slot(slots: Path, stem: str, kv: str, depth: int) -> tuple[Path, int] | None:
    """The deepest real prefill saved for ``stem`` and ``kv`` short of ``depth``, and its depth."""
    found = []
    for path in slots.glob(f"{stem}-{kv}-d*.bin"):
        m = re.fullmatch(rf"{re.escape(stem)}-{re.escape(kv)}-d(\d+)\.bin", path.name)
        if m and int(m.group(1)) < depth:
            found.append((int(m.group(1)), path))
    return (max(found)[1], max(found)[0]) if found else None


def llama_server_depth(args: argparse.Namespace, gguf: Path, kv: str, depth: int, n: int, slots: Path) -> dict:
    """Decode at ``depth`` tokens of context in llama-server: a real prefill of ``depth`` random
    tokens (or its slot restored from an earlier run's save), then ``n`` tokens generated; the
    server's own timings."""
    slots.mkdir(parents=True, exist_ok=True)
    w, url = start_llama_server(
        args, gguf, depth + n + 64, ["-fa", "on", "-ctk", kv, "-ctv", kv, "--slot-save-path", str(slots)]
    )
    out: dict = {"flash_attn": "on", "type_k": kv}
    try:
        ids = random_ids(depth, 3)
        name = f"{gguf.stem}-{kv}-d{depth}.bin"
        saved = slots / name
        start = time.perf_counter()
        if saved.exists() and args.slot_reuse:
            r = http(f"{url}/slots/0?action=restore", {"filename": name})
            out |= {"fill": "restored", "restored_tokens": r.get("n_restored")}
        elif args.llama_fill == "extend" and (source := shorter_slot(slots, gguf.stem, kv, depth)) is not None:
            # timing-only: a shorter real prefill repeated to the depth
            built = f"{gguf.stem}-{kv}-d{depth}-from-d{source[1]}.bin"
            if not (slots / built).exists():
                extend_slot(source[0], slots / built, ids)
                out["extend_seconds"] = time.perf_counter() - start
            r = http(f"{url}/slots/0?action=restore", {"filename": built})
            out |= {"fill": "extended", "extended_from": source[1], "restored_tokens": r.get("n_restored")}
        else:
            r = http(url + "/completion", {"prompt": ids, "n_predict": 1, "cache_prompt": True, "temperature": 0})
            out |= {"fill": "prefill", "prefill_seconds": r["timings"]["prompt_ms"] / 1000}
            if args.slot_reuse:
                tmp = f".{name}.partial-{os.getpid()}"
                http(f"{url}/slots/0?action=save", {"filename": tmp})
                os.replace(slots / tmp, saved)
        out["fill_seconds"] = time.perf_counter() - start
        body = {"prompt": ids, "n_predict": n, "cache_prompt": True, "ignore_eos": True, "temperature": 0, "top_k": 1}
        r = http(url + "/completion", body)
        timings = r["timings"]
        out |= {
            "tok_s": timings["predicted_per_second"],  # (n - 1) decode steps over their time
            "generated": timings["predicted_n"],
            "reprocessed_prompt_tokens": timings["prompt_n"],
            "cached_tokens": r.get("tokens_cached"),
            "resident": w.rss(),
        }
    except Exception as exc:
        w.finish(kill=True)
        raise RuntimeError(f"llama-server: {type(exc).__name__}: {exc}\n{w.tail()}") from exc
    finally:
        _, peak = w.finish(kill=True)
    out["peak"] = peak
    return out


# ------------------------------------------------------------------------------------ driver
class Runs:
    """Every finished run, appended to ``runs.jsonl``; with ``resume`` a recorded run of the same
    key and round is handed back instead of run again."""

    def __init__(self, path: Path, resume: bool) -> None:
        self.path = path
        self.done: dict[tuple[str, int], dict] = {}
        if resume and path.exists():
            for line in path.read_text().splitlines():
                try:
                    r = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut short by a kill
                if "error" not in r["result"]:
                    self.done[(r["key"], r["round"])] = r["result"]

    def get(self, key: str, round_: int, fn) -> dict:
        if (key, round_) in self.done:
            print(f"[{key} round {round_}] recorded", file=sys.stderr, flush=True)
            return self.done[(key, round_)] | {"reused": True}
        print(f"[{key} round {round_}] ...", file=sys.stderr, flush=True)
        start = time.perf_counter()
        try:
            result = fn()
        except Exception as exc:  # one failed run (out of memory, a crash) is reported, not fatal
            result = {"error": f"{type(exc).__name__}: {str(exc)[-1500:]}"}
        result["wall_seconds"] = round(time.perf_counter() - start, 2)
        print(f"[{key} round {round_}] {json.dumps(_short(result))}", file=sys.stderr, flush=True)
        line = {"key": key, "round": round_, "at": time.strftime("%Y-%m-%d %H:%M:%S"), "result": result}
        with self.path.open("a") as f:
            f.write(json.dumps(line) + "\n")
        return result


def _short(r: dict) -> dict:
    return {k: v for k, v in r.items() if k in ("tok_s", "seconds", "peak", "resident", "error", "fill", "admitted")}


def minicpm_spec(args, paths, weights: str, quantize: str, group: int | None = None, **extra) -> dict:
    model = paths["checkpoint"] if weights == "checkpoint" else paths[weights]
    spec = {"model": str(model), "dtype": args.dtype, "quantize": quantize, "kv": "auto"}
    spec |= {"group_size": group} if group else {}
    return spec | ({"fixed_threads": True} if args.fixed_threads else {}) | extra


def run_tag(args: argparse.Namespace) -> str:
    """What a recorded run depends on beyond its own case: the depth, minicpm's thread policy."""
    return f"L{args.layers or 40}" + (" fixed-threads" if args.fixed_threads else "")


def alternate(round_: int, pair: list) -> list:
    return pair if round_ % 2 == 0 else pair[::-1]


def measure_formats(args, paths, runs: Runs, section: str, task: dict) -> dict:
    """``decode`` / ``prefill`` for every format row: llama.cpp once per GGUF per round."""
    rows = {f: {"minicpm": [], "llama.cpp": []} for f in args.formats}
    tag = run_tag(args)
    for round_ in range(args.rounds):
        for gguf in dict.fromkeys(FORMATS[f][3] for f in args.formats):
            ours = [f for f in args.formats if FORMATS[f][3] == gguf]

            def peer(gguf=gguf) -> dict:
                if task["task"] == "decode":
                    extra, measured = ["-p", "0", "-n", str(args.new_tokens)], 1
                else:
                    extra, measured = ["-p", f"64,{task['length']}", "-n", "0", "--no-warmup"], 2
                return llama_bench(args, paths[gguf], extra, measured)

            jobs = [("llama.cpp", f"{section} {tag} llama.cpp {gguf} {task_key(task)}", peer, ours)]
            for f in ours:
                weights, quantize, group, _ = FORMATS[f]
                kv_tokens = task.get("length", PROMPT) + args.new_tokens + 64
                spec = minicpm_spec(args, paths, weights, quantize, group, kv_tokens=kv_tokens) | task
                key = f"{section} {tag} minicpm {f} {args.dtype} {task_key(task)}"
                jobs.append(("minicpm", key, lambda spec=spec: run_minicpm(spec), [f]))
            for system, key, fn, fmts in alternate(round_, jobs):
                r = runs.get(key, round_, fn)
                for f in fmts:
                    rows[f][system].append(r)
    return rows


def measure_paired(args, paths, runs: Runs) -> dict:
    """``decodepaired``: per format row, one minicpm worker and one llama-server, both loaded, then
    ``--pairs`` decode measurements of each, alternating which goes first."""
    rows: dict = {}
    tag = run_tag(args)
    n = args.new_tokens
    for f in args.formats:
        weights, quantize, group, gguf = FORMATS[f]

        def run(f=f, weights=weights, quantize=quantize, group=group, gguf=gguf) -> dict:
            spec = minicpm_spec(args, paths, weights, quantize, group, kv_tokens=PROMPT + n + 64, task="serve_decode")
            w, url = start_llama_server(args, paths[gguf], PROMPT + n + 64, [])
            ours = None
            try:
                ours = ServedMinicpm(spec)
                llama_server_decode(url, 8)  # warm-up (minicpm's worker warms up before it is ready)
                pairs = []
                for i in range(args.pairs):
                    jobs = [
                        ("minicpm", lambda: ours.decode(n)),
                        ("llama.cpp", lambda: {"tok_s": llama_server_decode(url, n)}),
                    ]
                    got = {system: fn() for system, fn in alternate(i, jobs)}
                    got["llama.cpp"]["resident"] = w.rss()
                    pairs.append(got)
                    print(
                        f"[{f} pair {i}] minicpm {got['minicpm']['tok_s']:.2f} "
                        f"llama.cpp {got['llama.cpp']['tok_s']:.2f}",
                        file=sys.stderr,
                        flush=True,
                    )
            finally:
                if ours is not None:
                    ours.close()
                _, peak = w.finish(kill=True)
            return {"pairs": pairs, "llama_peak": peak, "load": ours.ready}

        key = f"decodepaired {tag} {f} {args.dtype} n={n} pairs={args.pairs}"
        r = runs.get(key, 0, run)
        if "error" in r:
            rows[f] = {"minicpm": {"error": r["error"]}, "llama.cpp": None}
            continue
        ours = [p["minicpm"] for p in r["pairs"]]
        theirs = [p["llama.cpp"] | {"peak": r["llama_peak"]} for p in r["pairs"]]
        ratios = [p["minicpm"]["tok_s"] / p["llama.cpp"]["tok_s"] for p in r["pairs"]]
        row = summarize_rows({f: {"minicpm": ours, "llama.cpp": theirs}}, "tok_s")[f]
        row["ratio"] = statistics.median(ratios)
        row["ratio_range"] = [min(ratios), max(ratios)]
        row["pairs_faster"] = sum(x > 1 for x in ratios)
        for field in ("thread_drops", "reduced_seconds"):  # cumulative: the worker's whole run
            row["minicpm"][field] = max(p.get(field, 0) for p in ours)
        rows[f] = row
    return rows


def task_key(task: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(task.items()))


def measure_depth(args, paths, runs: Runs) -> dict:
    weights, quantize = DEPTH_WEIGHTS[args.depth_weights]
    peer_gguf = paths[args.depth_weights]
    tag = run_tag(args)
    pairs = [p.split(":") for p in args.kv]
    rows = {f"{a}:{b}": {"minicpm": [], "llama.cpp": []} for a, b in pairs}
    n = args.new_tokens
    for round_ in range(args.rounds):
        jobs = []
        for kv in dict.fromkeys(a for a, _ in pairs):
            spec = minicpm_spec(args, paths, weights, quantize, kv_tokens=args.depth + n + 64)
            spec |= {"kv": kv, "task": "depth", "depth": args.depth, "new_tokens": n, "fill": args.minicpm_fill}
            key = f"decode32k {tag} minicpm {args.depth_weights} {args.dtype} kv={kv} d={args.depth} n={n}"
            key += f" {args.minicpm_fill}"
            jobs.append(
                ("minicpm", key, lambda spec=spec: run_minicpm(spec), [f"{kv}:{b}" for a, b in pairs if a == kv])
            )
        peers = []
        for kv in dict.fromkeys(b for _, b in pairs):
            key = f"decode32k {tag} llama.cpp {args.depth_weights} kv={kv} d={args.depth} n={n}"
            key += " extend" if args.llama_fill == "extend" else ""

            def fn(kv=kv) -> dict:
                return llama_server_depth(args, peer_gguf, kv, args.depth, n, paths["slots"])

            peers.append(("llama.cpp", key, fn, [f"{a}:{kv}" for a, b in pairs if b == kv]))
        for i in range(max(len(jobs), len(peers))):  # minicpm, llama.cpp, minicpm, ... (flipped every round)
            pair = [x[i] for x in (jobs, peers) if i < len(x)]
            for system, key, fn, names in alternate(round_, pair):
                r = runs.get(key, round_, fn)
                for name in names:
                    rows[name][system].append(r)
    return rows


def measure_capacity(args, paths, runs: Runs) -> dict:
    tag = run_tag(args)
    n, context = args.new_tokens, args.capacity_context
    out: dict = {"decode": [], "prefill": {}}
    for round_ in range(args.rounds):
        spec = minicpm_spec(args, paths, "checkpoint", "int4", kv_tokens=context - BLOCK)
        spec |= {"kv": "int4", "task": "depth", "depth": context - n, "new_tokens": n, "fill": "fast"}
        key = f"capacity {tag} minicpm int4 {args.dtype} kv=int4 context={context} n={n}"
        out["decode"].append(runs.get(key, round_, lambda spec=spec: run_minicpm(spec)))
    for length in args.capacity_prefill:
        for round_ in range(args.rounds):
            spec = minicpm_spec(args, paths, "checkpoint", "int4", kv_tokens=length + 64 + BLOCK)
            spec |= {"kv": "int4", "task": "prefill", "length": length}
            key = f"capacity {tag} minicpm int4 {args.dtype} kv=int4 prefill={length}"
            out["prefill"].setdefault(length, []).append(runs.get(key, round_, lambda spec=spec: run_minicpm(spec)))
    return out


# ------------------------------------------------------------------------------------ summary
def cell(results: list[dict], field: str) -> dict | None:
    values = [r[field] for r in results if r.get(field) is not None and "error" not in r]
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": len(values)}


def summarize_rows(rows: dict, field: str) -> dict:
    out = {}
    for name, by in rows.items():
        row: dict = {}
        for system, results in by.items():
            c = cell(results, field)
            if c is None:
                errors = [r["error"] for r in results if "error" in r]
                row[system] = {"error": errors[-1]} if errors else None
                continue
            row[system] = c | {
                "peak_gib": _gib(cell(results, "peak")),
                "resident_gib": _gib(cell(results, "resident")),
            }
            extra = {k: results[-1].get(k) for k in ("fused", "flash_attn", "fill", "prefill_seconds", "threads")}
            row[system] |= {k: v for k, v in extra.items() if v is not None}
        ours, theirs = row.get("minicpm") or {}, row.get("llama.cpp") or {}
        if "median" in ours and "median" in theirs:
            row["ratio"] = ours["median"] / theirs["median"]
        out[name] = row
    return out


def _gib(c: dict | None) -> float | None:
    return None if c is None else round(c["median"] / GIB, 3)


def summarize_capacity(args, cap: dict) -> dict:
    out: dict = {"context": args.capacity_context, "limit_gib": args.capacity_gib}
    ok = [r for r in cap["decode"] if "error" not in r]
    if ok:
        r = ok[-1]
        out |= {
            "admitted": all(x.get("admitted") for x in ok),
            "context_reached": r.get("context_at_end"),
            "fill": "timing-only fast path (random codes written into the blocks)",
            "decode_tok_s": cell(ok, "tok_s"),
            "peak_gib": max(x["peak"] for x in ok) / GIB,
            "resident_gib": max(x["resident"] for x in ok) / GIB,
            "kv_pool_gib": r.get("kv_pool_bytes", 0) / GIB,
            "kv_capacity_tokens": r.get("kv_capacity_tokens"),
            "max_model_len": r.get("max_model_len"),
        }
        out["peak_within_limit"] = out["admitted"] and out["peak_gib"] <= args.capacity_gib
    else:
        out["error"] = next((r["error"] for r in cap["decode"]), "not run")
    pre = {}
    for length, results in cap["prefill"].items():
        c = cell(results, "seconds")
        pre[str(length)] = c | {"peak_gib": _gib(cell(results, "peak"))} if c else {"error": results[-1].get("error")}
    out["prefill_seconds"] = pre
    measured = sorted((int(k), v["median"]) for k, v in pre.items() if "median" in v)
    if len(measured) >= 2:
        (n1, t1), (n2, t2) = measured[-2], measured[-1]
        # t = a n + b n^2 through both points (linear layers, quadratic attention)
        b = (t2 / n2 - t1 / n1) / (n2 - n1)
        a = t1 / n1 - b * n1
        n = args.capacity_context
        out["prefill_extrapolated"] = {
            "seconds": a * n + b * n * n,
            "from": [n1, n2],
            "label": f"extrapolated from measured {n1} and {n2}-token prefills (t = a n + b n^2), not measured",
        }
    return out


def print_table(report: dict) -> None:
    def fmt(c: dict | None, digits: int = 2) -> str:
        if not c:
            return "-"
        if "error" in c:
            return "failed"
        return f"{c['median']:.{digits}f} [{c['min']:.{digits}f}, {c['max']:.{digits}f}]"

    def mem(c: dict | None) -> str:
        if not c or "error" in c:
            return "-"
        return f"{c.get('peak_gib') or 0:.2f}/{c.get('resident_gib') or 0:.2f}"

    print(f"# {report['shape']}; {report['machine']}; at the end {report['machine_load_at_end']}")
    head = f"{'section':<11} {'case':<32} {'minicpm':>24} {'llama.cpp':>24} {'ratio':>6}"
    head += f" {'GiB peak/res ours':>17} {'theirs':>11}"
    for section, unit in (
        ("decode", "tok/s"),
        ("decodepaired", "tok/s"),
        ("prefill2k", "s"),
        ("prefill32k", "s"),
        ("decode32k", "tok/s"),
    ):
        if section not in report["sections"]:
            continue
        s = report["sections"][section]
        print(f"\n{section} ({unit}; {s['what']})")
        print(head)
        for name, row in s["rows"].items():
            ours, theirs = row.get("minicpm"), row.get("llama.cpp")
            ratio = f"{row['ratio']:.2f}" if "ratio" in row else "-"
            line = f"{section:<11} {s['labels'].get(name, name):<32} {fmt(ours):>24} {fmt(theirs):>24} {ratio:>6} "
            line += f"{mem(ours):>17} {mem(theirs):>11}"
            if "ratio_range" in row:
                lo, hi = row["ratio_range"]
                line += f"  pairs [{lo:.2f}, {hi:.2f}], minicpm faster in {row['pairs_faster']}/{ours['runs']}"
            print(line)
        for note in s.get("notes", []):
            print(f"  note: {note}")
    cap = report["sections"].get("capacity")
    if cap:
        print(f"\ncapacity (minicpm, int4 weights + int4 KV, one {cap['context']}-token context)")
        if "error" in cap:
            print(f"  failed: {cap['error']}")
        else:
            print(
                f"  admitted: {cap['admitted']}; context reached {cap['context_reached']}; "
                f"peak {cap['peak_gib']:.2f} GiB, "
                f"resident {cap['resident_gib']:.2f} GiB (KV pool {cap['kv_pool_gib']:.2f} GiB); "
                f"limit {cap['limit_gib']} GiB: {'met' if cap['peak_within_limit'] else 'NOT met'}"
            )
            print(f"  decode at {cap['context']} of context: {fmt(cap['decode_tok_s'], 3)} tok/s ({cap['fill']})")
        for length, c in cap["prefill_seconds"].items():
            print(f"  prefill {length} tokens (measured): {fmt(c, 1)} s, peak {c.get('peak_gib') or 0:.2f} GiB")
        if "prefill_extrapolated" in cap:
            e = cap["prefill_extrapolated"]
            print(f"  prefill {cap['context']} tokens: {e['seconds']:.0f} s ({e['label']})")
        for note in cap.get("notes", []):
            print(f"  note: {note}")


def machine() -> str:
    model, mem = "", 0.0
    with contextlib.suppress(OSError, StopIteration), open("/proc/cpuinfo") as f:
        model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    with contextlib.suppress(OSError), open("/proc/meminfo") as f:
        mem = int(f.readline().split()[1]) * 1024 / GIB
    load = os.getloadavg()
    return f"{os.cpu_count()} cores ({model}), {mem:.0f} GiB; load average {load[0]:.2f} at the start"


# ------------------------------------------------------------------------------------ main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--prepare", action="store_true", help="write the checkpoint and the GGUFs (where missing)")
    p.add_argument("--only", default=None, help=f"sections to measure, comma-separated: {','.join(SECTIONS)}")
    p.add_argument("--dir", default=None, help="the files' directory (default ~/.cache/minicpm/bench/real-shape)")
    p.add_argument("--layers", type=int, default=None, help="this many layers instead of 40 (validation)")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--resume", action="store_true", help="reuse the runs recorded in runs.jsonl")
    p.add_argument("--formats", default=",".join(FORMATS), help="rows of decode / prefill: " + ",".join(FORMATS))
    p.add_argument("--dtype", default="bfloat16", help="minicpm's activation dtype (default bfloat16)")
    p.add_argument("--new-tokens", type=int, default=64, help="tokens decoded per measurement")
    p.add_argument("--pairs", type=int, default=10, help="decodepaired: measurements of each system per row")
    p.add_argument("--prefill-short", type=int, default=2048)
    p.add_argument("--prefill-long", type=int, default=32768)
    p.add_argument("--depth", type=int, default=32768, help="context of decode32k")
    p.add_argument(
        "--kv",
        default="bfloat16:f16,int8:q8_0,int4:q4_0",
        help="decode32k's KV pairs, minicpm:llama.cpp (also e.g. bfloat16:bf16, int4:q4_1)",
    )
    p.add_argument("--depth-weights", default="Q4_0", choices=list(DEPTH_WEIGHTS))
    p.add_argument("--minicpm-fill", default="fast", choices=["fast", "real"])
    p.add_argument(
        "--llama-fill",
        default="prefill",
        choices=["prefill", "extend"],
        help="decode32k, llama.cpp's cache where no real prefill of --depth is saved: a real prefill, or "
        "(timing-only) the deepest saved real prefill of the same files and KV type repeated to --depth",
    )
    p.add_argument("--no-slot-reuse", dest="slot_reuse", action="store_false", help="llama.cpp prefills every run")
    p.add_argument("--capacity-context", type=int, default=131072)
    p.add_argument("--capacity-prefill", default="32768,65536", help="measured prefills ('none': skip)")
    p.add_argument("--capacity-gib", type=float, default=16.0)
    p.add_argument(
        "--fixed-threads",
        action="store_true",
        help="minicpm keeps its threads under load (MINICPM_ADAPTIVE_THREADS=0), as llama.cpp does",
    )
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="llama.cpp's threads")
    p.add_argument("--llama-cpp", type=Path, default=LLAMA_CPP, help="llama.cpp source tree with build/bin")
    p.add_argument(
        "--llama-lib", type=Path, default=None, help="ggml libraries for llama.cpp (default: what --prepare chose)"
    )
    p.add_argument("--convert-python", default=sys.executable, help="python for convert_hf_to_gguf.py")
    args = p.parse_args(argv)
    args.only_given = args.only is not None  # with --prepare: measure only when sections are named
    args.only = [s for s in (args.only or ",".join(SECTIONS)).split(",") if s]
    bad = [s for s in args.only if s not in SECTIONS]
    if bad:
        p.error(f"unknown sections {bad}; choose from {SECTIONS}")
    args.formats = [f for f in args.formats.split(",") if f]
    if any(f not in FORMATS for f in args.formats):
        p.error(f"--formats: choose from {list(FORMATS)}")
    args.kv = [k for k in args.kv.split(",") if k]
    if any(len(k.split(":")) != 2 for k in args.kv):
        p.error("--kv: pairs minicpm:llama.cpp, e.g. int8:q8_0")
    args.capacity_prefill = (
        [] if args.capacity_prefill == "none" else [int(x) for x in args.capacity_prefill.split(",")]
    )
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        result = worker(json.loads(args.worker))
        if result is not None:
            print(MARK + json.dumps(result), flush=True)
        return
    sys.path.insert(0, str(PROJECT))
    sys.path.insert(1, str(args.llama_cpp / "gguf-py"))  # llama.cpp's gguf-py: the types it writes
    paths = layout(args)
    if args.prepare:
        manifest = prepare(args, paths)
        print(json.dumps({"prepared": str(paths["root"]), **manifest["files"]}, default=str)[:4000], file=sys.stderr)
        if not args.only_given:
            return
    if not paths["manifest"].exists():
        raise SystemExit(f"{paths['root']} is not prepared: run with --prepare first")
    manifest = json.loads(paths["manifest"].read_text())
    libs = manifest["steps"].get("llama.cpp libraries", {})
    if args.llama_lib is None:
        args.llama_lib = libs.get("llama_lib")
    runs = Runs(paths["runs"], args.resume)
    shape = f"MiniCPM-2B-128k shape, {args.layers or 40} layers, random weights"
    report: dict = {
        "benchmark": "cpu_real_shape",
        "shape": shape,
        "layers": args.layers or 40,
        "machine": machine(),
        "rounds": args.rounds,
        "dir": str(paths["root"]),
        "rope_scaling_dropped_by_converter": manifest.get("rope_scaling_dropped"),
        "llama.cpp": {
            "build": str(args.llama_cpp),
            "ggml_libraries": str(args.llama_lib or "its own"),
            "note": libs.get("note"),
        },
        "sections": {},
    }
    plain_rope = "llama.cpp runs this model with plain RoPE past 64k (its converter drops MiniCPM's dynamic scaling)"
    if "decode" in args.only:
        rows = measure_formats(args, paths, runs, "decode", {"task": "decode", "new_tokens": args.new_tokens})
        report["sections"]["decode"] = {
            "what": f"batch 1, {args.new_tokens} tokens after {PROMPT}; minicpm {args.dtype} activations",
            "labels": FORMAT_LABELS,
            "rows": summarize_rows(rows, "tok_s"),
        }
    if "decodepaired" in args.only:
        report["sections"]["decodepaired"] = {
            "what": f"batch 1, {args.new_tokens} tokens after {PROMPT}, both systems loaded, {args.pairs} pairs; "
            "ratio: the median of the pairs' ratios",
            "labels": FORMAT_LABELS,
            "rows": measure_paired(args, paths, runs),
        }
    for section, length in (("prefill2k", args.prefill_short), ("prefill32k", args.prefill_long)):
        if section in args.only:
            rows = measure_formats(args, paths, runs, section, {"task": "prefill", "length": length})
            report["sections"][section] = {
                "what": f"time to first token, {length}-token prompt; KV bfloat16 / f16",
                "labels": FORMAT_LABELS,
                "rows": summarize_rows(rows, "seconds"),
                "notes": [plain_rope] if length > 65536 else [],
            }
    if "decode32k" in args.only:
        rows = measure_depth(args, paths, runs)
        fill = "timing-only fast path (random codes written into the blocks)"
        notes = [
            f"minicpm's cache: {fill if args.minicpm_fill == 'fast' else 'real prefill'}; "
            "llama.cpp: a real prefill in llama-server (or its slot restored from a saved real prefill)"
            + (
                "; where none of this depth is saved, timing-only: the deepest saved real prefill's cache "
                "repeated to the depth (each run's extended_from)"
                if args.llama_fill == "extend"
                else ""
            )
        ]
        if args.depth > 65536:
            notes.append(plain_rope)
        report["sections"]["decode32k"] = {
            "what": f"batch 1, {args.new_tokens} tokens at {args.depth} of context; weights {args.depth_weights}; "
            "KV minicpm:llama.cpp",
            "labels": {},
            "rows": summarize_rows(rows, "tok_s"),
            "notes": notes,
        }
    if "capacity" in args.only:
        cap = summarize_capacity(args, measure_capacity(args, paths, runs))
        cap["notes"] = ["minicpm only; its dynamic NTK base applies past 64k (llama.cpp would run plain RoPE there)"]
        report["sections"]["capacity"] = cap
    end = os.getloadavg()
    report["machine_load_at_end"] = f"load average {end[0]:.2f} (1 min), {end[1]:.2f} (5 min), {end[2]:.2f} (15 min)"
    print_table(report)
    print(json.dumps(report, default=str))


if __name__ == "__main__":
    main()
