"""The inference engine: paged KV cache, chunked prefill, continuous batching, prefix caching.

Layout: :mod:`.sequence` (per-request state), :mod:`.block_manager` (KV block bookkeeping and
prefix hashing, no tensors), :mod:`.scheduler` (what runs each step), :mod:`.model_runner` (the
only place that builds tensors, runs the model and captures CUDA graphs), :mod:`.sampler` (the
batched next-token choice), :mod:`.layers` (the linear layers' products), :mod:`.attention` (the
paged cache and attention over it), :mod:`.triton_attention` (the GPU paged decode and prefill
kernels), :mod:`.cpu_kernels` and :mod:`.fused_decode` (the native CPU kernels), :mod:`.threads`
(CPU threads that follow the machine's load), :mod:`.llm_engine` (the step API) and
:mod:`.async_engine` (the engine in its own thread, for other threads and asyncio). The order in
which a request passes through them: docs/architecture.md.

:class:`EngineConfig` imports without torch (the CLI validates engine flags before loading
anything); the other names load the engine on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .config import EngineConfig

if TYPE_CHECKING:
    from .llm_engine import Completion, LLMEngine, RequestOutput

_LAZY = {"Completion", "LLMEngine", "RequestOutput"}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'minicpm.engine' has no attribute {name!r}")
    value = getattr(importlib.import_module(".llm_engine", __name__), name)
    globals()[name] = value
    return value


__all__ = ["Completion", "EngineConfig", "LLMEngine", "RequestOutput"]
