"""Hugging Face model (directory, hub name or GGUF file) -> project checkpoint."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from llmshearing.convert.checkpoint import (
    CONFIG_NAME,
    TOKENIZER_FILES,
    hf_source_to_project,
    is_gguf_file,
    write_project_checkpoint,
)
from llmshearing.convert.hf_config import model_config_from_hf, read_config_json
from llmshearing.convert.tensor_io import DEFAULT_MAX_SHARD_BYTES, StateDictSource, open_weights

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


def download_from_hub(name: str) -> Path:
    """Fetch config, weights and tokenizer of an HF hub model (only where the hub is reachable)."""
    from huggingface_hub import snapshot_download

    base = [CONFIG_NAME, *TOKENIZER_FILES]
    try:
        directory = Path(
            snapshot_download(name, allow_patterns=[*base, "*.safetensors", "*.safetensors.index.json"])
        )
        if not any(directory.glob("*.safetensors")):
            directory = Path(
                snapshot_download(name, allow_patterns=[*base, "pytorch_model*.bin", "*.bin.index.json"])
            )
    except Exception as err:  # offline, unknown repo, gated repo: all mean "cannot get it"
        raise FileNotFoundError(
            f"{name} is not a local directory and could not be fetched from the Hugging Face hub ({err}); "
            "download the model and pass its directory"
        ) from err
    return directory


def convert_hf_to_project(
    src: str | Path,
    out: str | Path,
    gguf: str | Path | None = None,
    dtype: str | None = None,
    overwrite: bool = False,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    progress: bool = True,
) -> Path:
    """Convert an HF model to a project checkpoint at ``out`` (written to a temp dir, then renamed).

    Safetensors weights are streamed tensor by tensor; ``dtype`` ("fp32" | "bf16" | "fp16") sets the
    stored precision, None keeps the source's (GGUF weights are dequantised to fp32).
    """
    directory, gguf_file = resolve_source(src, gguf)
    if gguf_file is not None:
        return _convert_gguf(gguf_file, out, dtype, overwrite, max_shard_bytes, progress)
    config_path = directory / CONFIG_NAME
    hf_config = read_config_json(config_path)
    config = model_config_from_hf(hf_config, str(config_path))
    with hf_source_to_project(open_weights(directory), config, str(directory)) as tensors:
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
    from gguf import GGUFReader

    fields = GGUFReader(str(gguf_file)).fields
    for attribute, key in GGUF_SPECIAL_TOKENS.items():
        field = fields.get(key)
        if field is None or not field.data:
            continue
        token_id = int(field.parts[field.data[0]][0])
        if 0 <= token_id < len(tokenizer):
            setattr(tokenizer, attribute, tokenizer.convert_ids_to_tokens(token_id))


def _convert_gguf(
    gguf_file: Path, out: str | Path, dtype: str | None, overwrite: bool, max_shard_bytes: int, progress: bool
) -> Path:
    """GGUF via transformers' GGUF support (dequantised to fp32), tokenizer included."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

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

    with hf_source_to_project(StateDictSource(state), config, str(gguf_file)) as tensors:
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
        )
