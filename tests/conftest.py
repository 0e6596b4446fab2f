"""Shared fixtures: a tiny random source checkpoint and a tiny two-domain MDS root, built once per session.

The tests mirror the package's folders (``tests/pruning/`` tests ``llmshearing/pruning/``; ``tests/bench/`` the
benchmarks, ``tests/entry_points/`` the package root's modules, ``tests/layout/`` the package's layout). A test
takes the shared helpers with ``from conftest import ...`` and another test module's helpers by that module's name
(``from test_harness import ...``): every test folder is on ``sys.path``, so test file names are unique.
"""

from __future__ import annotations

import os

# torch.compile's tests compile in this process: inductor's pool of compile workers can keep the test process
# from exiting once the suite is done (its shutdown waits on a worker that is itself waiting)
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from composer.core import Callback

from llmshearing.data.layout import write_token_root

TESTS = Path(__file__).resolve().parent
for _folder in sorted(TESTS.iterdir()):
    if _folder.is_dir() and any(_folder.glob("test_*.py")) and str(_folder) not in sys.path:
        sys.path.append(str(_folder))

TINY_MODEL = dict(
    vocab_size=97,
    d_model=32,
    n_layers=3,
    n_heads=4,
    n_kv_heads=2,
    head_dim=8,
    intermediate_size=48,
    max_seq_len=64,
    tie_word_embeddings=True,
)
# The pruning tests' source: 8 query heads over 4 KV groups, tied embeddings, and its target shape.
PRUNABLE_MODEL = dict(
    vocab_size=64,
    d_model=32,
    n_layers=4,
    n_heads=8,
    n_kv_heads=4,
    head_dim=8,
    intermediate_size=48,
    tie_word_embeddings=True,
    max_seq_len=16,
)
PRUNABLE_TARGET = {"n_layers": 3, "n_heads": 2, "n_kv_heads": 2, "d_model": 16, "intermediate_size": 24}
TINY_DOMAINS = ("alpha", "beta")
TINY_SEQ_LEN = 16


def write_tiny_source(path: str, seed: int = 0, **overrides) -> str:
    """A random tiny decoder saved as a project checkpoint (what `convert hf-to-composer` writes)."""
    import torch

    from llmshearing.checkpoint.format import save_checkpoint
    from llmshearing.models.config import ModelConfig
    from llmshearing.models.decoder import Decoder

    config = ModelConfig(**{**TINY_MODEL, **overrides})
    torch.manual_seed(seed)
    decoder = Decoder(config)
    decoder.init_weights()
    save_checkpoint(path, config, decoder.state_dict(), progress=False)
    return path


# The byte-tokenizer source the lm-eval tests score: the tiny model with an embedding for each of the byte
# tokenizer's 257 tokens (and three to spare), saved with the tokenizer beside it; max_seq_len is each test's.
BYTE_VOCAB = 260


