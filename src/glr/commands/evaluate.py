"""`glr evaluate` and `glr report`: mAP@100 for dvc, and the headline."""

from __future__ import annotations

import argparse
from pathlib import Path

from glr.commands.common import add_params
from glr.errors import UserError
from glr.params import load_params


def cmd_evaluate(args: argparse.Namespace) -> None:
    from glr import evaluate

    if args.submission is not None:
        if args.solution is None:
            raise UserError("--submission needs --solution (a GLDv2 solution CSV)")
        evaluate.standalone(args.solution, args.submission, args.out)
        return
    params = load_params(args.params)
    solution = args.solution or Path(params.data.root) / "test" / "retrieval_solution_v2.1.csv"
    if args.out is not None:
        raise UserError("--out is the standalone score's file (with --submission); the stage "
                          "writes into --live")
    evaluate.main(params, args.retrieval, solution, args.live,
                  baseline_dir=None if args.no_baseline else args.baseline)


def cmd_report(args: argparse.Namespace) -> None:
    import json

    from glr import evaluate

    if not args.metrics.is_file():
        raise UserError(f"{args.metrics}: no such file; run `dvc repro` (or `glr evaluate`) "
                          "first")
    print(evaluate.headline(json.loads(args.metrics.read_text()), source=str(args.metrics)))


def add_parser(subparsers) -> None:
    """Register this command's parser(s) under `glr`."""
    ev = subparsers.add_parser(
        "evaluate", help="mAP@100 (official GLDv2 definition), precision@k, recall@100",
        description="Standalone: --solution SOLUTION.csv --submission SUBMISSION.csv [--out "
                    "METRICS.json] scores any Kaggle-format submission against a GLDv2-format "
                    "solution. As a stage (no --submission): scores every ranking of RETRIEVAL "
                    "against the solution under params data.root, and each backbone's "
                    "starting weights' search (glr baseline) as <backbone>.pretrained. Reads: "
                    "RETRIEVAL/topk/*, BASELINE/<backbone>/topk.parquet, the solution CSV. "
                    "Writes with DVCLive into LIVE: metrics.json (the final "
                    "submission's map100, map100_public, map100_private, precision1, "
                    "precision5, precision10, precision100, recall100, queries, contaminated; "
                    "per model and variant map100, map100_public, map100_private, e.g. "
                    "resnet18.rerank.map100) and plots/custom/precision_at_k/<model>.json "
                    "(precision@k of each ranking, for `dvc plots`). Both refuse (exit "
                    "status 2) a submission with upper-cased image ids, which can never match "
                    "the solution's lower-case hex ids, and warn when no submitted image id is "
                    "a ground-truth id of the solution (e.g. a header-only submission).")
    add_params(ev)
    ev.add_argument("--solution", type=Path, default=None,
                    help="GLDv2 solution CSV (default: <data.root>/test/"
                         "retrieval_solution_v2.1.csv)")
    ev.add_argument("--submission", type=Path, default=None,
                    help="a Kaggle-format submission to score on its own")
    ev.add_argument("--out", type=Path, default=None,
                    help="with --submission: the metrics JSON to write")
    ev.add_argument("--retrieval", type=Path, default=Path("data/retrieval"),
                    help="retrieve's output folder (default: %(default)s)")
    ev.add_argument("--baseline", type=Path, default=Path("data/baseline"),
                    help="the baseline stage's folder: <backbone>/topk.parquet is scored as "
                         "<backbone>.pretrained (default: %(default)s)")
    ev.add_argument("--no-baseline", action="store_true",
                    help="score retrieve's rankings only")
    ev.add_argument("--live", type=Path, default=Path("metrics/evaluate"),
                    help="the stage's DVCLive folder (default: %(default)s)")
    ev.set_defaults(func=cmd_evaluate)

    rep = subparsers.add_parser(
        "report", help="the headline: mAP@100 per backbone: no training, plain, reranked",
        description="Print mAP@100 (all, public, private) of each backbone with its starting "
                    "weights (no training, stage baseline), then with and without "
                    "the Landmark-Country rerank (the ensemble's too when there are several "
                    "backbones) and the submission's, from METRICS. `make repro` ends with it; "
                    "`dvc metrics show` has every number, the counts of metrics/prepare.json "
                    "and metrics/shard.json included.")
    rep.add_argument("--metrics", type=Path, default=Path("metrics/evaluate/metrics.json"),
                     help="glr evaluate's output (default: %(default)s)")
    rep.set_defaults(func=cmd_report)
