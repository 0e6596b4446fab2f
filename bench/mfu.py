"""Model FLOPs utilisation of pruning and of continued pretraining on a GPU.

One training step is what ``ComposerLlama`` runs under Composer: the L0 module samples the masks
(pruning only), the masked ``Decoder`` runs under bf16 autocast with fp32 master weights, the loss is
``lm_loss`` (plus the Lagrangian when pruning), then backward and a fused AdamW step over the
weights, log-alphas and multipliers. It needs torch alone, so it runs on any CUDA machine.

FLOPs per token follow the PaLM / nanoGPT formula (``ModelConfig.train_flops_per_token``):
``6 N + 12 L H hd T``, N the matmul parameters. Pruning is charged the FLOPs of the *source* model
it runs (the masks remove nothing until the model is folded), so the masks' overhead shows up as a
lower MFU. Peak throughput is the GPU's dense bf16 figure.

    python bench/mfu.py            # the Sheared-LLaMA-1.3B shape (1.2B non-embedding) pruned toward 0.4B
    python bench/mfu.py --quick    # fewer timed steps

Without a CUDA device this prints ``RESULT mfu skipped=...`` and exits 0.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# Dense bf16 tensor-core peaks (no sparsity), TFLOP/s.
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}

# The Sheared-LLaMA-1.3B shape (LLaMA-2 style, 1.2B non-embedding) and a 0.4B shape it is pruned toward.
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
L0 = {
    "pruning_modules": ["layer", "head", "intermediate", "hidden"],
    "target_model": TARGET,
    "lagrangian_warmup_steps": 10,
}
MFU_TARGET = 0.40  # continued pretraining of the pruned shape (H200: 0.31 eager, 0.51 with --compile)


def peak_flops(device_name: str) -> float | None:
    for key, tflops in PEAK_BF16_TFLOPS.items():
        if key in device_name:
            return tflops * 1e12
    return None


def build(
    config: Any,
    prune: bool,
    lr: float = 1e-4,
    compile: bool = False,
    l0_settings: dict[str, Any] | None = None,
    checkpoint: bool = False,
) -> tuple[Any, Any, Any]:
    """The decoder (``torch.compile``-d if asked; the L0 module of ``l0_settings``, default ``L0``, when
    pruning) on the GPU, and its optimizer. ``checkpoint`` wraps each block for non-reentrant
    activation checkpointing, as the project's FSDP settings have Composer do."""
    import torch

    from llmshearing.models.decoder import Decoder
    from llmshearing.pruning.l0_module import L0Module

    model = Decoder(config).cuda()
    model.init_weights()
    if checkpoint:
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
            CheckpointImpl,
            apply_activation_checkpointing,
            checkpoint_wrapper,
        )

        apply_activation_checkpointing(
            model,
            checkpoint_wrapper_fn=lambda block: checkpoint_wrapper(
                block, checkpoint_impl=CheckpointImpl.NO_REENTRANT
            ),
            check_fn=model.activation_checkpointing_fn,
        )
    l0 = L0Module(config, l0_settings or L0).cuda() if prune else None
    groups = [{"params": list(model.parameters()), "lr": lr}]
    if l0 is not None:
        groups += [
            {"params": list(l0.log_alpha.values()), "lr": 0.1, "weight_decay": 0.0},
            {"params": list(l0.multipliers.values()), "lr": 0.1, "weight_decay": 0.0},
        ]
    optimizer = torch.optim.AdamW(groups, betas=(0.9, 0.95), fused=True)
    return (torch.compile(model) if compile else model), l0, optimizer


def step_seconds(
    model: Any, l0: Any, optimizer: Any, batch: dict, steps: int, warmup: int = 3
) -> list[float]:
    """Wall seconds of each timed training step (after ``warmup`` untimed ones)."""
    import torch

    from llmshearing.models.loss import lm_loss

    times = []
    for index in range(warmup + steps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        if l0 is not None:
            l0.set_step(index)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = l0() if l0 is not None else None
            logits = model(batch["input_ids"], masks=out.masks if out is not None else None)
            loss = lm_loss(logits, batch, out.penalty if out is not None else None)["total"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        if index >= warmup:
            times.append(time.perf_counter() - start)
    return times


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="fewer timed steps")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 20; quick 6)")
    parser.add_argument(
        "--compile", action="store_true", help="torch.compile the decoder (Composer's compile_config)"
    )
    args = parser.parse_args()

    import torch

    if not torch.cuda.is_available():
        print("no CUDA device: MFU is measured on GPU machines only")
        print("RESULT mfu skipped=no GPU")
        return 0

    from llmshearing.models.config import ModelConfig
    from llmshearing.models.decoder import resolve_attn_impl

    torch.backends.cuda.matmul.allow_tf32 = True
    name = torch.cuda.get_device_name()
    peak = peak_flops(name)
    steps = args.steps or (6 if args.quick else 20)
    source = ModelConfig(**SOURCE, max_seq_len=args.seq_len)
    target = source.replace(**TARGET)
    torch.manual_seed(0)
    ids = torch.randint(0, source.vocab_size, (args.batch_size, args.seq_len), device="cuda")
    batch = {"input_ids": ids}
    tokens = ids.numel()
    rows = []
    for label, config, prune in (
        ("continued pretraining (target shape)", target, False),
        ("pruning (source shape + masks)", source, True),
        ("source shape, no masks (baseline)", source, False),
    ):
        model, l0, optimizer = build(config, prune, compile=args.compile)
        torch.cuda.reset_peak_memory_stats()
        seconds = statistics.median(step_seconds(model, l0, optimizer, batch, steps))
        memory = torch.cuda.max_memory_allocated() / 2**30
        achieved = config.train_flops_per_token(args.seq_len) * tokens / seconds
        mfu = achieved / peak if peak else float("nan")
        rows.append((label, seconds, tokens / seconds, achieved / 1e12, mfu, memory))
        del model, l0, optimizer
        torch.cuda.empty_cache()
    peak_text = f"{peak / 1e12:.0f}" if peak else "unknown"
    print(
        f"device: {name}, peak dense bf16 {peak_text} TFLOP/s; torch {torch.__version__}; "
        f"attention: {resolve_attn_impl('auto')}; {'torch.compile' if args.compile else 'eager'}; batch {args.batch_size} x {args.seq_len}; "
        f"median of {steps} steps"
    )
    print(
        f"source {source.num_params(False) / 1e9:.2f}B non-embedding -> target {target.num_params(False) / 1e9:.2f}B"
    )
    print(f"{'stage':<40} {'step s':>8} {'tokens/s':>10} {'TFLOP/s':>8} {'MFU':>7} {'peak GiB':>9}")
    for label, seconds, tps, tflops, mfu, memory in rows:
        print(f"{label:<40} {seconds:>8.3f} {tps:>10.0f} {tflops:>8.1f} {mfu:>7.1%} {memory:>9.1f}")
    mask_cost = rows[1][1] / rows[2][1]
    print(f"pruning step / unmasked source step: {mask_cost:.2f}x")
    if peak is None:
        print(f"RESULT mfu skipped=unknown peak FLOPs for {name}")
        return 0
    print(f"MFU: continued pretraining {rows[0][4]:.3f}, pruning {rows[1][4]:.3f} (of source-model FLOPs)")
    print(f"RESULT mfu ratio={rows[0][4]:.3f} target=>={MFU_TARGET:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
