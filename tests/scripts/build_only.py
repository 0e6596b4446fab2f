"""Build the trainer of a recipe (calibration included) on every rank, write rank 0's initial
log-alphas, and stop before training.

    composer -n 2 tests/scripts/build_only.py OUT.pt RECIPE key=value ...
"""

from __future__ import annotations

import sys

import torch

from llmshearing.train import build_trainer


def main(argv: list[str]) -> int:
    out, recipe, overrides = argv[0], argv[1], argv[2:]
    trainer, _ = build_trainer(recipe, overrides)
    from composer.utils import dist

    if dist.get_global_rank() == 0:
        log_alpha = trainer.state.model.l0_module.log_alpha
        full = {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in log_alpha.items()}
        torch.save({k: v.detach().cpu().clone() for k, v in full.items()}, out)
    trainer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
