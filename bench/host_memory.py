"""Peak host memory per rank at start-up and training under FSDP2 on CPU: every rank reads the source
(``model.init_device=cpu``) against rank 0 alone (``model.init_device=mixed``).

A random decoder (default d_model 1024, 8 layers: ~100 M parameters, ~0.4 GB fp32) is saved as a project
checkpoint beside a small token dataset; the tiny continued-pretraining recipe then runs a few batches under
``FSDP_VERSION=2 composer -n N`` (FULL_SHARD, gloo), distilling from the same checkpoint so the teacher is
read too. Each rank records its own peak RSS (``ru_maxrss``) when it ends; the table gives every rank's peak,
their sum (what one node holds at worst) and the model's fp32 bytes. Writes
``bench/results/host-memory-<date>-cpu.md``.

    python bench/host_memory.py                   # 1 and 2 ranks
    python bench/host_memory.py --ranks 1 2 4     # 4 ranks too (slow on 2 cores)
    python bench/host_memory.py --quick           # d_model 512, 4 layers
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
RECIPE = "yamls/tiny/continued.yaml"
MODES = ("cpu", "mixed")


def peak_rss() -> int:
    """This process's peak RSS in bytes since it started or since :func:`reset_peak` (Linux ``VmHWM``)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak() -> None:
    """Start ``VmHWM`` again from the current RSS (Linux: ``5`` into ``/proc/self/clear_refs``)."""
    Path("/proc/self/clear_refs").write_text("5")


def probe(out_dir: str, argv: list[str]) -> int:
    """Build the trainer and train as ``llmshearing/train.py`` does (launched once per rank); write this
    rank's peak RSS at start-up (imports, reading, wrapping, broadcast) and over the training that follows."""
    from llmshearing.train import build_trainer, run

    trainer, values = build_trainer(argv[0], argv[1:])
    startup = peak_rss()
    reset_peak()
    run(trainer, values)
    training = peak_rss()
    rank = int(os.environ.get("RANK", "0"))
    record = {"rank": rank, "startup": startup, "training": training}
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(record))
    return 0


