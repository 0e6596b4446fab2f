"""Reading every kind of checkpoint the project meets, one tensor at a time, under the ``Decoder``'s names.

:func:`open_checkpoint` opens a project checkpoint directory (:mod:`llmshearing.checkpoint.format`, with
safetensors or sharded weights), a Hugging Face model directory (its tensors renamed by the family's key map,
:mod:`llmshearing.hf.keymaps`; its config translated, :mod:`llmshearing.hf.config`), and a Composer training
checkpoint (a ``.pt`` file, or the directory of a sharded FSDP checkpoint; weights under ``state.model`` with
the ``model.`` prefix of ``ComposerLlama``, the model's shape from the run's ``config.json``,
:mod:`llmshearing.checkpoint.run_config`). Every kind is strictly checked against its config.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor

from llmshearing.checkpoint.composer_files import checkpoint_file_problem
from llmshearing.checkpoint.format import CONFIG_NAME, FORMAT, L0_PREFIX, check_state, has_tokenizer
from llmshearing.checkpoint.run_config import find_run_config, run_source_dir
from llmshearing.checkpoint.sharded import ShardedModelSource, is_sharded_checkpoint, sharded_weights_dir
from llmshearing.checkpoint.tensor_io import (
    StateDictSource,
    TensorMeta,
    TensorSource,
    finite,
    open_weights,
    torch_load,
)
from llmshearing.hf.config import model_config_from_hf, read_config_json
from llmshearing.hf.keymaps import KeyMap, is_ignored_hf_key
from llmshearing.models.config import ModelConfig


@dataclass
class OpenCheckpoint:
    """A checkpoint opened for reading; tensors carry project key names and load lazily."""

    path: Path
    kind: str  # "project" | "hf" | "composer"
    config: ModelConfig
    hf_config: dict[str, Any] | None
    tensors: TensorSource
    tokenizer_dir: Path | None  # where tokenizer and generation-config files are taken from, if any

    def close(self) -> None:
        self.tensors.close()

    def __enter__(self) -> OpenCheckpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class RenamedSource(TensorSource):
    """A view of another source under new names (``names`` maps new name -> source name)."""

    def __init__(self, source: TensorSource, names: Mapping[str, str]) -> None:
        self.source, self.names = source, dict(names)

    def keys(self) -> list[str]:
        return list(self.names)

    def meta(self, key: str) -> TensorMeta:
        return self.source.meta(self.names[key])

    def get(self, key: str) -> Tensor:
        return self.source.get(self.names[key])

    def close(self) -> None:
        self.source.close()


def hf_source_to_project(source: TensorSource, config: ModelConfig, origin: str) -> RenamedSource:
    """Present HF-named tensors under project names; unknown keys raise, known non-weights are skipped."""
    keymap = KeyMap(config.family)
    names: dict[str, str] = {}
    unknown: list[str] = []
    for hf_key in source.keys():
        if is_ignored_hf_key(hf_key):
            continue
        project_key = keymap.to_project(hf_key)
        if project_key is None:
            unknown.append(hf_key)
        elif project_key == "output.weight" and config.tie_word_embeddings:
            continue  # a tied model's head is the embedding matrix; some checkpoints store a copy
        else:
            names[project_key] = hf_key
    if unknown:
        raise KeyError(
            f"{origin}: unexpected keys {sorted(unknown)[:8]} for a {config.family} model; "
            "the checkpoint holds tensors this architecture does not have"
        )
    return RenamedSource(source, names)


def _is_project_config(data: dict[str, Any]) -> bool:
    return data.get("format") == FORMAT or ("model" in data and isinstance(data["model"], dict))


def _project_config(data: dict[str, Any], path: Path) -> tuple[ModelConfig, dict[str, Any] | None]:
    try:
        config = ModelConfig.from_dict(data["model"])
    except (ValueError, TypeError) as err:
        raise ValueError(f"{path}: invalid 'model' section ({err})") from err
    return config, data.get("hf_config")


def read_any_config(path: Path) -> tuple[ModelConfig, dict[str, Any] | None]:
    """ModelConfig and HF config from a project ``config.json`` or an HF ``config.json``."""
    data = read_config_json(path)
    if _is_project_config(data):
        return _project_config(data, path)
    return model_config_from_hf(data, str(path)), data


def model_config_if_readable(path: str | Path) -> ModelConfig | None:
    """The ``ModelConfig`` of the checkpoint at ``path`` from its ``config.json`` alone, no weights read; None
    when it cannot be read (the load itself then refuses the checkpoint with its own message)."""
    where = Path(path)
    try:
        sharded_or_file = where.is_file() or is_sharded_checkpoint(where)
        found = find_run_config(where, None) if sharded_or_file else where / CONFIG_NAME
        return read_any_config(found)[0]
    except Exception:  # any unreadable checkpoint: the load names the problem
        return None


def _load_composer_state(ckpt: Path) -> dict[str, Tensor]:
    payload = torch_load(ckpt, "a Composer checkpoint", weights_only=False)
    try:
        state = payload["state"]["model"]
    except (KeyError, TypeError) as err:
        raise ValueError(
            f"{ckpt} is not a Composer training checkpoint (no state.model); "
            "pass a project checkpoint directory or a Composer .pt file"
        ) from err
    if state and all(key.startswith("module.") for key in state):
        state = {key[len("module.") :]: value for key, value in state.items()}
    tensors: dict[str, Tensor] = {}
    unexpected = []
    for key, value in state.items():
        if key.startswith("model."):
            tensors[key[len("model.") :]] = value
        elif key.startswith(L0_PREFIX):
            tensors[key] = value
        else:
            unexpected.append(key)
    if unexpected:
        raise KeyError(
            f"{ckpt}: unexpected keys {sorted(unexpected)[:8]} in state.model (expected model.* and l0_module.*)"
        )
    return tensors


def open_checkpoint(path: str | Path, config_path: str | Path | None = None) -> OpenCheckpoint:
    """Open a project checkpoint dir, an HF model dir or a Composer ``.pt`` for reading (strictly checked)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: pass a checkpoint directory or a Composer .pt file")
    if path.is_file() or is_sharded_checkpoint(path):
        if path.is_file() and (problem := checkpoint_file_problem(path)) is not None:
            raise ValueError(problem)
        cfg_path = find_run_config(path, Path(config_path) if config_path else None)
        config, hf_config = read_any_config(cfg_path)
        tensors: TensorSource = (
            ShardedModelSource(path) if path.is_dir() else StateDictSource(_load_composer_state(path))
        )
        check_state(tensors, config, str(path), allow_l0=True)
        candidates = (path.parent, path.parent.parent, run_source_dir(cfg_path))
        tokenizer_dir = next((d for d in candidates if d is not None and has_tokenizer(d)), None)
        return OpenCheckpoint(path, "composer", config, hf_config, finite(tensors, str(path)), tokenizer_dir)

    cfg_path = Path(config_path) if config_path else path / CONFIG_NAME
    data = read_config_json(cfg_path)
    if _is_project_config(data):
        config, hf_config = _project_config(data, cfg_path)
        tensors = open_project_weights(path)
        kind = "project"
    else:
        config, hf_config = model_config_from_hf(data, str(cfg_path)), data
        tensors = hf_source_to_project(open_weights(path), config, str(path))
        kind = "hf"
    try:
        check_state(tensors, config, str(path))
    except (KeyError, ValueError):
        tensors.close()
        raise
    return OpenCheckpoint(path, kind, config, hf_config, finite(tensors, str(path)), path)


def open_project_weights(path: Path) -> TensorSource:
    """A project checkpoint's weights: its ``model.dcp/`` sharded weights if it has them, else safetensors."""
    sharded = sharded_weights_dir(path)
    return ShardedModelSource(sharded) if sharded is not None else open_weights(path)


def is_sharded_source(path: str | Path) -> bool:
    """Whether ``path`` is a project checkpoint whose weights are sharded (``model.dcp/``)."""
    return Path(path).is_dir() and sharded_weights_dir(path) is not None


def load_checkpoint(
    path: str | Path, drop_l0: bool = False, config_path: str | Path | None = None
) -> tuple[ModelConfig, dict[str, Tensor], dict[str, Any] | None]:
    """``(ModelConfig, state_dict, hf_config)`` of a project dir, HF dir or Composer ``.pt``.

    Keys are the ``Decoder``'s. A Composer pruning checkpoint also carries ``l0_module.*`` keys;
    they are kept unless ``drop_l0`` is set.
    """
    with open_checkpoint(path, config_path) as ckpt:
        state = {
            key: ckpt.tensors.get(key)
            for key in ckpt.tensors.keys()
            if not (drop_l0 and key.startswith(L0_PREFIX))
        }
        return ckpt.config, state, ckpt.hf_config
