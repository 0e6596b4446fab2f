"""The GPU path on one GPU: pruning recipes through the Composer Trainer under FSDP1 and FSDP2, end to end,
with rank-0 loading, against the planner's memory estimate.

For the tiny test recipe (``yamls/tiny/prune.yaml`` on a 4-layer 256d source) and the SmolLM2 demo
recipe (``yamls/pruning/smollm2-135m-demo.yaml`` on a random source of SmolLM2-135M's shape) it
writes a random source checkpoint and synthetic two-domain MDS data, then runs, each time with
``FSDP_VERSION=<v> python -m composer.cli.launcher -n 1 llmshearing/train.py`` with
``model.init_device=mixed`` (rank-0 loading: rank 0 reads the source; with one rank that is the one
process), ``FULL_SHARD``, DEFAULT mixed precision (bf16 autocast), non-reentrant activation
checkpointing per block and sharded checkpoints; ``--fsdp-versions`` (default ``1 2``) names the FSDP
versions: every step runs under the first, step 1 again under each other:

1. a few steps with ``attn_impl=auto`` (flash-attn where it imports), a sharded checkpoint halfway
   and at the end: tokens/s, MFU, peak memory and the start-up lines; again as ``fsdp2`` under FSDP2;
2. the same with ``attn_impl=sdpa`` (flash-attn off), when flash-attn imports;
3. the same run interrupted one step after its halfway checkpoint, then resumed with
   ``autoresume=true``: its final weights against run 1's (bit-identical or the largest difference);
4. ``llmshearing prune-model`` on run 1's sharded checkpoint: the folded shape against the target;
5. SmolLM2 only: the recipe as shipped, with distillation from the source (the teacher's time share);
6. ``bench/mfu.py``'s training step with torch alone on the same shape, batch and masks, with and
   without the same activation checkpointing: Trainer tokens/s over torch-alone tokens/s.

Every run that finishes is also planned: ``llmshearing plan RECIPE <the run's overrides> --gpus 1 --json``
(the planner's Python API, :func:`planned`, under the run's ``FSDP_VERSION``, for the GPU's memory); its
largest per-rank stage (training step or evaluation) stands beside the run's measured peak (Composer's
``memory/peak_allocated_mem``) with the relative error (plan - measured) / measured.

The result goes to ``bench/results/fsdp-gpu-<date>-<gpu>.md`` (and ``.json``; per run: ``fsdp_version``,
``peak_gb``, ``plan_gb``, ``plan_stages_gb``, ``plan_error``); the last line is
``RESULT fsdp_gpu ratio=<lowest Trainer / torch-alone ratio> target=>=0.90 plan_error=<largest in size>``.

    python bench/fsdp_gpu.py                      # both recipes, FSDP1 and FSDP2 (needs a CUDA GPU)
    python bench/fsdp_gpu.py --recipes tiny       # the tiny recipe only
    python bench/fsdp_gpu.py --fsdp-versions 2    # FSDP2 only
    python bench/fsdp_gpu.py --cpu-check          # steps 1, 3 and 4 of the tiny recipe under FSDP2 on CPU

``--cpu-check`` runs the version loop with FSDP2 alone (Composer's FSDP1 needs GPUs) and plans every run
for the host's memory, but a CPU run has no GPU peak to compare: its table shows the plan and ``n/a`` as
the error (the planner's CPU figures are validated against measured steps in
``tests/planning/test_plan*.py``).

Without a CUDA device (and without ``--cpu-check``) it says so and prints ``RESULT fsdp_gpu
skipped=no GPU``. Not measurable on one GPU: sharding across ranks, HYBRID_SHARD, inter-node traffic.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

TINY = dict(
    vocab_size=512, d_model=256, n_layers=4, n_heads=8, n_kv_heads=4, head_dim=32, intermediate_size=688
)
TINY_TARGET = dict(n_layers=3, n_heads=4, n_kv_heads=4, d_model=192, intermediate_size=512)
SMOLLM2 = dict(
    vocab_size=49152,
    d_model=576,
    n_layers=30,
    n_heads=9,
    n_kv_heads=3,
    head_dim=64,
    intermediate_size=1536,
    tie_word_embeddings=True,
    rope_theta=100000.0,
)
RECIPES: dict[str, dict[str, Any]] = {
    "tiny": {
        "yaml": "yamls/tiny/prune.yaml",
        "source": TINY,
        "domains": ["alpha", "beta"],
        "overrides": [f"model.l0_module.target_model={json.dumps(TINY_TARGET)}"],
        "distillation": False,
    },
    "smollm2": {
        "yaml": "yamls/pruning/smollm2-135m-demo.yaml",
        "source": SMOLLM2,
        "domains": ["code", "docs"],
        "overrides": ["save_num_checkpoints_to_keep=-1"],
        "distillation": True,  # the recipe distils from its source: run 5 keeps it, runs 1-3 drop it
    },
}
FSDP = {
    "sharding_strategy": "FULL_SHARD",
    "mixed_precision": "DEFAULT",
    "activation_checkpointing": True,
    "state_dict_type": "sharded",
}
TARGET_RATIO = 0.90
STOPPED = 3  # exit code of an interrupted run


class GPUCheckError(RuntimeError):
    """A step of the check failed; the message says which and shows the end of its output."""


# ----------------------------------------------------------------------------------------- inputs
def write_inputs(root: Path, source: dict[str, Any], domains: list[str], seq_len: int, samples: int):
    """A random source checkpoint and two domains of random tokens in the layout prepare-data writes."""
    import numpy as np
    import torch

    from llmshearing.checkpoint.format import save_checkpoint
    from llmshearing.data.layout import write_token_root
    from llmshearing.models.config import ModelConfig
    from llmshearing.models.decoder import Decoder

    config = ModelConfig(**source, max_seq_len=seq_len)
    torch.manual_seed(0)
    decoder = Decoder(config)
    decoder.init_weights()
    checkpoint = save_checkpoint(root / "source", config, decoder.state_dict(), progress=False)
    rng = np.random.default_rng(0)
    rows = {
        split: {d: [rng.integers(0, config.vocab_size, seq_len) for _ in range(count)] for d in domains}
        for split, count in (("train", samples), ("eval", 16))
    }
    write_token_root(root / "mds", rows, vocab_size=config.vocab_size)
    return config, checkpoint, root / "mds"


def overrides(
    spec: dict[str, Any], args: argparse.Namespace, checkpoint: Path, data: Path, run: Path, **extra
):
    """The recipe's key=value overrides for one run (``extra``: attn_impl, autoresume, distillation)."""
    return [
        f"model.path={checkpoint}",
        f"data_local={data}",
        f"save_folder={run}",
        *spec["overrides"],
        f"max_seq_len={args.seq_len}",
        f"max_duration={args.steps}ba",
        f"eval_interval={args.steps}ba",
        "eval_subset_num_batches=1",
        f"global_train_batch_size={args.batch_size}",
        f"device_train_microbatch_size={args.batch_size}",
        "device_eval_batch_size=2",
        f"precision={'fp32' if args.cpu_check else 'amp_bf16'}",
        f"model.attn_impl={extra.get('attn_impl', 'auto')}",
        "model.init_device=mixed",  # rank-0 loading: rank 0 reads the source, the others build on meta
        f"fsdp_config={json.dumps(FSDP)}",
        "callbacks.speed_monitor={window_size: 2}",
        *([] if args.cpu_check else ["callbacks.memory_monitor={}"]),
        f"save_interval={args.steps // 2}ba",
        f"autoresume={'true' if extra.get('autoresume') else 'false'}",
        *(
            []
            if extra.get("distillation", False) or not spec["distillation"]
            else ["model.distillation=null"]
        ),
        "progress_bar=false",
    ]


