"""Peak memory of ``llmshearing prune-model`` against the bytes of the model it folds.

A random decoder (default ~160M parameters, fp32) with an L0 module is saved the way a pruning run
saves it: as a sharded checkpoint directory (``torch.distributed.checkpoint``, the FSDP layout) and as
a Composer ``.pt`` file, beside the run's ``config.json``. ``prune-model`` folds each in a fresh
process; the figure is (peak RSS of that process - RSS of a process that only imports the same
modules) / model bytes. Target: <= 1.5.

    python bench/fold_memory.py              # d_model 1024, 8 layers, vocab 32000
    python bench/fold_memory.py --quick      # a smaller model
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
TARGET = 1.5
MEASURE = """
import resource, sys
{body}
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""
IMPORTS = "import torch, llmshearing.cli, llmshearing.pruning.commands, llmshearing.pruning.prune_model, llmshearing.pruning.fold, llmshearing.checkpoint.reading"


def write_run(root: Path, quick: bool) -> tuple[Path, Path, int]:
    """A pruning run folder with both checkpoint kinds; returns (sharded dir, .pt file, model bytes)."""
    import torch
    from torch.distributed.checkpoint import FileSystemWriter, save

    from llmshearing.models.config import ModelConfig
    from llmshearing.models.decoder import Decoder
    from llmshearing.pruning.l0_module import L0Module

    shape = dict(d_model=512, n_layers=4, intermediate_size=1408) if quick else {}
    config = ModelConfig(
        **{
            "vocab_size": 32000,
            "d_model": 1024,
            "n_layers": 8,
            "n_heads": 8,
            "n_kv_heads": 8,
            "head_dim": 128 if not quick else 64,
            "intermediate_size": 2816,
            **shape,
        }
    )
    l0 = {
        "pruning_modules": ["layer", "head", "intermediate", "hidden"],
        "target_model": {
            "n_layers": config.n_layers // 2,
            "n_heads": config.n_heads // 2,
            "n_kv_heads": config.n_kv_heads // 2,
            "d_model": config.d_model // 2,
            "intermediate_size": config.intermediate_size // 2,
        },
    }
    torch.manual_seed(0)
    decoder = Decoder(config)
    decoder.init_weights()
    module = L0Module(config, l0)
    state = {f"model.{k}": v for k, v in decoder.state_dict().items()}
    state |= {f"l0_module.{k}": v for k, v in module.state_dict().items()}
    model_bytes = sum(v.numel() * v.element_size() for k, v in state.items() if k.startswith("model."))
    run = root / "run"
    (run / "checkpoints").mkdir(parents=True)
    description = {"model": config.to_dict(), "hf_config": None, "l0_module": module.l0_config.to_dict()}
    (run / "config.json").write_text(json.dumps(description, default=str))
    sharded = run / "checkpoints" / "ep0-ba1"
    save(
        {f"state.model.{k}": v for k, v in state.items()},
        storage_writer=FileSystemWriter(str(sharded)),
        no_dist=True,
    )
    single = run / "checkpoints" / "ep0-ba1-rank0.pt"
    torch.save({"state": {"model": state}}, single)
    del decoder, state
    return sharded, single, model_bytes


def peak_rss(body: str) -> int:
    proc = subprocess.run(
        [sys.executable, "-c", MEASURE.format(body=body)], capture_output=True, text=True, cwd=REPO
    )
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-2000:])
    return int(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="a smaller model")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        sharded, single, model_bytes = write_run(Path(tmp), args.quick)
        baseline = peak_rss(IMPORTS)
        worst = 0.0
        for label, checkpoint in (("sharded", sharded), ("pt", single)):
            out = Path(tmp) / f"pruned-{label}"
            body = (
                f"{IMPORTS}\nfrom llmshearing.cli import main\n"
                f"assert main(['prune-model', {str(checkpoint)!r}, {str(out)!r}]) == 0"
            )
            ratio = (peak_rss(body) - baseline) / model_bytes
            worst = max(worst, ratio)
            print(
                f"prune-model from a {label} checkpoint: {ratio:.2f} x the model's {model_bytes / 2**20:.0f} MiB"
            )
    print(f"RESULT fold_memory ratio={worst:.2f} target=<={TARGET}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
