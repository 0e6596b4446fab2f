"""DynamicStreamingDataset, DomainEvalDataset and the loader builders on small real MDS data."""

from __future__ import annotations

import collections
import gc
import importlib.util
import logging
import os
import shutil

import numpy as np
import pytest
import torch
from streaming.base.util import clean_stale_shared_memory

from llmshearing.data.loaders import build_eval_dataloader
from llmshearing.data.proportions import largest_remainder_counts
from llmshearing.dynamic_loading.config import DataLoadingConfig
from llmshearing.dynamic_loading.loader import build_train_dataloader

_spec = importlib.util.spec_from_file_location(
    "mix_training", os.path.join(os.path.dirname(os.path.dirname(__file__)), "scripts", "mix_training.py")
)
mix = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(mix)

NAMES = mix.NAMES  # web 40, code 24, book 10 train samples
DL = {"dynamic": True, "set_names": NAMES, "proportion": [0.5, 0.3, 0.2], "target_loss": [1.0, 1.0, 1.0]}


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return mix.write_domains(str(tmp_path_factory.mktemp("mds")))


@pytest.fixture()
def cache(tmp_path):
    """A new local cache (streaming's shared memory is keyed by local paths) and clean shared memory."""
    gc.collect()
    clean_stale_shared_memory()
    return str(tmp_path / "cache")


def train_loader(data_root, cache, workers=0, batch=4, interval="5ba", **dataset):
    cfg = {
        "dataset": {"local": cache, "remote": data_root, "shuffle_seed": 11, **dataset},
        "num_workers": workers,
        "persistent_workers": workers > 0,
    }
    spec = build_train_dataloader(cfg, DL, device_batch_size=batch, eval_interval=interval)
    loader = spec.dataloader
    # Composer's DataSpec refers to itself: collect it now, so that the loader's workers are later
    # shut down by reference counting rather than inside a garbage-collection pass (which stalls).
    del spec
    gc.collect()
    return loader


def epoch_draws(loader) -> list[tuple[int, int]]:
    draws = []
    for batch in loader:
        assert batch["input_ids"].dtype == torch.int64
        draws += list(zip(batch["domain"].tolist(), batch["idx"].tolist(), strict=True))
    return draws


SCHEDULE = {1: [0.1, 0.1, 0.8], 3: [0.6, 0.4, 0.0]}  # epoch -> new proportions


def run_schedule(loader, epochs=4, counts=None) -> list[list[tuple[int, int]]]:
    """Iterate ``epochs`` intervals, changing the mix as in SCHEDULE; record the planned counts."""
    dataset = loader.dataset
    out = []
    for epoch in range(epochs):
        if epoch in SCHEDULE:
            dataset.set_proportions(SCHEDULE[epoch], epoch)
        if counts is not None:
            counts.append(dataset.domain_counts(epoch).tolist())
        out.append(epoch_draws(loader))
    return out


def test_samples_carry_tokens_domain_and_global_index(data_root, cache):
    loader = train_loader(data_root, cache, max_seq_len=12)
    dataset = loader.dataset
    batch = next(iter(loader))
    assert batch["input_ids"].shape == (4, 12)
    offsets = dataset.sample_offset_per_stream
    for domain, idx in zip(batch["domain"].tolist(), batch["idx"].tolist(), strict=True):
        assert offsets[domain] <= idx < offsets[domain] + dataset.samples_per_stream[domain]
        raw = dataset.get_item(idx)
        assert raw["domain"] == domain and raw["idx"] == idx


def test_worker_batches_unpack_to_the_samples(data_root, cache):
    loader = train_loader(data_root, cache, workers=2)
    batch = next(iter(loader))
    assert all(t.is_contiguous() and t.dtype == torch.int64 for t in batch.values())
    for row, domain, idx in zip(
        batch["input_ids"], batch["domain"].tolist(), batch["idx"].tolist(), strict=True
    ):
        sample = loader.dataset.get_item(idx)
        assert sample["domain"] == domain
        assert torch.equal(sample["input_ids"], row)
    del loader


