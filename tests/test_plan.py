"""``minicpm plan`` and :mod:`minicpm.plan`: weights, KV cache and budget arithmetic, exact to the byte."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
from helpers import tiny_config

from minicpm.cli import main
from minicpm.config import MINICPM_2B_128K, MiniCPMConfig
from minicpm.plan import (
    FULL_CONTEXT,
    WORKSPACE_BYTES,
    MemoryPlan,
    available_memory,
    cpu_prefill_reads,
    estimate_activation_reserve,
    format_plan,
    parameter_count,
    plan_memory,
)
from minicpm.weights import expected_shapes

GiB = 1024**3

REAL_CONFIG = MINICPM_2B_128K  # the published config.json, at full size
# 40 x (4 x 2304^2 + 3 x 2304 x 5760 + 2 x 2304) non-embedding + final norm 2304
# + embeddings and the untied head, 122760 x 2304 each: "about 3.0 B" on the facts page.
REAL_NON_EMBEDDING = 40 * (4 * 2304**2 + 3 * 2304 * 5760 + 2 * 2304) + 2304
REAL_PARAMETERS = REAL_NON_EMBEDDING + 2 * 122760 * 2304
KV_PER_TOKEN_BF16 = 360 * 1024  # 2 x 40 layers x 2304 x 2 bytes


def hand_count(c: MiniCPMConfig) -> int:
    h, kv = c.hidden_size, c.num_key_value_heads * c.head_dim
    q = c.num_attention_heads * c.head_dim
    layer = h * q + 2 * h * kv + q * h + 3 * h * c.intermediate_size + 2 * h
    head = 0 if c.tie_word_embeddings else c.vocab_size * h
    return c.vocab_size * h + c.num_hidden_layers * layer + h + head


@pytest.fixture
def real_dir(tmp_path: Path) -> Path:
    (tmp_path / "config.json").write_text(json.dumps(REAL_CONFIG))
    return tmp_path


def run_json(capsys, *args: str) -> dict:
    assert main(["plan", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


# --------------------------------------------------------------------------- the real config
def test_real_config_numbers_match_the_facts() -> None:
    assert REAL_NON_EMBEDDING == 2_442_057_984  # "non-embedding 2.442 B"
    assert REAL_PARAMETERS == 3_007_736_064
    config = MiniCPMConfig.from_dict(REAL_CONFIG)
    shapes = expected_shapes(config)
    assert parameter_count(config) == sum(math.prod(s) for s in shapes.values()) == REAL_PARAMETERS
    assert hand_count(config) == REAL_PARAMETERS
    assert shapes["lm_head.weight"] == (122760, 2304)


def test_cli_table_for_128k_in_80_gib(real_dir: Path, capsys) -> None:
    args = ["plan", "--model", str(real_dir), "--context", "131072", "--memory", "80", "--dtype", "bfloat16"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "3,007,736,064" in out
    assert "360 KiB" in out
    assert "45.00 GiB" in out  # KV cache of one 131072-token context
    assert "5.60 GiB" in out  # weights
    assert "80.00 GiB (given)" in out
    rows = dict(re.split(r"\s{2,}", line, maxsplit=1) for line in out.splitlines())
    assert rows["concurrent 131,072-token contexts"] == "1"
    assert rows["one 131,072-token (128k) context fits"] == "yes"
    assert rows["KV cache per token"] == "360 KiB (bfloat16)"
    assert "note:" not in out


def test_cli_json_for_128k_in_80_gib(real_dir: Path, capsys) -> None:
    plan = run_json(capsys, "--model", str(real_dir), "--context", "131072", "--memory", "80", "--dtype", "bfloat16")
    assert plan["dtype"] == "bfloat16" and plan["bytes_per_element"] == 2
    assert plan["parameters"] == REAL_PARAMETERS
    assert plan["weight_bytes"] == 2 * REAL_PARAMETERS == 6_015_472_128  # the "about 6.02 GB" .bin
    assert plan["kv_bytes_per_token"] == KV_PER_TOKEN_BF16 == 368_640
    assert plan["context_kv_bytes"] == 131072 * 368640 == 45 * GiB
    assert plan["context_limit"] == 131072 and plan["context_limit_source"] == "max_length"
    assert plan["context_exceeds_limit"] is False
    assert plan["memory_bytes"] == 80 * GiB and plan["memory_source"] == "given"
    reserve = plan["activation_reserve_bytes"]
    reads = cpu_prefill_reads("bfloat16", 64)  # one kv head where the native prefill kernel runs here
    assert plan["gathered_kv_heads"] == reads.get("gathered_kv_heads")
    assert plan["gathered_tokens"] == reads.get("gathered_tokens")
    config = MiniCPMConfig.from_dict(REAL_CONFIG)
    assert reserve == estimate_activation_reserve(config, "bfloat16", 131072, **reads)
    merge = 8192 * 36 * 64 * 4  # the torch path's float32 running sum over a chunk of 8,192
    if reads.get("gathered_kv_heads") == 1:  # one of 36 kv heads' keys and values packed, not a layer's gathered
        assert estimate_activation_reserve(config, "bfloat16", 131072) - reserve == 35 * 131072 * 2 * 64 * 2 + merge
    else:  # cpu-torch over a bfloat16 cache: read in place, no gather
        assert estimate_activation_reserve(config, "bfloat16", 131072) - reserve == 36 * 131072 * 2 * 64 * 2
    assert plan["kv_budget_bytes"] == 80 * GiB - 2 * REAL_PARAMETERS - reserve
    assert plan["kv_tokens"] == plan["kv_budget_bytes"] // 368640
    assert plan["concurrent_contexts"] == 1 and plan["fits_full_context"] is True
    assert plan["messages"] == [] and plan["checkpoint_bytes"] is None


def test_cli_24_gib_fits_weights_but_not_128k(real_dir: Path, capsys) -> None:
    plan = run_json(capsys, "--model", str(real_dir), "--context", "131072", "--memory", "24", "--dtype", "bfloat16")
    assert plan["kv_budget_bytes"] > 0 and 0 < plan["kv_tokens"] < 131072
    assert plan["concurrent_contexts"] == 0 and plan["fits_full_context"] is False
    assert "one 131072-token context needs 45.00 GiB" in plan["messages"][0]
    plan = run_json(capsys, "--model", str(real_dir), "--context", "32768", "--memory", "24", "--dtype", "bfloat16")
    assert plan["concurrent_contexts"] == plan["kv_tokens"] // 32768 >= 1 and plan["messages"] == []


def test_cli_context_above_the_limit_is_flagged(real_dir: Path, capsys) -> None:
    args = ["plan", "--model", str(real_dir), "--context", "131073", "--memory", "80", "--dtype", "bfloat16"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "EXCEEDS the limit" in out
    assert "note: context 131073 exceeds the model's limit of 131072 tokens" in out
    plan = run_json(capsys, "--model", str(real_dir), "--context", "131073", "--memory", "80", "--dtype", "bfloat16")
    assert plan["context_exceeds_limit"] is True


def test_cli_weights_alone_do_not_fit_in_4_gib(real_dir: Path, capsys) -> None:
    args = ["plan", "--model", str(real_dir), "--context", "131072", "--memory", "4", "--dtype", "bfloat16"]
    assert main(args) == 0
    out = capsys.readouterr().out
    short = 2 * REAL_PARAMETERS - 4 * GiB
    assert f"note: the weights alone (5.60 GiB) do not fit in 4.00 GiB: {short / GiB:.2f} GiB short" in out
    plan = run_json(capsys, "--model", str(real_dir), "--context", "131072", "--memory", "4", "--dtype", "bfloat16")
    assert plan["kv_budget_bytes"] < -short and plan["kv_tokens"] == 0 and plan["concurrent_contexts"] == 0


def test_cli_default_dtype_follows_the_device_and_float32_doubles(real_dir: Path, capsys) -> None:
    cuda = run_json(capsys, "--model", str(real_dir), "--context", "1024", "--memory", "80", "--device", "cuda")
    cpu = run_json(capsys, "--model", str(real_dir), "--context", "1024", "--memory", "80", "--device", "cpu")
    assert cuda["dtype"] == "bfloat16" and cpu["dtype"] == "float32"
    assert cpu["kv_bytes_per_token"] == 2 * KV_PER_TOKEN_BF16 and cpu["weight_bytes"] == 4 * REAL_PARAMETERS
    fp16 = run_json(capsys, "--model", str(real_dir), "--context", "1024", "--memory", "80", "--dtype", "float16")
    assert fp16["kv_bytes_per_token"] == KV_PER_TOKEN_BF16


def test_cli_measures_memory_when_not_given(real_dir: Path, capsys) -> None:
    plan = run_json(capsys, "--model", str(real_dir), "--context", "4096", "--device", "cpu")
    assert plan["memory_bytes"] > 0 and plan["memory_source"] != "given"
    assert plan["kv_budget_bytes"] == plan["memory_bytes"] - plan["weight_bytes"] - plan["activation_reserve_bytes"]


def test_cli_reads_only_config_json_and_reports_the_disk_size(real_dir: Path, capsys) -> None:
    (real_dir / "model.safetensors").write_bytes(b"not a real checkpoint" * 10)  # never opened
    plan = run_json(capsys, "--model", str(real_dir), "--context", "1024", "--memory", "80", "--dtype", "bfloat16")
    assert plan["checkpoint_bytes"] == 210
    assert main(["plan", "--model", str(real_dir / "config.json"), "--context", "8", "--memory", "80"]) == 0
    assert "weights on disk" not in capsys.readouterr().out  # a bare config.json: no weight files


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--context", "0", "--memory", "80"], "--context: must be a positive integer, got 0"),
        (["--context", "-5", "--memory", "80"], "--context: must be a positive"),
        (["--context", "1024", "--memory", "0"], "--memory: must be a number of GiB from 1e-6 to 1e6, got 0"),
        (["--context", "1024", "--memory", "-2"], "--memory: must be a number of GiB"),
        (["--context", "1024", "--memory", "nan"], "--memory: expected a finite number, got 'nan'"),
    ],
)
def test_cli_bad_numbers_exit_2(real_dir: Path, capsys, args: list[str], message: str) -> None:
    assert main(["plan", "--model", str(real_dir), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("minicpm: error: ") and message in err


def test_cli_missing_config_exits_2(tmp_path: Path, capsys) -> None:
    assert main(["plan", "--model", str(tmp_path), "--context", "1024", "--memory", "80"]) == 2
    assert "minicpm: error: no config.json" in capsys.readouterr().err
    assert main(["plan", "--model", str(tmp_path / "nowhere"), "--context", "1024", "--memory", "80"]) == 2
    assert "minicpm: error: checkpoint directory" in capsys.readouterr().err
    (tmp_path / "config.json").write_text(json.dumps(REAL_CONFIG | {"hidden_size": -1}))
    assert main(["plan", "--model", str(tmp_path), "--context", "1024", "--memory", "80"]) == 2
    assert "'hidden_size'" in capsys.readouterr().err
    assert main(["plan", "--model", str(tmp_path)]) == 2  # --context is required
    assert "the following arguments are required: --context" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cli_cuda_budget_without_cuda_exits_2(real_dir: Path, capsys) -> None:
    assert main(["plan", "--model", str(real_dir), "--context", "1024", "--device", "cuda"]) == 2
    assert "--device cuda: no CUDA device is available" in capsys.readouterr().err


# --------------------------------------------------------------------------- plan_memory on a tiny config
def test_parameter_count_tiny_untied_tied_and_gqa() -> None:
    for config in (tiny_config(), tiny_config(tie_word_embeddings=True), tiny_config(num_key_value_heads=2)):
        shapes = expected_shapes(config)
        assert parameter_count(config) == sum(math.prod(s) for s in shapes.values()) == hand_count(config)
    untied = 97 * 64 + 3 * (4 * 64 * 64 + 3 * 64 * 96 + 2 * 64) + 64 + 97 * 64
    assert parameter_count(tiny_config()) == untied == 117_312
    assert parameter_count(tiny_config(tie_word_embeddings=True)) == untied - 97 * 64


def test_plan_memory_tiny_exact_arithmetic() -> None:
    config = tiny_config()  # 3 layers x 4 kv heads x head_dim 16
    per_token = 2 * 3 * 4 * 16 * 4
    weights = 117_312 * 4
    memory = weights + 1000 + 10 * per_token + 5  # 10 tokens of KV and change
    plan = plan_memory(config, 4, memory, torch.float32, activation_reserve_bytes=1000)
    assert isinstance(plan, MemoryPlan)
    assert (plan.dtype, plan.bytes_per_element, plan.parameters, plan.weight_bytes) == ("float32", 4, 117_312, weights)
    assert plan.kv_bytes_per_token == per_token == 1536 and plan.context_kv_bytes == 4 * per_token
    assert plan.context_limit == 64 and plan.context_limit_source == "max_position_embeddings"
    assert plan.kv_budget_bytes == 10 * per_token + 5 and plan.kv_tokens == 10
    assert plan.concurrent_contexts == 2 and plan.fits_full_context is False and plan.messages == ()
    table = format_plan(plan)
    assert "1000 B (given)" in table
    assert "1.5 KiB" in table and "117,312" in table and "beyond the model's 64-token limit" in table

    bf16 = plan_memory(config, 4, memory, "bf16", activation_reserve_bytes=1000)
    assert bf16.kv_bytes_per_token == per_token // 2 and bf16.weight_bytes == weights // 2

    big = plan_memory(
        config, 4, FULL_CONTEXT * per_token + 10, torch.float32, weight_bytes=0, activation_reserve_bytes=0
    )
    assert big.fits_full_context is True and big.kv_tokens == FULL_CONTEXT and big.weight_bytes == 0


def test_plan_memory_without_budget_and_above_the_limit() -> None:
    plan = plan_memory(tiny_config(), 100, None, "float32")
    assert plan.memory_bytes is None and plan.kv_budget_bytes is None and plan.concurrent_contexts is None
    assert plan.context_exceeds_limit is True
    assert plan.messages == (
        "context 100 exceeds the model's limit of 64 tokens (config max_position_embeddings); "
        "the model is not meant to run longer contexts",
    )
    assert "memory budget" not in format_plan(plan) and "EXCEEDS" in format_plan(plan)
    assert plan_memory(tiny_config(max_length=128), 100, None, "float32").context_exceeds_limit is False


def test_plan_memory_shortfalls_are_named() -> None:
    config = tiny_config()
    weights = 117_312 * 4
    alone = plan_memory(config, 4, weights - 1024, "float32", activation_reserve_bytes=0)
    assert alone.kv_budget_bytes == -1024 and alone.kv_tokens == 0
    assert alone.messages == ("the weights alone (458.25 KiB) do not fit in 457.25 KiB: 1.00 KiB short",)
    reserve = plan_memory(config, 4, weights + 10, "float32", activation_reserve_bytes=2048)
    assert reserve.kv_budget_bytes == 10 - 2048
    assert reserve.messages[0].startswith("the weights fit, but weights + activation reserve")
    assert "no room for KV cache" in reserve.messages[0]


def test_activation_reserve_follows_its_documented_formula() -> None:
    config = tiny_config()  # hidden 64, 4 heads (= kv heads) x 16, intermediate 96, vocab 97
    per_token = (3 * 64 + 12 * 16 + 4 * 16 + 3 * 96) * 4 + (64 + 2 * 8 * 16) * 4
    logits = 2 * 64 * 97 * 4
    gather_per_token = 2 * 4 * 16 * 4  # one layer's K and V: 2 x kv_heads x head_dim x 4 bytes
    merge_per_token = 4 * 16 * 4  # the torch paths' float32 running sum: heads x head_dim x 4 bytes
    assert estimate_activation_reserve(config, "float32", 10) == (
        10 * per_token + 10 * gather_per_token + 10 * merge_per_token + logits + WORKSPACE_BYTES
    )
    # the prefill chunk caps the activations and the merge; the gathered context grows with the context
    long = estimate_activation_reserve(config, "float32", 100_000, prefill_chunk=8)
    assert long == 8 * per_token + 100_000 * gather_per_token + 8 * merge_per_token + logits + WORKSPACE_BYTES
    # a path that packs one kv head's keys and values at a time, in whole 64-key spans, and merges nothing
    one = estimate_activation_reserve(config, "float32", 100_000, prefill_chunk=8, gathered_kv_heads=1)
    assert long - one == 100_000 * gather_per_token - 100_032 * gather_per_token // 4 + 8 * merge_per_token
    every = estimate_activation_reserve(config, "float32", 64, gathered_kv_heads=99)  # at most the kv heads
    assert every == estimate_activation_reserve(config, "float32", 64) - 64 * merge_per_token
    # a path that reads the context a piece of tokens at a time (every kv head), or in place (0)
    piece = estimate_activation_reserve(config, "float32", 100_000, prefill_chunk=8, gathered_tokens=4096)
    assert long - piece == (100_000 - 4096) * gather_per_token
    in_place = estimate_activation_reserve(config, "float32", 100_000, prefill_chunk=8, gathered_tokens=0)
    assert long - in_place == 100_000 * gather_per_token
    short = estimate_activation_reserve(config, "float32", 100, gathered_tokens=4096)  # at most the context
    assert short == estimate_activation_reserve(config, "float32", 100)
    with pytest.raises(ValueError, match="gathered_kv_heads must be a positive"):
        estimate_activation_reserve(config, "float32", 10, gathered_kv_heads=0)
    with pytest.raises(ValueError, match="gathered_tokens must not be negative"):
        estimate_activation_reserve(config, "float32", 10, gathered_tokens=-1)
    with pytest.raises(ValueError, match="give one"):
        estimate_activation_reserve(config, "float32", 10, gathered_kv_heads=1, gathered_tokens=0)


def test_cpu_prefill_reads_follow_the_native_prefill_kernel_and_the_kv_format(monkeypatch) -> None:
    """One kv head packed at a time only where the native prefill kernel serves the dtype and head
    size; else cpu-torch's reads: a quantized cache's piece, nothing for a float cache."""
    from minicpm.engine import cpu_kernels
    from minicpm.engine.attention.cpu import QUANTIZED_PIECE

    assert cpu_prefill_reads("float32", 32) == {"gathered_tokens": 0}  # head_dim not a multiple of 64
    assert cpu_prefill_reads("float32", 32, "int4") == {"gathered_tokens": QUANTIZED_PIECE}
    if cpu_kernels.prefill_available(cpu_kernels.native_kernels(), torch.float32, 64):
        assert cpu_prefill_reads("float32", 64, "int8") == {"gathered_kv_heads": 1}
    monkeypatch.setattr(cpu_kernels, "native_kernels", lambda: None)
    assert cpu_prefill_reads("float32", 64) == {"gathered_tokens": 0}
    assert cpu_prefill_reads("bfloat16", 128, "int8") == {"gathered_tokens": QUANTIZED_PIECE}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"context": 0}, "context must be a positive"),
        ({"context": 2.5}, "context must be a positive"),
        ({"memory_bytes": 0}, "memory must be a positive"),
        ({"memory_bytes": -1}, "memory must be a positive"),
        ({"dtype": "int8"}, "unknown dtype 'int8'"),
        ({"dtype": torch.int8}, "not a floating-point dtype"),
        ({"weight_bytes": -1}, "weight_bytes must not be negative"),
    ],
)
def test_plan_memory_rejects_bad_input(kwargs: dict, message: str) -> None:
    call = {"config": tiny_config(), "context": 8, "memory_bytes": GiB, "dtype": "float32"} | kwargs
    with pytest.raises(ValueError, match=message):
        plan_memory(**call)


def test_available_memory_on_cpu() -> None:
    memory, source = available_memory("cpu")
    assert memory > 0 and source
    with pytest.raises(ValueError, match="cannot measure"):
        available_memory("meta")


def test_cuda_kv_budget_counts_what_is_measured_in_use() -> None:
    """The GPU's KV budget: utilization of the device, less what is in use when it is decided
    (weights and, captured first, the CUDA graph pools), the measured activation peak, one layer's
    gathered context, graphs still to capture and the allocator's slack; the graphs' pool counted
    once, whether measured in use or reserved ahead."""
    from minicpm.engine.model_runner import ALLOCATOR_SLACK, GRAPH_RESERVE, cuda_kv_budget

    total, weights, pool, act, gather = 80 * GiB, 5 * GiB, 300 * 2**20, 2 * GiB, 100 * 2**20
    after_capture = cuda_kv_budget(total, total - weights - pool, 0.95, act, gather)
    ahead = cuda_kv_budget(total, total - weights, 0.95, act, gather, GRAPH_RESERVE)
    assert after_capture == int(total * 0.95) - weights - pool - act - gather - ALLOCATOR_SLACK
    assert ahead - after_capture == pool - GRAPH_RESERVE  # measured, not guessed
    busy = cuda_kv_budget(total, 2 * GiB, 0.95, act, gather)  # another process holds most of the card
    assert busy < 0


# --------------------------------------------------------------------------- KV formats and quantized weights


@pytest.mark.parametrize(("quantize", "group"), [("int8", None), ("int8", 32), ("int4", None), ("int4", 64)])
@pytest.mark.parametrize("tied", [True, False])
def test_quantized_weights_are_counted_as_quantize_model_leaves_them(quantize, group, tied) -> None:
    from minicpm.model import MiniCPMForCausalLM
    from minicpm.plan import quantized_weight_bytes
    from minicpm.quant import quantize_model

    config = tiny_config(tie_word_embeddings=tied, hidden_size=128, intermediate_size=256)
    model = quantize_model(MiniCPMForCausalLM(config), quantize, group)
    held = {t.data_ptr(): t.nbytes for t in [*model.parameters(), *model.buffers()] if t.numel()}
    for module in model.modules():  # quantized layers keep codes, scales and minimums as attributes
        for name in ("qweight", "scales", "mins"):
            t = getattr(module, name, None)
            if isinstance(t, torch.Tensor):
                held[t.data_ptr()] = t.nbytes
    held.pop(model.model.rotary_inv_freq.data_ptr(), None) if hasattr(model.model, "rotary_inv_freq") else None
    assert quantized_weight_bytes(config, torch.float32, quantize, group) == sum(held.values())


@pytest.mark.parametrize(("quantize", "group"), [("int8", None), ("int8", 32), ("int4", None), ("int4", 64)])
@pytest.mark.parametrize("tied", [True, False])
def test_quantized_weights_are_counted_as_the_cpu_engine_holds_them(quantize, group, tied) -> None:
    """Every tensor the CPU engine's model keeps (packed panels, their scales, tables, norms; views
    counted once), against ``quantized_weight_bytes(..., "cpu-panels")``; a vocabulary and widths
    that are not whole panels, so the padding counts."""
    from minicpm.engine import EngineConfig, LLMEngine
    from minicpm.engine.cpu_kernels import native_kernels
    from minicpm.model import MiniCPMForCausalLM
    from minicpm.plan import quantized_weight_bytes

    if native_kernels() is None:
        pytest.skip("the native CPU kernels do not build here")
    config = tiny_config(
        tie_word_embeddings=tied, hidden_size=128, intermediate_size=320, vocab_size=97, num_key_value_heads=1
    )
    model = MiniCPMForCausalLM(config).to(torch.bfloat16)
    engine = LLMEngine(model, None, EngineConfig(quantize=quantize, group_size=group, kv_cache_memory=1 << 20))
    held: dict[int, int] = {}
    for module in engine.runner.model.modules():
        attrs = [*module.parameters(recurse=False), *module.buffers(recurse=False), *vars(module).values()]
        for t in attrs:
            if isinstance(t, torch.Tensor) and t.numel():
                held[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    plan = quantized_weight_bytes(config, torch.bfloat16, quantize, group, "cpu-panels")
    assert plan == sum(held.values())
    if quantize == "int4":  # the tensors' count (float32 scales and minimums, what a GPU holds) is larger
        assert quantized_weight_bytes(config, torch.bfloat16, quantize, group) > plan


def test_cli_counts_the_kv_format_and_the_quantized_weights(real_dir: Path, capsys) -> None:
    """MiniCPM-2B-128k in 16 GiB: bfloat16 KV holds 32k tokens beside int4 weights, int4 KV 3.4x that."""
    args = ["--model", str(real_dir), "--context", "131072", "--memory", "16", "--dtype", "bfloat16"]
    bf16 = run_json(capsys, *args, "--quantize", "int4")
    int8 = run_json(capsys, *args, "--quantize", "int4", "--kv-cache-dtype", "int8")
    int4 = run_json(capsys, *args, "--quantize", "int4", "--kv-cache-dtype", "int4")
    assert (bf16["kv_bytes_per_token"], int8["kv_bytes_per_token"], int4["kv_bytes_per_token"]) == (
        KV_PER_TOKEN_BF16,
        40 * 2 * 36 * (64 + 2 * 2),
        40 * 36 * ((32 + 2 * 2 * 2) + (32 + 2 * 2)),  # int4: keys a pair per 32 values, values per 64
    )
    assert int4["kv_cache_dtype"] == "int4" and int4["quantize"] == "int4"
    assert bf16["weight_bytes"] == int4["weight_bytes"] < REAL_PARAMETERS  # under a byte a parameter
    assert int4["kv_tokens"] > 3 * bf16["kv_tokens"]
    assert main(["plan", *args, "--kv-cache-dtype", "fp8", "--device", "cpu"]) == 2
    assert "fp8 runs on CUDA only" in capsys.readouterr().err
