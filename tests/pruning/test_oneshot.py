"""One-shot importance pruning: scores, uniform GQA-aware masks, L0 log-alpha init, the prune-oneshot command."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from llmshearing import cli
from llmshearing.checkpoint.format import save_checkpoint
from llmshearing.checkpoint.reading import load_checkpoint
from llmshearing.models.config import ModelConfig
from llmshearing.models.decoder import Decoder
from llmshearing.pruning.commands import parse_target
from llmshearing.pruning.fold import kept_structure
from llmshearing.pruning.importance import ImportanceScores, calibration_batches, compute_importance
from llmshearing.pruning.l0_module import L0Module
from llmshearing.pruning.oneshot import MASKS_NAME, RECORD_NAME, resolve_target
from llmshearing.pruning.ranking import importance_log_alpha, oneshot_masks, ranking_scores

LOGIT_ATOL = 1e-4  # fp32 on CPU
SEQ_LEN = 16
SOURCE = ModelConfig(
    vocab_size=64,
    d_model=24,
    n_layers=4,
    n_heads=12,
    n_kv_heads=3,
    head_dim=4,
    intermediate_size=40,
    max_seq_len=64,
    tie_word_embeddings=True,
    attn_impl="sdpa",
)
TARGET = {"n_layers": 3, "n_heads": 4, "n_kv_heads": 2, "d_model": 16, "intermediate_size": 24}
TARGET_ARG = ",".join(f"{k}={v}" for k, v in TARGET.items())
SHAPE_KEYS = ("n_layers", "n_heads", "n_kv_heads", "d_model", "intermediate_size")


def cli_main(argv: list[str]) -> int:
    """``llmshearing`` with only the one-shot command registered."""
    modules = cli.COMMAND_MODULES
    cli.COMMAND_MODULES = ("llmshearing.pruning.commands",)
    try:
        return cli.main(argv)
    finally:
        cli.COMMAND_MODULES = modules


def random_decoder(seed: int = 0, config: ModelConfig = SOURCE) -> Decoder:
    torch.manual_seed(seed)
    decoder = Decoder(config)
    decoder.init_weights()
    with torch.no_grad():  # non-trivial norm weights so that folding them matters
        for name, param in decoder.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)
            elif param.dim() == 2:
                param.mul_(8.0)  # larger activations make the scores well separated
    return decoder.eval()


def random_ids(batches: int = 3, batch_size: int = 4, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, SOURCE.vocab_size, (batch_size, SEQ_LEN), generator=g) for _ in range(batches)]


def write_mds(root: Path, domains: dict[str, int], seed: int = 2) -> Path:
    """Train and eval splits of random tokens (different samples in each split)."""
    from streaming import MDSWriter

    rng = np.random.default_rng(seed)
    for split in ("train", "eval"):
        for domain, count in domains.items():
            with MDSWriter(out=str(root / split / domain), columns={"tokens": "ndarray:int32"}) as writer:
                for _ in range(count):
                    writer.write({"tokens": rng.integers(0, SOURCE.vocab_size, SEQ_LEN, dtype=np.int32)})
    return root


@pytest.fixture(scope="module")
def source_ckpt(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("src") / "source"
    decoder = random_decoder()
    save_checkpoint(path, SOURCE, decoder.state_dict(), progress=False)
    return path


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return write_mds(tmp_path_factory.mktemp("data") / "mds", {"web": 5, "code": 3})


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


# ---------------------------------------------------------------------------------- importance
def test_constructed_model_ranks_dead_structures_lowest_and_prunes_them(tmp_path):
    decoder = random_decoder()
    dead_layer, head_layer, dead_head, dead_dim, dead_hidden = 1, 2, 5, 7, 3
    hd = SOURCE.head_dim
    with torch.no_grad():
        identity = decoder.layers[dead_layer]  # no branch output: the block returns its input
        identity.attention.wo.weight.zero_()
        identity.feed_forward.w2.weight.zero_()
        decoder.layers[head_layer].attention.wo.weight[:, dead_head * hd : (dead_head + 1) * hd] = 0
        decoder.layers[head_layer].feed_forward.w2.weight[:, dead_dim] = 0
        decoder.tok_embeddings.weight[:, dead_hidden] = 0  # nothing ever writes this residual dim
        for block in decoder.layers:
            block.attention.wo.weight[dead_hidden] = 0
            block.feed_forward.w2.weight[dead_hidden] = 0
    scores = compute_importance(decoder, random_ids(), total=3, progress=False)
    assert (scores.samples, scores.tokens) == (12, 12 * SEQ_LEN)

    assert scores.layer[dead_layer] < 1e-6 and scores.layer.argmin() == dead_layer
    assert scores.head_layer[dead_layer] < 1e-6 and scores.mlp[dead_layer] < 1e-6
    assert torch.all(scores.layer[[0, 2, 3]] > 1e-3)
    assert scores.head[head_layer, dead_head] == 0 and scores.head[head_layer].argmin() == dead_head
    assert (
        scores.intermediate[head_layer, dead_dim] == 0
        and scores.intermediate[head_layer].argmin() == dead_dim
    )
    assert scores.hidden[dead_hidden] == 0 and scores.hidden.argmin() == dead_hidden
    hpg = SOURCE.heads_per_group
    assert torch.allclose(scores.kv_head, scores.head.reshape(4, 3, hpg).sum(-1))

    plan = resolve_target(SOURCE, TARGET)
    masks = oneshot_masks(scores, SOURCE, plan)
    assert masks["layer"].tolist() == [1.0, 0.0, 1.0, 1.0]
    assert masks["head"][head_layer, dead_head] == 0
    assert masks["intermediate"][head_layer, dead_dim] == 0
    assert masks["hidden"][dead_hidden] == 0

    saved = ImportanceScores.load(scores.save(tmp_path / "scores.safetensors"))
    assert (saved.samples, saved.tokens) == (scores.samples, scores.tokens)
    for key, value in scores.as_dict().items():
        assert torch.equal(getattr(saved, key), value), key


def test_head_score_is_the_norm_of_its_output_contribution():
    """Independent check: layer 0's attention output with only head h unmasked is head h's contribution."""
    decoder = random_decoder(seed=3)
    ids = random_ids(batches=1, seed=4)
    scores = compute_importance(decoder, ids, progress=False)
    captured = []
    hook = decoder.layers[0].attention.register_forward_hook(lambda m, a, out: captured.append(out))
    try:
        for h in range(SOURCE.n_heads):
            head = torch.ones(SOURCE.n_layers, SOURCE.n_heads)
            head[0] = torch.nn.functional.one_hot(torch.tensor(h), SOURCE.n_heads).float()
            with torch.no_grad():
                decoder(ids[0], masks={"head": head})
    finally:
        hook.remove()
    expected = torch.stack([out.norm(dim=-1).mean() for out in captured])
    torch.testing.assert_close(scores.head[0], expected, rtol=1e-5, atol=1e-6)
    assert scores.head[0].min() > 0


# ------------------------------------------------------------------------------------- masks
def random_scores(seed: int, ties: bool = False) -> ImportanceScores:
    g = torch.Generator().manual_seed(seed)
    L, H, Hkv, inter, d = 4, 12, 3, 40, 24

    def r(*shape):
        values = torch.rand(shape, generator=g)
        return values.round(decimals=1) if ties else values  # rounding creates many equal scores

    head = r(L, H)
    return ImportanceScores(r(L), r(L), r(L), head, head.reshape(L, Hkv, H // Hkv).sum(-1), r(L, inter), r(d))


@pytest.mark.parametrize("seed", [0, 1])
def test_masks_are_uniform_gqa_consistent_and_keep_the_top_units(seed):
    scores = random_scores(seed)
    plan = resolve_target(SOURCE, TARGET)
    masks = oneshot_masks(scores, SOURCE, plan)
    for mask in masks.values():
        assert set(mask.unique().tolist()) <= {0.0, 1.0}
    assert masks["layer"].sum() == 3 and masks["hidden"].sum() == 16
    assert torch.equal(masks["layer"] == 1, scores.layer >= scores.layer.topk(3).values.min())
    assert torch.equal(masks["hidden"] == 1, scores.hidden >= scores.hidden.topk(16).values.min())
    hpg = SOURCE.heads_per_group
    for i in range(SOURCE.n_layers):
        assert masks["intermediate"][i].sum() == 24
        assert masks["intermediate"][i][scores.intermediate[i].topk(24).indices].sum() == 24
        assert masks["kv_head"][i].sum() == 2
        # a KV group is worth the 2 query heads it keeps, not all of its heads
        kept_worth = scores.head[i].reshape(3, hpg).topk(2, dim=-1).values.sum(-1)
        assert set(masks["kv_head"][i].nonzero().flatten().tolist()) == set(
            kept_worth.topk(2).indices.tolist()
        )
        for g in range(SOURCE.n_kv_heads):
            group = masks["head"][i, g * hpg : (g + 1) * hpg]
            if masks["kv_head"][i, g] == 0:
                assert group.sum() == 0
            else:
                best = scores.head[i, g * hpg : (g + 1) * hpg].topk(2).indices
                assert group.sum() == 2 and group[best].sum() == 2
    kept = kept_structure(SOURCE, masks)
    assert {k: getattr(kept.pruned_config(SOURCE), k) for k in SHAPE_KEYS} == TARGET


L0_CASES = {
    "layer": ["layer", "head", "kv_head", "intermediate", "hidden"],
    "branches": ["head_layer", "mlp", "head", "kv_head", "intermediate", "hidden"],
}


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("case", sorted(L0_CASES))
def test_importance_log_alpha_gives_l0_masks_that_keep_the_top_units(case, ties):
    scores = random_scores(5, ties=ties)
    l0_config = {"pruning_modules": L0_CASES[case], "target_model": TARGET}
    module = L0Module(SOURCE, l0_config)
    values = importance_log_alpha(scores, SOURCE, l0_config)
    assert set(values) == set(module.families)
    bound = module.l0_config.log_alpha_clamp
    with torch.no_grad():
        for family, value in values.items():
            assert value.abs().max() <= bound + 1e-6
            module.log_alpha[family].copy_(value)
    module.eval()
    l0_masks = module().masks  # deterministic masks at the target, after clamping
    expected = oneshot_masks(scores, SOURCE, module.plan)
    for family in module.families:
        assert torch.equal((l0_masks[family] != 0).float(), expected[family]), family
        kept, dropped = values[family][expected[family] == 1], values[family][expected[family] == 0]
        if family != "head":  # heads of dropped KV groups may rank high within their own group
            assert kept.min() > 0 and (dropped.numel() == 0 or dropped.max() < 0)
    # Strictly monotone in the ranking score within each row.
    ranked = ranking_scores(scores, SOURCE, module.plan)
    for family, score in (("intermediate", ranked["intermediate"]), ("kv_head", ranked["kv_head"])):
        for row_score, row_value in zip(score, values[family], strict=True):
            order = torch.sort(row_score, descending=True, stable=True).indices
            assert torch.all(row_value[order][1:] < row_value[order][:-1])


@pytest.mark.parametrize("case", sorted(L0_CASES))
def test_importance_log_alpha_starts_the_expected_sparsity_at_the_target(case):
    """Every unit sits near a bound: with bound 16 each dropped unit keeps P(z > 0) < 1e-5 and each kept
    one P(z > 0) > 1 - 1e-5, so the masks start at the target's sparsity rather than well short of it."""
    l0_config = {
        "pruning_modules": L0_CASES[case],
        "target_model": TARGET,
        "log_alpha_clamp": 16.0,
        "init_log_alpha": 16.0,
    }
    module = L0Module(SOURCE, l0_config)
    with torch.no_grad():
        for family, value in importance_log_alpha(random_scores(7), SOURCE, l0_config).items():
            module.log_alpha[family].copy_(value)
    expected_sparsity = 1.0 - float(module.expected_num_params() / module.prunable_size)
    assert expected_sparsity == pytest.approx(module.plan.global_sparsity, abs=1e-3)


