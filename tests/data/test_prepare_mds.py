"""MDS preparation: packing, splits, determinism, compressed input and every bad-input case.

The corpus and the tokenizer are generated here: documents are words of a small vocabulary, each
starting with a unique id word (``d<file tag>_<n>``), tokenised by a word-level tokenizer, so
documents can be recognised in the packed token stream.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
import logging
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zstandard

from llmshearing.data.jsonl import BadLine, parse_document
from llmshearing.data.packing import Packer, token_dtype, wrap_documents
from llmshearing.data.prepare import PrepareConfig, format_summary, prepare
from llmshearing.data.tokenizer_pool import Pipeline, TokenizerPool, load_tokenizer

REPO = Path(__file__).resolve().parents[2]
SEQ_LEN = 16
WORDS = [f"w{i}" for i in range(40)]


# ----------------------------------------------------------------------------- fixtures and helpers


def make_docs(tag: str, count: int, seed: int) -> list[str]:
    rng = random.Random(f"{tag}-{seed}")
    return [" ".join([f"d{tag}_{n}", *rng.choices(WORDS, k=rng.randint(2, 24))]) for n in range(count)]


CORPUS = {
    # domain -> files -> documents; "solo" has a single file (document-level split)
    "alpha": {
        "a0.jsonl": make_docs("a0", 30, 1),
        "a1.jsonl": make_docs("a1", 25, 2),
        "a2.jsonl": make_docs("a2", 20, 3),
    },
    "beta": {"b0.jsonl": make_docs("b0", 40, 4), "sub/b1.jsonl": make_docs("b1", 35, 5)},
    "solo": {"s0.jsonl": make_docs("s0", 60, 6)},
}


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A word-level PreTrainedTokenizerFast over the generated vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = [doc for files in CORPUS.values() for docs in files.values() for doc in docs]
    core = Tokenizer(models.WordLevel(unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=["<unk>", "<s>", "</s>"]))
    out = tmp_path_factory.mktemp("tokenizer")
    PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    ).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def hf_tokenizer(tokenizer_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


def write_jsonl(path: Path, lines: list[str | bytes], suffix: str = "") -> Path:
    """Write raw lines (str are encoded as UTF-8) to ``path`` + ``suffix`` (``.gz`` or ``.zst``)."""
    data = b"".join((line.encode() if isinstance(line, str) else line) + b"\n" for line in lines)
    path = path.with_name(path.name + suffix)
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".gz":
        data = gzip.compress(data, mtime=0)
    elif suffix == ".zst":  # two frames, split mid-line, as concatenated .zst files are
        half = len(data) // 2
        data = zstandard.ZstdCompressor().compress(data[:half]) + zstandard.ZstdCompressor().compress(
            data[half:]
        )
    path.write_bytes(data)
    return path


def records(docs: list[str]) -> list[str]:
    return [json.dumps({"text": doc, "meta": {"n": i}}) for i, doc in enumerate(docs)]


def write_corpus(root: Path, corpus: dict[str, dict[str, list[str]]] = CORPUS, suffix: str = "") -> Path:
    for domain, files in corpus.items():
        for name, docs in files.items():
            write_jsonl(root / domain / name, records(docs), suffix)
    return root


def run(root: Path, out: Path, tokenizer_dir: Path, **options) -> dict:
    options.setdefault("seq_len", SEQ_LEN)
    options.setdefault("eval_seqs", 3)
    options.setdefault("progress", False)
    return prepare(PrepareConfig(input=root, output=out, tokenizer=str(tokenizer_dir), **options))


def read_split(path: Path) -> np.ndarray:
    """All samples of one MDS directory, in order, read with streaming's StreamingDataset."""
    from streaming import StreamingDataset
    from streaming.base.util import clean_stale_shared_memory

    clean_stale_shared_memory()
    dataset = StreamingDataset(local=str(path), shuffle=False, batch_size=1)
    try:
        samples = [np.array(dataset[i]["tokens"]) for i in range(len(dataset))]
    finally:
        del dataset
        clean_stale_shared_memory()
    return np.stack(samples)


def wrapped(tokenizer, docs: list[str]) -> list[list[int]]:
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    return [[bos, *tokenizer(doc, add_special_tokens=False)["input_ids"], eos] for doc in docs]


def split_documents(stream: np.ndarray, tokenizer) -> list[list[int]]:
    """Cut a packed token stream at BOS tokens (the first piece may be a document's tail)."""
    pieces: list[list[int]] = []
    for token in stream.tolist():
        if token == tokenizer.bos_token_id or not pieces:
            pieces.append([])
        pieces[-1].append(token)
    return pieces


