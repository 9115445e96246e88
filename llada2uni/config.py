"""Configuration dataclasses, built straight from a checkpoint's ``config.json``.

Unknown keys are dropped; derived sizes are computed in ``__post_init__``. Keys that the
LLaDA2.0-Uni ``config.json`` leaves out get the LLaDA2-family values (spec backbone.md 2.2), not the
generic transformers defaults, which would build a different model (e.g. a tied head).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A checkpoint config that cannot describe a valid model."""


def read_json(path: str | Path, what: str = "config file") -> dict[str, Any]:
    """A JSON object from a checkpoint file, or a ConfigError that names the file and the problem."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{what} not found: {path}") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} does not hold a JSON object")
    return raw


def init_fields(cls) -> set[str]:
    """Names a config dataclass takes from JSON (derived fields excluded)."""
    return {f.name for f in dataclasses.fields(cls) if f.init}


def _accepts(annotation: str, value: Any) -> bool:
    """Whether a JSON value fits a field's annotation ("int", "float | None", "list[int]", ...):
    JSON has no int/float distinction for floats, but "64" is not an int and 3.5 is not one either."""
    for kind in (part.strip() for part in annotation.split("|")):
        base = kind.split("[")[0]
        if base == "None" and value is None:
            return True
        if base == "int" and isinstance(value, int) and not isinstance(value, bool):
            return True
        if base == "float" and isinstance(value, (int, float)) and not isinstance(value, bool):
            return True
        if base in ("bool", "str", "dict") and type(value).__name__ == base:
            return True
        if base in ("list", "tuple") and isinstance(value, (list, tuple)):
            return True
        if base not in ("None", "int", "float", "bool", "str", "dict", "list", "tuple"):
            return True  # a type this check does not know: the dataclass's own validation decides
    return False


def from_known_keys(cls, raw: dict[str, Any], where: str = ""):
    """``cls`` built from the keys of ``raw`` it knows (unknown keys are dropped); a value of the
    wrong JSON type is a ConfigError naming the key, not a TypeError deep in the model."""
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    values = {k: v for k, v in raw.items() if k in fields}
    for key, value in values.items():
        annotation = fields[key].type if isinstance(fields[key].type, str) else getattr(
            fields[key].type, "__name__", "")
        if not _accepts(annotation, value):
            raise ConfigError(f"{where}config key {key!r} must be {annotation.replace(' | ', ' or ')}, got "
                              f"{value!r} ({type(value).__name__})")
    return cls(**values)


def require(checks: list[tuple[bool, str]], where: str = "") -> None:
    """Raise a ConfigError with the first failed check's message, prefixed by ``where``."""
    for ok, message in checks:
        if not ok:
            raise ConfigError(f"{where}{message}")


@dataclass
class BackboneConfig:
    """The LLaDA2 MoE backbone (``model_type = llada2_moe``).

    Defaults are the LLaDA2.0-Uni values; the fields marked "family default" are absent from the
    Uni ``config.json`` and take the LLaDA2 value (spec 2.2).
    """

    vocab_size: int = 173568
    hidden_size: int = 2048
    intermediate_size: int = 5120
    num_hidden_layers: int = 20
    num_attention_heads: int = 16
    num_key_value_heads: int = 4
    head_dim: int | None = 128
    hidden_act: str = "silu"
    use_qkv_bias: bool = False
    use_qk_norm: bool = True
    use_bias: bool = False
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 8192
    rope_theta: float = 600000.0
    partial_rotary_factor: float = 0.5
    rope_parameters: dict | None = None
    rotary_dim: int | None = None
    pad_token_id: int = 156892
    eos_token_id: int | list[int] | None = None
    num_experts: int = 256
    num_shared_experts: int = 1
    num_experts_per_tok: int = 8
    n_group: int = 8
    topk_group: int = 4
    routed_scaling_factor: float = 2.5
    moe_intermediate_size: int = 512
    first_k_dense_replace: int = 1
    image_token_offset: int = 157184
    # family defaults (absent from the Uni config.json)
    score_function: str = "sigmoid"
    norm_topk_prob: bool = True
    moe_router_enable_expert_bias: bool = True
    router_dtype: str = "fp32"
    tie_word_embeddings: bool = False
    mask_token_id: int = 156895
    torch_dtype: str = "bfloat16"
    model_type: str = "llada2_moe"
    # from_dict: keys that fix the model's shapes, required in a config.json (not a field)
    REQUIRED_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "num_experts", "num_experts_per_tok", "moe_intermediate_size")
    # derived
    image_vocab_size: int = field(init=False)
    num_kv_groups: int = field(init=False)
    qkv_size: int = field(init=False)
    experts_per_group: int = field(init=False)

    def __post_init__(self) -> None:
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.rope_parameters:
            # transformers >= 4.56 style nests theta / partial factor; the flat keys are the fallback.
            self.rope_theta = float(self.rope_parameters.get("rope_theta", self.rope_theta))
            self.partial_rotary_factor = float(
                self.rope_parameters.get("partial_rotary_factor", self.partial_rotary_factor))
        if self.rotary_dim is None:
            self.rotary_dim = int(self.head_dim * self.partial_rotary_factor)
        self.image_vocab_size = self.vocab_size - self.image_token_offset
        self.num_kv_groups = self.num_attention_heads // max(self.num_key_value_heads, 1)
        self.qkv_size = (self.num_attention_heads + 2 * self.num_key_value_heads) * self.head_dim
        self.experts_per_group = self.num_experts // max(self.n_group, 1)
        self.validate()

    def validate(self) -> None:
        checks = [
            (self.num_attention_heads % self.num_key_value_heads == 0,
             "num_attention_heads must be a multiple of num_key_value_heads"),
            (self.rotary_dim % 2 == 0 and 0 < self.rotary_dim <= self.head_dim,
             f"rotary_dim {self.rotary_dim} must be even and within head_dim {self.head_dim}"),
            (self.num_experts % self.n_group == 0, "num_experts must be a multiple of n_group"),
            (self.topk_group <= self.n_group, "topk_group must not exceed n_group"),
            (self.num_experts_per_tok <= self.topk_group * self.experts_per_group,
             "num_experts_per_tok exceeds the experts reachable in topk_group groups"),
            (0 < self.image_token_offset < self.vocab_size,
             "image_token_offset must lie inside the vocabulary"),
            (self.score_function == "sigmoid",
             f"score_function {self.score_function!r} is not supported (LLaDA2 uses sigmoid)"),
            (self.hidden_act == "silu", f"hidden_act {self.hidden_act!r} is not supported"),
            (not self.tie_word_embeddings, "tied word embeddings are not supported by LLaDA2"),
        ]
        require(checks)

    def is_moe_layer(self, layer: int) -> bool:
        return layer >= self.first_k_dense_replace

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "BackboneConfig":
        """From a checkpoint's config.json: the keys that fix the model's shapes must be there (a
        missing one would silently build the 16B model's size); the others may fall back."""
        missing = [k for k in cls.REQUIRED_KEYS if k not in raw]
        if missing:
            raise ConfigError(f"config.json lacks {', '.join(missing)} (keys every LLaDA2 MoE config has)")
        return from_known_keys(cls, raw)

    @classmethod
    def from_file(cls, path: str | Path) -> "BackboneConfig":
        return cls.from_dict(read_json(path, "config file"))

    def to_dict(self) -> dict[str, Any]:
        """Every key written explicitly (spec 2.2: other implementations' defaults differ)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}
        out["architectures"] = ["LLaDA2MoeModelLM"]
        return out