def test_importance_log_alpha_without_target_shape_keeps_every_unit_above_the_cutoff():
    scores = random_scores(6)
    other = SOURCE.replace(intermediate_size=32)
    with pytest.raises(ValueError, match="importance score 'intermediate' has shape"):
        importance_log_alpha(scores, other, {"pruning_modules": ["intermediate"], "target_sparsity": 0.2})
    values = importance_log_alpha(
        scores, SOURCE, {"pruning_modules": ["head", "intermediate"], "target_sparsity": 0.5}
    )
    for family in ("head", "intermediate"):
        assert values[family].min() > 0
    assert values["intermediate"][0].argmax() == scores.intermediate[0].argmax()


# --------------------------------------------------------------------------------- command
def test_prune_oneshot_command_writes_the_target_shape_and_an_equal_hf_model(
    source_ckpt, data_root, tmp_path, capsys
):
    out, hf = tmp_path / "pruned", tmp_path / "pruned-hf"
    args = ["prune-oneshot", str(source_ckpt), str(out), "--data", str(data_root), "--target", TARGET_ARG]
    rc = cli_main(
        [
            *args,
            "--samples",
            "6",
            "--batch-size",
            "4",
            "--hf-out",
            str(hf),
            "--scores-out",
            str(tmp_path / "scores.safetensors"),
        ]
    )
    printed = capsys.readouterr().out
    assert rc == 0, printed
    assert "parameters" in printed and f"{SOURCE.num_params():,}" in printed

    config, state, _ = load_checkpoint(out)
    assert {k: getattr(config, k) for k in SHAPE_KEYS} == TARGET
    assert config.tie_word_embeddings and config.head_dim == SOURCE.head_dim
    pruned = Decoder(config)
    pruned.load_state_dict(state, strict=True)
    pruned.eval()

    # The masks used are those of the importance on the same calibration samples (round-robin over the
    # domains of the train split: the held-out splits measure the result).
    source = random_decoder()
    total, batches = calibration_batches(data_root, 6, 4, split="train")
    scores = compute_importance(source, batches, total=total, progress=False)
    masks = oneshot_masks(scores, SOURCE, resolve_target(SOURCE, TARGET))
    written = load_file(str(out / MASKS_NAME))
    assert written.keys() == masks.keys()
    for key in masks:
        assert torch.equal(written[key], masks[key]), key
    record = json.loads((out / RECORD_NAME).read_text())
    assert record["split"] == "train"
    assert record["samples"] == 6 and record["tokens"] == 6 * SEQ_LEN
    assert record["params_after"] == config.num_params() < record["params_before"] == SOURCE.num_params()
    assert record["kept_layers"] == masks["layer"].nonzero().flatten().tolist()
    assert ImportanceScores.load(tmp_path / "scores.safetensors").tokens == 6 * SEQ_LEN
    umask = os.umask(0)
    os.umask(umask)
    for path in (out / MASKS_NAME, out / "model.safetensors", tmp_path / "scores.safetensors"):
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask, path  # the usual permissions, like every output

    ids = random_ids(batches=1, seed=9)[0]
    with torch.no_grad():
        project_logits = pruned(ids)
        torch.testing.assert_close(project_logits, source(ids, masks=masks), rtol=0, atol=LOGIT_ATOL)
        from transformers import AutoModelForCausalLM

        hf_model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32, local_files_only=True).eval()
        hf_logits = hf_model(ids).logits
    assert hf_model.config.num_hidden_layers == 3 and hf_model.config.num_key_value_heads == 2
    torch.testing.assert_close(hf_logits, project_logits, rtol=0, atol=LOGIT_ATOL)
    assert leftovers(tmp_path) == []


