"""Declarative key maps between Hugging Face state dicts and the project's ``Decoder``.

Each family maps an HF key template to a project key template; ``{}`` stands for the layer
index. The maps are the only place where the two naming schemes meet: both directions, the
expected key sets and the strict key checks derive from them.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

_TOP_LEVEL = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
}

_PER_LAYER = {
    "model.layers.{}.input_layernorm.weight": "layers.{}.attention_norm.weight",
    "model.layers.{}.self_attn.q_proj.weight": "layers.{}.attention.wq.weight",
    "model.layers.{}.self_attn.k_proj.weight": "layers.{}.attention.wk.weight",
    "model.layers.{}.self_attn.v_proj.weight": "layers.{}.attention.wv.weight",
    "model.layers.{}.self_attn.o_proj.weight": "layers.{}.attention.wo.weight",
    "model.layers.{}.post_attention_layernorm.weight": "layers.{}.ffn_norm.weight",
    "model.layers.{}.mlp.gate_proj.weight": "layers.{}.feed_forward.w1.weight",
    "model.layers.{}.mlp.up_proj.weight": "layers.{}.feed_forward.w3.weight",
    "model.layers.{}.mlp.down_proj.weight": "layers.{}.feed_forward.w2.weight",
}

_QKV_BIAS = {
    "model.layers.{}.self_attn.q_proj.bias": "layers.{}.attention.wq.bias",
    "model.layers.{}.self_attn.k_proj.bias": "layers.{}.attention.wk.bias",
    "model.layers.{}.self_attn.v_proj.bias": "layers.{}.attention.wv.bias",
}

# HF key template -> project key template, per model family.
KEY_MAPS: dict[str, dict[str, str]] = {
    "llama": {**_TOP_LEVEL, **_PER_LAYER},
    "mistral": {**_TOP_LEVEL, **_PER_LAYER},
    "qwen2": {**_TOP_LEVEL, **_PER_LAYER, **_QKV_BIAS},
}

# HF keys that hold no weights (buffers some older checkpoints saved); skipped on import.
IGNORED_HF_KEYS = (re.compile(r"^model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$"),)


def _template_regex(template: str) -> re.Pattern[str]:
    return re.compile("^" + re.escape(template).replace(r"\{\}", r"(\d+)") + "$")


class KeyMap:
    """Bidirectional key translation for one family, built from its declarative template map."""

    def __init__(self, family: str) -> None:
        if family not in KEY_MAPS:
            raise ValueError(f"unknown model family {family!r}; supported families: {sorted(KEY_MAPS)}")
        self.family = family
        self.hf_to_project_templates = KEY_MAPS[family]
        self._forward = [(_template_regex(h), p) for h, p in self.hf_to_project_templates.items()]
        self._backward = [(_template_regex(p), h) for h, p in self.hf_to_project_templates.items()]

    @staticmethod
    def _translate(key: str, rules: list[tuple[re.Pattern[str], str]]) -> str | None:
        for pattern, target in rules:
            match = pattern.match(key)
            if match:
                return target.format(*match.groups())
        return None

    def to_project(self, hf_key: str) -> str | None:
        """Project key for an HF key, or None when the key is not part of the map."""
        return self._translate(hf_key, self._forward)

    def to_hf(self, project_key: str) -> str | None:
        """HF key for a project key, or None when the key is not part of the map."""
        return self._translate(project_key, self._backward)


def is_ignored_hf_key(hf_key: str) -> bool:
    """Whether an HF key is a known non-weight entry that conversion skips."""
    return any(pattern.match(hf_key) for pattern in IGNORED_HF_KEYS)


def check_keys(found: Iterable[str], expected: Iterable[str], source: str) -> None:
    """Raise a ``KeyError`` naming every missing and every unexpected key of ``source``."""
    found_set, expected_set = set(found), set(expected)
    missing = sorted(expected_set - found_set)
    unexpected = sorted(found_set - expected_set)
    if not missing and not unexpected:
        return
    parts = []
    if missing:
        parts.append(f"missing keys {_shorten(missing)}")
    if unexpected:
        parts.append(f"unexpected keys {_shorten(unexpected)}")
    raise KeyError(
        f"{source}: {'; '.join(parts)}. The weights do not match the model config; "
        "check that the checkpoint and its config.json belong together."
    )


def _shorten(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return f"[{shown}{f', ... ({len(keys) - limit} more)' if len(keys) > limit else ''}]"
