"""Pruning through the Composer Trainer under FSDP1 and FSDP2 on one GPU, against torch alone.

For each shape (the tiny test model and the ~1.2B Sheared-LLaMA-1.3B source shape of ``bench/mfu.py``)
it writes a random source checkpoint and synthetic two-domain MDS data, runs a short pruning recipe
(bf16 autocast, activation checkpointing per block, dynamic batch loading) with
``composer -n 1 llmshearing/train.py`` under ``FSDP_VERSION=1`` and ``FSDP_VERSION=2``, and reads
tokens/s, MFU and peak memory from the run's ``metrics.jsonl`` (SpeedMonitor, MemoryMonitor). The
baseline is ``bench/mfu.py``'s training step of the same shape, batch and masks with torch alone,
measured in the same process; the target is Trainer / torch-alone throughput >= 0.90.

    python bench/fsdp_gpu.py                 # both shapes, FSDP1 and FSDP2 (needs a CUDA GPU)
    python bench/fsdp_gpu.py --shapes tiny   # the tiny shape only
    python bench/fsdp_gpu.py --cpu-check     # the tiny shape under FSDP2 on CPU: checks the pipeline

flash-attn is used when installed (``pip install -e '.[gpu]'``), else torch SDPA; the output says
which. Not measurable on one GPU: sharding across ranks, HYBRID_SHARD, inter-node traffic.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

TINY = dict(
    vocab_size=512, d_model=256, n_layers=4, n_heads=8, n_kv_heads=4, head_dim=32, intermediate_size=688
)
TINY_TARGET = dict(n_layers=3, n_heads=4, n_kv_heads=4, d_model=192, intermediate_size=512)
TARGET_RATIO = 0.90


def shapes() -> dict[str, tuple[dict[str, int], dict[str, int]]]:
    from mfu import SOURCE, TARGET

    return {"tiny": (TINY, TINY_TARGET), "1b": (SOURCE, TARGET)}


def write_inputs(root: Path, source: dict[str, int], seq_len: int, samples: int) -> tuple[Path, Path]:
    """A random source checkpoint and two domains of random tokens in the layout prepare_mds.py writes."""
    import numpy as np
    import torch

    from llmshearing.convert.checkpoint import save_checkpoint
    from llmshearing.data.layout import write_token_root
    from llmshearing.models.config import ModelConfig
    from llmshearing.models.decoder import Decoder

    config = ModelConfig(**source, max_seq_len=seq_len)
    torch.manual_seed(0)
    decoder = Decoder(config)
    decoder.init_weights()
    checkpoint = save_checkpoint(root / "source", config, decoder.state_dict(), progress=False)
    rng = np.random.default_rng(0)
    samples = {
        split: {
            domain: [rng.integers(0, config.vocab_size, seq_len) for _ in range(count)]
            for domain in ("a", "b")
        }
        for split, count in (("train", samples), ("eval", 16))
    }
    write_token_root(root / "mds", samples, vocab_size=config.vocab_size)
    return checkpoint, root / "mds"


def recipe_overrides(target: dict[str, int], args: argparse.Namespace, run: Path) -> list[str]:
    batch, micro = args.batch_size, args.batch_size
    l0 = {
        "pruning_modules": ["layer", "head", "intermediate", "hidden"],
        "target_model": target,
        "lagrangian_warmup_steps": "2ba",
    }
    fsdp = {"sharding_strategy": "FULL_SHARD", "mixed_precision": "DEFAULT", "activation_checkpointing": True}
    return [
        f"save_folder={run}",
        f"max_seq_len={args.seq_len}",
        f"max_duration={args.steps}ba",
        f"eval_interval={args.steps}ba",
        "eval_subset_num_batches=1",
        f"global_train_batch_size={batch}",
        f"device_train_microbatch_size={micro}",
        "device_eval_batch_size=2",
        f"precision={'fp32' if args.cpu_check else 'amp_bf16'}",
        "model.attn_impl=auto",
        "callbacks.data_loading.set_names=[a,b]",
        f"model.l0_module={json.dumps(l0)}",
        f"fsdp_config={json.dumps(fsdp)}",
        "callbacks.speed_monitor={window_size: 5}",
        "callbacks.memory_monitor={}",
        "save_interval=100000ba",
        "progress_bar=false",
    ]


def run_trainer(version: int, checkpoint: Path, data: Path, target: dict[str, int], args, root: Path) -> dict:
    """One pruning run through the Composer Trainer; throughput and memory from its metrics log."""
    run = root / f"run-fsdp{version}"
    command = [
        str(Path(sys.executable).parent / "composer"),
        "-n",
        "1",
        str(REPO / "llmshearing" / "train.py"),
        str(REPO / "yamls" / "tiny" / "prune.yaml"),
        f"model.path={checkpoint}",
        f"data_local={data}",
        *recipe_overrides(target, args, run),
    ]
    proc = subprocess.run(
        command, capture_output=True, text=True, env={**os.environ, "FSDP_VERSION": str(version)}, cwd=REPO
    )
    if proc.returncode != 0:
        return {"error": (proc.stdout + proc.stderr)[-2000:]}
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]

    def values(name: str) -> list[float]:
        return [r[name] for r in rows if name in r]

    tokens = values("throughput/tokens_per_sec")
    return {
        "tokens_per_sec": statistics.median(tokens[-max(1, len(tokens) // 2) :]) if tokens else float("nan"),
        "mfu": (values("throughput/device/mfu") or [float("nan")])[-1],
        "peak_gib": max(values("memory/peak_allocated_mem") or [float("nan")]) / 2**30,
        "announced": next((line for line in proc.stdout.splitlines() if line.startswith("llmshearing:")), ""),
    }


def torch_alone(source: dict[str, int], args: argparse.Namespace) -> float:
    """Tokens/s of bench/mfu.py's pruning step (masked source, bf16 autocast, fused AdamW)."""
    import torch
    from mfu import build, step_seconds

    from llmshearing.models.config import ModelConfig

    config = ModelConfig(**source, max_seq_len=args.seq_len)
    model, l0, optimizer = build(config, prune=True)
    ids = torch.randint(0, config.vocab_size, (args.batch_size, args.seq_len), device="cuda")
    seconds = statistics.median(step_seconds(model, l0, optimizer, {"input_ids": ids}, args.steps // 2))
    del model, l0, optimizer
    torch.cuda.empty_cache()
    return ids.numel() / seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shapes", nargs="+", default=["tiny", "1b"], choices=["tiny", "1b"])
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20, help="training steps per run (default 20)")
    parser.add_argument(
        "--cpu-check", action="store_true", help="tiny shape, FSDP2 on CPU, fp32 (no timings)"
    )
    args = parser.parse_args(argv)

    import torch

    if args.cpu_check:
        args.shapes, args.seq_len, args.batch_size, args.steps = ["tiny"], 64, 2, 8
    elif not torch.cuda.is_available():
        print("no CUDA device: the Trainer's FSDP throughput is measured on GPU machines only")
        print("RESULT fsdp_gpu skipped=no GPU")
        return 0
    from llmshearing.models.decoder import resolve_attn_impl

    versions = (2,) if args.cpu_check else (1, 2)
    device = "cpu" if args.cpu_check else torch.cuda.get_device_name()
    print(f"device: {device}; torch {torch.__version__}; attention: {resolve_attn_impl('auto')}")
    print(
        f"batch {args.batch_size} x {args.seq_len}, {args.steps} steps, {'fp32' if args.cpu_check else 'bf16 autocast'}, activation checkpointing"
    )
    ratios = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.shapes:
            source, target = shapes()[name]
            root = Path(tmp) / name
            checkpoint, data = write_inputs(root, source, args.seq_len, samples=args.batch_size * args.steps)
            baseline = None if args.cpu_check else torch_alone(source, args)
            for version in versions:
                result = run_trainer(version, checkpoint, data, target, args, root)
                if "error" in result:
                    print(f"{name} FSDP{version}: FAILED\n{result['error']}")
                    continue
                ratio = result["tokens_per_sec"] / baseline if baseline else float("nan")
                if baseline:
                    ratios.append(ratio)
                print(
                    f"{name:>5} FSDP{version}: {result['tokens_per_sec']:>10.0f} tokens/s, MFU {result['mfu']:.3f}, "
                    f"peak {result['peak_gib']:.1f} GiB; torch alone {baseline or float('nan'):.0f} tokens/s; "
                    f"ratio {ratio:.2f}\n        {result['announced']}"
                )
    if args.cpu_check:
        print("RESULT fsdp_gpu skipped=cpu check only")
        return 0
    worst = min(ratios) if ratios else float("nan")
    print(f"RESULT fsdp_gpu ratio={worst:.2f} target=>={TARGET_RATIO:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
