"""The dynamic batch loading README stays true: every key with its default, a runnable functional API."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import numpy as np

from llmshearing.dynamic_loading.config import DataLoadingConfig

README = Path(__file__).resolve().parents[2] / "llmshearing" / "dynamic_loading" / "README.md"


def key_rows() -> dict[str, str]:
    """``{key: default column}`` of the README's keys table."""
    rows = re.findall(r"^\| `(\w+)` \| ([^|]+) \|", README.read_text(), flags=re.M)
    return {key: default.strip() for key, default in rows}


def test_every_key_is_documented_with_its_default():
    documented = key_rows()
    fields = {f.name: f for f in dataclasses.fields(DataLoadingConfig)}
    assert set(fields) <= set(documented), sorted(set(fields) - set(documented))
    for name, field in fields.items():
        default = field.default
        if default is dataclasses.MISSING:
            assert documented[name] == "required", name
        elif default is None:
            # proportion: checked by validate(); update_interval and floor_proportion default to another key
            assert documented[name] in ("none", "required", "`eval_interval`", "`proportion`"), name
        elif isinstance(default, bool):
            assert documented[name] == f"`{str(default).lower()}`", name
        elif isinstance(default, int | float):
            assert float(documented[name].strip("`")) == default, (name, documented[name])
        else:
            assert documented[name] == f"`{default}`", (name, documented[name])


def test_functional_api_example_runs():
    code = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)[-1]
    scope: dict = {}
    exec(compile(code, str(README), "exec"), scope)
    weights, counts = scope["weights"], scope["counts"]
    assert np.isclose(weights.sum(), 1.0) and counts.sum() == 512
    assert weights[1] >= 0.5 * 0.3 - 1e-12  # the floor of min_proportion 0.5
