"""Attention over the paged KV cache: the cache (:class:`PagedKVCache`), the backends that read it,
and the one function that chooses among them (:func:`select_backend`).

Contract: a :class:`PagedKVCache` owns one :class:`AttentionBackend`, chosen once when the engine
is built (``EngineConfig.attention_backend``, default ``"auto"``). Per step the model runner builds
one :class:`AttentionMetadata` and the backend prepares its own from it; per layer the cache writes
the new keys and values and the backend computes attention. The backends:

* ``cpu-native`` (:mod:`.cpu`): CPU, float32/bfloat16, the native C decode and prefill kernels;
* ``cpu-torch`` (:mod:`.cpu`): CPU, blocks read in place, torch's flash kernel merged by log-sum-exp;
* ``triton`` (:mod:`.triton_backend`): CUDA, the Triton paged decode and varlen prefill kernels;
* ``torch`` (:mod:`.torch_backend`): any device, gathered context and masked
  ``scaled_dot_product_attention`` (the reference), on CUDA with split kernels merged by log-sum-exp.
"""

from __future__ import annotations

from .base import AttentionBackend, AttentionMetadata
from .cache import HUGE_PAGE_LAYER_BYTES, KERNEL_FAILURE_CHOICES, PagedKVCache
from .cpu import CpuMetadata, CpuNativeBackend, CpuTorchBackend, block_runs
from .lse import (
    LseAttention,
    chunk_over_pasts,
    cpu_attention_with_lse,
    cudnn_attention_with_lse,
    flash_attention_with_lse,
    merge_by_lse,
    split_causal_attention,
)
from .select import BACKEND_CHOICES, select_backend
from .torch_backend import TorchBackend, TorchMetadata, probe_lse_attention
from .triton_backend import TritonBackend, TritonMetadata, triton_available

__all__ = [
    "BACKEND_CHOICES",
    "HUGE_PAGE_LAYER_BYTES",
    "KERNEL_FAILURE_CHOICES",
    "AttentionBackend",
    "AttentionMetadata",
    "CpuMetadata",
    "CpuNativeBackend",
    "CpuTorchBackend",
    "LseAttention",
    "PagedKVCache",
    "TorchBackend",
    "TorchMetadata",
    "TritonBackend",
    "TritonMetadata",
    "block_runs",
    "chunk_over_pasts",
    "cpu_attention_with_lse",
    "cudnn_attention_with_lse",
    "flash_attention_with_lse",
    "merge_by_lse",
    "probe_lse_attention",
    "select_backend",
    "split_causal_attention",
    "triton_available",
]
