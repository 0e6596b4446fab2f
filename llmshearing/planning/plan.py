"""A run's plan: per-rank GPU memory of each stage, host memory per node, FLOPs, tokens/s and hours,
whether it fits the stated GPUs and what to change when it does not.

Everything here is a pure function of a validated recipe (``validate_config``'s ``RunConfig``), the student's
and teacher's :class:`ModelConfig` and the stated :class:`Hardware`; nothing is loaded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from llmshearing.models.config import ModelConfig
from llmshearing.planning import memory as mem
from llmshearing.planning.memory import FP32, Kernels, step_dtypes
from llmshearing.planning.step import StepEstimate, StepSettings, step_memory, weight_bytes

if TYPE_CHECKING:
    from llmshearing.training.run_config import RunConfig

GIB = 1024**3
USABLE_FRACTION = 0.9  # allocator fragmentation and caching
RESERVED_BYTES = 1 * GIB  # CUDA context and NCCL buffers
STRATEGIES = ("FULL_SHARD", "SHARD_GRAD_OP", "HYBRID_SHARD", "_HYBRID_SHARD_ZERO2", "NO_SHARD")


@dataclass(frozen=True)
class Hardware:
    """The GPUs a run is planned for: their number, memory (bytes) and peak dense FLOP/s, the
    ranks per node, the host memory per node (bytes, ``None``: not checked) and the expected model
    FLOPs utilisation."""

    gpus: int
    gpu_memory: int
    gpus_per_node: int = 8
    host_memory: int | None = None
    gpu_flops: float = 312e12
    mfu: float = 0.4

    @property
    def usable(self) -> int:
        """Bytes a rank may plan to use: 90% of the memory, less 1 GiB for the CUDA context."""
        return int(self.gpu_memory * USABLE_FRACTION) - RESERVED_BYTES

    @property
    def nodes(self) -> int:
        return math.ceil(self.gpus / self.gpus_per_node)

    @property
    def ranks_per_node(self) -> int:
        return min(self.gpus, self.gpus_per_node)


@dataclass(frozen=True)
class RunShape:
    """What a recipe trains, as the plan needs it (see :func:`run_shape`)."""

    stage: str
    student: ModelConfig
    teacher: ModelConfig | None
    seq_len: int
    global_batch: int
    micro_batch: int | None  # None: "auto" (Composer searches; the plan reports the largest that fits)
    eval_batch: int
    steps: int
    precision: str
    fsdp: bool
    strategy: str
    mixed_precision: str
    checkpointing: bool
    flash: bool
    l0_families: tuple[str, ...] = ()
    kd_chunk: int | None = None
    ranking: bool = False  # init_from: importance calibrates on one GPU before sharding
    source_dtype_bytes: int = 2
    rank0_loading: bool = False  # model.init_device: mixed under FSDP: rank 0 alone reads source and teacher
    sliced_source: bool = False  # FSDP2 from sharded weights (model.dcp/): each rank reads its own shards
    sliced_teacher: bool = False  # FSDP2 with a teacher with sharded weights: each rank reads its own shards


def run_shape(cfg: RunConfig, student: ModelConfig, teacher: ModelConfig | None) -> RunShape:
    """The plan's view of a validated recipe; ``student`` is the source's shape (pruning trains the
    whole source under its masks) and ``teacher`` the distillation teacher's, if any."""
    from llmshearing.training.fsdp_settings import fsdp_enabled

    model = cfg.model
    l0 = model.l0_module
    fsdp = cfg.fsdp_config if fsdp_enabled(cfg.fsdp_config) else None
    settings = dict(fsdp or {})
    strategy = str(settings.get("sharding_strategy", "FULL_SHARD")).upper()
    if strategy not in STRATEGIES:
        raise ValueError(f"fsdp_config.sharding_strategy must be one of {list(STRATEGIES)}, got {strategy!r}")
    micro = cfg.device_train_microbatch_size
    distillation = model.distillation
    return RunShape(
        stage="pruning" if l0 is not None else "continued pretraining",
        student=student,
        teacher=teacher if distillation is not None else None,
        seq_len=int(cfg.max_seq_len),
        global_batch=int(cfg.global_train_batch_size),
        micro_batch=None if micro == "auto" else int(micro),
        eval_batch=int(cfg.device_eval_batch_size),
        steps=int(str(cfg.max_duration).removesuffix("ba")),
        precision=str(cfg.precision),
        fsdp=fsdp is not None,
        strategy=strategy,
        mixed_precision=str(settings.get("mixed_precision", "DEFAULT")).upper(),
        checkpointing=bool(settings.get("activation_checkpointing", False)),
        flash=model.attn_impl in ("auto", "flash"),
        rank0_loading=fsdp is not None and model.init_device == "mixed",
        sliced_source=fsdp is not None and reads_sliced_source(cfg),
        sliced_teacher=fsdp is not None and distillation is not None and reads_sliced_teacher(cfg),
        l0_families=tuple(l0.pruning_modules) if l0 is not None else (),
        kd_chunk=int(distillation.chunk_size) if distillation is not None else None,
        ranking=l0 is not None and l0.init_from == "importance",
    )


