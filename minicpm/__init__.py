"""minicpm: MiniCPM-2B-128k (and Llama-family checkpoints) end to end, without remote code."""

from .config import ConfigError, MiniCPMConfig
from .model import DenseKVCache, MiniCPMForCausalLM
from .weights import CheckpointError

__all__ = ["CheckpointError", "ConfigError", "DenseKVCache", "MiniCPMConfig", "MiniCPMForCausalLM"]
__version__ = "0.1.0"
