"""The project checkpoint format, and reading every kind of checkpoint the project meets.

A project checkpoint is a directory holding

* ``model.safetensors`` (or ``model-0000i-of-0000n.safetensors`` + ``model.safetensors.index.json``)
  with the ``Decoder``'s state-dict keys, or, written with ``sharded=True`` (``convert hf-to-composer
  --sharded``), ``model.dcp/``: a ``torch.distributed.checkpoint`` directory (``.metadata`` and one
  ``__0_<i>.distcp`` file per tensor) with the same tensors under ``state.model.model.<key>``, the layout
  of Composer's sharded checkpoints (:mod:`llmshearing.convert.sharded`), read tensor by tensor,
* ``config.json`` = ``{"format": "llmshearing", "model": ModelConfig.to_dict(), "hf_config": {...}}``
  (``hf_config`` is the source model's HF config, used on export),
* the tokenizer files when the source had them.

``open_checkpoint`` also reads a Composer training checkpoint (a ``.pt`` file, or the directory of a
sharded FSDP checkpoint; weights under ``state.model`` with the ``model.`` prefix of ``ComposerLlama``)
and an HF model directory.
Writers build the directory under a hidden staging sibling and rename it when complete
(:mod:`llmshearing.staging`).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from llmshearing.convert.checkpoint_files import checkpoint_file_problem
from llmshearing.convert.hf_config import DTYPE_NAMES, model_config_from_hf, read_config_json
from llmshearing.convert.keymaps import KeyMap, check_keys, is_ignored_hf_key
from llmshearing.convert.sharded import (
    ShardedModelSource,
    is_sharded_checkpoint,
    sharded_weights_dir,
    write_sharded_weights,
)
from llmshearing.convert.tensor_io import (
    DEFAULT_MAX_SHARD_BYTES,
    StateDictSource,
    TensorMeta,
    TensorSource,
    finite,
    open_weights,
    write_safetensors,
)
from llmshearing.models.config import ModelConfig
from llmshearing.models.schema import state_shapes
from llmshearing.staging import staged_dir

FORMAT = "llmshearing"
CONFIG_NAME = "config.json"
L0_PREFIX = "l0_module."
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)
TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def check_state(tensors: TensorSource, config: ModelConfig, source: str, allow_l0: bool = False) -> None:
    """Strict check: exactly the decoder's keys (plus ``l0_module.*`` when allowed), right shapes."""
    shapes = state_shapes(config)
    keys = [k for k in tensors.keys() if not (allow_l0 and k.startswith(L0_PREFIX))]
    check_keys(keys, shapes, source)
    wrong = [
        f"{key} is {list(meta.shape)}, expected {list(shapes[key])}"
        for key in shapes
        if (meta := tensors.meta(key)).shape != shapes[key]
    ]
    if wrong:
        raise ValueError(f"{source}: tensor shapes do not match the model config: {'; '.join(wrong[:8])}")


@dataclass
class OpenCheckpoint:
    """A checkpoint opened for reading; tensors carry project key names and load lazily."""

    path: Path
    kind: str  # "project" | "hf" | "composer"
    config: ModelConfig
    hf_config: dict[str, Any] | None
    tensors: TensorSource
    tokenizer_dir: Path | None  # where tokenizer and generation-config files are taken from, if any

    def has_l0_state(self) -> bool:
        return any(key.startswith(L0_PREFIX) for key in self.tensors.keys())

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


def find_run_config(ckpt: Path, config_path: Path | None) -> Path:
    """The ``config.json`` of a Composer checkpoint: ``config_path``, else beside it, else in its run folder."""
    if config_path is not None:
        if not config_path.is_file():
            raise FileNotFoundError(f"--config {config_path} not found")
        return config_path
    for candidate in (ckpt.parent / CONFIG_NAME, ckpt.parent.parent / CONFIG_NAME):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"no {CONFIG_NAME} beside {ckpt} or in its run folder ({ckpt.parent.parent}); "
        "pass --config PATH (the run's config.json or the source checkpoint's config.json)"
    )


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
    try:
        try:
            payload = torch.load(ckpt, map_location="cpu", weights_only=False, mmap=True)
        except RuntimeError:  # legacy (non-zip) files cannot be memory-mapped
            payload = torch.load(ckpt, map_location="cpu", weights_only=False)
    except Exception as err:  # torch raises many types for a damaged file
        raise ValueError(
            f"{ckpt} could not be read as a Composer checkpoint ({err}); the file is corrupt"
        ) from err
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
        candidates = (path.parent, path.parent.parent, _run_source_dir(cfg_path))
        tokenizer_dir = next((d for d in candidates if d is not None and _has_tokenizer(d)), None)
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


def _run_source_dir(run_config: Path) -> Path | None:
    """The source checkpoint a training run started from (``train.model.path`` of its config.json)."""
    try:
        source = json.loads(run_config.read_text(encoding="utf-8"))["train"]["model"]["path"]
    except (KeyError, TypeError, ValueError):
        return None
    return Path(source) if isinstance(source, str) and Path(source).is_dir() else None


