"""Inference speed of a source and its pruned shapes through plain transformers: tokens per second of a
forward pass and of greedy generation, as ratios to the source measured side by side in one process.

The source is SmolLM2-135M (the demo's GGUF, converted once and exported as an fp32 HF directory under
.cache/, as bench/harness_speed.py does) or, with ``--random-source``, a random model of its shape. The
pruned shapes are random-initialised ``LlamaForCausalLM``s of the source's config with the shape replaced
(speed does not depend on the weights' values; generation is forced to its full length). Shapes: the demo's
target (its pruning recipe's ``target_model``), the quality benchmark's hand-picked target, and what budgets
resolve to (``llmshearing.pruning.budget.choose_shape``), each with the ``tokens_per_second`` cost model's
predicted ratio (forward FLOPs per token at the measured context) beside the measured ones. Rounds alternate
between the models; each figure is the best of ``--rounds``.

    nice -n 10 .venv/bin/python bench/inference_speed.py                      # CPU, a few minutes
    nice -n 10 .venv/bin/python bench/inference_speed.py --rounds 2 --threads 1 --random-source

Prints ``RESULT inference_speed <shape> forward=<x> generate=<x> predicted=<x>`` per shape and writes
``bench/results/inference-speed-<date>-<device>.md``.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BUDGETS = ("non_embedding_params=4.26e7", "tokens_per_second=2", "memory=160MB,dtype=bf16")


def fixed_targets() -> dict[str, dict[str, int]]:
    """The named target shapes: the demo's (its pruning recipe's) and the quality benchmark's hand-picked one."""
    from omegaconf import OmegaConf

    from llmshearing.training.recipes import PRUNE_RECIPE

    sys.path.insert(0, str(REPO / "bench"))
    from quality.sources import TARGET

    demo = OmegaConf.to_container(OmegaConf.load(PRUNE_RECIPE).model.l0_module.target_model)
    return {"demo's target": demo, "quality bench's hand-picked target": dict(TARGET)}


def source_model(random_source: bool):
    """``(ModelConfig, LlamaForCausalLM, what it is)`` of the source."""
    import torch
    from transformers import AutoModelForCausalLM

    from llmshearing.checkpoint.reading import read_any_config

    config = read_any_config(REPO / "yamls" / "sources" / "smollm2-135m.json")[0]
    if random_source:
        return config, random_model(config), "random-initialised model of SmolLM2-135M's shape"
    sys.path.insert(0, str(REPO / "bench"))
    from harness_speed import smollm2_hf_dir

    hf = smollm2_hf_dir()
    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32)
    return config, model, f"SmolLM2-135M (the demo's GGUF converted to {hf.relative_to(REPO)})"


