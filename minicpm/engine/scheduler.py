"""What runs at each engine step: :class:`Scheduler`. Plain Python, no tensors.

Contract: ``schedule()`` returns the sequences of the next forward and how many of their
uncomputed tokens each feeds, within a token budget (``max_num_batched_tokens``) and a batch
limit (``max_num_seqs``):

1. running sequences that are decoding (one token each) come first, so they advance every step;
2. then running sequences part-way through a (chunked) prefill, oldest first, each taking a chunk
   of what budget is left;
3. then waiting sequences, first come first served, admitted only when their blocks can be had
   (after prefix-cache reuse, and after ``on_admit``, which may mark more of its tokens
   computed); the queue head is never overtaken.

When a running sequence needs a new block and none is free, the newest running sequence is
preempted: its blocks are freed and it goes back to the front of the waiting queue, to be
recomputed from its tokens later (its own cached blocks may still be hit). Nothing is admitted in
a step that preempted. ``finish(seq, reason)`` (a stop, the length limit, an abort) frees a
sequence's blocks, whether it was running or still waiting.
Whether a request can ever fit is checked before it gets here (:class:`~minicpm.engine.llm_engine.LLMEngine`).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from .block_manager import BlockManager
from .sequence import Sequence, SequenceStatus


@dataclass
class ScheduledBatch:
    seqs: list[Sequence]
    num_tokens: list[int]

    @property
    def total_tokens(self) -> int:
        return sum(self.num_tokens)

    @property
    def leading_decodes(self) -> int:
        """How many sequences at the front take one token each (decodes come first in a step)."""
        return next((i for i, n in enumerate(self.num_tokens) if n != 1), len(self.num_tokens))

    @property
    def decode_only(self) -> bool:
        return all(n == 1 == s.num_uncomputed for s, n in zip(self.seqs, self.num_tokens, strict=True))


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int) -> None:
        if max_num_seqs < 1 or max_num_batched_tokens < 1:
            raise ValueError(
                f"max_num_seqs ({max_num_seqs}) and max_num_batched_tokens ({max_num_batched_tokens}) must be >= 1"
            )
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.num_cached_tokens = 0
        self.watermark_blocks = max(1, block_manager.num_blocks // 100)
        # called with each sequence just allocated, before its tokens are counted and scheduled
        # (the persistent prefix cache loads blocks into it there)
        self.on_admit: Callable[[Sequence], object] | None = None

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def schedule(self) -> ScheduledBatch:
        budget = self.max_num_batched_tokens
        seqs: list[Sequence] = []
        counts: list[int] = []
        preempted = False
        decoding = [s for s in self.running if s.num_uncomputed == 1]
        prefilling = [s for s in self.running if s.num_uncomputed > 1]
        for seq in sorted(decoding, key=lambda s: s.arrival) + sorted(prefilling, key=lambda s: s.arrival):
            if budget == 0:
                break
            if seq.status is not SequenceStatus.RUNNING:  # preempted earlier in this loop
                continue
            n = min(seq.num_uncomputed, budget)
            while not self.block_manager.can_append(seq, n):
                victim = max(self.running, key=lambda s: s.arrival)
                if victim in seqs:  # scheduled earlier in this loop: take it back out
                    i = seqs.index(victim)
                    budget += counts.pop(i)
                    seqs.pop(i)
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
            if seq.status is not SequenceStatus.RUNNING:
                continue
            self.block_manager.append_slots(seq, n)
            seqs.append(seq)
            counts.append(n)
            budget -= n
        while self.waiting and budget > 0 and not preempted and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            # keep a few blocks back for the running sequences' next tokens, unless nothing runs
            reserve = self.watermark_blocks if self.running else 0
            if not self.block_manager.can_allocate(seq, reserve):
                break
            self.waiting.popleft()
            self.block_manager.allocate(seq)
            if self.on_admit is not None:
                self.on_admit(seq)
            if seq.num_preemptions == 0:  # a recompute's hits are not prompt tokens saved
                self.num_cached_tokens += seq.num_cached_tokens
            seq.status = SequenceStatus.RUNNING
            if seq.first_scheduled is None:
                seq.first_scheduled = time.monotonic()
            self.running.append(seq)
            n = min(seq.num_uncomputed, budget)
            seqs.append(seq)
            counts.append(n)
            budget -= n
        return ScheduledBatch(seqs, counts)

    def finish(self, seq: Sequence, reason: str) -> None:
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
