"""Forward+backward time of the project ``Decoder`` against transformers' ``LlamaForCausalLM`` (sdpa).

Both models hold the same weights (the HF model's, converted through the project's key map; their
logits are checked to agree first), see the same batch, use the same thread count and the same
next-token cross-entropy computed outside the model. Repeats are interleaved (the order alternates
per repeat); the reported figure is the median over repeats of time(project) / time(transformers).

Default shape: SmolLM2-135M (d 576, 9 heads, 3 KV heads, head_dim 64, intermediate 1536, vocab
49152, tied embeddings) with fewer layers, random init, fp32 on CPU.

    .venv/bin/python bench/model_step.py [--quick] [--layers N] [--batch B] [--seq T] [--repeats R]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TARGET = 1.0


def build_models(layers: int, seq: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    from llmshearing.checkpoint.reading import hf_source_to_project
    from llmshearing.checkpoint.tensor_io import StateDictSource
    from llmshearing.hf.config import model_config_from_hf
    from llmshearing.models.decoder import Decoder

    hf_config = LlamaConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=layers,
        num_attention_heads=9,
        num_key_value_heads=3,
        head_dim=64,
        max_position_embeddings=max(2048, seq),
        rope_theta=100000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    reference = LlamaForCausalLM(hf_config).train()
    config = model_config_from_hf(hf_config.to_dict()).replace(attn_impl="sdpa")
    project = Decoder(config).train()
    with hf_source_to_project(StateDictSource(reference.state_dict()), config, "benchmark") as tensors:
        project.load_state_dict({k: tensors.get(k).clone() for k in tensors.keys()}, strict=True)
    return project, reference


def next_token_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def timed_step(step) -> float:
    start = time.perf_counter()
    step()
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="short run (under a minute)")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=None, help="interleaved repeats (default 5, quick 3)")
    parser.add_argument("--iterations", type=int, default=None, help="steps per model per repeat (default 2)")
    args = parser.parse_args()
    repeats = args.repeats or (3 if args.quick else 5)
    iterations = args.iterations or 2
    if args.quick:  # a smaller problem for a run under a minute
        args.layers, args.batch, args.seq = min(args.layers, 2), 1, min(args.seq, 128)

    project, reference = build_models(args.layers, args.seq)
    ids = torch.randint(0, 49152, (args.batch, args.seq), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (project(ids) - reference(ids).logits).abs().max().item()
    if diff > 1e-4:
        print(
            f"error: the two models disagree (max |logit diff| = {diff:.2e}); not benchmarking",
            file=sys.stderr,
        )
        return 1

    def project_step() -> None:
        next_token_loss(project(ids), ids).backward()
        project.zero_grad(set_to_none=True)

    def reference_step() -> None:
        next_token_loss(reference(ids).logits, ids).backward()
        reference.zero_grad(set_to_none=True)

    print(
        f"model_step: {args.layers} layers, batch {args.batch}x{args.seq}, fp32, "
        f"{torch.get_num_threads()} threads, {repeats} repeats x {iterations} steps (logit diff {diff:.1e})"
    )
    for step in (project_step, reference_step):  # warm-up
        timed_step(step)
    ratios = []
    for repeat in range(repeats):
        seconds = {"project": 0.0, "transformers": 0.0}
        for i in range(iterations):  # single steps alternate, so load changes hit both sides alike
            order = [("project", project_step), ("transformers", reference_step)]
            if (repeat + i) % 2:
                order.reverse()
            for name, step in order:
                seconds[name] += timed_step(step) / iterations
        ratios.append(seconds["project"] / seconds["transformers"])
        print(
            f"  repeat {repeat + 1}: project {seconds['project'] * 1e3:.1f} ms/step, "
            f"transformers {seconds['transformers'] * 1e3:.1f} ms/step, ratio {ratios[-1]:.3f}"
        )
    ratio = statistics.median(ratios)
    print(f"median ratio project/transformers = {ratio:.3f} (target <= {TARGET})")
    print(f"RESULT model_step ratio={ratio:.2f} target=<={TARGET}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
