"""Build the pieces of a Composer run from a validated ``RunConfig``, each from its typed section."""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Any

from composer.core import Algorithm, Callback
from composer.loggers import LoggerDestination

from llmshearing.checkpoint.format import refuse_pruning_checkpoint
from llmshearing.checkpoint.run_config import (
    write_run_description as write_run_description,  # its former home
)
from llmshearing.config_base import SCHEDULERS, ConfigError
from llmshearing.models.composer_model import ComposerLlama
from llmshearing.training.registries import callback_classes, logger_classes
from llmshearing.training.run_config import (
    CallbackSettings,
    LoggerSettings,
    OptimizerSettings,
    RunConfig,
    SchedulerSettings,
)

log = logging.getLogger("llmshearing.train")


def build_model(
    run: RunConfig, domains: list[str], train_dataset: Any = None, resuming: bool = False
) -> tuple[ComposerLlama, dict[str, Any]]:
    """The ComposerLlama initialised from ``model.path``; attaches the L0 module when pruning.

    ``train_dataset`` (the run's train ``StreamingDataset``) is what ``init_from: importance`` calibrates on;
    ``resuming`` (from a checkpoint of the run, which holds the masks) skips that ranking.

    Returns the model and the run description written to ``<save_folder>/config.json``.
    """
    from llmshearing.data.checks import check_vocab

    model_cfg = run.model
    slices = reads_own_slices(run)
    reads = reads_source_here(run) and not slices
    config, state_dict, hf_config = read_source(model_cfg.path, weights=reads)
    refuse_pruning_checkpoint(state_dict, pruning_checkpoint_message(model_cfg.path), ConfigError)
    check_vocab(run.data_local, config.vocab_size, model_cfg.path)  # before any batch is read
    config = config.replace(
        attn_impl=model_cfg.attn_impl, max_seq_len=max(config.max_seq_len, run.max_seq_len)
    )
    source = {"path": os.path.abspath(model_cfg.path), "dtype": stored_dtype(state_dict)}
    model = ComposerLlama(config, domains=domains, init_device="meta")  # no random init: weights come next
    if reads:
        model.model.load_state_dict(master_weights(state_dict), strict=True, assign=True)
    elif slices:  # storage reserved but untouched; each rank fills its shards at Event.BEFORE_LOAD
        model.model.to_empty(device="cpu")
    del state_dict  # rank 0's tensors now live in the model only
    description = {
        "model": config.to_dict(),
        "hf_config": hf_config,
        "l0_module": None,
        "source": source,
        "precision": describe_precision(run.precision, run.device, source["dtype"]),
        "loading": describe_loading(run),
        "train": run.to_dict(),
    }
    if model_cfg.l0_module is not None:
        from llmshearing.pruning import attach_l0_module

        if not reads:  # the L0 module is built for real on every rank: it stays whole, never sharded
            from llmshearing.pruning.l0_module import L0Module

            model.l0_module = L0Module(model.model.config, model_cfg.l0_module)
        l0 = attach_l0_module(model, model_cfg.l0_module)
        description["l0_module"] = l0.l0_config.to_dict()
        if l0.l0_config.init_from is not None and resuming:
            description["l0_init"] = _resumed_ranking(run, str(l0.l0_config.init_from))
        elif l0.l0_config.init_from is not None:  # log-alphas ranked by activation importance of the source
            description["l0_init"] = initialize_masks(
                l0, model.model, run, train_dataset, every_rank=loads_on_every_rank(run)
            )
    distillation = model_cfg.distillation  # its teacher path filled in by validate_config
    if distillation is not None:
        from llmshearing.checkpoint.loading import load_teacher

        dtype = teacher_dtype(run.precision, run.device)
        # read whole (rank 0 or every rank), or built on meta everywhere and filled in slices once sharded
        on_meta = not reads_source_here(run) or teacher_reads_own_slices(run)
        teacher = load_teacher(distillation.teacher, dtype, model_cfg.attn_impl, on_meta=on_meta)
        model.attach_teacher(teacher, distillation)
        description["distillation"] = distillation.to_dict()
    return model, description


