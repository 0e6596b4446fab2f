"""The former import path of ``from_pretrained`` and ``load_teacher``, kept for code written against it: new
code imports :mod:`llmshearing.checkpoint.loading`."""

from llmshearing.checkpoint.loading import from_pretrained as from_pretrained
from llmshearing.checkpoint.loading import load_teacher as load_teacher
