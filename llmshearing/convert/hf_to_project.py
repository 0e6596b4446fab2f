"""Hugging Face model (directory, hub name or GGUF file) -> project checkpoint."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from llmshearing.checkpoint.format import CONFIG_NAME, TOKENIZER_FILES, write_project_checkpoint
from llmshearing.checkpoint.reading import hf_source_to_project
from llmshearing.checkpoint.tensor_io import DEFAULT_MAX_SHARD_BYTES, StateDictSource, finite, open_weights
from llmshearing.hf.config import model_config_from_hf, read_config_json
from llmshearing.hf.gguf import check_gguf_file, header_read_once, is_gguf_file

_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def resolve_source(src: str | Path, gguf: str | Path | None = None) -> tuple[Path, Path | None]:
    """``(model directory, GGUF file or None)`` for a directory, a GGUF path or an HF hub name."""
    src_path = Path(src)
    if gguf is not None:
        gguf_path = Path(gguf)
        if not gguf_path.is_file() and src_path.is_dir():
            gguf_path = src_path / gguf
        if not gguf_path.is_file():
            raise FileNotFoundError(f"GGUF file {gguf} not found (looked for {gguf_path})")
        return gguf_path.parent, gguf_path
    if src_path.is_file():
        with open(src_path, "rb") as handle:
            head = handle.read(4)
        if len(head) < 4 and b"GGUF".startswith(head) and src_path.suffix == ".gguf":
            raise ValueError(f"{src_path} is truncated: it has {len(head)} bytes; download it again")
        if not is_gguf_file(src_path):
            raise ValueError(
                f"{src_path} is a file but not a GGUF model; pass an HF model directory or a .gguf file"
            )
        return src_path.parent, src_path
    if src_path.is_dir():
        return src_path, None
    if _HUB_NAME.match(str(src)) and not str(src).startswith("."):
        return download_from_hub(str(src)), None
    raise FileNotFoundError(f"{src} not found: pass an HF model directory, a .gguf file or a hub model name")


HUB_TIMEOUT_S = 10.0


def _not_found(name: str, reason: str) -> FileNotFoundError:
    return FileNotFoundError(
        f"{name} is not a local directory, and {reason}; pass the directory of a downloaded model "
        "(or a .gguf file)"
    )


def _cached_snapshot(name: str, patterns: list[str]) -> Path | None:
    """The model's folder in the local Hugging Face cache, if it is there (no network)."""
    from huggingface_hub import snapshot_download

    try:
        directory = Path(snapshot_download(name, allow_patterns=patterns, local_files_only=True))
    except Exception:  # not cached (huggingface_hub raises several types for that)
        return None
    return directory if (directory / CONFIG_NAME).is_file() else None


def _check_hub_has(name: str) -> bool:
    """One request with a short timeout: True when the hub has ``name``; False when the hub cannot
    be reached; an error naming the reason when the hub answers that there is no such model."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    try:
        HfApi().model_info(name, timeout=HUB_TIMEOUT_S)
    except GatedRepoError:
        raise _not_found(
            name, "it is a gated model on the hub: accept its licence and log in (`hf auth login`)"
        ) from None
    except RepositoryNotFoundError:
        raise _not_found(
            name, "the Hugging Face hub has no model of that name (misspelt? private?)"
        ) from None
    except Exception:  # connection refused, DNS failure, timeout, proxy error: the hub is unreachable
        return False
    return True


def hub_unavailable(name: str) -> str | None:
    """Why ``name`` cannot be fetched from the Hugging Face hub now (``HF_HUB_OFFLINE``, no network),
    or None when the hub has it; one short request. A name the hub does not know raises, saying so."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    if not _check_hub_has(name):
        return "the Hugging Face hub cannot be reached (no network?)"
    return None


def download_from_hub(name: str) -> Path:
    """Fetch config, weights and tokenizer of an HF hub model, or take them from the local cache.

    Fails at once, with the reason, when ``HF_HUB_OFFLINE`` is set or the hub cannot be reached and
    the model is not cached, and when the hub has no model of that name.
    """
    from huggingface_hub import constants, snapshot_download

    base = [CONFIG_NAME, *TOKENIZER_FILES]
    weights = [
        [*base, "*.safetensors", "*.safetensors.index.json"],
        [*base, "pytorch_model*.bin", "*.bin.index.json"],
    ]
    if constants.HF_HUB_OFFLINE:
        cached = next((d for p in weights if (d := _cached_snapshot(name, p)) is not None), None)
        if cached is None:
            raise _not_found(name, "HF_HUB_OFFLINE is set and it is not in the local Hugging Face cache")
        return cached
    if not _check_hub_has(name):
        cached = next((d for p in weights if (d := _cached_snapshot(name, p)) is not None), None)
        if cached is None:
            raise _not_found(
                name, "the Hugging Face hub cannot be reached (no network?) and it is not cached"
            )
        return cached
    try:
        directory = Path(snapshot_download(name, allow_patterns=weights[0], etag_timeout=HUB_TIMEOUT_S))
        if not any(directory.glob("*.safetensors")):
            directory = Path(snapshot_download(name, allow_patterns=weights[1], etag_timeout=HUB_TIMEOUT_S))
    except Exception as err:  # the download itself failed (network lost, disk, permissions)
        raise _not_found(name, f"downloading it from the Hugging Face hub failed ({err})") from err
    return directory


