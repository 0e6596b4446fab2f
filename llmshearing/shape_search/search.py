"""``llmshearing search-shape``: the shape of a source that does best under a budget.

1. Enumerate the uniform, GQA-valid shapes whose cost lies in the budget's band
   (:func:`llmshearing.pruning.budget.enumerate_shapes`) and take ``candidates`` of them, the closest to a
   proportional shrink per depth and attention layout, then the layouts' other width splits
   (:func:`~llmshearing.pruning.budget.scoring_candidates`).
2. Score each: one-shot importance pruning (``prune_oneshot``, the source's importance measured once on the
   train split and reused), then ``steps`` batches of distillation from the source on the train split
   through the project's Composer training (``llmshearing.train``), then the loss on the eval split.
3. Rank by that loss and write the best as a ``target_model`` YAML (``prune-oneshot --target-config`` reads
   it; a pruning recipe takes it as ``model.l0_module.target_model``).

Everything lives in a work folder: ``state.json`` (settings, candidates, scores so far), the importance
scores, and the folder of the candidate being scored; a rerun with the same settings continues after the
last scored candidate, and ranks every score of the state (a smaller ``--candidates`` scores nothing new
and still writes the best shape known).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmshearing.config_base import is_int
from llmshearing.io.staging import write_text_atomic
from llmshearing.pruning.budget import (
    Budget,
    Candidate,
    ShapeSpace,
    enumerate_shapes,
    parse_budget,
    scoring_candidates,
    shape_label,
)
from llmshearing.pruning.targets import SHAPE_KEYS

STATE_NAME = "state.json"
SCORES_NAME = "importance.safetensors"
EVAL_METRIC = "metrics/eval/LanguageCrossEntropy"
STATE_VERSION = 1


@dataclass
class SearchSettings:
    """What a score depends on: a rerun continues only with the same settings."""

    src: str
    data: str
    budget: str
    candidates: int = 10
    multiple: int = 64
    min_layers: int = 1
    max_layers: int | None = None
    steps: int = 20
    batch_size: int = 4
    lr: float = 3e-4
    samples: int = 64
    eval_batches: int = 16
    seed: int = 17

    def check(self) -> None:
        for key in ("candidates", "steps", "batch_size", "samples", "eval_batches"):
            value = getattr(self, key)
            if not is_int(value) or value <= 0:
                raise ValueError(f"--{key.replace('_', '-')} must be a positive integer, got {value!r}")
        if not self.lr > 0:
            raise ValueError(f"--lr must be positive, got {self.lr!r}")

    def space(self) -> ShapeSpace:
        return ShapeSpace(self.multiple, self.min_layers, self.max_layers)

    def to_dict(self) -> dict[str, Any]:
        """The settings a score depends on (``candidates`` is not one: a rerun may score more or fewer)."""
        return {key: value for key, value in self.__dict__.items() if key != "candidates"}


@dataclass
class Score:
    """One candidate's result: eval loss after the short distillation, and what it cost."""

    shape: dict[str, int]
    params: int
    cost: float
    eval_loss: float
    seconds: float
    tokens: int
    domain_losses: dict[str, float] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return "{n_layers}L/{n_heads}H/{n_kv_heads}KV/{d_model}d/{intermediate_size}I".format(**self.shape)


