"""What every attention backend shares: the step's metadata and the backend interface.

Contract:

* :class:`AttentionMetadata` is what the model runner knows about one forward, whatever the
  backend: where each new token's keys and values go (``slot_mapping``), each sequence's block
  table (device int32, padded; and ``tables``, the host lists of the blocks each sequence uses),
  its context length after the step and its number of new tokens. Device tensors are what a CUDA
  graph replays from static buffers; the host lists are ``None`` inside a captured graph.
* An :class:`AttentionBackend` turns that into its own metadata once per step (:meth:`prepare`,
  a subclass of :class:`AttentionMetadata` with what only it reads) and computes one layer's
  attention from it (:meth:`attend`), the new keys and values already written to the cache.
  :meth:`attend` returns, for each sequence's new queries, causal attention over that sequence's
  cached tokens (its new ones included): (1, heads, tokens, head_dim) in the queries' dtype.
* A backend is chosen once, by :func:`minicpm.engine.attention.select_backend`; its ``fallback``
  is the backend the cache moves to when one of its kernels fails mid-serving and the engine is
  configured to fall back (``None``: a failure always raises).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, ClassVar

from torch import Tensor

if TYPE_CHECKING:
    from .cache import PagedKVCache


@dataclass
class AttentionMetadata:
    """Where one forward's tokens go in the cache and what each sequence attends to (see the
    module docstring). ``leading_decodes``: how many of the first sequences have one new token."""

    slot_mapping: Tensor
    block_tables: Tensor
    context_lens: Tensor
    decode_only: bool
    query_lens: list[int] | None = None
    context_lens_host: list[int] | None = None
    tables: list[list[int]] | None = None
    leading_decodes: int = 0

    def common(self) -> dict:
        """The fields of :class:`AttentionMetadata` itself (what any backend prepares from)."""
        return {f.name: getattr(self, f.name) for f in fields(AttentionMetadata)}


class AttentionBackend:
    """One attention path over the paged cache (see the module docstring)."""

    name: ClassVar[str]
    # whether a decode step of this backend can be captured in a CUDA graph (no host sync, no
    # host lists read)
    graphs: ClassVar[bool] = False
    fallback: AttentionBackend | None = None

    def describe(self) -> str:
        """One line for the start-up log: the backend and the kernels it runs."""
        return self.name

    def prepare(self, cache: PagedKVCache, md: AttentionMetadata) -> AttentionMetadata:
        """This backend's metadata for the step ``md`` describes over ``cache`` (host work, once
        per step)."""
        return md

    def attend(self, cache: PagedKVCache, layer: int, q: Tensor, k: Tensor, v: Tensor, md: AttentionMetadata) -> Tensor:
        """Layer ``layer``'s attention for the step: ``q`` (1, heads, tokens, head_dim), ``k``/``v``
        (1, kv_heads, tokens, head_dim) the step's new keys and values (already in the cache)."""
        raise NotImplementedError
