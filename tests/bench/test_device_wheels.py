"""``bench/device/``: the wheels carried to the device machine meet the project's pins and belong to the stack the
test suite runs on, and its scripts parse."""

from __future__ import annotations

import ast
import subprocess
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[2]
DEVICE = REPO / "bench" / "device"
# the image's own: torch and numpy are built together there, and a torch wheel is far over what a call carries
IMAGE_OWN = {"torch", "torchvision", "numpy"}


def carried() -> dict[str, str]:
    pins = {}
    for line in (DEVICE / "wheels.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"wheels.txt: {line!r} is not name==version"
            pins[canonicalize_name(name)] = version
    return pins


def install_requires() -> list[Requirement]:
    tree = ast.parse((REPO / "setup.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and any(
            getattr(t, "id", "") == "INSTALL_REQUIRES" for t in node.targets
        ):
            return [Requirement(r) for r in ast.literal_eval(node.value)]
    raise AssertionError("setup.py has no INSTALL_REQUIRES")


def test_carried_versions_meet_the_projects_pins():
    pins = carried()
    for requirement in install_requires():
        name = canonicalize_name(requirement.name)
        if name in pins:
            assert requirement.specifier.contains(pins[name], prereleases=True), (name, pins[name])
    assert {"mosaicml", "mosaicml-streaming", "transformers", "omegaconf", "huggingface-hub"} <= set(pins)
    assert not IMAGE_OWN & set(pins)


def test_every_carried_package_is_part_of_the_tested_stack():
    """A carried package the project's own install lacks is a stale entry. (Versions the project does not pin are
    whatever the resolver picked that day, here and there alike, so only the pinned ones are compared, above.)"""
    for name in carried():
        try:
            metadata.version(name)
        except metadata.PackageNotFoundError:
            pytest.fail(f"wheels.txt carries {name}, which the project's own install does not have")


@pytest.mark.parametrize("script", ["fetch_wheels.sh", "setup.sh", "run.sh"])
def test_scripts_parse(script):
    subprocess.run(["bash", "-n", str(DEVICE / script)], check=True)
