"""Model configuration: one dataclass for every Llama-family decoder we run.

:class:`ModelConfig` is built three ways:

* from a Hugging Face ``config.json`` (:meth:`ModelConfig.from_hf_dict`), in
  both shapes found in the wild: ``rope_theta`` + ``rope_scaling`` (older
  files, as on the hub) and ``rope_parameters`` (written by transformers 5);
* from a named preset (:func:`preset`), e.g. ``"tiny"`` for tests or
  ``"llama-1b"`` for speed work at realistic scale;
* by hand, as a dataclass.

It is validated in ``__post_init__`` so that a bad config fails here, with a
message, not deep inside a matmul.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError

#: Hugging Face architectures this library implements, with their model_type.
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}

#: RoPE variants implemented by :mod:`llmopt_lab.model`.
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


@dataclass
class ModelConfig:
    """Shape and numerics of a Llama-family decoder.

    Sizes are counts (not bytes). ``head_dim`` defaults to
    ``hidden_size // num_heads`` when not given (some models, e.g. Qwen3 or
    Mistral-Nemo, set it explicitly to something else).

    ``rope_scaling`` is normalised to a dict with a ``"rope_type"`` key, or
    None. ``sliding_window`` (Mistral) is the number of keys a query sees,
    itself included; ``layer_types`` says which layers use it
    (``"sliding_attention"``) and which see everything (``"full_attention"``);
    when ``sliding_window`` is set and ``layer_types`` is None, every layer
    slides.

    ``layer_intermediate_sizes`` and ``layer_num_heads`` (one entry per layer)
    record a structurally pruned model whose layers have different MLP widths
    or numbers of query heads (lesson 04); None means every layer has
    ``intermediate_size`` and ``num_heads``. The KV heads stay the same in every
    layer, so the caches do not change. Such a checkpoint is for this library:
    transformers reads only the uniform sizes.

    Raises:
        ConfigError: on construction, for sizes that are not positive
            integers, query heads that are not a multiple of the KV heads, an
            odd head_dim, a bad sliding window or layer types, per-layer
            lists of the wrong length (the message names the field and value).
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int | None = None
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    sliding_window: int | None = None
    layer_types: tuple[str, ...] | None = None
    hidden_act: str = "silu"
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    architecture: str = "LlamaForCausalLM"
    torch_dtype: str | None = None
    layer_intermediate_sizes: tuple[int, ...] | None = None
    layer_num_heads: tuple[int, ...] | None = None
    name: str = "custom"
    extra: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.head_dim is None:
            if self.hidden_size % self.num_heads:
                raise ConfigError(
                    f"hidden_size {self.hidden_size} is not divisible by num_heads "
                    f"{self.num_heads}; give head_dim explicitly"
                )
            self.head_dim = self.hidden_size // self.num_heads
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                     "num_heads", "num_kv_heads", "head_dim", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                f"({self.num_kv_heads}) for grouped-query attention"
            )
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.hidden_act not in ("silu", "swish"):
            raise ConfigError(
                f"hidden_act {self.hidden_act!r} is not supported: the SwiGLU MLP uses 'silu'"
            )
        if self.rope_scaling is not None:
            rope_type = self.rope_scaling.get("rope_type")
            if rope_type not in SUPPORTED_ROPE_TYPES:
                raise ConfigError(
                    f"RoPE scaling type {rope_type!r} is not supported; supported: "
                    f"{', '.join(SUPPORTED_ROPE_TYPES)}"
                )
            if rope_type == "default":
                self.rope_scaling = None
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise ConfigError(f"sliding_window must be positive or None, got {self.sliding_window}")
        for name in ("layer_intermediate_sizes", "layer_num_heads"):
            sizes = getattr(self, name)
            if sizes is None:
                continue
            sizes = tuple(sizes)
            setattr(self, name, sizes)
            if len(sizes) != self.num_layers or not all(
                    isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in sizes):
                raise ConfigError(f"{name} must hold {self.num_layers} positive integers (one per "
                                  f"layer), got {list(sizes)}")
        if self.layer_num_heads is not None and any(h % self.num_kv_heads for h in self.layer_num_heads):
            raise ConfigError(f"every layer's query heads must be a multiple of num_kv_heads "
                              f"({self.num_kv_heads}), got {list(self.layer_num_heads)}")
        if self.layer_types is not None:
            self.layer_types = tuple(self.layer_types)
            if len(self.layer_types) != self.num_layers:
                raise ConfigError(
                    f"layer_types has {len(self.layer_types)} entries for {self.num_layers} layers"
                )
            unknown = set(self.layer_types) - {"full_attention", "sliding_attention"}
            if unknown:
                raise ConfigError(f"unsupported layer types {sorted(unknown)}")
            if "sliding_attention" in self.layer_types and self.sliding_window is None:
                raise ConfigError("layer_types asks for sliding attention but sliding_window is None")

    # ------------------------------------------------------------------ derived
    @property
    def group_size(self) -> int:
        """Query heads per KV head (1 = multi-head, num_heads = multi-query)."""
        return self.num_heads // self.num_kv_heads

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    def intermediate_size_at(self, layer_idx: int) -> int:
        """The MLP width of one layer (``intermediate_size`` unless pruned per layer)."""
        if self.layer_intermediate_sizes is None:
            return self.intermediate_size
        return self.layer_intermediate_sizes[layer_idx]

    def num_heads_at(self, layer_idx: int) -> int:
        """The query heads of one layer (``num_heads`` unless pruned per layer)."""
        if self.layer_num_heads is None:
            return self.num_heads
        return self.layer_num_heads[layer_idx]

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def layer_window(self, layer_idx: int) -> int | None:
        """The sliding window of a layer in tokens, or None for full attention."""
        if self.sliding_window is None:
            return None
        if self.layer_types is None or self.layer_types[layer_idx] == "sliding_attention":
            return self.sliding_window
        return None

    @property
    def eos_token_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        if isinstance(self.eos_token_id, int):
            return [self.eos_token_id]
        return list(self.eos_token_id)

    def num_parameters(self, include_embeddings: bool = True) -> int:
        """Parameter count implied by the config (counts, not bytes)."""
        h = self.hidden_size
        total = h
        for layer in range(self.num_layers):
            i, q = self.intermediate_size_at(layer), self.num_heads_at(layer) * self.head_dim
            attn = h * q + 2 * h * self.kv_size + q * h
            if self.qkv_bias:
                attn += q + 2 * self.kv_size
            if self.o_bias:
                attn += h
            mlp = 3 * h * i + (2 * i + h if self.mlp_bias else 0)
            total += attn + mlp + 2 * h
        if include_embeddings:
            total += self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        elif not self.tie_word_embeddings:
            total += self.vocab_size * h  # the lm_head is a real matmul per token
        return total

    def replace(self, **changes: Any) -> "ModelConfig":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------ Hugging Face
    @classmethod
    def from_hf_dict(cls, d: dict, name: str = "custom") -> "ModelConfig":
        """Build from the dict of a Hugging Face ``config.json``.

        Raises :class:`ConfigError` for an unsupported architecture (naming
        the supported ones), an unsupported RoPE scaling, or missing fields.
        """
        archs = d.get("architectures") or []
        model_type = d.get("model_type")
        arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
        if arch is None:
            by_type = {v: k for k, v in SUPPORTED_ARCHITECTURES.items()}
            if not archs and model_type in by_type:
                arch = by_type[model_type]
            else:
                found = ", ".join(archs) or f"model_type={model_type!r}"
                raise ConfigError(
                    f"unsupported architecture {found}; llmopt_lab runs "
                    f"{', '.join(SUPPORTED_ARCHITECTURES)}"
                )
        model_type = SUPPORTED_ARCHITECTURES[arch]
        try:
            rope_theta, rope_scaling = _read_rope(d)
            qwen = model_type == "qwen2"
            sliding = d.get("sliding_window")
            layer_types = d.get("layer_types")
            if qwen:
                # Qwen2 keeps sliding_window in the file but uses it only when
                # use_sliding_window is true, and then only on some layers.
                if not d.get("use_sliding_window", False):
                    sliding, layer_types = None, None
                elif layer_types is None:
                    first = d.get("max_window_layers", d["num_hidden_layers"])
                    layer_types = ["full_attention" if i < first else "sliding_attention"
                                   for i in range(d["num_hidden_layers"])]
            if sliding is None and layer_types is not None:
                layer_types = None
            return cls(
                vocab_size=d["vocab_size"],
                hidden_size=d["hidden_size"],
                intermediate_size=d["intermediate_size"],
                num_layers=d["num_hidden_layers"],
                num_heads=d["num_attention_heads"],
                num_kv_heads=d.get("num_key_value_heads") or d["num_attention_heads"],
                head_dim=d.get("head_dim"),
                max_position_embeddings=d.get("max_position_embeddings", 2048),
                rms_norm_eps=d.get("rms_norm_eps", 1e-6),
                rope_theta=rope_theta,
                rope_scaling=rope_scaling,
                qkv_bias=True if qwen else bool(d.get("attention_bias", False)),
                o_bias=False if qwen else bool(d.get("attention_bias", False)),
                mlp_bias=bool(d.get("mlp_bias", False)),
                tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
                sliding_window=sliding,
                layer_types=tuple(layer_types) if layer_types else None,
                hidden_act=d.get("hidden_act", "silu"),
                bos_token_id=d.get("bos_token_id"),
                eos_token_id=d.get("eos_token_id"),
                pad_token_id=d.get("pad_token_id"),
                architecture=arch,
                torch_dtype=d.get("torch_dtype") or d.get("dtype"),
                layer_intermediate_sizes=d.get("llmopt_layer_intermediate_sizes"),
                layer_num_heads=d.get("llmopt_layer_num_heads"),
                name=name,
            )
        except KeyError as e:
            raise ConfigError(f"config.json lacks the field {e.args[0]!r}") from None

    @classmethod
    def from_json_file(cls, path: str | Path, name: str | None = None) -> "ModelConfig":
        path = Path(path)
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON ({e})") from None
        return cls.from_hf_dict(d, name=name or path.parent.name)

    def to_hf_dict(self) -> dict:
        """The Hugging Face ``config.json`` dict (transformers 5 style, which
        transformers 4.46+ reads as well since rope_theta is also written)."""
        model_type = SUPPORTED_ARCHITECTURES[self.architecture]
        rope = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.rope_scaling:
            rope.update(self.rope_scaling)
        d = {
            "architectures": [self.architecture],
            "model_type": model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": dict(self.rope_scaling) if self.rope_scaling else None,
            "rope_parameters": rope,
            "hidden_act": "silu",
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "torch_dtype": self.torch_dtype or "float32",
        }
        if self.layer_intermediate_sizes is not None:  # a structurally pruned model (lesson 04)
            d["llmopt_layer_intermediate_sizes"] = list(self.layer_intermediate_sizes)
        if self.layer_num_heads is not None:
            d["llmopt_layer_num_heads"] = list(self.layer_num_heads)
        if model_type == "llama":
            if self.qkv_bias != self.o_bias:
                raise ConfigError("Llama checkpoints put a bias on all of q, k, v, o or on none")
            d["attention_bias"] = self.qkv_bias
            d["mlp_bias"] = self.mlp_bias
        if model_type in ("mistral", "qwen2"):
            d["sliding_window"] = self.sliding_window
        if model_type == "qwen2":
            d["use_sliding_window"] = self.sliding_window is not None
            if self.layer_types:
                d["layer_types"] = list(self.layer_types)
        return d


