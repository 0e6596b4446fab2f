"""Parts of the quality benchmark (``bench/quality.py`` is its entry point: options and ``main``).

``budget``: the token budget T, the stages of each arm and their FLOPs.
``sources``: the source model and its data, the switch to the miniature, and the evaluation helpers.
``arms``: the recipe overrides of each stage, one-shot pruning, the scratch initialisation, ``run_arm``.
``study``: the study's variants, their ranking on the eval split and its markdown.
``report``: rows per arm over the seeds, the targets, the markdown tables and the written records.
``downstream``: the downstream tasks built from the test split and the lm-eval tasks.
``miniature``: a source small enough for 2 CPU cores (its own tokenizer, trained from scratch to a
plateau and cached), so that pruning gets the tokens per source parameter the paper's runs had.
"""
