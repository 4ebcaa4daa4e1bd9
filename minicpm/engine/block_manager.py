"""KV block bookkeeping, with prefix caching: :class:`BlockManager`. Plain Python, no tensors.

Contract:

* The KV cache is ``num_blocks`` blocks of ``block_size`` token slots; block ``i`` holds slots
  ``i * block_size ... (i + 1) * block_size - 1``. Each block has a reference count; a block is
  free when no sequence holds it.
* ``allocate(seq)`` admits a waiting sequence: it reuses cached blocks for the longest
  block-aligned prefix of its tokens that an earlier sequence computed (leaving at least one token
  to compute, whose logits are needed), takes fresh blocks for the rest of its current tokens,
  and sets ``num_computed_tokens`` to the reused length. It either succeeds whole or changes
  nothing (check with ``can_allocate``).
* ``append_slots(seq, n)`` grows a running sequence's blocks to hold ``n`` more tokens
  (``can_append`` first). ``free(seq)`` drops its references.
* ``commit(seq)`` registers every block that became full of computed tokens under a
  :class:`BlockKey`: its own ids and the identity of what precedes it (the previous block's
  content id, or for the first block the sequence's ``hash_seed``, which separates sequences whose
  keys differ for the same ids, e.g. another dynamic-NTK base). The key hashes by a chained hash
  and compares exactly, so a hash collision is never a hit. Freed blocks keep their key until
  they are reused, least recently freed first, so a later request with the same prefix can pick
  them up again; reusing a block retires its content id, which unlinks everything cached after it.
  Blocks that hold nothing cached are handed out first, lowest id first.
"""

from __future__ import annotations

import heapq
import itertools
from collections import OrderedDict
from dataclasses import dataclass

from .sequence import Sequence


def chain_hash(prev: int, token_ids: tuple[int, ...]) -> int:
    return hash((prev, token_ids))


class BlockKey:
    """What a full block holds: ``token_ids`` after ``parent``: the previous block's content id (an
    int), or ``("seed", hash_seed)`` for a sequence's first block."""

    __slots__ = ("_hash", "parent", "token_ids")

    def __init__(self, parent: object, token_ids: tuple[int, ...]) -> None:
        self.parent = parent
        self.token_ids = token_ids
        self._hash = chain_hash(hash(parent), token_ids)

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other: object) -> bool:
        return isinstance(other, BlockKey) and self.parent == other.parent and self.token_ids == other.token_ids


@dataclass(eq=False)
class Block:
    block_id: int
    ref_count: int = 0
    hash: BlockKey | None = None
    content_id: int = -1