def loads_on_every_rank(run: RunConfig) -> bool:
    """Whether every rank reads the source and the teacher (``model.init_device: cpu``, or one process)."""
    from composer.utils import dist

    return run.model.init_device != "mixed" or dist.get_world_size() == 1


def reads_source_here(run: RunConfig) -> bool:
    """Whether this rank reads the source's (and the teacher's) weights: every rank, or rank 0 alone with
    ``model.init_device: mixed`` (the others build on ``meta`` and FSDP broadcasts rank 0's weights)."""
    from composer.utils import dist

    return loads_on_every_rank(run) or dist.get_global_rank() == 0


def reads_own_slices(run: RunConfig) -> bool:
    """Whether each rank reads only its own shards of the source: an FSDP2 run on several ranks from sharded
    weights (``model.dcp/``), unless ``init_from: importance`` needs the whole model before sharding."""
    from composer.utils import dist

    from llmshearing.training.fsdp_settings import slices_sharded_weights

    l0 = run.model.l0_module
    return (
        dist.get_world_size() > 1
        and slices_sharded_weights(run.fsdp_config, run.model.path)
        and (l0 is None or l0.init_from != "importance")
    )


def teacher_reads_own_slices(run: RunConfig) -> bool:
    """Whether each rank reads only its own shards of the distillation teacher: an FSDP2 run on several ranks
    whose teacher has sharded weights (``model.dcp/``), whatever the source is. Every rank builds the teacher
    on ``meta``; :func:`llmshearing.training.fsdp.shard_teacher` shards its blocks and fills each rank's slices
    (the embeddings, final norm and head, whole on every rank, are read whole by every rank)."""
    from composer.utils import dist

    from llmshearing.training.fsdp_settings import slices_sharded_weights

    distillation = run.model.distillation
    return (
        distillation is not None
        and dist.get_world_size() > 1
        and slices_sharded_weights(run.fsdp_config, distillation.teacher)
    )


def teacher_weights(run: RunConfig) -> str | None:
    """The sharded weights directory each rank fills its teacher shards from (``None``: read whole)."""
    from llmshearing.checkpoint.sharded import sharded_weights_dir

    if not teacher_reads_own_slices(run):
        return None
    return str(sharded_weights_dir(run.model.distillation.teacher))


class ShardedSourceFill(Callback):
    """Fill the FSDP2-sharded student from the sharded source, each rank its own slices, at
    ``Event.BEFORE_LOAD`` (after Composer has sharded the model, before a checkpoint is resumed)."""

    def __init__(self, weights: str) -> None:
        self.weights = weights

    def before_load(self, state: Any, logger: Any) -> None:
        del logger
        from llmshearing.checkpoint.sharded import fill_from_sharded_weights

        fill_from_sharded_weights(state.model.model, self.weights)


def describe_loading(run: RunConfig) -> str:
    """Which ranks read the source (and the teacher) into host memory; said at start-up, kept in config.json."""
    from composer.utils import dist

    world = dist.get_world_size()
    distilling = run.model.distillation is not None
    sliced_teacher = distilling and teacher_reads_own_slices(run)
    teacher = (
        f"; teacher read in slices: each of the {world} ranks builds it on meta and reads its own shards of "
        "the teacher's sharded weights (model.dcp/) once its blocks are sharded, one stored tensor at a time "
        "(the embeddings, final norm and head whole on every rank; no rank holds the whole teacher)"
        if sliced_teacher
        else ""
    )
    if reads_own_slices(run):
        if distilling and not sliced_teacher:
            rank0 = not loads_on_every_rank(run)
            teacher = f"; the teacher read whole {'on rank 0' if rank0 else 'on every rank'}"
        return (
            f"source read in slices: each of the {world} ranks reads its own shards of the sharded weights "
            "(model.dcp/) once FSDP2 has sharded the model, one stored tensor at a time (each file passes "
            f"through every rank, no rank holds the whole model){teacher}"
        )
    what = "source and teacher" if distilling and not sliced_teacher else "source"
    if world == 1:
        where = f"{what} read in the one process"
    elif loads_on_every_rank(run):
        where = f"{what} read on every rank ({world} of {world} ranks, model.init_device=cpu)"
    else:
        where = (
            f"{what} read on rank 0 (1 of {world} ranks, model.init_device=mixed), the other ranks built on "
            "meta; broadcast to the shards once FSDP has wrapped the model"
        )
    return where + sharded_source_note(run.model.path) + teacher


