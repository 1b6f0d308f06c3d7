"""`glr shard`: webdataset shards."""

from __future__ import annotations

import argparse
from pathlib import Path

from glr.commands.common import add_params
from glr.params import load_params


def cmd_shard(args: argparse.Namespace) -> None:
    from glr import shards

    shards.main(load_params(args.params), args.prepared, args.out, args.metrics)


def add_parser(subparsers) -> None:
    """Register this command's parser(s) under `glr`."""
    shard = subparsers.add_parser(
        "shard", help="write the images as webdataset shards, grouped for sampling",
        description="Write webdataset tar shards (<key>.jpg + <key>.json) per group: training "
                    "groups (list increment x continent), the validation queries and the "
                    "evaluation index; shrink images larger than training needs. Parallel and "
                    "resumable: a rerun keeps finished shards. Reads: PREPARED/*.parquet, the "
                    "images under params data.root (tree or official tars); params `shard`. "
                    "Writes: OUT/train/<group>/*.tar and OUT/eval/{query,eval_index}/*.tar, each "
                    "group with manifest.json, OUT/train/lists.json, OUT/report.json (skipped "
                    "images) and the totals METRICS.")
    add_params(shard)
    shard.add_argument("--prepared", type=Path, default=Path("data/prepared"),
                       help="prepare's output folder (default: %(default)s)")
    shard.add_argument("--out", type=Path, default=Path("data/shards"),
                       help="shard folder (default: %(default)s)")
    shard.add_argument("--metrics", type=Path, default=Path("metrics/shard.json"),
                       help="totals for `dvc metrics` (default: %(default)s)")
    shard.set_defaults(func=cmd_shard)
