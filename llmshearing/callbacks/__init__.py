"""Composer callbacks of the project: per-domain train metrics (``domain_metrics``), the sample log
(``sample_log``), the distillation teacher's time (``distillation``) and downstream tasks at evaluation
intervals (``eval_tasks``, ``icl_eval``).

Dynamic batch loading has its own package, ``llmshearing.dynamic_loading``. Importing this package
imports nothing; each module is imported where it is used.
"""