def sharded_source_note(path: str) -> str:
    """What the start-up line adds for a source with sharded weights (``model.dcp/``): how they are read.

    Each reading rank assembles the whole model from the shard files one tensor at a time (the peak is the
    fp32 model plus one stored tensor); :func:`reads_own_slices` runs read slices instead.
    """
    from llmshearing.checkpoint.reading import is_sharded_source

    if not is_sharded_source(path):
        return ""
    return (
        "; the source's sharded weights (model.dcp/) are read one tensor at a time into each reading rank's "
        "whole model (each rank reads only its own slices under FSDP2 on several ranks without "
        "init_from: importance)"
    )


def read_source(path: str, weights: bool = True) -> tuple[Any, dict[str, Any], dict[str, Any] | None]:
    """``(ModelConfig, tensors, hf_config)`` of the source checkpoint.

    With ``weights=False`` nothing but the config and the tensors' metadata is read: the tensors' places
    hold :class:`~llmshearing.checkpoint.tensor_io.TensorMeta` (dtype and shape), enough for the checks and
    the run description that every rank makes alike.
    """
    from llmshearing.checkpoint.reading import load_checkpoint, open_checkpoint

    if weights:
        return load_checkpoint(path)
    with open_checkpoint(path) as ckpt:
        return ckpt.config, {key: ckpt.tensors.meta(key) for key in ckpt.tensors.keys()}, ckpt.hf_config


MASTER_DTYPE_NAME = "fp32"  # what the optimizer steps, whatever the source checkpoint stores


def stored_dtype(state_dict: dict[str, Any]) -> str:
    """The dtype the source checkpoint stores its floating weights in ("bf16", "fp32", ...; "a+b" if mixed).

    The values are tensors or anything else with a ``dtype`` (a ``TensorMeta`` on a rank that reads no weights).
    """
    from llmshearing.checkpoint.format import TORCH_DTYPES

    names = {dtype: name for name, dtype in TORCH_DTYPES.items()}
    found = sorted(
        {names.get(t.dtype, str(t.dtype)) for t in state_dict.values() if t.dtype.is_floating_point}
    )
    return "+".join(found) or MASTER_DTYPE_NAME


def master_weights(state_dict: dict[str, Any]) -> dict[str, Any]:
    """The source's floating tensors as fp32 master weights (integer tensors unchanged), one at a time.

    The model takes these tensors as its parameters (``assign=True``), so their dtype is what the
    optimizer steps: a bf16 source kept as it is would lose every update below bf16's resolution.
    """
    import torch

    for key, tensor in state_dict.items():
        if tensor.is_floating_point() and tensor.dtype != torch.float32:
            state_dict[key] = tensor.to(torch.float32)
    return state_dict


def effective_precision(requested: str, device: str | None = None) -> str:
    """The compute precision Composer runs: mixed precision needs a GPU, else fp32."""
    import torch

    if requested.startswith("amp_") and (device == "cpu" or not torch.cuda.is_available()):
        return "fp32"
    return requested