def write_byte_tokenizer(directory: Path) -> int:
    """A byte-level BPE tokenizer with no merges (256 byte tokens + end of text); returns its size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab["<|endoftext|>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>").save_pretrained(directory)
    return len(vocab)


def write_byte_source(path: Path, max_seq_len: int) -> Path:
    """A random tiny project checkpoint whose vocabulary covers the byte tokenizer saved beside it."""
    write_tiny_source(str(path), seed=3, vocab_size=BYTE_VOCAB, max_seq_len=max_seq_len)
    write_byte_tokenizer(path)
    return path


def write_tiny_mds(
    root: str, n_train: int = 96, n_eval: int = 8, seq_len: int = TINY_SEQ_LEN, n_test: int | None = None
) -> str:
    """Two domains of learnable token patterns in the layout `llmshearing prepare-data` writes (train, eval, test)."""
    rngs = {"train": np.random.default_rng(0), "test": np.random.default_rng(1)}
    rngs["eval"] = rngs["train"]  # eval draws from the train stream; test has its own
    n_test = n_eval if n_test is None else n_test
    samples: dict[str, dict[str, list[np.ndarray]]] = {"train": {}, "eval": {}, "test": {}}
    for d, domain in enumerate(TINY_DOMAINS):
        for split, count in (("train", n_train), ("eval", n_eval), ("test", n_test)):
            step = 1 + d  # domain 0 counts by ones, domain 1 by twos
            starts = [int(rngs[split].integers(0, 40)) for _ in range(count)]
            samples[split][domain] = [(start + step * np.arange(seq_len)) % 97 for start in starts]
    write_token_root(root, samples, vocab_size=97)
    return root


@pytest.fixture(scope="session")
def tiny_source(tmp_path_factory) -> str:
    return write_tiny_source(str(tmp_path_factory.mktemp("tiny") / "source"))


@pytest.fixture(scope="session")
def tiny_mds(tmp_path_factory) -> str:
    return write_tiny_mds(str(tmp_path_factory.mktemp("tiny-data") / "mds"))


@pytest.fixture(autouse=True)
def release_streaming_shared_memory(monkeypatch):
    """Streaming holds every shared-memory block it opens until the process exits (an atexit hook each), so one
    pytest process would run out of file descriptors: close the blocks a test opened when the test ends."""
    import atexit
    import gc

    from streaming.base.shared.memory import SharedMemory

    opened: list[SharedMemory] = []
    init = SharedMemory.__init__

    def tracked_init(self, *args, **kwargs) -> None:
        init(self, *args, **kwargs)
        opened.append(self)

    monkeypatch.setattr(SharedMemory, "__init__", tracked_init)
    yield
    if opened:
        gc.collect()  # views into the blocks must be gone before they close
    for block in opened:
        atexit.unregister(block.cleanup)
        for shm in block.created_shms + block.opened_shms:
            try:
                shm.close()
                if shm in block.created_shms:
                    shm.unlink()
            except (BufferError, OSError):
                pass  # still in use or already removed: left to the exit hook's owner


@pytest.fixture()
def clean_shm():
    """Streaming keeps shared memory per local path; clear stale segments around a test."""
    from streaming.base.util import clean_stale_shared_memory

    clean_stale_shared_memory()
    yield
    clean_stale_shared_memory()


class Interrupted(RuntimeError):
    """Raised by :class:`CrashAt`: a run stopped as a crash would stop it."""


class CrashAt(Callback):
    """Stops training when batch ``at`` is about to start (the checkpoint of batch ``at`` exists)."""

    def __init__(self, at: int) -> None:
        self.at = at

    def batch_start(self, state, logger) -> None:
        del logger
        if int(state.timestamp.batch) == self.at:
            raise Interrupted(f"stopped before batch {self.at + 1}")


def can_mount_tmpfs() -> bool:
    """A private mount namespace with a tmpfs can be made here (the full-disk tests need one)."""
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(
        ["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k none /mnt"], capture_output=True
    )
    return probe.returncode == 0


needs_tmpfs = pytest.mark.skipif(not can_mount_tmpfs(), reason="needs a tmpfs mount (unshare -rm)")


# ------------------------------------------------------------------------------- tiny Hugging Face models
# The conversion tests' HF models (and the sharded-source tests' HF input): one tiny config per family.
HF_VOCAB = 96


def hf_test_config(family: str):
    """A tiny random-model config of ``family``: llama_gqa_llama3 (GQA, Llama-3 RoPE scaling), mistral, qwen2,
    llama_tied (multi-head, tied embeddings)."""
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    common = dict(
        vocab_size=HF_VOCAB,
        hidden_size=48,
        intermediate_size=80,
        num_hidden_layers=2,
        num_attention_heads=6,
        num_key_value_heads=2,
        max_position_embeddings=128,
        rms_norm_eps=1e-6,
    )
    if family == "llama_gqa_llama3":
        scaling = {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        }
        return LlamaConfig(**common, head_dim=12, rope_theta=50000.0, rope_scaling=scaling)
    if family == "mistral":
        return MistralConfig(**common, head_dim=8, sliding_window=7)
    if family == "qwen2":
        return Qwen2Config(**common, rope_theta=1e6)
    if family == "llama_tied":
        return LlamaConfig(**{**common, "num_key_value_heads": 6}, tie_word_embeddings=True)
    raise AssertionError(family)


def write_word_tokenizer(directory: Path, eos: str = "w1") -> None:
    """A word-level tokenizer of ``HF_VOCAB`` tokens ``w0`` ... (``<unk>`` is id 0)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(HF_VOCAB)}
    vocab["<unk>"] = 0
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token=eos).save_pretrained(directory)


