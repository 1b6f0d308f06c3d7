"""`glr visualize`: a picture of retrieval results."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from glr.commands.common import add_params
from glr.params import load_params

log = logging.getLogger("glr")


def cmd_visualize(args: argparse.Namespace) -> None:
    from glr import visualize

    params = load_params(args.params)
    solution = Path(params.data.root) / "test" / "retrieval_solution_v2.1.csv"
    path = visualize.main(args.retrieval, args.shards, solution, args.live, args.queries,
                          args.top)
    log.info("wrote %s", path)


def add_parser(subparsers) -> None:
    """Register this command's parser(s) under `glr`."""
    vis = subparsers.add_parser(
        "visualize", help="a picture of queries and their top results",
        description="Draw the first QUERIES validation queries (by id) with their TOP best index "
                    "images of the final ranking, framed green (ground truth) or red. Reads: "
                    "RETRIEVAL, SHARDS (query and eval_index groups), the solution CSV under "
                    "params data.root. Writes with DVCLive: LIVE/plots/images/retrieval.png "
                    "(`dvc plots show`).")
    add_params(vis)
    vis.add_argument("--retrieval", type=Path, default=Path("data/retrieval"),
                     help="retrieve's output folder (default: %(default)s)")
    vis.add_argument("--shards", type=Path, default=Path("data/shards"),
                     help="shard folder (default: %(default)s)")
    vis.add_argument("--live", type=Path, default=Path("metrics/visualize"),
                     help="the stage's DVCLive folder (default: %(default)s)")
    vis.add_argument("--queries", type=int, default=8, help="rows (default: %(default)s)")
    vis.add_argument("--top", type=int, default=8, help="results per row (default: 8)")
    vis.set_defaults(func=cmd_visualize)