def describe_precision(requested: str, device: str | None, source_dtype: str) -> dict[str, str]:
    """What the run's weights, compute and checkpoints hold (kept in config.json, said at start-up)."""
    return {
        "source": source_dtype,
        "weights": MASTER_DTYPE_NAME,
        "compute": effective_precision(requested, device),
        "checkpoint": MASTER_DTYPE_NAME,
    }


def precision_line(precision: dict[str, str]) -> str:
    """One phrase for the start-up line, e.g. ``weights fp32 (source bf16), compute amp_bf16, ...``."""
    source = precision["source"]
    converted = f" (source {source}, upcast)" if source != precision["weights"] else ""
    return (
        f"weights {precision['weights']}{converted}, compute {precision['compute']}, "
        f"checkpoints {precision['checkpoint']}"
    )


def teacher_dtype(precision: str, device: str | None) -> Any:
    """The frozen teacher's stored precision: the run's half precision on a GPU, else fp32."""
    import torch
    from composer.utils import get_device

    if get_device(device).name != "gpu":
        return torch.float32
    return {"amp_bf16": torch.bfloat16, "amp_fp16": torch.float16}.get(precision, torch.float32)


def _resumed_ranking(run: RunConfig, source: str) -> dict[str, Any]:
    """A resumed pruning run's masks come from its checkpoint: the ranking (``init_from``) is not redone, and
    config.json keeps what the run's first start recorded of it."""
    from composer.utils import dist

    from llmshearing.checkpoint.run_config import read_run_description

    if dist.get_global_rank() == 0:
        print(
            "llmshearing: mask ranking not redone: the run resumes with the masks its checkpoint holds",
            flush=True,
        )
    previous = read_run_description(run.resolved_save_folder()) or {}
    return previous.get("l0_init") or {"source": source, "resumed": True}


def initialize_masks(
    l0: Any, decoder: Any, run: RunConfig, dataset: Any = None, every_rank: bool = True
) -> dict[str, Any]:
    """Rank the L0 module's log-alphas (``init_from``) before training; every rank must call this.

    ``init_from: importance`` calibrates on ``init_samples`` train samples read through the run's
    train ``dataset`` (the same streams and local cache as training: only the shards holding those
    samples are downloaded or decompressed). Every rank calibrates on its share, on its device in the
    run's precision, and the activation sums are all-reduced: no rank waits through another's whole
    calibration (only for the slowest share, well inside ``dist_timeout``), the calibration takes
    1 / world size of the time, and the ranking is the one a single process computes. Without a
    ``dataset`` (or for a scores file) rank 0 reads ``data_local`` (or the file) alone. Rank 0's
    log-alphas are then broadcast, so every rank starts bit-identical. The decoder goes back to the
    CPU afterwards. ``every_rank=False`` (``model.init_device: mixed``: the other ranks' decoders are on
    ``meta``) has rank 0 calibrate alone on the first ``init_samples`` samples of ``dataset``. Returns
    what it cost (logged and kept in config.json).
    """
    import time

    import torch
    from composer.utils import dist, get_device

    from llmshearing.pruning.ranking import initialize_from_importance

    device = get_device(run.device)
    target = torch.device("cuda") if device.name == "gpu" else torch.device("cpu")
    autocast_dtype = {"amp_bf16": torch.bfloat16, "amp_fp16": torch.float16}.get(run.precision)
    rank, world = dist.get_global_rank(), dist.get_world_size()
    source = l0.l0_config.init_from
    shared = source == "importance" and dataset is not None and every_rank  # every rank calibrates its share
    start = time.perf_counter()
    if rank == 0 and source == "importance":
        samples = l0.l0_config.init_samples
        how = (
            f"up to {-(-samples // world)} per rank on {world} ranks" if shared and world > 1 else "on rank 0"
        )
        print(
            f"llmshearing: ranking the masks by importance: calibrating on {samples} train samples ({how}) "
            f"on {target.type}",
            flush=True,
        )
    if shared or rank == 0:
        home = next(decoder.parameters()).device
        decoder.to(target)
        context = (
            torch.autocast(target.type, dtype=autocast_dtype)
            if autocast_dtype is not None and target.type == "cuda"
            else contextlib.nullcontext()
        )
        try:
            with context:
                initialize_from_importance(
                    l0,
                    decoder,
                    run.data_local,
                    run.device_eval_batch_size,
                    dataset=dataset if shared or not every_rank else None,
                    rank=rank if shared else 0,
                    world_size=world if shared else 1,
                    progress=rank == 0,
                )
        finally:
            decoder.to(home)
    if world > 1:  # every rank starts from rank 0's ranking, bit for bit
        for log_alpha in l0.log_alpha.values():
            carrier = log_alpha.detach().to(target)
            dist.broadcast(carrier, src=0)
            with torch.no_grad():
                log_alpha.copy_(carrier.to(log_alpha.device))
    cost = {
        "source": str(source),
        "device": target.type,
        "precision": run.precision if target.type == "cuda" else "fp32",
        "ranks": world if shared else 1,
        "seconds": round(time.perf_counter() - start, 3),
    }
    log.info("mask initialisation (%s) took %.1f s on %s", cost["source"], cost["seconds"], cost["device"])
    if rank == 0 and source == "importance":
        print(f"llmshearing: mask ranking calibrated in {cost['seconds']:.1f} s", flush=True)
    if rank == 0 and l0.held:
        print(f"llmshearing: {l0.held_note}", flush=True)
    return cost


