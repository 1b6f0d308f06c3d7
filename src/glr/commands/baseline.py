"""`glr baseline`: the starting weights' own retrieval."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from glr.commands.common import add_params
from glr.params import load_params


def cmd_baseline(args: argparse.Namespace) -> None:
    from glr import baseline

    baseline.main(load_params(args.params), args.backbone, args.shards, args.models,
                  args.out / args.backbone, args.runs, argv=sys.argv[1:])


def add_parser(subparsers) -> None:
    """Register this command's parser(s) under `glr`."""
    base = subparsers.add_parser(
        "baseline", help="plain search with the starting weights: what training adds",
        description="Extract the validation queries' and evaluation index's features with "
                    "the model training starts from (MODELS/<backbone>/pretrained, `glr "
                    "init`), as `glr extract` does, and rank the index for every query by "
                    "exact cosine (top params retrieve.k). `glr evaluate` scores it as "
                    "<backbone>.pretrained.map100. No reference features: on GLDv2's "
                    "validation (1,129 queries, 78,959 index images) under 2 percent of the "
                    "extraction's images. Reads: SHARDS/eval, "
                    "MODELS/<backbone>/pretrained; params model.size, extract, train.precision. "
                    "Writes: OUT/<backbone>/{query,index}.npy with .parquet id tables, "
                    "info.json and topk.parquet (id, images, scores).")
    add_params(base)
    base.add_argument("--backbone", required=True, help="a name from model.backbones")
    base.add_argument("--shards", type=Path, default=Path("data/shards"),
                      help="shard folder (default: %(default)s)")
    base.add_argument("--models", type=Path, default=Path("models"),
                      help="models folder (default: %(default)s)")
    base.add_argument("--out", type=Path, default=Path("data/baseline"),
                      help="output folder (default: %(default)s)")
    base.add_argument("--runs", type=Path, default=Path("runs"),
                      help="resumable per-shard parts (default: %(default)s)")
    base.set_defaults(func=cmd_baseline)
