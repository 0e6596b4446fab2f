"""``bench/device/``: the wheels carried to the device machine stay in step with the project's pins and with the
stack the test suite runs on, and its scripts parse."""

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
# carried at another version than the local stack's, and why
OTHER_VERSION = {"zstd": "the local 1.5.7.2 has no Python 3.12 wheel and the newer ones are yanked"}
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


def test_carried_versions_are_the_tested_stacks():
    for name, version in carried().items():
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            pytest.fail(f"wheels.txt carries {name}, which the project's own install does not have")
        if name in OTHER_VERSION:
            assert installed != version, f"{name}: the same version now; drop it from OTHER_VERSION"
            continue
        assert installed == version, f"{name}: carried {version}, tested with {installed}"


@pytest.mark.parametrize("script", ["fetch_wheels.sh", "setup.sh", "run.sh"])
def test_scripts_parse(script):
    subprocess.run(["bash", "-n", str(DEVICE / script)], check=True)
