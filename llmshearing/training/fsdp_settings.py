"""Which FSDP a recipe runs: ``fsdp_config`` checked and translated for Composer, before anything loads.

``fsdp_config`` (llm-foundry's key) turns FSDP on. Composer's FSDP1 (the default) needs CUDA GPUs;
``FSDP_VERSION=2`` in the environment selects FSDP2, which also runs on CPU with gloo. The recipe's
keys are checked here before anything heavy runs, and FSDP1-style keys are translated for FSDP2
(``sharding_strategy`` -> ``reshard_after_forward``) rather than dropped.

What FSDP1 receives is settled here too: activation checkpointing is always non-reentrant (the
reentrant kind re-runs each block's forward inside the backward, where the masks a block receives
from the L0 module are not inputs it can see, so the shared L0 graph is backpropagated twice), and
``HYBRID_SHARD`` gets its two-dimensional mesh (replicas = nodes, shards = ranks per node) from the
launcher's ``WORLD_SIZE`` and ``LOCAL_WORLD_SIZE``, which Composer would otherwise quietly run as
``FULL_SHARD``.

Composer is imported only by the functions that hand it a configuration, so that validating a recipe
(:mod:`llmshearing.training.config`) and planning a run (``llmshearing plan``) do not pay for its import.
"""

from __future__ import annotations

import difflib
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

import torch

from llmshearing.config_base import is_int

SHARDING_STRATEGIES = ("FULL_SHARD", "SHARD_GRAD_OP", "HYBRID_SHARD", "_HYBRID_SHARD_ZERO2", "NO_SHARD")
HYBRID_WITHIN_NODE = {"HYBRID_SHARD": "FULL_SHARD", "_HYBRID_SHARD_ZERO2": "SHARD_GRAD_OP"}  # on one node
FSDP2_RESHARD = {"FULL_SHARD": True, "SHARD_GRAD_OP": False}  # FSDP2 has no hybrid or unsharded mode here
MIXED_PRECISION = ("DEFAULT", "PURE", "FULL")
STATE_DICT_TYPES = ("full", "sharded")


class FSDPConfigError(ValueError):
    """A problem with ``fsdp_config`` or the FSDP environment; the message names the key and the fix."""


@dataclass(frozen=True)
class FSDPPlan:
    """The FSDP a run uses: its version, the settings as the recipe states them, and Composer's form."""

    version: int
    settings: dict[str, Any]
    parallelism: dict[str, Any]  # Composer's ``parallelism_config``
    mesh: tuple[int, int] | None = None  # FSDP1 hybrid sharding: (nodes, ranks per node)
    note: str = ""  # how the strategy runs, when that differs from its name

    @property
    def sharding_strategy(self) -> str:
        return str(self.settings.get("sharding_strategy", "FULL_SHARD")).upper()

    @property
    def runs_as(self) -> str:
        """The sharding strategy Composer is handed (``HYBRID_SHARD`` on one node runs as ``FULL_SHARD``)."""
        if self.version == 1:
            return str(self.parallelism["fsdp"].get("sharding_strategy", "FULL_SHARD"))
        return self.sharding_strategy

    @property
    def state_dict_type(self) -> str:
        return str(self.settings.get("state_dict_type", "full" if self.version == 1 else "sharded"))

    def describe(self) -> str:
        mixed = self.settings.get("mixed_precision", "DEFAULT")
        ac = (
            ", non-reentrant activation checkpointing per block"
            if self.settings.get("activation_checkpointing")
            else ""
        )
        how = self.runs_as
        if self.mesh is not None and self.note:  # a mesh the recipe stated
            replicas, shards = self.mesh
            how += f" over a {replicas} x {shards} mesh: sharded over {shards} ranks, {replicas} replicas"
        elif self.mesh is not None:
            nodes, per_node = self.mesh
            how += f" over a {nodes} x {per_node} mesh: sharded within each node, replicated across {nodes} nodes"
        if self.note and self.mesh is None:
            how += f"; {self.note}"
        return f"FSDP{self.version} ({how}, mixed precision {mixed}, {self.state_dict_type} checkpoints{ac})"


