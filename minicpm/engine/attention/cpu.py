"""The CPU attention backends: ``cpu-torch`` and ``cpu-native``. Nothing is gathered or masked,
whatever the order of the blocks.

Contract:

* ``cpu-torch``: every sequence of a step, decode rows and prefill chunks alike, attends to its own
  blocks read in place: each run of consecutive block ids (the block manager keeps a sequence's
  blocks consecutive where it can) is a view of the cache, runs are merged by log-sum-exp with
  torch's flash kernel; a first chunk attends to its own keys.
* ``cpu-native`` (float32 and bfloat16, where the C kernels build: :mod:`minicpm.engine.cpu_kernels`):
  a step's decode rows, all together, go to the native paged decode kernel (one call per layer,
  blocks read through the block table), so a decode row's result does not depend on what else the
  step holds; prefill chunks go to the native prefill kernel where the CPU has it (AVX-512, and
  AVX512-BF16 for bfloat16), else the ``cpu-torch`` path. The engine's fused decoder (every layer
  of a decode row in one native call) runs on this backend only.
"""

from __future__ import annotations

import ctypes
import itertools
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from ...model import causal_attention
from ..cpu_kernels import paged_attention, paged_prefill
from .base import AttentionBackend, AttentionMetadata
from .lse import chunk_over_pasts, cpu_attention_with_lse, merge_by_lse, past_attention, query_rows

if TYPE_CHECKING:
    from .cache import PagedKVCache


@dataclass
class CpuMetadata(AttentionMetadata):
    """``seq_runs``: per sequence, (first slot, tokens) of each run of consecutive blocks holding
    its context; ``starts``: each sequence's first row in the step. ``cpu-native`` decode rows:
    their token indices (host), the row of ``block_tables`` each reads and its context length
    (int32); None when the step has none."""

    seq_runs: list[list[tuple[int, int]]] | None = None
    starts: list[int] | None = None
    decode_rows: list[int] | None = None
    decode_seqs: Tensor | None = None
    decode_lens: Tensor | None = None


def block_runs(blocks: list[int], length: int, block_size: int) -> list[tuple[int, int]]:
    """(first slot, tokens) of each maximal run of consecutive block ids holding ``length`` tokens."""
    runs, i = [], 0
    while i < len(blocks):
        j = i
        while j + 1 < len(blocks) and blocks[j + 1] == blocks[j] + 1:
            j += 1
        runs.append((blocks[i] * block_size, min((j + 1) * block_size, length) - i * block_size))
        i = j + 1
    return runs


QUANTIZED_PIECE = 4096  # tokens of a quantized cache dequantized at once by cpu-torch


def _pieces(runs: list[tuple[int, int]], limit: int, piece: int | None) -> list[tuple[int, int]]:
    """(first slot, end slot) of the pieces that hold a sequence's first ``limit`` tokens: its runs
    of consecutive blocks (:func:`block_runs`), each cut every ``piece`` tokens (None: whole)."""
    out, seen = [], 0
    for slot, tokens in runs:
        tokens = min(tokens, limit - seen)
        if tokens <= 0:
            break
        step = piece or tokens
        out.extend((first, min(slot + tokens, first + step)) for first in range(slot, slot + tokens, step))
        seen += tokens
    return out


