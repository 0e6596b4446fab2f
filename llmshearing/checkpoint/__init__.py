"""The project's checkpoints on disk: their format, reading every kind, and a training run's files.

``format`` defines the project checkpoint directory and writes it (one tensor at a time, staged and renamed),
and refuses pruning checkpoints wherever the weights alone would be used (``refuse_pruning_checkpoint``);
``reading`` opens every kind of checkpoint (project, Hugging Face, Composer ``.pt`` or sharded) under the
``Decoder``'s names; ``loading`` turns one into a ready ``Decoder`` (``from_pretrained``) or a distillation
teacher; ``tensor_io`` reads and writes safetensors (and reads ``pytorch_model*.bin``) tensor by tensor;
``sharded`` reads Composer's sharded checkpoints and writes and reads a source's sharded weights
(``model.dcp/``); ``composer_files`` tells a complete Composer checkpoint file from one cut off and repairs a
run's checkpoint folder; ``run_config`` owns a run's ``config.json`` (where it is, writing and reading it)
and the run identity it is compared with.

It reads Hugging Face directories through :mod:`llmshearing.hf` (key maps, config mapping);
:mod:`llmshearing.convert` builds the ``llmshearing convert`` commands on both.
"""
