"""Peak and resident memory of loading a model, at MiniCPM-2B-128k's shape, beside transformers.

Writes random-weight checkpoints into ``--dir`` (reused when there): bfloat16 safetensors of the
exact MiniCPM-2B-128k shape (40 layers, hidden 2304, vocabulary 122760, untied head: 6.0 GB) with a
synthetic 122760-piece SentencePiece vocabulary, and Q4_0 and Q8_0 GGUFs quantized from it by the
``gguf`` package (every 2-D weight in that type, norms F32; minicpm architecture). Then runs each
case in a fresh child process, one at a time (the user's path: ``LLM.from_pretrained``, i.e. load
and engine preparation, default engine settings):

* ``bf16``: the safetensors with ``dtype="bfloat16"``; ``bin``: the same weights as a
  ``pytorch_model.bin`` (the format MiniCPM-2B-128k ships in);
* ``int8`` / ``int4``: the same checkpoint with ``EngineConfig(quantize=...)`` and the default CPU
  dtype (float32 activations, an untied float32 table); ``int4-bf16``: int4 with bfloat16;
* ``q4_0`` / ``q8_0``: the GGUF as the model with an empty cache, so the first use: conversion
  into the cache, then the load, in one process (the conversion's peak is read when it returns);
  ``q4_0-cached`` / ``q8_0-cached``: the same file again, the load alone; the cache entry's size
  beside the GGUF's;
* ``hf``: transformers' ``AutoModelForCausalLM.from_pretrained`` (bfloat16) on a Llama config
  beside the same safetensors file (the peer), then a one-token forward: it may leave weights as
  pages of the file that are read on first use (``loaded_rss`` is its RSS before the forward).

Per case: peak RSS (``VmHWM``), RSS right after the load (``VmRSS``), the RSS before it (torch and
the loader imported), peak / resident and the same above that baseline, and seconds. The target
(``--target``, 1.3): every case's peak at most that times its resident RSS, and every cache entry
no larger than its GGUF; the exit status is 1 where one is missed. Prints a table, then one JSON
object as the last line. ``--tree`` / ``--peer`` run the children against another source tree or
git revision; ``--versus`` runs each case there too, just before ours (the "before" figures,
measured under the same load as ours).

    python benchmarks/load_memory.py [--dir /tmp/minicpm-load-memory] [--cases ...] [--tree PATH]
    python benchmarks/load_memory.py --tiny      # every case at a small shape, seconds (tests)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from cpu_mixed import ROOT, peer_tree, run_child

GB = 1e9
CASES = ("bf16", "bin", "int8", "int4", "int4-bf16", "q4_0", "q4_0-cached", "q8_0", "q8_0-cached", "hf")
LOADS = {  # case -> (checkpoint, dtype, quantize)
    "bf16": ("bf16", "bfloat16", "auto"),
    "bin": ("bin", "bfloat16", "auto"),
    "int8": ("bf16", None, "int8"),
    "int4": ("bf16", None, "int4"),
    "int4-bf16": ("bf16", "bfloat16", "int4"),
    "q4_0": ("Q4_0", None, "auto"),
    "q4_0-cached": ("Q4_0", None, "auto"),
    "q8_0": ("Q8_0", None, "auto"),
    "q8_0-cached": ("Q8_0", None, "auto"),
}
MEDIUM_SHAPE = {  # 168 M parameters, 337 MB in bfloat16 (the test suite's bound on the peak)
    "hidden_size": 1024,
    "intermediate_size": 2816,
    "num_hidden_layers": 8,
    "num_attention_heads": 16,
    "num_key_value_heads": 16,
    "vocab_size": 32000,
    "dim_model_base": 128,
}
TINY_SHAPE = {
    "hidden_size": 256,
    "intermediate_size": 640,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "vocab_size": 4096,
    "dim_model_base": 32,
}


# ------------------------------------------------------------------------------------- children
def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def child(spec: dict) -> dict:
    """One case in this (fresh) process: what it measured."""
    import torch

    if spec["case"] == "warm":  # builds the native kernels into the cache, once, before any case
        from minicpm.engine.cpu_kernels import native_kernels

        return {"kernels": native_kernels() is not None, "torch": torch.__version__}
    if spec["case"] == "write-bin":  # here, so that the parent never holds the whole state dict
        from minicpm.weights import iter_tensors, weight_files

        src, dst = Path(spec["src"]), Path(spec["dst"])
        tmp = dst.with_name(dst.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(src, tmp, ignore=shutil.ignore_patterns("*.safetensors"))
        torch.save(dict(iter_tensors(weight_files(src))), tmp / "pytorch_model.bin")
        tmp.rename(dst)
        return {}
    if spec["case"] == "hf":
        import transformers

        base = _status("VmRSS")
        start = time.perf_counter()
        model = transformers.AutoModelForCausalLM.from_pretrained(spec["path"], dtype=torch.bfloat16)
        out = {"seconds": time.perf_counter() - start, "loaded_rss": _status("VmRSS")}
        with torch.no_grad():  # its weights may still be pages of the file not read yet: one token reads them all
            model(torch.tensor([[1]]))
        out["params"] = sum(p.numel() for p in model.parameters())
        return out | {"base": base, "peak": _status("VmHWM"), "resident": _status("VmRSS")}

    from minicpm import LLM
    from minicpm.default_model import resolve_model_path
    from minicpm.engine import EngineConfig

    path, out = Path(spec["path"]), {}
    base = _status("VmRSS")
    start = time.perf_counter()
    if spec.get("first_use"):
        resolved = resolve_model_path(path)  # converts it into the (empty) cache
        out["convert_seconds"] = time.perf_counter() - start
        out["convert_peak"] = _status("VmHWM")
        out["cache_bytes"] = sum(f.stat().st_size for f in resolved.rglob("*") if f.is_file())
    llm = LLM.from_pretrained(path, dtype=spec["dtype"], device="cpu", engine_config=EngineConfig(quantize=spec["q"]))
    out["seconds"] = time.perf_counter() - start
    assert llm.model is not None
    return out | {"base": base, "peak": _status("VmHWM"), "resident": _status("VmRSS")}


# ------------------------------------------------------------------------------------ checkpoints
def shape(name: str) -> dict:
    from minicpm.config import MINICPM_2B_128K

    return MINICPM_2B_128K | {"tiny": TINY_SHAPE, "medium": MEDIUM_SHAPE, "full": {}}[name]


def vocabulary(size: int) -> tuple[list[str], list[float], list[int]]:
    """A synthetic SentencePiece vocabulary: <unk> <s> </s>, 256 byte pieces, then made-up words."""
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256))]
    types = [2, 3, 3, *[6] * 256]
    letters = "abcdefghijklmnopqrstuvwxyz"
    i = 0
    while len(tokens) < size:
        word, n = "", i
        while True:
            word, n = letters[n % 26] + word, n // 26
            if not n:
                break
        tokens.append("\u2581" + word)
        types.append(1)
        i += 1
    return tokens, [-float(i) for i in range(size)], types


def write_tokenizer(path: Path, tokens: list[str], scores: list[float], types: list[int]) -> None:
    from sentencepiece import sentencepiece_model_pb2 as spm_pb

    proto = spm_pb.ModelProto()
    for piece, score, kind in zip(tokens, scores, types, strict=True):
        entry = proto.pieces.add()
        entry.piece, entry.score, entry.type = piece, score, kind
    proto.trainer_spec.model_type = spm_pb.TrainerSpec.BPE
    proto.trainer_spec.vocab_size = len(tokens)
    proto.trainer_spec.byte_fallback = True
    proto.trainer_spec.unk_id, proto.trainer_spec.bos_id, proto.trainer_spec.eos_id = 0, 1, 2
    proto.normalizer_spec.name = "identity"
    (path / "tokenizer.model").write_bytes(proto.SerializeToString())
    config = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": True, "legacy": True}
    (path / "tokenizer_config.json").write_text(json.dumps(config | {"tokenizer_class": "LlamaTokenizer"}))


def random_bf16_weights(config: dict, seed: int = 0) -> tuple[list[str], Iterator]:
    """(every tensor's name, a generator of (name, tensor)): random N(0, 0.02) bfloat16 weights
    (norms 1) of ``config``'s shape, made a tensor at a time as the generator is read."""
    import torch

    from minicpm import MiniCPMConfig
    from minicpm.weights import expected_shapes

    shapes = expected_shapes(MiniCPMConfig.from_dict(config))
    gen = torch.Generator().manual_seed(seed)

    def weights() -> Iterator:
        for name, dims in shapes.items():
            if name.endswith("norm.weight"):
                yield name, torch.ones(dims, dtype=torch.bfloat16)
            else:
                yield name, (torch.randn(dims, generator=gen) * 0.02).to(torch.bfloat16)

    return list(shapes), weights()


def write_bf16(path: Path, config: dict, seed: int = 0) -> None:
    """Random N(0, 0.02) bfloat16 weights (norms 1) of ``config``'s shape, a tensor at a time."""
    from minicpm.weights import save_checkpoint

    names, weights = random_bf16_weights(config, seed)
    tmp = path.with_name(path.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_checkpoint(weights, config, tmp, max_shard_bytes=2**40, names=names)
    write_tokenizer(tmp, *vocabulary(config["vocab_size"]))
    tmp.rename(path)


def _gguf_name(name: str) -> str:
    """The GGUF tensor name of our ``name``: the converter's mapping, read backwards."""
    from minicpm.convert import GGUF_LAYER_NAMES, GGUF_TENSOR_NAMES

    top = {ours: theirs for theirs, ours in GGUF_TENSOR_NAMES.items()}
    if name in top:
        return top[name]
    _, _, layer, *rest = name.split(".")
    short = {ours: theirs for theirs, ours in GGUF_LAYER_NAMES.items()}
    return f"blk.{layer}.{short['.'.join(rest[:-1])]}.weight"


def write_gguf(src: Path, dst: Path, kind: str) -> None:
    """``src``'s weights as a GGUF of ``kind`` (every 2-D weight; norms F32), written a tensor at a
    time, with llama.cpp's Q/K row order and the same vocabulary."""
    import gguf
    import numpy as np
    import torch

    from minicpm import MiniCPMConfig
    from minicpm.weights import stored_tensors, weight_files

    config = MiniCPMConfig.from_pretrained(src)
    qtype = gguf.GGMLQuantizationType[kind]
    entries = stored_tensors(weight_files(src))
    tmp = dst.with_name(dst.name + ".partial")
    writer = gguf.GGUFWriter(str(tmp), "minicpm")
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_embedding_scale(config.scale_emb)
    writer.add_residual_scale(config.scale_depth / math.sqrt(config.num_hidden_layers))
    writer.add_logit_scale(config.hidden_size / config.dim_model_base)
    tokens, scores, types = vocabulary(config.vocab_size)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    for e in entries:
        if len(e.shape) == 2:
            rows, cols = e.shape
            writer.add_tensor_info(
                _gguf_name(e.name), (rows, cols // block * size), np.uint8, rows * cols // block * size, qtype
            )
        else:
            writer.add_tensor_info(_gguf_name(e.name), e.shape, np.float32, e.numel * 4)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for e in entries:
        if len(e.shape) == 1:
            writer.write_tensor_data(e.read(torch.float32).numpy())
            continue
        heads = {"q_proj": config.num_attention_heads, "k_proj": config.num_key_value_heads}.get(e.name.split(".")[-2])
        if heads:  # llama.cpp's permutation of Q / K rows (its converter's)
            w = e.read(torch.float32).numpy()
            w = w.reshape(heads, 2, w.shape[0] // heads // 2, w.shape[1]).swapaxes(1, 2).reshape(w.shape)
            writer.write_tensor_data(gguf.quants.quantize(w, qtype))
            continue
        parts = [gguf.quants.quantize(e.rows(a, b).float().numpy(), qtype) for a, b in e.row_ranges(2**25)]
        writer.write_tensor_data(np.concatenate(parts))
    writer.close()
    tmp.rename(dst)


def write_llama(src: Path, dst: Path) -> None:
    """A Llama config.json beside (a link to) ``src``'s safetensors: the transformers peer."""
    import transformers

    c = json.loads((src / "config.json").read_text())
    hf = transformers.LlamaConfig(
        vocab_size=c["vocab_size"],
        hidden_size=c["hidden_size"],
        intermediate_size=c["intermediate_size"],
        num_hidden_layers=c["num_hidden_layers"],
        num_attention_heads=c["num_attention_heads"],
        num_key_value_heads=c["num_key_value_heads"],
        max_position_embeddings=c["max_position_embeddings"],
        rms_norm_eps=c["rms_norm_eps"],
        rope_theta=c["rope_theta"],
        tie_word_embeddings=False,
        dtype="bfloat16",
    )
    dst.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(dst)
    link = dst / "model.safetensors"
    if not link.exists():
        link.symlink_to(src / "model.safetensors")


def prepare(root: Path, size: str, cases: list[str]) -> dict[str, Path]:
    """The checkpoints ``cases`` need under ``root``, written where missing."""
    paths = {"bf16": root / "bf16", "Q4_0": root / "model.Q4_0.gguf", "Q8_0": root / "model.Q8_0.gguf"}
    paths |= {"hf": root / "llama", "bin": root / "bin"}
    root.mkdir(parents=True, exist_ok=True)
    if not (paths["bf16"] / "config.json").exists():
        print(f"writing {paths['bf16']} ...", file=sys.stderr, flush=True)
        write_bf16(paths["bf16"], shape(size))
    for kind in ("Q4_0", "Q8_0"):
        if any(LOADS.get(c, ("",))[0] == kind for c in cases) and not paths[kind].exists():
            print(f"writing {paths[kind]} ...", file=sys.stderr, flush=True)
            write_gguf(paths["bf16"], paths[kind], kind)
    if "bin" in cases and not (paths["bin"] / "config.json").exists():
        print(f"writing {paths['bin']} ...", file=sys.stderr, flush=True)
        spec = {"case": "write-bin", "src": str(paths["bf16"]), "dst": str(paths["bin"])}
        run_child(__file__, ["--child", json.dumps(spec)], ROOT, "writing the .bin")
    if "hf" in cases and not (paths["hf"] / "config.json").exists():
        write_llama(paths["bf16"], paths["hf"])
    return paths


# ------------------------------------------------------------------------------------- driver
def run(case: str, paths: dict[str, Path], tree: Path, cache: Path) -> dict:
    """``case`` in a child process running the project at ``tree``, its cache at ``cache``."""
    if case == "hf":
        spec = {"case": case, "path": str(paths["hf"])}
    else:
        checkpoint, dtype, quantize = LOADS[case]
        spec = {"case": case, "path": str(paths[checkpoint]), "dtype": dtype, "q": quantize}
        if case in ("q4_0", "q8_0"):  # the first use: the GGUF's cache entry removed
            spec["first_use"] = True
            for entry in (cache / "gguf").glob(f"{paths[checkpoint].stem}-*"):
                shutil.rmtree(entry)
    os.environ["MINICPM_CACHE"] = str(cache)
    r = run_child(__file__, ["--child", json.dumps(spec)], tree, f"case {case}")
    r["ratio"] = r["peak"] / r["resident"]
    r["ratio_above_base"] = (r["peak"] - r["base"]) / max(r["resident"] - r["base"], 1)
    if "cache_bytes" in r:
        r["gguf_bytes"] = paths[LOADS[case][0]].stat().st_size
    return r


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", default=None, help="where the checkpoints are (written when missing)")
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    p.add_argument("--target", type=float, default=1.3, help="peak RSS at most this times the resident RSS")
    p.add_argument("--tree", default=None, help="run the children against this source tree (e.g. an old commit)")
    p.add_argument("--peer", default=None, metavar="REV", help="run the children at this git revision")
    p.add_argument(
        "--versus",
        default=None,
        metavar="TREE_OR_REV",
        help="each case also at this source tree or git revision, just before ours (alternating: same load)",
    )
    p.add_argument("--tiny", "--quick", action="store_true", help="a small shape, every path in seconds (tests)")
    p.add_argument("--medium", action="store_true", help="a 337 MB bfloat16 checkpoint (the test suite's bound)")
    p.add_argument("--cache", default=None, help="MINICPM_CACHE of the children (default: DIR/cache-<tree>)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    sys.path.insert(0, str(ROOT))
    cases = [c for c in args.cases if c != "hf" or _has("transformers")]
    size = "tiny" if args.tiny else "medium" if args.medium else "full"
    root = Path(args.dir or f"/tmp/minicpm-load-memory{'' if size == 'full' else '-' + size}")
    tree = Path(args.tree).resolve() if args.tree else peer_tree(args.peer) if args.peer else ROOT
    cache = Path(args.cache or root / f"cache-{tree.name}")  # GGUF conversions, the native kernels' build
    versus = None
    if args.versus:
        versus = Path(args.versus).resolve() if Path(args.versus).is_dir() else peer_tree(args.versus)
    paths = prepare(root, size, cases)
    warm = {}
    for where in (versus, tree) if versus else (tree,):
        os.environ["MINICPM_CACHE"] = str(root / f"cache-{where.name}" if where == versus else cache)
        warm = run_child(__file__, ["--child", json.dumps({"case": "warm"})], where, "the kernels' build")
    results, before = {}, {}
    for case in cases:
        if versus is not None and case != "hf":  # the peer is the same code at both
            before[case] = run(case, paths, versus, root / f"cache-{versus.name}")
            print(f"{case} at {versus}: {json.dumps(before[case])}", file=sys.stderr, flush=True)
        results[case] = run(case, paths, tree, cache)
        print(f"{case}: {json.dumps(results[case])}", file=sys.stderr, flush=True)
    targets = {f"{c}: peak <= {args.target} x resident": r["ratio"] <= args.target for c, r in results.items()}
    for c, r in results.items():
        if "cache_bytes" in r:
            targets[f"{c}: cache entry <= the GGUF"] = r["cache_bytes"] <= r["gguf_bytes"]
    if versus is not None:
        print(f"at {versus}:")
        print_table(before, paths)
        print(f"at {tree}:")
    print_table(results, paths)
    for target, met in targets.items():
        print(f"{'met' if met else 'NOT met':8s} {target}")
    report = {
        "benchmark": "load_memory",
        "shape": size,
        "tree": str(tree),
        "native_kernels": warm["kernels"],
        "checkpoint_bytes": sum(f.stat().st_size for f in paths["bf16"].glob("*.safetensors")),
        "results": results,
        "targets": targets,
    }
    if versus is not None:
        report |= {"versus": str(versus), "versus_results": before}
    print(json.dumps(report))
    sys.exit(0 if all(targets.values()) else 1)


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def print_table(results: dict, paths: dict) -> None:
    print(f"{'case':12s} {'peak GB':>8s} {'resident':>8s} {'ratio':>6s} {'base GB':>8s} {'above base':>10s} {'s':>7s}")
    for c, r in results.items():
        print(
            f"{c:12s} {r['peak'] / GB:8.2f} {r['resident'] / GB:8.2f} {r['ratio']:6.2f} {r['base'] / GB:8.2f} "
            f"{r['ratio_above_base']:10.2f} {r['seconds']:7.1f}"
        )
    for c, r in results.items():
        if "cache_bytes" in r:
            print(
                f"{c}: conversion peak {r['convert_peak'] / GB:.2f} GB in {r['convert_seconds']:.1f} s "
                f"({r['convert_peak'] / r['resident']:.2f} x the loaded resident); cache entry "
                f"{r['cache_bytes'] / 2**30:.3f} GiB, the GGUF {r['gguf_bytes'] / 2**30:.3f} GiB"
            )


if __name__ == "__main__":
    main()
