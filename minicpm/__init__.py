"""minicpm: MiniCPM-2B-128k (and Llama-family checkpoints) end to end, without remote code."""

from .config import ConfigError, MiniCPMConfig
from .llm import LLM, Completion
from .model import DenseKVCache, MiniCPMForCausalLM
from .sampling import SamplingParams
from .tokenizer import Tokenizer, TokenizerError
from .weights import CheckpointError

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