# ----------------------------------------------------------------------------- two-rank runs (FSDP2 on CPU)
# two-rank runs of the training entry point with gloo, shared by tests/training and tests/checkpoint.
SHARDED = ["fsdp_config.sharding_strategy=FULL_SHARD", "fsdp_config.state_dict_type=sharded"]
RANK0 = "model.init_device=mixed"  # rank 0 reads the source (and the teacher); FSDP broadcasts to the shards
PORTS = iter(range(29811, 29899))  # one master port per launch


def run_args(source: str, data: str, folder: Path, *extra: str) -> list[str]:
    """The overrides of a training run of ``source`` on ``data`` saving to ``folder``."""
    return [f"model.path={source}", f"data_local={data}", f"save_folder={folder}", *extra]


def run_two_ranks(recipe: str, args: list[str], script: list[str] | None = None, expect: int = 0) -> str:
    """Two ranks of ``llmshearing/train.py`` (or ``script``) with ``FSDP_VERSION=2``, started as ``composer -n 2``
    starts them (:func:`start_ranks`); asserts the exit status (0, or non-zero when ``expect`` is) and returns
    every rank's stdout and stderr, rank 0's first."""
    command = [sys.executable, *(script or ["llmshearing/train.py"]), recipe, *args]
    status, output = start_ranks(command, 2, next(PORTS), {"FSDP_VERSION": "2"})
    assert (status == 0) == (expect == 0), output[-6000:]
    return output


def start_ranks(command: list[str], ranks: int, port: int, env: dict[str, str]) -> tuple[int, str]:
    """Run ``ranks`` processes of ``command`` on this node as Composer's launcher runs them: the same environment
    (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, NODE_RANK, MASTER_ADDR, MASTER_PORT, unbuffered output), and a
    rank that exits non-zero stops the others (SIGTERM). What the launcher's own process would add is its import
    of Composer (seconds, before the first rank starts); ``tests/entry_points/test_train.py``'s DDP run and
    ``tests/dynamic_loading/test_dynamic_loading.py``'s two ranks launch through ``composer -n 2`` itself.
    Returns the first non-zero exit status (0 when every rank succeeds) and the ranks' output, rank 0's first."""
    import tempfile
    import time

    with tempfile.TemporaryDirectory() as logs:
        procs = []
        for rank in range(ranks):
            rank_env = {
                **os.environ,
                **env,
                "RANK": str(rank),
                "WORLD_SIZE": str(ranks),
                "LOCAL_RANK": str(rank),
                "LOCAL_WORLD_SIZE": str(ranks),
                "NODE_RANK": "0",
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(port),
                "PYTHONUNBUFFERED": "1",
            }
            log = open(os.path.join(logs, f"rank{rank}.log"), "w+")
            procs.append((subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=rank_env), log))
        status = 0
        while any(proc.poll() is None for proc, _ in procs):
            failed = [proc.returncode for proc, _ in procs if proc.returncode not in (None, 0)]
            if failed:  # as the launcher does: the ranks still running are stopped
                status = failed[0]
                for proc, _ in procs:
                    if proc.poll() is None:
                        proc.terminate()
                for proc, _ in procs:
                    try:
                        proc.wait(timeout=30)
                    except subprocess.TimeoutExpired:
                        proc.kill()
                        proc.wait()
                break
            time.sleep(0.1)
        status = status or next((proc.returncode for proc, _ in procs if proc.returncode), 0)
        output = []
        for _, log in procs:
            log.seek(0)
            output.append(log.read())
            log.close()
    return status, "".join(output)