def test_exact_counts_per_interval_and_no_repeats_within_a_pass(data_root, cache, caplog):
    loader = train_loader(data_root, cache)
    dataset = loader.dataset
    assert dataset.epoch_size == 20
    planned = []
    with caplog.at_level(logging.INFO, logger="llmshearing.data.dynamic_dataset"):
        epochs = run_schedule(loader, counts=planned)
    expected = [[10, 6, 4], [2, 2, 16], [2, 2, 16], [12, 8, 0]]
    assert planned == expected
    for epoch, draws in enumerate(epochs):
        counts = collections.Counter(d for d, _ in draws)
        assert [counts[d] for d in range(3)] == expected[epoch], epoch
    assert expected[1] == largest_remainder_counts(SCHEDULE[1], 20).tolist()

    # Every domain is drawn in passes: after each interval all of its samples have been drawn equally
    # often, give or take one (no sample is drawn again before every sample has been drawn).
    seen = {d: collections.Counter() for d in range(3)}
    for draws in epochs:
        for d, idx in draws:
            seen[d][idx] += 1
        for d in range(3):
            n = int(dataset.samples_per_stream[d])
            times = [seen[d][int(dataset.sample_offset_per_stream[d]) + j] for j in range(n)]
            assert max(times) - min(times) <= 1, (d, times)
    # book (10 samples) took 4 + 16 + 16 draws: passes 2, 3 and 4 started, each logged
    book = [r.getMessage() for r in caplog.records if "'book'" in r.getMessage()]
    for n in (2, 3, 4):
        assert any(f"all 10 samples used; starting shuffled pass {n}" in m for m in book), book


def test_persistent_workers_follow_the_same_mix(data_root, cache, tmp_path):
    reference = run_schedule(train_loader(data_root, cache))
    gc.collect()
    clean_stale_shared_memory()
    loader = train_loader(data_root, str(tmp_path / "cache2"), workers=2)
    epochs = run_schedule(loader)
    for epoch, (ref, got) in enumerate(zip(reference, epochs, strict=True)):
        # the worker count changes the order within an interval, never which samples it holds
        assert sorted(got) == sorted(ref), epoch
    del loader


def test_mix_change_must_precede_its_epoch(data_root, cache):
    loader = train_loader(data_root, cache)
    epoch_draws(loader)
    with pytest.raises(RuntimeError, match="cannot change the mix of epoch 0"):
        loader.dataset.set_proportions([0.2, 0.2, 0.6], 0)
    counts = loader.dataset.set_proportions([0.2, 0.2, 0.6], 1)
    assert counts.tolist() == [4, 4, 12]
    # idempotent: the same call again leaves the schedule as it is
    assert loader.dataset.set_proportions([0.2, 0.2, 0.6], 1).tolist() == [4, 4, 12]
    assert loader.dataset.domain_cursors(1).tolist() == [10, 6, 4]
    assert loader.dataset.domain_cursors(3).tolist() == [18, 14, 28]


def test_state_dict_carries_the_mix_and_rejects_other_runs(data_root, cache, tmp_path):
    loader = train_loader(data_root, cache)
    dataset = loader.dataset
    dataset.set_proportions([0.2, 0.2, 0.6], 0)
    state = dataset.state_dict(0, True)
    assert state["mix"]["set_names"] == NAMES
    assert state["mix"]["records"][1][:4] == [0, 4, 4, 12]
    del loader, dataset
    gc.collect()
    clean_stale_shared_memory()

    other = train_loader(data_root, str(tmp_path / "c2")).dataset
    other.load_state_dict(state)
    assert other.domain_counts(0).tolist() == [4, 4, 12]
    with pytest.raises(ValueError, match="update interval holds 12 samples, this run's 20"):
        bigger = dict(state, mix=dict(state["mix"], epoch_size=12))
        other.load_state_dict(bigger)
    with pytest.raises(ValueError, match="trained on domains"):
        other.load_state_dict(dict(state, mix=dict(state["mix"], set_names=["a", "b", "c"])))
    with pytest.raises(ValueError, match="the data changed since the checkpoint"):
        other.load_state_dict(dict(state, mix=dict(state["mix"], samples_per_domain=[1, 2, 3])))
    with pytest.raises(ValueError, match="not written by DynamicStreamingDataset"):
        other.load_state_dict({k: v for k, v in state.items() if k != "mix"})


def test_eval_set_covers_every_sample_once_interleaved(data_root, cache):
    spec = build_eval_dataloader(
        {"dataset": {"local": cache, "remote": data_root}}, NAMES, device_batch_size=4
    )
    dataset = spec.dataloader.dataset
    assert len(dataset) == sum(mix.EVAL_SIZES)
    draws = epoch_draws(spec.dataloader)
    assert len(set(draws)) == len(draws) == len(dataset)
    offsets = np.cumsum([0, *mix.EVAL_SIZES])
    for d, idx in draws:
        assert offsets[d] <= idx < offsets[d + 1]
    assert sorted(d for d, _ in draws[:3]) == [0, 1, 2]  # any prefix covers every domain


