"""The former import path of the Hugging Face config mapping, kept for code written against it: new code
imports :mod:`llmshearing.hf.config`."""

from llmshearing.hf.config import hf_config_from_model as hf_config_from_model
