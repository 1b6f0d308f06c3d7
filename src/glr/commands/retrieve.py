"""`glr retrieve`: search, rerank, ensemble, submission."""

from __future__ import annotations

import argparse
from pathlib import Path

from glr.commands.common import add_params
from glr.params import load_params


def cmd_retrieve(args: argparse.Namespace) -> None:
    from glr import retrieve

    retrieve.main(load_params(args.params), args.features, args.tags, args.out)


def add_parser(subparsers) -> None:
    """Register this command's parser(s) under `glr`."""
    ret = subparsers.add_parser(
        "retrieve", help="search, Landmark-Country rerank, ensemble, Kaggle submission",
        description="Exact cosine search of the evaluation index per backbone, the "
                    "Landmark-Country aware rerank (the index images' tags from `glr tag`, the "
                    "queries' from the cached reference features, streamed in blocks), the "
                    "weighted ensemble. Reads: FEATURES/<backbone>/ and TAGS/<backbone>.parquet "
                    "of every backbone; params `retrieve`, model.backbones. Writes: "
                    "OUT/submission.csv (Kaggle format), OUT/topk/<variant>.parquet (top-k ids "
                    "and scores before and after the rerank, per backbone and ensemble), "
                    "OUT/tags/<backbone>-queries.parquet (each query's tags), "
                    "OUT/variants.json.")
    add_params(ret)
    ret.add_argument("--features", type=Path, default=Path("data/features"),
                     help="features folder (default: %(default)s)")
    ret.add_argument("--tags", type=Path, default=Path("data/tags"),
                     help="the index images' tags, `glr tag`'s output (default: %(default)s)")
    ret.add_argument("--out", type=Path, default=Path("data/retrieval"),
                     help="output folder (default: %(default)s)")
    ret.set_defaults(func=cmd_retrieve)
