"""``llmshearing.data.shared_memory``: datasets built at the same instant by processes of one machine."""

from __future__ import annotations

import multiprocessing
import os

import pytest

from llmshearing.data import shared_memory

PROCESSES = 4  # without the lock, 4 processes starting together collided in every round tried (3 of 3)


def _build_both(root: str, domains: list[str], barrier, results) -> None:
    """In a fresh process: wait for the others, then build an eval and a training dataset over ``root``.

    The spawned process imports this module (not ``conftest``, which imports Composer): it starts quickly."""
    from streaming import Stream

    from llmshearing.data.dynamic_dataset import DynamicStreamingDataset
    from llmshearing.data.eval_dataset import DomainEvalDataset
    from llmshearing.data.layout import domain_dir

    def streams(split: str) -> list[Stream]:
        return [Stream(local=domain_dir(root, split, d)) for d in domains]

    barrier.wait()
    try:
        DomainEvalDataset(streams=streams("eval"), set_names=domains)
        DynamicStreamingDataset(
            streams=streams("train"), set_names=domains, proportion=[0.5, 0.5], batch_size=2,
            interval_batches=2, max_seq_len=16,
        )  # fmt: skip
        results.put("built")
    except Exception as err:  # the parent reports it
        results.put(f"{type(err).__name__}: {err}")


@pytest.mark.slow
def test_processes_that_build_datasets_together_all_get_their_own_shared_memory(tmp_path):
    from conftest import TINY_DOMAINS, write_tiny_mds

    roots = [write_tiny_mds(str(tmp_path / f"mds{i}")) for i in range(PROCESSES)]
    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(PROCESSES), context.Queue()
    processes = [
        context.Process(target=_build_both, args=(root, list(TINY_DOMAINS), barrier, results))
        for root in roots
    ]
    for process in processes:
        process.start()
    outcomes = sorted(results.get(timeout=300) for _ in processes)
    for process in processes:
        process.join(timeout=60)
    assert outcomes == ["built"] * PROCESSES


def test_only_the_local_leader_takes_the_lock(monkeypatch, tmp_path):
    if os.path.isdir("/dev/shm"):  # beside the shared memory it guards
        assert os.path.dirname(shared_memory.lock_path()) == "/dev/shm"
    lock = tmp_path / "streaming.lock"
    monkeypatch.setattr(shared_memory, "lock_path", lambda: str(lock))
    for name, value in (("WORLD_SIZE", "2"), ("LOCAL_WORLD_SIZE", "2"), ("RANK", "1"), ("LOCAL_RANK", "1")):
        monkeypatch.setenv(name, value)
    with shared_memory.prefix_registration():
        assert not lock.exists()  # rank 1 waits for its leader inside the constructor, never for the lock
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    with shared_memory.prefix_registration():
        assert lock.exists()
