"""Engine settings: :class:`EngineConfig` (frozen; every field validated, errors name the field).

``EngineConfig()`` means the same on every device: the fields whose best value depends on the
device (``block_size``, ``max_num_seqs``, ``max_num_batched_tokens``) default to None, "per
device", and the engine resolves them (:meth:`EngineConfig.resolved`): on CUDA blocks of 64
tokens, 64 sequences and 8192-token steps; on CPU blocks of 128, 16 and 512 (a CPU reads a block
placed anywhere slower the smaller it is: the default model's 64-token bfloat16 blocks, 24 KiB of
keys, cost decode 17% more shuffled than in order, 128-token ones 9%). So a GPU user who sets only
the KV budget gets GPU-sized batches and chunks.
The KV budget is per device too: on CUDA from ``gpu_memory_utilization``, on CPU a byte budget
(``kv_cache_memory``; default a quarter of the available memory, at most 4 GiB); CUDA graphs on
CUDA, eager steps on CPU.
"""

from __future__ import annotations

import dataclasses

from ..quant import QUANTIZE_CHOICES, check_quantize


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    block_size: int | None = None  # None: per device (see the module docstring)
    max_num_seqs: int | None = None  # None: per device (see the module docstring)
    max_num_batched_tokens: int | None = None
    kv_cache_memory: int | None = None
    gpu_memory_utilization: float = 0.9
    max_model_len: int | None = None
    enable_prefix_caching: bool = True
    enforce_eager: bool = False
    # weight-only, CPU (minicpm.quant): "auto" runs the weights as loaded (a quantized checkpoint
    # quantized), "none" in float, "int8" (one scale per output channel, or groups of group_size)
    # or "int4" (groups of group_size, default 32, with a scale and a minimum each: llama.cpp's Q4_1)
    quantize: str = "auto"
    group_size: int | None = None

    def __post_init__(self) -> None:
        def bad(name: str, rule: str) -> ValueError:
            return ValueError(f"engine setting {name!r} must be {rule}, got {getattr(self, name)!r}")

        def positive_int(name: str) -> bool:
            value = getattr(self, name)
            return isinstance(value, int) and not isinstance(value, bool) and value >= 1

        if self.block_size is not None and (not positive_int("block_size") or self.block_size & (self.block_size - 1)):
            raise bad("block_size", "a power of two or None (per device)")
        for name in ("max_num_seqs", "max_num_batched_tokens"):
            if getattr(self, name) is not None and not positive_int(name):
                raise bad(name, "a positive integer or None (per device)")
        if (
            self.max_num_seqs is not None
            and self.max_num_batched_tokens is not None
            and (self.max_num_batched_tokens < self.max_num_seqs)
        ):
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
        if self.quantize not in QUANTIZE_CHOICES:
            raise bad("quantize", " or ".join(repr(c) for c in QUANTIZE_CHOICES))
        try:
            check_quantize(self.quantize, self.group_size)
        except ValueError as exc:
            raise ValueError(f"engine setting 'group_size': {exc}") from None

    def resolved(self, device: object) -> EngineConfig:
        """This config with its per-device fields filled in for ``device`` ("cpu", "cuda:0", a
        torch.device); a set field is kept (a token budget below the batch size is raised to it)."""
        cuda = str(device).startswith("cuda")
        block = self.block_size or (64 if cuda else 128)
        seqs = self.max_num_seqs or (64 if cuda else 16)
        tokens = self.max_num_batched_tokens or max(8192 if cuda else 512, seqs)
        return dataclasses.replace(self, block_size=block, max_num_seqs=seqs, max_num_batched_tokens=tokens)

    @classmethod
    def for_device(cls, device: str, **overrides: object) -> EngineConfig:
        """Defaults for ``device`` ("cpu" or "cuda..."), with ``overrides`` (None values ignored)."""
        return cls(**{k: v for k, v in overrides.items() if v is not None}).resolved(device)