def _composer_fsdp_keys() -> tuple[set[str], set[str]]:
    from composer.utils.parallelism import FSDP2Config, FSDPConfig

    fsdp1 = {f.name for f in fields(FSDPConfig) if not f.name.startswith("_")}
    return fsdp1, FSDP2Config.settable_attrs()


def fsdp_version(environ: Mapping[str, str] | None = None) -> int:
    """The FSDP version Composer runs: ``FSDP_VERSION`` (1 or 2) from the environment, default 1."""
    value = (os.environ if environ is None else environ).get("FSDP_VERSION", "1").strip()
    if value not in ("1", "2"):
        raise FSDPConfigError(
            f"FSDP_VERSION={value!r} in the environment; use FSDP_VERSION=1 or FSDP_VERSION=2"
        )
    return int(value)


def fsdp_enabled(fsdp_config: Any) -> bool:
    """Whether ``fsdp_config`` turns FSDP on: any value but null or false (``{}`` is FSDP with its defaults;
    a value that is not a mapping is on too, and :func:`resolve_fsdp` refuses it). Never raises."""
    return fsdp_config is not None and fsdp_config is not False


def slices_sharded_weights(fsdp_config: Any, path: str, environ: Mapping[str, str] | None = None) -> bool:
    """Whether FSDP2 fills each rank's own slices of the checkpoint at ``path`` from its sharded weights
    (``model.dcp/``, ``convert hf-to-composer --sharded``): FSDP on, ``FSDP_VERSION=2``, and ``path`` has sharded
    weights. The ranks are the caller's to count (a single rank reads everything). Never raises: an
    ``FSDP_VERSION`` that :func:`resolve_fsdp` refuses reads as no, and a missing path has no sharded weights."""
    from llmshearing.checkpoint.reading import is_sharded_source

    if not fsdp_enabled(fsdp_config):
        return False
    try:
        version = fsdp_version(environ)
    except FSDPConfigError:
        return False
    return version == 2 and is_sharded_source(path)


