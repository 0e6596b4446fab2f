"""llmshearing: targeted structured pruning, dynamic batch loading and continued pretraining
for LLaMA-family models, built on Composer and mosaicml-streaming."""

__version__ = "0.1.0"
