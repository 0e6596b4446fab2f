"""Conversion between Hugging Face checkpoints and the project checkpoint format.

Key maps are declarative per model family (``keymaps``); configs translate in ``hf_config``;
``checkpoint`` defines the project checkpoint format and reads every checkpoint kind;
``hf_to_project`` and ``project_to_hf`` are the two converters behind ``llmshearing convert``.
``tensor_io`` reads and writes safetensors tensor by tensor; ``sharded`` reads Composer's sharded
checkpoints and writes and reads a source's sharded weights (``hf-to-composer --sharded``: ``model.dcp/``).
``loading`` turns a checkpoint into a ready ``Decoder`` (``from_pretrained``) or a distillation teacher.
"""
