"""Distillation from a frozen teacher: the KD math, its chunking, and runs through the Composer Trainer."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from conftest import CrashAt, Interrupted, write_tiny_source

from llmshearing.checkpoint.loading import from_pretrained
from llmshearing.models.distill import distillation_loss, kd_per_position
from llmshearing.models.loss import IGNORE_INDEX, lm_loss
from llmshearing.train import build_trainer, main, run
from llmshearing.training.config import ConfigError, load_config, validate_config
from llmshearing.training.metrics_log import read_metrics

CONTINUED = "yamls/tiny/continued.yaml"
PRUNE = "yamls/tiny/prune.yaml"


# ----------------------------------------------------------------------------------------- math
def _logits(n: int = 12, vocab: int = 11, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, vocab, generator=generator) * 2, torch.randn(n, vocab, generator=generator) * 2


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_forward_and_reverse_kl_match_torch_kl_div(temperature):
    student, teacher = _logits()
    log_s = F.log_softmax(student / temperature, -1)
    log_t = F.log_softmax(teacher / temperature, -1)
    forward = F.kl_div(log_s, log_t, log_target=True, reduction="none").sum(-1) * temperature**2
    reverse = F.kl_div(log_t, log_s, log_target=True, reduction="none").sum(-1) * temperature**2
    torch.testing.assert_close(kd_per_position(student, teacher, temperature, "forward"), forward)
    torch.testing.assert_close(kd_per_position(student, teacher, temperature, "reverse"), reverse)
    assert not torch.allclose(forward, reverse)


@pytest.mark.parametrize("kind", ["forward", "reverse"])
def test_top_k_compares_the_teachers_top_tokens_and_one_merged_tail(kind):
    student, teacher = _logits(n=5, vocab=9, seed=1)
    k, temperature = 3, 1.7
    got = kd_per_position(student, teacher, temperature, kind, top_k=k)
    for row in range(student.shape[0]):
        p_s = torch.softmax(student[row].double() / temperature, -1)
        p_t = torch.softmax(teacher[row].double() / temperature, -1)
        top = sorted(range(9), key=lambda i: -p_t[i].item())[:k]
        s = torch.stack([p_s[i] for i in top] + [1 - sum(p_s[i] for i in top)])
        t = torch.stack([p_t[i] for i in top] + [1 - sum(p_t[i] for i in top)])
        p, q = (t, s) if kind == "forward" else (s, t)
        expected = (p * (p.log() - q.log())).sum() * temperature**2
        assert got[row].item() == pytest.approx(expected.item(), rel=1e-4, abs=1e-6)
    # merging outcomes never increases a KL divergence
    assert (got <= kd_per_position(student, teacher, temperature, kind) + 1e-6).all()


def test_kd_of_identical_distributions_is_zero_with_zero_gradient():
    student, _ = _logits()
    student.requires_grad_(True)
    loss = kd_per_position(student, student.detach(), 2.0, "forward").sum()
    loss.backward()
    assert loss.item() == pytest.approx(0.0, abs=1e-6)
    assert student.grad.abs().max().item() < 1e-6


class _Head:
    """A linear output head standing in for a teacher's; counts the rows it is asked for."""

    def __init__(self, weight: torch.Tensor) -> None:
        self.weight, self.rows = weight, []

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        self.rows.append(hidden.shape[0])
        return F.linear(hidden, self.weight)


def _batch(seed: int = 0, batch: int = 3, seq: int = 7, vocab: int = 13, dim: int = 5):
    generator = torch.Generator().manual_seed(seed)
    logits = (torch.randn(batch, seq, vocab, generator=generator) * 2).requires_grad_(True)
    hidden = torch.randn(batch, seq, dim, generator=generator)
    weight = torch.randn(vocab, dim, generator=generator)
    targets = torch.randint(0, vocab, (batch, seq), generator=generator)
    targets[:, -1] = IGNORE_INDEX
    targets[1, :3] = IGNORE_INDEX
    return logits, hidden, weight, targets


