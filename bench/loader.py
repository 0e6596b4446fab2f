"""Throughput of DynamicStreamingDataset vs a plain StreamingDataset over the same MDS data.

Both read the same per-domain MDS directories (two identical copies, since streaming allows one
dataset per local directory at a time) with the same proportions, epoch size, batch size, shuffle
and DataLoader workers, and both turn rows into int64 token tensors the same way; the dynamic one
also tags each sample with its domain and global index and changes its mix at every epoch (update
interval). The dynamic loader is the project's ``SampleDataLoader``,
as ``llmshearing.data.loaders`` builds it.
Repeats are interleaved (plain then dynamic, dynamic then plain, ...) and the reported ratio is
the median of the per-repeat ratios of samples/s (dynamic / plain).

    .venv/bin/python bench/loader.py [--quick] [--workers 2] [--repeats 5]
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import statistics
import tempfile
import time

import numpy as np
import psutil
import torch

TARGET = 0.95
NAMES = ["web", "code", "books"]
PROPORTION = [0.6, 0.25, 0.15]


def write_data(root: str, samples: int, seq_len: int) -> None:
    from streaming import MDSWriter

    rng = np.random.default_rng(0)
    sizes = [samples // 2, samples // 3, samples - samples // 2 - samples // 3]
    for name, n in zip(NAMES, sizes, strict=True):
        with MDSWriter(
            out=os.path.join(root, "train", name), columns={"tokens": "ndarray:uint16"}, size_limit="4mb"
        ) as writer:
            for _ in range(n):
                writer.write({"tokens": rng.integers(0, 32000, seq_len).astype(np.uint16)})


def plain_loader(root: str, args) -> torch.utils.data.DataLoader:
    from streaming import Stream, StreamingDataset

    class PlainTokens(StreamingDataset):
        """The stock dataset turning each row into the token tensor a language model trains on
        (as llm-foundry's text dataset does); no domain mixing beyond streaming's own."""

        def get_item(self, sample_id: int, retry: int = 7) -> dict:
            return {
                "input_ids": torch.from_numpy(super().get_item(sample_id, retry)["tokens"].astype(np.int64))
            }

    streams = [
        Stream(local=os.path.join(root, "train", n), proportion=p)
        for n, p in zip(NAMES, PROPORTION, strict=True)
    ]
    dataset = PlainTokens(
        streams=streams,
        epoch_size=args.interval * args.batch,
        batch_size=args.batch,
        shuffle=True,
        shuffle_seed=5,
    )
    return torch.utils.data.DataLoader(dataset, batch_size=args.batch, **loader_kwargs(args.workers))


def dynamic_loader(root: str, args) -> torch.utils.data.DataLoader:
    from streaming import Stream

    from llmshearing.data.dynamic_dataset import DynamicStreamingDataset, SampleDataLoader

    dataset = DynamicStreamingDataset(
        streams=[Stream(local=os.path.join(root, "train", n)) for n in NAMES],
        set_names=NAMES,
        proportion=PROPORTION,
        interval_batches=args.interval,
        batch_size=args.batch,
        shuffle=True,
        shuffle_seed=5,
    )
    return SampleDataLoader(dataset, batch_size=args.batch, **loader_kwargs(args.workers))


def loader_kwargs(workers: int) -> dict:
    return {"num_workers": workers, "persistent_workers": workers > 0} if workers else {"num_workers": 0}


class Meter:
    """Runs epochs of one loader; measures samples per wall-clock second and per CPU second
    (this process plus the loader's own DataLoader worker processes)."""

    def __init__(self, loader, dynamic: bool) -> None:
        self.loader, self.dynamic = loader, dynamic
        self.workers: list[psutil.Process] = []

    def start(self) -> None:
        """Run the first epoch (warms the page cache) and note the worker processes it started."""
        before = {p.pid for p in psutil.Process().children()}
        self.run(1, 0)
        self.workers = [p for p in psutil.Process().children() if p.pid not in before]

    def _cpu(self) -> float:
        total = sum(psutil.Process().cpu_times()[:2])
        for worker in self.workers:
            total += sum(worker.cpu_times()[:2])
        return total

    def run(self, epochs: int, first_epoch: int) -> tuple[float, float]:
        rng = np.random.default_rng(first_epoch)
        wall, cpu = time.perf_counter(), self._cpu()
        count = 0
        for epoch in range(first_epoch, first_epoch + epochs):
            if self.dynamic:
                weights = rng.dirichlet(np.ones(len(NAMES)))
                self.loader.dataset.set_proportions((weights / weights.sum()).tolist(), epoch)
            for batch in self.loader:
                count += batch["input_ids"].shape[0]
        wall = time.perf_counter() - wall
        cpu = self._cpu() - cpu
        return count / wall, count / cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small data and few repeats (under a minute)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args()
    samples, seq_len = (6_000, 512) if args.quick else (40_000, 1024)
    args.interval = 25 if args.quick else 50
    epochs = 4
    repeats = args.repeats or (11 if args.quick else 21)

    from streaming.base.util import clean_stale_shared_memory

    tmp = tempfile.mkdtemp(prefix="bench-loader-")
    plain = dynamic = None
    try:
        write_data(os.path.join(tmp, "a"), samples, seq_len)
        shutil.copytree(os.path.join(tmp, "a"), os.path.join(tmp, "b"))
        clean_stale_shared_memory()
        plain = Meter(plain_loader(os.path.join(tmp, "a"), args), dynamic=False)
        dynamic = Meter(dynamic_loader(os.path.join(tmp, "b"), args), dynamic=True)
        plain.start()
        dynamic.start()
        wall_ratios, cpu_ratios, plain_rates, dynamic_rates = [], [], [], []
        for r in range(repeats):
            first = 1 + r * epochs
            if r % 2 == 0:  # alternate the order so that neither side always runs first
                p, p_cpu = plain.run(epochs, first)
                d, d_cpu = dynamic.run(epochs, first)
            else:
                d, d_cpu = dynamic.run(epochs, first)
                p, p_cpu = plain.run(epochs, first)
            plain_rates.append(p)
            dynamic_rates.append(d)
            wall_ratios.append(d / p)
            cpu_ratios.append(d_cpu / p_cpu)
            print(
                f"repeat {r}: plain {p:,.0f} samples/s, dynamic {d:,.0f} samples/s, ratio {d / p:.3f} "
                f"(per CPU second: {d_cpu / p_cpu:.3f})"
            )
        print(
            f"median: plain {statistics.median(plain_rates):,.0f} samples/s, "
            f"dynamic {statistics.median(dynamic_rates):,.0f} samples/s "
            f"({samples} samples x {seq_len} tokens, batch {args.batch}, workers {args.workers}, "
            f"interval {args.interval} batches)"
        )
        print(
            f"median ratio of samples per CPU second (less sensitive to other load): {statistics.median(cpu_ratios):.3f}"
        )
        print(f"RESULT loader ratio={statistics.median(wall_ratios):.2f} target=>={TARGET}")
    finally:
        del plain, dynamic
        gc.collect()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
