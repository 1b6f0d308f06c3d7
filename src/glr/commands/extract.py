"""`glr extract`: cached features."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from glr.commands.common import add_params
from glr.params import load_params


def cmd_extract(args: argparse.Namespace) -> None:
    from glr import extract

    out = args.out or Path("data/features") / args.backbone
    extract.main(load_params(args.params), args.backbone, args.shards, args.models, out,
                 args.runs, phase=args.phase, argv=sys.argv[1:])


def add_parser(subparsers) -> None:
    """Register this command's parser(s) under `glr`."""
    ext = subparsers.add_parser(
        "extract", help="features of queries, evaluation index and references",
        description="Extract L2-normalized features with a backbone's model (the last phase, "
                    "or --phase / params extract.phase): the validation queries, the "
                    "evaluation index and the reference set (about 4.9M images on GLDv2). "
                    "Resumable per shard; torchrun when params extract.processes > 1. Reads: "
                    "SHARDS, MODELS/<backbone>/<phase>/; params `extract`, model.size. Writes: "
                    "OUT/{query,index,ref}.npy (float16) with .parquet id tables and info.json.")
    add_params(ext)
    ext.add_argument("--backbone", required=True, help="one of params model.backbones")
    ext.add_argument("--phase", default=None, help="model phase (default: params)")
    ext.add_argument("--shards", type=Path, default=Path("data/shards"),
                     help="shard folder (default: %(default)s)")
    ext.add_argument("--models", type=Path, default=Path("models"),
                     help="models folder (default: %(default)s)")
    ext.add_argument("--out", type=Path, default=None,
                     help="output folder (default: data/features/<backbone>)")
    ext.add_argument("--runs", type=Path, default=Path("runs"),
                     help="resumable per-shard parts (default: %(default)s)")
    ext.set_defaults(func=cmd_extract)