class BlockManager:
    def __init__(
        self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True, contiguous: bool = False
    ) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need at least one block of at least one token, got {num_blocks} x {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.blocks = [Block(i) for i in range(num_blocks)]
        # free blocks: never-used or unhashed ones, lowest id first (so a request's blocks tend to be
        # consecutive, which the CPU attention reads as a view); then cached ones, least recently freed first
        self.fresh: list[int] = list(range(num_blocks))  # a heap; ids taken out of order are skipped lazily
        self.fresh_set: set[int] = set(self.fresh)
        self.cached: OrderedDict[int, None] = OrderedDict()
        self.hash_to_block: dict[BlockKey, int] = {}
        self._content_ids = itertools.count()
        self.enable_prefix_caching = enable_prefix_caching
        # keep each sequence's blocks consecutive where free blocks allow (CPU attention reads a run
        # of consecutive blocks as one view): prompts go where their answer has room to follow,
        # and a growing sequence takes the block after its last one when that is free
        self.contiguous = contiguous

    @property
    def num_free_blocks(self) -> int:
        return len(self.fresh_set) + len(self.cached)

    @property
    def free_ids(self) -> list[int]:
        """Free block ids in the order they will be handed out."""
        return sorted(self.fresh_set) + list(self.cached)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ------------------------------------------------------------------ prefix cache
    def _prefix_hits(self, seq: Sequence) -> list[int]:
        """Block ids holding the longest cached block-aligned prefix of ``seq`` (not its last token)."""
        hits, parent, bs = [], ("seed", seq.hash_seed), self.block_size
        if not self.enable_prefix_caching or seq.params.prompt_logprobs is not None:
            return hits  # scoring a prompt needs its logits: nothing of it may be skipped
        for i in range((seq.num_tokens - 1) // bs):
            block_id = self.hash_to_block.get(BlockKey(parent, tuple(seq.token_ids[i * bs : (i + 1) * bs])))
            if block_id is None:
                break
            hits.append(block_id)
            parent = self.blocks[block_id].content_id
        return hits

    def _take_free(self, prefer: int | None = None) -> Block:
        """A free block: ``prefer`` if it is fresh, else the lowest fresh id, else the least recently
        freed cached one."""
        if prefer is not None and prefer in self.fresh_set:
            block_id = prefer
            self.fresh_set.discard(block_id)
            if len(self.fresh) > 2 * len(self.fresh_set) + 64:  # drop the heap's stale entries
                self.fresh = sorted(self.fresh_set)
        elif self.fresh_set:
            block_id = heapq.heappop(self.fresh)
            while block_id not in self.fresh_set:  # taken earlier as a preferred id
                block_id = heapq.heappop(self.fresh)
            self.fresh_set.discard(block_id)
        else:
            block_id, _ = self.cached.popitem(last=False)
        block = self.blocks[block_id]
        if block.hash is not None:
            if self.hash_to_block.get(block.hash) == block_id:
                del self.hash_to_block[block.hash]
            block.hash, block.content_id = None, -1
        block.ref_count = 1
        return block

    # ------------------------------------------------------------------ admission / growth
    def _admission_cost(self, seq: Sequence) -> tuple[list[int], int]:
        hits = self._prefix_hits(seq)
        revived = sum(1 for b in hits if self.blocks[b].ref_count == 0)
        return hits, self.blocks_for(seq.num_tokens) - len(hits) + revived

    def can_allocate(self, seq: Sequence, reserve: int = 0) -> bool:
        return self._admission_cost(seq)[1] + reserve <= self.num_free_blocks

    def allocate(self, seq: Sequence) -> None:
        if seq.block_table:
            raise RuntimeError(f"{seq!r} already holds blocks")
        hits, cost = self._admission_cost(seq)
        if cost > self.num_free_blocks:
            raise RuntimeError(f"{seq!r} needs {cost} free blocks, {self.num_free_blocks} are free")
        for block_id in hits:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self.cached[block_id]
            block.ref_count += 1
        seq.block_table = list(hits)
        seq.num_computed_tokens = len(hits) * self.block_size
        if seq.num_preemptions == 0:  # a recompute's hits are not prompt tokens saved
            seq.num_cached_tokens = seq.num_computed_tokens
        seq.num_hashed_blocks = len(hits)
        new = self.blocks_for(seq.num_tokens) - len(hits)
        start = None
        if new and self.contiguous:
            growth = self._growth(seq, new)
            start = self._fresh_run(new + growth, growth)
        for i in range(new):
            seq.block_table.append(self._take_free(None if start is None else start + i).block_id)

    def can_append(self, seq: Sequence, num_tokens: int) -> bool:
        return self._append_cost(seq, num_tokens) <= self.num_free_blocks

    def _append_cost(self, seq: Sequence, num_tokens: int) -> int:
        return max(0, self.blocks_for(seq.num_computed_tokens + num_tokens) - len(seq.block_table))

    def append_slots(self, seq: Sequence, num_tokens: int) -> None:
        for _ in range(self._append_cost(seq, num_tokens)):
            after = seq.block_table[-1] + 1 if seq.block_table and self.contiguous else None
            seq.block_table.append(self._take_free(after).block_id)

    def _growth(self, seq: Sequence, new: int) -> int:
        """Blocks to leave free after a new sequence's prompt blocks so that its answer extends
        them in place: what its answer may need, at most as many blocks as the prompt takes, at most 16."""
        answer = self.blocks_for(seq.num_tokens + seq.max_tokens) - self.blocks_for(seq.num_tokens)
        return max(0, min(answer, new, 16))

    def _fresh_run(self, length: int, gap: int) -> int | None:
        """Where to put a new sequence's blocks: the lowest start of ``length`` consecutive fresh
        blocks, skipping the first ``gap`` of a free stretch that follows a block in use (room for
        that sequence to grow), else the start of the longest free stretch; None when fewer than
        ``length`` blocks are fresh."""
        if length > len(self.fresh_set):
            return None
        stretches, first, prev = [], None, None
        for block_id in sorted(self.fresh_set):
            if prev is None or block_id != prev + 1:
                if first is not None:
                    stretches.append((first, prev))
                first = block_id
            prev = block_id
        stretches.append((first, prev))
        best, best_len = None, 0
        for a, b in stretches:
            start = a + gap if a > 0 else a
            if b - start + 1 >= length:
                return start
            if b - a + 1 > best_len:
                best, best_len = a, b - a + 1
        return best

    def commit(self, seq: Sequence) -> None:
        """Hash the blocks of ``seq`` that are now full of computed tokens (nothing without prefix
        caching: freed blocks then go straight back to the fresh pool, and are reused warm)."""
        if not self.enable_prefix_caching:
            return
        bs, n = self.block_size, seq.num_hashed_blocks
        parent = ("seed", seq.hash_seed) if n == 0 else self.blocks[seq.block_table[n - 1]].content_id
        for i in range(n, seq.num_computed_tokens // bs):
            block = self.blocks[seq.block_table[i]]
            block.hash = BlockKey(parent, tuple(seq.token_ids[i * bs : (i + 1) * bs]))
            block.content_id = parent = next(self._content_ids)
            self.hash_to_block.setdefault(block.hash, block.block_id)
        seq.num_hashed_blocks = max(seq.num_hashed_blocks, seq.num_computed_tokens // bs)

    def free(self, seq: Sequence) -> None:
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                if block.hash is None:
                    heapq.heappush(self.fresh, block_id)
                    self.fresh_set.add(block_id)
                else:
                    self.cached[block_id] = None
        seq.block_table = []
        seq.num_computed_tokens = seq.num_hashed_blocks = 0
