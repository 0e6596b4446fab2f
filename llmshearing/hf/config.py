"""Translation between Hugging Face model configs and the project's ``ModelConfig``.

Supported architectures: ``LlamaForCausalLM`` (LLaMA-1/2/3, SmolLM), ``MistralForCausalLM`` and
``Qwen2ForCausalLM``. Configs are handled as plain dicts (the contents of ``config.json``);
transformers' config classes fill in defaults and validate the result.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from llmshearing.models.config import ModelConfig

ARCHITECTURE_FAMILIES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}
FAMILY_ARCHITECTURES = {family: arch for arch, family in ARCHITECTURE_FAMILIES.items()}
_MODEL_TYPE_FAMILIES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2"}

# Keys of a source config that describe the source checkpoint, not the exported model.
_STALE_KEYS = (
    "_name_or_path",
    "transformers_version",
    "torch_dtype",
    "dtype",
    "layer_types",
    "quantization_config",
)

_SHAPE_KEYS = (
    "architectures",
    "model_type",
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "intermediate_size",
    "max_position_embeddings",
    "rms_norm_eps",
    "rope_theta",
    "rope_scaling",
    "tie_word_embeddings",
    "sliding_window",
)

DTYPE_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def read_config_json(path: str | Path) -> dict[str, Any]:
    """Read a ``config.json`` with errors that name the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: a model directory must contain config.json")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(
            f"{path} is not valid JSON ({err}); restore the file from the original model"
        ) from err
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, found {type(data).__name__}")
    return data


def family_of(hf_config: dict[str, Any], source: str = "config.json") -> str:
    """Model family ("llama" | "mistral" | "qwen2") of an HF config; other architectures raise."""
    supported = ", ".join(ARCHITECTURE_FAMILIES)
    architectures = hf_config.get("architectures") or []
    if architectures:
        arch = architectures[0]
        if arch not in ARCHITECTURE_FAMILIES:
            raise ValueError(
                f"{source}: architecture {arch!r} is not supported; supported architectures: {supported}"
            )
        return ARCHITECTURE_FAMILIES[arch]
    model_type = hf_config.get("model_type")
    if model_type not in _MODEL_TYPE_FAMILIES:
        raise ValueError(
            f"{source}: model_type {model_type!r} is not supported; supported architectures: {supported}"
        )
    return _MODEL_TYPE_FAMILIES[model_type]


def _config_class(family: str) -> type:
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    return {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}[family]


def complete_hf_config(hf_config: dict[str, Any], source: str = "config.json") -> dict[str, Any]:
    """The HF config with transformers' defaults filled in (validates it on the way)."""
    family = family_of(hf_config, source)
    cls = _config_class(family)
    fields = {k: v for k, v in hf_config.items() if k not in ("transformers_version",)}
    try:
        return cls(**fields).to_dict()
    except (TypeError, ValueError, KeyError) as err:
        raise ValueError(f"{source}: invalid {cls.__name__} ({err})") from err


