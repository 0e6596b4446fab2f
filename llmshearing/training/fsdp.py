"""Composer's FSDP at run time: the teacher sharded as the student is, and the gradients under FSDP.

Which FSDP a recipe runs, and what Composer is handed, is settled before anything loads
(:mod:`llmshearing.training.fsdp_settings`).

Parameters of model children marked ``_fsdp_wrap = False`` (the L0 module) stay whole on every rank.
:class:`FSDPGradients` averages their gradients across ranks, as DDP would, and clips the gradients
by the norm over all parameters, sharded or not, exactly as one process would. On CPU (gloo) it also
corrects FSDP2's sharded gradients, which torch 2.7 sums over the ranks instead of averaging.
A distillation teacher, outside the student's module tree, is sharded by :func:`shard_teacher`; a run
folder every node must see is checked by :func:`check_shared_run_folder`.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as tdist
from composer.core import Algorithm, Event, State
from composer.loggers import Logger
from torch import Tensor, nn

from llmshearing.training.fsdp_settings import FSDPConfigError

if TYPE_CHECKING:
    from llmshearing.models.teacher import Teacher
    from llmshearing.training.fsdp_settings import FSDPPlan

CLIPPING_TYPES = ("norm", "value")  # what FSDPGradients clips by


# --------------------------------------------------------------------------------- the teacher
def broadcast_from_rank0(module: nn.Module, full_state: dict[str, Tensor], device: torch.device) -> None:
    """Give every rank rank 0's weights of ``module`` (sharded by ``fully_shard`` or whole); collective.

    Rank 0 passes its full state dict (taken before sharding) and holds real tensors; the other ranks pass
    ``{}`` and hold ``module`` on the meta device, which is materialised here and filled from rank 0.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    if any(t.is_meta for t in (*module.parameters(), *module.buffers())):
        module.to_empty(device=device)
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=True)
    set_model_state_dict(module, full_state, options=options)


def shard_teacher(
    teacher: Teacher,
    plan: FSDPPlan,
    device: torch.device,
    from_rank0: bool = False,
    weights: str | None = None,
) -> str:
    """Shard a distillation teacher's blocks over the ranks as the student is; returns a one-line summary.

    The teacher sits outside the student's module tree, so Composer does not wrap it. Its blocks are
    sharded here with FSDP2's ``fully_shard`` (whichever FSDP the student runs), each gathered for its
    forward and freed after it; ``HYBRID_SHARD`` shards within a node and replicates across nodes,
    ``NO_SHARD`` keeps the teacher whole. The embeddings, final norm and output head stay whole on
    every rank: the distillation loss applies the head to one chunk of positions at a time, outside
    the teacher's forward. Every rank must call this (it communicates).

    ``from_rank0`` (``model.init_device: mixed``): rank 0 alone read the teacher, the other ranks hold it
    on the meta device; once sharded, every rank's part is broadcast from rank 0.

    ``weights`` (the teacher's sharded weights, ``model.dcp/``): every rank holds the teacher on the meta
    device; once sharded, each rank fills its own slices from the shard files (and the parts kept whole in
    full), one stored tensor at a time, as the source's sharded weights fill the student.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    decoder = teacher.module()
    on_meta = any(p.is_meta for p in decoder.parameters())
    if not on_meta:
        decoder = decoder.to(device)
    total = sum(p.numel() for p in decoder.parameters())
    world = tdist.get_world_size() if tdist.is_initialized() else 1
    from_rank0 = from_rank0 and world > 1 and weights is None
    full_state = decoder.state_dict() if from_rank0 and tdist.get_rank() == 0 else {}
    if world == 1 or plan.sharding_strategy == "NO_SHARD":
        if from_rank0:
            broadcast_from_rank0(decoder, full_state, device)
            teacher.set_module(decoder)
        elif weights is not None:
            _fill_teacher(decoder, weights, device)
            teacher.set_module(decoder)
        return f"distillation teacher: whole on every rank ({total:,} parameters)"
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    hybrid = plan.sharding_strategy in ("HYBRID_SHARD", "_HYBRID_SHARD_ZERO2") and world > local_world
    if hybrid:
        if world % local_world:
            raise FSDPConfigError(
                f"fsdp_config.sharding_strategy={plan.sharding_strategy} needs the same number of ranks on "
                f"every node; {world} ranks do not split into nodes of {local_world}"
            )
        mesh = init_device_mesh(
            device.type, (world // local_world, local_world), mesh_dim_names=("node", "rank")
        )
        where = f"within each node ({local_world} ranks), replicated across {world // local_world} nodes"
    else:
        mesh = init_device_mesh(device.type, (world,))
        where = f"over {world} ranks"
    for block in decoder.layers:
        fully_shard(block, mesh=mesh, reshard_after_forward=True)
    own = {p for name, p in decoder.named_parameters() if not name.startswith("layers.")}
    fully_shard(
        decoder, mesh=mesh, reshard_after_forward=True, ignored_params=own
    )  # the root: blocks free after use
    if from_rank0:
        broadcast_from_rank0(decoder, full_state, device)
        del full_state
    elif weights is not None:
        _fill_teacher(decoder, weights, device)
    teacher.set_module(decoder)
    local = sum(_local_numel(p) for p in decoder.parameters())
    filled = "; each rank filled its own slices from the sharded weights" if weights is not None else ""
    return (
        f"distillation teacher: blocks sharded {where}; embeddings, final norm and head whole; "
        f"{local:,} of {total:,} parameters on this rank{filled}"
    )


def _fill_teacher(decoder: nn.Module, weights: str, device: torch.device) -> None:
    """Give the teacher (sharded or whole, on the meta device) storage on ``device`` and fill each rank's part
    from ``weights`` (collective under a process group)."""
    from llmshearing.checkpoint.sharded import fill_from_sharded_weights

    decoder.to_empty(device=device)
    fill_from_sharded_weights(decoder, weights)


def _local_numel(param: Tensor) -> int:
    from torch.distributed.tensor import DTensor

    return param.to_local().numel() if isinstance(param, DTensor) else param.numel()


# --------------------------------------------------------------------------------- gradients
def unsharded_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Parameters of the children that FSDP leaves whole (``_fsdp_wrap = False``)."""
    return [
        p
        for child in model.children()
        if getattr(child, "_fsdp_wrap", True) is False
        for p in child.parameters()
    ]


