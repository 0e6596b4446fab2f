"""Parts of the quality benchmark (``bench/quality.py`` is its entry point).

``miniature``: a source small enough for 2 CPU cores (its own tokenizer, trained from scratch to a
plateau and cached), so that pruning gets the tokens per source parameter the paper's runs had.
"""
