"""Dynamic loading sub-command: `llmshearing reference-loss ...` (reference losses for the mix).

``reference-loss fit`` fits ``L(N) = a / N**b + c`` per domain and prints the losses at a target size;
``reference-loss presets`` prints the paper's vectors. Both print lines ready for ``target_loss``.
Only the standard library is imported here (and the light ``config``): the fit imports
``llmshearing.dynamic_loading.reference_loss`` when it runs.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from llmshearing.dynamic_loading.config import KEY
from llmshearing.io.staging import write_text_atomic


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "reference-loss",
        help="reference losses for dynamic batch loading (scaling-law fit, presets)",
        description=f"Reference losses for {KEY}.target_loss.",
    )
    sub = parser.add_subparsers(dest="reference_command", required=True, metavar="ACTION")

    fit = sub.add_parser(
        "fit",
        help="fit L(N) = a/N^b + c per domain and predict the loss at a target size",
        description="Fit L(N) = a/N^b + c per domain from (model size, loss) points and print the "
        "predicted losses at --target-size, in domain order, ready for target_loss.",
    )
    fit.add_argument("--sizes", nargs="+", required=True, help="parameter counts of the measured models")
    losses = fit.add_mutually_exclusive_group(required=True)
    losses.add_argument(
        "--losses-file", type=Path, help='JSON object {"<domain>": [loss per size, ...], ...}'
    )
    losses.add_argument(
        "--losses", nargs="+", metavar="DOMAIN=L1,L2,...", help="inline losses, one argument per domain"
    )
    fit.add_argument(
        "--target-size", required=True, help="parameter count of the target, or a name: 1.3b, 2.7b, 370m"
    )
    fit.add_argument("--domains", nargs="+", help="output order (default: the order of the losses)")
    fit.add_argument("--output", type=Path, help="also write the result to this JSON file")
    fit.set_defaults(func=run_fit)

    presets = sub.add_parser("presets", help="print the named reference vectors of the paper")
    presets.set_defaults(func=run_presets)


def _read_losses(args: argparse.Namespace) -> dict[str, list[float]]:
    if args.losses_file is not None:
        if not args.losses_file.is_file():
            raise FileNotFoundError(f"losses file {args.losses_file} does not exist")
        try:
            data = json.loads(args.losses_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{args.losses_file} is not valid JSON: {err}") from None
        if not isinstance(data, dict) or not data:
            raise ValueError(f'{args.losses_file} must hold a JSON object {{"<domain>": [losses...]}}')
        source = str(args.losses_file)
    else:
        data = {}
        for item in args.losses:
            name, sep, values = item.partition("=")
            if not sep or not name:
                raise ValueError(f"--losses item {item!r} must look like DOMAIN=L1,L2,L3")
            data[name] = values.split(",")
        source = "--losses"
    out = {}
    for name, values in data.items():
        if not isinstance(values, list):
            raise ValueError(f"{source}: domain {name!r} must map to a list of losses, one per size")
        try:
            out[name] = [float(v) for v in values]
        except (TypeError, ValueError):
            raise ValueError(f"{source}: domain {name!r} has a non-numeric loss in {values}") from None
    return out


def _target_size(text: str) -> int:
    from llmshearing.dynamic_loading.reference_loss import TARGET_SIZES, parse_size

    return TARGET_SIZES.get(text.strip().lower()) or parse_size(text)


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    write_text_atomic(path, json.dumps(data, indent=2) + "\n")


def run_fit(args: argparse.Namespace) -> int:
    from llmshearing.dynamic_loading.reference_loss import fit_power_law, parse_size

    sizes = [parse_size(s) for s in args.sizes]
    losses = _read_losses(args)
    target = _target_size(args.target_size)
    domains = args.domains or list(losses)
    missing = [d for d in domains if d not in losses]
    if missing:
        raise ValueError(f"--domains lists {missing}, which have no losses (known: {list(losses)})")
    rows = []
    for domain in domains:
        try:
            law = fit_power_law(sizes, losses[domain])
            rows.append((domain, law, law.predict(target)))
        except ValueError as err:
            raise ValueError(f"domain {domain!r}: {err}") from None

    print(f"L(N) = a / (N/s)^b + c, s = {rows[0][1].scale:.6g}; target N = {target:,}")
    print(f"{'domain':<16}{'a':>12}{'b':>12}{'c':>12}{'residual':>12}{'L(target)':>12}")
    for domain, law, value in rows:
        print(f"{domain:<16}{law.a:>12.6f}{law.b:>12.6f}{law.c:>12.6f}{law.residual:>12.2e}{value:>12.4f}")
    vector = [round(value, 4) for _, _, value in rows]
    print(f"set_names: [{', '.join(domains)}]")
    print(f"target_loss: [{', '.join(f'{v:.4f}' for v in vector)}]")
    if args.output is not None:
        _write_json_atomic(
            args.output,
            {
                "sizes": sizes,
                "target_size": target,
                "set_names": domains,
                "target_loss": [value for _, _, value in rows],
                "fits": {d: {"a": law.a, "b": law.b, "c": law.c, "scale": law.scale} for d, law, _ in rows},
            },
        )
        print(f"wrote {args.output}")
    return 0


def run_presets(args: argparse.Namespace) -> int:
    from llmshearing.dynamic_loading.reference_loss import PAPER_DOMAINS, PRESETS

    print(f"set_names: [{', '.join(PAPER_DOMAINS)}]")
    for name, values in PRESETS.items():
        print(f"{name}: [{', '.join(f'{values[d]:.4f}' for d in PAPER_DOMAINS)}]")
    return 0