def _read_rope(d: dict) -> tuple[float, dict | None]:
    """RoPE base and scaling from either config shape.

    transformers 5 writes ``rope_parameters`` (which holds ``rope_theta`` too);
    older files have a top-level ``rope_theta`` and an optional ``rope_scaling``
    whose type key is ``rope_type`` or, older still, ``type``.
    """
    params = d.get("rope_parameters")
    if isinstance(params, dict) and "rope_theta" not in params and "rope_type" not in params:
        # per-layer-type parameters ({"full_attention": {...}, ...}) are a
        # newer shape for models with mixed layers; all must agree here.
        values = list(params.values())
        if values and all(v == values[0] for v in values):
            params = values[0]
        else:
            raise ConfigError("per-layer-type RoPE parameters that differ are not supported")
    if params:
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
        theta = params.get("rope_theta", d.get("rope_theta", 10000.0))
    else:
        scaling = dict(d.get("rope_scaling") or {})
        theta = scaling.pop("rope_theta", None) or d.get("rope_theta", 10000.0)
    if "type" in scaling and "rope_type" not in scaling:
        scaling["rope_type"] = scaling.pop("type")
    scaling.pop("type", None)
    if not scaling or scaling.get("rope_type", "default") == "default":
        return float(theta), None
    return float(theta), scaling