def resolve_fsdp(
    fsdp_config: Mapping[str, Any] | None,
    cuda: bool | None = None,
    environ: Mapping[str, str] | None = None,
) -> FSDPPlan | None:
    """Validate ``fsdp_config`` for this machine; ``None`` when FSDP is off.

    ``environ`` (default: the process environment) supplies ``FSDP_VERSION`` and the launcher's
    ``WORLD_SIZE`` / ``LOCAL_WORLD_SIZE``. Raises :class:`FSDPConfigError` naming the key and the fix:
    an unknown key or value, FSDP1 on a machine without CUDA, a sharding strategy FSDP2 does not offer
    here, reentrant activation checkpointing, ``use_orig_params: false``, a hybrid mesh the ranks do
    not fill.
    """
    if not fsdp_enabled(fsdp_config):
        return None
    if not isinstance(fsdp_config, Mapping):
        raise FSDPConfigError(
            f"fsdp_config must be a mapping (e.g. fsdp_config.sharding_strategy=FULL_SHARD) or null, "
            f"got {fsdp_config!r}"
        )
    cuda = torch.cuda.is_available() if cuda is None else cuda
    environ = os.environ if environ is None else environ
    version = fsdp_version(environ)
    settings = dict(fsdp_config)
    fsdp1_keys, fsdp2_keys = _composer_fsdp_keys()
    for key in settings:
        if key not in fsdp1_keys | fsdp2_keys:
            close = difflib.get_close_matches(key, sorted(fsdp1_keys | fsdp2_keys), n=1)
            hint = f"; did you mean fsdp_config.{close[0]}?" if close else ""
            raise FSDPConfigError(f"unknown config key 'fsdp_config.{key}'{hint}")
    _check_choice(settings, "sharding_strategy", SHARDING_STRATEGIES)
    _check_choice(settings, "mixed_precision", MIXED_PRECISION)
    _check_choice(settings, "state_dict_type", STATE_DICT_TYPES, upper=False)
    for key in BOOLEAN_KEYS:
        if key in settings and not isinstance(settings[key], bool):
            raise FSDPConfigError(f"fsdp_config.{key} must be true or false, got {settings[key]!r}")
    if settings.get("activation_checkpointing_reentrant") is True:
        raise FSDPConfigError(
            "fsdp_config.activation_checkpointing_reentrant: true is not supported: reentrant checkpointing "
            "re-runs each decoder block inside the backward without the pruning masks as inputs and "
            'backpropagates the shared L0 graph twice ("Trying to backward through the graph a second '
            'time"); remove the key (llmshearing always checkpoints non-reentrantly)'
        )
    if settings.get("use_orig_params") is False:
        raise FSDPConfigError(
            "fsdp_config.use_orig_params: false is not supported: the optimizer has three parameter groups "
            "(weights, masks' log-alphas, Lagrange multipliers, each with its own learning rate) and "
            "Composer's FSDP refuses several groups without the original parameters; remove the key"
        )

    if version == 1:
        if not cuda:
            raise FSDPConfigError(
                "fsdp_config asks for FSDP, and Composer's FSDP1 (the default) needs CUDA GPUs, which this machine "
                "lacks; on CPU run FSDP2: set FSDP_VERSION=2 in the environment (FSDP_VERSION=2 composer -n N "
                "llmshearing/train.py ...), or remove fsdp_config (fsdp_config=null) to train without sharding"
            )
        return _fsdp1_plan(settings, environ)

    strategy = str(settings.get("sharding_strategy", "FULL_SHARD")).upper()
    if strategy not in FSDP2_RESHARD:
        raise FSDPConfigError(
            f"fsdp_config.sharding_strategy={strategy} is not available with FSDP2 (FSDP_VERSION=2) in "
            "Composer 0.32.1; use FULL_SHARD or SHARD_GRAD_OP, or FSDP1 on GPUs (unset FSDP_VERSION)"
        )
    from composer.utils.parallelism import FSDP2Config

    translated = {k: v for k, v in settings.items() if k in fsdp2_keys}
    translated.setdefault("reshard_after_forward", FSDP2_RESHARD[strategy])
    with warnings.catch_warnings():  # Composer warns that its FSDP2 API is experimental
        warnings.simplefilter("ignore", UserWarning)
        config = FSDP2Config(**translated)
    return FSDPPlan(2, settings, {"fsdp": config})


BOOLEAN_KEYS = (
    "activation_checkpointing",
    "activation_checkpointing_reentrant",
    "activation_cpu_offload",
    "sync_module_states",
    "use_orig_params",
    "verbose",
)


def launch_topology(environ: Mapping[str, str]) -> tuple[int, int]:
    """``(world size, ranks per node)`` from the launcher's ``WORLD_SIZE`` and ``LOCAL_WORLD_SIZE``.

    Composer's launcher sets both (and ``NODE_RANK``); without them the run is one process.
    """
    try:
        world = int(environ.get("WORLD_SIZE", "1"))
        local = int(environ.get("LOCAL_WORLD_SIZE", str(world)))
    except ValueError as err:
        raise FSDPConfigError(
            f"WORLD_SIZE / LOCAL_WORLD_SIZE in the environment must be integers ({err}); launch with composer -n N"
        ) from None
    if world < 1 or local < 1:
        raise FSDPConfigError(f"WORLD_SIZE={world} and LOCAL_WORLD_SIZE={local} must be positive")
    return world, local