def convert_hf_to_project(
    src: str | Path,
    out: str | Path,
    gguf: str | Path | None = None,
    dtype: str | None = None,
    overwrite: bool = False,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    progress: bool = True,
    sharded: bool = False,
) -> Path:
    """Convert an HF model to a project checkpoint at ``out`` (written to a temp dir, then renamed).

    Safetensors weights are streamed tensor by tensor; ``dtype`` ("fp32" | "bf16" | "fp16") sets the
    stored precision, None keeps the source's (GGUF weights are dequantised to fp32). ``sharded`` writes
    the weights as a ``torch.distributed.checkpoint`` directory (``model.dcp/``, one file per tensor)
    instead of safetensors; ``config.json`` and the tokenizer files are the same either way. From
    safetensors the peak is about one tensor in the source's dtype plus its cast (two casts when sharded, see
    :func:`~llmshearing.checkpoint.sharded.write_sharded_weights`); a ``pytorch_model*.bin``
    source is memory-mapped where its format allows, a GGUF file is dequantised whole first.
    """
    directory, gguf_file = resolve_source(src, gguf)
    if gguf_file is not None:
        with header_read_once():  # one parse of the header instead of seven
            return _convert_gguf(gguf_file, out, dtype, overwrite, max_shard_bytes, progress, sharded)
    config_path = directory / CONFIG_NAME
    hf_config = read_config_json(config_path)
    config = model_config_from_hf(hf_config, str(config_path))
    with finite(
        hf_source_to_project(open_weights(directory), config, str(directory)), str(directory)
    ) as tensors:
        return write_project_checkpoint(
            out,
            config,
            tensors,
            hf_config=hf_config,
            tokenizer_dir=directory,
            dtype=dtype,
            overwrite=overwrite,
            max_shard_bytes=max_shard_bytes,
            progress=progress,
            sharded=sharded,
        )


GGUF_SPECIAL_TOKENS = {
    "bos_token": "tokenizer.ggml.bos_token_id",
    "eos_token": "tokenizer.ggml.eos_token_id",
    "unk_token": "tokenizer.ggml.unknown_token_id",
    "pad_token": "tokenizer.ggml.padding_token_id",
}


def _apply_gguf_special_tokens(tokenizer: Any, gguf_file: Path) -> None:
    """Set the special tokens to the ids the GGUF file declares (transformers' GGUF tokenizer loading
    can report another token, e.g. the BOS as EOS)."""
    import gguf

    fields = gguf.GGUFReader(str(gguf_file)).fields
    for attribute, key in GGUF_SPECIAL_TOKENS.items():
        field = fields.get(key)
        if field is None or not field.data:
            continue
        token_id = int(field.parts[field.data[0]][0])
        if 0 <= token_id < len(tokenizer):
            setattr(tokenizer, attribute, tokenizer.convert_ids_to_tokens(token_id))


def _convert_gguf(
    gguf_file: Path,
    out: str | Path,
    dtype: str | None,
    overwrite: bool,
    max_shard_bytes: int,
    progress: bool,
    sharded: bool = False,
) -> Path:
    """GGUF via transformers' GGUF support (dequantised to fp32), tokenizer included."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    check_gguf_file(gguf_file)
    directory, name = str(gguf_file.parent), gguf_file.name
    try:
        hf = AutoConfig.from_pretrained(directory, gguf_file=name, local_files_only=True)
    except (OSError, ValueError, KeyError) as err:
        raise ValueError(f"{gguf_file} could not be read as a GGUF model ({err})") from err
    hf_config: dict[str, Any] = {k: v for k, v in hf.to_diff_dict().items() if not k.startswith("_")}
    config = model_config_from_hf(hf_config, str(gguf_file))
    model = AutoModelForCausalLM.from_pretrained(
        directory, gguf_file=name, dtype=torch.float32, local_files_only=True
    )
    state = model.state_dict()
    del model
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name, local_files_only=True)
    _apply_gguf_special_tokens(tokenizer, gguf_file)

    def save_tokenizer(staging: Path) -> None:
        tokenizer.save_pretrained(staging)
        spm = staging / "tokenizer.model"
        if spm.is_file() and is_gguf_file(spm):
            spm.unlink()  # transformers copies the whole GGUF here; tokenizer.json holds the tokenizer

    with finite(
        hf_source_to_project(StateDictSource(state), config, str(gguf_file)), str(gguf_file)
    ) as tensors:
        return write_project_checkpoint(
            out,
            config,
            tensors,
            hf_config=hf_config,
            dtype=dtype,
            overwrite=overwrite,
            max_shard_bytes=max_shard_bytes,
            extra=save_tokenizer,
            progress=progress,
            sharded=sharded,
        )
