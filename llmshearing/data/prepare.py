"""Preparation of per-domain MDS datasets from raw JSON-lines text.

``prepare(PrepareConfig(...))`` reads ``<input>/<domain>/*.jsonl[.gz|.zst]``, splits every domain
into eval and train without sharing a document, tokenises with a fast tokenizer in worker
processes (order-preserving, so the output does not depend on the worker count), wraps each
document as BOS + tokens + EOS, packs the stream into ``seq_len`` samples and writes
``<output>/{train,eval}/<domain>/`` with streaming's ``MDSWriter`` plus ``<output>/manifest.json``.

Split rule, deterministic for a seed:

* several files: whole files are held out for eval, in an order drawn from the seed, until they
  give ``eval_seqs`` samples (never all files; the rest of the last held-out file is unused);
* one file: documents are held out, those with the smallest seeded keys whose tokens give
  ``eval_seqs`` samples, never more than half of the (non-blank) lines. Train gets the other
  documents in file order, except candidates that turn out not to be needed, which follow later.

Eval documents are packed in file order; train files in sorted path order. A tokenizer whose BOS
and EOS are the same token (GPT-2 style) gets only the EOS after each document.

Manifest entries per split and domain: ``files`` (how many files) and ``paths`` (relative to the
domain directory, in the order read), ``documents`` and ``tokens`` (BOS/EOS included) fed to the
packer, and ``samples`` written; ``tokens - samples * seq_len`` is the dropped remainder.

Everything is written to a staging directory beside the output and renamed on success
(:mod:`llmshearing.staging`); what a killed run left there is removed by the next run.
"""

from __future__ import annotations

import hashlib
import heapq
import json
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
from llmshearing.data.packing import Packer
from llmshearing.data.tokenizer_pool import (
    EncodedBatch,
    Phase,
    Pipeline,
    TokenizerPool,
    TokenizerSpec,
    load_tokenizer,
)
from llmshearing.staging import staged_dir

logger = logging.getLogger(__name__)

MANIFEST_FORMAT = "llmshearing-mds"
MANIFEST_VERSION = 1
MANIFEST_NAME = "manifest.json"
SPLITS = ("train", "eval")
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
        self.packer = Packer(seq_len, dtype, self._write, max_samples)
        self._column = f"ndarray:{dtype.name}"
        self._compression = compression
        self._writer = None

    @property
    def full(self) -> bool:
        return self.packer.full

    def add(self, tokens: np.ndarray, documents: int, file: str) -> None:
        if self.packer.full:
            return
        if not self.paths or self.paths[-1] != file:
            self.paths.append(file)
        self.packer.add(tokens, documents)

    def _write(self, sample: np.ndarray) -> None:
        if self._writer is None:
            from streaming import MDSWriter

            self.out.parent.mkdir(parents=True, exist_ok=True)
            self._writer = MDSWriter(
                out=str(self.out), columns={"tokens": self._column}, compression=self._compression
            )
        self._writer.write({"tokens": sample})

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


class _EvalSelector:
    """Keeps the documents with the smallest keys whose tokens just reach ``target`` (at most
    ``cap`` documents); every other document goes to ``overflow`` as soon as it is not needed."""

    def __init__(self, target: int, cap: int, overflow: Callable[[np.ndarray], None]) -> None:
        self._target = target
        self._cap = cap
        self._overflow = overflow
        self._heap: list[tuple[int, int, np.ndarray]] = []  # (-key, line, tokens): largest key on top
        self._total = 0

    def offer(self, key: int, line: int, tokens: np.ndarray) -> None:
        heapq.heappush(self._heap, (-key, line, tokens))
        self._total += len(tokens)
        heap = self._heap
        while heap and (len(heap) > self._cap or self._total - len(heap[0][2]) >= self._target):
            _, _, evicted = heapq.heappop(heap)
            self._total -= len(evicted)
            self._overflow(evicted)

    def selected(self) -> list[tuple[int, np.ndarray]]:
        """The kept documents as ``(line, tokens)`` in file order."""
        return sorted((line, tokens) for _, line, tokens in self._heap)