def _read(cache: PagedKVCache, layer: int, piece: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """A piece's keys and values (1, kv_heads, tokens, head_dim): views of a float cache, a
    dequantized copy of a quantized one."""
    kk, vv = cache.read(layer, slice(*piece))
    return kk.transpose(0, 1)[None], vv.transpose(0, 1)[None]


class CpuTorchBackend(AttentionBackend):
    """See the module docstring."""

    name = "cpu-torch"

    def describe(self) -> str:
        return "cpu-torch (blocks read in place, torch's flash kernel, runs merged by log-sum-exp)"

    def prepare(self, cache: PagedKVCache, md: AttentionMetadata) -> CpuMetadata:
        out = CpuMetadata(**md.common())
        bs = cache.block_size
        out.seq_runs = [block_runs(t, n, bs) for t, n in zip(md.tables, md.context_lens_host, strict=True)]
        out.starts = [0, *itertools.accumulate(md.query_lens)][:-1]
        return out

    def attend(self, cache: PagedKVCache, layer: int, q: Tensor, k: Tensor, v: Tensor, md: CpuMetadata) -> Tensor:
        return self._in_place(cache, layer, q, k, v, md, range(len(md.query_lens)))

    def _chunk(self, cache: PagedKVCache, layer: int, q: Tensor, table: Tensor, past: int) -> Tensor | None:
        """A prefill chunk with a past by a kernel of this backend's own; None: the torch path."""
        return None

    def _in_place(
        self, cache: PagedKVCache, layer: int, q: Tensor, k: Tensor, v: Tensor, md: CpuMetadata, seqs: range | list[int]
    ) -> Tensor:
        """Sequences ``seqs`` of the step (all of them, in order, or a subset whose rows the caller
        places), each over its own blocks read in place. Returns their rows, concatenated."""
        heads, d = q.shape[1], q.shape[3]
        groups = heads // cache.kv_heads
        # a quantized run is dequantized a piece at a time (bounded memory), the pieces merged as runs are
        piece = QUANTIZED_PIECE if cache.format.quantized else None
        outs = []
        for i in seqs:
            n, start = md.query_lens[i], md.starts[i]
            qi = q[:, :, start : start + n]
            ctx = md.context_lens_host[i]
            past = ctx - n
            out = self._chunk(cache, layer, qi, md.block_tables[i], past) if n > 1 else None
            if out is None and n > 1 and past == 0:  # a first chunk: its own keys only
                out = causal_attention(qi, k[:, :, start : start + n], v[:, :, start : start + n])
            elif out is None:
                limit = ctx if n == 1 else past  # a decode row's own key is in the cache already
                pieces = _pieces(md.seq_runs[i], limit, piece)
                if n == 1 and len(pieces) == 1:  # the common decode case: one plain kernel call
                    kk, vv = _read(cache, layer, pieces[0])
                    out = F.scaled_dot_product_attention(qi.reshape(1, cache.kv_heads, groups, d), kk, vv)
                    out = out.reshape(1, heads, 1, d)
                else:  # the pieces read (dequantized) one at a time as the merge asks for them
                    segments = (_read(cache, layer, r) for r in pieces)
                    if n == 1:
                        out = merge_by_lse(past_attention(cpu_attention_with_lse, qi, segments), q.dtype)
                    else:
                        kn, vn = k[:, :, start : start + n], v[:, :, start : start + n]
                        out = chunk_over_pasts(cpu_attention_with_lse, qi, segments, kn, vn)
            outs.append(out)
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)


class CpuNativeBackend(CpuTorchBackend):
    """See the module docstring. ``lib``: the native kernel library; ``prefill``: it again where
    its prefill kernel runs for this dtype and head size, else None."""

    name = "cpu-native"

    def __init__(self, lib: ctypes.CDLL, prefill: ctypes.CDLL | None) -> None:
        self.lib, self.prefill = lib, prefill

    def describe(self) -> str:
        chunks = "native prefill kernel" if self.prefill is not None else "prefill chunks by cpu-torch"
        return f"cpu-native (decode rows: native paged kernel; {chunks})"

    def prepare(self, cache: PagedKVCache, md: AttentionMetadata) -> CpuMetadata:
        out = super().prepare(cache, md)
        rows, seqs, lens = [], [], []
        for i, (n, ctx) in enumerate(zip(md.query_lens, md.context_lens_host, strict=True)):
            if n == 1:
                rows.append(out.starts[i])
                seqs.append(i)
                lens.append(ctx)
        if rows:
            out.decode_rows = rows
            out.decode_seqs = torch.tensor(seqs, dtype=torch.int32)
            out.decode_lens = torch.tensor(lens, dtype=torch.int32)
        return out

    def _chunk(self, cache: PagedKVCache, layer: int, q: Tensor, table: Tensor, past: int) -> Tensor | None:
        if self.prefill is None:
            return None
        kc, vc = cache.slots(layer)
        ks, vs = cache.scale_slots(layer)
        out = paged_prefill(query_rows(q), kc, vc, table, past, cache.block_size, cache.scale, self.prefill, ks, vs)
        return out.transpose(0, 1)[None]

    def attend(self, cache: PagedKVCache, layer: int, q: Tensor, k: Tensor, v: Tensor, md: CpuMetadata) -> Tensor:
        """The step's decode rows in one native kernel call; its prefill chunks (if any) written
        around them. Returns (1, heads, tokens, head_dim)."""
        if not md.decode_rows:
            return super().attend(cache, layer, q, k, v, md)
        kc, vc = cache.slots(layer)
        rows = query_rows(q)
        tokens = rows.shape[0]
        every = len(md.decode_rows) == tokens
        queries = rows if every else rows[torch.tensor(md.decode_rows)]
        ks, vs = cache.scale_slots(layer)
        decoded = paged_attention(
            queries,
            kc,
            vc,
            md.block_tables,
            md.decode_seqs,
            md.decode_lens,
            cache.block_size,
            cache.scale,
            self.lib,
            ks,
            vs,
        )
        if every:
            return decoded.transpose(0, 1)[None]
        out = torch.empty_like(rows, memory_format=torch.contiguous_format)
        out[md.decode_rows] = decoded
        for i, (n, start) in enumerate(zip(md.query_lens, md.starts, strict=True)):
            if n > 1:
                part = self._in_place(cache, layer, q, k, v, md, [i])
                out[start : start + n] = part[0].transpose(0, 1)
        return out.transpose(0, 1)[None]
