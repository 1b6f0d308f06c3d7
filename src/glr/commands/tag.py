"""`glr tag`: the evaluation index images' Landmark-Country tags."""

from __future__ import annotations

import argparse
from pathlib import Path

from glr.commands.common import add_params
from glr.params import load_params


def cmd_tag(args: argparse.Namespace) -> None:
    from glr import tag

    tag.main(load_params(args.params), args.backbone, args.features, args.out)


def add_parser(subparsers) -> None:
    """Register this command's parser(s) under `glr`."""
    tag_parser = subparsers.add_parser(
        "tag", help="tag the evaluation index images with their top-1 reference",
        description="Give every evaluation index image the landmark label and country of its "
                    "nearest reference by cosine (exact; the reference features streamed in "
                    "blocks of params retrieve.block_rows, on retrieve.device in "
                    "retrieve.precision). The Landmark-Country rerank of `glr retrieve` and "
                    "`glr query` reads them; they depend only on the features, so rerank "
                    "experiments do not redo them (hours per backbone on GLDv2). Reads: "
                    "FEATURES/<backbone>/. Writes: OUT/<backbone>.parquet (id, label, country).")
    add_params(tag_parser)
    tag_parser.add_argument("--backbone", required=True, help="a name from model.backbones")
    tag_parser.add_argument("--features", type=Path, default=Path("data/features"),
                            help="features folder (default: %(default)s)")
    tag_parser.add_argument("--out", type=Path, default=Path("data/tags"),
                            help="output folder (default: %(default)s)")
    tag_parser.set_defaults(func=cmd_tag)
