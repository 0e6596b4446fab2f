"""Scaling-law reference losses: the paper's vectors from the LLaMA-2 losses, the fit itself, the CLI."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from llmshearing.cli import main as cli_main
from llmshearing.dynamic_loading.reference_loss import (
    LLAMA2_LOSSES,
    LLAMA2_SIZES,
    PAPER_DOMAINS,
    PRESETS,
    TARGET_SIZES,
    fit_power_law,
    fit_reference_losses,
    parse_size,
    preset_reference,
    reference_for_domains,
    resolve_reference,
)


@pytest.mark.parametrize("target", ["1.3b", "2.7b", "370m"])
def test_paper_vectors_reproduced_to_four_decimals(target):
    fitted = fit_reference_losses(LLAMA2_SIZES, LLAMA2_LOSSES, TARGET_SIZES[target])
    preset = PRESETS[f"sheared-{target}"]
    assert list(fitted) == list(PAPER_DOMAINS)
    for domain in PAPER_DOMAINS:
        assert round(fitted[domain], 4) == pytest.approx(preset[domain], abs=1e-12), domain


def test_fit_recovers_a_known_law():
    sizes = np.array([1e8, 3e8, 1e9, 3e9, 1e10])
    a, b, c = 420.0, 0.31, 1.7
    losses = a / sizes**b + c
    law = fit_power_law(sizes, losses)
    assert law.residual < 1e-20
    assert law.b == pytest.approx(b, rel=1e-6)
    assert law.c == pytest.approx(c, rel=1e-6)
    for n in (5e7, 2e9, 7e10):
        assert law(n) == pytest.approx(a / n**b + c, rel=1e-9)


def test_fit_is_least_squares_with_noise():
    rng = np.random.default_rng(0)
    sizes = np.geomspace(1e8, 1e11, 12)
    losses = 3.0 / (sizes / 1e9) ** 0.2 + 1.0 + rng.normal(0, 1e-3, sizes.size)
    law = fit_power_law(sizes, losses)
    # no nearby exponent gives a smaller residual (the linear part is solved exactly for each b)
    for db in (-1e-3, 1e-3):
        x = sizes / law.scale
        design = np.stack([x ** -(law.b + db), np.ones_like(x)], axis=1)
        coef, *_ = np.linalg.lstsq(design, losses, rcond=None)
        r = design @ coef - losses
        assert r @ r >= law.residual


@pytest.mark.parametrize(
    ("sizes", "losses", "message"),
    [
        ([1e9, 2e9], [2.0, 1.9], "at least three model sizes"),
        ([1e9, 2e9, 3e9], [2.0, 1.9], "one loss per model size"),
        ([1e9, 1e9, 3e9], [2.0, 1.9, 1.8], "distinct"),
        ([1e9, -2e9, 3e9], [2.0, 1.9, 1.8], "positive"),
    ],
)
def test_fit_errors(sizes, losses, message):
    with pytest.raises(ValueError, match=message):
        fit_power_law(sizes, losses)


def test_presets_and_domain_order():
    ref = reference_for_domains(preset_reference("sheared-2.7b"), ["wiki", "cc"], "preset")
    assert ref.tolist() == [1.6297, 1.8712]
    with pytest.raises(ValueError, match="unknown reference preset 'sheared-7b'"):
        preset_reference("sheared-7b")
    with pytest.raises(ValueError, match=r"no reference loss for domains \['python'\]"):
        reference_for_domains(PRESETS["sheared-1.3b"], ["cc", "python"], "preset")


@pytest.mark.parametrize(
    ("text", "value"),
    [("6738415616", 6738415616), ("1.3b", 1_300_000_000), ("370M", 370_000_000), ("6.7e9", 6_700_000_000)],
)
def test_parse_size(text, value):
    assert parse_size(text) == value


def test_parse_size_error():
    with pytest.raises(ValueError, match="cannot read model size 'seven'"):
        parse_size("seven")


def test_cli_fit_from_file_writes_vector(tmp_path, capsys):
    losses = tmp_path / "losses.json"
    losses.write_text(json.dumps({d: list(v) for d, v in LLAMA2_LOSSES.items()}))
    out = tmp_path / "out" / "reference.json"
    sizes = [str(s) for s in LLAMA2_SIZES]
    args = ["reference-loss", "fit", "--sizes", *sizes, "--losses-file", str(losses), "--target-size", "1.3b"]
    assert cli_main([*args, "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "target_loss: [1.9643, 0.7459, 2.1393, 1.6117, 1.7590, 1.4449, 2.1251]" in printed
    written = json.loads(out.read_text())
    assert written["set_names"] == list(PAPER_DOMAINS)
    assert written["target_size"] == 1_345_423_360
    assert [round(v, 4) for v in written["target_loss"]] == [
        PRESETS["sheared-1.3b"][d] for d in PAPER_DOMAINS
    ]
    assert not list(out.parent.glob(".*tmp*"))


def test_cli_fit_inline_and_domain_order(capsys):
    sizes = [str(s) for s in LLAMA2_SIZES]
    inline = [f"{d}={','.join(str(v) for v in LLAMA2_LOSSES[d])}" for d in ("wiki", "github")]
    code = cli_main(
        ["reference-loss", "fit", "--sizes", *sizes, "--losses", *inline, "--target-size", "2701560320"]
    )
    assert code == 0
    assert "target_loss: [1.6297, 0.6883]" in capsys.readouterr().out


def test_cli_presets(capsys):
    assert cli_main(["reference-loss", "presets"]) == 0
    assert "sheared-370m: [2.1401, 0.8694, 2.3625, 1.7791, 2.0470, 1.6637, 2.3139]" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            ["--losses-file", "/nonexistent/losses.json"],
            "losses file /nonexistent/losses.json does not exist",
        ),
        (["--losses", "cc=1.7,oops,1.4"], "domain 'cc' has a non-numeric loss"),
        (["--losses", "cc"], "must look like DOMAIN=L1,L2,L3"),
        (["--losses", "cc=1.7,1.6"], "domain 'cc': got 3 sizes and 2 losses"),
    ],
)
def test_cli_errors_exit_2(extra, message, capsys):
    sizes = [str(s) for s in LLAMA2_SIZES]
    code = cli_main(["reference-loss", "fit", "--sizes", *sizes, *extra, "--target-size", "1.3b"])
    assert code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    ("losses", "message"),
    [
        (
            "1.5,1.6,1.7",
            r"the losses do not decrease with model size \(6\.74e\+09: 1\.5, 1\.3e\+10: 1\.6, 6\.9e\+10: 1\.7\)",
        ),
        (
            "2.0,2.0,2.0",
            r"the losses do not decrease with model size .* a = 0, a loss that rises or stays flat",
        ),
        ("2.0,1.9,1.95", r"do not follow a power law that decreases .* b = 5 lies at the edge"),
        ("2.0,1.95,1.5", r"do not follow a power law that decreases .* b = 1e-06 lies at the edge"),
    ],
)
def test_fit_that_does_not_decrease_is_refused(tmp_path, capsys, losses, message):
    out = tmp_path / "reference.json"
    sizes = [str(s) for s in LLAMA2_SIZES]
    args = ["reference-loss", "fit", "--sizes", *sizes, "--losses", f"cc={losses}", "--target-size", "1.3b"]
    assert cli_main([*args, "--output", str(out)]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and not out.exists()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("llmshearing reference-loss: error: domain 'cc': ")
    assert re.search(message, lines[0])


def test_prediction_that_is_no_loss_is_refused():
    law = fit_power_law(LLAMA2_SIZES, LLAMA2_LOSSES["cc"])  # its asymptote c is negative
    assert law.predict(TARGET_SIZES["1.3b"]) == pytest.approx(PRESETS["sheared-1.3b"]["cc"], abs=5e-5)
    with pytest.raises(ValueError, match=r"predicts a loss of -.* at N = 1e\+30, which is no loss"):
        law.predict(1e30)
    with pytest.raises(ValueError, match="domain 'cc': the fit predicts a loss of"):
        fit_reference_losses(LLAMA2_SIZES, {"cc": LLAMA2_LOSSES["cc"]}, 1e30)


def test_resolve_reference_orders_every_source_by_the_domains():
    assert resolve_reference(["b", "a"], [2, 1.5], None).tolist() == [2.0, 1.5]
    assert resolve_reference(["a"], None, "source") is None and resolve_reference(["a"], None, None) is None
    preset = resolve_reference(["wiki", "cc"], None, "sheared-2.7b")
    assert preset.tolist() == [PRESETS["sheared-2.7b"]["wiki"], PRESETS["sheared-2.7b"]["cc"]]
    fit = {"sizes": list(LLAMA2_SIZES), "losses": LLAMA2_LOSSES, "target_size": TARGET_SIZES["1.3b"]}
    assert resolve_reference(["book", "cc"], None, fit).round(4).tolist() == [
        round(PRESETS["sheared-1.3b"]["book"], 4),
        round(PRESETS["sheared-1.3b"]["cc"], 4),
    ]
    with pytest.raises(ValueError, match=r"reference.losses has no reference loss for domains \['code'\]"):
        resolve_reference(["cc", "code"], None, fit)
    with pytest.raises(ValueError, match=r"callbacks.data_loading.reference must be 'source', a preset name"):
        resolve_reference(["cc"], None, 1.3)