@dataclass
class SearchResult:
    budget: Budget
    source_label: str
    shapes_in_budget: int
    scores: list[Score]  # ranked, best first
    out: Path
    work_dir: Path
    resumed: int  # of ``scores``, those taken from the state (scored by an earlier run)
    source_kv_heads: int  # a shape with fewer needs the recipe to prune KV groups

    def table(self) -> str:
        rows = [
            f"{self.shapes_in_budget} valid shapes of {self.source_label} meet budget {self.budget.describe()}; "
            f"ranked {len(self.scores)}: {len(self.scores) - self.resumed} scored in this call, {self.resumed} "
            f"taken from {self.work_dir / STATE_NAME}",
            f"{'rank':>4}  {'shape':<28}{'params':>14}{'eval loss':>11}{'seconds':>9}{'tokens':>10}",
        ]
        for rank, score in enumerate(self.scores, 1):
            rows.append(
                f"{rank:>4}  {score.label:<28}{score.params:>14,}{score.eval_loss:>11.4f}"
                f"{score.seconds:>9.1f}{score.tokens:>10,}"
            )
        total = sum(score.seconds for score in self.scores)
        rows.append(f"scoring cost: {total:.1f} s, {sum(s.tokens for s in self.scores):,} tokens trained")
        best = self.scores[0].shape
        override = "{" + ", ".join(f"{k}: {best[k]}" for k in SHAPE_KEYS) + "}"
        kv = ""
        if best["n_kv_heads"] != self.source_kv_heads:  # the shipped recipes keep the source's KV groups
            kv = f" with kv_head in model.l0_module.pruning_modules (n_kv_heads {self.source_kv_heads} -> {best['n_kv_heads']})"
        rows.append(
            f"wrote {self.out}: prune-oneshot --target-config {self.out}, or in a pruning recipe "
            f"model.l0_module.target_model='{override}'{kv}"
        )
        return "\n".join(rows)

    def to_json(self) -> dict[str, Any]:
        return {
            "budget": self.budget.to_dict(),
            "source": self.source_label,
            "shapes_in_budget": self.shapes_in_budget,
            "scored_in_this_call": len(self.scores) - self.resumed,
            "from_state": self.resumed,
            "ranked": [dict(score.__dict__, label=score.label) for score in self.scores],
            "best": self.scores[0].shape,
            "out": str(self.out),
            "work_dir": str(self.work_dir),
        }


def default_work_dir(out: str | Path) -> Path:
    out = Path(out)
    return out.with_name(out.stem + "-search")


def search_shape(
    settings: SearchSettings,
    out: str | Path = "target.yaml",
    work_dir: str | Path | None = None,
    restart: bool = False,
    progress: bool = True,
) -> SearchResult:
    """Run (or continue) the search; every input is checked before any model loads."""
    from llmshearing.checkpoint.format import refuse_pruning_checkpoint
    from llmshearing.checkpoint.reading import open_checkpoint
    from llmshearing.data.layout import split_domains

    settings.check()
    settings.src, settings.data = str(Path(settings.src).resolve()), str(Path(settings.data).resolve())
    out = Path(out)
    work = Path(work_dir) if work_dir is not None else default_work_dir(out)
    budget = parse_budget(settings.budget, "--budget")
    with open_checkpoint(settings.src) as ckpt:
        refuse_pruning_checkpoint(
            ckpt.tensors.keys(),
            f"{settings.src} is a pruning run's checkpoint; search from the source model (or fold it "
            "with `llmshearing prune-model CKPT OUT` first)",
        )
        source = ckpt.config
    domains = split_domains(settings.data, "train", label=f"--data {settings.data}: ")
    eval_domains = split_domains(settings.data, "eval", label=f"--data {settings.data}: ")
    if eval_domains != domains:
        raise ValueError(
            f"--data {settings.data}: the eval split's domains {eval_domains} differ from the train split's "
            f"{domains}; prepare both splits of the same domains"
        )
    found = enumerate_shapes(source, budget, settings.space())
    picked = scoring_candidates(found, settings.candidates)
    state = _open_state(work, settings, picked, restart)
    # every stored score counts, those of an earlier, larger --candidates too: the state holds the same
    # settings (_open_state refuses others), so a score of a shape still in the budget stands
    in_budget = {c.label() for c in found}
    scores = {label: Score(**entry) for label, entry in state["scores"].items() if label in in_budget}
    resumed = len(scores)
    todo = [c for c in picked if c.label() not in scores]
    if todo:
        from tqdm.auto import tqdm

        importance = _importance(work, settings, progress)
        bar = tqdm(
            total=len(picked),
            initial=len(picked) - len(todo),
            desc="search-shape",
            unit="shape",
            disable=not progress,
        )
        try:
            for candidate in todo:
                bar.set_postfix_str(candidate.label())
                score = _score(candidate, importance, settings, domains, work)
                scores[candidate.label()] = score
                state["scores"][candidate.label()] = dict(score.__dict__)
                write_text_atomic(work / STATE_NAME, json.dumps(state, indent=2) + "\n")
                bar.update(1)
        finally:
            bar.close()
    ranked = sorted(scores.values(), key=lambda s: (s.eval_loss, s.label))
    result = SearchResult(
        budget, shape_label(source), len(found), ranked, out, work, resumed, source.n_kv_heads
    )
    _write_target(out, result, settings)
    return result


