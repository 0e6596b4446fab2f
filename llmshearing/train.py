"""Training entry point for pruning and continued pretraining.

    composer llmshearing/train.py yamls/pruning/<recipe>.yaml [key=value ...]   # one process per GPU
    python -m llmshearing.train yamls/pruning/<recipe>.yaml [key=value ...]      # one process

The recipe is an omegaconf YAML; ``key=value`` dot-list overrides win over it. ``model.l0_module``
turns on pruning (the ``L0Pruning`` algorithm); ``callbacks.data_loading.dynamic`` turns on
dynamic batch loading. The run folder (``save_folder``) receives ``config.json`` (what
``prune-model`` and the exporters read), Composer checkpoints, ``metrics.jsonl`` and the masks.

Before anything is loaded, rank 0 sets the run's plan against the devices it finds and warns in one line when
it does not fit (:mod:`llmshearing.planning.preflight`; never an error). A source with sharded weights
(``model.dcp/``) under FSDP2 on several ranks is filled shard by shard, each rank reading its own slices
(:class:`llmshearing.training.builders.ShardedSourceFill`); so is a distillation teacher with sharded weights
(:func:`llmshearing.training.fsdp.shard_teacher`).

A folder that already holds a run is continued only with ``autoresume=true`` (a finished run then
trains nothing) and replaced only with ``save_overwrite=true``; a start that fails leaves it as it
was (see ``llmshearing.training.run_folder``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from llmshearing.training.run_config import RunConfig

log = logging.getLogger("llmshearing.train")


def _precision(requested: str, device: str | None) -> str:
    from llmshearing.training.builders import effective_precision

    runs = effective_precision(requested, device)
    if runs != requested:
        log.warning("precision %s needs a GPU; running in fp32 on CPU", requested)
    return runs


def _warn_on_start_settings(cfg, data_loading) -> None:
    """One stderr line per setting that does not start from a least-squares start's cut or reads the cut as
    the source (:func:`llmshearing.pruning.start_record.start_warnings`)."""
    from llmshearing.pruning.start_record import start_warnings

    l0, distillation = cfg.model.l0_module, cfg.model.distillation
    for line in start_warnings(
        cfg.model.path,
        l0 is not None,
        l0.init_from if l0 is not None else None,
        distillation.teacher if distillation is not None else None,
        data_loading.reference,
    ):
        print(f"llmshearing: warning: {line}", file=sys.stderr, flush=True)


def build_trainer(yaml_path: str, overrides: Sequence[str] = ()):
    """Validate the recipe and build the Composer Trainer (nothing runs yet).

    A start that fails leaves the run folder as it found it (no stub ``config.json``).
    """
    from llmshearing.training.run_folder import StartGuard

    with StartGuard() as guard:
        return _build_trainer(yaml_path, overrides, guard)


def _build_trainer(yaml_path: str, overrides: Sequence[str], guard):
    from llmshearing.training.config import load_config, validate_config

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    # the typed run config, parsed once; a mistake is answered before Composer is imported
    cfg = validate_config(load_config(yaml_path, overrides), world_size)
    from llmshearing.training import run_folder

    save_folder = cfg.resolved_save_folder()  # what the folder holds is answered before Composer is imported
    run_folder.check_start(save_folder, cfg.autoresume, cfg.save_overwrite)
    held_run = bool(run_folder.run_entries(save_folder))
    resume_from = run_folder.resumable_checkpoint(save_folder) if cfg.autoresume else None
    if resume_from is not None:
        run_folder.check_resumed_optimizer(save_folder, cfg.to_dict(), resume_from)

    from composer import Trainer
    from composer.core import Evaluator
    from composer.utils import dist, get_device, reproducibility

    from llmshearing.data.loaders import build_eval_dataloader
    from llmshearing.dynamic_loading.callback import DynamicLoadingCallback
    from llmshearing.dynamic_loading.config import KEY, DataLoadingConfig
    from llmshearing.dynamic_loading.loader import build_train_dataloader
    from llmshearing.training import builders
    from llmshearing.training.epoch_end_resume import QuietEpochEndResume
    from llmshearing.training.fsdp_settings import resolve_fsdp
    from llmshearing.training.run_record import RunRecord

    fsdp = resolve_fsdp(cfg.fsdp_config)
    slices = builders.reads_own_slices(cfg)  # FSDP2 from sharded weights: each rank reads its own shards
    if fsdp is not None and cfg.model.init_device == "mixed" and world_size > 1 and not slices:
        from llmshearing.training.fsdp_settings import with_rank0_loading

        fsdp = with_rank0_loading(fsdp)  # rank 0 reads the source; FSDP broadcasts it into the shards
    data_loading = DataLoadingConfig.required(cfg.callbacks.data_loading)
    if int(os.environ.get("RANK", "0")) == 0:  # before anything is loaded
        from llmshearing.planning.preflight import warn_if_plan_does_not_fit

        # the plan against the devices found; a run from prune-oneshot's least-squares start that misreads it
        warn_if_plan_does_not_fit(cfg, world_size, int(os.environ.get("LOCAL_WORLD_SIZE", world_size)))
        _warn_on_start_settings(cfg, data_loading)
    guard.watch(save_folder)
    # lm-eval's tasks load (and are checked) before the model
    eval_tasks = builders.prepare_eval_tasks(cfg.eval_tasks, cfg.model.path, cfg.device_eval_batch_size)
    if cfg.python_log_level:
        logging.basicConfig(format="%(asctime)s: [%(name)s]: %(levelname)s: %(message)s")
        logging.getLogger("llmshearing").setLevel(cfg.python_log_level.upper())

    device_batch = cfg.global_train_batch_size // world_size
    if world_size > 1:
        # one process group from the start: streaming would otherwise open and close its own on the same
        # port while building the loaders (a race between ranks), and the mask ranking is broadcast
        dist.initialize_dist(get_device(cfg.device), cfg.dist_timeout)
        if cfg.autoresume:  # every node must see the run folder rank 0 writes
            from llmshearing.training.fsdp import check_shared_run_folder

            check_shared_run_folder(save_folder)
    train_loader = build_train_dataloader(
        cfg.train_loader,
        data_loading,
        device_batch_size=device_batch,
        eval_interval=cfg.eval_interval,
    )
    eval_loader = build_eval_dataloader(
        cfg.eval_loader,
        data_loading.set_names,
        device_batch_size=cfg.device_eval_batch_size,
        subset_num_batches=cfg.eval_subset_num_batches,
        names_key=f"{KEY}.set_names",
    )
    reproducibility.seed_all(cfg.seed)
    if dist.get_global_rank() == 0:
        print(f"llmshearing: {describe_parallelism(fsdp, world_size, device_batch, cfg)}", flush=True)
        choice = cfg.model.l0_module.budget_choice if cfg.model.l0_module is not None else None
        if choice:
            print(f"llmshearing: {choice}", flush=True)
    model, description = builders.build_model(
        cfg, data_loading.set_names, train_loader.dataloader.dataset, resuming=resume_from is not None
    )
    if dist.get_global_rank() == 0:
        print(f"llmshearing: {builders.precision_line(description['precision'])}", flush=True)
        print(f"llmshearing: {description['loading']}", flush=True)
    # only once the recipe, the data and the model are known to be good
    run_folder.prepare(save_folder, description, cfg.autoresume, cfg.save_overwrite)
    if dist.get_global_rank() == 0:
        from llmshearing.checkpoint.run_config import write_run_description

        write_run_description(save_folder, description)
    distilling = cfg.model.distillation is not None
    callbacks = [
        *builders.build_callbacks(cfg.callbacks, save_folder, distilling=distilling),
        RunRecord(description),
        QuietEpochEndResume(),
    ]
    if slices:
        from llmshearing.checkpoint.sharded import sharded_weights_dir

        callbacks.append(builders.ShardedSourceFill(str(sharded_weights_dir(cfg.model.path))))
    if eval_tasks is not None:
        callbacks.append(builders.build_icl_eval(cfg, eval_tasks, model, description))
    mixing = DynamicLoadingCallback.from_config(data_loading)
    if mixing is not None:
        callbacks.append(mixing)
    evaluator = Evaluator(
        label="eval", dataloader=eval_loader, metric_names=list(model.get_metrics(is_train=False))
    )

    trainer = Trainer(
        run_name=cfg.run_name,
        model=model,
        train_dataloader=train_loader,
        eval_dataloader=evaluator,
        max_duration=cfg.max_duration,
        eval_interval=cfg.eval_interval,
        eval_subset_num_batches=cfg.eval_subset_num_batches,
        optimizers=builders.build_optimizer(cfg.optimizer, model),
        schedulers=builders.build_scheduler(cfg.scheduler),
        algorithms=builders.build_algorithms(cfg, save_folder, fsdp=fsdp is not None),
        callbacks=callbacks,
        loggers=builders.build_loggers(cfg.loggers, save_folder),
        precision=_precision(cfg.precision, cfg.device),
        device=cfg.device,
        device_train_microbatch_size=cfg.device_train_microbatch_size,
        parallelism_config=None if fsdp is None else fsdp.parallelism,
        compile_config=cfg.compile_config,
        save_folder=os.path.join(save_folder, "checkpoints"),
        save_interval=cfg.save_interval,
        save_num_checkpoints_to_keep=cfg.save_num_checkpoints_to_keep,
        save_overwrite=cfg.save_overwrite,
        save_weights_only=cfg.save_weights_only,
        autoresume=cfg.autoresume,
        load_path=cfg.load_path,
        load_weights_only=cfg.load_weights_only,
        progress_bar=cfg.progress_bar,
        log_to_console=cfg.log_to_console,
        console_log_interval=cfg.console_log_interval,
        seed=cfg.seed,
        dist_timeout=cfg.dist_timeout,
    )
    if fsdp is not None and model.teacher is not None:  # Composer wrapped the student; the teacher follows it
        from llmshearing.training.fsdp import shard_teacher

        weights = builders.teacher_weights(cfg)  # sharded weights: each rank fills its own slices
        placed = shard_teacher(
            model.teacher,
            fsdp,
            next(trainer.state.model.parameters()).device,
            from_rank0=weights is None and not builders.loads_on_every_rank(cfg),
            weights=weights,
        )
        if dist.get_global_rank() == 0:
            print(f"llmshearing: {placed}", flush=True)
    if cfg.autoresume:
        done = int(trainer.state.timestamp.batch)
        run_folder.check_progress(save_folder, done, _batches(trainer))
        _count_earlier_checkpoints(trainer, save_folder)
        line = run_folder.resume_line(save_folder, done, _batches(trainer), held_run, resume_from)
        if line is not None and dist.get_global_rank() == 0:
            print(f"llmshearing: {line}", flush=True)
    return trainer, cfg


def _count_earlier_checkpoints(trainer, save_folder: str) -> None:
    """Hand the checkpoint saver the checkpoints earlier starts of the run saved, so that
    ``save_num_checkpoints_to_keep`` counts them (Composer's saver counts its own saves only)."""
    from composer.callbacks import CheckpointSaver
    from composer.utils import dist

    from llmshearing.checkpoint.composer_files import saved_checkpoints

    sharded = trainer.state.fsdp_sharded_state_dict_enabled
    if not sharded and dist.get_global_rank() != 0:  # one file, written by rank 0
        return
    earlier = [
        str(path)
        for path in saved_checkpoints(os.path.join(save_folder, "checkpoints"), dist.get_global_rank())
    ]
    for saver in trainer.state.callbacks:
        if isinstance(saver, CheckpointSaver) and saver.num_checkpoints_to_keep >= 0:
            saver.saved_checkpoints[:0] = [path for path in earlier if path not in saver.saved_checkpoints]


def _batches(trainer) -> int:
    """The run's ``max_duration`` in batches (validated to be given in batches)."""
    return int(trainer.state.max_duration.value)


def describe_parallelism(fsdp, world_size: int, device_batch: int, cfg: RunConfig) -> str:
    """One line for the start of a run: how the model is spread and how much each rank reads."""
    from llmshearing.training.fsdp_settings import ignored_fsdp2_keys

    if fsdp is not None:
        how = fsdp.describe()
        ignored = ignored_fsdp2_keys(fsdp)
        if ignored:
            how += f" [no FSDP2 counterpart, ignored: {', '.join('fsdp_config.' + k for k in ignored)}]"
    elif world_size > 1:
        how = "data parallel (DDP, no sharding: set fsdp_config to shard)"
    else:
        how = "one process, no sharding"
    micro = cfg.device_train_microbatch_size
    return (
        f"{how}; world size {world_size}; per-rank batch {device_batch} "
        f"(micro-batch {micro}) of a global batch of {cfg.global_train_batch_size}"
    )


def train(yaml_path: str, overrides: Sequence[str] = ()):
    """Build the trainer, run the optional first evaluation, train, and close."""
    trainer, cfg = build_trainer(yaml_path, overrides)
    return run(trainer, cfg)


def run(trainer, cfg: RunConfig):
    """Optional first evaluation (on a fresh run), then training; the trainer is closed at the end.

    A resumed run that already reached ``max_duration`` reports so and trains nothing.
    """
    try:
        _evaluate_and_fit(trainer, cfg)
    except BaseException:
        # Ctrl-C or SIGTERM reaches every rank; a rank that stops first closes its process group, so
        # closing may fail at its barrier: that must not hide why the run stopped
        with contextlib.suppress(Exception):
            trainer.close()
        raise
    trainer.close()
    return trainer


def _evaluate_and_fit(trainer, cfg: RunConfig) -> None:
    done = int(trainer.state.timestamp.batch)
    if done and done >= _batches(trainer):
        print(f"llmshearing: the run has already trained all {done} batches of max_duration; nothing to do")
        return
    # a fresh run evaluates first when asked to, and when the source model's own losses are
    # the reference of dynamic batch loading: that evaluation measures them, so a pruning run
    # makes it without its masks (ranked masks from init_from already cut the model)
    data_loading = cfg.callbacks.data_loading
    source_reference = data_loading is not None and data_loading.reference == "source"
    if (cfg.eval_first or source_reference) and done == 0:
        from llmshearing.pruning.algorithm import masks_disabled

        with masks_disabled(trainer.state.model) if source_reference else contextlib.nullcontext():
            trainer.eval()
    trainer.fit()


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    from llmshearing.errors import run_reported

    folders: list[str | None] = []
    code = run_reported(lambda: folders.append(_run_folder(argv)))  # a recipe that does not read: at once
    if code:
        return code
    folder = folders[0]
    built: list = []

    def start() -> None:  # configuration, data and checkpoint problems; a failed start leaves no trace
        built.extend(build_trainer(argv[0], argv[1:]))

    code = run_reported(start, writing=folder)
    if code or not built:
        return code

    # while training, faults of the file system and Ctrl-C are told in one line; anything else is a
    # bug and keeps its traceback
    def train_built() -> None:
        run(*built)

    return run_reported(
        train_built,
        writing=folder,
        on_disk_full=lambda err, message: _set_aside(folder, err, message),
        on_interrupt=lambda what: _set_aside(folder, None, what),
        user_errors=False,
    )


def _run_folder(argv: Sequence[str]) -> str | None:
    """The run folder the recipe and overrides name (None when it is not set right: the start says why);
    a recipe that cannot be read raises ``ConfigError``."""
    from llmshearing.training.config import load_config

    cfg = load_config(argv[0], argv[1:])
    try:
        return str(cfg.save_folder).format(run_name=cfg.run_name)
    except Exception:  # save_folder left as ??? or with a brace other than {run_name}: validation tells
        return None


def _set_aside(folder: str | None, err: BaseException | None, message: str) -> str:
    """Set aside a checkpoint that a full disk (``err``) or Ctrl-C cut off; the message says where and
    how the run continues."""
    from llmshearing.checkpoint.composer_files import set_aside_incomplete
    from llmshearing.io.disk_full import disk_full_message

    if folder is None:
        return message
    cut_off = set_aside_incomplete(os.path.join(folder, "checkpoints"))
    if err is not None:
        message = disk_full_message(err, str(cut_off[0]).removesuffix(".incomplete") if cut_off else folder)
    aside = "a checkpoint cut off is set aside as .incomplete, and " if cut_off else ""
    return f"{message}; {aside}autoresume=true continues {folder} from its last complete checkpoint"


if __name__ == "__main__":
    sys.exit(main())