@dataclass
class _Domain:
    """One domain's writers and the first phase of batches scheduled for it."""

    name: str
    root: Path
    files: list[Path]
    budget: BadLineBudget
    train: SplitWriter
    eval: SplitWriter | None
    first_files: list[Path]
    first_phase: Phase | None = None
    notes: list[str] = field(default_factory=list)

    def rel(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix()

    def account(self, path: Path, encoded: EncodedBatch) -> None:
        for line, reason in encoded.bad_lines:
            self.budget.record(path, line, reason)

    def writers(self) -> list[SplitWriter]:
        return [w for w in (self.train, self.eval) if w is not None]


def _make_domain(name: str, files: list[Path], cfg: PrepareConfig, dtype: np.dtype, tmp: Path) -> _Domain:
    """Writers of one domain and the files it reads first (eval candidates, the single file, or all)."""
    root = cfg.input / name
    train = SplitWriter(tmp / "train" / name, cfg.seq_len, dtype, cfg.train_seqs, cfg.compression)
    evaluation = None
    first = files
    if cfg.eval_seqs > 0:
        evaluation = SplitWriter(tmp / "eval" / name, cfg.seq_len, dtype, cfg.eval_seqs, cfg.compression)
        if len(files) > 1:
            # keyed without the compression suffix, so compressing the input does not change the split
            def key(path: Path) -> int:
                return _seeded_key(cfg.seed, name, _strip_compression(path.relative_to(root).as_posix()))

            first = sorted(files, key=key)[:-1]
    return _Domain(name, root, files, BadLineBudget(name, cfg.max_bad_lines), train, evaluation, first)


def _feed_files(
    domain: _Domain, files: list[Path], phase: Phase, pipeline: Pipeline, split: SplitWriter
) -> None:
    """Feed the batches of ``phase`` (whole ``files`` in order) to one split until it is full."""
    for index, encoded in pipeline.results(phase):
        domain.account(files[index], encoded)
        split.add(encoded.tokens, len(encoded.lengths), domain.rel(files[index]))
        if split.full:
            pipeline.cancel(phase)
            return


def _split_by_files(domain: _Domain, pipeline: Pipeline, progress: Callable[[int], None]) -> None:
    """Hold out whole files (seeded order, never all of them) for eval; the rest is train."""
    assert domain.eval is not None and domain.first_phase is not None
    candidates = domain.first_files
    held: set[Path] = set()
    for index, encoded in pipeline.results(domain.first_phase):
        path = candidates[index]
        held.add(path)
        domain.account(path, encoded)
        domain.eval.add(encoded.tokens, len(encoded.lengths), domain.rel(path))
        if domain.eval.full:
            pipeline.cancel(domain.first_phase)
            break
    if not domain.eval.full and len(held) == len(candidates):
        domain.notes.append(f"all files but one held out ({len(held)} of {len(domain.files)})")
    rest = [p for p in domain.files if p not in held]
    phase = pipeline.schedule(_file_batches(rest, progress), first=True)
    _feed_files(domain, rest, phase, pipeline, domain.train)


def _split_by_documents(domain: _Domain, seed: int, seq_len: int, pipeline: Pipeline) -> None:
    """Hold out documents of a single file (smallest seeded keys, at most half of them) for eval."""
    assert domain.eval is not None and domain.eval.packer.max_samples is not None
    assert domain.first_phase is not None
    path = domain.files[0]
    rel = domain.rel(path)
    lines = count_document_lines(path)
    cap = lines // 2
    target = domain.eval.packer.max_samples * seq_len
    selector = _EvalSelector(target, cap, lambda tokens: domain.train.add(tokens, 1, rel))
    for _, encoded in pipeline.results(domain.first_phase):
        domain.account(path, encoded)
        ends = np.cumsum(encoded.lengths).tolist()
        starts = [0, *ends[:-1]]
        for line, start, end in zip(encoded.line_numbers.tolist(), starts, ends, strict=True):
            selector.offer(_seeded_key(seed, domain.name, str(line)), line, encoded.tokens[start:end].copy())
    kept = selector.selected()
    if len(kept) == cap:
        domain.notes.append(f"at most half of the documents can be held out: {cap} of {lines}")
    for _, tokens in kept:
        domain.eval.add(tokens, 1, rel)


def _check_domain(domain: _Domain, cfg: PrepareConfig) -> None:
    """Fail on a domain without documents or samples; warn when eval is smaller than asked."""
    documents = domain.train.packer.documents + (domain.eval.packer.documents if domain.eval else 0)
    if documents == 0:
        raise ValueError(
            f"domain {domain.name!r} ({cfg.input / domain.name}) has no documents: no line holds a "
            f"JSON object with a string {cfg.text_field!r} field; add data or check --text-field"
        )
    if domain.eval is not None and domain.eval.packer.samples == 0:
        raise ValueError(
            f"domain {domain.name!r}: no eval sample: the {domain.eval.packer.documents} held-out documents "
            f"({documents} in all) give {domain.eval.packer.tokens} tokens, fewer than --seq-len "
            f"{cfg.seq_len}; add documents, lower --seq-len or pass --eval-seqs 0"
        )
    if domain.train.packer.samples == 0:
        raise ValueError(
            f"domain {domain.name!r}: the train split has {domain.train.packer.tokens} tokens, fewer than "
            f"--seq-len {cfg.seq_len}; add documents, lower --seq-len or lower --eval-seqs"
        )
    if domain.eval is not None and domain.eval.packer.samples < cfg.eval_seqs:
        why = f" ({'; '.join(domain.notes)})" if domain.notes else ""
        logger.warning(
            "domain %r: eval has %d samples, fewer than --eval-seqs %d%s",
            domain.name,
            domain.eval.packer.samples,
            cfg.eval_seqs,
            why,
        )


def _run_domain(
    domain: _Domain, cfg: PrepareConfig, pipeline: Pipeline, progress: Callable[[int], None]
) -> None:
    """Split, tokenise, pack and write one domain (its first phase is already scheduled)."""
    assert domain.first_phase is not None
    if domain.eval is None:
        _feed_files(domain, domain.first_files, domain.first_phase, pipeline, domain.train)
    elif len(domain.files) > 1:
        _split_by_files(domain, pipeline, progress)
    else:
        _split_by_documents(domain, cfg.seed, cfg.seq_len, pipeline)
    _check_domain(domain, cfg)
    for writer in domain.writers():
        writer.close()


def _empty_stats() -> dict[str, Any]:
    return {"files": 0, "paths": [], "documents": 0, "tokens": 0, "samples": 0}


def _prepare_domains(
    listing: dict[str, list[Path]], cfg: PrepareConfig, spec: TokenizerSpec, tmp: Path
) -> tuple[dict[str, dict[str, Any]], dict[str, int]]:
    """Every domain in turn, the next one's batches already in flight; per-split stats and bad lines."""
    from tqdm.auto import tqdm

    dtype = np.dtype(spec.dtype)
    domains = [_make_domain(name, files, cfg, dtype, tmp) for name, files in listing.items()]
    total = sum(p.stat().st_size for files in listing.values() for p in files)
    splits: dict[str, dict[str, Any]] = {split: {} for split in SPLITS}
    bad_lines: dict[str, int] = {}
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
                splits["train"][domain.name] = domain.train.stats()
                splits["eval"][domain.name] = domain.eval.stats() if domain.eval else _empty_stats()
                bad_lines[domain.name] = domain.budget.count
        bar.update(max(0, total - bar.n))
    except BaseException:
        for domain in domains:
            for writer in domain.writers():
                writer.abort()
        raise
    finally:
        bar.close()
    return splits, bad_lines


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


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def prepare(cfg: PrepareConfig) -> dict[str, Any]:
    """Run the whole preparation and return the manifest (also written to ``<output>/manifest.json``)."""
    cfg.validate()
    domains = discover_domains(cfg.input)
    output = _check_output(cfg)
    spec = load_tokenizer(cfg.tokenizer, cfg.text_field)
    with staged_dir(output, overwrite=True) as tmp:  # _check_output refused unwanted overwrites
        splits, bad_lines = _prepare_domains(domains, cfg, spec, tmp)
        manifest = {
            "format": MANIFEST_FORMAT,
            "version": MANIFEST_VERSION,
            "seq_len": cfg.seq_len,
            "tokenizer": cfg.tokenizer,
            "vocab_size": spec.vocab_size,
            "bos_token_id": spec.bos_token_id,
            "eos_token_id": spec.eos_token_id,
            "token_dtype": spec.dtype,
            "seed": cfg.seed,
            "text_field": cfg.text_field,
            "compression": cfg.compression,
            "domains": sorted(domains),
            "splits": splits,
            "bad_lines": bad_lines,
        }
        _write_json(tmp / MANIFEST_NAME, manifest)
    return manifest


def format_summary(manifest: dict[str, Any]) -> str:
    """A plain-text table of files, documents, tokens and samples per domain and split."""
    header = ("domain", "split", "files", "documents", "tokens", "samples", "bad lines")
    rows = []
    for name in manifest["domains"]:
        for split in SPLITS:
            s = manifest["splits"][split][name]
            bad = f"{manifest['bad_lines'][name]:,}" if split == "train" else ""
            rows.append(
                (
                    name,
                    split,
                    f"{s['files']}",
                    f"{s['documents']:,}",
                    f"{s['tokens']:,}",
                    f"{s['samples']:,}",
                    bad,
                )
            )
    totals = {
        split: sum(manifest["splits"][split][d]["samples"] for d in manifest["domains"]) for split in SPLITS
    }
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
        for r in [header, *rows]
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append(
        f"{len(manifest['domains'])} domains, seq_len {manifest['seq_len']}, "
        f"train {totals['train']:,} samples, eval {totals['eval']:,} samples"
    )
    return "\n".join(lines)
