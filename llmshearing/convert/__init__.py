"""Conversion between Hugging Face models and project checkpoints: the ``llmshearing convert`` commands.

``hf_to_project`` imports an HF model (a directory, a hub name or a GGUF file) as a project checkpoint;
``project_to_hf`` exports any checkpoint as an HF directory that ``from_pretrained`` loads with no custom code,
with the model card ``model_card`` writes; ``commands`` adds both to the command line. They stand on
:mod:`llmshearing.checkpoint` (reading and writing checkpoints) and :mod:`llmshearing.hf` (key maps and config
mapping).

``checkpoint`` here is the former import path of the checkpoint readers and writer, kept for code written
against it.
"""
