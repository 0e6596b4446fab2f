"""Preparation of per-domain MDS datasets from raw JSON-lines text.

``prepare(PrepareConfig(...))`` reads ``<input>/<domain>/*.jsonl[.gz|.zst]``, splits every domain
into train, eval and test without sharing a document, tokenises with a fast tokenizer in worker
processes (order-preserving, so the output does not depend on the worker count), wraps each
document as BOS + tokens + EOS, packs the stream into ``seq_len`` samples and writes
``<output>/{train,eval,test}/<domain>/`` with streaming's ``MDSWriter`` plus ``<output>/manifest.json``.
Training reads train (and eval for the data mix); test is never read during training.

Split rule, deterministic for a seed. Eval and test (``test_seqs``, by default as many as
``eval_seqs``) are filled together: each held-out document goes to the one less filled relative to
its size, so scarce held-out data is shared between them. Every line is read and validated, and
every document ends in exactly one split, or is counted as unused when train is full at
``train_seqs``:

* several files: files are held out in an order drawn from the seed (never all of them) until eval
  and test are full; the rest of the file that fills them goes to train, then every other file in
  sorted path order;
* one file: documents are held out, those with the smallest seeded keys whose tokens give
  ``eval_seqs + test_seqs`` samples, never more than half of the (non-blank) lines. Train gets the
  other documents in file order, then held-out documents that their split did not take (each passes
  to the next split: eval, test, train).

A document that fills a split's last sample is cut there; its tail is the dropped remainder.
Held-out documents are packed in file order; train files in sorted path order. A tokenizer whose
BOS and EOS are the same token (GPT-2 style) gets only the EOS after each document.

Manifest entries per split and domain: ``files`` (how many files) and ``paths`` (relative to the
domain directory, in the order read), ``documents`` and ``tokens`` (BOS/EOS included) fed to the
packer, and ``samples`` written; ``tokens - samples * seq_len`` is the dropped remainder. Per domain:
``documents_read`` (the sum of the splits' documents and ``unused_documents``) and ``bad_lines``.
``vocab_size`` is the tokenizer's and ``max_token_id`` the largest id written, which
:func:`llmshearing.data.checks.check_vocab` checks against a model.

Everything is written to a staging directory beside the output and renamed on success
(:mod:`llmshearing.io.staging`); what a killed run left there is removed by the next run.
"""

from __future__ import annotations

import hashlib
import heapq
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from llmshearing.data.jsonl import (
    BadLineBudget,
    JsonlReader,
    count_document_lines,
    list_jsonl_files,
)
from llmshearing.data.layout import (
    SPLITS,
    TOKENS_COLUMN,
    manifest_header,
    write_manifest,
)
from llmshearing.data.packing import Packer
from llmshearing.data.tokenizer_pool import (
    EncodedBatch,
    Phase,
    Pipeline,
    TokenizerPool,
    TokenizerSpec,
    load_tokenizer,
)
from llmshearing.io.staging import staged_dir

logger = logging.getLogger(__name__)

COMPRESSIONS = (None, "zstd")
_BATCH_LINES = 512
_BATCH_BYTES = 1 << 18


