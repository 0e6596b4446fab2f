"""Small multi-domain training runs with dynamic batch loading, for the data tests.

Imported by ``tests/data/test_dynamic_dataset.py`` and ``tests/dynamic_loading/test_dynamic_loading.py``; run
as a script under ``composer -n 2`` for the two-rank test::

    composer -n 2 tests/scripts/mix_training.py <data_root> <out_dir>

which trains without interruption, resumes from a mid-interval and a boundary checkpoint, and
writes ``<out_dir>/rank<r>.json`` with every batch's sample ids, the weight history and the
per-domain eval token counts.
"""

from __future__ import annotations

import gc
import json
import os
import sys
from typing import Any

import numpy as np

NAMES = ["web", "code", "book"]
TRAIN_SIZES = [40, 24, 10]
EVAL_SIZES = [6, 5, 4]
SEQ_LEN = 16
VOCAB = 64
INTERVAL = 3  # batches per update interval


def write_domains(
    root: str, names=NAMES, train_sizes=TRAIN_SIZES, eval_sizes=EVAL_SIZES, seq_len=SEQ_LEN, manifest=True
) -> str:
    """MDS data in the project layout: ``root/{train,eval}/<domain>`` plus ``manifest.json``.

    Domains differ in how predictable they are (random tokens, a cycle, a constant run) so their
    losses differ after a few steps.
    """
    from streaming import MDSWriter

    rng = np.random.default_rng(0)
    splits = {}
    for split, sizes in (("train", train_sizes), ("eval", eval_sizes)):
        splits[split] = {}
        for d, (name, n) in enumerate(zip(names, sizes, strict=True)):
            out = os.path.join(root, split, name)
            with MDSWriter(out=out, columns={"tokens": "ndarray:uint16"}, size_limit=600) as writer:
                for i in range(n):
                    if d % 3 == 0:
                        tokens = rng.integers(0, VOCAB, seq_len)
                    elif d % 3 == 1:
                        tokens = (np.arange(seq_len) + i) % 8
                    else:
                        tokens = np.full(seq_len, 5 + i % 3)
                    writer.write({"tokens": tokens.astype(np.uint16)})
            splits[split][name] = {"samples": n, "tokens": n * seq_len}
    if manifest:
        with open(os.path.join(root, "manifest.json"), "w") as fh:
            json.dump({"domains": sorted(names), "seq_len": seq_len, "splits": splits}, fh)
    return root


def tiny_model(names=NAMES):
    from llmshearing.models.composer_model import ComposerLlama
    from llmshearing.models.config import ModelConfig

    config = ModelConfig(
        vocab_size=VOCAB,
        d_model=32,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        head_dim=8,
        intermediate_size=64,
        max_seq_len=SEQ_LEN,
        attn_impl="sdpa",
    )
    return ComposerLlama(config, domains=names)


def make_recorder(folder: str | None):
    """A callback that records every batch's sample ids and domains, and (with ``folder``) writes a
    checkpoint at every ``BATCH_CHECKPOINT`` and ``EPOCH_CHECKPOINT`` as ``ep{epoch}-ba{batch}.pt``."""
    from composer import Callback
    from composer.utils import checkpoint

    class Recorder(Callback):
        def __init__(self) -> None:
            self.batches: list[tuple[int, list[int], list[int]]] = []

        def after_dataloader(self, state, logger) -> None:
            batch = state.batch
            self.batches.append((int(state.timestamp.batch), batch["idx"].tolist(), batch["domain"].tolist()))

        def _save(self, state) -> None:
            if folder is not None:
                checkpoint.save_checkpoint(state, os.path.join(folder, "ep{epoch}-ba{batch}.pt"))

        def batch_checkpoint(self, state, logger) -> None:
            self._save(state)

        def epoch_checkpoint(self, state, logger) -> None:
            self._save(state)

    return Recorder()


