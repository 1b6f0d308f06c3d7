"""`glr query`: search the trained system with your own photos."""

from __future__ import annotations

import argparse
from pathlib import Path

from glr.commands.common import add_params
from glr.errors import UserError
from glr.params import load_params


def cmd_query(args: argparse.Namespace) -> None:
    from glr import query

    if args.top < 1:
        raise UserError(f"--top must be at least 1, got {args.top}")
    query.main(load_params(args.params), args.photos, top=args.top, models_dir=args.models,
               features_dir=args.features, tags_dir=args.tags,
               labels_table=args.labels, as_json=args.json, out_png=args.out,
               shard_dir=args.shards)


def add_parser(subparsers) -> None:
    """Register this command's parser(s) under `glr`."""
    que = subparsers.add_parser(
        "query", help="search the trained system with photos: top index images, landmarks",
        description="Embed each PHOTO with every backbone's extraction model (the pipeline's "
                    "own preprocessing: shard resize, square resize, normalization), search "
                    "the cached index features, apply the Landmark-Country rerank with the "
                    "index tags `glr tag` stored and the cached reference features, and "
                    "print per photo the TOP index images of the ensemble and the most likely "
                    "GLDv2 landmark ids with scores. Every readable photo is answered; an "
                    "unreadable one (missing, empty, not an image, corrupt) is named with its "
                    "problem in an error line and keeps its place in the output: `not "
                    "answered: PROBLEM` in the text, {\"photo\": PATH, \"error\": PROBLEM} in "
                    "--json. Exit status 2 only when no photo could be read. A photo under 32 px "
                    "on a side is answered with a warning. The network computes in params "
                    "train.precision. Reads: MODELS, FEATURES, TAGS, LABELS (and "
                    "SHARDS for --out). Run `dvc repro` first.")
    add_params(que)
    que.add_argument("photos", type=Path, nargs="+", metavar="PHOTO", help="image files")
    que.add_argument("--top", type=int, default=10, help="index images per photo (default: 10)")
    que.add_argument("--json", action="store_true", help="print JSON instead of text")
    que.add_argument("--out", type=Path, default=None,
                     help="also draw the answered photos and their results into this PNG "
                          "(its folder must exist)")
    que.add_argument("--models", type=Path, default=Path("models"),
                     help="trained models (default: %(default)s)")
    que.add_argument("--features", type=Path, default=Path("data/features"),
                     help="cached features (default: %(default)s)")
    que.add_argument("--tags", type=Path, default=Path("data/tags"),
                     help="the index images' tags, `glr tag`'s output (default: %(default)s)")
    que.add_argument("--labels", type=Path, default=Path("data/prepared/labels.parquet"),
                     help="label → landmark id table (default: %(default)s)")
    que.add_argument("--shards", type=Path, default=Path("data/shards"),
                     help="shard folder, for the pictures of --out (default: %(default)s)")
    que.set_defaults(func=cmd_query)