def test_target_config_yaml_gives_the_same_model(source_ckpt, data_root, tmp_path):
    yaml = tmp_path / "recipe.yaml"
    lines = [f"      {k}: {v}" for k, v in TARGET.items()]
    yaml.write_text("model:\n  l0_module:\n    target_model:\n" + "\n".join(lines) + "\n")
    a, b = tmp_path / "a", tmp_path / "b"
    common = ["--data", str(data_root), "--samples", "4", "--batch-size", "2"]
    assert cli_main(["prune-oneshot", str(source_ckpt), str(a), *common, "--target-config", str(yaml)]) == 0
    assert cli_main(["prune-oneshot", str(source_ckpt), str(b), *common, "--target", TARGET_ARG]) == 0
    state_a, state_b = load_checkpoint(a)[1], load_checkpoint(b)[1]
    assert state_a.keys() == state_b.keys()
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)


BAD_INPUTS = {
    "larger": (["--target", "n_layers=5"], "--target: n_layers=5 is larger than the source"),
    "not_divisible": (["--target", "n_heads=3,n_kv_heads=2"], "not divisible by n_kv_heads=2"),
    "unknown_key": (["--target", "n_layer=2"], "--target: unknown key 'n_layer'; did you mean n_layers?"),
    "not_int": (["--target", "n_layers=two"], "--target: n_layers='two' is not an integer"),
    "no_target": ([], "exactly one of --target"),
    "missing_data": (["--target", TARGET_ARG, "--data", "{tmp}/nowhere"], "--data"),
    "bad_samples": (["--target", TARGET_ARG, "--samples", "0"], "--samples (0)"),
    "damping_without_compensate": (
        ["--target", TARGET_ARG, "--damping", "0.001"],
        "add --compensate or drop --damping",
    ),
    "zero_damping": (
        ["--target", TARGET_ARG, "--compensate", "--damping", "0"],
        "--damping must be a positive number",
    ),
    "start_out_without_compensate": (
        ["--target", TARGET_ARG, "--start-out", "{tmp}/start"],
        "--start-out writes the least-squares cut's re-fitted source",
    ),
    "nan_damping": (["--target", TARGET_ARG, "--compensate", "--damping", "nan"], "got nan"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_gives_a_clear_error_and_no_output(case, source_ckpt, data_root, tmp_path, capsys):
    extra, message = BAD_INPUTS[case]
    extra = [arg.replace("{tmp}", str(tmp_path)) for arg in extra]
    out, hf = tmp_path / "out", tmp_path / "hf"
    args = [
        "prune-oneshot",
        str(source_ckpt),
        str(out),
        "--data",
        str(data_root),
        "--hf-out",
        str(hf),
        *extra,
    ]
    assert cli_main(args) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert not out.exists() and not hf.exists() and leftovers(tmp_path) == []


def test_target_config_without_target_model_and_existing_output_are_refused(
    source_ckpt, data_root, tmp_path, capsys
):
    yaml = tmp_path / "t.yaml"
    yaml.write_text("model:\n  d_model: 16\n")
    out = tmp_path / "out"
    base = ["prune-oneshot", str(source_ckpt), str(out), "--data", str(data_root)]
    assert cli_main([*base, "--target-config", str(yaml)]) == 2
    assert "has no target_model mapping" in capsys.readouterr().err
    out.mkdir()
    assert cli_main([*base, "--target", TARGET_ARG]) == 2
    assert "OUT" in capsys.readouterr().err and list(out.iterdir()) == []


def test_failure_while_exporting_leaves_no_output(source_ckpt, data_root, tmp_path):
    from llmshearing.pruning.oneshot import prune_oneshot

    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    out = tmp_path / "out"
    with pytest.raises(OSError):
        prune_oneshot(
            source_ckpt,
            out,
            data_root,
            TARGET,
            samples=2,
            batch_size=2,
            hf_out=blocker / "hf",
            progress=False,
        )
    assert not out.exists() and leftovers(tmp_path) == []


def test_parse_target():
    assert parse_target(" n_layers=2 , d_model=16,") == {"n_layers": 2, "d_model": 16}
    with pytest.raises(ValueError, match="given twice"):
        parse_target("n_layers=2,n_layers=3")
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_target("n_layers")


# ------------------------------------------------------------------- multi-head (LLaMA-2) sources
MHA_SOURCE = SOURCE.replace(n_heads=6, n_kv_heads=6)  # one query head per KV group, as LLaMA-2-7B
MHA_TARGET = {"n_layers": 3, "n_heads": 4, "d_model": 16, "intermediate_size": 24}
PAPER_MODULES = ["layer", "head", "intermediate", "hidden"]


def mha_scores(seed: int = 0) -> ImportanceScores:
    decoder = random_decoder(seed, MHA_SOURCE)
    return compute_importance(decoder, random_ids(batches=2, seed=seed + 1), progress=False)


@pytest.mark.parametrize("modules", [PAPER_MODULES, ["layer", "head", "kv_head", "intermediate", "hidden"]])
def test_importance_init_of_a_multi_head_source_keeps_the_top_heads_of_each_layer(modules):
    scores = mha_scores()
    l0_config = {"pruning_modules": modules, "target_model": MHA_TARGET}
    module = L0Module(MHA_SOURCE, l0_config)
    values = importance_log_alpha(scores, MHA_SOURCE, l0_config)
    with torch.no_grad():
        for family, value in values.items():
            module.log_alpha[family].copy_(value)
    masks = module.eval()().masks
    expected = oneshot_masks(scores, MHA_SOURCE, module.plan)
    for family in module.families:
        assert torch.equal((masks[family] != 0).float(), expected[family]), family
    if "kv_head" not in modules:  # heads compete across the whole layer
        for i in range(MHA_SOURCE.n_layers):
            best = set(scores.head[i].topk(MHA_TARGET["n_heads"]).indices.tolist())
            assert set(masks["head"][i].nonzero().flatten().tolist()) == best
    pruned = kept_structure(MHA_SOURCE, masks).pruned_config(MHA_SOURCE)
    assert {k: getattr(pruned, k) for k in SHAPE_KEYS} == {**MHA_TARGET, "n_kv_heads": MHA_TARGET["n_heads"]}


def test_init_from_importance_measures_a_multi_head_source_on_the_train_split(data_root):
    from llmshearing.pruning.ranking import initialize_from_importance

    decoder = random_decoder(0, MHA_SOURCE)
    module = L0Module(
        MHA_SOURCE,
        {
            "pruning_modules": PAPER_MODULES,
            "target_model": MHA_TARGET,
            "init_from": "importance",
            "init_samples": 4,
        },
    )
    scores = initialize_from_importance(module, decoder, data_root, batch_size=2)
    assert scores.samples == 4
    total, batches = calibration_batches(data_root, 4, 2, split="train")
    expected = compute_importance(decoder, batches, total=total, progress=False)
    torch.testing.assert_close(scores.head, expected.head)
    masks = module.eval()().masks
    assert torch.equal((masks["head"] != 0).float(), oneshot_masks(expected, MHA_SOURCE, module.plan)["head"])


def test_kv_groups_are_ranked_by_the_heads_they_keep():
    L, H, Hkv = SOURCE.n_layers, SOURCE.n_heads, SOURCE.n_kv_heads
    head = torch.zeros(L, H)
    # group 0: four fair heads (sum 12, best two 6); group 1: two strong heads (sum 10, best two 10)
    head[:, 0:4] = torch.tensor([3.0, 3.0, 3.0, 3.0])
    head[:, 4:8] = torch.tensor([5.0, 5.0, 0.0, 0.0])
    head[:, 8:12] = torch.tensor([1.0, 1.0, 1.0, 1.0])
    scores = random_scores(0)
    scores.head, scores.kv_head = head, head.reshape(L, Hkv, -1).sum(-1)
    target = {**TARGET, "n_kv_heads": 1, "n_heads": 2}
    masks = oneshot_masks(scores, SOURCE, resolve_target(SOURCE, target))
    assert masks["kv_head"].tolist() == [[0.0, 1.0, 0.0]] * L
    assert masks["head"][0].nonzero().flatten().tolist() == [4, 5]
    # keeping every head of a group, the group is worth all of them
    masks = oneshot_masks(scores, SOURCE, resolve_target(SOURCE, {**TARGET, "n_kv_heads": 1, "n_heads": 4}))
    assert masks["kv_head"].tolist() == [[1.0, 0.0, 0.0]] * L


def test_prune_oneshot_calibrates_on_the_train_split_by_default(source_ckpt, data_root, tmp_path):
    from llmshearing.pruning.oneshot import prune_oneshot

    common = dict(samples=4, batch_size=2, progress=False)
    default = prune_oneshot(source_ckpt, tmp_path / "a", data_root, TARGET, **common)
    assert json.loads((default.out / RECORD_NAME).read_text())["split"] == "train"
    on_eval = prune_oneshot(source_ckpt, tmp_path / "b", data_root, TARGET, split="eval", **common)
    assert json.loads((on_eval.out / RECORD_NAME).read_text())["split"] == "eval"
    train_masks, eval_masks = (
        load_file(str(default.out / MASKS_NAME)),
        load_file(str(on_eval.out / MASKS_NAME)),
    )
    total, batches = calibration_batches(data_root, 4, 2, split="train")
    scores = compute_importance(random_decoder(), batches, total=total, progress=False)
    expected = oneshot_masks(scores, SOURCE, resolve_target(SOURCE, TARGET))
    assert all(torch.equal(train_masks[k], expected[k]) for k in expected)
    assert any(not torch.equal(train_masks[k], eval_masks[k]) for k in expected)  # the splits differ
