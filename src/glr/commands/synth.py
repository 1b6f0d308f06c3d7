"""`glr synth`: generate the embedded mini-GLDv2."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from glr.commands.common import add_params, image_size
from glr.params import load_params

log = logging.getLogger("glr")


def cmd_synth(args: argparse.Namespace) -> None:
    import dataclasses

    from glr import synth

    params = load_params(args.params).synth
    if args.image_size:
        params = dataclasses.replace(params, image_width=args.image_size[0],
                                     image_height=args.image_size[1])
    if args.seed is not None:
        params = dataclasses.replace(params, seed=args.seed)
    plan = synth.generate(params, args.out, workers=args.workers)
    truth = plan.truth
    log.info("wrote %s: %d images (%d train, %d index, %d test); %d clean + %d extra landmarks",
             args.out, len(plan.images), truth["full"]["images"], truth["index"]["images"],
             truth["val_queries"]["total"] + params.ignored_queries,
             truth["landmarks"]["clean"], truth["landmarks"]["extra"])


def add_parser(subparsers) -> None:
    """Register this command's parser(s) under `glr`."""
    synth = subparsers.add_parser(
        "synth", help="generate the embedded mini-GLDv2",
        description="Generate a small dataset in the exact GLDv2 layout (CSV, country JSON, "
                    "JPEGs at <split>/<a>/<b>/<c>/<id>.jpg). Reads: params `synth`. Writes: "
                    "OUT (replaced atomically) with OUT/synth_truth.json, the counts the "
                    "generated plan implies.")
    add_params(synth)
    synth.add_argument("--out", type=Path, default=Path("data/mini-gldv2"),
                       help="dataset root to write (default: %(default)s)")
    synth.add_argument("--image-size", type=image_size, metavar="WxH",
                       help="photo size, e.g. 800x600 for GLDv2-like benchmark data "
                            "(default: params synth.image_width x synth.image_height)")
    synth.add_argument("--seed", type=int, help="override params synth.seed")
    synth.add_argument("--workers", type=int, default=None,
                       help="render processes (default: CPU count, at most 8); the bytes "
                            "written do not depend on it")
    synth.set_defaults(func=cmd_synth)
