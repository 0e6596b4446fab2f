"""Reading JSON-lines documents (`.jsonl`, `.jsonl.gz`, `.jsonl.zst`) with file/line accounting.

Files are read as bytes line by line so that every document keeps its 1-based line number; a
line is decoded and parsed by :func:`parse_document`, which raises :class:`BadLine` with a short
reason for anything that is not a JSON object holding a string text field. :class:`BadLineBudget`
counts bad lines per domain and fails the run once a limit is exceeded.
"""

from __future__ import annotations

import gzip
import io
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

logger = logging.getLogger(__name__)

JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst")
_READ_BUFFER = 1 << 20
_SHOWN_BAD_LINES = 5


class BadLine(ValueError):
    """A line that is not a usable document; the message is the reason (no file or line)."""


def is_jsonl(path: Path) -> bool:
    """Whether ``path`` names a (possibly compressed) JSON-lines file."""
    return path.name.endswith(JSONL_SUFFIXES)


def list_jsonl_files(directory: Path) -> list[Path]:
    """JSON-lines files under ``directory`` (recursively), sorted by their relative path."""
    files = [p for p in directory.rglob("*") if p.is_file() and is_jsonl(p) and not p.name.startswith(".")]
    return sorted(files, key=lambda p: p.relative_to(directory).as_posix())


class _ZstdReader(io.RawIOBase):
    """Decompresses a (multi-frame) zstd stream; a file that ends inside a frame is an error."""

    def __init__(self, raw: BinaryIO) -> None:
        import zstandard

        self._raw = raw
        self._dctx = zstandard.ZstdDecompressor()
        self._frame = self._dctx.decompressobj()
        self._frame_started = False
        self._out = b""
        self._pos = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while self._pos >= len(self._out):
            chunk = self._raw.read(_READ_BUFFER)
            if not chunk:
                if self._frame_started and not self._frame.eof:
                    raise EOFError("the zstd data ends inside a frame")
                return 0
            self._out, self._pos = self._decompress(chunk), 0
        n = min(len(buffer), len(self._out) - self._pos)
        buffer[:n] = self._out[self._pos : self._pos + n]
        self._pos += n
        return n

    def _decompress(self, chunk: bytes) -> bytes:
        parts = []
        while chunk:
            self._frame_started = True
            parts.append(self._frame.decompress(chunk))
            chunk = b""
            if self._frame.eof:  # the rest of the chunk starts the next frame
                chunk = self._frame.unused_data
                self._frame = self._dctx.decompressobj()
                self._frame_started = False
        return b"".join(parts)


class JsonlReader:
    """Iterates ``(line_number, raw_line)`` over a JSON-lines file, skipping blank lines.

    ``position()`` reports how many bytes of the file on disk (compressed bytes for `.gz`/`.zst`)
    have been consumed, for progress bars. Decompression errors become ``ValueError`` naming the file.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._raw: BinaryIO | None = None

    def __enter__(self) -> JsonlReader:
        self._raw = open(self.path, "rb")  # closed in __exit__
        return self

    def __exit__(self, *exc: object) -> None:
        if self._raw is not None:
            self._raw.close()
            self._raw = None

    def position(self) -> int:
        """Bytes of the on-disk file consumed so far."""
        return self._raw.tell() if self._raw is not None and not self._raw.closed else 0

    def _stream(self) -> tuple[BinaryIO, tuple[type[BaseException], ...]]:
        """The decompressed byte stream and the errors that mean the file is corrupt."""
        assert self._raw is not None, "use JsonlReader as a context manager"
        errors: tuple[type[BaseException], ...] = (OSError, EOFError)
        name = self.path.name
        if name.endswith(".gz"):
            return gzip.GzipFile(fileobj=self._raw, mode="rb"), errors
        if name.endswith(".zst"):
            import zstandard

            stream = io.BufferedReader(_ZstdReader(self._raw), buffer_size=_READ_BUFFER)
            return stream, (*errors, zstandard.ZstdError)
        return self._raw, errors

    def __iter__(self) -> Iterator[tuple[int, bytes]]:
        stream, errors = self._stream()
        line_number = 0
        try:
            for line_number, raw in enumerate(stream, start=1):  # noqa: B007 (read in the error message)
                if raw.strip():
                    yield line_number, raw
        except errors as err:
            raise ValueError(
                f"{self.path}: unreadable at line {line_number + 1}: {err}; "
                "the file is truncated or not in the format its suffix says"
            ) from err


def count_document_lines(path: Path) -> int:
    """Number of non-blank lines of a JSON-lines file (an upper bound on its documents)."""
    with JsonlReader(path) as reader:
        return sum(1 for _ in reader)


def parse_document(raw: bytes, text_field: str = "text") -> str:
    """The text of one JSON-lines record; raises :class:`BadLine` with the reason when unusable."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise BadLine(f"invalid UTF-8 at byte {err.start}") from None
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise BadLine(f"malformed JSON ({err.msg} at column {err.colno})") from None
    if not isinstance(record, dict):
        raise BadLine(f"expected a JSON object, got {type(record).__name__}")
    if text_field not in record:
        raise BadLine(f"no {text_field!r} field (keys: {', '.join(sorted(record)[:8]) or 'none'})")
    text = record[text_field]
    if not isinstance(text, str):
        raise BadLine(f"field {text_field!r} is {type(text).__name__}, not a string")
    if b"\\ud" in raw or b"\\uD" in raw:  # JSON escapes may encode unpaired surrogates
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise BadLine(f"field {text_field!r} holds an unpaired UTF-16 surrogate escape") from None
    return text


class BadLineBudget:
    """Counts malformed lines of one domain; fails once more than ``limit`` have been seen."""

    def __init__(self, domain: str, limit: int) -> None:
        self.domain = domain
        self.limit = limit
        self.count = 0
        self.first: str | None = None  # "path:line: reason" of the first bad line

    def record(self, path: Path, line_number: int, reason: str) -> None:
        """Account for one bad line: log it (the first few) and raise once over the limit."""
        self.count += 1
        if self.first is None:
            self.first = f"{path}:{line_number}: {reason}"
        if self.count > self.limit:
            raise ValueError(
                f"{path}:{line_number}: {reason}; domain {self.domain!r} has {self.count} malformed "
                f"lines, more than --max-bad-lines {self.limit}: fix the input or raise the limit"
            )
        if self.count <= _SHOWN_BAD_LINES:
            logger.warning("skipping %s:%d: %s", path, line_number, reason)
        elif self.count == _SHOWN_BAD_LINES + 1:
            logger.warning("domain %r: further malformed lines are skipped silently", self.domain)
