"""A training run's plan set against the devices it finds, said before anything is loaded.

At start-up, before the source's weights are read, the run's plan (:mod:`llmshearing.planning.plan`, from
the validated recipe and the ``config.json`` of the source and the teacher) is compared with the devices
detected: with CUDA, one GPU per rank (the world size) of the memory of this rank's GPU; on CPU, the host
memory (``MemTotal`` of ``/proc/meminfo``) shared by the node's ranks, each rank's share planned like a
GPU's (90%, less 1 GiB). When a stage or the start-up host memory does not fit, one warning line names the
stage, the shortfall and what to change. It is never an error: the plan is an estimate.

``LLMSHEARING_DEVICE_MEMORY`` (e.g. ``40GB``, binary units) replaces the detected memory: per GPU with
CUDA, the node's host memory on CPU. It checks a launch for smaller devices, and is what the tests use.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmshearing.planning.plan import Hardware, Plan, make_plan

if TYPE_CHECKING:
    from llmshearing.training.run_config import RunConfig

MEMORY_ENV = "LLMSHEARING_DEVICE_MEMORY"


def host_memory_bytes(meminfo: str | Path = "/proc/meminfo") -> int:
    """The host's memory (``MemTotal``), from ``/proc/meminfo``, else from ``os.sysconf``."""
    try:
        for line in Path(meminfo).read_text(encoding="utf-8").splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def uses_gpus(device: str | None) -> bool:
    """Whether the run computes on CUDA GPUs (``device: gpu``, or unset with CUDA present)."""
    import torch

    return device != "cpu" and torch.cuda.is_available()


def detected_hardware(
    device: str | None, world: int, local_world: int, environ: Mapping[str, str] | None = None
) -> tuple[Hardware, str]:
    """The devices this run finds, as the planner's :class:`Hardware`, and a phrase naming them."""
    from llmshearing.planning.commands import gib, parse_size

    environ = os.environ if environ is None else environ
    given = environ.get(MEMORY_ENV)
    memory = parse_size(given, MEMORY_ENV) if given else None
    stated = f" ({MEMORY_ENV})" if given else ""
    if uses_gpus(device):
        import torch

        if memory is None:
            memory = torch.cuda.get_device_properties(int(environ.get("LOCAL_RANK", "0"))).total_memory
        name = f"{world} x {gib(memory)} GPU{'s' if world > 1 else ''}{stated}"
        host = host_memory_bytes()  # the start-up reads are checked against the node's host memory
        return Hardware(gpus=world, gpu_memory=memory, gpus_per_node=local_world, host_memory=host), name
    host = host_memory_bytes() if memory is None else memory
    share = f", {gib(host // local_world)} per rank" if local_world > 1 else ""
    name = f"{gib(host)} of host memory{stated} for {local_world} CPU rank{'s' if local_world > 1 else ''}{share}"
    hardware = Hardware(
        gpus=world, gpu_memory=host // local_world, gpus_per_node=local_world, host_memory=host
    )
    return hardware, name


def _config_of(path: str) -> Any:
    """The ``ModelConfig`` of a checkpoint from its ``config.json`` alone (None if unreadable: the load says why)."""
    from llmshearing.checkpoint.reading import model_config_if_readable

    return model_config_if_readable(path)


def run_plan(cfg: RunConfig, hardware: Hardware) -> Plan | None:
    """The plan of a validated recipe on ``hardware``; None when the source's or teacher's config is unreadable."""
    from llmshearing.planning.plan import run_shape

    student = _config_of(cfg.model.path)
    distillation = cfg.model.distillation
    teacher = _config_of(distillation.teacher) if distillation is not None else None
    if student is None or (distillation is not None and teacher is None):
        return None
    return make_plan(run_shape(cfg, student, teacher), hardware)


def _what_to_change(plan: Plan, ranks: int, gpus: bool) -> str:
    """The plan's first change as a key to set, else more devices, else bigger ones."""
    keys = [change for change in plan.changes if not change.override.startswith("--")]
    if keys:
        return f"set {keys[0].override} ({keys[0].why})"
    kind = "GPUs" if gpus else "ranks"
    if plan.fewest is not None and plan.fewest > ranks:
        return f"launch on {plan.fewest} {kind} of this size (composer -n {plan.fewest})"
    return "no setting makes it fit here: use devices with more memory"


def fit_warning(
    cfg: RunConfig, world: int, local_world: int, environ: Mapping[str, str] | None = None
) -> str | None:
    """One warning line when the run's plan does not fit the detected devices, else None."""
    from llmshearing.planning.commands import gib

    hardware, devices = detected_hardware(cfg.device, world, local_world, environ)
    plan = run_plan(cfg, hardware)
    if plan is None:
        return None
    gpus = uses_gpus(cfg.device)
    per = "GPU" if gpus else "rank"
    if plan.failing:
        stage = plan.failing[0]
        room = (
            f"{gib(stage.total - hardware.usable)} more than the {gib(hardware.usable)} each leaves"
            if hardware.usable > 0
            else f"and {gib(hardware.gpu_memory)} per {per} leaves nothing once 10% and 1 GiB are set aside"
        )
        short = f"{stage.name} needs {gib(stage.total)} per {per}, {room}"
        change = _what_to_change(plan, world, gpus)
    elif not plan.host_fits:
        host = hardware.host_memory or 0
        short = (
            f"start-up reads {gib(plan.host_total)} into host memory, {gib(plan.host_total - host)} more than "
            f"the node's {gib(host)}"
        )
        mixed = plan.shape.fsdp and not plan.shape.rank0_loading and local_world > 1
        change = (
            "set model.init_device=mixed (rank 0 alone reads the source)" if mixed else "use more host memory"
        )
    else:
        return None
    return (
        f"warning: the plan (an estimate) does not fit {devices}: {short}; {change}; "
        "`llmshearing plan` shows the whole plan; the run goes on"
    )


def warn_if_plan_does_not_fit(cfg: RunConfig, world: int, local_world: int) -> str | None:
    """Print :func:`fit_warning`'s line (stderr) when there is one; never raises (the plan is an estimate)."""
    import sys

    try:
        line = fit_warning(cfg, world, local_world)
    except Exception as err:  # an estimate must never stop a run (a bad LLMSHEARING_DEVICE_MEMORY included)
        line = f"warning: the run's plan was not checked against the devices ({err})"
    if line is not None:
        print(f"llmshearing: {line}", file=sys.stderr, flush=True)
    return line
