"""Downstream evaluation through lm-evaluation-harness: presets, local tasks and the model adapter.

`runner.evaluate_tasks` is what `llmshearing evaluate MODEL --tasks ...` calls; `model.build_hf_model`
turns any checkpoint the project reads into the transformers model lm-eval's HFLM wraps; `presets`
holds the published task lists; ``tasks/`` holds small local tasks that need no network.
"""
