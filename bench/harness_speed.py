"""Speed of `llmshearing evaluate --tasks` against lm-eval's own `--model hf` on the same model and tasks.

Both arms run in this process, alternately, on the same HF directory (fp32) and tasks, each from its start:
lm-eval: ``HFLM(pretrained=DIR)`` (transformers' ``from_pretrained``) then ``simple_evaluate``; ours:
``evaluate_tasks(DIR, ...)`` (every check, the in-memory model build, the same ``simple_evaluate``). Both use a
TaskManager over the same task folder only (lm-eval's CLI would also index its ~15,000 tasks). The best time of
each arm over ``--repeats`` rounds gives the ratio; the scores of both arms must be equal.

    .venv/bin/python bench/harness_speed.py                  # SmolLM2-135M from the demo's GGUF, the shipped tasks
    .venv/bin/python bench/harness_speed.py --hf DIR --tasks local_mc --repeats 3

Prints ``RESULT harness_speed lm_eval/ours=<ratio> target=>=0.90`` and writes
``bench/results/harness-speed-<date>-<device>.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CACHE = REPO / ".cache" / "bench-harness"


def smollm2_hf_dir() -> Path:
    """SmolLM2-135M (the demo's GGUF) converted once and exported as an fp32 HF directory under .cache/."""
    from llmshearing.cli import main as cli_main
    from llmshearing.hf.gguf import smollm2_gguf

    source, hf = CACHE / "smollm2-source", CACHE / "smollm2-hf-fp32"
    if not (source / "config.json").is_file():
        assert cli_main(["convert", "hf-to-composer", str(smollm2_gguf()), str(source), "--overwrite"]) == 0
    if not (hf / "config.json").is_file():
        assert cli_main(["convert", "composer-to-hf", str(source), str(hf), "--dtype", "fp32"]) == 0
    return hf


def run_lm_eval(
    hf: Path, tasks: list[str], batch_size: int, limit: int | None, device: str
) -> tuple[float, dict]:
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    from llmshearing.harness.runner import task_manager

    start = time.perf_counter()
    manager = task_manager([], tasks)
    lm = HFLM(pretrained=str(hf), dtype="float32", batch_size=batch_size, device=device)
    results = simple_evaluate(model=lm, tasks=tasks, limit=limit, task_manager=manager, log_samples=False)
    return time.perf_counter() - start, results["results"]


def run_ours(
    hf: Path, tasks: list[str], batch_size: int, limit: int | None, device: str
) -> tuple[float, dict]:
    from llmshearing.harness.runner import evaluate_tasks

    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        results = evaluate_tasks(
            str(hf), ",".join(tasks), limit=limit, batch_size=str(batch_size), device=device, dtype="fp32"
        )
    return time.perf_counter() - start, results["results"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hf", default=None, help="HF model directory (default: SmolLM2-135M, fp32)")
    parser.add_argument("--tasks", default="local_mc,local_cloze")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-record", action="store_true", help="print only; write no results file")
    args = parser.parse_args(argv)

    from llmshearing.harness.runner import quiet_lm_eval

    quiet_lm_eval()
    hf = Path(args.hf) if args.hf else smollm2_hf_dir()
    tasks = args.tasks.split(",")
    arms = {"lm_eval": run_lm_eval, "ours": run_ours}
    times: dict[str, list[float]] = {name: [] for name in arms}
    scores: dict[str, dict] = {}
    for round_ in range(args.repeats):
        order = list(arms) if round_ % 2 == 0 else list(reversed(arms))
        for name in order:
            seconds, scores[name] = arms[name](hf, tasks, args.batch_size, args.limit, args.device)
            times[name].append(seconds)
            print(f"round {round_ + 1} {name}: {seconds:.1f} s", file=sys.stderr)
    same = json.dumps(scores["lm_eval"], sort_keys=True, default=str) == json.dumps(
        scores["ours"], sort_keys=True, default=str
    )
    best = {name: min(values) for name, values in times.items()}
    ratio = best["lm_eval"] / best["ours"]
    line = f"RESULT harness_speed lm_eval/ours={ratio:.3f} target=>=0.90"
    print(line)
    print(f"best seconds: lm_eval {best['lm_eval']:.1f}, ours {best['ours']:.1f}; identical scores: {same}")
    if not args.no_record:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "llmshearing", "bench"],
            capture_output=True,
            text=True,
            cwd=REPO,
        )
        day = datetime.date.today().isoformat()
        out = REPO / "bench" / "results" / f"harness-speed-{day}-{args.device.split(':')[0]}.md"
        rows = "\n".join(
            f"| {name} | {' / '.join(f'{t:.1f}' for t in values)} | {best[name]:.1f} |"
            for name, values in times.items()
        )
        metrics = "\n".join(
            f"| {task} | {key} | {value} |"
            for task, row in sorted(scores["ours"].items())
            for key, value in row.items()
            if "," in key and isinstance(value, float)
        )
        out.write_text(
            f"# `evaluate --tasks` against lm-eval's `--model hf` ({day})\n\n"
            f"Command: `.venv/bin/python bench/harness_speed.py {' '.join(argv or sys.argv[1:])}`\n"
            f"Machine: {platform.processor() or platform.machine()}, device {args.device}; commit "
            f"{commit.stdout.strip()}{' (llmshearing/ or bench/ modified)' if dirty.stdout.strip() else ''}\n"
            f"Model: {hf.name} (fp32); tasks {args.tasks}; batch size {args.batch_size}; limit {args.limit}\n\n"
            f"{line}\n\n| arm | seconds per round | best |\n|---|---|---|\n{rows}\n\n"
            f"Scores identical in both arms: {same}\n\n| task | metric | value |\n|---|---|---|\n{metrics}\n"
        )
        print(f"wrote {out.relative_to(REPO)}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