def logged_metrics(folder: Path) -> dict[tuple[int, str], float]:
    """A run's ``metrics.jsonl`` as ``{(step, name): value}`` (numbers only)."""
    import json

    rows = {}
    for line in (folder / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        step = record.pop("step")
        rows.update({(step, k): v for k, v in record.items() if isinstance(v, (int, float))})
    return rows


def checkpoint_tensors(folder: Path) -> dict:
    """Every tensor of a run's ``checkpoints/latest-rank0.pt``."""
    from llmshearing.checkpoint.reading import open_checkpoint

    with open_checkpoint(folder / "checkpoints" / "latest-rank0.pt") as ckpt:
        return {k: ckpt.tensors.get(k) for k in ckpt.tensors.keys()}


# ---------------------------------------------------------------------------------------- downstream tasks
# The lm-eval tests' task inputs, shared by tests/harness, tests/callbacks, tests/training and tests/entry_points.
HELDOUT_SEQ = 400  # bytes (tokens) per sequence of byte_split


def write_char_tokenizer(directory: Path) -> Path:
    """A character-level tokenizer of 97 tokens (printable ASCII, unknown, end of text): it fits the
    97-token vocabulary of the tests' tiny source, and the shipped tasks are printable ASCII."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {chr(code): code - 32 for code in range(32, 127)}
    vocab.update({"<unk>": len(vocab), "<|endoftext|>": len(vocab) + 1})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<|endoftext|>")
    fast.save_pretrained(directory)
    return directory


def icl_recipe_args(tokenizer_dir: Path) -> list[str]:
    """Overrides that score two shipped tasks at every evaluation of a run of the tiny source (97 tokens)."""
    write_char_tokenizer(tokenizer_dir)
    tasks = "[{task: local_mc, limit: 8}, {label: cloze, task: local_cloze, num_fewshot: 2, limit: 8}]"
    return [f"eval_tasks.tokenizer={tokenizer_dir}", f"eval_tasks.tasks={tasks}"]


def user_task_dir(root: Path) -> Path:
    """A task directory in lm-eval's local-data format: ``dataset_path: json`` over absolute JSONL paths."""
    from llmshearing.harness.runner import TASKS_DIR

    root.mkdir(parents=True, exist_ok=True)
    train, test = TASKS_DIR / "local_cloze_train.jsonl", TASKS_DIR / "local_cloze_test.jsonl"
    (root / "user_cloze.yaml").write_text(
        "task: user_cloze\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    train: {train}\n    test: {test}\n"
        "output_type: loglikelihood\n"
        "training_split: train\n"
        "test_split: test\n"
        "doc_to_text: \"{{text.split(' ')[:-1]|join(' ')}}\"\n"
        "doc_to_target: \"{{' ' + text.split(' ')[-1]}}\"\n"
        'target_delimiter: ""\n'
        "metric_list:\n  - metric: perplexity\n  - metric: acc\n"
    )
    return root


def byte_split(root: Path, tokenizer_dir: Path) -> Path:
    """Two domains of 10 sequences of HELDOUT_SEQ byte tokens each, cut from the standard library's help topics."""
    from pydoc_data.topics import topics

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    text = " ".join(" ".join(t.split()) for _, t in sorted(topics.items()))
    ids = tokenizer.encode(text[: 2 * 10 * HELDOUT_SEQ + 2000], add_special_tokens=False)
    rows = [np.array(ids[i * HELDOUT_SEQ : (i + 1) * HELDOUT_SEQ]) for i in range(20)]
    samples = {"train": {"a": rows[:2], "b": rows[2:4]}, "eval": {"a": rows[:2], "b": rows[2:4]}}
    samples["test"] = {"a": rows[:10], "b": rows[10:20]}
    write_token_root(root, samples, vocab_size=BYTE_VOCAB)
    return root


# ---------------------------------------------------------------------------------------------- shutdown
_SESSION = {"status": 0}


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    _SESSION["status"] = int(exitstatus)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config: pytest.Config) -> None:
    """End the test process once the suite is done, naming what would have kept it alive.

    A library thread left running after the last test (not a daemon) makes the interpreter wait for it forever
    at exit (seen intermittently after a passing suite). Such threads are listed with their stacks on stderr and
    the process exits with the suite's status without waiting for them; any other hang at shutdown prints every
    thread's stack and exits (status 1) after five minutes.
    """
    import faulthandler
    import threading
    import traceback

    main = threading.main_thread()
    lingering = [t for t in threading.enumerate() if t is not main and not t.daemon and t.is_alive()]
    if lingering:
        frames = sys._current_frames()
        lines = ["threads still running after the suite (the process exits without waiting for them):"]
        for thread in lingering:
            lines.append(f"  {thread.name} ({type(thread).__module__}.{type(thread).__qualname__})")
            frame = frames.get(thread.ident)
            if frame is not None:
                lines += ["    " + line for line in "".join(traceback.format_stack(frame)).splitlines()]
        sys.stdout.flush()
        sys.stderr.write("\n".join(lines) + "\n")
        sys.stderr.flush()
        os._exit(_SESSION["status"])
    faulthandler.dump_traceback_later(300, exit=True)