def model_config_from_hf(hf_config: dict[str, Any], source: str = "config.json") -> ModelConfig:
    """The project ``ModelConfig`` equivalent to an HF config dict."""
    family = family_of(hf_config, source)
    full = complete_hf_config(hf_config, source)

    def unsupported(what: str) -> ValueError:
        return ValueError(f"{source}: {what} is not supported by llmshearing's decoder")

    if full.get("hidden_act", "silu") != "silu":
        raise unsupported(f"hidden_act={full['hidden_act']!r} (only 'silu')")
    if family == "llama" and full.get("attention_bias"):
        raise unsupported("attention_bias=true (biases on q/k/v/o projections)")
    if family == "llama" and full.get("mlp_bias"):
        raise unsupported("mlp_bias=true")

    n_heads = int(full["num_attention_heads"])
    head_dim = full.get("head_dim") or full["hidden_size"] // n_heads
    sliding_window = None
    if family == "mistral":
        sliding_window = full.get("sliding_window")
    elif family == "qwen2":
        layer_types = set(full.get("layer_types") or ["full_attention"])
        if layer_types == {"sliding_attention"}:
            sliding_window = full.get("sliding_window")
        elif layer_types != {"full_attention"}:
            raise unsupported("a mix of sliding-window and full-attention layers (use_sliding_window=true)")

    config = ModelConfig(
        vocab_size=int(full["vocab_size"]),
        d_model=int(full["hidden_size"]),
        n_layers=int(full["num_hidden_layers"]),
        n_heads=n_heads,
        n_kv_heads=int(full.get("num_key_value_heads") or n_heads),
        head_dim=int(head_dim),
        intermediate_size=int(full["intermediate_size"]),
        max_seq_len=int(full.get("max_position_embeddings") or 4096),
        rms_norm_eps=float(full.get("rms_norm_eps", 1e-5)),
        rope_theta=float(full.get("rope_theta", 10000.0)),
        rope_scaling=dict(full["rope_scaling"]) if full.get("rope_scaling") else None,
        tie_word_embeddings=bool(full.get("tie_word_embeddings", False)),
        qkv_bias=family == "qwen2",
        sliding_window=int(sliding_window) if sliding_window else None,
        family=family,
        init_std=float(full.get("initializer_range", 0.02)),
    )
    from llmshearing.models.decoder import rope_inverse_frequencies

    try:
        rope_inverse_frequencies(config)  # the decoder must be able to build this RoPE
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{source}: rope_scaling {config.rope_scaling} is not supported ({err})") from err
    return config


def hf_config_from_model(
    config: ModelConfig, base: dict[str, Any] | None = None, dtype: str | None = None
) -> dict[str, Any]:
    """An HF config dict for ``config``; ``base`` (the source HF config) supplies the other fields.

    Every shape field comes from ``config``, so a pruned model gets its own sizes while keeping
    the source's tokenizer ids and other settings. ``dtype`` is "fp32" | "bf16" | "fp16".
    """
    base = dict(base or {})
    if base and family_of(base, "source hf_config") != config.family:
        base = {}  # the source belongs to another family: its extra fields would not apply
    for key in _STALE_KEYS:
        base.pop(key, None)
    arch = FAMILY_ARCHITECTURES[config.family]
    base.update(
        architectures=[arch],
        model_type=config.family,
        vocab_size=config.vocab_size,
        hidden_size=config.d_model,
        num_hidden_layers=config.n_layers,
        num_attention_heads=config.n_heads,
        num_key_value_heads=config.n_kv_heads,
        head_dim=config.head_dim,
        intermediate_size=config.intermediate_size,
        max_position_embeddings=config.max_seq_len,
        rms_norm_eps=config.rms_norm_eps,
        rope_theta=config.rope_theta,
        rope_scaling=dict(config.rope_scaling) if config.rope_scaling else None,
        tie_word_embeddings=config.tie_word_embeddings,
        hidden_act="silu",
    )
    if config.family == "llama":
        base.update(attention_bias=False, mlp_bias=False)
    elif config.family == "mistral":
        base["sliding_window"] = config.sliding_window
    elif config.family == "qwen2":
        base["use_sliding_window"] = config.sliding_window is not None
        base["sliding_window"] = config.sliding_window
        base["max_window_layers"] = 0 if config.sliding_window is not None else config.n_layers
    family_of(base, "exported config")
    cls = _config_class(config.family)
    try:
        validated = cls(**base)
    except (TypeError, ValueError, KeyError) as err:
        raise ValueError(f"cannot build a {cls.__name__} for the exported model ({err})") from err
    exported = {k: v for k, v in validated.to_diff_dict().items() if not k.startswith("_")}
    # Shape fields are always written, even where they equal transformers' defaults.
    exported.update({k: base[k] for k in _SHAPE_KEYS if k in base})
    if dtype is not None:
        exported["dtype"] = exported["torch_dtype"] = DTYPE_NAMES[dtype]
    return exported