def packed_ids(samples: np.ndarray, tokenizer, docs: list[str]) -> list[str]:
    """Id words of the documents packed in ``samples``, in order; each is checked to be packed whole
    (the last may be cut where the split ends)."""
    by_id = {doc.split()[0]: tokens for doc, tokens in zip(docs, wrapped(tokenizer, docs), strict=True)}
    pieces = split_documents(samples.reshape(-1), tokenizer)
    if len(pieces[-1]) < 2:  # the stream ends right after a BOS
        pieces.pop()
    ids = []
    for i, piece in enumerate(pieces):
        doc_id = tokenizer.convert_ids_to_tokens(piece[1])
        full = by_id[doc_id]
        assert piece == (full if i < len(pieces) - 1 else full[: len(piece)]), f"{doc_id} is not packed whole"
        ids.append(doc_id)
    assert len(ids) == len(set(ids)), "a document repeats"
    return ids


def tree_digest(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def assert_nothing_left(out: Path) -> None:
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}.*")), "a temporary directory was left behind"


# ----------------------------------------------------------------------------- units


def test_wrap_and_pack_exact() -> None:
    flat, lengths = wrap_documents([[5, 6, 7], [], [8]], bos=1, eos=2, dtype=np.dtype(np.uint16))
    assert flat.tolist() == [1, 5, 6, 7, 2, 1, 2, 1, 8, 2]
    assert lengths.tolist() == [5, 2, 3]
    only_eos, _ = wrap_documents([[5], [6]], bos=None, eos=2, dtype=np.dtype(np.uint32))
    assert only_eos.tolist() == [5, 2, 6, 2] and only_eos.dtype == np.uint32

    samples: list[list[int]] = []
    packer = Packer(4, np.dtype(np.uint16), lambda s: samples.append(s.tolist()))
    stream = np.arange(1, 12, dtype=np.uint16)
    packer.add(stream[:3])
    packer.add(stream[3:10], documents=2)
    packer.add(stream[10:])
    assert samples == [[1, 2, 3, 4], [5, 6, 7, 8]]
    assert (packer.samples, packer.documents, packer.tokens, packer.leftover) == (2, 4, 11, 3)

    capped: list[list[int]] = []
    packer = Packer(3, np.dtype(np.uint16), lambda s: capped.append(s.tolist()), max_samples=2)
    packer.add(np.arange(10, dtype=np.uint16))
    packer.add(np.arange(5, dtype=np.uint16))
    assert capped == [[0, 1, 2], [3, 4, 5]] and packer.full and packer.tokens == 6 and packer.documents == 1


def test_token_dtype_bounds() -> None:
    assert token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32
    with pytest.raises(ValueError, match="vocab_size"):
        token_dtype(0)


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b'{"text": "ok"', "malformed JSON"),
        (b'["text"]', "expected a JSON object, got list"),
        (b'{"body": "x"}', "no 'text' field"),
        (b'{"text": 3}', "is int, not a string"),
        (b'{"text": "caf\xe9"}', "invalid UTF-8 at byte 13"),
        (b'{"text": "a \\ud800 b"}', "unpaired UTF-16 surrogate"),
    ],
)
def test_parse_document_reasons(raw: bytes, reason: str) -> None:
    with pytest.raises(BadLine, match=reason):
        parse_document(raw)
    assert parse_document(b'{"text": "pair \\ud83d\\ude00"}') == "pair \U0001f600"


@pytest.mark.parametrize("workers", [1, 2])
def test_pipeline_orders_phases_and_prefetches(tokenizer_dir: Path, workers: int) -> None:
    spec = load_tokenizer(str(tokenizer_dir))
    docs = make_docs("p", 40, 7)

    def batches(tag: str, count: int):
        for i in range(count):
            yield (tag, i), ([i + 1], [json.dumps({"text": docs[i]}).encode()])

    def first_token(encoded) -> int:
        return int(encoded.tokens[1])  # the document's id word, after BOS

    ids = [spec.tokenizer.encode(doc, add_special_tokens=False).ids[0] for doc in docs]
    with TokenizerPool(spec, workers) as pool:
        pipeline = Pipeline(pool)
        limit = 2 * workers + 2
        a = pipeline.schedule(batches("a", 3))
        b = pipeline.schedule(batches("b", 20))
        assert [(tag, first_token(e)) for tag, e in pipeline.results(a)] == [
            (("a", i), ids[i]) for i in range(3)
        ]
        assert len(b.pending) == limit, "b's items are submitted while a is consumed"
        # a phase scheduled first while b holds the whole budget still runs, before b
        c = pipeline.schedule(batches("c", 12), first=True)
        assert [(tag, first_token(e)) for tag, e in pipeline.results(c)] == [
            (("c", i), ids[i]) for i in range(12)
        ]
        assert [(tag, first_token(e)) for tag, e in pipeline.results(b)] == [
            (("b", i), ids[i]) for i in range(20)
        ]
        d = pipeline.schedule(batches("d", 30))
        got = []
        for tag, encoded in pipeline.results(d):
            got.append((tag, first_token(encoded)))
            if len(got) == 5:
                pipeline.cancel(d)
                break
        assert got == [(("d", i), ids[i]) for i in range(5)]
        assert next(d.items, None) is None, "a cancelled phase reads nothing more"
        assert pipeline._in_flight == 0


