"""Model configuration: what a checkpoint's config.json says, validated.

Contract: :class:`MiniCPMConfig` is an immutable description of one decoder. It is built from a
MiniCPM config.json (``architectures`` ``["MiniCPMForCausalLM"]`` or ``model_type`` "minicpm";
missing fields take the reference ``configuration_minicpm.py`` defaults) or from a Llama-family
config.json (``model_type`` "llama" or ``LlamaForCausalLM``), which maps to the neutral scales
(``scale_emb`` 1, ``scale_depth`` sqrt(layers), ``dim_model_base`` hidden_size) so that one model
class runs both. Every field is checked on construction and an invalid one raises
:class:`ConfigError` naming it. The dynamic-NTK rule (which RoPE base a sequence gets) lives
here, once: :meth:`MiniCPMConfig.rope_base`.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

from .errors import UserError

ROPE_TYPES = ("none", "linear", "dynamic")

# MiniCPM-2B-128k's config.json as OpenBMB publishes it (openbmb/MiniCPM-2B-128k on Hugging Face): the exact
# shape that plans, benchmarks and tests use (``MiniCPMConfig.from_dict(MINICPM_2B_128K)``); copy
# it (``MINICPM_2B_128K | {...}``) to change fields.
MINICPM_2B_128K: dict[str, Any] = {
    "_name_or_path": "openbmb/CPM-2B",
    "architectures": ["MiniCPMForCausalLM"],
    "auto_map": {
        "AutoConfig": "configuration_minicpm.MiniCPMConfig",
        "AutoModel": "modeling_minicpm.MiniCPMModel",
        "AutoModelForCausalLM": "modeling_minicpm.MiniCPMForCausalLM",
        "AutoModelForSeq2SeqLM": "modeling_minicpm.MiniCPMForCausalLM",
        "AutoModelForSequenceClassification": "modeling_minicpm.MiniCPMForSequenceClassification",
    },
    "bos_token_id": 1,
    "eos_token_id": 2,
    "hidden_act": "silu",
    "hidden_size": 2304,
    "initializer_range": 0.1,
    "intermediate_size": 5760,
    "max_position_embeddings": 65536,
    "num_attention_heads": 36,
    "num_hidden_layers": 40,
    "num_key_value_heads": 36,
    "rms_norm_eps": 1e-05,
    "rope_scaling": {"type": "dynamic", "factor": 4.0},
    "torch_dtype": "bfloat16",
    "transformers_version": "4.36.0",
    "use_cache": True,
    "vocab_size": 122760,
    "scale_emb": 12,
    "dim_model_base": 256,
    "scale_depth": 1.4,
    "rope_theta": 1000000.0,
    "max_length": 131072,
    "tie_word_embeddings": False,
}


class ConfigError(UserError):
    """A config.json field is missing, malformed or unsupported; the message names it."""


@dataclasses.dataclass(frozen=True)
class MiniCPMConfig:
    """Shape and numerics of a MiniCPM (or Llama-family) decoder.

    Defaults are those of the reference ``MiniCPMConfig``; :meth:`from_dict` fills Llama
    configs with neutral scales instead.
    """

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    max_position_embeddings: int = 2048
    max_length: int | None = None
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    rms_norm_eps: float = 1e-6
    scale_emb: float = 1.0
    dim_model_base: float = 1.0
    scale_depth: float = 1.0
    tie_word_embeddings: bool = True
    hidden_act: str = "silu"
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    pad_token_id: int | None = None
    torch_dtype: str | None = None
    model_type: str = "minicpm"

    def __post_init__(self) -> None:
        if self.num_key_value_heads is None:
            object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "max_position_embeddings",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"config field {name!r} must be a positive integer, got {value!r}")
        if self.max_length is not None and (
            isinstance(self.max_length, bool) or not isinstance(self.max_length, int) or self.max_length <= 0
        ):
            raise ConfigError(f"config field 'max_length' must be a positive integer, got {self.max_length!r}")
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ConfigError(
                    f"config field 'hidden_size' ({self.hidden_size}) is not divisible by "
                    f"'num_attention_heads' ({self.num_attention_heads})"
                )
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        elif isinstance(self.head_dim, bool) or not isinstance(self.head_dim, int) or self.head_dim <= 0:
            raise ConfigError(f"config field 'head_dim' must be a positive integer, got {self.head_dim!r}")
        if self.head_dim % 2:
            raise ConfigError(f"config field 'head_dim' must be even for rotary embeddings, got {self.head_dim}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"config field 'num_attention_heads' ({self.num_attention_heads}) is not divisible by "
                f"'num_key_value_heads' ({self.num_key_value_heads})"
            )
        for name in ("rope_theta", "rms_norm_eps", "scale_emb", "dim_model_base", "scale_depth"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ConfigError(f"config field {name!r} must be a positive number, got {value!r}")
            object.__setattr__(self, name, float(value))
        if self.hidden_act != "silu":
            raise ConfigError(f"config field 'hidden_act' is {self.hidden_act!r}; only 'silu' is supported")
        object.__setattr__(self, "rope_scaling", _normalize_rope_scaling(self.rope_scaling))
        for name in ("bos_token_id", "pad_token_id"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise ConfigError(f"config field {name!r} must be an integer or null, got {value!r}")
        eos = self.eos_token_id
        eos_list = eos if isinstance(eos, list) else [eos] if eos is not None else []
        if any(isinstance(e, bool) or not isinstance(e, int) for e in eos_list):
            raise ConfigError(f"config field 'eos_token_id' must be an integer or a list of integers, got {eos!r}")

    # ----------------------------------------------------------------- derived numbers
    @property
    def rope_type(self) -> str:
        return self.rope_scaling["type"] if self.rope_scaling else "none"

    @property
    def rope_factor(self) -> float:
        return float(self.rope_scaling["factor"]) if self.rope_scaling else 1.0

    @property
    def residual_scale(self) -> float:
        """Multiplier of every residual branch: scale_depth / sqrt(num_hidden_layers)."""
        return self.scale_depth / math.sqrt(self.num_hidden_layers)

    @property
    def logit_scale(self) -> float:
        """Multiplier of the final hidden state before the head: dim_model_base / hidden_size."""
        return self.dim_model_base / self.hidden_size

    @property
    def eos_token_ids(self) -> list[int]:
        eos = self.eos_token_id
        return list(eos) if isinstance(eos, list) else [eos] if eos is not None else []

    @property
    def context_length(self) -> int:
        """Longest sequence (prompt + answer) served: ``max_length`` if the config has it
        (MiniCPM-2B-128k: 131072), else ``max_position_embeddings``."""
        return self.max_length or self.max_position_embeddings

    def rope_base(self, seq_len: int) -> float:
        """RoPE base for a sequence whose length is ``seq_len``.

        Plain ``rope_theta`` unless the scaling is dynamic NTK and ``seq_len`` exceeds
        ``max_position_embeddings``; then the reference's stretched base
        ``theta * (factor * S / max_pos - (factor - 1)) ** (d / (d - 2))``.
        """
        if self.rope_type != "dynamic" or seq_len <= self.max_position_embeddings:
            return self.rope_theta
        factor, d = self.rope_factor, self.head_dim
        stretch = factor * seq_len / self.max_position_embeddings - (factor - 1)
        return self.rope_theta * stretch ** (d / (d - 2))

    def kv_bytes_per_token(self, bytes_per_element: int = 2) -> int:
        return 2 * self.num_hidden_layers * self.num_key_value_heads * self.head_dim * bytes_per_element

    # ----------------------------------------------------------------- (de)serialization
    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> MiniCPMConfig:
        """Build from a config.json dictionary (MiniCPM or Llama family)."""
        if not isinstance(raw, dict):
            raise ConfigError(f"config must be a JSON object, got {type(raw).__name__}")
        model_type = raw.get("model_type")
        archs = raw.get("architectures") or []
        if not isinstance(archs, list):
            raise ConfigError(f"config field 'architectures' must be a list, got {archs!r}")
        if model_type == "minicpm" or (model_type is None and "MiniCPMForCausalLM" in archs):
            kind = "minicpm"
        elif model_type == "llama" or (model_type is None and "LlamaForCausalLM" in archs):
            kind = "llama"
        else:
            raise ConfigError(
                f"config field 'model_type' is {model_type!r} (architectures {archs!r}); "
                "supported: MiniCPM ('minicpm' / MiniCPMForCausalLM) and Llama ('llama' / LlamaForCausalLM)"
            )
        for flag in ("attention_bias", "mlp_bias"):
            if raw.get(flag):
                raise ConfigError(f"config field {flag!r} is true; biased projections are not supported")
        if raw.get("pretraining_tp", 1) not in (1, None):
            raise ConfigError(f"config field 'pretraining_tp' is {raw['pretraining_tp']!r}; only 1 is supported")
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in raw.items() if k in names}
        kwargs["model_type"] = kind
        if "rope_scaling" not in raw and isinstance(raw.get("rope_parameters"), dict):
            params = dict(raw["rope_parameters"])
            kwargs.setdefault("rope_theta", params.pop("rope_theta", cls.rope_theta))
            kwargs["rope_scaling"] = params
        if kind == "llama":
            layers = kwargs.get("num_hidden_layers", cls.num_hidden_layers)
            hidden = kwargs.get("hidden_size", cls.hidden_size)
            kwargs.setdefault("tie_word_embeddings", False)
            kwargs.setdefault("rms_norm_eps", 1e-6)
            if isinstance(layers, int) and layers > 0:
                kwargs["scale_depth"] = math.sqrt(layers)
            kwargs["scale_emb"] = 1.0
            kwargs["dim_model_base"] = hidden
        return cls(**kwargs)

    @classmethod
    def from_json_file(cls, path: str | Path) -> MiniCPMConfig:
        path = Path(path)
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"no config.json at {path}") from None
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path} is not valid JSON: {exc}") from None
        except UnicodeDecodeError as exc:
            raise ConfigError(
                f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start}): is it a config.json?"
            ) from None
        except IsADirectoryError:
            raise ConfigError(f"{path} is a directory, not a config.json") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path} must hold a JSON object, not {type(raw).__name__}")
        return cls.from_dict(raw)

    @classmethod
    def from_pretrained(cls, path: str | Path) -> MiniCPMConfig:
        path = Path(path)
        return cls.from_json_file(path / "config.json" if path.is_dir() else path)

    def to_dict(self) -> dict[str, Any]:
        """A config.json that this class (and the reference MiniCPM code) reads back."""
        out = dataclasses.asdict(self)
        out["architectures"] = ["MiniCPMForCausalLM" if self.model_type == "minicpm" else "LlamaForCausalLM"]
        for optional in ("rope_scaling", "max_length"):
            if out[optional] is None:
                out.pop(optional)
        if self.head_dim * self.num_attention_heads == self.hidden_size:
            out.pop("head_dim")  # derived; the reference MiniCPM config has no such field
        return out

    def save(self, path: str | Path) -> None:
        """Write config.json, via a temporary name so a half-written file never has the real one."""
        from .fileio import write_text_atomic

        write_text_atomic(path, json.dumps(self.to_dict(), indent=2) + "\n")


def _normalize_rope_scaling(scaling: Any) -> dict[str, Any] | None:
    if scaling is None:
        return None
    if not isinstance(scaling, dict):
        raise ConfigError(f"config field 'rope_scaling' must be an object or null, got {scaling!r}")
    kind = scaling.get("type", scaling.get("rope_type"))
    if kind in (None, "default", "none"):
        return None
    if kind not in ROPE_TYPES:
        raise ConfigError(f"config field 'rope_scaling' has unknown type {kind!r} (known: {', '.join(ROPE_TYPES)})")
    factor = scaling.get("factor")
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not factor > 0:
        raise ConfigError(f"config field 'rope_scaling.factor' must be a positive number, got {factor!r}")
    if kind == "dynamic" and factor < 1:
        raise ConfigError(f"config field 'rope_scaling.factor' must be >= 1 for dynamic NTK, got {factor!r}")
    return {"type": kind, "factor": float(factor)}
