"""The inference engine: paged KV cache, chunked prefill, continuous batching, prefix caching.

Layout: :mod:`.sequence` (per-request state), :mod:`.block_manager` (KV block bookkeeping and
prefix hashing, no tensors), :mod:`.scheduler` (what runs each step), :mod:`.model_runner` (the
only place that builds tensors, runs the model and captures CUDA graphs), :mod:`.attention`
(the paged cache and attention over it), :mod:`.triton_attention` (the GPU decode kernel),
:mod:`.llm_engine` (the step API) and :mod:`.async_engine` (the engine in its own thread, for
other threads and asyncio).
"""

from .config import EngineConfig
from .llm_engine import Completion, LLMEngine, RequestOutput

__all__ = ["Completion", "EngineConfig", "LLMEngine", "RequestOutput"]