def test_dead_worker_is_an_error_not_a_hang(tokenizer_dir: Path) -> None:
    spec = load_tokenizer(str(tokenizer_dir))
    raw = [json.dumps({"text": "w1 w2"}).encode()]
    with pytest.raises(RuntimeError, match="a tokenizer worker process died"):
        with TokenizerPool(spec, 2) as pool:
            pipeline = Pipeline(pool)
            phase = pipeline.schedule((i, ([1], raw)) for i in range(1000))
            for i, _ in pipeline.results(phase):
                if i == 0:
                    os.kill(next(iter(pool._executor._processes)), signal.SIGKILL)


# ----------------------------------------------------------------------------- round trip and splits


def test_round_trip_file_level_split(tmp_path: Path, tokenizer_dir: Path, hf_tokenizer) -> None:
    root = write_corpus(tmp_path / "raw")
    out = tmp_path / "mds"
    manifest = run(root, out, tokenizer_dir, eval_seqs=3)

    assert manifest == json.loads((out / "manifest.json").read_text())
    assert manifest["format"] == "llmshearing-mds" and manifest["version"] == 1
    assert manifest["domains"] == ["alpha", "beta", "solo"]
    assert manifest["token_dtype"] == "uint16" and manifest["seq_len"] == SEQ_LEN
    assert manifest["bos_token_id"] == hf_tokenizer.bos_token_id
    assert manifest["eos_token_id"] == hf_tokenizer.eos_token_id
    assert manifest["bad_lines"] == {"alpha": 0, "beta": 0, "solo": 0}
    index = json.loads((out / "train" / "alpha" / "index.json").read_text())
    assert index["shards"][0]["column_encodings"] == ["ndarray:uint16"]
    assert index["shards"][0]["column_names"] == ["tokens"]

    for domain in ("alpha", "beta"):
        files = CORPUS[domain]
        stats = {split: manifest["splits"][split][domain] for split in ("train", "eval", "test")}
        assert stats["eval"]["samples"] == stats["test"]["samples"] == 3  # test defaults to --eval-seqs
        # held-out files are read in seeded order; their documents fill eval and test, then train
        held = list(dict.fromkeys([*stats["eval"]["paths"], *stats["test"]["paths"]]))
        assert 0 < len(held) < len(files)
        held_docs = [doc for name in held for doc in files[name]]
        all_docs = [doc for docs in files.values() for doc in docs]
        ids = {split: packed_ids(read_split(out / split / domain), hf_tokenizer, all_docs) for split in stats}
        n_held = stats["eval"]["documents"] + stats["test"]["documents"]
        assert [len(ids["eval"]), len(ids["test"])] == [
            stats["eval"]["documents"],
            stats["test"]["documents"],
        ]
        assert sorted(ids["eval"] + ids["test"]) == sorted(d.split()[0] for d in held_docs[:n_held])
        tail = held_docs[n_held:]
        rest = [name for name in sorted(files) if name not in held]
        assert stats["train"]["paths"] == ([held[-1]] if tail else []) + rest
        assert len(tail) < len(files[held[-1]]), "only the file that filled test passes its rest to train"
        train_docs = tail + [doc for name in rest for doc in files[name]]
        assert n_held + len(train_docs) == len(all_docs) == manifest["documents_read"][domain]
        assert manifest["unused_documents"][domain] == 0
        by_id = {doc.split()[0]: doc for doc in all_docs}
        for split in stats:
            docs = train_docs if split == "train" else [by_id[i] for i in ids[split]]
            samples = read_split(out / split / domain)
            assert samples.dtype == np.uint16 and samples.shape == (stats[split]["samples"], SEQ_LEN)
            wrapped_docs = wrapped(hf_tokenizer, docs)
            expected = [t for tokens in wrapped_docs for t in tokens]
            assert samples.reshape(-1).tolist() == expected[: samples.size]
            assert stats[split]["documents"] == len(docs)
            if split == "train":  # every train document is packed; only the tail is dropped
                assert stats[split]["tokens"] == len(expected)
                assert stats[split]["samples"] == len(expected) // SEQ_LEN
            else:  # the document that fills the last sample is cut there
                assert stats[split]["tokens"] == 3 * SEQ_LEN < len(expected)
                assert len(expected) - len(wrapped_docs[-1]) < 3 * SEQ_LEN, "a document not needed"
    assert manifest["max_token_id"] == max(
        int(read_split(out / split / d).max()) for split in ("train", "eval", "test") for d in CORPUS
    )


