"""Training-step time with L0 pruning (masks sampled, Lagrangian on) against dense training of the same model.

Both runs use the same ``ComposerLlama`` weights, the same batch and the same optimizer (Composer's
DecoupledAdamW); a step is forward + loss + backward + optimizer step. The pruning run has an
``L0Module`` with all seven mask families attached (one hard-concrete sample per step, penalty
added to the loss, log-alphas and multipliers in their own optimizer groups). Repeats are
interleaved (the order alternates per repeat); the figure is the median over repeats of
time(pruning) / time(dense).

Default shape: SmolLM2-135M blocks (d 576, 9 heads, 3 KV heads, head_dim 64, intermediate 1536)
with 8 layers and an 8192-token vocabulary, so the decoder blocks, where the masks act, carry most
of the compute as in a large model. fp32 on CPU.

    .venv/bin/python bench/mask_overhead.py [--quick] [--layers N] [--batch B] [--seq T] [--repeats R]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TARGET = 1.10
FAMILIES = ["layer", "head_layer", "head", "kv_head", "mlp", "intermediate", "hidden"]


def build_models(layers: int, vocab: int, seq: int):
    from composer.optim import DecoupledAdamW

    from llmshearing.models.composer_model import ComposerLlama
    from llmshearing.models.config import ModelConfig
    from llmshearing.pruning import attach_l0_module, l0_param_groups

    config = ModelConfig(
        vocab_size=vocab,
        d_model=576,
        n_layers=layers,
        n_heads=9,
        n_kv_heads=3,
        head_dim=64,
        intermediate_size=1536,
        max_seq_len=seq,
        tie_word_embeddings=True,
        attn_impl="sdpa",
    )
    torch.manual_seed(0)
    dense = ComposerLlama(config).train()
    pruning = copy.deepcopy(dense)
    target = {
        "n_layers": max(1, layers * 3 // 4),
        "n_heads": 4,
        "n_kv_heads": 2,
        "d_model": 384,
        "intermediate_size": 1024,
    }
    l0 = attach_l0_module(pruning, {"pruning_modules": FAMILIES, "target_model": target})
    l0.set_step(10)
    dense_opt = DecoupledAdamW(dense.parameters(), lr=1e-4)
    pruning_opt = DecoupledAdamW(l0_param_groups(pruning, 1e-4, 1.0, 1.0), lr=1e-4)
    return (dense, dense_opt), (pruning, pruning_opt)


def make_step(model, optimizer, batch):
    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        outputs = model(batch)
        model.loss(outputs, batch)["total"].backward()
        optimizer.step()

    return step


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def timed(step, iterations: int, clock=time.perf_counter) -> float:
    start = clock()
    for _ in range(iterations):
        step()
    return (clock() - start) / iterations


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="short run (under a minute)")
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (default 8, quick 4)")
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=None, help="sequence length (default 256, quick 128)")
    parser.add_argument("--repeats", type=int, default=None, help="interleaved repeats (default 9, quick 5)")
    parser.add_argument("--iterations", type=int, default=None, help="steps per timing (default 3, quick 2)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument(
        "--clock",
        choices=sorted(CLOCKS),
        default="wall",
        help="wall time, or this process's CPU time (steadier on a shared machine; use with --threads 1)",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    layers = args.layers or (4 if args.quick else 8)
    repeats = args.repeats or (5 if args.quick else 9)
    iterations = args.iterations or (2 if args.quick else 3)
    args.seq = args.seq or (128 if args.quick else 256)

    (dense, dense_opt), (pruning, pruning_opt) = build_models(layers, args.vocab, args.seq)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": ids}
    steps = {"dense": make_step(dense, dense_opt, batch), "pruning": make_step(pruning, pruning_opt, batch)}
    for step in steps.values():  # warm-up: allocator, optimizer state
        timed(step, 2)

    times: dict[str, list[float]] = {"dense": [], "pruning": []}
    ratios = []
    for repeat in range(repeats):
        order = ["dense", "pruning"] if repeat % 2 == 0 else ["pruning", "dense"]
        measured = {name: timed(steps[name], iterations, CLOCKS[args.clock]) for name in order}
        for name, seconds in measured.items():
            times[name].append(seconds)
        ratios.append(measured["pruning"] / measured["dense"])

    print(
        f"shape: {layers} layers, d 576, 9 heads / 3 KV heads, intermediate 1536, vocab {args.vocab}; "
        f"batch {args.batch} x {args.seq}; {torch.get_num_threads()} threads; {repeats} repeats x {iterations} steps; "
        f"{args.clock} clock"
    )
    for name, values in times.items():
        print(
            f"{name:8s} step: median {statistics.median(values) * 1e3:8.1f} ms  (min {min(values) * 1e3:.1f} ms)"
        )
    ratio = statistics.median(ratios)
    print(f"pruning / dense per repeat: {', '.join(f'{r:.3f}' for r in ratios)}")
    print(f"ratio of the fastest repeats: {min(times['pruning']) / min(times['dense']):.3f}")
    print(f"RESULT mask_overhead ratio={ratio:.2f} target=<={TARGET:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