def _open_state(
    work: Path, settings: SearchSettings, picked: list[Candidate], restart: bool
) -> dict[str, Any]:
    """The state of an earlier run with the same settings, or a fresh one (``restart`` drops it)."""
    path = work / STATE_NAME
    fresh = {
        "version": STATE_VERSION,
        "settings": settings.to_dict(),
        "candidates": [c.shape for c in picked],
        "scores": {},
    }
    if path.is_file() and not restart:
        try:
            state = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise ValueError(
                f"{path} cannot be read ({err}); pass --restart to start the search again"
            ) from None
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            raise ValueError(f"{path} is not a search-shape state file; pass --restart or another --work-dir")
        if state.get("settings") != fresh["settings"] or not isinstance(state.get("scores"), dict):
            changed = sorted(
                key
                for key in fresh["settings"]
                if (state.get("settings") or {}).get(key) != fresh["settings"][key]
            )
            raise ValueError(
                f"{path} holds a search with other settings ({', '.join(changed) or 'scores'}); pass the "
                "same options to continue it, --restart to discard it, or another --work-dir"
            )
        state["candidates"] = fresh["candidates"]  # --candidates may grow or shrink between runs
        return state
    if restart and work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(fresh, indent=2) + "\n")
    return fresh


def _importance(work: Path, settings: SearchSettings, progress: bool) -> Any:
    """The source's importance scores on the train split, measured once and kept in the work folder."""
    from llmshearing.pruning.importance import ImportanceScores

    path = work / SCORES_NAME
    if path.is_file():
        return ImportanceScores.load(path)
    import torch

    from llmshearing.checkpoint.loading import from_pretrained
    from llmshearing.pruning.importance import calibration_batches, compute_importance

    decoder = from_pretrained(settings.src, dtype=torch.float32)
    total, batches = calibration_batches(settings.data, settings.samples, 8, "train")
    scores = compute_importance(decoder, batches, total=total, progress=progress)
    scores.save(path)
    return scores


def _sequence_length(data: str, domain: str) -> int:
    from llmshearing.data.layout import TokenSamples

    samples = TokenSamples(Path(data) / "train" / domain)
    try:
        return int(samples.row(0).shape[0])
    finally:
        samples.close()


def _recipe(settings: SearchSettings, model_dir: Path, run_dir: Path, domains: list[str]) -> dict[str, Any]:
    """The short distillation run of one candidate, as a recipe of ``llmshearing.train``."""
    import torch

    steps = settings.steps
    return {
        "run_name": "search-candidate",
        "seed": settings.seed,
        "max_seq_len": _sequence_length(settings.data, domains[0]),
        "data_local": str(settings.data),
        "model": {"path": str(model_dir), "distillation": {"teacher": str(settings.src)}},
        "train_loader": {
            "dataset": {"split": "train", "shuffle": True, "shuffle_seed": settings.seed},
            "num_workers": 0,
        },
        "eval_loader": {"dataset": {"split": "eval"}, "num_workers": 0},
        "callbacks": {
            "data_loading": {
                "dynamic": False,
                "set_names": domains,
                "proportion": [1.0 / len(domains)] * len(domains),
            }
        },
        "optimizer": {
            "name": "decoupled_adamw",
            "lr": settings.lr,
            "betas": [0.9, 0.95],
            "eps": 1e-8,
            "weight_decay": 0.0,
        },
        "scheduler": {"name": "cosine_with_warmup", "t_warmup": "0ba", "alpha_f": 0.1},
        "algorithms": {"gradient_clipping": {"clipping_type": "norm", "clipping_threshold": 1.0}},
        "max_duration": f"{steps}ba",
        "eval_interval": f"{steps}ba",
        "eval_subset_num_batches": settings.eval_batches,
        "global_train_batch_size": settings.batch_size,
        "device_train_microbatch_size": settings.batch_size,
        "device_eval_batch_size": 8,
        "precision": "amp_bf16" if torch.cuda.is_available() else "fp32",
        "save_folder": str(run_dir),
        "save_interval": f"{steps}ba",
        "save_num_checkpoints_to_keep": 0,
        "progress_bar": False,
    }


