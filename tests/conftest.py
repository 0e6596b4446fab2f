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