def test_document_level_split_is_disjoint(tmp_path: Path, tokenizer_dir: Path, hf_tokenizer) -> None:
    root = write_corpus(tmp_path / "raw", {"solo": CORPUS["solo"]})
    out = tmp_path / "mds"
    manifest = run(root, out, tokenizer_dir, eval_seqs=4)
    docs = CORPUS["solo"]["s0.jsonl"]
    seen: dict[str, list[str]] = {}
    for split in ("eval", "test", "train"):
        samples = read_split(out / split / "solo")
        assert samples.shape == (manifest["splits"][split]["solo"]["samples"], SEQ_LEN)
        seen[split] = packed_ids(samples, hf_tokenizer, docs)
    for a, b in (("eval", "train"), ("test", "train"), ("eval", "test")):
        assert not set(seen[a]) & set(seen[b]), f"{a} and {b} share a document"
    stats = {split: manifest["splits"][split]["solo"] for split in ("train", "eval", "test")}
    for split in ("eval", "test"):
        positions = [int(i.split("_")[1]) for i in seen[split]]
        assert positions == sorted(positions), f"{split} documents are written in file order"
        assert stats[split]["samples"] == 4 and stats[split]["documents"] == len(seen[split])
    assert stats["eval"]["documents"] + stats["test"]["documents"] <= len(docs) // 2
    assert sum(s["documents"] for s in stats.values()) == manifest["documents_read"]["solo"] == len(docs)


def test_deterministic_across_workers_and_reruns(tmp_path: Path, tokenizer_dir: Path) -> None:
    root = write_corpus(tmp_path / "raw")
    digests = []
    for name, workers in (("w1", 1), ("w2", 2), ("w1-again", 1)):
        run(root, tmp_path / name, tokenizer_dir, workers=workers, eval_seqs=2)
        digests.append(tree_digest(tmp_path / name))
    assert digests[0] == digests[1] == digests[2]
    assert any(path.endswith(".mds") for path in digests[0])

    selections = set()
    for seed in range(4):
        manifest = run(root, tmp_path / f"seed{seed}", tokenizer_dir, seed=seed, eval_seqs=2)
        splits = manifest["splits"]["eval"]
        selections.add(
            (tuple(splits["alpha"]["paths"]), splits["solo"]["documents"], splits["solo"]["tokens"])
        )
        assert manifest["seed"] == seed
    assert len(selections) > 1, "the seed does not change the split"


@pytest.mark.parametrize("suffix", [".gz", ".zst"])
def test_compressed_input_matches_plain(tmp_path: Path, tokenizer_dir: Path, suffix: str) -> None:
    plain = run(write_corpus(tmp_path / "plain"), tmp_path / "out-plain", tokenizer_dir)
    packed = run(write_corpus(tmp_path / "packed", suffix=suffix), tmp_path / "out-packed", tokenizer_dir)
    plain_files, packed_files = tree_digest(tmp_path / "out-plain"), tree_digest(tmp_path / "out-packed")
    assert plain_files.keys() == packed_files.keys()
    for name, digest in plain_files.items():
        if name.endswith((".mds", "index.json")):
            assert packed_files[name] == digest, name
    for split in ("train", "eval"):
        for domain in CORPUS:
            stats = packed["splits"][split][domain]
            assert [f + suffix for f in plain["splits"][split][domain]["paths"]] == stats["paths"]
            assert {k: v for k, v in stats.items() if k != "paths"} == {
                k: v for k, v in plain["splits"][split][domain].items() if k != "paths"
            }


def test_zstd_output_and_caps(tmp_path: Path, tokenizer_dir: Path) -> None:
    root = write_corpus(tmp_path / "raw")
    plain = run(root, tmp_path / "plain", tokenizer_dir)
    manifest = run(root, tmp_path / "zstd", tokenizer_dir, compression="zstd")
    assert manifest["compression"] == "zstd"
    assert list((tmp_path / "zstd" / "train" / "beta").glob("*.mds.zstd"))
    np.testing.assert_array_equal(
        read_split(tmp_path / "zstd" / "train" / "beta"), read_split(tmp_path / "plain" / "train" / "beta")
    )
    assert plain["splits"] == manifest["splits"]

    capped = run(root, tmp_path / "capped", tokenizer_dir, train_seqs=5, eval_seqs=0)
    for domain in CORPUS:
        assert capped["splits"]["train"][domain]["samples"] == 5
        assert capped["splits"]["eval"][domain] == {
            "files": 0,
            "paths": [],
            "documents": 0,
            "tokens": 0,
            "samples": 0,
        }
        assert len(read_split(tmp_path / "capped" / "train" / domain)) == 5
    assert not (tmp_path / "capped" / "eval").exists()


