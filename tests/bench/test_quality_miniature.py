"""The quality benchmark's miniature source (``bench/quality/miniature.py``): its budget in the paper's
regime, the round trip of a packed stream to documents, its tokenizer, the plateau rule."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from quality import miniature  # noqa: E402


def test_the_paper_regime_gives_pruning_its_tokens_per_parameter_and_continued_twenty_times_that():
    params, batch, seq_len = 1_049_728, 32, 128
    total, share = miniature.paper_regime_steps(params, batch, seq_len)
    prune = round(total * share)
    assert prune * batch * seq_len >= 0.06 * params
    assert (prune - 1) * batch * seq_len < 0.06 * params  # no more than needed
    assert (total - prune) == 20 * prune


def test_the_miniature_runs_its_l0_stages_one_sequence_per_step_and_its_own_lr_unless_told_otherwise():
    from types import SimpleNamespace

    from quality import budget as budgets
    from quality import sources

    options = {"steps": None, "prune_share": 0.25, "quick": False, "scale": 1, "batch": 32}
    args = SimpleNamespace(prune_batch=None, continue_lr=None, prune_lr=None, **options)
    budget = sources.miniature_budget(args, 1_049_728, 128)
    prune, _, continued = budgets.plan_arms(budget)["l0-distill"]
    assert args.prune_batch == miniature.PRUNE_BATCH == 1  # the run's recorded settings say so
    # the miniature's own lrs (continued: the one it was pretrained at), not the SmolLM2 recipes' 2e-4 / 3e-4
    assert args.continue_lr == miniature.CONTINUE_LR == miniature.MiniatureSpec().lr
    assert args.prune_lr == miniature.PRUNE_LR == 1e-3
    assert (prune.steps, prune.batch_size(budget)) == (16 * 32, 1)  # 16 steps of 32 sequences, one at a time
    assert (continued.steps, continued.batch_size(budget)) == (320, 32)
    told = SimpleNamespace(prune_batch=32, continue_lr=6e-4, prune_lr=4e-4, **options)
    told_budget = sources.miniature_budget(told, 1_049_728, 128)
    assert (told.continue_lr, told.prune_lr) == (6e-4, 4e-4)
    prune, _, _ = budgets.plan_arms(told_budget)["l0-distill"]
    assert (prune.steps, prune.batch_size(told_budget)) == (16, 32)


def test_a_packed_stream_splits_back_into_its_documents():
    documents = [[5, 6, 7], [8], [9, 10]]
    samples = miniature.pack(documents, eos=0, seq_len=4)
    assert [s.tolist() for s in samples] == [[5, 6, 7, 0], [8, 0, 9, 10]]  # the last eos is the remainder
    stream = np.concatenate(samples)
    assert [d.tolist() for d in miniature.split_documents(stream, [0])] == documents
    # a leading separator (a BOS) and adjacent separators leave no empty document
    assert [d.tolist() for d in miniature.split_documents(np.array([1, 5, 2, 1, 6]), [1, 2])] == [[5], [6]]


def test_the_tokenizer_is_trained_on_the_texts_it_is_given_and_round_trips(tmp_path):
    from transformers import AutoTokenizer

    texts = [f"def function_{i}(value):\n    return value * {i}\n" for i in range(200)]
    out = miniature.train_tokenizer(texts, 300, tmp_path / "tok")
    tokenizer = AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    assert len(tokenizer) == 300
    assert tokenizer.eos_token == miniature.EOS
    sample = "def function_7(value):\n    return value * 7\n"
    ids = tokenizer(sample, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == sample
    assert len(ids) < len(sample.encode()) / 2  # merges were learned from the texts
    unseen = "Ünïcode, never seen: ☃"
    assert tokenizer.decode(tokenizer(unseen, add_special_tokens=False)["input_ids"]) == unseen


@pytest.mark.parametrize(
    ("curve", "expected"),
    [
        ([], False),
        ([(100, 5.0)], False),
        ([(100, 5.0), (200, 4.5)], False),
        ([(100, 5.0), (200, 4.995)], True),
        ([(100, 5.0), (200, 5.1)], True),
    ],
)
def test_the_plateau_is_a_chunk_that_lowers_the_eval_loss_by_less_than_the_threshold(curve, expected):
    assert miniature.reached_plateau(curve, 0.01) is expected


def test_the_target_is_a_valid_smaller_shape_of_the_miniature():
    source = miniature.MiniatureSpec().model_config()
    target = source.replace(**miniature.TARGET)
    assert target.d_model % target.n_heads == 0 and target.n_heads % target.n_kv_heads == 0
    assert 0.3 < target.num_params(False) / source.num_params(False) < 0.45
    assert miniature.MiniatureSpec().key() != miniature.MiniatureSpec(lr=1e-3).key()


def test_the_cache_key_names_the_corpus_the_miniature_is_trained_on():
    spec = miniature.MiniatureSpec()
    assert spec.key("mds-demo-corpus-seq128") != spec.key("mds-redpajama-sample-seq128")
    assert spec.key("mds-demo-corpus-seq128") == miniature.MiniatureSpec().key("mds-demo-corpus-seq128")
