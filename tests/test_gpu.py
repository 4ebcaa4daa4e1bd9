"""The gpu tier: the compiled Triton kernels and real CUDA graph capture, on a CUDA device.

Every test here is marked ``gpu``: without a CUDA device it skips (an allowed skip,
tests/skips.txt). With one, the Triton kernels must be compiled, not interpreted: the CPU tests
build them in Triton's interpreter (TRITON_INTERPRET=1), so this tier runs in a process of its own,
``pytest tests/test_gpu.py`` (as .ci/run does), and fails rather than pass on interpreted kernels.

- The paged decode and varlen prefill kernels equal their PyTorch references on CUDA tensors.
- An engine on CUDA (float32, eager steps and CUDA graphs) gives the greedy tokens of a full
  recompute by the same model's plain forward on CPU, token by token.
- Decode steps replayed through captured CUDA graphs give the eager engine's tokens (float32 and
  bfloat16), and graphs are replayed.
- A quantized KV cache (int8, int4, fp8): the compiled kernels reading codes and scales equal
  attention over the dequantized cache, and an engine on the Triton backend (eager and with
  graphs) gives the torch backend's greedy tokens over the same format.
"""

from __future__ import annotations

import os

import pytest
import torch
from helpers import random_model, tiny_config

from minicpm import SamplingParams
from minicpm.engine import EngineConfig, LLMEngine

pytestmark = pytest.mark.gpu

BLOCK = 16
MAX_POS = 64  # max_position_embeddings: prompts longer than this get their own NTK base
CONTEXT = 256  # max_length
TOLS = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 2e-2}


@pytest.fixture(scope="module", autouse=True)
def compiled_triton() -> None:
    """Triton present and its kernels compiled (not built by the CPU interpreter)."""
    from minicpm.engine import triton_attention

    assert triton_attention.TRITON_AVAILABLE, "the gpu tier needs triton (CUDA builds of torch bring it)"
    assert os.environ.get("TRITON_INTERPRET", "0") in ("", "0") and not triton_attention._kernels_interpreted(), (
        "Triton's kernels were built by its CPU interpreter in this process (a CPU test set TRITON_INTERPRET): "
        "run the gpu tier alone, pytest tests/test_gpu.py"
    )


def config(**overrides):
    fields = dict(num_hidden_layers=2, num_key_value_heads=2, max_position_embeddings=MAX_POS, max_length=CONTEXT)
    fields.update(overrides)
    return tiny_config(**fields)


def prompt_of(n: int, seed: int) -> list[int]:
    return torch.randint(0, 97, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


# (prompt length, new tokens): 1, under a block, a block, several, chunked prefill, past max_pos (NTK)
CASES = [(1, 6), (5, 9), (16, 4), (40, 12), (70, 7), (100, 10), (130, 5)]
PROMPTS = [prompt_of(n, seed=300 + n) for n, _ in CASES]
PARAMS = [SamplingParams(max_new_tokens=k, ignore_eos=True) for _, k in CASES]


def cuda_engine(
    dtype: torch.dtype, *, eager: bool, seed: int = 3, backend: str = "auto", kv_cache_dtype: str = "auto"
) -> LLMEngine:
    """A fresh tiny random model (the same weights for the same seed) and its engine on CUDA; a
    quantized cache takes a model with heads of 32 (its scale groups)."""
    shape = {} if kv_cache_dtype == "auto" else {"hidden_size": 128}
    model = random_model(config(**shape), seed=seed).to(device="cuda", dtype=dtype)
    blocks = 4 * -(-CONTEXT // BLOCK)
    kv = blocks * BLOCK * model.config.kv_bytes_per_token(dtype.itemsize)
    settings = EngineConfig(
        block_size=BLOCK,
        max_num_seqs=4,
        max_num_batched_tokens=64,
        kv_cache_memory=kv,
        enforce_eager=eager,
        attention_backend=backend,
        on_kernel_failure="raise",
        kv_cache_dtype=kv_cache_dtype,
    )
    return LLMEngine(model, None, settings)


def reference_greedy(prompt: list[int], n: int, seed: int = 3) -> list[int]:
    """Greedy tokens by full recompute with the model's plain forward on CPU, float32."""
    model = random_model(config(), seed=seed)
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]), rope_lengths=len(prompt))[0, -1].argmax()))
    return ids[len(prompt) :]