def _has_tokenizer(directory: Path) -> bool:
    return (directory / "tokenizer.json").is_file() or (directory / "tokenizer_config.json").is_file()


def copy_tokenizer(src: Path, dst: Path) -> list[str]:
    """Copy the tokenizer (and generation config) files of ``src`` into ``dst``; returns their names.

    A ``tokenizer.model`` that is really a GGUF file (what transformers writes after loading a GGUF
    tokenizer) is skipped.
    """
    if not src.is_dir():
        raise FileNotFoundError(f"tokenizer directory {src} not found")
    copied = []
    for name in TOKENIZER_FILES:
        file = src / name
        if not file.is_file() or (name == "tokenizer.model" and is_gguf_file(file)):
            continue
        shutil.copyfile(file, dst / name)
        copied.append(name)
    return copied


def is_gguf_file(path: Path) -> bool:
    with open(path, "rb") as handle:
        return handle.read(4) == b"GGUF"


def check_gguf_file(path: Path) -> None:
    """Raise ``ValueError`` naming ``path`` when its GGUF header or tensor data cannot be read to the end
    (a download cut off, or a damaged file)."""
    from gguf import GGUFReader

    size = path.stat().st_size
    try:
        reader = GGUFReader(path)
        end = max((t.data_offset + int(t.n_bytes) for t in reader.tensors), default=0)
    except Exception:  # the reader runs past the end of a cut file (IndexError, numpy's ValueError)
        raise ValueError(
            f"{path} is truncated or damaged: its {size:,} bytes do not hold the GGUF header and tensors it "
            "describes; download it again"
        ) from None
    if end > size:
        raise ValueError(
            f"{path} is truncated: its tensors end at byte {end:,}, the file has {size:,}; download it again"
        )


def tensor_progress(
    total: int, desc: str, enabled: bool = True
) -> tuple[Callable[[], None], Callable[[], None]]:
    """A tqdm bar over ``total`` tensors: returns ``(tick, close)``."""
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=desc, unit="tensor", disable=not enabled)
    return (lambda: bar.update(1)), bar.close


def write_project_checkpoint(
    out: str | Path,
    config: ModelConfig,
    tensors: TensorSource,
    hf_config: dict[str, Any] | None = None,
    tokenizer_dir: str | Path | None = None,
    dtype: str | None = None,
    overwrite: bool = False,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    extra: Callable[[Path], None] | None = None,
    progress: bool = True,
    sharded: bool = False,
) -> Path:
    """Write ``tensors`` (project keys, strictly checked) as a project checkpoint at ``out``.

    ``dtype`` ("fp32" | "bf16" | "fp16") casts floating tensors; None keeps them. ``extra`` may add
    files to the staging directory before it is renamed. ``sharded`` writes the weights as ``model.dcp/``
    (``torch.distributed.checkpoint``) instead of safetensors. Either way one tensor is read, cast and
    written at a time: the peak is the largest tensor in the source's dtype plus its cast copy (sharded: plus
    the previous tensor's cast copy, which torch's writer still holds).
    """
    if dtype is not None and dtype not in DTYPE_NAMES:
        raise ValueError(f"dtype must be one of {sorted(DTYPE_NAMES)}, got {dtype!r}")
    check_state(tensors, config, "checkpoint to write")
    target = TORCH_DTYPES.get(dtype) if dtype else None
    metas = {}
    for key in state_shapes(config):
        meta = tensors.meta(key)
        metas[key] = TensorMeta(
            target if target is not None and meta.dtype.is_floating_point else meta.dtype, meta.shape
        )

    checked = finite(tensors, f"the weights for {out}")  # a NaN or Inf stops the write; nothing is left

    def produce(key: str) -> Tensor:
        return checked.get(key).to(metas[key].dtype)

    with staged_dir(out, overwrite) as staging:
        tick, close = tensor_progress(len(metas), f"writing {Path(out).name}", progress)
        try:
            if sharded:
                write_sharded_weights(staging, metas, produce, tick)
            else:
                write_safetensors(staging, metas, produce, max_shard_bytes, tick)
        finally:
            close()
        document = {"format": FORMAT, "model": config.to_dict(), "hf_config": hf_config}
        (staging / CONFIG_NAME).write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
        if tokenizer_dir is not None:
            copy_tokenizer(Path(tokenizer_dir), staging)
        if extra is not None:
            extra(staging)
    return Path(out)


def save_checkpoint(
    out: str | Path,
    config: ModelConfig,
    state_dict: Mapping[str, Tensor],
    hf_config: dict[str, Any] | None = None,
    tokenizer_dir: str | Path | None = None,
    dtype: str | None = None,
    overwrite: bool = False,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    progress: bool = True,
) -> Path:
    """Save a ``Decoder`` state dict as a project checkpoint (see ``write_project_checkpoint``)."""
    return write_project_checkpoint(
        out,
        config,
        StateDictSource(state_dict),
        hf_config,
        tokenizer_dir,
        dtype,
        overwrite,
        max_shard_bytes,
        progress=progress,
    )