# ------------------------------------------------------------------------------------------ runs
def launch(
    args: argparse.Namespace, recipe: str, run_args: list[str], stop_at: int | None = None, version: int = 1
) -> str:
    """One run through ``FSDP_VERSION=<version> composer -n 1``; its output (the run must exit 0, or 3 when
    ``stop_at`` stops it)."""
    script = (
        [str(Path(__file__).resolve()), "--train-until", str(stop_at)]
        if stop_at
        else [str(REPO / "llmshearing" / "train.py")]
    )
    args.port += 1  # a fresh rendezvous port for every run
    command = [
        sys.executable,
        "-m",
        "composer.cli.launcher",
        "-n",
        "1",
        "--master_port",
        str(args.port),
        *script,
    ]
    env = {**os.environ, "FSDP_VERSION": str(version), "PYTHONUNBUFFERED": "1"}
    started = time.perf_counter()
    proc = subprocess.run(
        [*command, str(REPO / recipe), *run_args], capture_output=True, text=True, env=env, cwd=REPO
    )
    output = proc.stdout + proc.stderr
    expected = STOPPED if stop_at else 0
    if proc.returncode != expected:
        raise GPUCheckError(
            f"exit {proc.returncode} (expected {expected}) after {time.perf_counter() - started:.0f} s:\n{output[-4000:]}"
        )
    return output