def reads_sliced_source(cfg: RunConfig) -> bool:
    """Whether FSDP2 (``FSDP_VERSION=2`` in the environment) would fill each rank's shards from the source's
    sharded weights (``model.dcp/``): not with ``init_from: importance``, which needs the whole model first."""
    from llmshearing.training.fsdp_settings import slices_sharded_weights

    l0 = cfg.model.l0_module
    return slices_sharded_weights(cfg.fsdp_config, cfg.model.path) and (
        l0 is None or l0.init_from != "importance"
    )


def reads_sliced_teacher(cfg: RunConfig) -> bool:
    """Whether FSDP2 would fill each rank's shards of the distillation teacher from its sharded weights."""
    from llmshearing.training.fsdp_settings import slices_sharded_weights

    distillation = cfg.model.distillation
    return distillation is not None and slices_sharded_weights(cfg.fsdp_config, distillation.teacher)


def shards(shape: RunShape, gpus: int, gpus_per_node: int) -> int:
    """Ranks one copy of the weights is sharded over."""
    if not shape.fsdp or shape.strategy == "NO_SHARD":
        return 1
    if shape.strategy in ("HYBRID_SHARD", "_HYBRID_SHARD_ZERO2"):
        return min(gpus, gpus_per_node)
    return gpus


def micro_batch_for(shape: RunShape, gpus: int) -> int:
    """The recipe's micro-batch where it divides the per-rank batch, else the largest divisor below it."""
    per_rank = max(shape.global_batch // gpus, 1)
    wanted = per_rank if shape.micro_batch is None else min(shape.micro_batch, per_rank)
    return max(k for k in range(1, wanted + 1) if per_rank % k == 0)


def step_settings(
    shape: RunShape, gpus: int, gpus_per_node: int, micro_batch: int | None = None
) -> StepSettings:
    micro = micro_batch or micro_batch_for(shape, gpus)
    return StepSettings(
        micro_batch=micro,
        seq_len=shape.seq_len,
        dtypes=step_dtypes(shape.precision, shape.mixed_precision if shape.fsdp else None),
        checkpointing=shape.checkpointing,
        shards=shards(shape, gpus, gpus_per_node),
        strategy=shape.strategy if shape.fsdp else None,
        kernels=Kernels(flash=shape.flash),
        l0_families=shape.l0_families,
        kd_chunk=shape.kd_chunk,
        accumulating=shape.global_batch // gpus > micro,
    )


@dataclass(frozen=True)
class StagePlan:
    """One stage's per-rank peak: its parts (bytes) and the phase of the step where it falls."""

    name: str
    parts: dict[str, int]
    phase: str
    note: str = ""

    @property
    def total(self) -> int:
        return sum(self.parts.values())


def train_stage(shape: RunShape, gpus: int, gpus_per_node: int, micro_batch: int | None = None) -> StagePlan:
    settings = step_settings(shape, gpus, gpus_per_node, micro_batch)
    estimate: StepEstimate = step_memory(shape.student, settings, shape.teacher)
    note = f"micro-batch {settings.micro_batch} x {shape.seq_len} tokens"
    return StagePlan(f"{shape.stage} (training step)", estimate.parts, estimate.phase, note)


def eval_stage(shape: RunShape, gpus: int, gpus_per_node: int) -> StagePlan:
    """An evaluation: the training state stays (weights, gradients of the last step, optimizer state,
    the teacher), the forward holds a block's working set, the logits and the metrics' fp32
    log-probabilities (the overall and the per-domain cross-entropy)."""
    settings = step_settings(shape, gpus, gpus_per_node)
    settings = replace(settings, micro_batch=shape.eval_batch, checkpointing=False)
    parts = weight_bytes(shape.student, settings)
    if settings.strategy in ("SHARD_GRAD_OP", "_HYBRID_SHARD_ZERO2") and settings.shards > 1:
        # without a backward every block is freed after its forward
        block, outside = mem.block_params(shape.student), mem.embedding_params(shape.student)
        parts["FSDP gathered weights"] = settings.dtypes.params * (outside + 2 * block)
    parts.pop("FSDP gradient reduction", None)
    if shape.teacher is not None:
        blocks = shape.teacher.n_layers * mem.block_params(shape.teacher)
        parts["teacher weights"] = settings.dtypes.teacher * (
            blocks // settings.shards + mem.embedding_params(shape.teacher)
        )
    tokens = settings.tokens
    parts["forward working set"] = mem.forward_working_bytes(
        shape.student, tokens, settings.dtypes.matmul, shape.flash
    )
    parts["logits"] = mem.logits_bytes(shape.student, tokens, settings.dtypes)
    parts["metrics' log-probabilities (fp32)"] = 2 * tokens * shape.student.vocab_size * FP32
    return StagePlan(
        "evaluation", {k: v for k, v in parts.items() if v}, "forward", f"batch {shape.eval_batch}"
    )


def ranking_stage(shape: RunShape) -> StagePlan:
    """``init_from: importance``: the whole fp32 source on one GPU, before sharding, runs forwards of
    ``device_eval_batch_size`` sequences."""
    dtypes = step_dtypes(shape.precision, None)
    tokens = shape.eval_batch * shape.seq_len
    parts = {
        "whole source (fp32)": FP32 * shape.student.num_params(),
        "forward working set": mem.forward_working_bytes(shape.student, tokens, dtypes.matmul, shape.flash),
        "logits": mem.logits_bytes(shape.student, tokens, dtypes),
    }
    return StagePlan("mask ranking (init_from: importance)", parts, "forward", "before sharding, whole model")


def stages(shape: RunShape, hardware: Hardware) -> list[StagePlan]:
    """Every stage the recipe runs on each rank, the training step first."""
    per_node = hardware.gpus_per_node
    found = [train_stage(shape, hardware.gpus, per_node), eval_stage(shape, hardware.gpus, per_node)]
    if shape.ranking:
        found.append(ranking_stage(shape))
    return found


def host_memory(shape: RunShape, hardware: Hardware) -> dict[str, int]:
    """Host memory per node at start-up: every rank reads the whole source and upcasts it to fp32 master
    weights, and reads the whole teacher in the compute precision, before FSDP shards them; with
    ``model.init_device: mixed`` rank 0 alone does (the busiest node is node 0); from sharded weights under
    FSDP2 on several ranks each rank reads only its own shards of the source, and of a teacher with sharded
    weights its own shards of the blocks and the embeddings, final norm and head whole."""
    ranks = hardware.ranks_per_node
    where = f"on each of {ranks} ranks" if ranks > 1 else "on the one rank"
    source = FP32 * shape.student.num_params()
    found: dict[str, int] = {}
    if shape.sliced_source and hardware.gpus > 1:
        own = source // shards(shape, hardware.gpus, hardware.gpus_per_node)
        found[f"source's own shards as fp32 master weights {where}"] = own * ranks
    elif shape.rank0_loading:
        found["source as fp32 master weights on rank 0 alone"] = source
    else:
        found[f"source as fp32 master weights {where}"] = source * ranks
    if shape.teacher is not None:
        teacher = step_dtypes(shape.precision, None).teacher * shape.teacher.num_params()
        if shape.sliced_teacher and hardware.gpus > 1:
            blocks = shape.teacher.n_layers * mem.block_params(shape.teacher)
            own = blocks // shards(shape, hardware.gpus, hardware.gpus_per_node)
            own += mem.embedding_params(shape.teacher)
            found[f"teacher's own shards {where}"] = step_dtypes(shape.precision, None).teacher * own * ranks
        elif shape.rank0_loading:
            found["teacher on rank 0 alone"] = teacher
        else:
            found[f"teacher {where}"] = teacher * ranks
    return found


@dataclass(frozen=True)
class Throughput:
    flops_per_token: int
    tokens_per_step: int
    tokens_per_second: float
    hours: float

    @property
    def flops_per_step(self) -> int:
        return self.flops_per_token * self.tokens_per_step


def throughput(shape: RunShape, hardware: Hardware) -> Throughput:
    """Model FLOPs per token (the student's training FLOPs, plus the teacher's forward), tokens/s at the
    stated MFU on every GPU, and the hours of ``max_duration`` (training steps only)."""
    per_token = shape.student.train_flops_per_token(shape.seq_len)
    if shape.teacher is not None:
        per_token += shape.teacher.train_flops_per_token(shape.seq_len) // 3
    tokens_per_step = shape.global_batch * shape.seq_len
    rate = hardware.mfu * hardware.gpu_flops * hardware.gpus / per_token
    return Throughput(per_token, tokens_per_step, rate, shape.steps * tokens_per_step / rate / 3600)


def fits(stage: StagePlan, hardware: Hardware) -> bool:
    return stage.total <= hardware.usable


def gpu_counts(shape: RunShape, limit: int = 4096) -> list[int]:
    """GPU counts the recipe can run on: those that divide the global batch."""
    return [n for n in range(1, min(shape.global_batch, limit) + 1) if shape.global_batch % n == 0]


def fewest_gpus(shape: RunShape, hardware: Hardware) -> int | None:
    """The fewest GPUs of the stated size on which every stage fits with the recipe's settings."""
    for n in gpu_counts(shape):
        if all(fits(s, hardware) for s in stages(shape, replace(hardware, gpus=n))):
            return n
    return None


@dataclass(frozen=True)
class Change:
    """A setting that makes the plan fit: the override to pass and what it does."""

    override: str
    why: str


def largest_micro_batch(shape: RunShape, hardware: Hardware) -> int | None:
    """The largest micro-batch dividing the per-rank batch whose training step fits."""
    per_rank = max(shape.global_batch // hardware.gpus, 1)
    for k in sorted((k for k in range(1, per_rank + 1) if per_rank % k == 0), reverse=True):
        if fits(train_stage(shape, hardware.gpus, hardware.gpus_per_node, k), hardware):
            return k
    return None


def largest_eval_batch(shape: RunShape, hardware: Hardware) -> int | None:
    """The largest ``device_eval_batch_size`` (up to the recipe's) whose evaluation fits."""
    for k in range(shape.eval_batch, 0, -1):
        if fits(eval_stage(replace(shape, eval_batch=k), hardware.gpus, hardware.gpus_per_node), hardware):
            return k
    return None


def changes(shape: RunShape, hardware: Hardware) -> list[Change]:
    """Settings that make each stage that does not fit fit on the stated GPUs, then more GPUs."""
    found: list[Change] = []
    gpus, per_node = hardware.gpus, hardware.gpus_per_node

    def train_fits(candidate: RunShape) -> bool:
        return fits(train_stage(candidate, gpus, per_node), hardware)

    if not train_fits(shape):
        micro = largest_micro_batch(shape, hardware)
        if micro is not None and micro < micro_batch_for(shape, gpus):
            found.append(
                Change(f"device_train_microbatch_size={micro}", "smaller micro-batches, same global batch")
            )
        if not shape.checkpointing and train_fits(replace(shape, checkpointing=True)):
            found.append(
                Change(
                    "fsdp_config.activation_checkpointing=true",
                    "keep each block's input only and recompute the block in the backward (about 1/3 more compute)",
                )
            )
        full = replace(shape, fsdp=True, strategy="FULL_SHARD")
        if gpus > 1 and (not shape.fsdp or shape.strategy != "FULL_SHARD") and train_fits(full):
            found.append(
                Change(
                    "fsdp_config.sharding_strategy=FULL_SHARD",
                    "shard weights, gradients and optimizer state over every rank; free each block after use",
                )
            )
    if not fits(eval_stage(shape, gpus, per_node), hardware):
        batch = largest_eval_batch(shape, hardware)
        if batch is not None:
            found.append(Change(f"device_eval_batch_size={batch}", "smaller evaluation batches"))
    if shape.ranking and not fits(ranking_stage(shape), hardware):
        found.append(
            Change(
                "model.l0_module.init_from=<scores file>",
                "init_from: importance holds the whole fp32 source on one GPU; rank from a saved scores file",
            )
        )
    fewest = fewest_gpus(shape, hardware)
    if fewest is not None and fewest > gpus:
        nodes = math.ceil(fewest / per_node)
        found.append(
            Change(
                f"--gpus {fewest}",
                f"{fewest} GPUs ({nodes} node{'s' if nodes > 1 else ''}) with the recipe as it is",
            )
        )
    return found


@dataclass
class Plan:
    """Everything ``llmshearing plan`` reports."""

    shape: RunShape
    hardware: Hardware
    stages: list[StagePlan]
    host: dict[str, int]
    speed: Throughput
    fewest: int | None
    changes: list[Change] = field(default_factory=list)

    @property
    def failing(self) -> list[StagePlan]:
        return [s for s in self.stages if not fits(s, self.hardware)]

    @property
    def host_total(self) -> int:
        return sum(self.host.values())

    @property
    def host_fits(self) -> bool:
        return self.hardware.host_memory is None or self.host_total <= self.hardware.host_memory


def make_plan(shape: RunShape, hardware: Hardware) -> Plan:
    found = stages(shape, hardware)
    plan = Plan(
        shape,
        hardware,
        found,
        host_memory(shape, hardware),
        throughput(shape, hardware),
        fewest_gpus(shape, hardware),
    )
    if plan.failing:
        plan.changes = changes(shape, hardware)
    return plan