def test_an_eval_subset_must_reach_every_domain(data_root, cache):
    cfg = {"dataset": {"local": cache, "remote": data_root}}
    spec = build_eval_dataloader(cfg, NAMES, device_batch_size=2, subset_num_batches=2)
    dataset = spec.dataloader.dataset
    assert dataset.prefix_covering() == 3 and dataset.domains_in_prefix(2) == NAMES[:2]
    del spec, dataset
    gc.collect()
    clean_stale_shared_memory()
    missing = rf"\['{NAMES[2]}'\]"
    with pytest.raises(
        ValueError, match=rf"first 2 eval samples, which hold none of domains {missing}.*=2 or more"
    ):
        build_eval_dataloader(cfg, NAMES, device_batch_size=2, subset_num_batches=1)


def test_eval_samples_per_domain(data_root, cache):
    cfg = {"dataset": {"local": cache, "remote": data_root, "samples_per_domain": 4}}
    dataset = build_eval_dataloader(cfg, NAMES, device_batch_size=2).dataloader.dataset
    assert dataset.samples_per_domain == (4, 4, 4)
    assert collections.Counter(dataset[i]["domain"] for i in range(len(dataset))) == {0: 4, 1: 4, 2: 4}


@pytest.mark.parametrize(
    ("data_loading", "message"),
    [
        ({"proportion": [0.5, 0.3, 0.3]}, "callbacks.data_loading.proportion sums to 1.1, not 1"),
        (
            {"proportion": [0.5, 0.5]},
            "callbacks.data_loading.proportion has 2 values but there are 3 domains",
        ),
        ({"target_loss": [1.0, 2.0]}, "target_loss must hold one loss per domain (3"),
        (
            {"proportions": [1.0]},
            "unknown config key 'callbacks.data_loading.proportions'; did you mean callbacks.data_loading.proportion?",
        ),
        ({"target_loss": None}, "update_type doremi needs reference losses"),
        ({"reference": "source"}, "give either callbacks.data_loading.target_loss or"),
        ({"update_type": "bandit"}, "update_type must be one of ['doremi', 'constant']"),
        ({"loss_source": "both"}, "loss_source must be one of ['eval', 'train']"),
        ({"set_names": ["web", "web", "book"]}, "set_names has duplicates"),
    ],
)
def test_data_loading_config_errors(data_loading, message):
    with pytest.raises(ValueError) as err:
        DataLoadingConfig.from_dict({**DL, **data_loading})
    assert message in str(err.value)


def test_loader_errors_name_the_key_and_fix(data_root, cache, tmp_path):
    def build(loader=None, dl=None, interval="5ba", batch=4):
        cfg = {"dataset": {"local": data_root}, **(loader or {})}
        return build_train_dataloader(
            cfg, {**DL, **(dl or {})}, device_batch_size=batch, eval_interval=interval
        )

    with pytest.raises(
        ValueError, match=r"domains \['news'\] of callbacks.data_loading.set_names are missing"
    ):
        build(dl={"set_names": ["web", "news", "book"]})
    no_manifest = tmp_path / "bare"
    shutil.copytree(data_root, no_manifest)
    os.remove(no_manifest / "manifest.json")
    with pytest.raises(
        ValueError, match=r"domain 'news' is missing from the data: no .*train/news/index.json"
    ):
        build_train_dataloader(
            {"dataset": {"local": str(no_manifest)}},
            {**DL, "set_names": ["web", "news", "book"]},
            device_batch_size=4,
            eval_interval="5ba",
        )
    with pytest.raises(
        ValueError,
        match=r"unknown config key 'train_loader.dataset.shuffel'; did you mean train_loader.dataset.shuffle\?",
    ):
        build(loader={"dataset": {"local": data_root, "shuffel": True}})
    with pytest.raises(ValueError, match="is_uint16 is not needed"):
        build(loader={"dataset": {"local": data_root, "is_uint16": True}})
    with pytest.raises(ValueError, match="max_seq_len = 64 exceeds the data's seq_len 16"):
        build(loader={"dataset": {"local": data_root, "max_seq_len": 64}})
    with pytest.raises(
        ValueError, match="update_interval = 10sp is not a whole number of global batches of 4"
    ):
        build(dl={"update_interval": "10sp"})
    with pytest.raises(
        ValueError, match=r"eval_interval \(5ba\) must equal callbacks.data_loading.update_interval"
    ):
        build(dl={"update_interval": "3ba"})
    with pytest.raises(ValueError, match="epochs are not allowed"):
        build(dl={"update_interval": "2ep"})
    with pytest.raises(ValueError, match="the update interval is unknown"):
        build(interval="1ep")
    with pytest.raises(ValueError, match=r"eval_interval \(2ep\) must equal"):
        build(interval=2, dl={"update_interval": 5})
