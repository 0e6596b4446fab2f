"""What a training run needs before it is launched: per-rank GPU memory, host memory, FLOPs and time.

``memory`` holds the byte counts (pure functions of a :class:`~llmshearing.models.config.ModelConfig`
and the run's settings), ``plan`` turns a validated recipe into a plan per stage and searches for the
fewest GPUs that fit, ``commands`` is the ``llmshearing plan`` command, and ``measure`` counts what a
real training step holds on the CPU (the figures the tests hold the estimates to).
"""
