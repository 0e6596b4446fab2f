"""Least-squares compensation: the greedy removal reaches the closed-form fit, sees through redundant
neurons, and ``prune-oneshot --compensate`` writes the model it describes."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from test_oneshot import (  # the one-shot tests' source, data and target
    LOGIT_ATOL,
    SOURCE,
    TARGET,
    cli_main,
    data_root,  # noqa: F401 (fixture)
    random_decoder,
    random_ids,
    source_ckpt,  # noqa: F401 (fixture)
)

from llmshearing.checkpoint.reading import load_checkpoint
from llmshearing.models.decoder import Decoder
from llmshearing.pruning.compensation import (
    DEFAULT_DAMPING,
    compensate,
    compensated_removal,
    damped_inverse,
    least_squares_fit,
)
from llmshearing.pruning.importance import calibration_batches, compute_importance
from llmshearing.pruning.oneshot import MASKS_NAME, RECORD_NAME, prune_oneshot, resolve_target
from llmshearing.pruning.ranking import oneshot_masks

FIT_ATOL = 1e-9  # float64 throughout


def damped_error(x: torch.Tensor, weight: torch.Tensor, fitted: torch.Tensor, damping: float) -> float:
    """The objective the fit minimises: squared output error plus the damping term, as ``damped_inverse`` adds it."""
    gram = x.T @ x
    scale = float(torch.diagonal(gram).mean())
    delta = fitted - weight
    return float(((x @ delta.T) ** 2).sum() + damping * scale * (delta**2).sum())


def test_greedy_removal_ends_at_the_closed_form_fit_of_its_kept_set():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 20, generator=g, dtype=torch.float64) @ torch.randn(
        20, 20, generator=g, dtype=torch.float64
    )
    weight = torch.randn(7, 20, generator=g, dtype=torch.float64)
    gram = x.T @ x
    kept, fitted = compensated_removal(weight, gram, keep=12)
    assert kept.tolist() == sorted(kept.tolist()) and kept.numel() == 12
    removed = torch.ones(20, dtype=torch.bool)
    removed[kept] = False
    assert torch.count_nonzero(fitted[:, removed]) == 0
    torch.testing.assert_close(fitted, least_squares_fit(weight, gram, kept), rtol=0, atol=FIT_ATOL)
    # the fit beats keeping the same columns unchanged, and the greedy choice beats the 12 largest columns
    unchanged = weight.clone()
    unchanged[:, removed] = 0
    assert damped_error(x, weight, fitted, DEFAULT_DAMPING) < damped_error(
        x, weight, unchanged, DEFAULT_DAMPING
    )
    by_norm = torch.sort(torch.topk((x.abs().mean(0) * weight.norm(dim=0)), 12).indices).values
    ranked = least_squares_fit(weight, gram, by_norm)
    assert (
        damped_error(x, weight, fitted, DEFAULT_DAMPING)
        <= damped_error(x, weight, ranked, DEFAULT_DAMPING) + 1e-9
    )


def test_redundant_neurons_are_removed_and_the_output_kept():
    """Of a duplicated neuron one copy goes and the other takes its column; of a cancelling pair that reads
    a live neuron's inputs two of the three go (whichever is left carries the live column), though a ranking
    scores the pair among the loudest neurons."""
    g = torch.Generator().manual_seed(1)
    live = torch.randn(500, 8, generator=g, dtype=torch.float64)
    weight = torch.randn(6, 8, generator=g, dtype=torch.float64)
    loud = 5 * torch.randn(6, 1, generator=g, dtype=torch.float64)
    # column 8: a copy of live neuron 2, which keeps half its column and gives the copy the other half;
    # columns 9, 10: a pair reading live neuron 5's inputs whose loud outputs cancel
    x = torch.cat([live, live[:, [2, 5, 5]]], dim=1)
    full = torch.cat([weight, weight[:, [2]] / 2, loud, -loud], dim=1)
    full[:, 2] /= 2
    gram = x.T @ x
    kept, fitted = compensated_removal(full, gram, keep=8, damping=1e-10)
    gone = set(range(11)) - set(kept.tolist())
    assert len(gone & {2, 8}) == 1 and len(gone & {5, 9, 10}) == 2 and len(gone) == 3
    torch.testing.assert_close(x @ fitted.T, x @ full.T, rtol=0, atol=1e-6)
    scores = x.abs().mean(0) * full.norm(dim=0)  # activation x output norm: the importance ranking's score
    assert scores[9] > scores[:8].max() and scores[10] > scores[:8].max()


def test_bad_gram_and_keep_are_refused():
    weight, gram = torch.randn(3, 5), torch.eye(5)
    with pytest.raises(ValueError, match=r"Gram matrix has shape \(4, 4\), expected \(5, 5\)"):
        compensated_removal(weight, torch.eye(4), keep=2)
    with pytest.raises(ValueError, match=r"keep must leave at least one unit"):
        compensated_removal(weight, gram, keep=0)
    with pytest.raises(ValueError, match=r"keep must be in \[0, units per row \[5\]\], got \[6\]"):
        compensated_removal(weight, gram, keep=6)
    with pytest.raises(ValueError, match="5 columns do not split into units of 2"):
        compensated_removal(weight, gram, keep=1, group=2)
    with pytest.raises(ValueError, match="damping must be positive"):
        damped_inverse(gram, damping=0.0)
    plan = resolve_target(SOURCE, TARGET)
    with pytest.raises(
        ValueError, match=r"the intermediate Gram matrices have shape \(2, 3, 3\), expected \(4, 40, 40\)"
    ):
        compensate(random_decoder(), {"intermediate": torch.zeros(2, 3, 3)}, {}, plan)


def test_heads_are_removed_as_blocks_within_their_rows_quotas():
    """Units of several columns (a head's ``hd`` columns of ``wo``) compete within rows (KV groups), each
    keeping its quota; a duplicated head goes, and a row whose quota is 0 (a dropped KV group) goes whole,
    its output re-fitted into the kept heads."""
    g = torch.Generator().manual_seed(2)
    hd, heads = 3, 6  # rows: heads 0-2 and 3-5
    ctx = torch.randn(600, heads * hd, generator=g, dtype=torch.float64)
    ctx[:, 4 * hd : 5 * hd] = ctx[:, 1 * hd : 2 * hd]  # head 4 reads what head 1 reads...
    weight = torch.randn(5, heads * hd, generator=g, dtype=torch.float64)
    weight[:, 4 * hd : 5 * hd] = 0.0  # ...and writes nothing, so the duplicate is worth nothing
    rows = torch.tensor([0, 0, 0, 1, 1, 1])
    kept, fitted = compensated_removal(weight, ctx.T @ ctx, torch.tensor([2, 2]), 1e-10, group=hd, rows=rows)
    assert [int((rows[kept] == r).sum()) for r in (0, 1)] == [2, 2] and 4 not in kept.tolist()
    torch.testing.assert_close(fitted, least_squares_fit(weight, ctx.T @ ctx, _columns(kept, hd), 1e-10))
    kept, fitted = compensated_removal(weight, ctx.T @ ctx, torch.tensor([3, 0]), 1e-10, group=hd, rows=rows)
    assert kept.tolist() == [0, 1, 2]
    # the dropped row's output re-fitted into the kept heads: closer than dropping it with nothing re-fitted
    unfitted = weight.clone()
    unfitted[:, 3 * hd :] = 0.0
    assert ((ctx @ (fitted - weight).T) ** 2).sum() < ((ctx @ (unfitted - weight).T) ** 2).sum()


def _columns(units: torch.Tensor, width: int) -> torch.Tensor:
    return (units[:, None] * width + torch.arange(width)).flatten()


def test_calibration_grams_are_the_mean_outer_products_of_the_projections_inputs():
    decoder = random_decoder()
    batches = random_ids(batches=2)
    seen: dict[str, list[torch.Tensor]] = {"intermediate": [], "head": []}

    def keep(family: str):
        return lambda module, args: seen[family].append(
            args[0].detach().reshape(-1, args[0].shape[-1]).double()
        )

    handles = [
        decoder.layers[1].feed_forward.w2.register_forward_pre_hook(keep("intermediate")),
        decoder.layers[1].attention.wo.register_forward_pre_hook(keep("head")),
    ]
    with torch.no_grad():
        for ids in batches:
            decoder(ids)
    for handle in handles:
        handle.remove()
    scores = compute_importance(decoder, batches, progress=False, grams=True)
    width = {"intermediate": SOURCE.intermediate_size, "head": SOURCE.n_heads * SOURCE.head_dim}
    assert sorted(scores.grams) == ["head", "intermediate"]
    for family, parts in seen.items():
        x = torch.cat(parts)
        assert scores.grams[family].shape == (SOURCE.n_layers, width[family], width[family])
        expected = (x.T @ x / x.shape[0]).float()
        torch.testing.assert_close(scores.grams[family][1], expected, rtol=1e-5, atol=1e-5)
    assert compute_importance(decoder, batches, progress=False).grams is None


def test_compensated_oneshot_writes_the_refitted_model(source_ckpt, data_root, tmp_path):  # noqa: F811
    out, damping = tmp_path / "pruned", 1e-3
    prune_oneshot(
        source_ckpt,
        out,
        data_root,
        TARGET,
        samples=6,
        batch_size=4,
        compensate=True,
        damping=damping,
        progress=False,
    )
    record = json.loads((out / RECORD_NAME).read_text())
    assert record["method"] == "oneshot-importance+compensation" and record["damping"] == damping
    masks = load_file(str(out / MASKS_NAME))

    # The same calibration, ranking and compensation by hand: the written model is their fold, exactly.
    source = random_decoder()
    total, batches = calibration_batches(data_root, 6, 4, split="train")
    scores = compute_importance(source, batches, total=total, progress=False, grams=True)
    plan = resolve_target(SOURCE, TARGET)
    ranked = oneshot_masks(scores, SOURCE, plan)
    expected = compensate(source, scores.grams, ranked, plan, damping=damping)
    for key in ranked:
        assert torch.equal(masks[key], expected[key]), key
    for family in ("intermediate", "head"):  # the least-squares choice differs from the ranking's
        assert not torch.equal(masks[family], ranked[family]), family
    assert torch.equal(masks["kv_head"], ranked["kv_head"]) and torch.equal(masks["layer"], ranked["layer"])
    kept_layers = masks["layer"].nonzero().flatten()
    assert (masks["intermediate"][kept_layers].sum(1) == TARGET["intermediate_size"]).all()
    per_group = masks["head"][kept_layers].reshape(len(kept_layers), SOURCE.n_kv_heads, -1).sum(-1)
    kept_groups = ranked["kv_head"][kept_layers]
    assert torch.equal(per_group, kept_groups * TARGET["n_heads"] // TARGET["n_kv_heads"])

    config, state, _ = load_checkpoint(out)
    pruned = Decoder(config)
    pruned.load_state_dict(state, strict=True)
    ids = random_ids(batches=1, seed=9)[0]
    with torch.no_grad():
        torch.testing.assert_close(pruned.eval()(ids), source(ids, masks=masks), rtol=0, atol=LOGIT_ATOL)


def test_compensate_needs_calibrated_grams(source_ckpt, data_root, tmp_path, capsys):  # noqa: F811
    decoder = random_decoder()
    scores = compute_importance(decoder, random_ids(), progress=False)
    with pytest.raises(ValueError, match="--compensate needs the calibration's Gram matrices"):
        prune_oneshot(source_ckpt, tmp_path / "out", data_root, TARGET, scores=scores, compensate=True)
    assert not (tmp_path / "out").exists()
    args = ["prune-oneshot", str(source_ckpt), str(tmp_path / "cli"), "--data", str(data_root)]
    target = ",".join(f"{k}={v}" for k, v in TARGET.items())
    assert cli_main([*args, "--target", target, "--samples", "4", "--compensate"]) == 0
    record = json.loads((tmp_path / "cli" / RECORD_NAME).read_text())
    assert record["method"].endswith("+compensation") and record["damping"] == DEFAULT_DAMPING


def test_scores_of_a_cut_rank_exactly_that_cut():
    from llmshearing.pruning.ranking import scores_of_cut

    decoder = random_decoder()
    scores = compute_importance(decoder, random_ids(), progress=False, grams=True)
    plan = resolve_target(SOURCE, TARGET)
    ranked = oneshot_masks(scores, SOURCE, plan)
    cut = compensate(decoder, scores.grams, ranked, plan)
    ranking = oneshot_masks(scores_of_cut(scores, cut, SOURCE, plan), SOURCE, plan)
    assert all(torch.equal(ranking[f], cut[f]) for f in cut)
    wrong = {f: m.clone() for f, m in cut.items()}
    wrong["intermediate"][0] = 1.0  # keeps more neurons than the target: no ranking gives it
    with pytest.raises(RuntimeError, match=r"rank \['intermediate'\] differently from the cut"):
        scores_of_cut(scores, wrong, SOURCE, plan)