@pytest.mark.parametrize(
    ("kind", "top_k", "temperature"),
    [
        ("forward", None, 1.0),
        ("forward", None, 2.0),
        ("reverse", None, 0.5),
        ("forward", 4, 2.0),
        ("reverse", 4, 1.5),
    ],
)
@pytest.mark.parametrize("chunk_size", [1, 5, 1000])
def test_chunked_loss_and_gradient_equal_the_unchunked_ones(kind, top_k, temperature, chunk_size):
    logits, hidden, weight, targets = _batch()
    rows = (targets.reshape(-1) != IGNORE_INDEX).nonzero().squeeze(-1)
    flat = logits.reshape(-1, logits.shape[-1])
    teacher_logits = F.linear(hidden.reshape(-1, hidden.shape[-1]), weight)
    reference = kd_per_position(flat[rows], teacher_logits[rows], temperature, kind, top_k).mean()
    (reference_grad,) = torch.autograd.grad(reference, logits)

    head = _Head(weight)
    loss = distillation_loss(logits, hidden, head, targets, temperature, kind, top_k, chunk_size)
    (grad,) = torch.autograd.grad(loss, logits)
    torch.testing.assert_close(loss, reference, rtol=0, atol=1e-6)
    torch.testing.assert_close(grad, reference_grad, rtol=0, atol=1e-6)
    positions = targets.numel()  # the head sees contiguous chunks of positions, never all at once
    assert max(head.rows) == min(chunk_size, positions) and sum(head.rows) == positions
    assert grad[targets == IGNORE_INDEX].abs().max() == 0  # ignored positions get no gradient


def test_batch_without_counted_positions_gives_zero():
    logits, hidden, weight, targets = _batch()
    targets.fill_(IGNORE_INDEX)
    loss = distillation_loss(logits, hidden, _Head(weight), targets)
    loss.backward()
    assert loss.item() == 0.0 and logits.grad.abs().max() == 0


def test_lm_loss_mixes_kd_and_ce_by_alpha():
    logits, _, _, _ = _batch()
    batch = {"input_ids": torch.randint(0, 13, (3, 7))}
    ce = lm_loss(logits, batch)["ce"]
    kd = torch.tensor(0.75)
    mixed = lm_loss(logits, batch, penalty=torch.tensor(0.1), kd=kd, alpha=0.3)
    assert set(mixed) == {"total", "ce", "kd", "lagrangian"}
    torch.testing.assert_close(mixed["total"], 0.3 * kd + 0.7 * ce + 0.1)


# ------------------------------------------------------------------------------ Composer runs
@pytest.fixture(scope="module")
def student(tmp_path_factory) -> str:
    """A two-layer student (another seed) of the tiny source's vocabulary, standing in for a pruned model."""
    return write_tiny_source(str(tmp_path_factory.mktemp("student") / "ckpt"), seed=1, n_layers=2)


def _args(model: str, data: str, folder, *extra: str) -> list[str]:
    return [f"model.path={model}", f"data_local={data}", f"save_folder={folder}", *extra]


def _distil(teacher: str, alpha: float = 0.5, *extra: str) -> list[str]:
    return [f"model.distillation.teacher={teacher}", f"model.distillation.alpha={alpha}", *extra]


def _final_model(folder) -> dict[str, torch.Tensor]:
    path = os.path.join(folder, "checkpoints", "latest-rank0.pt")
    return torch.load(path, map_location="cpu", weights_only=False)["state"]["model"]


def _train(recipe: str, overrides: list[str], crash_at: int | None = None):
    trainer, values = build_trainer(recipe, overrides)
    if crash_at is not None:
        trainer.state.callbacks.append(CrashAt(crash_at))
        with pytest.raises(Interrupted):
            run(trainer, values)
    else:
        run(trainer, values)
    return trainer


def test_continued_run_with_distillation_logs_kd_ce_and_teacher_time(
    student, tiny_source, tiny_mds, tmp_path, clean_shm
):
    folder = tmp_path / "run"
    trainer, values = build_trainer(
        CONTINUED, _args(student, tiny_mds, folder, *_distil(tiny_source, 0.5, "max_duration=4ba"))
    )
    model = trainer.state.model
    teacher = model.teacher.module()
    # the teacher is not part of the student: not a parameter, not in the checkpoint
    assert not {id(p) for p in teacher.parameters()} & {id(p) for p in model.parameters()}
    assert all(not p.requires_grad for p in teacher.parameters())
    batch = {"input_ids": torch.zeros(2, 16, dtype=torch.long)}
    t = model.teacher.config
    teacher_forward = 2 * t.matmul_params() + 4 * t.n_layers * t.n_heads * t.head_dim * 16
    assert model.flops_per_batch(batch) == 2 * 16 * (model.config.train_flops_per_token(16) + teacher_forward)
    run(trainer, values)

    assert all(key.startswith("model.") for key in _final_model(folder))
    metrics = read_metrics(str(folder / "metrics.jsonl"))
    for name in ("loss/train/total", "loss/train/ce", "loss/train/kd"):
        assert len(metrics[name]) == 4, name
    for (_, total), (_, ce), (_, kd) in zip(
        metrics["loss/train/total"], metrics["loss/train/ce"], metrics["loss/train/kd"], strict=True
    ):
        assert kd > 0 and total == pytest.approx(0.5 * kd + 0.5 * ce, rel=1e-5)
    shares = [share for _, share in metrics["distill/teacher_time_share"]]
    assert len(shares) == 4 and all(0 < share < 1 for share in shares)
    assert any(name.endswith("alpha_LanguageCrossEntropy") for name in metrics)  # per-domain metrics


def test_teacher_time_share_is_the_teachers_spans_over_the_steps_marks(
    student, tiny_source, tiny_mds, tmp_path, clean_shm
):
    # two micro-batches per step and four KD chunks per micro-batch: ten teacher spans in every step,
    # and the device is waited for once at each end of the step, never inside a span
    from llmshearing.callbacks.distillation import TeacherTimeMonitor

    folder = tmp_path / "run"
    distil = _distil(tiny_source, 0.5, "model.distillation.chunk_size=8", "max_duration=3ba")
    trainer, values = build_trainer(CONTINUED, _args(student, tiny_mds, folder, *distil))
    monitor = next(c for c in trainer.state.callbacks if isinstance(c, TeacherTimeMonitor))
    teacher = trainer.state.model.teacher
    calls = {"sync": 0, "teacher": 0}
    steps = []

    def counting(name, function):
        def wrapped(*args, **kwargs):
            calls[name] += 1
            return function(*args, **kwargs)

        return wrapped

    monitor.synchronize = counting("sync", monitor.synchronize)
    teacher.hidden_states = counting("teacher", teacher.hidden_states)
    teacher.logits = counting("teacher", teacher.logits)
    take = teacher.clock.take_seconds

    def recorded_take():
        spans, seconds = list(teacher.clock.spans), take()
        if calls["sync"] % 2 == 0:  # at batch_end (batch_start's wait makes the count odd)
            steps.append((spans, monitor.last_step, seconds, dict(calls)))
        return seconds

    teacher.clock.take_seconds = recorded_take
    run(trainer, values)

    ends = steps
    assert len(ends) == 3
    metrics = read_metrics(str(folder / "metrics.jsonl"))
    previous = {"sync": 0, "teacher": 0}
    for (spans, (start, end), seconds, counted), (_, logged), (_, share) in zip(
        ends, metrics["distill/teacher_seconds"], metrics["distill/teacher_time_share"], strict=True
    ):
        assert counted["teacher"] - previous["teacher"] == len(spans) == 2 * (1 + 4)
        assert counted["sync"] - previous["sync"] == 2  # once at batch_start, once at batch_end
        previous = counted
        assert all(start <= a <= b <= end for a, b in spans)
        assert seconds == pytest.approx(sum(b - a for a, b in spans), rel=1e-12) and logged == seconds
        assert share == pytest.approx(seconds / (end - start), rel=1e-12) and 0 < share < 1


def test_alpha_zero_trains_exactly_like_plain_lm_and_kd_pulls_toward_the_teacher(
    student, tiny_source, tiny_mds, tmp_path, clean_shm
):
    short = ["max_duration=4ba", "save_interval=4ba"]
    _train(CONTINUED, _args(student, tiny_mds, tmp_path / "plain", *short))
    _train(CONTINUED, _args(student, tiny_mds, tmp_path / "zero", *short, *_distil(tiny_source, 0.0)))
    _train(CONTINUED, _args(student, tiny_mds, tmp_path / "kd", *short, *_distil(tiny_source, 1.0)))
    plain, zero, kd = (_final_model(tmp_path / name) for name in ("plain", "zero", "kd"))
    assert plain.keys() == zero.keys() == kd.keys()
    for key, value in plain.items():
        assert torch.equal(value, zero[key]), key
    # with a KD term the student moves toward the teacher: its KL to the teacher drops further
    teacher = from_pretrained(tiny_source)
    tokens = (torch.arange(16)[None] + torch.arange(0, 40, 5)[:, None]) % 97  # the data's counting pattern
    with torch.no_grad():
        teacher_logits = teacher(tokens).reshape(-1, 97)
        kl = {}
        for name, state in (("plain", plain), ("kd", kd)):
            model = from_pretrained(student)
            model.load_state_dict({k.removeprefix("model."): v for k, v in state.items()})
            kl[name] = kd_per_position(model(tokens).reshape(-1, 97), teacher_logits).mean().item()
    assert kl["kd"] < 0.9 * kl["plain"]