class ReplayCounter:
    """Counts torch.cuda.CUDAGraph.replay calls (the real replay still runs)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.count = 0
        replay = torch.cuda.CUDAGraph.replay

        def counting(graph: torch.cuda.CUDAGraph) -> None:
            self.count += 1
            replay(graph)

        monkeypatch.setattr(torch.cuda.CUDAGraph, "replay", counting)


# ------------------------------------------------------------------------------------ the kernels
def paged_case(context_lens: list[int], query_lens: list[int], *, h: int, kv: int, d: int, dtype: torch.dtype):
    """Random caches with each sequence on shuffled blocks (free blocks hold NaN, so a stray read
    shows), block tables padded with -1, and a query of ``query_lens[i]`` tokens per sequence."""
    g = torch.Generator().manual_seed(7)
    need = [-(-n // BLOCK) for n in context_lens]
    num_blocks = sum(need) + 3
    order = torch.randperm(num_blocks, generator=g)
    k = torch.full((num_blocks, BLOCK, kv, d), float("nan"))
    v = torch.full((num_blocks, BLOCK, kv, d), float("nan"))
    tables = torch.full((len(context_lens), max(need)), -1, dtype=torch.int32)
    used = 0
    for s, n in enumerate(context_lens):
        ids = order[used : used + need[s]]
        used += need[s]
        tables[s, : need[s]] = ids.int()
        keys, values = torch.randn(n, kv, d, generator=g), torch.randn(n, kv, d, generator=g)
        for i, block in enumerate(ids.tolist()):
            rows = slice(i * BLOCK, min((i + 1) * BLOCK, n))
            k[block, : rows.stop - rows.start] = keys[rows]
            v[block, : rows.stop - rows.start] = values[rows]
    q = torch.randn(sum(query_lens), h, d, generator=g)
    cuda = {"device": "cuda"}
    return (
        q.to(dtype).to(**cuda),
        k.to(dtype).to(**cuda),
        v.to(dtype).to(**cuda),
        tables.to(**cuda),
        torch.tensor(context_lens, dtype=torch.int32, device="cuda"),
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kv", [4, 1])
def test_compiled_decode_kernel_matches_its_reference(dtype: torch.dtype, kv: int) -> None:
    from minicpm.engine.triton_attention import paged_decode_attention, paged_decode_attention_reference

    lens = [1, 37, 700, 1500, 0]  # one partition, several (split and reduced), an empty row
    q, k, v, tables, ctx = paged_case(lens, [1] * len(lens), h=4, kv=kv, d=64, dtype=dtype)
    got = paged_decode_attention(q, k, v, tables, ctx, 0.125)
    want = paged_decode_attention_reference(q, k, v, tables, ctx, 0.125)
    torch.cuda.synchronize()
    assert got.is_cuda and torch.isfinite(got[:-1]).all()
    torch.testing.assert_close(got[:-1].float(), want[:-1].float(), atol=TOLS[dtype], rtol=TOLS[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kv", [4, 1])
def test_compiled_prefill_kernel_matches_its_reference(dtype: torch.dtype, kv: int) -> None:
    from minicpm.engine.triton_attention import paged_prefill_attention, paged_prefill_attention_reference

    lens, queries = [5, 100, 300, 64], [5, 30, 130, 1]  # a whole prompt, chunks after cached context, one token
    q, k, v, tables, ctx = paged_case(lens, queries, h=4, kv=kv, d=64, dtype=dtype)
    cu_q = torch.tensor([0, *torch.tensor(queries).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    got = paged_prefill_attention(q, k, v, tables, cu_q, ctx, 0.125, max(queries))
    want = paged_prefill_attention_reference(q, k, v, tables, cu_q, ctx, 0.125)
    torch.cuda.synchronize()
    assert got.is_cuda and torch.isfinite(got).all()
    torch.testing.assert_close(got.float(), want.float(), atol=TOLS[dtype], rtol=TOLS[dtype])


# ------------------------------------------------------------------------------------ the engine
@pytest.mark.parametrize(
    ("eager", "backend"), [(True, "auto"), (False, "auto"), (True, "torch")], ids=["eager", "graphs", "torch"]
)
def test_greedy_on_cuda_matches_full_recompute_on_cpu(eager: bool, backend: str, monkeypatch) -> None:
    """``auto`` is the Triton backend on CUDA (eager and with graphs); ``torch`` gathers, with the
    split past/chunk kernels where its start-up probe finds one agreeing."""
    replays = ReplayCounter(monkeypatch)
    engine = cuda_engine(torch.float32, eager=eager, backend=backend)
    assert engine.device.type == "cuda"
    assert engine.stats()["attention_backend"] == ("triton" if backend == "auto" else "torch")
    got = [c.token_ids for c in engine.generate(PROMPTS, PARAMS)]
    for prompt, params, tokens in zip(PROMPTS, PARAMS, got, strict=True):
        expected = reference_greedy(prompt, params.max_new_tokens)
        assert tokens == expected, f"prompt of {len(prompt)}: {tokens} != reference {expected}"
    assert (replays.count > 0) == (not eager), f"{replays.count} graph replays with enforce_eager={eager}"
    stats = engine.stats()
    assert stats["free_blocks"] == stats["num_blocks"] and stats["kernel_failures"] == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cuda_graph_replays_give_the_eager_tokens(dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    expected = [c.token_ids for c in cuda_engine(dtype, eager=True).generate(PROMPTS, PARAMS)]
    replays = ReplayCounter(monkeypatch)
    engine = cuda_engine(dtype, eager=False)
    got = [c.token_ids for c in engine.generate(PROMPTS, PARAMS)]
    assert got == expected
    # seven prompts, four at a time: decode-only steps of 4, then fewer (replayed in the bucket above)
    assert replays.count >= max(k for _, k in CASES) - 1, replays.count
    stats = engine.stats()
    assert stats["free_blocks"] == stats["num_blocks"]


# ------------------------------------------------------------------------------ a quantized cache
QUANTIZED = ["int8", "int4", "fp8"]


def quantized(name: str, k: torch.Tensor, v: torch.Tensor, dtype: torch.dtype):
    """Codes and float16 scales of ``k`` / ``v`` (NaN rows give NaN scales: a stray read still
    shows), and the dequantized cache in ``dtype`` (what the reference reads)."""
    from minicpm.engine.attention.kv_format import FORMATS

    fmt = FORMATS[name]
    (kq, ks), (vq, vs) = fmt.quantize(k.float()), fmt.quantize(v.float(), value=True)
    codes = {"k_scale": ks, "v_scale": vs, "kv_format": name}
    return kq, vq, codes, fmt.dequantize(kq, ks, dtype), fmt.dequantize(vq, vs, dtype, value=True)


@pytest.mark.parametrize("name", QUANTIZED)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kv", [4, 1])
def test_compiled_kernels_read_a_quantized_cache(name: str, dtype: torch.dtype, kv: int) -> None:
    from minicpm.engine.triton_attention import (
        paged_decode_attention,
        paged_decode_attention_reference,
        paged_prefill_attention,
        paged_prefill_attention_reference,
    )

    lens = [1, 37, 700, 1500, 0]
    q, k, v, tables, ctx = paged_case(lens, [1] * len(lens), h=4, kv=kv, d=64, dtype=dtype)
    kq, vq, codes, kd, vd = quantized(name, k, v, dtype)
    got = paged_decode_attention(q, kq, vq, tables, ctx, 0.125, **codes)
    want = paged_decode_attention_reference(q, kd, vd, tables, ctx, 0.125)
    torch.cuda.synchronize()
    assert torch.isfinite(got).all() and torch.equal(got[-1], torch.zeros_like(got[-1]))
    torch.testing.assert_close(got[:-1].float(), want[:-1].float(), atol=TOLS[dtype], rtol=TOLS[dtype])

    lens, queries = [5, 100, 300, 64], [5, 30, 130, 1]
    q, k, v, tables, ctx = paged_case(lens, queries, h=4, kv=kv, d=64, dtype=dtype)
    kq, vq, codes, kd, vd = quantized(name, k, v, dtype)
    cu_q = torch.tensor([0, *torch.tensor(queries).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    got = paged_prefill_attention(q, kq, vq, tables, cu_q, ctx, 0.125, max(queries), **codes)
    want = paged_prefill_attention_reference(q, kd, vd, tables, cu_q, ctx, 0.125)
    torch.cuda.synchronize()
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.float(), want.float(), atol=TOLS[dtype], rtol=TOLS[dtype])


TORCH_TOKENS: dict[str, list[list[int]]] = {}


@pytest.mark.parametrize("kv_cache_dtype", QUANTIZED)
@pytest.mark.parametrize("eager", [True, False], ids=["eager", "graphs"])
def test_triton_on_a_quantized_cache_gives_the_torch_backends_tokens(
    kv_cache_dtype: str, eager: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """float32: the Triton kernels read codes and scales in place (eager steps, and decode steps
    replayed as CUDA graphs) and give the greedy tokens of the torch backend over the same format."""
    if kv_cache_dtype not in TORCH_TOKENS:
        reference = cuda_engine(torch.float32, eager=True, backend="torch", kv_cache_dtype=kv_cache_dtype)
        TORCH_TOKENS[kv_cache_dtype] = [c.token_ids for c in reference.generate(PROMPTS, PARAMS)]
    replays = ReplayCounter(monkeypatch)
    engine = cuda_engine(torch.float32, eager=eager, kv_cache_dtype=kv_cache_dtype)
    assert engine.stats()["attention_backend"] == "triton"
    assert engine.runner.cache.format.name == kv_cache_dtype
    got = [c.token_ids for c in engine.generate(PROMPTS, PARAMS)]
    assert got == TORCH_TOKENS[kv_cache_dtype]
    assert (replays.count > 0) == (not eager), f"{replays.count} graph replays with enforce_eager={eager}"
    stats = engine.stats()
    assert stats["free_blocks"] == stats["num_blocks"] and stats["kernel_failures"] == 0
