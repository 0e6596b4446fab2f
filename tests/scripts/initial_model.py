"""The training entry point that first saves the model as the run starts (after FSDP has sharded and filled it).

    composer -n 2 tests/scripts/initial_model.py OUT.pt RECIPE key=value ...

Rank 0 writes the full state dict of the student's decoder (gathered from the shards) to ``OUT.pt`` and, when
the run distils, the teacher's to ``OUT.pt.teacher``, then the run trains as ``llmshearing/train.py`` would;
``tests/checkpoint/test_sharded_source.py`` compares them with the source.
"""

from __future__ import annotations

import sys

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from llmshearing.train import build_trainer, run


def main(argv: list[str]) -> int:
    out, recipe, overrides = argv[0], argv[1], argv[2:]
    trainer, values = build_trainer(recipe, overrides)
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_model_state_dict(trainer.state.model.model, options=options)  # collective
    if torch.distributed.get_rank() == 0:
        torch.save(state, out)
    teacher = trainer.state.model.teacher
    if teacher is not None:
        state = get_model_state_dict(teacher.module(), options=options)  # collective
        if torch.distributed.get_rank() == 0:
            torch.save(state, f"{out}.teacher")
    run(trainer, values)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