def write_inputs(root: Path, d_model: int, n_layers: int) -> tuple[Path, Path, int]:
    """A random source checkpoint and a two-domain token dataset; returns (source, data, model bytes)."""
    import numpy as np
    import torch

    from llmshearing.convert.checkpoint import save_checkpoint
    from llmshearing.data.layout import write_token_root
    from llmshearing.models.config import ModelConfig
    from llmshearing.models.decoder import Decoder

    heads = d_model // 64
    config = ModelConfig(
        vocab_size=97,
        d_model=d_model,
        n_layers=n_layers,
        n_heads=heads,
        n_kv_heads=max(1, heads // 2),
        head_dim=64,
        intermediate_size=d_model * 11 // 4,
        max_seq_len=64,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    decoder = Decoder(config)
    decoder.init_weights()
    source = root / "source"
    save_checkpoint(str(source), config, decoder.state_dict(), progress=False)
    nbytes = sum(p.numel() * 4 for p in decoder.parameters())
    del decoder
    rng = np.random.default_rng(0)
    samples = {
        split: {
            domain: [(int(rng.integers(0, 40)) + step * np.arange(16)) % 97 for _ in range(count)]
            for step, domain in ((1, "alpha"), (2, "beta"))
        }
        for split, count in (("train", 64), ("eval", 8), ("test", 8))
    }
    data = root / "mds"
    write_token_root(str(data), samples, vocab_size=97)
    return source, data, nbytes


def launch(
    ranks: int, mode: str, source: Path, data: Path, root: Path, port: int
) -> tuple[list[dict[str, int]], str]:
    """One run; returns every rank's peak RSS (bytes) at start-up and in training, and the command."""
    out = root / f"peaks-{ranks}-{mode}"
    out.mkdir()
    launcher = os.path.join(os.path.dirname(sys.executable), "composer")
    overrides = [
        f"model.path={source}",
        f"data_local={data}",
        f"save_folder={root / f'run-{ranks}-{mode}'}",
        f"model.init_device={mode}",
        f"model.distillation.teacher={source}",
        "model.distillation.alpha=0.5",
        "max_duration=2ba",
        "scheduler.t_warmup=0ba",
        "eval_interval=2ba",
        "save_interval=2ba",
        "global_train_batch_size=4",
        "device_train_microbatch_size=1",
        "fsdp_config.sharding_strategy=FULL_SHARD",
        "fsdp_config.state_dict_type=sharded",
    ]
    script = ["bench/host_memory.py", "--probe", str(out), RECIPE, *overrides]
    command = [launcher, "-n", str(ranks), "--master_port", str(port), *script]
    proc = subprocess.run(
        command, cwd=REPO, capture_output=True, text=True, env={**os.environ, "FSDP_VERSION": "2"}
    )
    if proc.returncode != 0:
        raise SystemExit(f"{shlex.join(command)} failed:\n{(proc.stdout + proc.stderr)[-4000:]}")
    peaks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(ranks)]
    return peaks, shlex.join(["FSDP_VERSION=2", "composer", *command[1:]])


def _mib(values: list[int]) -> str:
    return ", ".join(f"{v / (1 << 20):.0f}" for v in values)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--quick", action="store_true", help="d_model 512, 4 layers")
    parser.add_argument("--probe", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe:
        return probe(args.probe[0], args.probe[1:])
    d_model, n_layers = (512, 4) if args.quick else (1024, 8)
    mib = 1 << 20
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        source, data, nbytes = write_inputs(root, d_model, n_layers)
        print(f"model: d_model {d_model}, {n_layers} layers, {nbytes / mib:.0f} MiB fp32", flush=True)
        port = 29620
        example = ""
        for ranks in args.ranks:
            for mode in MODES:
                port += 1
                peaks, command = launch(ranks, mode, source, data, root, port)
                example = example or command
                startup = [p["startup"] for p in peaks]
                training = [p["training"] for p in peaks]
                print(
                    f"{ranks} rank(s), init_device={mode}: start-up peak per rank {_mib(startup)} MiB "
                    f"(sum {sum(startup) / mib:.0f}), training peak per rank {_mib(training)} MiB "
                    f"(sum {sum(training) / mib:.0f})",
                    flush=True,
                )
                rows.append((ranks, mode, startup, training))
    today = datetime.date.today().isoformat()
    quick = " --quick" if args.quick else ""
    lines = [
        f"# `bench/host_memory.py`: peak host RSS per rank, every-rank vs rank-0 loading ({today})",
        "",
        f"Command: `.venv/bin/python bench/host_memory.py --ranks {' '.join(map(str, args.ranks))}{quick}`, "
        "on the 2-core development machine (shared), torch 2.7.0, Composer 0.32.1, FSDP2 on CPU (gloo).",
        f"Each run: `{example}` (with N ranks and each `model.init_device`): the tiny continued recipe on a "
        f"random source of d_model {d_model}, {n_layers} layers ({nbytes / mib:.0f} MiB fp32), distilling from "
        "the same checkpoint (so the teacher is read too), FULL_SHARD, 2 batches, one sharded checkpoint. "
        "Peak RSS (`VmHWM`) of each rank's process: at start-up (imports, reading the source and teacher, "
        "FSDP wrapping, the broadcast; the trainer built) and, with the peak reset, over the training that "
        "follows (on CPU the optimizer state, gradients and gathered blocks live in host memory too; on GPUs "
        "they do not, and the start-up figure is the host's).",
        "",
        "| ranks | model.init_device | start-up peak per rank (MiB) | sum | training peak per rank (MiB) | sum |",
        "|---|---|---|---|---|---|",
    ]
    for ranks, mode, startup, training in rows:
        lines.append(
            f"| {ranks} | {mode} | {_mib(startup)} | {sum(startup) / mib:.0f} | {_mib(training)} | "
            f"{sum(training) / mib:.0f} |"
        )
    out = REPO / "bench" / "results" / f"host-memory-{today}-cpu.md"
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
