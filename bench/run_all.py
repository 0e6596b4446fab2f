"""Run every ratio benchmark and print one table (``make bench``).

Each benchmark measures the project against a baseline in the same process (interleaved repeats,
median) and ends with a line ``RESULT <name> ratio=<x> target=<op><y>``; this script collects those
lines. ``--quick`` passes ``--quick`` to every benchmark for a short run.
"""

from __future__ import annotations

import argparse
import operator
import re
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHMARKS = (
    ("model_step.py", "project decoder fwd+bwd / transformers LlamaForCausalLM"),
    ("mask_overhead.py", "pruning step (masks + penalty) / dense step"),
    ("loader.py", "dynamic dataset samples/s / plain StreamingDataset"),
    ("prepare.py", "prepare_mds tokens/s / tokenizer alone"),
    ("mfu.py", "model FLOPs utilisation on GPU (skipped without one)"),
    ("fold_memory.py", "prune-model peak memory / model bytes (sharded and .pt checkpoints)"),
    ("fsdp_gpu.py", "Trainer FSDP1/FSDP2 tokens/s / torch-alone step on GPU (skipped without one)"),
)
RESULT = re.compile(r"^RESULT (\S+) (?:ratio=(\S+) target=(>=|<=)(\S+)|skipped(?:=(.*))?)")
OPS = {">=": operator.ge, "<=": operator.le}


def run_one(script: str, quick: bool) -> tuple[str, str, str, str, float]:
    command = [sys.executable, str(HERE / script)] + (["--quick"] if quick else [])
    start = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    sys.stdout.write(proc.stdout)
    if proc.returncode != 0:
        sys.stdout.write(proc.stderr[-3000:])
        return script, "error", "-", f"exit {proc.returncode}", seconds
    for line in reversed(proc.stdout.splitlines()):
        match = RESULT.match(line.strip())
        if match:
            name, ratio, op, target, reason = match.groups()
            if ratio is None:
                return name, "skipped", "-", reason or "", seconds
            ok = OPS[op](float(ratio), float(target))
            return name, f"{float(ratio):.3f}", f"{op}{target}", "met" if ok else "MISSED", seconds
    return script, "no RESULT line", "-", "", seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="short runs (about a minute each)")
    parser.add_argument("--only", nargs="*", default=None, help="benchmark scripts to run (default: all)")
    args = parser.parse_args()
    rows = []
    for script, what in BENCHMARKS:
        if args.only and script not in args.only:
            continue
        if not (HERE / script).is_file():
            rows.append((script, "missing", "-", "", 0.0, what))
            continue
        print(f"\n### {script}: {what}", flush=True)
        rows.append((*run_one(script, args.quick), what))
    print("\n| benchmark | ratio (median) | target | status | wall s | what |")
    print("|---|---|---|---|---|---|")
    for name, ratio, target, status, seconds, what in rows:
        print(f"| {name} | {ratio} | {target} | {status} | {seconds:.0f} | {what} |")
    return 1 if any(r[1] in ("error", "no RESULT line") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
