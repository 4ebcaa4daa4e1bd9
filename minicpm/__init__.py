"""minicpm: MiniCPM-2B-128k (and Llama-family checkpoints) end to end, without remote code.

The public names below are imported on first use (PEP 562), so ``import minicpm`` and the
``minicpm`` command start without loading torch until a model is needed.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "LLM": "llm",
    "CheckpointError": "weights",
    "Completion": "llm",
    "ConfigError": "config",
    "DenseKVCache": "model",
    "MiniCPMConfig": "config",
    "MiniCPMForCausalLM": "model",
    "SamplingParams": "sampling",
    "Tokenizer": "tokenizer",
    "TokenizerError": "tokenizer",
}

if TYPE_CHECKING:
    from .config import ConfigError, MiniCPMConfig
    from .llm import LLM, Completion
    from .model import DenseKVCache, MiniCPMForCausalLM
    from .sampling import SamplingParams
    from .tokenizer import Tokenizer, TokenizerError
    from .weights import CheckpointError


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'minicpm' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


__all__ = [
    "LLM",
    "CheckpointError",
    "Completion",
    "ConfigError",
    "DenseKVCache",
    "MiniCPMConfig",
    "MiniCPMForCausalLM",
    "SamplingParams",
    "Tokenizer",
    "TokenizerError",
]
__version__ = "0.1.0"
