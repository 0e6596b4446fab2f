"""``llmshearing convert hf-to-composer`` and ``llmshearing convert composer-to-hf``.

``hf-to-composer --sharded`` writes the weights as a ``torch.distributed.checkpoint`` directory
(``OUT/model.dcp/``, see :mod:`llmshearing.checkpoint.sharded`) instead of safetensors.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DTYPES = ("fp32", "bf16", "fp16")


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    convert = subparsers.add_parser(
        "convert",
        help="convert checkpoints between Hugging Face and llmshearing formats",
        description="Convert checkpoints between Hugging Face and llmshearing formats.",
    )
    directions = convert.add_subparsers(dest="direction", required=True, metavar="DIRECTION")

    to_project = directions.add_parser(
        "hf-to-composer",
        help="HF model dir, hub name or GGUF file -> llmshearing checkpoint dir",
        description="Convert a Hugging Face model (LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM) "
        "into an llmshearing checkpoint directory that training loads as model.path.",
    )
    to_project.add_argument("src", help="HF model directory, hub model name, or a .gguf file")
    to_project.add_argument("out", help="output checkpoint directory (must not exist unless --overwrite)")
    to_project.add_argument("--gguf", metavar="FILE", help="GGUF file to load (a path, or a name inside SRC)")
    to_project.add_argument(
        "--dtype",
        choices=DTYPES,
        default=None,
        help="stored precision (default: the source's; fp32 for GGUF)",
    )
    to_project.add_argument(
        "--sharded",
        action="store_true",
        help="write the weights as a torch.distributed.checkpoint directory (OUT/model.dcp, one file per "
        "tensor) instead of safetensors",
    )
    to_project.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    to_project.set_defaults(func=run_hf_to_composer)

    to_hf = directions.add_parser(
        "composer-to-hf",
        help="llmshearing checkpoint dir, pruned dir or Composer .pt -> HF model dir",
        description="Export a checkpoint as a Hugging Face model directory (config.json, safetensors, "
        "tokenizer) that transformers' from_pretrained loads without custom code.",
    )
    to_hf.add_argument("ckpt", help="checkpoint directory, pruned checkpoint directory or Composer .pt")
    to_hf.add_argument("out_dir", help="output HF directory (must not exist unless --overwrite)")
    to_hf.add_argument(
        "--tokenizer", metavar="PATH", help="directory with tokenizer files (default: the checkpoint's)"
    )
    to_hf.add_argument("--dtype", choices=DTYPES, default="bf16", help="exported precision (default: bf16)")
    to_hf.add_argument(
        "--config",
        metavar="PATH",
        help="config.json for a Composer .pt (default: beside it or in the run folder)",
    )
    to_hf.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")
    to_hf.set_defaults(func=run_composer_to_hf)


def run_hf_to_composer(args: argparse.Namespace) -> int:
    from llmshearing.io.staging import refuse_existing_output

    refuse_existing_output(args.out, args.overwrite)  # before the imports and the reading (seconds)
    from llmshearing.convert.hf_to_project import convert_hf_to_project

    out = convert_hf_to_project(
        args.src, args.out, gguf=args.gguf, dtype=args.dtype, overwrite=args.overwrite, sharded=args.sharded
    )
    print(f"wrote {out}")
    return 0


def run_composer_to_hf(args: argparse.Namespace) -> int:
    from llmshearing.io.staging import refuse_existing_output

    refuse_existing_output(args.out_dir, args.overwrite)  # before the imports and the reading (seconds)
    from llmshearing.convert.project_to_hf import convert_project_to_hf

    out = convert_project_to_hf(
        args.ckpt,
        args.out_dir,
        tokenizer=args.tokenizer,
        dtype=args.dtype,
        config_path=args.config,
        overwrite=args.overwrite,
    )
    print(f"wrote {out}")
    _warn_if_transformers5_refuses(Path(out))
    return 0


def _warn_if_transformers5_refuses(out: Path) -> None:
    """Say so when the export's hidden size is not a multiple of its attention heads (pruned with
    ``allow_indivisible_d_model``): transformers >= 5 refuses such a config, 4.x loads it."""
    import json

    from llmshearing.checkpoint.format import CONFIG_NAME

    config = json.loads((out / CONFIG_NAME).read_text(encoding="utf-8"))
    hidden, heads = config.get("hidden_size"), config.get("num_attention_heads")
    if isinstance(hidden, int) and isinstance(heads, int) and heads > 0 and hidden % heads:
        print(
            f"warning: {out} has hidden_size {hidden} over {heads} attention heads (not a multiple): "
            "transformers >= 5 refuses to load it; transformers 4.x loads it",
            file=sys.stderr,
        )