def run_training(
    data_root: str,
    cache_dir: str,
    *,
    workers: int = 0,
    eval_interval: str = f"{INTERVAL}ba",
    max_duration: str = "12ba",
    device_batch_size: int = 4,
    data_loading: dict[str, Any] | None = None,
    save_folder: str | None = None,
    load_path: str | None = None,
    eval_before_fit: bool = True,
    loggers: list | None = None,
) -> dict[str, Any]:
    """Train the tiny model with the dynamic mix; return batches, callback state and eval metrics.

    ``cache_dir`` must be new for every run (it is the streams' local cache of ``data_root``).
    """
    from composer import Trainer
    from composer.core import Evaluator
    from composer.optim import DecoupledAdamW

    from llmshearing.data.loaders import build_eval_dataloader
    from llmshearing.dynamic_loading.callback import DynamicLoadingCallback
    from llmshearing.dynamic_loading.loader import build_train_dataloader

    dl_cfg = {
        "dynamic": True,
        "set_names": NAMES,
        "proportion": [0.5, 0.3, 0.2],
        "target_loss": [2.0, 1.0, 0.5],
        "update_interval": f"{INTERVAL}ba",
        "min_proportion": 0.0,  # the paper's rule unless a test asks for a stabiliser
    }
    dl_cfg.update(data_loading or {})
    train_cfg = {
        "dataset": {"local": os.path.join(cache_dir, "train"), "remote": data_root, "shuffle_seed": 7},
        "num_workers": workers,
        "persistent_workers": workers > 0,
    }
    eval_cfg = {"dataset": {"local": os.path.join(cache_dir, "eval"), "remote": data_root}}
    train = build_train_dataloader(
        train_cfg, dl_cfg, device_batch_size=device_batch_size, eval_interval=eval_interval
    )
    evaluation = build_eval_dataloader(eval_cfg, NAMES, device_batch_size=device_batch_size)
    model = tiny_model()
    callback = DynamicLoadingCallback.from_config(dl_cfg)
    recorder = make_recorder(save_folder)
    trainer = Trainer(
        model=model,
        train_dataloader=train,
        eval_dataloader=Evaluator(label="eval", dataloader=evaluation, metric_names=list(model.eval_metrics)),
        eval_interval=eval_interval,
        max_duration=max_duration,
        callbacks=[callback, recorder],
        loggers=loggers or [],
        optimizers=DecoupledAdamW(model.parameters(), lr=1e-2),
        device="cpu",
        precision="fp32",
        seed=3,
        load_path=load_path,
        progress_bar=False,
        log_to_console=False,
    )
    if load_path is None and eval_before_fit:
        trainer.eval()
    trainer.fit()
    eval_tokens = {
        name: trainer.state.eval_metrics["eval"][f"{name}_LanguageCrossEntropy"].tokens for name in NAMES
    }
    state = callback.state_dict()
    state["history"] = json.loads(state["history"])  # stored as one JSON string
    result = {"batches": recorder.batches, "callback": state, "eval_tokens": eval_tokens}
    trainer.close()
    del trainer, train, evaluation
    gc.collect()
    return result


def resumed_matches(full: dict[str, Any], resumed: dict[str, Any]) -> tuple[int, bool]:
    """(first resumed batch, whether the resumed batches equal the uninterrupted run's from there)."""
    start = resumed["batches"][0][0]
    return start, [b[1] for b in resumed["batches"]] == [b[1] for b in full["batches"][start:]]


def main(argv: list[str]) -> int:
    """Two-rank run: uninterrupted, then resumed from a mid-interval and a boundary checkpoint."""
    from composer.utils import dist

    data_root, out_dir = argv
    ckpt = os.path.join(out_dir, "checkpoints")
    full = run_training(
        data_root,
        os.path.join(out_dir, "cache-full"),
        device_batch_size=2,
        save_folder=ckpt,
        max_duration="9ba",
    )
    dist.barrier()
    resumed = {}
    for name in ("ep1-ba4.pt", "ep2-ba6.pt"):
        run = run_training(
            data_root,
            os.path.join(out_dir, f"cache-{name}"),
            device_batch_size=2,
            load_path=os.path.join(ckpt, name),
            max_duration="9ba",
        )
        resumed[name] = run["batches"]
    rank = dist.get_global_rank()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as fh:
        json.dump(
            {
                "batches": full["batches"],
                "history": full["callback"]["history"],
                "eval_tokens": full["eval_tokens"],
                "resumed": resumed,
            },
            fh,
        )
    return 0


if __name__ == "__main__":
    code = main(sys.argv[1:])
    sys.stdout.flush()
    sys.stderr.flush()
    # The results are on disk; skip interpreter teardown, which for torch + Composer can take longer
    # than the launcher's 30 s clean-up window on a busy machine.
    os._exit(code)