def pruning_checkpoint_message(path: str) -> str:
    """Why ``model.path`` must be a dense model: a pruning checkpoint's masks would silently be dropped."""
    return (
        f"model.path {path} is a pruning run's checkpoint (it holds l0_module.* masks), and training it "
        f"would drop the masks and train the unpruned model; fold it first with `llmshearing prune-model "
        f"{path} OUT` and set model.path=OUT (to continue the pruning run itself, train into its "
        "save_folder with autoresume=true)"
    )


def build_optimizer(opt: OptimizerSettings, model: ComposerLlama):
    from composer.optim import DecoupledAdamW

    if opt.name != "decoupled_adamw":
        raise ValueError(f"optimizer.name {opt.name!r} is not supported; use decoupled_adamw")
    if model.l0_module is not None:
        from llmshearing.pruning import l0_param_groups

        l0 = model.l0_module.l0_config
        groups = l0_param_groups(model, opt.lr, l0.mask_lr, l0.multiplier_lr)
    else:
        groups = [{"params": [p for p in model.parameters() if p.requires_grad]}]
    return DecoupledAdamW(
        groups, lr=opt.lr, betas=tuple(opt.betas), eps=opt.eps, weight_decay=opt.weight_decay
    )


def build_scheduler(sched: SchedulerSettings):
    from composer.optim import (
        ConstantWithWarmupScheduler,
        CosineAnnealingWithWarmupScheduler,
        LinearWithWarmupScheduler,
    )

    name = sched.name
    t_max = sched.t_max or "1dur"
    if name == "cosine_with_warmup":
        return CosineAnnealingWithWarmupScheduler(t_warmup=sched.t_warmup, t_max=t_max, alpha_f=sched.alpha_f)
    if name == "linear_with_warmup":
        return LinearWithWarmupScheduler(t_warmup=sched.t_warmup, t_max=t_max, alpha_f=sched.alpha_f)
    if name == "constant_with_warmup":
        return ConstantWithWarmupScheduler(t_warmup=sched.t_warmup, t_max=t_max)
    raise ValueError(f"scheduler.name {name!r} is not supported; use one of {SCHEDULERS}")


