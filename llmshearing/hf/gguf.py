"""GGUF files (a model and its tokenizer in one file, as the Hugging Face hub distributes many): telling one
apart, and refusing one cut off."""

from __future__ import annotations

from pathlib import Path


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
