"""The former path of :mod:`llmshearing.io.staging`, forwarding to it for the modules that still import
the staging helpers from here (``pruning/``)."""

from llmshearing.io.staging import (  # noqa: F401
    check_distinct_outputs,
    output_of_staged,
    remove_stale,
    staged_dir,
    staged_file,
    staging_path,
    write_text_atomic,
)