def build_algorithms(run: RunConfig, save_folder: str, fsdp: bool = False) -> list[Algorithm]:
    """Gradient clipping (FSDP-aware under FSDP) and, when pruning, ``L0Pruning``."""
    algorithms: list[Algorithm] = []
    clipping = run.algorithms.gradient_clipping
    l0 = run.model.l0_module
    if fsdp:  # Composer's GradientClipping does not see the whole model under FSDP
        from llmshearing.training.fsdp import FSDPGradients

        algorithms.append(
            FSDPGradients(
                clipping_type=clipping.get("clipping_type", "norm") if clipping else None,
                clipping_threshold=float(clipping.get("clipping_threshold", 1.0)) if clipping else 1.0,
                clip_l0=l0.clip_l0_grads if l0 is not None else True,
            )
        )
    elif clipping:
        from composer.algorithms import GradientClipping

        algorithms.append(
            GradientClipping(
                clipping_type=clipping.get("clipping_type", "norm"),
                clipping_threshold=float(clipping.get("clipping_threshold", 1.0)),
            )
        )
    if l0 is not None:
        from llmshearing.pruning import L0Pruning

        algorithms.append(L0Pruning(l0, save_folder=save_folder))
    return algorithms


def build_callbacks(
    callbacks_cfg: CallbackSettings, save_folder: str, distilling: bool = False
) -> list[Callback]:
    """The callbacks the recipe names (``callbacks.<name>``; ``data_loading`` is built by the entry point),
    ``AbsentDomainMetrics`` always and ``TeacherTimeMonitor`` when ``distilling``."""
    from llmshearing.callbacks.domain_metrics import AbsentDomainMetrics

    known = callback_classes()
    callbacks: list[Callback] = [AbsentDomainMetrics()]  # no per-domain train metric for an absent domain
    for name, kwargs in callbacks_cfg.items():
        if name == "data_loading" or kwargs is False:
            continue
        if name == "sample_log":
            callbacks.append(known[name](**{"folder": save_folder, **(kwargs or {})}))
            continue
        callbacks.append(known[name](**(kwargs or {})))
    if distilling:
        from llmshearing.callbacks.distillation import TeacherTimeMonitor

        callbacks.append(TeacherTimeMonitor())
    return callbacks


def build_loggers(loggers_cfg: LoggerSettings, save_folder: str) -> list[LoggerDestination]:
    from llmshearing.training.metrics_logger import MetricsJSONLLogger

    known = logger_classes()
    loggers: list[LoggerDestination] = [MetricsJSONLLogger(save_folder)]
    for name, kwargs in loggers_cfg.items():
        if kwargs is False:
            continue
        kwargs = dict(kwargs or {})
        if name == "file":
            kwargs.setdefault("filename", os.path.join(save_folder, "logs.txt"))
        loggers.append(known[name](**kwargs))
    return loggers


def prepare_eval_tasks(eval_tasks: Any, model_path: str, device_eval_batch_size: int) -> Any:
    """The recipe's ``eval_tasks`` loaded through lm-eval (None without the key), with the tokenizer found
    beside ``model_path``; a task that cannot be scored is a ``ConfigError`` naming its key."""
    from llmshearing.callbacks.eval_tasks import parse_eval_tasks

    config = parse_eval_tasks(eval_tasks)
    if config is None:
        return None
    from llmshearing.callbacks.icl_eval import prepare_eval_tasks as prepare

    return prepare(model_path, device_eval_batch_size, config)


def build_icl_eval(
    run: RunConfig, prepared: Any, model: ComposerLlama, description: dict[str, Any]
) -> Callback:
    """The callback that scores the prepared ``eval_tasks`` on ``model`` at the run's evaluations."""
    from llmshearing.callbacks.icl_eval import InContextEval
    from llmshearing.config_base import batches
    from llmshearing.hf.config import hf_config_from_model

    hf_config = hf_config_from_model(model.config, description.get("hf_config"), "fp32")
    return InContextEval(prepared, batches("eval_interval", run.eval_interval), hf_config)
