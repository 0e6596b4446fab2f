"""Tokenisation for data preparation: the tokenizer, worker processes and the phase pipeline.

:func:`load_tokenizer` turns a fast HF tokenizer into a picklable :class:`TokenizerSpec`; a
:class:`TokenizerPool` encodes batches of raw JSONL lines in spawned worker processes (or in-process
with one worker); a :class:`Pipeline` keeps those workers busy across the ordered phases (domains,
splits) that :mod:`llmshearing.data.prepare` consumes one after the other.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from llmshearing.data.jsonl import BadLine, parse_document
from llmshearing.data.packing import token_dtype, wrap_documents


@dataclass(frozen=True)
class TokenizerSpec:
    """Everything a worker needs to turn raw lines into wrapped token arrays (picklable)."""

    tokenizer: Any  # tokenizers.Tokenizer
    bos_token_id: int | None
    eos_token_id: int | None
    vocab_size: int
    dtype: str
    text_field: str


def load_tokenizer(name: str, text_field: str = "text") -> TokenizerSpec:
    """Load a fast HF tokenizer (directory, hub name or ``.gguf`` file) into a :class:`TokenizerSpec`.

    When BOS and EOS are the same token (GPT-2 style), documents get only the EOS. A local path that does not
    exist is refused before transformers is imported (seconds).
    """
    path = Path(name)
    kwargs: dict[str, Any] = {}
    source = name
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file {name} does not exist")
        from llmshearing.hf.gguf import check_gguf_file

        check_gguf_file(path)
        source, kwargs = str(path.parent), {"gguf_file": path.name}
    elif not path.exists() and (name.startswith((".", "/", "~")) or name.count("/") > 1):
        raise FileNotFoundError(f"tokenizer directory {name} does not exist; pass a directory or a hub name")
    elif not path.exists():  # a hub name: without the hub, only the local cache (no minutes of retries)
        from llmshearing.convert.hf_to_project import hub_unavailable

        offline = hub_unavailable(name)
        if offline is not None:
            kwargs["local_files_only"] = True
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source, use_fast=True, **kwargs)
    except Exception as err:  # transformers raises many types (OSError, ValueError, JSON errors)
        if kwargs.get("local_files_only"):
            raise FileNotFoundError(
                f"tokenizer {name!r} is not a local directory, and {offline} and it is not in the local "
                "Hugging Face cache; pass a tokenizer directory saved with save_pretrained, or a .gguf file"
            ) from None
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(
            f"cannot load tokenizer {name!r}: {reason}; pass a directory saved with "
            "save_pretrained (with tokenizer.json), a .gguf file, or a Hugging Face model name"
        ) from err
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(f"tokenizer {name!r} has no fast (Rust) implementation; provide a tokenizer.json")
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    if bos is not None and bos == eos:
        bos = None
    if bos is None and eos is None:
        raise ValueError(f"tokenizer {name!r} has neither a BOS nor an EOS token to separate documents")
    vocab_size = max(len(tokenizer), int(tokenizer.vocab_size))
    return TokenizerSpec(
        tokenizer=tokenizer.backend_tokenizer,
        bos_token_id=bos,
        eos_token_id=eos,
        vocab_size=vocab_size,
        dtype=token_dtype(vocab_size).name,
        text_field=text_field,
    )


class EncodedBatch(NamedTuple):
    """Tokenised documents of one batch of lines: wrapped tokens, back to back."""

    line_numbers: np.ndarray  # [n] line of each document
    lengths: np.ndarray  # [n] wrapped length of each document
    tokens: np.ndarray  # [sum(lengths)]
    bad_lines: list[tuple[int, str]]  # (line, reason) of every unusable line


Batch = tuple[list[int], list[bytes]]  # (line numbers, raw lines)
_WORKER: dict[str, Any] = {}


def _load_worker_state(spec: TokenizerSpec) -> None:
    """Set up the tokenizer of ``spec`` in this process."""
    tokenizer = spec.tokenizer
    tokenizer.no_truncation()
    tokenizer.no_padding()
    _WORKER.update(tokenizer=tokenizer, spec=spec, dtype=np.dtype(spec.dtype))


def _init_worker(spec: TokenizerSpec) -> None:
    """Worker initializer: one tokenizer thread per process, the tokenizer loaded once."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _load_worker_state(spec)


def _encode_batch(batch: Batch) -> EncodedBatch:
    """Parse and tokenise one batch of raw lines in a worker."""
    spec: TokenizerSpec = _WORKER["spec"]
    line_numbers, raws = batch
    texts: list[str] = []
    kept: list[int] = []
    bad: list[tuple[int, str]] = []
    for line_number, raw in zip(line_numbers, raws, strict=True):
        try:
            texts.append(parse_document(raw, spec.text_field))
            kept.append(line_number)
        except BadLine as err:
            bad.append((line_number, str(err)))
    encodings = _WORKER["tokenizer"].encode_batch_fast(texts, add_special_tokens=False)
    tokens, lengths = wrap_documents(
        [encoding.ids for encoding in encodings], spec.bos_token_id, spec.eos_token_id, _WORKER["dtype"]
    )
    return EncodedBatch(np.asarray(kept, dtype=np.int64), lengths, tokens, bad)


