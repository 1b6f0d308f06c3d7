"""`glr check` and `glr plan`: params validated, and the resolved recipe."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from glr.commands.common import add_params
from glr.params import load_params

log = logging.getLogger("glr")


def cmd_check(args: argparse.Namespace) -> None:
    from glr.params import check_params

    check_params(args.params, args.out)
    log.info("%s: every key known, every value in range (wrote %s)", args.params, args.out)


def cmd_plan(args: argparse.Namespace) -> None:
    import json

    params = load_params(args.params)
    plan = {backbone: {phase.name: plan_row(phase) for phase in params.plan(backbone)}
            for backbone in params.model.backbones}
    if args.json:
        print(json.dumps(plan, indent=2))
        return
    columns = ["backbone", "phase", *PLAN_COLUMNS]
    rows = [[backbone, phase, *(_plan_cell(row[c]) for c in PLAN_COLUMNS)]
            for backbone, phases in plan.items() for phase, row in phases.items()]
    widths = [max(len(str(v)) for v in column) for column in zip(columns, *rows, strict=True)]
    for row in [columns, *rows]:
        print("  ".join(str(v).ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())


PLAN_COLUMNS = ("list", "size", "pad", "batch", "epochs", "lr", "weight_decay", "warmup_epochs",
                "sampler", "arcface_s", "arcface_m", "arcface_subcenters", "arcface_dynamic",
                "init")


def plan_row(phase) -> dict:
    """One backbone's phase as `glr plan --json` prints it."""
    settings = phase.settings
    row = {name: getattr(settings, name) for name in PLAN_COLUMNS if name != "init"}
    row["init"] = {"phase": phase.init.phase, "epoch": phase.init.epoch}
    return row


def _plan_cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, list):
        return "[" + ", ".join(_plan_cell(v) for v in value) + "]"
    if isinstance(value, dict):
        return value["phase"] + ("" if value["epoch"] is None else f" @ epoch {value['epoch']}")
    return f"{value:g}" if isinstance(value, float) else str(value)


def add_parser(subparsers) -> None:
    """Register this command's parser(s) under `glr`."""
    check = subparsers.add_parser(
        "check", help="check the params file: the pipeline's first stage",
        description="Validate the whole params file (unknown keys, types, ranges, the recipe's "
                    "phases and backbones) and write OUT, whose bytes never change. Every other "
                    "stage depends on OUT, so DVC runs this first: a bad `dvc exp run -S` value "
                    "stops here, before DVC deletes any stage's outputs. Reads: params only.")
    add_params(check)
    check.add_argument("--out", type=Path, default=Path("data/params.checked"),
                       help="the mark the other stages depend on (default: %(default)s)")
    check.set_defaults(func=cmd_check)

    plan = subparsers.add_parser(
        "plan", help="print the resolved training plan: every backbone's phases",
        description="Resolve params train.phases (defaults per phase) and train.recipe "
                    "(per backbone: where a phase starts, what it changes) into the settings "
                    "each backbone trains with, in order: list, size, pad, batch, epochs, lr, "
                    "weight_decay, warmup_epochs, sampler, arcface_s, arcface_m, "
                    "arcface_subcenters, arcface_dynamic (- when null: arcface_m), init. Check a "
                    "recipe with it before spending GPU days on it. Reads: params only.")
    add_params(plan)
    plan.add_argument("--json", action="store_true",
                      help='JSON: {"<backbone>": {"<phase>": {...}}}; init is {"phase": name '
                           'or "pretrained", "epoch": N or null}')
    plan.set_defaults(func=cmd_plan)