def _fsdp1_plan(settings: dict[str, Any], environ: Mapping[str, str]) -> FSDPPlan:
    """What Composer's FSDP1 is handed: non-reentrant checkpointing and, for hybrid sharding, a 2-D mesh."""
    handed = {**settings, "activation_checkpointing_reentrant": False}
    strategy = str(settings.get("sharding_strategy", "FULL_SHARD"))
    if strategy not in HYBRID_WITHIN_NODE:
        return FSDPPlan(1, settings, {"fsdp": handed})
    world, per_node = launch_topology(environ)
    if world % per_node:
        raise FSDPConfigError(
            f"fsdp_config.sharding_strategy={strategy} needs the same number of ranks on every node; "
            f"WORLD_SIZE={world} ranks do not split into nodes of LOCAL_WORLD_SIZE={per_node}"
        )
    nodes = world // per_node
    replicate = settings.get("data_parallel_replicate_degree")
    shard = settings.get("data_parallel_shard_degree", -1)
    if replicate is not None or shard not in (-1, None):  # a mesh the recipe chose: it must fill the ranks
        given = [d for d in (replicate, None if shard in (-1, None) else shard) if d is not None]
        if not all(is_int(d) and d >= 1 for d in given):
            r = s = 0  # refused below
        elif replicate is None:  # the shard degree given: replicas fill the rest
            s = shard
            r = world // s
        else:
            r = replicate
            s = shard if shard not in (-1, None) else world // r
        if r < 1 or s < 1 or r * s != world:
            raise FSDPConfigError(
                f"fsdp_config.data_parallel_replicate_degree ({replicate}) x data_parallel_shard_degree "
                f"({shard}) must be {world} (the world size); remove both to replicate across the {nodes} "
                f"nodes and shard over the {per_node} ranks of each"
            )
        if r == 1:
            handed["sharding_strategy"] = HYBRID_WITHIN_NODE[strategy]
            return FSDPPlan(1, settings, {"fsdp": handed}, note=f"{strategy} with one replica")
        handed.update(data_parallel_replicate_degree=r, data_parallel_shard_degree=s)
        return FSDPPlan(1, settings, {"fsdp": handed}, mesh=(r, s), note="the recipe's mesh")
    if nodes == 1:  # one node: nothing to replicate across, so hybrid sharding is plain sharding
        handed["sharding_strategy"] = HYBRID_WITHIN_NODE[strategy]
        return FSDPPlan(1, settings, {"fsdp": handed}, note=f"{strategy} on one node")
    handed.update(data_parallel_replicate_degree=nodes, data_parallel_shard_degree=per_node)
    return FSDPPlan(1, settings, {"fsdp": handed}, mesh=(nodes, per_node))


def _check_choice(settings: dict[str, Any], key: str, choices: tuple[str, ...], upper: bool = True) -> None:
    if key not in settings:
        return
    value = settings[key]
    normal = str(value).upper() if upper else str(value).lower()
    if not isinstance(value, str) or normal not in choices:
        raise FSDPConfigError(f"fsdp_config.{key} must be one of {list(choices)}, got {value!r}")
    settings[key] = normal


def ignored_fsdp2_keys(plan: FSDPPlan) -> list[str]:
    """Recipe keys FSDP2 has no counterpart for (reported at start, never silently)."""
    if plan.version != 2:
        return []
    _, fsdp2_keys = _composer_fsdp_keys()
    return sorted(k for k in plan.settings if k not in fsdp2_keys and k != "sharding_strategy")


def with_rank0_loading(plan: FSDPPlan) -> FSDPPlan:
    """The plan for ``model.init_device: mixed`` (rank 0 holds the source, the other ranks build on meta).

    FSDP1 is handed ``sync_module_states: true`` (Composer refuses meta ranks without it; FSDP1 then
    broadcasts rank 0's weights into every shard). FSDP2 gets ``sync_module_states`` too: Composer's FSDP2
    takes rank 0's full state dict, shards, materialises the meta ranks and broadcasts
    (``set_model_state_dict(..., broadcast_from_rank0=True)``), buffers included.
    """
    if plan.version == 1:
        return FSDPPlan(
            1,
            plan.settings,
            {"fsdp": {**plan.parallelism["fsdp"], "sync_module_states": True}},
            plan.mesh,
            plan.note,
        )
    config = plan.parallelism["fsdp"]
    config.sync_module_states = True
    return plan