def average_across_ranks(tensors: Iterable[Tensor]) -> None:
    """All-reduce ``tensors`` in place to their mean over the ranks (a no-op in one process)."""
    tensors = list(tensors)
    if not tensors or not (tdist.is_available() and tdist.is_initialized()):
        return
    world = tdist.get_world_size()
    if world == 1:
        return
    flat = torch.cat([t.reshape(-1).float() for t in tensors])
    tdist.all_reduce(flat)
    flat.div_(world)
    offset = 0
    for t in tensors:
        n = t.numel()
        t.copy_(flat[offset : offset + n].view_as(t))
        offset += n


def _sharded_norm_squared(model: nn.Module, sharded: list[nn.Parameter]) -> Tensor:
    """Squared 2-norm of the gradients of the FSDP-managed parameters over all ranks."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.tensor import DTensor

    roots = [m for m in model.modules() if isinstance(m, FSDP) and m.check_is_root()]
    if (
        roots
    ):  # FSDP1: each root unit knows its own sharding (also hybrid); inf leaves the gradients as they are
        norms = [root.clip_grad_norm_(max_norm=math.inf).float() for root in roots]
        return torch.stack([n * n for n in norms]).sum()
    grads = [p.grad for p in sharded if p.grad is not None]
    if not grads:
        return torch.zeros(())
    total = torch.zeros((), dtype=torch.float32, device=grads[0].device)
    for g in grads:
        local = g.to_local() if isinstance(g, DTensor) else g
        total = total + local.float().pow(2).sum()
    if any(isinstance(g, DTensor) for g in grads) and tdist.is_initialized():
        tdist.all_reduce(total)  # FSDP2: disjoint shards over the (one-dimensional) data-parallel mesh
    return total


class FSDPGradients(Algorithm):
    """Gradients under FSDP: average the unsharded ones across ranks, then clip like one process.

    Composer's ``GradientClipping`` clips each FSDP1 root unit on its own and nothing under FSDP2;
    here the norm is taken over every parameter (the L0 module's too, unless ``clip_l0`` is false),
    so a sharded run clips exactly as the single-process run does.
    """

    def __init__(
        self, clipping_type: str | None = None, clipping_threshold: float = 1.0, clip_l0: bool = True
    ) -> None:
        if clipping_type is not None and clipping_type not in CLIPPING_TYPES:
            raise ValueError(
                f"algorithms.gradient_clipping.clipping_type={clipping_type!r} is not available with FSDP; "
                f"use one of {list(CLIPPING_TYPES)}"
            )
        self.clipping_type, self.clipping_threshold, self.clip_l0 = clipping_type, clipping_threshold, clip_l0

    def __repr__(self) -> str:
        return f"FSDPGradients(clipping_type={self.clipping_type!r}, threshold={self.clipping_threshold})"

    def match(self, event: Event, state: State) -> bool:
        return event == Event.AFTER_TRAIN_BATCH

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        del event, logger
        model = state.model
        unsharded = unsharded_parameters(model)
        average_across_ranks(p.grad for p in unsharded if p.grad is not None)
        _undo_summed_fsdp2_gradients(model)
        if self.clipping_type is not None:
            self.clip(model, unsharded)

    @torch.no_grad()
    def clip(self, model: nn.Module, unsharded: list[nn.Parameter]) -> None:
        unsharded_ids = {id(p) for p in unsharded}
        sharded = [p for p in model.parameters() if id(p) not in unsharded_ids]
        l0 = getattr(model, "l0_module", None)
        l0_ids = {id(p) for p in l0.parameters()} if l0 is not None and not self.clip_l0 else set()
        replicated = [p for p in unsharded if id(p) not in l0_ids]
        clipped = [p for p in (*sharded, *replicated) if p.grad is not None]
        if self.clipping_type == "value":
            for p in clipped:
                p.grad.clamp_(-self.clipping_threshold, self.clipping_threshold)
            return
        squared = _sharded_norm_squared(model, sharded)
        for p in replicated:
            if p.grad is not None:
                squared = squared + p.grad.float().pow(2).sum().to(squared.device)
        total = squared.sqrt()
        coefficient = float(torch.clamp(self.clipping_threshold / (total + 1e-6), max=1.0))
        for p in clipped:
            p.grad.mul_(coefficient)


@functools.cache
def _gloo_average_sums() -> bool:
    """Whether gloo's reduce-scatter with ``ReduceOp.AVG`` returns the sum (torch 2.7 on CPU does).

    FSDP2 reduces fp32 gradients with ``AVG``; where the backend sums instead, the sharded gradients
    come out ``world_size`` times too large (pytorch/pytorch#162338). Probed once, collectively.
    """
    if not (tdist.is_initialized() and tdist.get_backend() == "gloo") or tdist.get_world_size() == 1:
        return False
    world = tdist.get_world_size()
    out = torch.zeros(1)
    tdist.reduce_scatter_tensor(out, torch.ones(world), op=tdist.ReduceOp.AVG)
    return bool(out.item() == world)


@torch.no_grad()
def _undo_summed_fsdp2_gradients(model: nn.Module) -> None:
    """Divide FSDP2's sharded gradients by the world size where the backend summed them."""
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in model.parameters() if isinstance(p.grad, DTensor)]
    if grads and _gloo_average_sums():
        world = tdist.get_world_size()
        for g in grads:
            g.to_local().div_(world)


# --------------------------------------------------------------------------------- several nodes
def run_folder_view(save_folder: str, environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """What this process sees of a run folder's resumable state: ``config.json``, the checkpoint
    ``checkpoints/latest-rank0.pt`` points to, and any of that checkpoint's files that are not here."""
    from llmshearing.checkpoint.run_config import run_config_path

    environ = os.environ if environ is None else environ
    latest = os.path.join(save_folder, "checkpoints", "latest-rank0.pt")
    view: dict[str, Any] = {
        "node": environ.get("NODE_RANK", "0"),
        "config": run_config_path(save_folder).is_file(),
        "latest": None,
        "missing": None,
    }
    if os.path.lexists(latest):
        target = os.path.realpath(latest)
        view["latest"] = os.path.basename(target)
        view["missing"] = _missing_checkpoint_files(target)
    return view


def _missing_checkpoint_files(target: str) -> str | None:
    """The files of a full (one file) or sharded (a directory) checkpoint that are not on this node."""
    if not os.path.isdir(target):
        return None if os.path.isfile(target) else os.path.basename(target)
    if not os.path.isfile(os.path.join(target, ".metadata")):
        return ".metadata"
    from torch.distributed.checkpoint import FileSystemReader

    try:
        metadata = FileSystemReader(target).read_metadata()
    except Exception:  # a truncated or foreign index: as good as absent
        return ".metadata (unreadable)"
    files = sorted({info.relative_path for info in (metadata.storage_data or {}).values()})
    absent = [name for name in files if not os.path.isfile(os.path.join(target, name))]
    if not absent:
        return None
    return ", ".join(absent[:3]) + (f" and {len(absent) - 3} more" if len(absent) > 3 else "")


def _describe_view(view: Mapping[str, Any]) -> str:
    config = "config.json" if view["config"] else "no config.json"
    if view["latest"] is None:
        return f"{config} and no checkpoint"
    state = "complete" if view["missing"] is None else f"without {view['missing']}"
    return f"{config} and checkpoint {view['latest']} ({state})"


def unshared_run_folder_error(save_folder: str, views: list[Mapping[str, Any]]) -> str | None:
    """Why autoresume cannot work when the ranks' views of ``save_folder`` differ (else ``None``).

    Rank 0 alone writes ``config.json``, the ``latest-rank0.pt`` link and a sharded checkpoint's
    ``.metadata``, and every rank reads them at resume: with several nodes the folder must be one
    storage they all see.
    """
    reference = views[0]
    fields_compared = ("config", "latest", "missing")
    for rank, view in enumerate(views):
        if any(view[key] != reference[key] for key in fields_compared):
            return (
                f"autoresume: save_folder {save_folder} is not the same on every node: node {reference['node']} "
                f"(rank 0) sees {_describe_view(reference)}, node {view['node']} (rank {rank}) sees "
                f"{_describe_view(view)}; rank 0 alone writes config.json, the checkpoint links and a sharded "
                "checkpoint's .metadata, so with several nodes save_folder must be shared storage every node "
                "mounts at the same path (copy the run folder to every node to resume this run)"
            )
    return None


def check_shared_run_folder(save_folder: str) -> None:
    """Refuse to autoresume unless every rank sees the same run folder (collective; several processes).

    Raises :class:`FSDPConfigError` with :func:`unshared_run_folder_error`'s message, on every rank.
    """
    from composer.utils import dist

    if "://" in save_folder or dist.get_world_size() == 1:
        return
    views = dist.all_gather_object(run_folder_view(save_folder))
    error = unshared_run_folder_error(save_folder, views)
    if error is not None:
        raise FSDPConfigError(error)
