"""The CUDA-graph decode path's bookkeeping, run on CPU: one decoder graph per batch bucket, static
buffers (hidden states into one shared buffer, logits outside the graph for the real rows), padded
rows writing to the scratch slot, bucket choice on replay, any context length in one graph. Graphs
are simulated (a replay re-runs the captured function on the same static buffers) and the decode
attention is the Triton kernel in Triton's CPU interpreter, so everything but the CUDA driver is
exercised; greedy tokens must equal the eager engine's."""

from __future__ import annotations

import contextlib
import importlib
import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton reads it (also on a machine with a GPU: CPU tensors here)

import pytest
import torch
from helpers import random_model, tiny_config

from minicpm import SamplingParams
from minicpm.engine import EngineConfig, LLMEngine

pytest.importorskip("triton")

from minicpm.engine import triton_attention

if not triton_attention._kernels_interpreted():  # imported earlier without the flag: rebuild them interpreted
    importlib.reload(triton_attention)


class FakeGraph:
    """Stands in for torch.cuda.CUDAGraph: a replay re-runs the captured function (set by the test)."""

    def __init__(self) -> None:
        self.fn = None

    def pool(self) -> str:
        return "pool"

    def replay(self) -> None:
        self.fn()


@contextlib.contextmanager
def fake_capture(graph: FakeGraph, pool: object = None):
    yield


def make_engine(kv_heads: int, backend: str = "auto", kv_cache_dtype: str = "auto") -> LLMEngine:
    # a quantized cache needs heads of 32 (its scale groups): four heads of a hidden size of 128
    hidden = {"hidden_size": 128} if kv_cache_dtype != "auto" else {}
    config = tiny_config(
        num_hidden_layers=2, num_key_value_heads=kv_heads, max_position_embeddings=64, max_length=256, **hidden
    )
    model = random_model(config, seed=5)
    kv = config.kv_bytes_per_token(4) * 8 * 200
    return LLMEngine(
        model,
        None,
        EngineConfig(
            block_size=8,
            max_num_seqs=4,
            max_num_batched_tokens=64,
            kv_cache_memory=kv,
            attention_backend=backend,
            kv_cache_dtype=kv_cache_dtype,
        ),
    )


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize(("kv_heads", "kv_cache_dtype"), [(4, "auto"), (2, "auto"), (2, "int4")])
def test_graph_replays_give_the_eager_tokens(monkeypatch: pytest.MonkeyPatch, kv_heads: int, kv_cache_dtype) -> None:
    """(int4: the graphs' decode kernel reads codes and scales in place; the tokens are the torch
    backend's over the same cache format.)"""
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 97, (n,), generator=gen).tolist() for n in (5, 17, 40, 70, 9, 130, 33)]
    params = SamplingParams(max_new_tokens=6, ignore_eos=True)
    reference = "auto" if kv_cache_dtype == "auto" else "torch"
    expected = [c.token_ids for c in make_engine(kv_heads, reference, kv_cache_dtype).generate(prompts, params)]

    monkeypatch.setattr(torch.cuda, "CUDAGraph", FakeGraph)
    monkeypatch.setattr(torch.cuda, "graph", fake_capture)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)
    engine = make_engine(kv_heads, "triton", kv_cache_dtype)  # the GPU's path (here in Triton's interpreter)
    runner = engine.runner
    assert runner.cache.format.name == ("float32" if kv_cache_dtype == "auto" else kv_cache_dtype)
    assert runner.fused is None
    runner._capture_graphs(engine.max_model_len)
    assert set(runner.graphs) == {1, 2, 4}
    for graph, decoder in runner.graphs.values():
        graph.fn = decoder
    logits_rows = []
    replays = []
    replay = runner._replay
    padded = []

    def recording_replay(graph, ids, *rest):
        replays.append(graph[0])
        if ids.shape[1] < graph[0]:
            padded.append(ids.shape[1])
        logits = replay(graph, ids, *rest)
        logits_rows.append((logits.shape[0], ids.shape[1]))
        return logits

    monkeypatch.setattr(runner, "_replay", recording_replay)

    got = [c.token_ids for c in engine.generate(prompts, params)]
    assert got == expected
    # batches of 4, and of 3 padded to the bucket of 4, and then fewer
    assert len(replays) >= 5 and set(replays) >= {2, 4}
    assert padded, "no replay ran a batch smaller than its bucket"
    assert all(rows == real for rows, real in logits_rows)  # the head saw the real rows, not the bucket
    bm = engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks
