"""DynamicLoadingCallback with Composer's Trainer, ComposerLlama and real MDS data.

Exact resumption is checked by training without interruption (checkpointing at every
BATCH_CHECKPOINT and EPOCH_CHECKPOINT), resuming new Trainers from a mid-interval checkpoint and
from both kinds of boundary checkpoint, and comparing every batch's sample ids and the whole
weight history.
"""

from __future__ import annotations

import gc
import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from streaming.base.util import clean_stale_shared_memory

from llmshearing.data.proportions import largest_remainder_counts
from llmshearing.dynamic_loading.callback import DynamicLoadingCallback
from llmshearing.dynamic_loading.config import DataLoadingConfig
from llmshearing.dynamic_loading.mixing import doremi_update
from llmshearing.dynamic_loading.reference_loss import PRESETS
from llmshearing.models.loss import domain_token_losses

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(__file__)), "scripts", "mix_training.py")
_spec = importlib.util.spec_from_file_location("mix_training", SCRIPT)
mix = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(mix)

NAMES = mix.NAMES


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return mix.write_domains(str(tmp_path_factory.mktemp("mds")))


@pytest.fixture()
def fresh(tmp_path):
    """New cache directories per run; clean streaming's shared memory first."""
    gc.collect()
    clean_stale_shared_memory()
    counter = iter(range(100))
    return lambda: str(tmp_path / f"cache{next(counter)}")


def assert_resumes_exactly(data_root, fresh, tmp_path, checkpoints, updated=(0, 1, 2, 3), **kwargs):
    folder = str(tmp_path / "ckpt")
    kwargs.setdefault("max_duration", "9ba")
    full = mix.run_training(data_root, fresh(), save_folder=folder, **kwargs)
    assert [h["epoch"] for h in full["callback"]["history"]] == list(updated)
    for name in checkpoints:
        resumed = mix.run_training(data_root, fresh(), load_path=os.path.join(folder, name), **kwargs)
        start, same = mix.resumed_matches(full, resumed)
        assert same, f"resumed from {name} (batch {start}): batches differ"
        assert resumed["callback"] == full["callback"], f"resumed from {name}: weight history differs"
    return full


def test_resume_exact_eval_at_interval_batches(data_root, fresh, tmp_path):
    # ep1-ba4: mid-interval; ep1-ba6: last batch of an interval (after the update at BATCH_END);
    # ep2-ba6: after EPOCH_END (the dataset state must point at the next epoch, not replay this one)
    assert_resumes_exactly(data_root, fresh, tmp_path, ["ep1-ba4.pt", "ep1-ba6.pt", "ep2-ba6.pt"])


@pytest.mark.slow
def test_resume_exact_eval_every_epoch_with_persistent_workers(data_root, fresh, tmp_path):
    # with eval_interval 1ep the checkpoint at ep1-ba6 predates the update, which the resumed run
    # recomputes when it replays EPOCH_END
    assert_resumes_exactly(
        data_root, fresh, tmp_path, ["ep1-ba5.pt", "ep1-ba6.pt", "ep2-ba6.pt"], workers=2, eval_interval="1ep"
    )


@pytest.mark.slow
def test_resume_exact_with_training_losses(data_root, fresh, tmp_path):
    # the per-domain training loss accumulated so far in the interval is part of the checkpoint;
    # updates happen at the end of each interval only (no training loss exists before the first)
    full = assert_resumes_exactly(
        data_root,
        fresh,
        tmp_path,
        ["ep1-ba4.pt", "ep1-ba6.pt"],
        updated=(1, 2, 3),
        data_loading={"loss_source": "train"},
    )
    assert all(h["batch"] == 3 * h["epoch"] for h in full["callback"]["history"])


def test_updates_follow_the_rule_and_are_logged(data_root, fresh):
    from composer.loggers import InMemoryLogger

    logger = InMemoryLogger()
    run = mix.run_training(data_root, fresh(), max_duration="7ba", loggers=[logger])
    history = run["callback"]["history"]
    # pre-fit eval -> epoch 0; evals at batches 3 and 6 -> epochs 1 and 2; the FIT_END eval at
    # batch 7 is mid-interval and changes nothing
    assert [(h["epoch"], h["batch"]) for h in history] == [(0, 0), (1, 3), (2, 6)]
    weights = np.array([0.5, 0.3, 0.2])
    ref = np.array([2.0, 1.0, 0.5])
    for h in history:
        batch = h["batch"]
        logged = {
            n: dict((int(t.batch), v) for t, v in logger.data[f"metrics/eval/{n}_LanguageCrossEntropy"])
            for n in NAMES
        }
        losses = np.array([float(logged[n][batch]) for n in NAMES])
        assert h["losses"] == pytest.approx(losses.tolist(), abs=0)
        weights = doremi_update(weights, losses, ref, eta=1.0, smoothing=1e-4, clip=True)
        assert h["weights"] == weights.tolist()
        assert h["counts"] == largest_remainder_counts(weights, 12).tolist()
        for i, name in enumerate(NAMES):
            series = dict((int(t.batch), v) for t, v in logger.data[f"data/weight/{name}"])
            assert series[batch] == weights[i]
            assert dict((int(t.batch), v) for t, v in logger.data[f"data/reference/{name}"])[batch] == ref[i]
    # the intervals really used those counts
    for h in history:
        epoch = h["epoch"]
        domains = [d for b, _, ds in run["batches"] for d in ds if 3 * epoch <= b < 3 * epoch + 3]
        if len(domains) == 12:
            assert np.bincount(domains, minlength=3).tolist() == h["counts"]
    assert "data/eval_loss/web" in logger.data  # the off-boundary eval is logged only


def test_reference_from_source_model(data_root, fresh):
    from composer.loggers import InMemoryLogger

    logger = InMemoryLogger()
    run = mix.run_training(
        data_root,
        fresh(),
        max_duration="6ba",
        loggers=[logger],
        data_loading={"target_loss": None, "reference": "source"},
    )
    first = {n: float(logger.data[f"metrics/eval/{n}_LanguageCrossEntropy"][0][1]) for n in NAMES}
    assert run["callback"]["reference"] == [first[n] for n in NAMES]
    # the pre-training eval only sets the reference; updates follow at the interval ends
    assert [h["epoch"] for h in run["callback"]["history"]] == [1, 2]


def test_reference_from_source_needs_an_eval_before_fit(data_root, fresh):
    with pytest.raises(RuntimeError, match=r"run trainer.eval\(\) before trainer.fit\(\)"):
        mix.run_training(
            data_root,
            fresh(),
            max_duration="3ba",
            eval_before_fit=False,
            data_loading={"target_loss": None, "reference": "source"},
        )


def test_subset_of_train_batches_is_rejected(data_root, fresh):
    from composer import Trainer

    from llmshearing.dynamic_loading.loader import build_train_dataloader

    dl = {"dynamic": True, "set_names": NAMES, "proportion": [0.5, 0.3, 0.2], "target_loss": [1, 1, 1]}
    train = build_train_dataloader(
        {"dataset": {"local": fresh(), "remote": data_root}}, dl, device_batch_size=4, eval_interval="3ba"
    )
    trainer = Trainer(
        model=mix.tiny_model(),
        train_dataloader=train,
        train_subset_num_batches=2,
        max_duration="2ba",
        callbacks=[DynamicLoadingCallback.from_config(dl)],
        device="cpu",
        progress_bar=False,
    )
    with pytest.raises(ValueError, match="do not set train_subset_num_batches with dynamic loading"):
        trainer.fit()
    trainer.close()


def test_domain_token_losses_match_cross_entropy_per_row():
    torch.manual_seed(0)
    logits = torch.randn(4, 6, 11)
    ids = torch.randint(0, 11, (4, 6))
    labels = ids.clone()
    labels[1, 3:] = -100  # padding is not counted
    batch = {"input_ids": ids, "labels": labels, "domain": torch.tensor([2, 0, 2, 1])}
    sums, tokens = domain_token_losses(logits, batch, 3)
    expected_sum, expected_tok = torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
    for row, d in enumerate([2, 0, 2, 1]):
        target = labels[row, 1:]
        keep = target != -100
        expected_sum[d] += F.cross_entropy(logits[row, :-1][keep], target[keep], reduction="sum").double()
        expected_tok[d] += keep.sum()
    assert torch.allclose(sums, expected_sum, rtol=1e-6, atol=1e-6)
    assert tokens.tolist() == expected_tok.tolist() == [2.0, 5.0, 10.0]


