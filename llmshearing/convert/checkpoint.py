"""The former import path of the checkpoint readers and writer, kept for code written against it: new code
imports :mod:`llmshearing.checkpoint.format` and :mod:`llmshearing.checkpoint.reading`."""

from llmshearing.checkpoint.format import save_checkpoint as save_checkpoint
from llmshearing.checkpoint.reading import load_checkpoint as load_checkpoint
from llmshearing.checkpoint.reading import open_checkpoint as open_checkpoint