class _Deferred:
    """A batch encoded in-process when its result is asked for (never, if it is cancelled)."""

    def __init__(self, batch: Batch) -> None:
        self._batch = batch

    def result(self) -> EncodedBatch:
        return _encode_batch(self._batch)


class TokenizerPool:
    """Tokenisation in ``workers`` processes (in-process when ``workers == 1``).

    Workers are started with ``spawn`` (a fresh interpreter that receives the tokenizer): it is
    portable, and workers forked from a large parent process tokenise measurably slower. As with
    any spawned worker, a script calling :func:`prepare` must guard its entry point with
    ``if __name__ == "__main__":``.
    """

    def __init__(self, spec: TokenizerSpec, workers: int) -> None:
        self.workers = workers
        self._executor: ProcessPoolExecutor | None = None
        if workers == 1:
            _load_worker_state(spec)
        else:
            context = multiprocessing.get_context("spawn")
            self._executor = ProcessPoolExecutor(workers, context, initializer=_init_worker, initargs=(spec,))

    def __enter__(self) -> TokenizerPool:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        _WORKER.clear()
        if self._executor is not None:
            self._executor.shutdown(wait=exc_type is None, cancel_futures=True)

    def submit(self, batch: Batch) -> Any:
        """Start encoding ``batch``; the returned handle's ``result()`` gives the :class:`EncodedBatch`."""
        if self._executor is None:
            return _Deferred(batch)
        try:
            with _ctrl_c_held():  # a worker started here inherits the held Ctrl-C: only this process sees it
                return self._executor.submit(_encode_batch, batch)
        except BrokenProcessPool as err:
            raise _worker_died() from err


@contextlib.contextmanager
def _ctrl_c_held() -> Iterator[None]:
    """Hold SIGINT (Ctrl-C) while the block runs; a Ctrl-C meanwhile arrives when it ends.

    The executor starts its worker processes inside ``submit``; a process inherits the signals held
    by the thread that starts it, and keeps them held. Ctrl-C then reaches this process alone, which
    stops the workers and reports once, instead of every worker printing its own traceback.
    """
    if not hasattr(signal, "pthread_sigmask"):  # Windows: no signal masks
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _worker_died() -> RuntimeError:
    return RuntimeError(
        "a tokenizer worker process died (out of memory, killed, or started from a script "
        "without an `if __name__ == '__main__':` guard); retry with fewer --workers"
    )


def _result(handle: Any) -> EncodedBatch:
    """The result of a submitted batch; a dead worker becomes a clear error."""
    try:
        return handle.result()
    except BrokenProcessPool as err:
        raise _worker_died() from err


class Phase:
    """One ordered stream of ``(tag, batch)`` items scheduled on a :class:`Pipeline`."""

    def __init__(self, items: Iterator[tuple[Any, Batch]]) -> None:
        self.items = items
        self.pending: deque[tuple[Any, Any]] = deque()
        self.exhausted = False


class Pipeline:
    """Keeps the workers busy across phases.

    Phases are consumed one after the other, each in order, but items of scheduled later phases
    (the next domain) are submitted while earlier ones are consumed, so the workers do not idle at
    phase boundaries. At most ``2 * workers + 2`` batches are in flight, bounding memory.
    """

    def __init__(self, pool: TokenizerPool) -> None:
        self._pool = pool
        self._limit = 2 * pool.workers + 2
        self._schedule: list[Phase] = []
        self._in_flight = 0

    def schedule(self, items: Iterator[tuple[Any, Batch]], first: bool = False) -> Phase:
        """Add a phase at the end of the schedule (or, with ``first``, before every other phase)."""
        phase = Phase(items)
        self._schedule.insert(0 if first else len(self._schedule), phase)
        return phase

    def results(self, phase: Phase) -> Iterator[tuple[Any, EncodedBatch]]:
        """Yield ``(tag, encoded)`` of every item of ``phase`` in order; call :meth:`cancel` to stop early."""
        while True:
            self._fill()
            if not phase.pending and not phase.exhausted:
                self._submit_next(phase)  # the budget may be held by later phases' prefetched items
            if phase.pending:
                tag, handle = phase.pending.popleft()
                self._in_flight -= 1
                yield tag, _result(handle)
            elif phase.exhausted:
                self.cancel(phase)
                return

    def cancel(self, phase: Phase) -> None:
        """Drop ``phase``: its unread items are not read and its results in flight are discarded."""
        self._in_flight -= len(phase.pending)
        for _, handle in phase.pending:
            if hasattr(handle, "cancel"):
                handle.cancel()  # not started yet: never runs
        phase.pending.clear()
        phase.exhausted = True
        close = getattr(phase.items, "close", None)
        if close is not None:
            close()
        if phase in self._schedule:
            self._schedule.remove(phase)

    def _submit_next(self, phase: Phase) -> None:
        try:
            tag, batch = next(phase.items)
        except StopIteration:
            phase.exhausted = True
            return
        phase.pending.append((tag, self._pool.submit(batch)))
        self._in_flight += 1

    def _fill(self) -> None:
        """Submit items of the scheduled phases, in schedule order, up to the in-flight limit."""
        for phase in self._schedule:
            while not phase.exhausted and self._in_flight < self._limit:
                self._submit_next(phase)
            if self._in_flight >= self._limit:
                return