def dynamic_callback(set_names: list[str], proportion: list[float], **keys) -> DynamicLoadingCallback:
    """The callback of ``callbacks.data_loading`` with ``dynamic: true``, these domains and ``keys``."""
    return DynamicLoadingCallback(DataLoadingConfig(set_names, proportion, dynamic=True, **keys))


def test_reference_options_and_validation():
    cb = dynamic_callback(["wiki", "cc"], [0.5, 0.5], reference="sheared-1.3b")
    assert cb.reference.tolist() == [PRESETS["sheared-1.3b"]["wiki"], PRESETS["sheared-1.3b"]["cc"]]
    from llmshearing.dynamic_loading.reference_loss import LLAMA2_LOSSES, LLAMA2_SIZES

    fit = {"sizes": list(LLAMA2_SIZES), "losses": LLAMA2_LOSSES, "target_size": "2701560320"}
    cb = dynamic_callback(["github", "arxiv"], [0.5, 0.5], reference=fit)
    assert np.round(cb.reference, 4).tolist() == [0.6883, 1.3560]
    with pytest.raises(ValueError, match=r"needs exactly the keys \['losses', 'sizes', 'target_size'\]"):
        dynamic_callback(["cc"], [1.0], reference={"sizes": [1, 2, 3]})
    with pytest.raises(ValueError, match="unknown reference preset"):
        dynamic_callback(["cc"], [1.0], reference="sheared-7b")
    assert DynamicLoadingCallback.from_config({"set_names": ["cc"], "proportion": [1.0]}) is None
    with pytest.raises(ValueError, match=r"callbacks.data_loading.dynamic is false: the mix is fixed"):
        DynamicLoadingCallback(DataLoadingConfig(["cc"], [1.0]))
    constant = DynamicLoadingCallback.from_config(
        {"dynamic": True, "set_names": ["a", "b"], "proportion": [0.5, 0.5], "update_type": "constant"}
    )
    assert constant.reference is None

    state = dynamic_callback(["a", "b"], [0.4, 0.6], target_loss=[1, 1]).state_dict()
    with pytest.raises(ValueError, match="resume with the same callbacks.data_loading.set_names"):
        dynamic_callback(["a", "c"], [0.4, 0.6], target_loss=[1, 1]).load_state_dict(state)


@pytest.mark.slow
def test_two_ranks_share_the_mix_and_resume_exactly(data_root, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    composer = os.path.join(os.path.dirname(sys.executable), "composer")
    proc = subprocess.run(
        [
            composer,
            "-n",
            "2",
            "--stdout",
            str(out / "rank{rank}.out"),
            "--stderr",
            str(out / "rank{rank}.err"),
            SCRIPT,
            data_root,
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    logs = "".join((out / f"rank{r}.err").read_text() for r in range(2) if (out / f"rank{r}.err").exists())
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:] + logs[-4000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["history"] == ranks[1]["history"]
    history = {h["epoch"]: h["counts"] for h in ranks[0]["history"]}
    for epoch in range(3):  # 9 batches = 3 intervals
        ids = [i for r in ranks for b, idx, _ in r["batches"] for i in idx if 3 * epoch <= b < 3 * epoch + 3]
        domains = [
            d for r in ranks for b, _, ds in r["batches"] for d in ds if 3 * epoch <= b < 3 * epoch + 3
        ]
        assert np.bincount(domains, minlength=3).tolist() == history[epoch]  # the global mix is exact
        if epoch == 0:
            assert len(set(ids)) == len(ids) == 12  # the two ranks read disjoint samples
    for r in ranks:
        for name, batches in r["resumed"].items():
            start = batches[0][0]
            assert [b[1] for b in batches] == [b[1] for b in r["batches"][start:]], name
    # every eval sample is counted exactly once over the two ranks (15 samples, sampler padding dropped)
    assert ranks[0]["eval_tokens"] == {
        n: k * (mix.SEQ_LEN - 1) for n, k in zip(NAMES, mix.EVAL_SIZES, strict=True)
    }


# ------------------------------------------------------------------------------- stabilisers
STABLE = {"loss_ema": 0.5, "min_proportion": 0.5, "update_warmup": "4ba", "excess": "relative"}


def test_stabilised_mix_follows_the_options_and_resumes_exactly(data_root, fresh, tmp_path):
    # boundaries at batches 0 and 3 fall in the warm-up: they feed the average and keep the mix;
    # ep1-ba4 holds an average of two evaluations mid-interval, ep2-ba6 the first real update
    full = assert_resumes_exactly(
        data_root, fresh, tmp_path, ["ep1-ba4.pt", "ep2-ba6.pt"], data_loading=dict(STABLE)
    )
    state = full["callback"]
    history = state["history"]
    initial, ref = np.array([0.5, 0.3, 0.2]), np.array([2.0, 1.0, 0.5])
    floors = 0.5 * initial
    weights, smoothed = initial, None
    for h in history:
        losses = np.array(h["losses"])
        smoothed = losses if smoothed is None else 0.5 * smoothed + 0.5 * losses
        assert h["smoothed"] == smoothed.tolist()
        if h["batch"] < 4:
            assert h.get("warmup") is True and "counts" not in h and h["weights"] == initial.tolist()
            continue
        weights = doremi_update(weights, smoothed, ref, eta=1.0, smoothing=1e-4, relative=True, floors=floors)
        assert h["weights"] == weights.tolist()
        assert h["counts"] == largest_remainder_counts(weights, 12).tolist()
    assert [h["batch"] for h in history] == [0, 3, 6, 9]
    assert state["weights"] == weights.tolist() and json.loads(state["smoothed"]) == smoothed.tolist()
    assert np.isclose(weights, floors).any()  # a floor holds the mix up
    # the intervals before the first update read the initial mix
    domains = [d for b, _, ds in full["batches"] for d in ds if b < 6]
    assert np.bincount(domains, minlength=3).tolist() == (2 * largest_remainder_counts(initial, 12)).tolist()


BAD_OPTIONS = {
    "loss_ema": (1.0, r"loss_ema must be a decay in \[0, 1\)"),
    "min_proportion": (-0.1, r"min_proportion must be in \[0, 1\)"),
    "update_warmup": ("2ep", "update_warmup must be a number of batches"),
    "excess": ("ratio", r"excess must be one of \['absolute', 'relative'\]"),
    "eta": ("fast", "eta must be a non-negative number"),
    "floor_proportion": ([0.9, 0.3], "floor_proportion sums to 1.2, not 1"),
}


@pytest.mark.parametrize("key", sorted(BAD_OPTIONS))
def test_stabiliser_options_are_validated_with_the_key(key):
    value, message = BAD_OPTIONS[key]
    settings = {"dynamic": True, "set_names": ["a", "b"], "proportion": [0.5, 0.5], "target_loss": [1, 1]}
    with pytest.raises(ValueError, match=rf"callbacks\.data_loading\.{message}"):
        DataLoadingConfig.from_dict({**settings, key: value})


def test_stabiliser_options_are_parsed_and_relative_excess_needs_positive_references():
    settings = {"dynamic": True, "set_names": ["a", "b"], "proportion": [0.6, 0.4], "target_loss": [1, 2]}
    cfg = DataLoadingConfig.from_dict({**settings, "update_warmup": "40ba", "min_proportion": 0.25})
    assert cfg.update_warmup == 40 and cfg.floors == [0.15, 0.1]
    assert DataLoadingConfig.from_dict(settings).floors == [0.3, 0.2]  # default: half the initial mix
    assert DataLoadingConfig.from_dict({**settings, "min_proportion": 0}).floors is None  # the paper's rule
    # a later stage that starts from an earlier stage's final mix anchors the floor to the data's own mix
    later = DataLoadingConfig.from_dict(
        {**settings, "proportion": [0.9, 0.1], "floor_proportion": [0.6, 0.4]}
    )
    assert later.floors == [0.3, 0.2] and later.proportion == [0.9, 0.1]
    assert cfg.loss_ema == 0.0
    assert cfg.excess == "absolute"
    with pytest.raises(ValueError, match="excess: relative divides by the reference losses"):
        dynamic_callback(["a", "b"], [0.5, 0.5], target_loss=[1.0, 0.0], excess="relative")
    callback = DynamicLoadingCallback.from_config({**settings, **STABLE})
    assert (callback.cfg.loss_ema, callback.cfg.update_warmup, callback.cfg.excess) == (0.5, 4, "relative")
