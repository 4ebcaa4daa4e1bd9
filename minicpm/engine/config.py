"""Engine settings: :class:`EngineConfig` (frozen; every field validated, errors name the field).

Defaults depend on the device (``EngineConfig.for_device``): on CUDA, bigger prefill chunks and
batches, a KV budget from ``gpu_memory_utilization``, CUDA graphs on; on CPU, a byte budget
(``kv_cache_memory``; default a quarter of the available memory, at most 4 GiB) and eager steps.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    block_size: int = 64
    max_num_seqs: int = 16
    max_num_batched_tokens: int = 512
    kv_cache_memory: int | None = None
    gpu_memory_utilization: float = 0.9
    max_model_len: int | None = None
    enable_prefix_caching: bool = True
    enforce_eager: bool = False

    def __post_init__(self) -> None:
        def bad(name: str, rule: str) -> ValueError:
            return ValueError(f"engine setting {name!r} must be {rule}, got {getattr(self, name)!r}")

        def positive_int(name: str) -> bool:
            value = getattr(self, name)
            return isinstance(value, int) and not isinstance(value, bool) and value >= 1

        if not positive_int("block_size") or self.block_size & (self.block_size - 1):
            raise bad("block_size", "a power of two")
        for name in ("max_num_seqs", "max_num_batched_tokens"):
            if not positive_int(name):
                raise bad(name, "a positive integer")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(
                f"engine setting 'max_num_batched_tokens' ({self.max_num_batched_tokens}) must be at least "
                f"'max_num_seqs' ({self.max_num_seqs}), or some decoding requests would never get a step"
            )
        if self.kv_cache_memory is not None and not positive_int("kv_cache_memory"):
            raise bad("kv_cache_memory", "a positive number of bytes or None")
        if self.max_model_len is not None and not positive_int("max_model_len"):
            raise bad("max_model_len", "a positive integer or None")
        if not isinstance(self.gpu_memory_utilization, (int, float)) or not 0 < self.gpu_memory_utilization <= 1:
            raise bad("gpu_memory_utilization", "in (0, 1]")

    @classmethod
    def for_device(cls, device: str, **overrides: object) -> EngineConfig:
        """Defaults for ``device`` ("cpu" or "cuda..."), with ``overrides`` (None values ignored)."""
        fields = {"max_num_seqs": 64, "max_num_batched_tokens": 8192} if str(device).startswith("cuda") else {}
        fields.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**fields)