def metrics(run: Path, flops_per_token: int, seq_len: int, peak: float | None) -> dict[str, Any]:
    """Tokens/s (median over the second half of the steps), MFU and peak memory from ``metrics.jsonl``."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]

    def values(name: str) -> list[float]:
        return [r[name] for r in rows if name in r]

    tokens = values("throughput/tokens_per_sec")
    tps = statistics.median(tokens[len(tokens) // 2 :]) if tokens else float("nan")
    share = values("distill/teacher_time_share")
    return {
        "tokens_per_sec": tps,
        "mfu": tps * flops_per_token / peak if peak else None,
        "peak_gb": max(values("memory/peak_allocated_mem"), default=None),
        "teacher_time_share": statistics.median(share) if share else None,
    }


def announced(output: str) -> list[str]:
    return [line.strip() for line in output.splitlines() if line.strip().startswith("llmshearing:")]


def planned(recipe: str, run_args: list[str], version: int, device_memory: int) -> dict[str, Any]:
    """``llmshearing plan RECIPE run_args --gpus 1 --gpus-per-node 1 --json`` for one run (the planner's
    Python API as the command calls it, under the run's ``FSDP_VERSION``): the per-rank estimate of every
    stage (bytes) and the largest, which a run's peak is compared with."""
    from llmshearing.planning.commands import plan_json, read_run
    from llmshearing.planning.plan import Hardware, make_plan

    before = os.environ.get("FSDP_VERSION")
    os.environ["FSDP_VERSION"] = str(version)
    try:
        shape, sources = read_run(str(REPO / recipe), run_args, 1, None, None)
    finally:
        if before is None:
            os.environ.pop("FSDP_VERSION", None)
        else:
            os.environ["FSDP_VERSION"] = before
    plan = plan_json(
        make_plan(shape, Hardware(gpus=1, gpu_memory=device_memory, gpus_per_node=1)), recipe, sources
    )
    stages = {stage["name"]: stage["bytes"] for stage in plan["stages"]}
    return {"stages": stages, "bytes": max(stages.values()), "fits": plan["fits"]}


def plan_error(measured_gb: float | None, plan_bytes: int | None) -> float | None:
    """The planner's relative error against a measured peak (Composer's ``peak_allocated_mem``, in GB of
    1e9 bytes): (plan - measured) / measured, positive when the plan is above; None without a measurement."""
    if not measured_gb or plan_bytes is None:
        return None
    return (plan_bytes - measured_gb * 1e9) / (measured_gb * 1e9)


def compare_weights(a: Path, b: Path) -> dict[str, Any]:
    """Every tensor of two runs' final checkpoints: identical, or the largest absolute difference."""
    import torch

    from llmshearing.checkpoint.reading import open_checkpoint

    with (
        open_checkpoint(a / "checkpoints" / "latest-rank0.pt") as x,
        open_checkpoint(b / "checkpoints" / "latest-rank0.pt") as y,
    ):
        if set(x.tensors.keys()) != set(y.tensors.keys()):
            return {"identical": False, "max_abs_diff": None, "tensors": 0, "note": "different keys"}
        worst, same = 0.0, True
        for key in x.tensors.keys():
            u, v = x.tensors.get(key), y.tensors.get(key)
            if not torch.equal(u, v):
                same = False
                worst = max(worst, (u.double() - v.double()).abs().max().item())
        return {"identical": same, "max_abs_diff": worst, "tensors": len(list(x.tensors.keys()))}


def prune_model(run: Path, out: Path, target: dict[str, int]) -> dict[str, Any]:
    """``llmshearing prune-model`` on the run's sharded checkpoint; the folded shape against the target."""
    from llmshearing.checkpoint.reading import open_checkpoint
    from llmshearing.checkpoint.sharded import is_sharded_checkpoint
    from llmshearing.cli import main as cli_main

    checkpoint = run / "checkpoints" / "latest-rank0.pt"
    sharded = is_sharded_checkpoint(checkpoint.resolve())
    started = time.perf_counter()
    code = cli_main(["prune-model", str(checkpoint), str(out)])
    if code != 0:
        raise GPUCheckError(f"prune-model {checkpoint} exited {code}")
    with open_checkpoint(out) as folded:
        shape = {key: getattr(folded.config, key) for key in target}
    return {
        "sharded": sharded,
        "shape": shape,
        "matches_target": shape == target,
        "seconds": time.perf_counter() - started,
    }


def torch_alone(config: Any, spec: dict[str, Any], args: argparse.Namespace, checkpoint: bool) -> float:
    """Tokens/s of ``bench/mfu.py``'s pruning step (masked source, bf16 autocast, fused AdamW)."""
    import torch
    from mfu import build, step_seconds
    from omegaconf import OmegaConf

    l0 = OmegaConf.to_container(OmegaConf.load(REPO / spec["yaml"]).model.l0_module)
    l0 = {k: v for k, v in l0.items() if k not in ("init_from", "init_samples")}
    if spec is RECIPES["tiny"]:
        l0["target_model"] = TINY_TARGET
    model, module, optimizer = build(config, prune=True, l0_settings=l0, checkpoint=checkpoint)
    ids = torch.randint(0, config.vocab_size, (args.batch_size, args.seq_len), device="cuda")
    seconds = statistics.median(
        step_seconds(model, module, optimizer, {"input_ids": ids}, max(4, args.steps // 2))
    )
    del model, module, optimizer
    torch.cuda.empty_cache()
    return ids.numel() / seconds


def check_recipe(
    name: str, args: argparse.Namespace, root: Path, peak: float | None, flash: bool, memory: int
) -> dict[str, Any]:
    spec = RECIPES[name]
    config, checkpoint, data = write_inputs(
        root, spec["source"], spec["domains"], args.seq_len, samples=args.batch_size * args.steps
    )
    from omegaconf import OmegaConf

    target = (
        TINY_TARGET
        if name == "tiny"
        else dict(OmegaConf.load(REPO / spec["yaml"]).model.l0_module.target_model)
    )
    flops = config.train_flops_per_token(args.seq_len)  # pruning is charged the source's FLOPs
    result: dict[str, Any] = {"recipe": spec["yaml"], "source": spec["source"], "target": target, "runs": {}}

    first, *others = args.fsdp_versions

    def train(label: str, stop_at: int | None = None, version: int = first, **extra) -> Path:
        run = root / label
        run_args = overrides(spec, args, checkpoint, data, run, **extra)
        output = launch(args, spec["yaml"], run_args, stop_at, version)
        if stop_at is None:
            cost = flops + (
                config.train_flops_per_token(args.seq_len) // 3 if extra.get("distillation") else 0
            )
            measured = metrics(run, cost, args.seq_len, peak)
            plan = planned(spec["yaml"], run_args, version, memory)
            result["runs"][label] = {
                **measured,
                "fsdp_version": version,
                "plan_gb": plan["bytes"] / 1e9,
                "plan_stages_gb": {k: v / 1e9 for k, v in plan["stages"].items()},
                "plan_error": plan_error(measured["peak_gb"], plan["bytes"]),
                "announced": announced(output),
            }
        print(f"{name} {label}: done", flush=True)
        return run

    straight = train("auto")
    for version in others:  # the same run under each other FSDP version
        train(f"fsdp{version}", version=version)
    if flash:
        train("sdpa", attn_impl="sdpa")
    interrupted = train("resumed", stop_at=args.steps // 2 + 1, autoresume=True)
    train("resumed", autoresume=True)
    result["resume"] = compare_weights(straight, interrupted)
    result["prune_model"] = prune_model(straight, root / "pruned", target)
    if spec["distillation"] and not args.cpu_check:
        train("distillation", distillation=True)
    if not args.cpu_check:
        result["torch_alone"] = {
            "checkpointed_tokens_per_sec": torch_alone(config, spec, args, checkpoint=True),
            "plain_tokens_per_sec": torch_alone(config, spec, args, checkpoint=False),
        }
        alone = result["torch_alone"]
        for key in ("checkpointed", "plain"):
            alone[f"{key}_mfu"] = alone[f"{key}_tokens_per_sec"] * flops / peak if peak else None
        result["ratio"] = result["runs"]["auto"]["tokens_per_sec"] / alone["checkpointed_tokens_per_sec"]
    return result


# ------------------------------------------------------------------------------------------ report
def _fmt(value: Any, spec: str = ".3f") -> str:
    return "-" if value is None else format(value, spec)


def report(env: dict[str, Any], results: dict[str, Any]) -> str:
    lines = [
        f"# The GPU path on one GPU (`bench/fsdp_gpu.py`), {env['date']}",
        "",
        f"- machine: {env['device']}; torch {env['torch']}, Composer {env['composer']}, Python {env['python']}",
        f"- flash-attn: {env['flash_attn']}",
        f"- every run: `composer -n 1`, `model.init_device=mixed` (rank-0 loading), {json.dumps(FSDP)}, "
        f"precision {env['precision']}, batch {env['batch_size']} x {env['seq_len']}, {env['steps']} steps, "
        f"a sharded checkpoint every {env['steps'] // 2}; every step under FSDP{env['fsdp_versions'][0]}"
        + "".join(f", run 1 again under FSDP{v} (`fsdp{v}`)" for v in env["fsdp_versions"][1:]),
        f"- MFU: source-model FLOPs (`ModelConfig.train_flops_per_token`) over a peak of {_fmt(env['peak_tflops'], '.0f')} TFLOP/s",
        "- plan: `llmshearing plan RECIPE <the run's overrides> --gpus 1 --json`'s largest per-rank stage "
        f"(training step or evaluation) for {env['plan_memory_gb']:.0f} GB; error = (plan - measured peak) / "
        "measured peak, the peak being Composer's `memory/peak_allocated_mem`"
        + (
            ""
            if env["device"] != "CPU"
            else " (n/a on CPU: no GPU peak is measured, the plan is shown alone)"
        ),
        "",
    ]
    for name, result in results.items():
        lines += [f"## {name} (`{result.get('recipe', '')}`)", ""]
        if "error" in result:
            lines += ["FAILED:", "", "```", result["error"][-3000:], "```", ""]
            continue
        lines += [
            "| run | FSDP | tokens/s | MFU | peak GB | plan GB | plan error | teacher time share |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for label, run in result["runs"].items():
            error = run.get("plan_error")
            lines.append(
                f"| {label} | {run.get('fsdp_version', '-')} | {_fmt(run['tokens_per_sec'], ',.0f')} | "
                f"{_fmt(run['mfu'], '.1%')} | {_fmt(run['peak_gb'], '.2f')} | {_fmt(run.get('plan_gb'), '.2f')} | "
                f"{'n/a' if error is None else format(error, '+.0%')} | {_fmt(run['teacher_time_share'], '.2f')} |"
            )
        resume, fold = result["resume"], result["prune_model"]
        lines += [
            "",
            "- resumed after an interruption one step past the halfway checkpoint: "
            + (
                "bit-identical final weights"
                if resume["identical"]
                else f"largest difference {resume['max_abs_diff']}"
            )
            + f" ({resume['tensors']} tensors)",
            f"- prune-model on the {'sharded' if fold['sharded'] else 'file'} checkpoint: {fold['shape']} "
            f"({'the target' if fold['matches_target'] else 'NOT the target ' + str(result['target'])}), {fold['seconds']:.1f} s",
        ]
        if "torch_alone" in result:
            alone = result["torch_alone"]
            lines.append(
                f"- torch alone (`bench/mfu.py`'s step): {_fmt(alone['checkpointed_tokens_per_sec'], ',.0f')} tokens/s "
                f"(MFU {_fmt(alone['checkpointed_mfu'], '.1%')}) with the same checkpointing, "
                f"{_fmt(alone['plain_tokens_per_sec'], ',.0f')} ({_fmt(alone['plain_mfu'], '.1%')}) without; "
                f"Trainer / torch alone: {result['ratio']:.2f}"
            )
        lines += [
            "",
            "Start-up lines of the first run:",
            "",
            "```",
            *result["runs"]["auto"]["announced"],
            "```",
            "",
        ]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------ entry points
def train_until(argv: list[str]) -> int:
    """``--train-until N RECIPE key=value ...``: the training entry point, stopped when batch N starts."""
    from composer.core import Callback

    from llmshearing.train import build_trainer, run

    class Stop(Exception):
        pass

    class StopAt(Callback):
        def batch_start(self, state, logger) -> None:
            if int(state.timestamp.batch) == at:
                raise Stop(f"stopped before batch {at + 1}")

    at = int(argv[0])
    trainer, values = build_trainer(argv[1], argv[2:])
    trainer.state.callbacks.append(StopAt())
    try:
        run(trainer, values)
    except Stop as stop:
        print(f"llmshearing-bench: {stop}", flush=True)
        return STOPPED
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--train-until"]:
        return train_until(argv[1:])
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument(
        "--steps", type=int, default=12, help="training steps per run (even, >= 4; default 12)"
    )
    parser.add_argument("--port", type=int, default=29731, help="the launcher's master port")
    parser.add_argument(
        "--out", type=Path, default=None, help="result file (default bench/results/fsdp-gpu-<date>-<gpu>.md)"
    )
    parser.add_argument("--quick", action="store_true", help="the tiny recipe only (make bench --quick)")
    parser.add_argument(
        "--cpu-check", action="store_true", help="the tiny recipe under FSDP2 on CPU, fp32, no timings"
    )
    parser.add_argument(
        "--fsdp-versions",
        type=int,
        nargs="+",
        choices=(1, 2),
        default=None,
        help="FSDP_VERSION of the runs: every step under the first, run 1 again under each other "
        "(default 1 2 on a GPU; 2 with --cpu-check, where Composer has no FSDP1)",
    )
    args = parser.parse_args(argv)
    if args.steps < 4 or args.steps % 2:
        parser.error("--steps must be even and at least 4 (a checkpoint halfway, an interruption after it)")
    if args.fsdp_versions is None:
        args.fsdp_versions = [2] if args.cpu_check else [1, 2]
    args.fsdp_versions = list(dict.fromkeys(args.fsdp_versions))
    if args.cpu_check and args.fsdp_versions != [2]:
        parser.error("--cpu-check runs FSDP2 only (Composer's FSDP1 needs GPUs): --fsdp-versions 2")

    import torch

    if args.quick:
        args.recipes = ["tiny"]
    if args.cpu_check:
        args.recipes, args.seq_len, args.batch_size, args.steps = ["tiny"], 64, 2, 8
    elif not torch.cuda.is_available():
        print(
            "fsdp_gpu: no CUDA device here; this check runs FSDP1 and FSDP2 through the Composer Trainer on one GPU "
            "(run it on a GPU machine; --cpu-check runs its pipeline under FSDP2 on this CPU)"
        )
        print("RESULT fsdp_gpu skipped=no GPU")
        return 0
    import composer
    from mfu import peak_flops

    from llmshearing.models.decoder import import_flash_attn

    kernel, why = import_flash_attn()
    flash = kernel is not None and not args.cpu_check
    device = "CPU" if args.cpu_check else torch.cuda.get_device_name()
    peak = None if args.cpu_check else peak_flops(device)
    if args.cpu_check:  # the plan of a CPU rank: the host's memory stands for the device's
        from llmshearing.planning.preflight import host_memory_bytes

        memory = host_memory_bytes()
    else:
        memory = torch.cuda.get_device_properties(0).total_memory
    env = {
        "date": time.strftime("%Y-%m-%d"),
        "device": device,
        "torch": torch.__version__,
        "composer": composer.__version__,
        "python": platform.python_version(),
        "flash_attn": "imports (runs auto = flash and sdpa)" if flash else f"not used ({why or 'CPU check'})",
        "peak_tflops": peak / 1e12 if peak else None,
        "fsdp_versions": args.fsdp_versions,
        "plan_memory_gb": memory / 1e9,
        "precision": "fp32" if args.cpu_check else "amp_bf16",
        **{key: getattr(args, key) for key in ("seq_len", "batch_size", "steps")},
    }
    print(f"device: {device}; torch {torch.__version__}; flash-attn: {env['flash_attn']}", flush=True)
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.recipes:
            try:
                results[name] = check_recipe(name, args, Path(tmp) / name, peak, flash, memory)
            except GPUCheckError as err:
                results[name] = {"recipe": RECIPES[name]["yaml"], "error": str(err)}
                print(f"{name}: FAILED {err}", flush=True)
            except Exception:  # recorded in the result file with its traceback; the other recipe still runs
                results[name] = {"recipe": RECIPES[name]["yaml"], "error": traceback.format_exc()}
                print(f"{name}: FAILED\n{results[name]['error']}", flush=True)
    text = report(env, results)
    print(text)
    ok = all("error" not in r for r in results.values())
    if args.cpu_check:
        checks = all(
            r["resume"]["identical"] and r["prune_model"]["matches_target"]
            for r in results.values()
            if "error" not in r
        )
        print(f"RESULT fsdp_gpu skipped=cpu check {'passed' if ok and checks else 'FAILED'}")
        return 0 if ok and checks else 1
    slug = "".join(c if c.isalnum() else "-" for c in device.lower().replace("nvidia", "")).strip("-")
    out = args.out or REPO / "bench" / "results" / f"fsdp-gpu-{env['date']}-{slug}.md"
    out.write_text(text)
    out.with_suffix(".json").write_text(json.dumps({"env": env, "results": results}, indent=1, default=str))
    print(f"written: {out}")
    ratios = [r["ratio"] for r in results.values() if "ratio" in r]
    if not ok or not ratios:
        print("RESULT fsdp_gpu skipped=a step failed (see the result file)")
        return 1
    errors = [
        run["plan_error"]
        for r in results.values()
        for run in r["runs"].values()
        if run.get("plan_error") is not None
    ]
    worst = f" plan_error={max(errors, key=abs):+.0%}" if errors else ""
    print(f"RESULT fsdp_gpu ratio={min(ratios):.2f} target=>={TARGET_RATIO:.2f}{worst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
