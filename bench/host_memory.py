"""Peak host memory per rank at start-up and training under FSDP2 on CPU: every rank reads the source
(``model.init_device=cpu``) against rank 0 alone (``model.init_device=mixed``) and against each rank reading
only its own slices of a sharded source (``sharded``: the source written as ``convert hf-to-composer --sharded``
writes it, ``model.dcp/``, with ``model.init_device=mixed``).

A random decoder (default d_model 1024, 8 layers: ~100 M parameters, ~0.4 GB fp32) is saved as a project
checkpoint beside a small token dataset; the tiny continued-pretraining recipe then runs a few batches under
``FSDP_VERSION=2 composer -n N`` (FULL_SHARD, gloo), distilling from the same checkpoint so the teacher is
read too (in the ``sharded`` setting the teacher is the sharded checkpoint as well, and on several ranks each
rank reads its own slices of the teacher as of the student). Each rank records its own peak RSS (``VmHWM``) when it ends, and its RSS
after the imported stack (torch, Composer, streaming, this package: imported by the probe before the trainer
is built, so before any weight is read); the table gives every rank's peak, the peak above that stack, their
sums (what one node holds at worst), each sum over the 1-rank run's (the issue's target: at most 1.3x) and the
model's fp32 bytes. Writes ``bench/results/host-memory-<date>-cpu.md`` (``--out`` to choose).

    python bench/host_memory.py                   # 1 and 2 ranks, every setting
    python bench/host_memory.py --ranks 1 2 4     # 4 ranks too (slow on 2 cores)
    python bench/host_memory.py --settings sharded --ranks 1 2   # one setting
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
SETTINGS = {  # setting: (model.init_device, the source written sharded)
    "cpu": ("cpu", False),
    "mixed": ("mixed", False),
    "sharded": ("mixed", True),
}
TARGET = 1.3  # the bound on the sum over ranks against one process


def current_rss() -> int:
    """This process's resident set now, in bytes (Linux ``VmRSS``)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def import_stack() -> None:
    """Import what building the trainer imports (torch, Composer's trainer, streaming, FSDP, this package's
    training and loading code) so that the RSS measured next is the stack's, before any weight is read."""
    import composer.trainer  # noqa: F401
    import streaming  # noqa: F401
    import torch.distributed.checkpoint  # noqa: F401
    import torch.distributed.fsdp  # noqa: F401

    import llmshearing.checkpoint.loading  # noqa: F401
    import llmshearing.checkpoint.reading  # noqa: F401
    import llmshearing.checkpoint.sharded  # noqa: F401
    import llmshearing.data.loaders  # noqa: F401
    import llmshearing.dynamic_loading.loader  # noqa: F401
    import llmshearing.training.builders  # noqa: F401


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
    rank's peak RSS at start-up (imports, reading, wrapping, broadcast) and over the training that follows,
    and its RSS once the stack is imported, before the trainer is built (nothing read yet)."""
    import_stack()
    from llmshearing.train import build_trainer, run

    stack = current_rss()
    trainer, values = build_trainer(argv[0], argv[1:])
    startup = peak_rss()
    reset_peak()
    run(trainer, values)
    training = peak_rss()
    rank = int(os.environ.get("RANK", "0"))
    record = {"rank": rank, "startup": startup, "training": training, "stack": stack}
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(record))
    return 0


def write_inputs(root: Path, d_model: int, n_layers: int) -> tuple[Path, Path, Path, int]:
    """A random source checkpoint, the same weights as a sharded source (``model.dcp/``, the writer of
    ``convert hf-to-composer --sharded``) and a two-domain token dataset; returns (source, sharded source,
    data, model bytes)."""
    import numpy as np
    import torch

    from llmshearing.checkpoint.format import save_checkpoint, write_project_checkpoint
    from llmshearing.checkpoint.tensor_io import StateDictSource
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
    sharded = root / "source-sharded"
    write_project_checkpoint(
        sharded, config, StateDictSource(decoder.state_dict()), progress=False, sharded=True
    )
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
    return source, sharded, data, nbytes


def launch(
    ranks: int, setting: str, source: Path, data: Path, root: Path, port: int
) -> tuple[list[dict[str, int]], str]:
    """One run; returns every rank's peak RSS (bytes) at start-up and in training, its RSS after the
    imported stack, and the command."""
    mode = SETTINGS[setting][0]
    out = root / f"peaks-{ranks}-{setting}"
    out.mkdir()
    launcher = os.path.join(os.path.dirname(sys.executable), "composer")
    overrides = [
        f"model.path={source}",
        f"data_local={data}",
        f"save_folder={root / f'run-{ranks}-{setting}'}",
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


def summarise(rows: list[dict]) -> list[dict]:
    """Per row: the start-up peak above the stack per rank, the sums, and each sum over one process's (the
    1-rank run of the same setting, else of any setting) for the total and the above-the-stack figures."""
    single = {r["setting"]: r for r in rows if r["ranks"] == 1}
    fallback = next(iter(single.values()), None)
    for row in rows:
        row["above"] = [max(0, s - b) for s, b in zip(row["startup"], row["stack"], strict=True)]
        one = single.get(row["setting"], fallback)
        for key in ("startup", "above", "training"):
            base = sum(one[key]) if one is not None and key in one else 0
            row[f"{key}_ratio"] = sum(row[key]) / base if base else None
    return rows


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--quick", action="store_true", help="d_model 512, 4 layers")
    parser.add_argument("--out", type=Path, default=None, help="the record (default bench/results/...)")
    parser.add_argument("--probe", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe:
        return probe(args.probe[0], args.probe[1:])
    d_model, n_layers = (512, 4) if args.quick else (1024, 8)
    mib = 1 << 20
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        source, sharded, data, nbytes = write_inputs(root, d_model, n_layers)
        print(f"model: d_model {d_model}, {n_layers} layers, {nbytes / mib:.0f} MiB fp32", flush=True)
        port = 29620
        example = ""
        for ranks in args.ranks:
            for setting in args.settings:
                port += 1
                where = sharded if SETTINGS[setting][1] else source
                peaks, command = launch(ranks, setting, where, data, root, port)
                example = example or command
                row = {
                    "ranks": ranks,
                    "setting": setting,
                    **{key: [p[key] for p in peaks] for key in ("startup", "training", "stack")},
                }
                rows.append(row)
                above = [max(0, s - b) for s, b in zip(row["startup"], row["stack"], strict=True)]
                print(
                    f"{ranks} rank(s), {setting}: start-up peak per rank {_mib(row['startup'])} MiB "
                    f"(sum {sum(row['startup']) / mib:.0f}), above the stack {_mib(above)} "
                    f"(sum {sum(above) / mib:.0f}), training peak per rank {_mib(row['training'])} MiB "
                    f"(sum {sum(row['training']) / mib:.0f})",
                    flush=True,
                )
    summarise(rows)
    today = datetime.date.today().isoformat()
    quick = " --quick" if args.quick else ""
    settings = "" if args.settings == list(SETTINGS) else " --settings " + " ".join(args.settings)
    if args.out is not None:
        settings += f" --out {args.out}"
    lines = [
        f"# `bench/host_memory.py`: peak host RSS per rank, every-rank vs rank-0 loading vs sharded source ({today})",
        "",
        f"Command: `.venv/bin/python bench/host_memory.py --ranks {' '.join(map(str, args.ranks))}{settings}{quick}`, "
        "on the 2-core development machine (shared), torch 2.7.0, Composer 0.32.1, FSDP2 on CPU (gloo).",
        f"Each run: `{example}` (with N ranks and each setting): the tiny continued recipe on a "
        f"random source of d_model {d_model}, {n_layers} layers ({nbytes / mib:.0f} MiB fp32), distilling from "
        "the same checkpoint (so the teacher is read too), FULL_SHARD, 2 batches, one sharded checkpoint. "
        "Settings: `cpu` = `model.init_device=cpu` (every rank reads source and teacher); `mixed` = "
        "`model.init_device=mixed` (rank 0 reads them, FSDP broadcasts); `sharded` = the same weights written "
        "as `convert hf-to-composer --sharded` writes them (`model.dcp/`) for `model.path` and the teacher, "
        "`model.init_device=mixed`: on several ranks each rank reads only its own slices of the student and "
        "of the teacher's blocks (the teacher's embeddings, norm and head whole; with one rank the one process "
        "reads the whole `model.dcp/`). "
        "Peak RSS (`VmHWM`) of each rank's process: at start-up (imports, reading the source and teacher, "
        "FSDP wrapping, the broadcast; the trainer built) and, with the peak reset, over the training that "
        "follows (on CPU the optimizer state, gradients and gathered blocks live in host memory too; on GPUs "
        "they do not, and the start-up figure is the host's). 'Above the stack': each rank's start-up peak "
        "minus its RSS (`VmRSS`) measured inside the probe after importing torch, Composer, streaming and this "
        "package's training and loading modules and before the trainer is built (no weight read, no process "
        "group yet). 'x one' is the sum over ranks divided by the same setting's 1-rank figure (target: "
        f"<= {TARGET}x).",
        "",
        "| ranks | setting | stack RSS per rank (MiB) | start-up peak per rank (MiB) | sum | x one | "
        "above the stack per rank (MiB) | sum | x one | training peak per rank (MiB) | sum | x one |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['ranks']} | {row['setting']} | {_mib(row['stack'])} | {_mib(row['startup'])} | "
            f"{sum(row['startup']) / mib:.0f} | {_ratio(row['startup_ratio'])} | {_mib(row['above'])} | "
            f"{sum(row['above']) / mib:.0f} | {_ratio(row['above_ratio'])} | {_mib(row['training'])} | "
            f"{sum(row['training']) / mib:.0f} | {_ratio(row['training_ratio'])} |"
        )
    out = args.out or REPO / "bench" / "results" / f"host-memory-{today}-cpu.md"
    out.write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps({"command": example, "rows": rows}, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
