"""`glr prepare`: the training lists and the evaluation sets."""

from __future__ import annotations

import argparse
from pathlib import Path

from glr.commands.common import add_params
from glr.params import load_params


def cmd_prepare(args: argparse.Namespace) -> None:
    from glr import prepare

    prepare.main(load_params(args.params), args.out, args.metrics)


def add_parser(subparsers) -> None:
    """Register this command's parser(s) under `glr`."""
    prep = subparsers.add_parser(
        "prepare", help="build the training lists and the evaluation sets",
        description="Build the training lists clean, c2x, full, all (global labels, "
                    "clean/noisy flag, country, continent), the reference set and the "
                    "validation queries and evaluation index, by method.md's rules. Reads: the "
                    "GLDv2 metadata under params data.root; params `prepare`. Writes: "
                    "OUT/*.parquet, OUT/summary.json and the headline counts METRICS.")
    add_params(prep)
    prep.add_argument("--out", type=Path, default=Path("data/prepared"),
                      help="output folder (default: %(default)s)")
    prep.add_argument("--metrics", type=Path, default=Path("metrics/prepare.json"),
                      help="counts summary for `dvc metrics` (default: %(default)s)")
    prep.set_defaults(func=cmd_prepare)
