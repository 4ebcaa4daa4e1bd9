"""benchmarks/gpu_engine.py in its tiny CPU mode: every measurement path runs, the last line is the JSON.

The full run needs an H100/H200; here the tiny shape exercises the same code (model built on the meta
device, the HF peer sharing its weights, the engine's eager paths) in a few seconds.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_engine.py"


def run_benchmark(
    script: str, *args: str, cache: Path | None = None, timeout: float = 300
) -> subprocess.CompletedProcess:
    """benchmarks/``script`` with ``args`` in a child process (``MINICPM_CACHE`` = ``cache`` if given)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # other tests set it in-process
    env["PYTHONUNBUFFERED"] = "1"
    if cache is not None:
        env["MINICPM_CACHE"] = str(cache)
    return subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def run_script(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return run_benchmark(SCRIPT.name, *args, timeout=timeout)


def last_json(proc: subprocess.CompletedProcess) -> dict:
    assert proc.returncode == 0, f"rc {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    lines = proc.stdout.strip().splitlines()
    assert lines, "no output"
    return json.loads(lines[-1])


def positive(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and x > 0


@pytest.fixture(scope="module")
def tiny() -> dict:
    pytest.importorskip("transformers")
    return last_json(run_script("--tiny", "--device", "cpu"))


def test_tiny_run_reports_every_figure_for_both_systems(tiny: dict) -> None:
    for key in (
        "benchmark",
        "device",
        "dtype",
        "tiny",
        "model",
        "weights_gib",
        "kv_bytes_per_token",
        "copy_bandwidth_tb_s",
        "bandwidth_scale",
        "engine",
        "prefill",
        "decode",
        "batch",
        "targets",
        "targets_judged",
        "hf_note",
        "errors",
    ):
        assert key in tiny, key
    assert tiny["benchmark"] == "gpu_engine"
    assert tiny["device"] == "cpu" and tiny["tiny"] is True and tiny["dtype"] == "float32"
    assert tiny["errors"] == []
    assert positive(tiny["copy_bandwidth_tb_s"]) and positive(tiny["weights_gib"])
    engine = tiny["engine"]
    assert positive(engine["kv_pool_gib"]) and engine["cuda_graphs"] == 0
    assert engine["attention"].startswith("cpu-")  # on CPU, never the GPU's backends
    assert engine["kv_capacity_tokens"] >= engine["max_model_len"] == tiny["model"]["max_length"]

    assert [r["context"] for r in tiny["prefill"]] == [256, 512, 1024]
    for row in tiny["prefill"]:
        assert 0 < row["tokens"] <= row["context"]
        for key in ("ours_s", "hf_s", "speedup"):
            assert positive(row[key]), (key, row)
        assert row["ours_peak_gib"] is None and row["hf_peak_gib"] is None  # peak memory is CUDA-only
    # 1024 tokens + new tokens don't fit the tiny 1024-token context: the prompt is shortened
    assert tiny["prefill"][-1]["tokens"] < 1024

    assert [r["context"] for r in tiny["decode"]] == [128, 512, 1024]
    for row in tiny["decode"]:
        for key in ("ours_ms", "hf_ms", "speedup"):
            assert positive(row[key]), (key, row)
        assert row["ours_new_tokens"] >= 2 and row["hf_new_tokens"] >= 2

    batch = tiny["batch"]
    assert batch["batch"] == 4 and batch["context"] == 128
    for key in ("ours_tok_s", "hf_tok_s", "speedup", "ours_prefill_s", "hf_prefill_s"):
        assert positive(batch[key]), (key, batch)

    mixed = tiny["mixed"]  # the batch decoding while a 512-token prompt prefills beside it
    assert mixed["batch"] == 4 and mixed["long_prompt"] == 512 and mixed["to_measure_on_gpu"] is True
    for key in ("itl_alone_ms", "itl_during_ms", "itl_during_max_ms", "long_ttft_s"):
        assert positive(mixed[key]), (key, mixed)
    assert 1 <= mixed["prefill_steps"] <= 4  # admitted at once, prefilled in chunks beside the decoders


def test_tiny_run_lists_the_targets_without_judging_them(tiny: dict) -> None:
    assert tiny["targets_judged"] is False
    assert len(tiny["targets"]) == 5
    for t in tiny["targets"]:
        assert t["pass"] is None
        assert t["op"] in ("<=", ">=") and positive(t["target_h200"])
    assert [t["target_h200"] for t in tiny["targets"]] == [2.5, 16.0, 8.0, 3.0, 6000.0]


def test_skip_hf_and_flags() -> None:
    out = last_json(
        run_script(
            "--tiny",
            "--device",
            "cpu",
            "--skip-hf",
            "--contexts",
            "200",
            "--batch",
            "0",
            "--new-tokens",
            "3",
            "--json-only",
        )
    )
    assert out["transformers"] is None and out["hf_note"] is None
    (prefill,) = out["prefill"]
    (decode,) = out["decode"]
    assert prefill["context"] == decode["context"] == 200 and prefill["tokens"] == 200
    assert positive(prefill["ours_s"]) and prefill["hf_s"] is None and prefill["speedup"] is None
    assert positive(decode["ours_ms"]) and decode["ours_new_tokens"] == 3 and decode["hf_ms"] is None
    assert out["batch"]["ours_tok_s"] is None and out["batch"]["hf_tok_s"] is None


def test_refuses_a_cpu_without_tiny() -> None:
    proc = run_script("--device", "cpu", timeout=60)
    assert proc.returncode != 0
    assert "not a GPU" in proc.stderr and "--tiny" in proc.stderr


def test_serve_bench_runs_against_minicpm_serve(default_model_dir: Path, capsys, monkeypatch) -> None:
    import serve_bench

    monkeypatch.setenv("MINICPM_CACHE", str(default_model_dir.parent))
    args = ["--num-prompts", "3", "--concurrency", "2", "--input-len", "20", "--output-len", "4", "--rounds", "1"]
    assert serve_bench.main(args) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    figures = report["results"]["minicpm"]["median"]
    assert figures["completed"] == 3 and figures["failed"] == 0
    assert figures["output_throughput"] > 0 and 0 < figures["mean_ttft_ms"] <= figures["mean_e2el_ms"]


def test_cpu_formats_tiny_run_measures_every_path(default_model_dir: Path) -> None:
    """benchmarks/cpu_formats.py --tiny, minicpm's side alone: decode (quiet and with a core taken),
    memory, perplexity and prefill, each in its own process; the report's last line is the JSON."""
    proc = run_benchmark("cpu_formats.py", "--tiny", "--llama-python", "none", cache=default_model_dir.parent)
    report = last_json(proc)
    assert report["benchmark"] == "cpu_formats" and report["tiny"] and report["llama.cpp"] is False
    for fmt in ("float32", "shipped"):
        row = report["decode"][fmt]
        assert positive(row["minicpm"]["median"]) and row["fused"] is True
        assert report["memory"][fmt]["minicpm"]["model_bytes"] > 0
        assert positive(report["perplexity"][fmt]["minicpm"]["ppl"])
        assert set(report["prefill"][f"minicpm {fmt}"]) == {"128/quiet", "128/loaded"}
    loaded = report["loaded"]["minicpm"]
    assert loaded["kept"] == loaded["loaded"] / loaded["quiet"]
    assert report["targets"]["decode_loaded_at_least_half_quiet"] is (loaded["kept"] >= 0.5)
    assert "target decode_loaded_at_least_half_quiet" in proc.stdout


def test_cpu_attention_quick_run_times_ours_and_sdpa_like_for_like() -> None:
    """benchmarks/cpu_attention.py --quick: both systems run each case in their own process, our
    output is checked against sdpa's, and the JSON carries every figure the table shows."""
    report = last_json(run_benchmark("cpu_attention.py", "--quick", "--reps", "2"))
    assert report["benchmark"] == "cpu_attention" and report["failures"] == []
    assert [(r["shape"], r["dtype"]) for r in report["results"]] == [
        ("minicpm-2b-128k", "bfloat16"),
        ("smollm2-135m", "float32"),
    ]
    for row in report["results"]:
        for system in ("minicpm", "sdpa"):
            figures = row[system]
            assert positive(figures["ms"]) and positive(figures["gb_s"])
            layers = 40 if row["shape"] == "minicpm-2b-128k" else 30
            assert figures["model_ms_per_token"] == pytest.approx(figures["ms"] * layers)
        assert row["minicpm"]["error"] <= (2e-2 if row["dtype"] == "bfloat16" else 1e-5)
        assert row["speedup_vs_sdpa"] == pytest.approx(row["sdpa"]["ms"] / row["minicpm"]["ms"])


def test_cpu_attention_paired_times_every_format_in_one_process() -> None:
    """--paired: each round's process times the activation dtype's cache and each quantized
    format in turn; a speed-up is the median of the cycles' ratios (within their range, one per
    call of every round), and each format's output is checked against sdpa."""
    out = run_benchmark("cpu_attention.py", "--quick", "--paired", "--kv-cache-dtype", "int8,int4", "--reps", "3")
    report = last_json(out)
    assert report["paired"] is True and report["failures"] == []
    assert [(r["shape"], r["dtype"]) for r in report["results"]] == [
        ("minicpm-2b-128k", "bfloat16"),
        ("smollm2-135m", "float32"),
    ]
    for row in report["results"]:
        assert positive(row["auto"]["ms"]) and row["auto"]["error"] <= (2e-2 if row["dtype"] == "bfloat16" else 1e-5)
        for fmt in ("int8", "int4"):
            f = row[fmt]
            assert positive(f["ms"]) and f["error"] <= (2e-2 if row["dtype"] == "bfloat16" else 1e-5)
            lo, hi = f["speedup_range"]
            assert 0 < lo <= f["speedup"] <= hi and len(f["speedup_by_round"]) == 1
        assert "targets" not in row  # the targets are judged at 32k and 128k only
    refused = run_benchmark("cpu_attention.py", "--quick", "--paired")  # nothing to pair
    assert refused.returncode == 2 and "--paired times --kv-cache-dtype formats" in refused.stderr


def test_cpu_attention_paired_child_times_a_peer_kernel_in_the_same_cycles() -> None:
    """--paired --peer's child: the peer's C sources (here this tree's own) built into a second
    library in the same process and timed on every format in the same cycles; each of its outputs
    checked against sdpa, each cycle's peer time over ours recorded per format."""
    from minicpm.engine.cpu_kernels import CSRC

    case = json.dumps(["minicpm-2b-128k", "bfloat16", 1, 1024])
    argv = ["--child", "paired", "--case", case, "--kv", "int8,int4", "--reps", "4", "--peer-csrc", str(CSRC)]
    got = last_json(run_benchmark("cpu_attention.py", *argv))
    for kv in ("auto", "int8", "int4"):
        assert positive(got[kv]["ms"]) and positive(got[kv]["peer"]["ms"])
        assert got[kv]["error"] <= 2e-2 and got[kv]["peer"]["error"] <= 2e-2
        assert len(got[kv]["vs_peer"]) == 4 and all(r > 0 for r in got[kv]["vs_peer"])
        # the peer is this tree's own sources: the same kernel on the same cache, so the same output
        assert got[kv]["peer"]["error"] == got[kv]["error"]
    # every format's paged cache counted (one row of 1,024 tokens, 36 kv heads of 64): the share the
    # table gives of them on huge pages is over these bytes (how much Linux gives is the host's)
    from minicpm.engine.attention.kv_format import FORMATS

    per_token = sum(36 * (FORMATS[f].bytes_per_row(64) + FORMATS[f].bytes_per_row(64, True)) for f in ("int8", "int4"))
    assert got["pages"]["paged_bytes"] == 1024 * (per_token + 36 * 2 * 64 * 2)  # + the bfloat16 cache
    lacking = run_benchmark("cpu_attention.py", *argv[:-1], str(CSRC.parent))  # no kernel sources there
    assert lacking.returncode != 0 and "lacks minicpm.h" in lacking.stderr


def test_load_memory_peak_stays_within_1_3x_of_what_the_load_keeps(tmp_path: Path) -> None:
    """A 337 MB bfloat16 checkpoint (random weights, 168 M parameters) loaded in a fresh process the
    user's way (``LLM.from_pretrained``: load and engine preparation), from safetensors and from a
    ``pytorch_model.bin`` in bfloat16, and quantized to int4: the peak RSS above the process's RSS
    before loading is within 1.3x of what the load leaves resident above it (at 2f146cc, before the
    load went tensor by tensor: 1.89x, 1.90x and 3.76x)."""
    cache = os.environ.get("MINICPM_CACHE") or str(Path.home() / ".cache" / "minicpm")  # the kernels' build
    args = ["--medium", "--dir", str(tmp_path), "--cache", cache, "--cases", "bf16", "bin", "int4"]
    report = last_json(run_benchmark("load_memory.py", *args, timeout=600))
    assert report["shape"] == "medium" and report["checkpoint_bytes"] > 300e6
    spec = importlib.util.spec_from_file_location("load_memory", ROOT / "benchmarks" / "load_memory.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    from minicpm.config import MiniCPMConfig
    from minicpm.plan import quantized_weight_bytes

    int4 = quantized_weight_bytes(MiniCPMConfig.from_dict(module.shape("medium")), "bfloat16", "int4", None)
    held = {"bf16": report["checkpoint_bytes"], "bin": report["checkpoint_bytes"], "int4": int4}
    for case in ("bf16", "bin", "int4"):
        r = report["results"][case]
        assert r["resident"] - r["base"] > 0.9 * held[case], (case, r)  # the weights are in memory of their own
        assert r["ratio_above_base"] <= 1.3, (case, r)


def test_load_memory_tiny_run_converts_a_gguf_into_no_more_room_than_the_file(tmp_path: Path) -> None:
    """The benchmark's GGUF paths at a small shape: the first use (conversion into the cache, then
    the load), the cached load, and transformers' load as the peer where it is installed."""
    args = ["--tiny", "--dir", str(tmp_path), "--cases", "q4_0", "q4_0-cached", "q8_0", "hf"]
    report = last_json(run_benchmark("load_memory.py", *args, timeout=300))
    results = report["results"]
    assert report["shape"] == "tiny" and all(report["targets"].values())
    for case in ("q4_0", "q8_0"):
        r = results[case]
        assert 0 < r["cache_bytes"] <= r["gguf_bytes"] and r["convert_peak"] >= r["base"], (case, r)
        assert positive(r["convert_seconds"]) and positive(r["seconds"])
    assert "cache_bytes" not in results["q4_0-cached"]
    assert ("hf" in results) == (importlib.util.find_spec("transformers") is not None)


def test_ab_compares_every_figure_of_two_trees(monkeypatch, capsys) -> None:
    """benchmarks/ab.py: the figures of each tree's runs by JSON path, medians and ranges, this
    tree over the peer (a zero peer median has no ratio), one JSON object last."""
    import ab

    runs = {
        "this": [{"a": {"x": 2.0, "ok": True}, "z": 0}, {"a": {"x": 4.0}, "z": 0}],
        "peer": [{"a": {"x": 1.0}, "z": 0}] * 2,
    }
    monkeypatch.setattr(ab, "peer_tree", lambda rev: Path("/peer"))
    monkeypatch.setattr(
        ab, "run", lambda tree, script, argv, timeout: runs["peer" if tree == Path("/peer") else "this"].pop()
    )
    monkeypatch.setattr(Path, "exists", lambda self: True)
    monkeypatch.setattr("sys.argv", ["ab.py", "--peer", "HEAD", "--rounds", "2", "--", "benchmarks/x.py", "--quick"])
    ab.main()
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    x = report["figures"]["a.x"]
    assert x["this"] == {"median": 3.0, "min": 2.0, "max": 4.0} and x["ratio"] == 3.0
    assert report["figures"]["z"]["ratio"] is None and "a.ok" not in report["figures"]
    assert report["command"] == ["benchmarks/x.py", "--quick"]


def test_cpu_real_shape_tokenizer_has_the_checkpoints_vocabulary(tmp_path: Path) -> None:
    """benchmarks/cpu_real_shape.py's SentencePiece model: 122,760 pieces, the special ids and the 7
    added tokens where MiniCPM-2B-128k has them, and text that encodes and decodes back."""
    import cpu_real_shape
    import sentencepiece as spm

    from minicpm import Tokenizer

    cpu_real_shape.write_tokenizer(tmp_path)
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "tokenizer.model"))
    assert sp.get_piece_size() == 122760
    assert [sp.id_to_piece(i) for i in range(3)] == ["<unk>", "<s>", "</s>"]
    assert {piece: sp.piece_to_id(piece) for piece in cpu_real_shape.ADDED_TOKENS} == cpu_real_shape.ADDED_TOKENS
    assert json.loads((tmp_path / "added_tokens.json").read_text()) == cpu_real_shape.ADDED_TOKENS
    tokenizer = Tokenizer.from_pretrained(tmp_path)
    ids = tokenizer.encode("<|im_start|>user\nhello world<|im_end|>")
    assert ids[:2] == [1, 122757] and ids[-1] == 122753
    assert tokenizer.decode(ids).endswith("<|im_start|> user\nhello world<|im_end|>")


def _tiny_real_shape_engine(kv: str, kv_tokens: int):
    import torch

    from minicpm import MiniCPMConfig, MiniCPMForCausalLM
    from minicpm.config import MINICPM_2B_128K
    from minicpm.engine import EngineConfig, LLMEngine
    from minicpm.engine.attention.kv_format import FORMATS

    sizes = {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 2}
    config = MiniCPMConfig.from_dict(MINICPM_2B_128K | sizes | {"num_key_value_heads": 2, "dim_model_base": 32})
    torch.manual_seed(0)
    model = MiniCPMForCausalLM(config).to(torch.bfloat16).eval()
    per_token = FORMATS[kv].bytes_per_token(2, 2, 64)
    engine_config = EngineConfig(
        kv_cache_dtype=kv, kv_cache_memory=kv_tokens * per_token, block_size=128, enable_prefix_caching=False
    )
    return LLMEngine(model, None, engine_config)


@pytest.mark.parametrize("kv", ["bfloat16", "int8", "int4"])
def test_cpu_real_shape_timing_only_fill_decodes_at_its_depth(kv: str) -> None:
    """The timing-only fast path: the sequence is admitted, its blocks are written (codes and
    scales that read back as finite N(0, 1)-like values), and every step after it is one decode
    step that reaches the full context."""
    import cpu_real_shape
    import torch

    engine = _tiny_real_shape_engine(kv, 1024)
    r = cpu_real_shape.decode_at_depth(engine, {"depth": 700, "new_tokens": 4, "fill": "fast"}, 122760)
    assert r["admitted"] and r["fill"] == "fast" and r["contiguous_blocks"]
    assert r["steps"] == 4 and r["context_at_end"] == 704 and positive(r["tok_s"])
    k, v = engine.runner.cache.read(1, slice(0, 699))  # the blocks keep what was written after the sequence ends
    for x in (k, v):
        x = x.float()
        assert torch.isfinite(x).all() and 0.7 < x.std().item() < 1.3


def test_cpu_real_shape_refuses_a_context_the_kv_budget_cannot_hold() -> None:
    import cpu_real_shape

    engine = _tiny_real_shape_engine("int4", 512)
    r = cpu_real_shape.decode_at_depth(engine, {"depth": 700, "new_tokens": 4, "fill": "fast"}, 122760)
    assert r["admitted"] is False and "700 tokens" in r["refused"]


def _slot_file(path: Path, cells: int, rows: list[bytes], v_trans: int = 0, tokens: int | None = None) -> None:
    """A llama.cpp sequence state as llama_state_seq_save_file writes it: one stream, cells at
    positions 0..cells-1 of sequence 0, then each tensor's type, row size and rows."""
    import struct

    n_tok = cells if tokens is None else tokens
    with path.open("wb") as f:
        f.write(struct.pack("<3I", 0x67677371, 3, n_tok) + struct.pack(f"<{n_tok}i", *range(100, 100 + n_tok)))
        f.write(struct.pack("<2I", 1, cells) + b"".join(struct.pack("<iIi", i, 1, 0) for i in range(cells)))
        f.write(struct.pack("<2I", v_trans, len(rows) // 2))
        for i, data in enumerate(rows):
            f.write(struct.pack("<iQ", 8 + i, len(data) // cells) + data)


def test_cpu_real_shape_extends_a_llama_cpp_slot_to_a_deeper_context(tmp_path: Path) -> None:
    """extend_slot: the saved cells' rows repeated (whole copies, then a prefix) to the new depth,
    positions 0..depth-1 of sequence 0, the given ids as the prompt; a file it cannot read is
    refused by name and leaves nothing behind."""
    import struct

    import cpu_real_shape

    cells, widths = 3, [4, 4, 6, 6]  # two layers: keys of 4-byte rows, values of 6
    rows = [bytes(range(10 * i, 10 * i + cells * w)) for i, w in enumerate(widths)]
    src, dst = tmp_path / "m-q4_0-d3.bin", tmp_path / "m-q4_0-d8-from-d3.bin"
    _slot_file(src, cells, rows, tokens=cells + 4)
    ids = list(range(500, 508))
    assert cpu_real_shape.extend_slot(src, dst, ids)["extended_from"] == cells
    data = dst.read_bytes()
    assert struct.unpack_from("<3I", data) == (0x67677371, 3, 8)
    assert list(struct.unpack_from("<8i", data, 12)) == ids
    at = 12 + 32
    assert struct.unpack_from("<2I", data, at) == (1, 8)
    meta = struct.unpack_from("<24i", data, at + 8)
    assert meta[0::3] == tuple(range(8)) and set(meta[1::3]) == {1} and set(meta[2::3]) == {0}
    at += 8 + 96
    assert struct.unpack_from("<2I", data, at) == (0, 2)
    at += 8
    for i, (w, r) in enumerate(zip(widths, rows, strict=True)):
        assert struct.unpack_from("<iQ", data, at) == (8 + i, w)
        assert data[at + 12 : at + 12 + 8 * w] == r + r + r[: 2 * w]
        at += 12 + 8 * w
    assert at == len(data)
    assert cpu_real_shape.shorter_slot(tmp_path, "m", "q4_0", 8) == (src, 3)
    assert cpu_real_shape.shorter_slot(tmp_path, "m", "q4_0", 3) is None
    assert cpu_real_shape.shorter_slot(tmp_path, "m", "q8_0", 8) is None

    bad = tmp_path / "bad.bin"
    out = tmp_path / "out.bin"
    for v_trans, cut, words in ((1, 0, "transposed"), (0, 5, "cut short in tensor 3")):
        _slot_file(bad, cells, rows, v_trans=v_trans)
        bad.write_bytes(bad.read_bytes()[: len(bad.read_bytes()) - cut])
        with pytest.raises(ValueError, match=words):
            cpu_real_shape.extend_slot(bad, out, ids)
        assert not out.exists() and not list(tmp_path.glob(".out.bin.partial-*"))
    with pytest.raises(ValueError, match=r"one stream of 1\.\.2"):
        cpu_real_shape.extend_slot(src, out, ids[:2])


def test_kv_schemes_windowed_attention_is_what_each_decode_step_reads() -> None:
    """benchmarks/kv_schemes.py: a windowed scheme's attention over a whole window equals, row by
    row, a decode at that position over its cache (full groups quantized with their own statistics,
    the partial group in full precision); the per-token quantizers are minicpm's int8 / int4 and
    llama.cpp's q4_0 rule; bytes per token at MiniCPM-2B-128k's shape."""
    import torch
    from kv_schemes import MINICPM_SHAPE, SCHEMES, Scheme, SchemeCache, per_channel, per_token

    from minicpm.engine.attention.kv_format import FORMATS

    torch.manual_seed(0)
    x = torch.randn(1, 3, 40, 64) * torch.rand(64) * 4
    assert torch.equal(per_token(x, SCHEMES["int8"]), FORMATS["int8"].round_trip(x))
    assert torch.equal(per_token(x, SCHEMES["int4-fit-hkv"]), FORMATS["int4"].round_trip(x))  # the engine's keys
    shipped = SCHEMES["int4-fitv64-hkv"]  # and values: the engine's writer in groups of 64
    assert torch.equal(per_token(x, shipped, shipped.value_group), FORMATS["int4"].round_trip(x, value=True))
    g = x.reshape(1, 3, 40, 2, 32)  # "int4": the plain pair, (min, (max - min) / 15) in float16
    lo, step = g.amin(-1, keepdim=True).half().float(), ((g.amax(-1, keepdim=True) - g.amin(-1, keepdim=True)) / 15)
    step = step.half().float()
    plain = torch.clamp(torch.round((g - lo) / step), 0, 15) * step + lo
    assert torch.equal(per_token(x, SCHEMES["int4"]), plain.reshape(x.shape))
    g = torch.tensor([[1.0, -3.0, 0.5, 2.9] * 8])
    assert torch.equal(per_token(g, SCHEMES["q4_0"]), torch.round(g / 0.375).clamp(max=7) * 0.375)  # d = -3 / -8
    for keys in ("channel", "token"):
        s = Scheme("t", 2, keys, window=8)
        q, k, v = torch.randn(1, 6, 21, 64), torch.randn(1, 3, 21, 64), torch.randn(1, 3, 21, 64)
        out = SchemeCache(s, rows=5).attend(0, q, k, v)
        for i in range(21):
            full = (i + 1) // 8 * 8
            kk, vv = k[:, :, : i + 1].clone(), v[:, :, : i + 1].clone()
            kk[:, :, :full] = (per_channel if keys == "channel" else per_token)(k[:, :, :full], s)
            vv[:, :, :full] = per_token(v[:, :, :full], s)
            want = torch.nn.functional.scaled_dot_product_attention(q[:, :, i : i + 1], kk, vv, enable_gqa=True)
            torch.testing.assert_close(out[:, :, i : i + 1], want, rtol=1e-5, atol=1e-5)
    names = ("float32", "int8", "int4", "kivi2-g128", "int4-fitv64-hkv")
    bytes_ = {n: SCHEMES[n].bytes_per_token(**MINICPM_SHAPE) for n in names}
    assert bytes_ == {"float32": 368640, "int8": 195840, "int4": 115200, "kivi2-g128": 60480, "int4-fitv64-hkv": 109440}
    assert bytes_["int4-fitv64-hkv"] == FORMATS["int4"].bytes_per_token(**MINICPM_SHAPE)


def test_kv_schemes_offset_keys_and_paired_errors() -> None:
    """benchmarks/kv_schemes.py's int4-mu: keys less a per-channel mean leave float attention
    unchanged (every score of a query moves by q . mean) and are what gets quantized; the mean is
    recorded per layer and kv head; the paired change and its standard error come from per-token
    log-likelihoods."""
    import math

    import torch
    from kv_schemes import SCHEMES, MeanKeys, SchemeCache, paired_change, per_token

    torch.manual_seed(1)
    q, k, v = torch.randn(1, 6, 17, 64), torch.randn(1, 3, 17, 64) + 5 * torch.rand(64), torch.randn(1, 3, 17, 64)
    recorder = MeanKeys()
    recorder.attend(2, q, k, v)
    mu = recorder.means[2]
    assert mu.shape == (3, 64) and torch.allclose(mu, k[0, :, 1:].mean(dim=1))  # the sink token left out
    sdpa = torch.nn.functional.scaled_dot_product_attention
    plain = sdpa(q, k, v, is_causal=True, enable_gqa=True)
    shifted = sdpa(q, k - mu[None, :, None], v, is_causal=True, enable_gqa=True)
    torch.testing.assert_close(shifted, plain, rtol=1e-5, atol=1e-5)
    s = SCHEMES["int4-mu"]
    got = SchemeCache(s, offsets={2: mu}).attend(2, q, k, v)
    want = sdpa(q, per_token(k - mu[None, :, None], s), per_token(v, s), is_causal=True, enable_gqa=True)
    torch.testing.assert_close(got, want)
    with pytest.raises(ValueError, match="means"):
        SchemeCache(s)
    base = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
    change, se = paired_change(base + torch.tensor([0.1, 0.0, 0.1, 0.0], dtype=torch.float64), base)
    assert change == pytest.approx(100 * math.expm1(0.05)) and se == pytest.approx(
        100 * math.exp(0.05) * 0.05 * math.sqrt(4 / 3) / 2
    )


def test_kv_schemes_rotation_is_exact_in_float_and_what_gets_quantized() -> None:
    """benchmarks/kv_schemes.py's Hadamard schemes (llama.cpp's attn_rot_k / attn_rot_v): the
    matrix is orthonormal and its own inverse, so rotated float attention is attention; what is
    quantized is the rotated keys (and values, the output rotated back)."""
    import torch
    from kv_schemes import SCHEMES, SchemeCache, per_token

    from minicpm.engine.attention.kv_format import hadamard

    h = hadamard(64)
    torch.testing.assert_close(h @ h, torch.eye(64), rtol=0, atol=1e-6)
    assert torch.equal(h, h.T) and set((h * 8).unique().tolist()) == {-1.0, 1.0}
    torch.manual_seed(2)
    q, k, v = torch.randn(1, 4, 19, 64), torch.randn(1, 2, 19, 64), torch.randn(1, 2, 19, 64)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    plain = sdpa(q, k, v, is_causal=True, enable_gqa=True)
    rotated = sdpa(q @ h, k @ h, v @ h, is_causal=True, enable_gqa=True) @ h
    torch.testing.assert_close(rotated, plain, rtol=1e-5, atol=1e-5)
    s = SCHEMES["int4-hkv"]
    got = SchemeCache(s).attend(0, q, k, v)
    want = sdpa(q @ h, per_token(k @ h, s), per_token(v @ h, s), is_causal=True, enable_gqa=True) @ h
    torch.testing.assert_close(got, want)
    keys_only = SchemeCache(SCHEMES["int4-hk"]).attend(0, q, k, v)
    s4 = SCHEMES["int4"]
    torch.testing.assert_close(
        keys_only, sdpa(q @ h, per_token(k @ h, s4), per_token(v, s4), is_causal=True, enable_gqa=True)
    )