def test_interrupted_distillation_run_resumes_bit_identically(
    student, tiny_source, tiny_mds, tmp_path, clean_shm
):
    common = [
        *_distil(tiny_source, 0.7, "model.distillation.top_k=8"),
        "save_interval=2ba",
        "autoresume=true",
    ]
    _train(CONTINUED, _args(student, tiny_mds, tmp_path / "straight", *common))
    _train(CONTINUED, _args(student, tiny_mds, tmp_path / "resumed", *common), crash_at=6)
    _train(CONTINUED, _args(student, tiny_mds, tmp_path / "resumed", *common))
    a, b = _final_model(tmp_path / "straight"), _final_model(tmp_path / "resumed")
    assert a.keys() == b.keys()
    for key, value in a.items():
        assert torch.equal(value, b[key]), key


def test_pruning_distils_from_a_frozen_copy_of_the_source_by_default(
    tiny_source, tiny_mds, tmp_path, clean_shm
):
    folder = tmp_path / "prune"
    trainer = _train(PRUNE, _args(tiny_source, tiny_mds, folder, "max_duration=4ba", "model.distillation={}"))
    model = trainer.state.model
    assert model.teacher.path == tiny_source
    # the student's weights moved while the teacher kept the source's
    original = from_pretrained(tiny_source).state_dict()
    teacher = model.teacher.module().state_dict()
    student_weights = model.model.state_dict()
    for key, value in original.items():
        assert torch.equal(teacher[key], value), key
    assert any(not torch.equal(student_weights[key], value) for key, value in original.items())
    metrics = read_metrics(str(folder / "metrics.jsonl"))
    assert {"loss/train/kd", "loss/train/ce", "loss/train/lagrangian"} <= set(metrics)


# ---------------------------------------------------------------------------------- bad config
def _validate(*overrides: str) -> dict:
    return validate_config(load_config(CONTINUED, list(overrides)))


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.distillation.alpha=1.5", "model.distillation.alpha must be a number in [0, 1]"),
        ("model.distillation.temperature=0", "model.distillation.temperature must be a positive number"),
        ("model.distillation.kind=sideways", "model.distillation.kind must be one of ['forward', 'reverse']"),
        ("model.distillation.top_k=97", "model.distillation.top_k (97) must be smaller than the vocabulary"),
        ("model.distillation.top_k=0", "model.distillation.top_k must be a positive integer or null"),
        ("model.distillation.chunk_size=0", "model.distillation.chunk_size must be a positive integer"),
        ("model.distillation.temprature=2", "did you mean model.distillation.temperature?"),
    ],
)
def test_bad_distillation_settings_are_named(student, tiny_source, tiny_mds, override, message):
    with pytest.raises(ConfigError) as err:
        _validate(*_args(student, tiny_mds, "unused"), f"model.distillation.teacher={tiny_source}", override)
    assert message in str(err.value)


def test_teacher_must_exist_share_the_vocabulary_and_be_named_outside_pruning(
    student, tiny_source, tiny_mds, tmp_path
):
    with pytest.raises(ConfigError, match=r"model.distillation.teacher .*missing.* does not exist"):
        _validate(*_args(student, tiny_mds, "unused"), f"model.distillation.teacher={tmp_path / 'missing'}")
    other_vocab = write_tiny_source(str(tmp_path / "other"), vocab_size=64)
    with pytest.raises(ConfigError, match="vocabulary of 64 tokens but the student has 97"):
        _validate(*_args(student, tiny_mds, "unused"), f"model.distillation.teacher={other_vocab}")
    with pytest.raises(ConfigError, match="model.distillation.teacher is required outside pruning"):
        _validate(*_args(student, tiny_mds, "unused"), "model.distillation.alpha=0.5")
    with pytest.raises(ConfigError, match="model.distillation must be a mapping"):
        _validate(*_args(student, tiny_mds, "unused"), "model.distillation=true")
    values = _validate(*_args(student, tiny_mds, "unused"), f"model.distillation.teacher={tiny_source}")
    assert values.model.distillation.to_dict() == {
        "teacher": tiny_source,
        "alpha": 0.5,
        "temperature": 1.0,
        "kind": "forward",
        "top_k": None,
        "chunk_size": 1024,
    }


def test_cli_reports_a_bad_teacher_in_one_line_before_training(student, tiny_mds, tmp_path, capsys):
    folder = tmp_path / "run"
    code = main(
        [CONTINUED, *_args(student, tiny_mds, folder), f"model.distillation.teacher={tmp_path / 'nope'}"]
    )
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: model.distillation.teacher") and "\n" not in err
    assert not folder.exists()