def _score(
    candidate: Candidate,
    importance: Any,
    settings: SearchSettings,
    domains: list[str],
    work: Path,
) -> Score:
    """One-shot prune to the candidate, distil for ``steps`` batches, and read the eval loss."""
    from omegaconf import OmegaConf

    from llmshearing.pruning.oneshot import prune_oneshot
    from llmshearing.train import build_trainer, run
    from llmshearing.training.metrics_log import METRICS_FILENAME, read_metrics

    started = time.perf_counter()
    folder = work / "candidate"
    if folder.exists():  # what an interrupted run left of its candidate
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    model_dir, run_dir = folder / "model", folder / "run"
    log = folder / "train.log"
    with open(log, "w", encoding="utf-8") as handle, contextlib.redirect_stdout(handle):
        prune_oneshot(
            settings.src,
            model_dir,
            settings.data,
            candidate.shape,
            scores=importance,
            dtype="fp32",
            progress=False,
        )
        recipe = folder / "recipe.yaml"
        recipe.write_text(OmegaConf.to_yaml(OmegaConf.create(_recipe(settings, model_dir, run_dir, domains))))
        with warnings.catch_warnings():  # the short run has no warm-up, on purpose
            warnings.filterwarnings("ignore", message="The warmup duration is 0")
            trainer, values = build_trainer(str(recipe))
            run(trainer, values)
    series = read_metrics(str(run_dir / METRICS_FILENAME))
    if EVAL_METRIC not in series:
        raise RuntimeError(f"the distillation of {candidate.label()} logged no {EVAL_METRIC}; see {log}")
    domain_losses = {
        name.split("/")[-1].removesuffix("_LanguageCrossEntropy"): values_[-1][1]
        for name, values_ in series.items()
        if name.startswith("metrics/eval/") and name.endswith("_LanguageCrossEntropy")
    }
    loss = series[EVAL_METRIC][-1][1]
    tokens = settings.steps * settings.batch_size * values.max_seq_len
    shutil.rmtree(folder)
    config = candidate.config
    return Score(
        candidate.shape,
        config.num_params(),
        candidate.cost,
        loss,
        time.perf_counter() - started,
        tokens,
        domain_losses,
    )


def _write_target(out: Path, result: SearchResult, settings: SearchSettings) -> None:
    """The best shape as a ``target_model`` YAML, the ranking as comments."""
    best = result.scores[0].shape
    lines = [
        "# written by `llmshearing search-shape`: the best of the shapes scored under the budget (this call's "
        "and those in its state)",
        f"# source {settings.src} ({result.source_label}); budget {result.budget.describe()}",
        f"# score: eval loss after one-shot pruning + {settings.steps} batches of distillation "
        f"(batch {settings.batch_size}, lr {settings.lr:g}) on {settings.data}",
    ]
    lines += [
        f"#   {rank}. {s.label} {s.params:,} params: {s.eval_loss:.4f}"
        for rank, s in enumerate(result.scores, 1)
    ]
    lines.append("target_model:")
    lines += [f"  {key}: {best[key]}" for key in SHAPE_KEYS]
    write_text_atomic(out, "\n".join(lines) + "\n")