@dataclass
class PrepareConfig:
    """Options of one preparation run (see ``data_prep/prepare_mds.py --help``)."""

    input: Path
    output: Path
    tokenizer: str
    seq_len: int
    eval_seqs: int = 500
    test_seqs: int | None = None  # default: as many as eval_seqs
    train_seqs: int | None = None
    workers: int = 1
    seed: int = 42
    text_field: str = "text"
    max_bad_lines: int = 100
    compression: str | None = None
    overwrite: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        self.input = Path(self.input)
        self.output = Path(self.output)

    def validate(self) -> None:
        """Raise ``ValueError`` naming the option for any value out of range."""
        checks = [
            (self.seq_len >= 1, f"--seq-len must be at least 1, got {self.seq_len}"),
            (self.eval_seqs >= 0, f"--eval-seqs must be 0 or more, got {self.eval_seqs}"),
            (
                self.test_seqs is None or self.test_seqs >= 0,
                f"--test-seqs must be 0 or more, got {self.test_seqs}",
            ),
            (
                self.train_seqs is None or self.train_seqs >= 1,
                f"--train-seqs must be at least 1, got {self.train_seqs}",
            ),
            (self.workers >= 1, f"--workers must be at least 1, got {self.workers}"),
            (self.max_bad_lines >= 0, f"--max-bad-lines must be 0 or more, got {self.max_bad_lines}"),
            (bool(self.text_field), "--text-field must not be empty"),
            (
                self.compression in COMPRESSIONS,
                f"--compression must be one of {COMPRESSIONS}, got {self.compression!r}",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    def held_out_seqs(self) -> dict[str, int]:
        """Samples asked for per held-out split, in the order they are filled: eval, then test."""
        return {"eval": self.eval_seqs, "test": self.eval_seqs if self.test_seqs is None else self.test_seqs}


# ----------------------------------------------------------------------------- reading


def _line_batches(reader: JsonlReader) -> Iterator[tuple[list[int], list[bytes]]]:
    """Group ``(line, raw)`` pairs into batches of at most ``_BATCH_LINES`` lines / ``_BATCH_BYTES``."""
    numbers: list[int] = []
    raws: list[bytes] = []
    size = 0
    for number, raw in reader:
        numbers.append(number)
        raws.append(raw)
        size += len(raw)
        if len(raws) >= _BATCH_LINES or size >= _BATCH_BYTES:
            yield numbers, raws
            numbers, raws, size = [], [], 0
    if raws:
        yield numbers, raws


def _file_batches(
    files: list[Path], progress: Callable[[int], None]
) -> Iterator[tuple[int, tuple[list[int], list[bytes]]]]:
    """``(file index, batch)`` over ``files`` in order, reporting on-disk bytes read to ``progress``."""
    for index, path in enumerate(files):
        with JsonlReader(path) as reader:
            seen = 0
            for batch in _line_batches(reader):
                position = reader.position()
                progress(position - seen)
                seen = position
                yield index, batch


def _strip_compression(name: str) -> str:
    return name.removesuffix(".gz").removesuffix(".zst")


def _seeded_key(seed: int, domain: str, item: str) -> int:
    """A stable 64-bit pseudo-random key of ``item`` for ``(seed, domain)``."""
    digest = hashlib.blake2b(f"{seed}\0{domain}\0{item}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


# ----------------------------------------------------------------------------- writing


class SplitWriter:
    """Packs the documents of one split of one domain and writes the samples as MDS.

    The MDS directory is created with the first sample, so an empty split leaves no directory.
    """

    def __init__(
        self, out: Path, seq_len: int, dtype: np.dtype, max_samples: int | None, compression: str | None
    ) -> None:
        self.out = out
        self.paths: list[str] = []
        self.max_token_id = -1
        self.packer = Packer(seq_len, dtype, self._write, max_samples)
        self._column = f"ndarray:{dtype.name}"
        self._compression = compression
        self._writer = None

    @property
    def full(self) -> bool:
        return self.packer.full

    def add(self, tokens: np.ndarray, lengths: np.ndarray, file: str) -> int:
        """Pack the leading documents that start before the split is full; returns how many."""
        taken = self.packer.add_documents(tokens, lengths)
        if taken and (not self.paths or self.paths[-1] != file):
            self.paths.append(file)
        return taken

    def _write(self, sample: np.ndarray) -> None:
        if self._writer is None:
            from streaming import MDSWriter

            self.out.parent.mkdir(parents=True, exist_ok=True)
            self._writer = MDSWriter(
                out=str(self.out), columns={TOKENS_COLUMN: self._column}, compression=self._compression
            )
        self.max_token_id = max(self.max_token_id, int(sample.max()))
        self._writer.write({TOKENS_COLUMN: sample})

    def close(self) -> None:
        if self._writer is not None:
            self._writer.finish()
            self._writer = None

    def abort(self) -> None:
        if self._writer is not None:
            self._writer.cancel_future_jobs()
            self._writer = None

    def stats(self) -> dict[str, Any]:
        p = self.packer
        return {
            "files": len(self.paths),
            "paths": list(self.paths),
            "documents": p.documents,
            "tokens": p.tokens,
            "samples": p.samples,
        }


_Document = tuple[int, np.ndarray]  # (line, wrapped tokens)


class _HeldOutSelector:
    """Keeps the documents with the smallest keys whose tokens just reach ``target()`` (at most
    ``cap`` documents); every other document goes to ``overflow`` as soon as it is not needed."""

    def __init__(
        self, target: Callable[[], int], cap: int, overflow: Callable[[int, np.ndarray], None]
    ) -> None:
        self._target = target
        self._cap = cap
        self._overflow = overflow
        self._heap: list[tuple[int, int, np.ndarray]] = []  # (-key, line, tokens): largest key on top
        self._total = 0

    def offer(self, key: int, line: int, tokens: np.ndarray) -> None:
        heapq.heappush(self._heap, (-key, line, tokens))
        self._total += len(tokens)
        heap = self._heap
        while heap and (len(heap) > self._cap or self._total - len(heap[0][2]) >= self._target()):
            _, evicted_line, evicted = heapq.heappop(heap)
            self._total -= len(evicted)
            self._overflow(evicted_line, evicted)

    def kept(self) -> list[_Document]:
        """The kept documents as ``(line, tokens)``, smallest key first."""
        return [(line, tokens) for _, line, tokens in sorted(self._heap, key=lambda e: -e[0])]


@dataclass
class _Domain:
    """One domain's writers, the first phase of batches scheduled for it, and its accounting."""

    name: str
    root: Path
    files: list[Path]
    budget: BadLineBudget
    train: SplitWriter
    held_out: dict[str, SplitWriter]  # "eval", "test": the held-out splits asked for, in that order
    first_files: list[Path]
    first_phase: Phase | None = None
    documents_read: int = 0
    unused: int = 0  # documents read that no split took (train full at --train-seqs)
    notes: list[str] = field(default_factory=list)

    def rel(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix()

    def account(self, path: Path, encoded: EncodedBatch) -> None:
        """Count the documents of a consumed batch and its bad lines."""
        for line, reason in encoded.bad_lines:
            self.budget.record(path, line, reason)
        self.documents_read += len(encoded.lengths)

    def route(self, splits: list[SplitWriter], tokens: np.ndarray, lengths: np.ndarray, path: Path) -> None:
        """Each document goes to the first of ``splits`` that takes it; one that none takes is unused."""
        rel = self.rel(path)
        offset = done = 0
        for split in splits:
            if done == len(lengths):
                break
            taken = split.add(tokens[offset:], lengths[done:], rel)
            offset += int(np.sum(lengths[done : done + taken]))
            done += taken
        self.unused += len(lengths) - done

    def hold_out(self, tokens: np.ndarray, lengths: np.ndarray, path: Path) -> None:
        """Each document goes to the held-out split least filled relative to its size; once every
        held-out split is full, the rest go to train."""
        held = list(self.held_out.values())
        capacity = [split.packer.max_samples * split.packer.seq_len for split in held]
        offset = 0
        for i, length in enumerate(lengths.tolist()):
            index = _emptiest([split.packer.tokens for split in held], capacity)  # full: tokens == capacity
            if index is None:
                self.route([self.train], tokens[offset:], lengths[i:], path)
                return
            held[index].add(tokens[offset : offset + length], lengths[i : i + 1], self.rel(path))
            offset += length

    def pack_in_order(self, split: SplitWriter, documents: list[_Document]) -> list[_Document]:
        """Pack ``documents`` in file order into ``split``; returns those it did not take."""
        rel = self.rel(self.files[0])
        left = []
        for line, tokens in sorted(documents, key=lambda d: d[0]):
            if split.add(tokens, np.array([len(tokens)]), rel) == 0:
                left.append((line, tokens))
        return left

    def writers(self) -> dict[str, SplitWriter]:
        return {"train": self.train, **self.held_out}


def _emptiest(filled: list[int], capacity: list[int]) -> int | None:
    """Index of the split least filled relative to its capacity (the first on ties), or ``None``
    when every split is at capacity."""
    open_ = [i for i, (f, c) in enumerate(zip(filled, capacity, strict=True)) if f < c]
    return min(open_, key=lambda i: filled[i] / capacity[i]) if open_ else None


def _make_domain(name: str, files: list[Path], cfg: PrepareConfig, dtype: np.dtype, tmp: Path) -> _Domain:
    """Writers of one domain and the files it reads first (held-out candidates, the single file, or all)."""
    root = cfg.input / name

    def writer(split: str, max_samples: int | None) -> SplitWriter:
        return SplitWriter(tmp / split / name, cfg.seq_len, dtype, max_samples, cfg.compression)

    held_out = {split: writer(split, n) for split, n in cfg.held_out_seqs().items() if n > 0}
    first = files
    if held_out and len(files) > 1:
        # keyed without the compression suffix, so compressing the input does not change the split
        def key(path: Path) -> int:
            return _seeded_key(cfg.seed, name, _strip_compression(path.relative_to(root).as_posix()))

        first = sorted(files, key=key)[:-1]
    budget = BadLineBudget(name, cfg.max_bad_lines)
    return _Domain(name, root, files, budget, writer("train", cfg.train_seqs), held_out, first)


def _feed_files(
    domain: _Domain, files: list[Path], phase: Phase, pipeline: Pipeline, splits: list[SplitWriter]
) -> None:
    """Route every document of ``phase`` (whole ``files`` in order) through ``splits``."""
    for index, encoded in pipeline.results(phase):
        domain.account(files[index], encoded)
        domain.route(splits, encoded.tokens, encoded.lengths, files[index])


def _split_by_files(domain: _Domain, pipeline: Pipeline, progress: Callable[[int], None]) -> None:
    """Read held-out candidate files (seeded order, never all) into eval, then test, until both are
    full; the rest of the file that filled them and every file not read go to train."""
    assert domain.first_phase is not None
    candidates = domain.first_files
    held = list(domain.held_out.values())
    consumed = len(candidates)  # candidates[:consumed] are read to their end
    current = -1
    for index, encoded in pipeline.results(domain.first_phase):
        if index != current:
            if all(split.full for split in held):
                pipeline.cancel(domain.first_phase)
                consumed = index
                break
            current = index
        domain.account(candidates[index], encoded)
        domain.hold_out(encoded.tokens, encoded.lengths, candidates[index])
    if not all(split.full for split in held):
        domain.notes.append(f"all files but one held out ({len(candidates)} of {len(domain.files)})")
    read = set(candidates[:consumed])
    rest = [p for p in domain.files if p not in read]
    phase = pipeline.schedule(_file_batches(rest, progress), first=True)
    _feed_files(domain, rest, phase, pipeline, [domain.train])


def _split_by_documents(domain: _Domain, seed: int, seq_len: int, pipeline: Pipeline) -> None:
    """Hold out documents of a single file (smallest seeded keys, at most half of them): the
    smallest keys for eval, the next for test; each held-out split is packed in file order and
    what it does not take goes to the next split (train last)."""
    assert domain.first_phase is not None
    path = domain.files[0]
    lines = count_document_lines(path)
    cap = lines // 2
    held = list(domain.held_out.values())
    targets = [split.packer.max_samples * seq_len for split in held]
    longest = [0]  # the longest document so far: what a split may lose where its last sample cuts one

    def to_train(_: int, tokens: np.ndarray) -> None:
        domain.route([domain.train], tokens, np.array([len(tokens)]), path)

    selector = _HeldOutSelector(lambda: sum(targets) + len(held) * longest[0], cap, to_train)
    for _, encoded in pipeline.results(domain.first_phase):
        domain.account(path, encoded)
        starts = (np.cumsum(encoded.lengths) - encoded.lengths).tolist()
        for line, start, length in zip(
            encoded.line_numbers.tolist(), starts, encoded.lengths.tolist(), strict=True
        ):
            longest[0] = max(longest[0], length)
            key = _seeded_key(seed, domain.name, str(line))
            selector.offer(key, line, encoded.tokens[start : start + length].copy())
    kept = selector.kept()
    if len(kept) == cap:
        domain.notes.append(f"at most half of the documents can be held out: {cap} of {lines}")
    groups: list[list[_Document]] = [[] for _ in held]
    assigned = [0] * len(held)
    room = [target + longest[0] for target in targets]
    for line, tokens in kept:
        index = _emptiest(assigned, room)
        index = len(held) - 1 if index is None else index
        groups[index].append((line, tokens))
        assigned[index] += len(tokens)
    spill: list[_Document] = []
    for split, documents in zip(held, groups, strict=True):
        spill = domain.pack_in_order(split, documents + spill)
    for _, tokens in sorted(spill, key=lambda d: d[0]):
        to_train(0, tokens)


def _check_domain(domain: _Domain, cfg: PrepareConfig) -> None:
    """Fail on a domain without documents or samples; warn when a held-out split is smaller than asked."""
    splits = domain.writers()
    documents = sum(split.packer.documents for split in splits.values())
    assert documents + domain.unused == domain.documents_read, "a document was lost between splits"
    if documents == 0:
        first = f" (first bad line: {domain.budget.first})" if domain.budget.first else ""
        raise ValueError(
            f"domain {domain.name!r} ({cfg.input / domain.name}) has no documents: no line holds a "
            f"JSON object with a string {cfg.text_field!r} field{first}; add data or check --text-field"
        )
    for name, split in domain.held_out.items():
        if split.packer.samples == 0:
            raise ValueError(
                f"domain {domain.name!r}: no {name} sample: the {split.packer.documents} held-out "
                f"documents ({documents} in all) give {split.packer.tokens} tokens, fewer than "
                f"--seq-len {cfg.seq_len}; add documents, lower --seq-len or pass --{name}-seqs 0"
            )
    if domain.train.packer.samples == 0:
        raise ValueError(
            f"domain {domain.name!r}: the train split has {domain.train.packer.tokens} tokens, fewer than "
            f"--seq-len {cfg.seq_len}; add documents, lower --seq-len or lower --eval-seqs/--test-seqs"
        )
    why = f" ({'; '.join(domain.notes)})" if domain.notes else ""
    for name, split in domain.held_out.items():
        asked = cfg.held_out_seqs()[name]
        if split.packer.samples < asked:
            logger.warning(
                "domain %r: %s has %d samples, fewer than --%s-seqs %d%s",
                domain.name,
                name,
                split.packer.samples,
                name,
                asked,
                why,
            )
    if domain.unused:
        logger.warning(
            "domain %r: %d documents are in no split: train is full at --train-seqs %d",
            domain.name,
            domain.unused,
            cfg.train_seqs,
        )


def _run_domain(
    domain: _Domain, cfg: PrepareConfig, pipeline: Pipeline, progress: Callable[[int], None]
) -> None:
    """Split, tokenise, pack and write one domain (its first phase is already scheduled)."""
    assert domain.first_phase is not None
    if not domain.held_out:
        _feed_files(domain, domain.first_files, domain.first_phase, pipeline, [domain.train])
    elif len(domain.files) > 1:
        _split_by_files(domain, pipeline, progress)
    else:
        _split_by_documents(domain, cfg.seed, cfg.seq_len, pipeline)
    _check_domain(domain, cfg)
    for writer in domain.writers().values():
        writer.close()


def _empty_stats() -> dict[str, Any]:
    return {"files": 0, "paths": [], "documents": 0, "tokens": 0, "samples": 0}


@dataclass
class _Results:
    """What :func:`_prepare_domains` measured, for the manifest."""

    splits: dict[str, dict[str, Any]]  # split -> domain -> stats
    documents_read: dict[str, int]
    unused_documents: dict[str, int]
    bad_lines: dict[str, int]
    max_token_id: int


def _prepare_domains(
    listing: dict[str, list[Path]], cfg: PrepareConfig, spec: TokenizerSpec, tmp: Path
) -> _Results:
    """Every domain in turn, the next one's batches already in flight."""
    from tqdm.auto import tqdm

    dtype = np.dtype(spec.dtype)
    domains = [_make_domain(name, files, cfg, dtype, tmp) for name, files in listing.items()]
    total = sum(p.stat().st_size for files in listing.values() for p in files)
    results = _Results({split: {} for split in SPLITS}, {}, {}, {}, -1)
    bar = tqdm(total=total, unit="B", unit_scale=True, disable=not cfg.progress, desc="reading")
    try:
        with TokenizerPool(spec, cfg.workers) as pool:
            pipeline = Pipeline(pool)
            for i, domain in enumerate(domains):
                for ahead in domains[i : i + 2]:  # this domain and the next one
                    if ahead.first_phase is None:
                        ahead.first_phase = pipeline.schedule(_file_batches(ahead.first_files, bar.update))
                bar.set_description(domain.name)
                _run_domain(domain, cfg, pipeline, bar.update)
                writers = domain.writers()
                for split in SPLITS:
                    results.splits[split][domain.name] = (
                        writers[split].stats() if split in writers else _empty_stats()
                    )
                results.documents_read[domain.name] = domain.documents_read
                results.unused_documents[domain.name] = domain.unused
                results.bad_lines[domain.name] = domain.budget.count
                results.max_token_id = max(results.max_token_id, *(w.max_token_id for w in writers.values()))
        bar.update(max(0, total - bar.n))
    except BaseException:
        for domain in domains:
            for writer in domain.writers().values():
                writer.abort()
        raise
    finally:
        bar.close()
    return results


# ----------------------------------------------------------------------------- input and output


def discover_domains(root: Path) -> dict[str, list[Path]]:
    """``{domain: files}`` for every sub-directory of ``root`` (sorted); each must hold JSON-lines files."""
    if not root.is_dir():
        raise FileNotFoundError(f"input directory {root} does not exist; expected {root}/<domain>/*.jsonl")
    names = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not names:
        raise ValueError(
            f"input directory {root} has no domain sub-directories; put each domain's files in "
            f"{root}/<domain>/*.jsonl (or .jsonl.gz, .jsonl.zst)"
        )
    domains = {}
    for name in names:
        files = list_jsonl_files(root / name)
        if not files:
            raise ValueError(
                f"domain {name!r} ({root / name}) has no .jsonl, .jsonl.gz or .jsonl.zst files; "
                "add data or remove the directory"
            )
        domains[name] = files
    return domains


def _check_output(cfg: PrepareConfig) -> Path:
    """The resolved output path; refuses an output that holds data (unless overwriting) or the input."""
    output = cfg.output.expanduser().resolve()
    source = cfg.input.expanduser().resolve()
    if output == source or source in output.parents:
        raise ValueError(
            f"--output {cfg.output} must not be inside --input {cfg.input}; choose another directory"
        )
    if output in source.parents:
        raise ValueError(f"--output {cfg.output} contains --input {cfg.input}; choose another directory")
    if output.exists():
        if not output.is_dir():
            raise ValueError(f"--output {cfg.output} exists and is not a directory; choose another path")
        if any(output.iterdir()) and not cfg.overwrite:
            raise ValueError(
                f"output directory {cfg.output} already holds data; pass --overwrite to replace it "
                "or choose another --output"
            )
    return output


def prepare(cfg: PrepareConfig) -> dict[str, Any]:
    """Run the whole preparation and return the manifest (also written to ``<output>/manifest.json``).

    The output appears complete or not at all; a run that finds the output written by another run
    when it finishes fails and leaves that output as it is (unless ``overwrite``).
    """
    cfg.validate()
    domains = discover_domains(cfg.input)
    output = _check_output(cfg)
    spec = load_tokenizer(cfg.tokenizer, cfg.text_field)
    with staged_dir(output, overwrite=cfg.overwrite) as tmp:
        results = _prepare_domains(domains, cfg, spec, tmp)
        manifest = {
            **manifest_header(
                cfg.seq_len, cfg.tokenizer, spec.vocab_size, spec.dtype, domains, results.splits
            ),
            "max_token_id": results.max_token_id,
            "bos_token_id": spec.bos_token_id,
            "eos_token_id": spec.eos_token_id,
            "seed": cfg.seed,
            "text_field": cfg.text_field,
            "compression": cfg.compression,
            "documents_read": results.documents_read,
            "unused_documents": results.unused_documents,
            "bad_lines": results.bad_lines,
        }
        write_manifest(tmp, manifest)
    return manifest


def format_summary(manifest: dict[str, Any]) -> str:
    """A plain-text table of files, documents, tokens and samples per domain and split, and where
    every document read went."""
    header = ("domain", "split", "files", "documents", "tokens", "samples", "bad lines")
    splits = [split for split in SPLITS if split in manifest["splits"]]
    rows = []
    for name in manifest["domains"]:
        for split in splits:
            s = manifest["splits"][split][name]
            bad = f"{manifest['bad_lines'][name]:,}" if split == "train" else ""
            row = (
                name,
                split,
                f"{s['files']}",
                f"{s['documents']:,}",
                f"{s['tokens']:,}",
                f"{s['samples']:,}",
            )
            rows.append((*row, bad))
        unused = manifest.get("unused_documents", {}).get(name, 0)
        if unused:
            rows.append((name, "unused", "", f"{unused:,}", "", "", ""))
    totals = {
        split: sum(manifest["splits"][split][d]["samples"] for d in manifest["domains"]) for split in splits
    }
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
        for r in [header, *rows]
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    samples = ", ".join(f"{split} {totals[split]:,} samples" for split in splits)
    lines.append(f"{len(manifest['domains'])} domains, seq_len {manifest['seq_len']}, {samples}")
    if "documents_read" in manifest:
        lines.append(_document_accounting(manifest))
    return "\n".join(lines)


def _document_accounting(manifest: dict[str, Any]) -> str:
    """One line: documents read, how many each split holds, how many none holds, and bad lines."""
    domains = manifest["domains"]
    read = sum(manifest["documents_read"][d] for d in domains)
    parts = [
        f"{split} {sum(manifest['splits'][split][d]['documents'] for d in domains):,}"
        for split in SPLITS
        if split in manifest["splits"]
    ]
    unused = sum(manifest["unused_documents"][d] for d in domains)
    bad = sum(manifest["bad_lines"][d] for d in domains)
    tail = f", {unused:,} in no split (train full at its --train-seqs cap)" if unused else ""
    return f"{read:,} documents read: {', '.join(parts)}{tail}; {bad:,} malformed lines skipped"
