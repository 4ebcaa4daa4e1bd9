"""Per-request state of the engine: :class:`Sequence`.

Contract: a sequence holds its token ids (prompt, then output), how many of them have keys/values
in the KV cache (``num_computed_tokens``), the physical KV blocks that hold them
(``block_table``), its sampling parameters and stop ids, and the fixed RoPE length that decides
its dynamic-NTK base. It holds no tensors. The next forward of a sequence feeds
``token_ids[num_computed_tokens:]`` (all of it or a chunk); a token is sampled only when that
reaches the end, so prefill, chunked prefill, decode and recompute after preemption are one case.
"""

from __future__ import annotations

import enum
import itertools
import time
from dataclasses import dataclass, field

import torch

from ..sampling import SamplingParams

_arrival = itertools.count()


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    stop_ids: frozenset[int]
    max_tokens: int
    rope_length: int
    # hashable, with a stable repr (the persistent prefix cache keys files by it); equal only for
    # sequences whose keys/values are equal for equal ids
    hash_seed: object
    generator: torch.Generator | None = None
    token_ids: list[int] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0
    num_hashed_blocks: int = 0
    block_table: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    num_preemptions: int = 0
    arrival: int = field(default_factory=lambda: next(_arrival))
    created: float = field(default_factory=time.monotonic)  # when the request was made
    first_scheduled: float | None = None  # when it was first admitted (queue time = this - created)
    # with params.prompt_logprobs: entry p is the logprob (and top alternatives) of prompt token p + 1
    prompt_logprobs: list | None = None

    def __post_init__(self) -> None:
        if not self.token_ids:
            self.token_ids = list(self.prompt_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[len(self.prompt_ids) :]

    @property
    def num_uncomputed(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def __repr__(self) -> str:
        return (
            f"Sequence({self.request_id!r}, {self.status.value}, tokens={self.num_tokens}, "
            f"computed={self.num_computed_tokens}, blocks={len(self.block_table)})"
        )