def random_model(config):
    """A random ``LlamaForCausalLM`` of ``config``'s shape (fp32)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    hf = LlamaConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.d_model,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.n_layers,
        num_attention_heads=config.n_heads,
        num_key_value_heads=config.n_kv_heads,
        head_dim=config.head_dim,
        max_position_embeddings=config.max_seq_len,
        rms_norm_eps=config.rms_norm_eps,
        rope_theta=config.rope_theta,
        tie_word_embeddings=config.tie_word_embeddings,
    )
    return LlamaForCausalLM(hf).eval()


def forward_seconds(model, batch: int, seq_len: int) -> float:
    import torch

    ids = torch.randint(
        0, model.config.vocab_size, (batch, seq_len), generator=torch.Generator().manual_seed(1)
    )
    with torch.inference_mode():
        start = time.perf_counter()
        model(input_ids=ids, use_cache=False)
        return time.perf_counter() - start


def generate_seconds(model, prompt: int, new_tokens: int) -> float:
    import torch

    ids = torch.randint(0, model.config.vocab_size, (1, prompt), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        start = time.perf_counter()
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=0,
        )
        seconds = time.perf_counter() - start
    assert out.shape[1] == prompt + new_tokens
    return seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--batch", type=int, default=4, help="forward batch (default 4)")
    parser.add_argument("--seq-len", type=int, default=256, help="forward sequence length (default 256)")
    parser.add_argument("--prompt", type=int, default=32, help="generation prompt tokens (default 32)")
    parser.add_argument("--new-tokens", type=int, default=64, help="generated tokens (default 64)")
    parser.add_argument("--random-source", action="store_true", help="a random model of SmolLM2's shape")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-record", action="store_true", help="print only")
    args = parser.parse_args(argv)

    import torch

    from llmshearing.models.config import ModelConfig
    from llmshearing.pruning.budget import choose_shape, forward_flops_per_token, parse_budget, shape_label

    torch.set_num_threads(args.threads)
    source, source_hf, source_what = source_model(args.random_source)
    shapes: list[tuple[str, ModelConfig]] = [
        (name, source.replace(**target)) for name, target in fixed_targets().items()
    ]
    for spec in BUDGETS:
        best, _ = choose_shape(source, parse_budget(spec, "--budget"))
        shapes.append((f"budget {spec}", best.config))
    models = [("source", source, source_hf.to(args.device))]
    models += [(name, config, random_model(config).to(args.device)) for name, config in shapes]
    best_forward = {name: float("inf") for name, _, _ in models}
    best_generate = dict(best_forward)
    for _name, _, model in models:  # warm-up: first calls allocate
        forward_seconds(model, 1, 16)
        generate_seconds(model, 4, 2)
    for _ in range(args.rounds):
        for name, _, model in models:
            best_forward[name] = min(best_forward[name], forward_seconds(model, args.batch, args.seq_len))
            best_generate[name] = min(
                best_generate[name], generate_seconds(model, args.prompt, args.new_tokens)
            )
    forward_tokens, generated = args.batch * args.seq_len, args.new_tokens
    context = args.prompt + args.new_tokens // 2  # mean context of a generated token
    rows = []
    for name, config, _ in models:
        fwd = forward_tokens / best_forward[name]
        gen = generated / best_generate[name]
        fwd_ratio = best_forward["source"] / best_forward[name]
        gen_ratio = best_generate["source"] / best_generate[name]
        predicted = forward_flops_per_token(source, context) / forward_flops_per_token(config, context)
        rows.append(
            (name, shape_label(config), config.num_params(), fwd, gen, fwd_ratio, gen_ratio, predicted)
        )
        if name != "source":
            print(
                f"RESULT inference_speed {shape_label(config)} forward={fwd_ratio:.2f} generate={gen_ratio:.2f} "
                f"predicted={predicted:.2f}"
            )
    command = "nice -n 10 .venv/bin/python bench/inference_speed.py " + " ".join(argv or sys.argv[1:])
    table = [
        "| model | shape | params | forward tok/s | generate tok/s | forward ratio | generate ratio | cost model |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    table += [
        f"| {r[0]} | {r[1]} | {r[2]:,} | {r[3]:,.0f} | {r[4]:,.1f} | {r[5]:.2f} | {r[6]:.2f} | {r[7]:.2f} |"
        for r in rows
    ]
    print("\n".join(table))
    if args.no_record:
        return 0
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
    ).stdout
    date = datetime.date.today().isoformat()
    out = REPO / "bench" / "results" / f"inference-speed-{date}-{args.device}.md"
    text = [
        f"# Inference speed of pruned shapes ({date}, {args.device})",
        "",
        f"    {command.strip()}",
        "",
        f"Commit {commit.strip()}; {platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{args.threads} thread(s), transformers' LlamaForCausalLM in fp32. Source: {source_what}; pruned "
        "shapes random-initialised (speed does not depend on the weights). Forward: a batch of "
        f"{args.batch} x {args.seq_len} tokens, no KV cache. Generate: greedy, batch 1, {args.prompt}-token "
        f"prompt, {args.new_tokens} new tokens (forced). Best of {args.rounds} alternating rounds. Ratios are "
        "tokens/s over the source's; 'cost model' is the `tokens_per_second` budget's prediction (forward "
        f"FLOPs per token at {context} tokens of context).",
        "",
        *table,
        "",
    ]
    out.write_text("\n".join(text), encoding="utf-8")
    print(f"wrote {out.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