# ----------------------------------------------------------------- presets
def _llama(name: str, **kw: Any) -> ModelConfig:
    base = dict(rms_norm_eps=1e-5, rope_theta=10000.0, architecture="LlamaForCausalLM",
                bos_token_id=1, eos_token_id=2)
    base.update(kw)
    return ModelConfig(name=name, **base)


_LLAMA3_SCALING = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                   "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}

PRESETS: dict[str, Any] = {
    # a few hundred thousand parameters: unit tests and CPU demos
    "tiny": lambda: _llama("tiny", vocab_size=512, hidden_size=128, intermediate_size=384,
                           num_layers=4, num_heads=4, num_kv_heads=2,
                           max_position_embeddings=1024),
    # shapes of public models (random weights: for timing, never for quality)
    "llama-1b": lambda: _llama("llama-1b", vocab_size=128256, hidden_size=2048,
                               intermediate_size=8192, num_layers=16, num_heads=32,
                               num_kv_heads=8, head_dim=64, max_position_embeddings=131072,
                               rope_theta=500000.0, rope_scaling=dict(_LLAMA3_SCALING),
                               tie_word_embeddings=True, torch_dtype="bfloat16"),
    "llama-7b": lambda: _llama("llama-7b", vocab_size=32000, hidden_size=4096,
                               intermediate_size=11008, num_layers=32, num_heads=32,
                               num_kv_heads=32, max_position_embeddings=4096,
                               torch_dtype="bfloat16"),
    # Llama-2-70B: too big for one 80 GB GPU in bf16 (lesson 11's memory arithmetic)
    "llama-70b": lambda: _llama("llama-70b", vocab_size=32000, hidden_size=8192,
                                intermediate_size=28672, num_layers=80, num_heads=64,
                                num_kv_heads=8, max_position_embeddings=4096,
                                torch_dtype="bfloat16"),
    "llama3-8b": lambda: _llama("llama3-8b", vocab_size=128256, hidden_size=4096,
                                intermediate_size=14336, num_layers=32, num_heads=32,
                                num_kv_heads=8, max_position_embeddings=131072,
                                rope_theta=500000.0, rope_scaling=dict(_LLAMA3_SCALING, factor=8.0),
                                torch_dtype="bfloat16"),
    "qwen-0.5b": lambda: ModelConfig(name="qwen-0.5b", vocab_size=151936, hidden_size=896,
                                     intermediate_size=4864, num_layers=24, num_heads=14,
                                     num_kv_heads=2, max_position_embeddings=32768,
                                     rms_norm_eps=1e-6, rope_theta=1000000.0, qkv_bias=True,
                                     tie_word_embeddings=True, architecture="Qwen2ForCausalLM",
                                     eos_token_id=151643, torch_dtype="bfloat16"),
}


def preset(name: str) -> ModelConfig:
    """A named config preset (a fresh copy each call).

    Raises:
        ConfigError: an unknown name (the message lists the known ones).
    """
    try:
        return PRESETS[name]()
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}") from None


def bytes_per_element(dtype: Any) -> float:
    """Bytes per element of a torch dtype or a dtype name ('bfloat16', 'int4')."""
    name = str(dtype).replace("torch.", "")
    table = {"float32": 4, "float": 4, "fp32": 4, "float16": 2, "half": 2, "fp16": 2,
             "bfloat16": 2, "bf16": 2,
             "float8_e4m3fn": 1, "float8_e5m2": 1, "fp8": 1, "int8": 1, "uint8": 1,
             "int4": 0.5, "float64": 8}
    if name not in table:
        raise ConfigError(f"unknown dtype {dtype!r}")
    return table[name]

