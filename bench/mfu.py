"""Model FLOPs utilisation of pruning and of continued pretraining on a GPU.

FLOPs per token follow the PaLM / nanoGPT formula ``6 N + 12 L H Q T`` (N non-embedding
parameters, L layers, H query heads, Q head dim, T sequence length). Pruning is charged the
FLOPs of the *source* model it runs (the masks remove nothing until the model is folded), so its
mask overhead shows up as lower MFU. Peak throughput is the GPU's dense bf16 figure.

Without a CUDA device this prints ``RESULT mfu skipped=...`` and exits 0.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}

# A LLaMA-2-style ~1.3B decoder (the paper's target shape) and the shape it is pruned toward.
SOURCE = dict(
    vocab_size=32000,
    d_model=2048,
    n_layers=24,
    n_heads=16,
    n_kv_heads=16,
    head_dim=128,
    intermediate_size=5504,
)
TARGET = dict(n_layers=16, n_heads=8, n_kv_heads=8, d_model=1536, intermediate_size=4096)


def peak_flops(device_name: str) -> float | None:
    for key, tflops in PEAK_BF16_TFLOPS.items():
        if key in device_name:
            return tflops * 1e12
    return None


def flops_per_token(config, seq_len: int) -> float:
    n = config.num_params(include_embeddings=False)
    return 6 * n + 12 * config.n_layers * config.n_heads * config.head_dim * seq_len


def step_seconds(model, optimizer, batch: dict, steps: int) -> float:
    import torch

    times = []
    for _ in range(steps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            outputs = model(batch)
            loss = model.loss(outputs, batch)["total"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times[2:])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer steps")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()

    import torch

    if not torch.cuda.is_available():
        print("no CUDA device: MFU is measured on GPU machines only")
        print("RESULT mfu skipped=no GPU")
        return 0

    from composer.optim import DecoupledAdamW

    from llmshearing.models.composer_model import ComposerLlama
    from llmshearing.models.config import ModelConfig
    from llmshearing.pruning import attach_l0_module, l0_param_groups

    name = torch.cuda.get_device_name()
    peak = peak_flops(name)
    steps = 6 if args.quick else 20
    source = ModelConfig(**SOURCE, max_seq_len=args.seq_len)
    target = source.replace(**TARGET)
    ids = torch.randint(0, source.vocab_size, (args.batch_size, args.seq_len), device="cuda")
    batch = {"input_ids": ids}
    tokens = ids.numel()
    rows = []
    for label, config, prune in (
        ("continued pretraining (target shape)", target, False),
        ("pruning (source shape)", source, True),
    ):
        model = ComposerLlama(config).cuda()
        if prune:
            attach_l0_module(
                model,
                {
                    "pruning_modules": ["layer", "head", "intermediate", "hidden"],
                    "target_model": TARGET,
                    "lagrangian_warmup_steps": 10,
                },
            )
            model.cuda()
            groups = l0_param_groups(model, 1e-4, 1.0, 1.0)
        else:
            groups = [{"params": list(model.parameters())}]
        optimizer = DecoupledAdamW(groups, lr=1e-4)
        seconds = step_seconds(model, optimizer, batch, steps)
        achieved = flops_per_token(config, args.seq_len) * tokens / seconds
        mfu = achieved / peak if peak else float("nan")
        rows.append((label, tokens / seconds, achieved / 1e12, mfu))
        del model, optimizer
        torch.cuda.empty_cache()
    print(
        f"device: {name}, peak bf16 {peak / 1e12 if peak else float('nan'):.0f} TFLOPS, batch {args.batch_size} x {args.seq_len}"
    )
    print(f"{'stage':<40} {'tokens/s':>12} {'TFLOPS':>8} {'MFU':>7}")
    for label, tps, tflops, mfu in rows:
        print(f"{label:<40} {tps:>12.0f} {tflops:>8.1f} {mfu:>7.1%}")
    if peak is None:
        print(f"RESULT mfu skipped=unknown peak FLOPs for {name}")
        return 0
    print(f"RESULT mfu ratio={rows[0][3]:.3f} target=>=0.40")
    return 0


if __name__ == "__main__":
    sys.exit(main())
