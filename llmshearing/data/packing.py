"""Document wrapping (BOS + tokens + EOS) and packing into fixed-length samples.

Packing concatenates wrapped documents into one token stream and cuts it into consecutive
``seq_len`` samples, crossing document boundaries; the remainder shorter than ``seq_len`` at
the end of a split is dropped.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np


def token_dtype(vocab_size: int) -> np.dtype:
    """The narrowest unsigned dtype (uint16 or uint32) that holds every id below ``vocab_size``."""
    if vocab_size <= 0:
        raise ValueError(f"vocab_size must be positive, got {vocab_size}")
    if vocab_size <= 1 << 16:
        return np.dtype(np.uint16)
    if vocab_size <= 1 << 32:
        return np.dtype(np.uint32)
    raise ValueError(f"vocab_size {vocab_size} does not fit in uint32 token ids")


def wrap_documents(
    token_lists: Sequence[Sequence[int]], bos: int | None, eos: int | None, dtype: np.dtype
) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate documents as ``[bos] + ids + [eos]`` (a ``None`` id is left out).

    Returns the flat token array and the wrapped length of every document.
    """
    head = 0 if bos is None else 1
    tail = 0 if eos is None else 1
    lengths = np.fromiter((len(ids) for ids in token_lists), dtype=np.int64, count=len(token_lists))
    lengths += head + tail
    flat = np.empty(int(lengths.sum()), dtype=dtype)
    pos = 0
    for ids, length in zip(token_lists, lengths.tolist(), strict=True):
        if head:
            flat[pos] = bos
        flat[pos + head : pos + length - tail] = ids
        if tail:
            flat[pos + length - 1] = eos
        pos += length
    return flat, lengths


class Packer:
    """Cuts a stream of token arrays into ``seq_len`` samples handed to ``sink``.

    ``sink`` receives a view that is only valid during the call (write or copy it there). With
    ``max_samples`` set, the packer stops after that many samples and ignores further input.
    """

    def __init__(
        self,
        seq_len: int,
        dtype: np.dtype,
        sink: Callable[[np.ndarray], None],
        max_samples: int | None = None,
    ) -> None:
        if seq_len <= 0:
            raise ValueError(f"seq_len must be positive, got {seq_len}")
        self.seq_len = seq_len
        self.max_samples = max_samples
        self.samples = 0
        self.documents = 0
        self.tokens = 0  # tokens taken from the input (written, or waiting in the leftover)
        self._sink = sink
        self._buffer = np.empty(seq_len, dtype=dtype)
        self._fill = 0

    @property
    def full(self) -> bool:
        """Whether ``max_samples`` samples have been emitted."""
        return self.max_samples is not None and self.samples >= self.max_samples

    @property
    def leftover(self) -> int:
        """Tokens waiting for a sample to be completed (dropped if the input ends here)."""
        return self._fill

    @property
    def room(self) -> int | None:
        """Tokens the packer still takes before it is full (``None``: no limit)."""
        if self.max_samples is None:
            return None
        return max(0, (self.max_samples - self.samples) * self.seq_len - self._fill)

    def add_documents(self, tokens: np.ndarray, lengths: np.ndarray) -> int:
        """Append the leading documents (wrapped ``lengths``, back to back in ``tokens``) that start
        before the packer is full; returns how many it took (the tail of the last may be cut)."""
        room = self.room
        taken = len(lengths)
        if room is not None:
            starts = np.cumsum(lengths) - lengths
            taken = int(np.searchsorted(starts, room, side="left"))
        if taken:
            self.add(tokens[: int(np.sum(lengths[:taken]))], taken)
        return taken

    def add(self, tokens: np.ndarray, documents: int = 1) -> None:
        """Append ``tokens`` (``documents`` wrapped documents) to the stream."""
        if self.full:
            return
        self.documents += documents
        pos, end, seq_len = 0, len(tokens), self.seq_len
        while pos < end and not self.full:
            if self._fill == 0 and end - pos >= seq_len:
                self._emit(tokens[pos : pos + seq_len])
                pos += seq_len
                continue
            take = min(seq_len - self._fill, end - pos)
            self._buffer[self._fill : self._fill + take] = tokens[pos : pos + take]
            self._fill += take
            pos += take
            if self._fill == seq_len:
                self._fill = 0
                self._emit(self._buffer)
        self.tokens += pos

    def _emit(self, sample: np.ndarray) -> None:
        self.samples += 1
        self._sink(sample)
