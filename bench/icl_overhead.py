"""What in-training downstream evaluation (``eval_tasks``) adds to a pruning run's wall time.

The demo's pruning recipe (SmolLM2-135M, ``yamls/pruning/smollm2-135m-demo.yaml``: L0 masks, dynamic batch
loading, distillation, an evaluation every 8 batches and one before training) runs ``--steps`` batches twice
on the demo's data, without and with the shipped tasks ``local_mc`` and ``local_cloze`` (0-shot, all 24
examples each) scored at every evaluation. Reported: each run's wall time (process start to exit), the
seconds the scoring took (``wall_clock/icl``), and the ratio (target: <= 1.10). The order alternates over
``--repeats`` pairs, so a machine that gets busier or quieter over time favours neither.

    .venv/bin/python bench/icl_overhead.py                # 16 batches: evaluations at 0, 8 and 16
    .venv/bin/python bench/icl_overhead.py --repeats 2

Results: ``bench/results/icl-overhead-<date>.md`` (an earlier record is never overwritten).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from llmshearing.data.stdlib_corpus import build_corpus
from llmshearing.hf.gguf import smollm2_gguf
from llmshearing.io.staging import write_text_atomic
from llmshearing.training.recipes import EVAL_SEQS, PRUNE_RECIPE, REPO, SEQ_LEN

TASKS = "[{task: local_mc}, {task: local_cloze}]"


def prepare(work: Path) -> tuple[Path, Path]:
    """The converted source and the demo's MDS data, built once into ``work`` (reused afterwards)."""
    python = sys.executable
    raw, source, mds = work / "raw", work / "source", work / "mds"
    if not raw.is_dir():
        build_corpus(raw)
    if not (source / "config.json").is_file():
        command = [python, "-m", "llmshearing.cli", "convert", "hf-to-composer", smollm2_gguf(), source]
        subprocess.run([str(c) for c in command], check=True, cwd=REPO)
    if not (mds / "manifest.json").is_file():
        command = [python, REPO / "data_prep" / "prepare_mds.py", "--input", raw, "--output", mds]
        command += ["--tokenizer", source, "--seq-len", SEQ_LEN, "--eval-seqs", EVAL_SEQS, "--workers", 2]
        subprocess.run([str(c) for c in command], check=True, cwd=REPO)
    return source, mds


def run(work: Path, source: Path, mds: Path, steps: int, tasks: bool, tag: str) -> dict[str, float]:
    """One pruning run; its wall time, Composer's train and eval seconds and the scoring's seconds."""
    folder = work / f"run-{tag}"
    shutil.rmtree(folder, ignore_errors=True)
    command = [sys.executable, "-m", "llmshearing.train", str(PRUNE_RECIPE), f"data_local={mds}"]
    command += [
        f"model.path={source}",
        f"save_folder={folder}",
        f"max_duration={steps}ba",
        "progress_bar=false",
    ]
    command += ["autoresume=false", f"save_interval={steps}ba"]
    if tasks:
        command.append(f"eval_tasks={TASKS}")
    started = time.perf_counter()
    subprocess.run(command, check=True, cwd=REPO)
    wall = time.perf_counter() - started
    icl, train, evaluation = 0.0, 0.0, 0.0
    for line in (folder / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        icl += record.get("wall_clock/icl", 0.0)
        # Composer's timers, in hours, logged at the end of each batch (the last evaluation is not in them)
        train = 3600 * record.get("time/train", train / 3600)
        evaluation = 3600 * record.get("time/val", evaluation / 3600)
    shutil.rmtree(folder / "checkpoints", ignore_errors=True)  # 1.6 GB each
    return {"wall": wall, "icl": icl, "train": train, "eval": evaluation}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=16, help="batches per run (default 16: 3 evaluations)")
    parser.add_argument("--repeats", type=int, default=1, help="pairs of runs, order alternating (default 1)")
    parser.add_argument("--out", default=".cache/bench-icl", help="working directory")
    parser.add_argument("--results", default=str(REPO / "bench" / "results"), help="where the markdown goes")
    args = parser.parse_args(argv)
    work = Path(args.out).resolve()
    work.mkdir(parents=True, exist_ok=True)
    source, mds = prepare(work)
    load = os.getloadavg()
    rows: list[tuple[str, dict[str, float]]] = []
    for repeat in range(args.repeats):
        order = (False, True) if repeat % 2 == 0 else (True, False)
        for tasks in order:
            name = "with eval_tasks" if tasks else "without"
            rows.append((name, run(work, source, mds, args.steps, tasks, f"{repeat}-{int(tasks)}")))
            print(f"{name}: {rows[-1][1]}", flush=True)
    base = sum(r["wall"] for n, r in rows if n == "without") / args.repeats
    scored = sum(r["wall"] for n, r in rows if n != "without") / args.repeats
    icl = sum(r["icl"] for n, r in rows if n != "without") / args.repeats
    ratio = scored / base
    command = "python bench/icl_overhead.py" + "".join(
        f" {a}" for a in (sys.argv[1:] if argv is None else argv)
    )
    lines = [
        f"# In-training downstream evaluation overhead ({datetime.date.today().isoformat()})",
        "",
        f"- command: `{command}`",
        f"- recipe: `{PRUNE_RECIPE.relative_to(REPO)}` (SmolLM2-135M, L0 pruning with dynamic loading and "
        f"distillation), max_duration={args.steps}ba, eval_interval 8ba and eval_first (evaluations at 0, 8, 16)",
        f"- eval_tasks: `{TASKS}` (0-shot, 24 examples each), batch size = device_eval_batch_size (8)",
        f"- machine: {os.cpu_count()} CPU cores (shared with other work while measured), fp32; load average "
        f"(1, 5, 15 min) {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} at the start, "
        f"{os.getloadavg()[0]:.2f} / {os.getloadavg()[1]:.2f} / {os.getloadavg()[2]:.2f} at the end",
        "",
        "| run | wall s | Composer train s | Composer eval s (to the last batch) | eval_tasks scoring s |",
        "|---|---|---|---|---|",
    ]
    for name, r in rows:
        lines.append(f"| {name} | {r['wall']:.1f} | {r['train']:.1f} | {r['eval']:.1f} | {r['icl']:.1f} |")
    lines += [
        "",
        f"RESULT icl_overhead ratio={ratio:.3f} (target <= 1.10); scoring {icl:.1f} s of {scored:.1f} s "
        f"({icl / scored:.1%}) per run with eval_tasks",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    results = Path(args.results)
    path = results / f"icl-overhead-{datetime.date.today().isoformat()}.md"
    repeat = 1
    while path.exists():
        repeat += 1
        path = results / f"icl-overhead-{datetime.date.today().isoformat()}-{repeat}.md"
    write_text_atomic(path, text)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