def test_eval_capped_by_held_out_data_warns(tmp_path: Path, tokenizer_dir: Path, caplog) -> None:
    root = write_corpus(tmp_path / "raw")
    with caplog.at_level(logging.WARNING, logger="llmshearing.data.prepare"):
        manifest = run(root, tmp_path / "mds", tokenizer_dir, eval_seqs=1000)
    for domain in CORPUS:
        assert 0 < manifest["splits"]["eval"][domain]["samples"] < 1000
        assert manifest["splits"]["train"][domain]["samples"] > 0
    assert manifest["splits"]["eval"]["alpha"]["files"] == 2  # never all three files
    assert "domain 'alpha': eval has" in caplog.text and "fewer than --eval-seqs 1000" in caplog.text
    assert "at most half of the documents can be held out: 30 of 60" in caplog.text


def test_script_prints_summary(tmp_path: Path, tokenizer_dir: Path, capsys, monkeypatch) -> None:
    spec = importlib.util.spec_from_file_location("prepare_mds", REPO / "data_prep" / "prepare_mds.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    monkeypatch.setattr(logging.getLogger(), "handlers", list(logging.getLogger().handlers))
    root = write_corpus(tmp_path / "raw")
    out = tmp_path / "mds"
    argv = ["--input", str(root), "--output", str(out), "--tokenizer", str(tokenizer_dir)]
    argv += [
        "--seq-len",
        str(SEQ_LEN),
        "--eval-seqs",
        "2",
        "--test-seqs",
        "1",
        "--workers",
        "1",
        "--no-progress",
    ]
    assert script.main(argv) == 0
    stdout = capsys.readouterr().out
    manifest = json.loads((out / "manifest.json").read_text())
    assert {d: s["samples"] for d, s in manifest["splits"]["test"].items()} == dict.fromkeys(CORPUS, 1)
    assert stdout.strip().splitlines()[:-1] == format_summary(manifest).splitlines()
    assert "3 domains, seq_len 16, train " in stdout and "eval 6 samples, test 3 samples" in stdout
    assert f"{sum(len(d) for f in CORPUS.values() for d in f.values())} documents read: train " in stdout
    assert f"wrote {out}" in stdout
    alpha = manifest["splits"]["train"]["alpha"]
    row = ["alpha", "train", str(alpha["files"]), str(alpha["documents"]), f"{alpha['tokens']:,}"]
    assert [line.split()[:5] for line in stdout.splitlines() if line.startswith("alpha ")][0] == row


# ----------------------------------------------------------------------------- bad input


def test_malformed_lines_are_counted_and_skipped(tmp_path: Path, tokenizer_dir: Path, caplog) -> None:
    root = write_corpus(tmp_path / "raw", {"beta": CORPUS["beta"]})
    docs = make_docs("x", 30, 9)
    bad = [b'{"text": "cut', b"[1, 2]", b'{"body": "x"}', b'{"text": null}', b'{"text": "\xff\xfe"}', b""]
    lines = [*records(docs[:10]), *bad, *records(docs[10:])]
    write_jsonl(root / "gamma" / "only.jsonl", lines)
    with caplog.at_level(logging.WARNING, logger="llmshearing.data.jsonl"):
        manifest = run(root, tmp_path / "mds", tokenizer_dir, eval_seqs=1, max_bad_lines=5)
    assert manifest["bad_lines"] == {"beta": 0, "gamma": 5}
    total = sum(manifest["splits"][split]["gamma"]["documents"] for split in ("train", "eval", "test"))
    assert total == manifest["documents_read"]["gamma"] == len(docs)
    assert f"{root / 'gamma' / 'only.jsonl'}:11: malformed JSON" in caplog.text
    assert "only.jsonl:15: invalid UTF-8" in caplog.text


def two_file_domain(root: Path) -> Path:
    """A domain of 150 documents in two files of 75."""
    for i in range(2):
        write_jsonl(root / "duo" / f"part{i}.jsonl", records(make_docs(f"a{i}", 75, 20 + i)))
    return root


def test_every_document_of_a_multi_file_domain_is_in_one_split(tmp_path: Path, tokenizer_dir: Path) -> None:
    root = two_file_domain(tmp_path / "raw")
    manifest = run(root, tmp_path / "mds", tokenizer_dir, eval_seqs=3, test_seqs=2)
    splits = {split: manifest["splits"][split]["duo"] for split in ("train", "eval", "test")}
    assert (splits["eval"]["samples"], splits["test"]["samples"]) == (3, 2)
    assert sum(s["documents"] for s in splits.values()) == manifest["documents_read"]["duo"] == 150
    held = splits["eval"]["paths"]
    assert held == splits["test"]["paths"] and len(held) == 1, "eval and test share the held-out file"
    assert splits["train"]["paths"] == [held[0], *(p for p in ("part0.jsonl", "part1.jsonl") if p != held[0])]
    summary = format_summary(manifest)
    assert "150 documents read: train 1" in summary and "eval 3 samples, test 2 samples" in summary

    # a malformed line at the end of the held-out file is read and counted like any other
    held_file = root / "duo" / held[0]
    held_file.write_bytes(held_file.read_bytes() + b'{"text": 7}\n')
    with pytest.raises(ValueError, match=rf"{held[0]}:76: field 'text' is int.*--max-bad-lines 0"):
        run(root, tmp_path / "strict", tokenizer_dir, eval_seqs=3, test_seqs=2, max_bad_lines=0)
    assert_nothing_left(tmp_path / "strict")


def test_documents_over_the_train_cap_are_counted_as_unused(tmp_path: Path, tokenizer_dir: Path) -> None:
    root = two_file_domain(tmp_path / "raw")
    (root / "duo" / "part1.jsonl").write_bytes((root / "duo" / "part1.jsonl").read_bytes() + b"[1]\n")
    with pytest.raises(ValueError, match=r"part1\.jsonl:76: expected a JSON object"):
        run(root, tmp_path / "strict", tokenizer_dir, train_seqs=2, eval_seqs=0, max_bad_lines=0)
    manifest = run(root, tmp_path / "mds", tokenizer_dir, train_seqs=2, eval_seqs=0, max_bad_lines=1)
    train = manifest["splits"]["train"]["duo"]
    assert train["samples"] == 2 and train["paths"] == ["part0.jsonl"]
    unused = manifest["unused_documents"]["duo"]
    assert unused > 75 and train["documents"] + unused == manifest["documents_read"]["duo"] == 150
    assert f", {unused} in no split (train full at its --train-seqs cap); 1 malformed lines skipped" in (
        format_summary(manifest)
    )


@pytest.mark.parametrize("case", ["wrong text field", "binary file", "bad lines fill whole batches"])
def test_single_file_domain_with_unparsed_batches(tmp_path: Path, tokenizer_dir: Path, case: str) -> None:
    path = tmp_path / "raw" / "solo" / "only.jsonl"
    docs = make_docs("s0", 200, 6)
    if case == "wrong text field":
        write_jsonl(path, [json.dumps({"body": doc}) for doc in docs[:40]])
        message = r"domain 'solo' .* has no documents.*first bad line: .*only\.jsonl:1: no 'text' field \(keys: body\)"
    elif case == "binary file":
        path.parent.mkdir(parents=True)
        path.write_bytes(bytes(random.Random(0).randrange(256) for _ in range(4000)))
        message = r"has no documents.*first bad line: .*only\.jsonl:1: invalid UTF-8"
    else:  # 1,100 bad lines (whole batches of them) before 200 good ones
        write_jsonl(path, [*["{broken"] * 1100, *records(docs)])
        manifest = run(tmp_path / "raw", tmp_path / "mds", tokenizer_dir, max_bad_lines=2000)
        assert manifest["bad_lines"] == {"solo": 1100} and manifest["documents_read"] == {"solo": 200}
        assert (
            sum(manifest["splits"][split]["solo"]["documents"] for split in ("train", "eval", "test")) == 200
        )
        return
    with pytest.raises(ValueError, match=message):
        run(tmp_path / "raw", tmp_path / "mds", tokenizer_dir, max_bad_lines=2000)
    assert_nothing_left(tmp_path / "mds")


def test_a_second_run_into_the_same_output_fails_and_keeps_the_first(
    tmp_path: Path, tokenizer_dir: Path, monkeypatch
) -> None:
    import llmshearing.data.prepare as prepare_module

    root = write_corpus(tmp_path / "raw", {"beta": CORPUS["beta"]})
    out = tmp_path / "mds"
    inner_runs: list[dict] = []
    prepare_domains = prepare_module._prepare_domains

    def with_a_concurrent_run(*args, **kwargs):
        if not inner_runs:  # another run into the same output starts and finishes meanwhile
            inner_runs.append({})
            inner_runs[0] = run(root, out, tokenizer_dir, eval_seqs=2)
        return prepare_domains(*args, **kwargs)

    monkeypatch.setattr(prepare_module, "_prepare_domains", with_a_concurrent_run)
    with pytest.raises(ValueError, match="was written by another process while this one ran"):
        run(root, out, tokenizer_dir, eval_seqs=1)
    assert json.loads((out / "manifest.json").read_text()) == inner_runs[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mds", "raw"], "the losing run left its staging"


def test_test_split_options(tmp_path: Path, tokenizer_dir: Path) -> None:
    root = write_corpus(tmp_path / "raw", {"solo": CORPUS["solo"]})
    manifest = run(root, tmp_path / "no-test", tokenizer_dir, eval_seqs=2, test_seqs=0)
    assert manifest["splits"]["test"]["solo"]["samples"] == 0 and not (tmp_path / "no-test" / "test").exists()
    assert manifest["splits"]["eval"]["solo"]["samples"] == 2
    manifest = run(root, tmp_path / "only-test", tokenizer_dir, eval_seqs=0, test_seqs=2)
    assert (
        manifest["splits"]["test"]["solo"]["samples"] == 2 and not (tmp_path / "only-test" / "eval").exists()
    )
    with pytest.raises(ValueError, match="--test-seqs must be 0 or more, got -1"):
        run(root, tmp_path / "bad", tokenizer_dir, test_seqs=-1)


def test_too_many_bad_lines_fail_and_leave_nothing(tmp_path: Path, tokenizer_dir: Path) -> None:
    root = write_corpus(tmp_path / "raw", {"beta": CORPUS["beta"]})
    write_jsonl(root / "gamma" / "g.jsonl", [*records(make_docs("g", 5, 1)), "{oops", '{"text": 1}'])
    out = tmp_path / "mds"
    with pytest.raises(ValueError, match=r"g\.jsonl:7: field 'text' is int.*more than --max-bad-lines 1"):
        run(root, out, tokenizer_dir, max_bad_lines=1)
    assert_nothing_left(out)


@pytest.mark.parametrize(
    ("case", "error", "message"),
    [
        ("missing input", FileNotFoundError, "input directory .*raw-missing does not exist"),
        ("no domains", ValueError, "has no domain sub-directories"),
        (
            "domain without files",
            ValueError,
            r"domain 'empty' .* has no \.jsonl, \.jsonl\.gz or \.jsonl\.zst files",
        ),
        ("domain without documents", ValueError, r"domain 'blank' .* has no documents.*--text-field"),
        (
            "wrong text field",
            ValueError,
            r"no documents: no line holds a JSON object with a string 'body' field",
        ),
        (
            "single document",
            ValueError,
            r"domain 'one': no eval sample: the 0 held-out documents \(1 in all\) give 0 tokens.*--eval-seqs 0",
        ),
        (
            "too little text",
            ValueError,
            r"domain 'tiny': the train split has \d+ tokens, fewer than --seq-len 16",
        ),
        ("corrupt gzip", ValueError, r"bad\.jsonl\.gz: unreadable at line 1: Not a gzipped file"),
        (
            "truncated zstd",
            ValueError,
            r"cut\.jsonl\.zst: unreadable at line \d+: the zstd data ends inside a frame; the file is truncated",
        ),
        ("unloadable tokenizer", ValueError, "cannot load tokenizer .*broken-tok"),
        ("missing tokenizer", FileNotFoundError, "tokenizer directory .*no-such-tok does not exist"),
        ("bad seq_len", ValueError, "--seq-len must be at least 1"),
    ],
)
def test_bad_input_errors(tmp_path: Path, tokenizer_dir: Path, case: str, error: type, message: str) -> None:
    root = tmp_path / "raw"
    options: dict = {}
    tokenizer = tokenizer_dir
    if case == "missing input":
        root = tmp_path / "raw-missing"
    elif case == "no domains":
        write_jsonl(root / "loose.jsonl", records(["w1 w2"]))
    elif case == "domain without files":
        write_corpus(root, {"alpha": CORPUS["alpha"]})
        (root / "empty").mkdir()
        (root / "empty" / "notes.txt").write_text("not data")
    elif case == "domain without documents":
        write_jsonl(root / "blank" / "b.jsonl", ["", "   "])
    elif case == "wrong text field":
        write_corpus(root, {"alpha": CORPUS["alpha"]})
        options["text_field"] = "body"
    elif case == "single document":
        write_jsonl(root / "one" / "o.jsonl", records(make_docs("o", 1, 1)))
    elif case == "too little text":
        write_jsonl(root / "tiny" / "t.jsonl", records(["w1 w2", "w3"]))
        options["eval_seqs"] = 0
    elif case == "corrupt gzip":
        (root / "z").mkdir(parents=True)
        (root / "z" / "bad.jsonl.gz").write_bytes(b"this is not gzip")
    elif case == "truncated zstd":
        path = write_jsonl(root / "z" / "cut.jsonl", records(make_docs("z", 200, 1)), ".zst")
        path.write_bytes(path.read_bytes()[:-40])
    elif case == "unloadable tokenizer":
        write_corpus(root, {"alpha": CORPUS["alpha"]})
        tokenizer = tmp_path / "broken-tok"
        tokenizer.mkdir()
        (tokenizer / "tokenizer.json").write_text("{not json")
        (tokenizer / "tokenizer_config.json").write_text("{}")
    elif case == "missing tokenizer":
        write_corpus(root, {"alpha": CORPUS["alpha"]})
        tokenizer = tmp_path / "no-such-tok"
    elif case == "bad seq_len":
        write_corpus(root, {"alpha": CORPUS["alpha"]})
        options["seq_len"] = 0
    out = tmp_path / "mds"
    with pytest.raises(error, match=message):
        run(root, out, tokenizer, **options)
    assert_nothing_left(out)


def test_output_with_data_is_refused_unless_overwrite(tmp_path: Path, tokenizer_dir: Path) -> None:
    root = write_corpus(tmp_path / "raw", {"beta": CORPUS["beta"]})
    out = tmp_path / "mds"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(ValueError, match="already holds data; pass --overwrite"):
        run(root, out, tokenizer_dir)
    assert (out / "precious.txt").read_text() == "keep me"

    manifest = run(root, out, tokenizer_dir, overwrite=True)
    assert not (out / "precious.txt").exists() and (out / "manifest.json").is_file()
    assert manifest["splits"]["train"]["beta"]["samples"] > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mds", "raw"]

    with pytest.raises(FileNotFoundError, match="no-such-tok does not exist"):
        run(root, out, tmp_path / "no-such-tok", overwrite=True)
    assert json.loads((out / "manifest.json").read_text()) == manifest, "a failed run touched the old output"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mds", "raw"]

    with pytest.raises(ValueError, match="must not be inside --input"):
        run(root, root / "beta" / "mds", tokenizer_dir, overwrite=True)
    with pytest.raises(ValueError, match="contains --input"):
        run(root, tmp_path, tokenizer_dir, overwrite=True)


def test_staging_left_by_a_killed_run_is_removed(tmp_path: Path, tokenizer_dir: Path) -> None:
    from llmshearing.io.staging import staging_path

    root = write_corpus(tmp_path / "raw", {"beta": CORPUS["beta"]})
    out = tmp_path / "mds"
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()  # its pid now names a process that no longer runs, like a killed prepare_mds
    own = staging_path(out)
    prefix, host, _, token = own.name.rsplit("-", 3)
    stale = own.with_name(f"{prefix}-{host}-{child.pid}-{token}")
    (stale / "train" / "beta").mkdir(parents=True)
    (stale / "train" / "beta" / "shard.00000.mds").write_bytes(b"half-written")
    run(root, out, tokenizer_dir)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mds", "raw"]
    assert (out / "manifest.json").is_file()


def test_script_reports_user_errors_in_one_line(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(REPO / "data_prep" / "prepare_mds.py"), "--input", str(tmp_path / "nowhere"),
         "--output", str(tmp_path / "out"), "--tokenizer", "unused", "--seq-len", "8"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: input directory {tmp_path / 'nowhere'} does not exist; expected {tmp_path / 'nowhere'}/<domain>/*.jsonl"
    ]
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- llmshearing prepare-data


def test_prepare_data_subcommand_writes_what_the_library_writes(
    tmp_path: Path, tokenizer_dir: Path, capsys, monkeypatch
) -> None:
    from llmshearing.cli import main as cli_main

    monkeypatch.setattr(logging.getLogger(), "handlers", list(logging.getLogger().handlers))
    root = write_corpus(tmp_path / "raw")
    out, library = tmp_path / "mds", tmp_path / "library"
    argv = ["prepare-data", "--input", str(root), "--output", str(out), "--tokenizer", str(tokenizer_dir)]
    argv += ["--seq-len", str(SEQ_LEN), "--eval-seqs", "2", "--workers", "1", "--no-progress"]
    assert cli_main(argv) == 0
    stdout = capsys.readouterr().out
    manifest = run(root, library, tokenizer_dir, eval_seqs=2, workers=1)
    assert tree_digest(out) == tree_digest(library)
    assert stdout.strip().splitlines() == [*format_summary(manifest).splitlines(), f"wrote {out}"]


def test_prepare_data_subcommand_reports_bad_input_in_one_line(tmp_path: Path, capsys) -> None:
    from llmshearing.cli import main as cli_main

    missing, out = tmp_path / "nowhere", tmp_path / "out"
    argv = ["prepare-data", "--input", str(missing), "--output", str(out), "--tokenizer", "unused"]
    assert cli_main([*argv, "--seq-len", "8"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"llmshearing prepare-data: error: input directory {missing} does not exist; "
        f"expected {missing}/<domain>/*.jsonl"
    ]
    assert cli_main([*argv, "--seq-len", "0"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "llmshearing prepare-data: error: --seq-len must be at least 1, got 0"
    ]
    assert not out.exists()


def test_prepare_data_parser_imports_no_heavy_module() -> None:
    code = (
        "import argparse, sys\n"
        "from llmshearing.data.commands import add_commands\n"
        "add_commands(argparse.ArgumentParser().add_subparsers())\n"
        "print(sorted(m for m in ('torch', 'composer', 'streaming', 'transformers') if m in sys.modules))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=REPO
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
