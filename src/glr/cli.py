"""`glr <stage>`: the one entry point of the pipeline; `dvc.yaml` calls only this."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from glr.errors import UserError
from glr.params import DEFAULT_PARAMS, load_params

log = logging.getLogger("glr")


def _add_params(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--params", type=Path, default=DEFAULT_PARAMS,
                        help="params file (default: %(default)s)")


def _image_size(text: str) -> tuple[int, int]:
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected WIDTHxHEIGHT, e.g. 800x600, got {text!r}") from None
    if min(width, height) < 32:
        raise argparse.ArgumentTypeError("both sides must be at least 32 pixels")
    return width, height


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


def cmd_prepare(args: argparse.Namespace) -> None:
    from glr import prepare

    prepare.main(load_params(args.params), args.out, args.metrics)


def cmd_shard(args: argparse.Namespace) -> None:
    from glr import shards

    shards.main(load_params(args.params), args.prepared, args.out, args.metrics)


def cmd_init(args: argparse.Namespace) -> None:
    from glr import train

    train.init_main(load_params(args.params), args.backbone, args.models)


def cmd_train(args: argparse.Namespace) -> None:
    from glr import train

    train.main(load_params(args.params), args.backbone, args.phase, args.shards, args.models,
               args.runs, args.metrics, argv=sys.argv[1:])


def cmd_extract(args: argparse.Namespace) -> None:
    from glr import extract

    out = args.out or Path("data/features") / args.backbone
    extract.main(load_params(args.params), args.backbone, args.shards, args.models, out,
                 args.runs, phase=args.phase, argv=sys.argv[1:])


def cmd_retrieve(args: argparse.Namespace) -> None:
    from glr import retrieve

    retrieve.main(load_params(args.params), args.features, args.out)


def cmd_report(args: argparse.Namespace) -> None:
    import json

    from glr import evaluate

    if not args.metrics.is_file():
        raise UserError(f"{args.metrics}: no such file; run `dvc repro` (or `glr evaluate`) "
                          "first")
    print(evaluate.headline(json.loads(args.metrics.read_text()), source=str(args.metrics)))


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
    evaluate.main(params, args.retrieval, solution, args.live)


def cmd_visualize(args: argparse.Namespace) -> None:
    from glr import visualize

    params = load_params(args.params)
    solution = Path(params.data.root) / "test" / "retrieval_solution_v2.1.csv"
    path = visualize.main(args.retrieval, args.shards, solution, args.live, args.queries,
                          args.top)
    log.info("wrote %s", path)


def cmd_query(args: argparse.Namespace) -> None:
    from glr import query

    if args.top < 1:
        raise UserError(f"--top must be at least 1, got {args.top}")
    query.main(load_params(args.params), args.photos, top=args.top, models_dir=args.models,
               features_dir=args.features, retrieval_dir=args.retrieval,
               labels_table=args.labels, as_json=args.json, out_png=args.out,
               shard_dir=args.shards)


def cmd_check(args: argparse.Namespace) -> None:
    from glr.params import check_params

    check_params(args.params, args.out)
    log.info("%s: every key known, every value in range (wrote %s)", args.params, args.out)


def cmd_plan(args: argparse.Namespace) -> None:
    import json

    params = load_params(args.params)
    plan = {backbone: {phase.name: plan_row(phase) for phase in params.plan(backbone)}
            for backbone in params.model.backbones}
    if args.json:
        print(json.dumps(plan, indent=2))
        return
    columns = ["backbone", "phase", *PLAN_COLUMNS]
    rows = [[backbone, phase, *(_plan_cell(row[c]) for c in PLAN_COLUMNS)]
            for backbone, phases in plan.items() for phase, row in phases.items()]
    widths = [max(len(str(v)) for v in column) for column in zip(columns, *rows, strict=True)]
    for row in [columns, *rows]:
        print("  ".join(str(v).ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())


PLAN_COLUMNS = ("list", "size", "pad", "batch", "epochs", "lr", "weight_decay", "warmup_epochs",
                "sampler", "arcface_s", "arcface_m", "init")


def plan_row(phase) -> dict:
    """One backbone's phase as `glr plan --json` prints it."""
    settings = phase.settings
    row = {name: getattr(settings, name) for name in PLAN_COLUMNS if name != "init"}
    row["init"] = {"phase": phase.init.phase, "epoch": phase.init.epoch}
    return row


def _plan_cell(value) -> str:
    if isinstance(value, dict):
        return value["phase"] + ("" if value["epoch"] is None else f" @ epoch {value['epoch']}")
    return f"{value:g}" if isinstance(value, float) else str(value)


def cmd_bench_prepare(args: argparse.Namespace) -> None:
    from glr.bench import prepare as bench_prepare

    bench_prepare.main(scale=args.scale, out=args.out, workdir=args.workdir)


def cmd_bench_loader(args: argparse.Namespace) -> None:
    from glr.bench import loader as bench_loader

    bench_loader.main(out=args.out, image_size=args.image_size, count=args.images,
                      rounds=args.rounds, workdir=args.workdir)


def cmd_bench_extract(args: argparse.Namespace) -> None:
    from glr.bench import extract as bench_extract

    bench_extract.main(out=args.out, backbone=args.backbone, size=args.size, batch=args.batch,
                       images=args.images, rounds=args.rounds, workers=args.workers,
                       max_side=args.max_side, image_size=args.image_size,
                       workdir=args.workdir)


def cmd_bench_retrieve(args: argparse.Namespace) -> None:
    from glr.bench import retrieve as bench_retrieve

    bench_retrieve.main(out=args.out, references=args.references, queries=args.queries,
                        index=args.index, dim=args.dim, sample=args.sample,
                        memory_index=args.memory_index,
                        memory_references=args.memory_references, workdir=args.workdir,
                        precisions=args.precisions, accounting_shape=tuple(args.accounting))


def cmd_bench_gpu(args: argparse.Namespace) -> None:
    from glr.bench import gpu as bench_gpu

    bench_gpu.main(out=args.out, dry_run=args.dry_run, workers=args.workers,
                   workdir=args.workdir, gpus=args.gpus)


def cmd_bench_default(args: argparse.Namespace) -> None:
    from glr.bench import default as bench_default

    bench_default.main(out=args.out, seeds=args.seeds, workdir=args.workdir, keep=args.keep)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="glr",
        description="Google Landmark Retrieval 2021 (2nd place) as a DVC pipeline. "
                    "Each sub-command is one pipeline stage; `dvc repro` runs them in order.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    stages = parser.add_subparsers(dest="command", required=True, metavar="<stage>")

    synth = stages.add_parser(
        "synth", help="generate the embedded mini-GLDv2",
        description="Generate a small dataset in the exact GLDv2 layout (CSV, country JSON, "
                    "JPEGs at <split>/<a>/<b>/<c>/<id>.jpg). Reads: params `synth`. Writes: "
                    "OUT (replaced atomically) with OUT/synth_truth.json, the counts the "
                    "generated plan implies.")
    _add_params(synth)
    synth.add_argument("--out", type=Path, default=Path("data/mini-gldv2"),
                       help="dataset root to write (default: %(default)s)")
    synth.add_argument("--image-size", type=_image_size, metavar="WxH",
                       help="photo size, e.g. 800x600 for GLDv2-like benchmark data "
                            "(default: params synth.image_width x synth.image_height)")
    synth.add_argument("--seed", type=int, help="override params synth.seed")
    synth.add_argument("--workers", type=int, default=None,
                       help="render processes (default: CPU count, at most 8); the bytes "
                            "written do not depend on it")
    synth.set_defaults(func=cmd_synth)

    prep = stages.add_parser(
        "prepare", help="build the training lists and the evaluation sets",
        description="Build the training lists clean, c2x, full, all (global labels, "
                    "clean/noisy flag, country, continent), the reference set and the "
                    "validation queries and evaluation index, by method.md's rules. Reads: the "
                    "GLDv2 metadata under params data.root; params `prepare`. Writes: "
                    "OUT/*.parquet, OUT/summary.json and the headline counts METRICS.")
    _add_params(prep)
    prep.add_argument("--out", type=Path, default=Path("data/prepared"),
                      help="output folder (default: %(default)s)")
    prep.add_argument("--metrics", type=Path, default=Path("metrics/prepare.json"),
                      help="counts summary for `dvc metrics` (default: %(default)s)")
    prep.set_defaults(func=cmd_prepare)

    shard = stages.add_parser(
        "shard", help="write the images as webdataset shards, grouped for sampling",
        description="Write webdataset tar shards (<key>.jpg + <key>.json) per group: training "
                    "groups (list increment x continent), the validation queries and the "
                    "evaluation index; shrink images larger than training needs. Parallel and "
                    "resumable: a rerun keeps finished shards. Reads: PREPARED/*.parquet, the "
                    "images under params data.root (tree or official tars); params `shard`. "
                    "Writes: OUT/train/<group>/*.tar and OUT/eval/{query,eval_index}/*.tar, each "
                    "group with manifest.json, OUT/train/lists.json, OUT/report.json (skipped "
                    "images) and the totals METRICS.")
    _add_params(shard)
    shard.add_argument("--prepared", type=Path, default=Path("data/prepared"),
                       help="prepare's output folder (default: %(default)s)")
    shard.add_argument("--out", type=Path, default=Path("data/shards"),
                       help="shard folder (default: %(default)s)")
    shard.add_argument("--metrics", type=Path, default=Path("metrics/shard.json"),
                       help="totals for `dvc metrics` (default: %(default)s)")
    shard.set_defaults(func=cmd_shard)

    init = stages.add_parser(
        "init", help="write a backbone's starting weights",
        description="Build the backbone with its head and write the weights every first phase "
                    "starts from: timm's ImageNet weights (params model.pretrained), a local "
                    "file (model.weights_dir/<backbone>.pth) or a seeded random init. Reads: "
                    "params `model`, train.seed. Writes: MODELS/<backbone>/pretrained/ "
                    "(model.safetensors, config.json).")
    _add_params(init)
    init.add_argument("--backbone", required=True, help="one of params model.backbones")
    init.add_argument("--models", type=Path, default=Path("models"),
                      help="models folder (default: %(default)s)")
    init.set_defaults(func=cmd_init)

    train = stages.add_parser(
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
    _add_params(train)
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

    ext = stages.add_parser(
        "extract", help="features of queries, evaluation index and references",
        description="Extract L2-normalized features with a backbone's model (the last phase, "
                    "or --phase / params extract.phase): the validation queries, the "
                    "evaluation index and the reference set (about 4.9M images on GLDv2). "
                    "Resumable per shard; torchrun when params extract.processes > 1. Reads: "
                    "SHARDS, MODELS/<backbone>/<phase>/; params `extract`, model.size. Writes: "
                    "OUT/{query,index,ref}.npy (float16) with .parquet id tables and info.json.")
    _add_params(ext)
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

    ret = stages.add_parser(
        "retrieve", help="search, Landmark-Country rerank, ensemble, Kaggle submission",
        description="Exact cosine search of the evaluation index per backbone, the "
                    "Landmark-Country aware rerank with the cached reference features (streamed "
                    "in blocks), the weighted ensemble. Reads: FEATURES/<backbone>/ of every "
                    "backbone; params `retrieve`, model.backbones. Writes: OUT/submission.csv "
                    "(Kaggle format), OUT/topk/<variant>.parquet (top-k ids and scores before and "
                    "after the rerank, per backbone and ensemble), OUT/variants.json.")
    _add_params(ret)
    ret.add_argument("--features", type=Path, default=Path("data/features"),
                     help="features folder (default: %(default)s)")
    ret.add_argument("--out", type=Path, default=Path("data/retrieval"),
                     help="output folder (default: %(default)s)")
    ret.set_defaults(func=cmd_retrieve)

    ev = stages.add_parser(
        "evaluate", help="mAP@100 (official GLDv2 definition), precision@k, recall@100",
        description="Standalone: --solution SOLUTION.csv --submission SUBMISSION.csv [--out "
                    "METRICS.json] scores any Kaggle-format submission against a GLDv2-format "
                    "solution. As a stage (no --submission): scores every ranking of RETRIEVAL "
                    "against the solution under params data.root. Reads: RETRIEVAL/topk/*, "
                    "the solution CSV. Writes with DVCLive into LIVE: metrics.json (the final "
                    "submission's map100, map100_public, map100_private, precision1, "
                    "precision5, precision10, precision100, recall100, queries, contaminated; "
                    "per model and variant map100, map100_public, map100_private, e.g. "
                    "resnet18.rerank.map100) and plots/custom/precision_at_k/<model>.json "
                    "(precision@k, plain and rerank, for `dvc plots`). Both refuse (exit "
                    "status 2) a submission with upper-cased image ids, which can never match "
                    "the solution's lower-case hex ids, and warn when no submitted image id is "
                    "a ground-truth id of the solution (e.g. a header-only submission).")
    _add_params(ev)
    ev.add_argument("--solution", type=Path, default=None,
                    help="GLDv2 solution CSV (default: <data.root>/test/"
                         "retrieval_solution_v2.1.csv)")
    ev.add_argument("--submission", type=Path, default=None,
                    help="a Kaggle-format submission to score on its own")
    ev.add_argument("--out", type=Path, default=None,
                    help="with --submission: the metrics JSON to write")
    ev.add_argument("--retrieval", type=Path, default=Path("data/retrieval"),
                    help="retrieve's output folder (default: %(default)s)")
    ev.add_argument("--live", type=Path, default=Path("metrics/evaluate"),
                    help="the stage's DVCLive folder (default: %(default)s)")
    ev.set_defaults(func=cmd_evaluate)

    rep = stages.add_parser(
        "report", help="the headline: mAP@100 per backbone, plain and reranked",
        description="Print mAP@100 (all, public, private) of each backbone with and without "
                    "the Landmark-Country rerank (the ensemble's too when there are several "
                    "backbones) and the submission's, from METRICS. `make repro` ends with it; "
                    "`dvc metrics show` has every number, the counts of metrics/prepare.json "
                    "and metrics/shard.json included.")
    rep.add_argument("--metrics", type=Path, default=Path("metrics/evaluate/metrics.json"),
                     help="glr evaluate's output (default: %(default)s)")
    rep.set_defaults(func=cmd_report)

    vis = stages.add_parser(
        "visualize", help="a picture of queries and their top results",
        description="Draw the first QUERIES validation queries (by id) with their TOP best index "
                    "images of the final ranking, framed green (ground truth) or red. Reads: "
                    "RETRIEVAL, SHARDS (query and eval_index groups), the solution CSV under "
                    "params data.root. Writes with DVCLive: LIVE/plots/images/retrieval.png "
                    "(`dvc plots show`).")
    _add_params(vis)
    vis.add_argument("--retrieval", type=Path, default=Path("data/retrieval"),
                     help="retrieve's output folder (default: %(default)s)")
    vis.add_argument("--shards", type=Path, default=Path("data/shards"),
                     help="shard folder (default: %(default)s)")
    vis.add_argument("--live", type=Path, default=Path("metrics/visualize"),
                     help="the stage's DVCLive folder (default: %(default)s)")
    vis.add_argument("--queries", type=int, default=8, help="rows (default: %(default)s)")
    vis.add_argument("--top", type=int, default=8, help="results per row (default: 8)")
    vis.set_defaults(func=cmd_visualize)

    que = stages.add_parser(
        "query", help="search the trained system with photos: top index images, landmarks",
        description="Embed each PHOTO with every backbone's extraction model (the pipeline's "
                    "own preprocessing: shard resize, square resize, normalization), search "
                    "the cached index features, apply the Landmark-Country rerank with the "
                    "index tags `glr retrieve` stored and the cached reference features, and "
                    "print per photo the TOP index images of the ensemble and the most likely "
                    "GLDv2 landmark ids with scores. Every readable photo is answered; an "
                    "unreadable one (missing, empty, not an image, corrupt) is named with its "
                    "problem in an error line and keeps its place in the output: `not "
                    "answered: PROBLEM` in the text, {\"photo\": PATH, \"error\": PROBLEM} in "
                    "--json. Exit status 2 only when no photo could be read. A photo under 32 px "
                    "on a side is answered with a warning. The network computes in params "
                    "train.precision. Reads: MODELS, FEATURES, RETRIEVAL/tags, LABELS (and "
                    "SHARDS for --out). Run `dvc repro` first.")
    _add_params(que)
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
    que.add_argument("--retrieval", type=Path, default=Path("data/retrieval"),
                     help="retrieve's output folder, for its index tags (default: %(default)s)")
    que.add_argument("--labels", type=Path, default=Path("data/prepared/labels.parquet"),
                     help="label → landmark id table (default: %(default)s)")
    que.add_argument("--shards", type=Path, default=Path("data/shards"),
                     help="shard folder, for the pictures of --out (default: %(default)s)")
    que.set_defaults(func=cmd_query)

    check = stages.add_parser(
        "check", help="check the params file: the pipeline's first stage",
        description="Validate the whole params file (unknown keys, types, ranges, the recipe's "
                    "phases and backbones) and write OUT, whose bytes never change. Every other "
                    "stage depends on OUT, so DVC runs this first: a bad `dvc exp run -S` value "
                    "stops here, before DVC deletes any stage's outputs. Reads: params only.")
    _add_params(check)
    check.add_argument("--out", type=Path, default=Path("data/params.checked"),
                       help="the mark the other stages depend on (default: %(default)s)")
    check.set_defaults(func=cmd_check)

    plan = stages.add_parser(
        "plan", help="print the resolved training plan: every backbone's phases",
        description="Resolve params train.phases (defaults per phase) and train.recipe "
                    "(per backbone: where a phase starts, what it changes) into the settings "
                    "each backbone trains with, in order: list, size, pad, batch, epochs, lr, "
                    "weight_decay, warmup_epochs, sampler, arcface_s, arcface_m, init. Check a "
                    "recipe with it before spending GPU days on it. Reads: params only.")
    _add_params(plan)
    plan.add_argument("--json", action="store_true",
                      help='JSON: {"<backbone>": {"<phase>": {...}}}; init is {"phase": name '
                           'or "pretrained", "epoch": N or null}')
    plan.set_defaults(func=cmd_plan)

    bench = stages.add_parser("bench", help="benchmarks (results written to files)")
    benches = bench.add_subparsers(dest="bench", required=True, metavar="<benchmark>")
    bench_prep = benches.add_parser(
        "prepare", help="time and peak memory of `prepare` on GLDv2-sized metadata",
        description="Generate metadata CSVs of real GLDv2 size (4,132,914 train rows, 203,094 "
                    "landmarks, 761,757 index images), run `glr prepare` on them in a "
                    "subprocess and write its wall time and peak memory to OUT.")
    bench_prep.add_argument("--scale", type=float, default=1.0,
                            help="fraction of GLDv2's size to generate (default: 1.0)")
    bench_prep.add_argument("--out", type=Path, default=Path("metrics/bench/prepare.json"),
                            help="result file (default: %(default)s)")
    bench_prep.add_argument("--workdir", type=Path, default=None,
                            help="where the generated CSVs go (default: a temporary folder)")
    bench_prep.set_defaults(func=cmd_bench_prepare)

    bench_load = benches.add_parser(
        "loader", help="training-loader images/s per core: glr shards vs the authors' way",
        description="Generate GLDv2-like photos, shard them (resize cover and fit), then time "
                    "glr's training stream (draft decode, uint8 augmentation, batched "
                    "normalization) against an authors'-style loader (cv2.imread + cv2.resize "
                    "of the original JPEG + torchvision transforms) on one core, at sizes 256 "
                    "and 512, in alternating rounds. Writes OUT.")
    bench_load.add_argument("--out", type=Path, default=Path("metrics/bench/loader.json"),
                            help="result file (default: %(default)s)")
    bench_load.add_argument("--image-size", type=_image_size, default=(800, 600),
                            metavar="WxH", help="generated photo size (default: 800x600)")
    bench_load.add_argument("--images", type=int, default=256,
                            help="images per loader per round (default: %(default)s)")
    bench_load.add_argument("--rounds", type=int, default=3,
                            help="alternating rounds; medians are reported (default: 3)")
    bench_load.add_argument("--workdir", type=Path, default=None,
                            help="where the generated data goes (default: a temporary folder)")
    bench_load.set_defaults(func=cmd_bench_loader)

    bench_ext = benches.add_parser(
        "extract", help="extraction images/s: `glr extract`'s loop vs the model alone",
        description="Generate GLDv2-like photos and shard them, then time `glr extract`'s own "
                    "loop (shards -> DataLoader workers -> normalization -> channels_last "
                    "forward in the stage's precision -> float16 features per shard) against "
                    "the same model's forward on a batch held in memory, at the same batch and "
                    "size, in alternating rounds after a warm-up; a model with random weights "
                    "(nothing is downloaded). Reports the median rates, their ratio (target "
                    ">= 0.9), threads, CPU (bf16/AMX), GPU and torch versions. Writes OUT.")
    bench_ext.add_argument("--out", type=Path, default=Path("metrics/bench/extract.json"),
                           help="result file (default: %(default)s)")
    bench_ext.add_argument("--backbone", default=None,
                           help="timm backbone (default: the first of params model.backbones' "
                                "default, resnet18)")
    bench_ext.add_argument("--size", type=int, default=None,
                           help="input side in pixels (default: params model.size's default)")
    bench_ext.add_argument("--batch", type=int, default=None,
                           help="batch size (default: params extract.batch's default)")
    bench_ext.add_argument("--images", type=int, default=1024,
                           help="images per side per round, rounded up to whole batches "
                                "(default: %(default)s)")
    bench_ext.add_argument("--rounds", type=int, default=3,
                           help="alternating rounds; medians are reported (default: 3)")
    bench_ext.add_argument("--workers", type=int, default=None,
                           help="DataLoader workers (default: params extract.workers' default)")
    bench_ext.add_argument("--max-side", type=int, default=None,
                           help="shard.max_side of the generated shards, at least --size "
                                "(default: params shard.max_side's default)")
    bench_ext.add_argument("--image-size", type=_image_size, default=(800, 600),
                           metavar="WxH", help="generated photo size (default: 800x600)")
    bench_ext.add_argument("--workdir", type=Path, default=None,
                           help="where the generated data goes (default: a temporary folder)")
    bench_ext.set_defaults(func=cmd_bench_extract)

    bench_gpu = benches.add_parser(
        "gpu", help="GPUs: training, extraction, 1M-reference retrieval rates, DDP scaling",
        description="On one NVIDIA GPU: (a) training steps of recipes/gldv2-r50-256.yaml's "
                    "phase p1 (ResNet50, 256 px, batch 128, fp16 + channels_last) through the "
                    "real loader vs from a batch in GPU memory; (b) `glr bench extract`'s "
                    "comparison with the recipe's model and size; (c) "
                    "glr.rerank.reference_neighbors for 1,129 queries and 50,000 index images "
                    "against 1,000,000 random references (reported as not available without "
                    "that API). Writes OUT with the card, torch and CUDA versions, each rate "
                    "and the ratios; (d) with several GPUs, (a)'s steps under torchrun with 1 "
                    "then N processes (DDP) and the scaling ratio. Without a GPU it says so "
                    "and writes nothing; --dry-run runs every part on the CPU at toy sizes.")
    bench_gpu.add_argument("--out", type=Path, default=Path("metrics/bench/gpu.json"),
                           help="result file (default: %(default)s)")
    bench_gpu.add_argument("--dry-run", action="store_true",
                           help="every part on the CPU at toy sizes (ResNet18, 64 px, a few "
                                "steps, 3,000 references): checks the code path, not speed")
    bench_gpu.add_argument("--workers", type=int, default=None,
                           help="DataLoader workers (default: CPU count - 1; 0 in a dry run)")
    bench_gpu.add_argument("--workdir", type=Path, default=None,
                           help="where the generated data goes (default: a temporary folder)")
    bench_gpu.add_argument("--gpus", type=int, default=None,
                           help="processes of the scaling part (d), one per GPU (default: "
                                "every visible GPU; 1 skips it; in a dry run, CPU processes "
                                "over gloo, default 1)")
    bench_gpu.set_defaults(func=cmd_bench_gpu)

    bench_def = benches.add_parser(
        "default", help="the embedded default over several synth seeds (~30 min on 2 cores)",
        description="Runs the whole pipeline (`dvc repro`, as `make repro`) once per synth seed, "
                    "each in a fresh DVC project with this repository's dvc.yaml, params.yaml "
                    "and src/, and writes OUT: each seed's plain and reranked mAP@100 and wall "
                    "time, their means and spread, and the targets (plain >= 0.40 on average, "
                    "rerank +0.05, spread <= 0.08, each run <= 10 min). Run it from the "
                    "repository root.")
    bench_def.add_argument("--out", type=Path, default=Path("metrics/bench/default.json"),
                           help="result file (default: %(default)s)")
    bench_def.add_argument("--seeds", type=int, nargs="+", default=[2021, 7, 11],
                           help="synth.seed values, one pipeline run each (default: "
                                "%(default)s)")
    bench_def.add_argument("--workdir", type=Path, default=None,
                           help="where the runs' projects go, kept (default: a temporary "
                                "folder, removed)")
    bench_def.add_argument("--keep", action="store_true",
                           help="keep the temporary folder of the runs")
    bench_def.set_defaults(func=cmd_bench_default)

    bench_ret = benches.add_parser(
        "retrieve", help="the retrieve stage vs the authors' per-query procedure, and memory",
        description="On generated clustered float16 features (the extract layout), time "
                    "`glr.retrieve.main` and a transcription of the authors' procedure (their "
                    "per-query part on --sample queries, scaled), each in its own process; "
                    "compare the top-100 rows, peak RSS, and the time the products alone need "
                    "at this machine's measured GEMM rate (the floor). Then run the stage with "
                    "4 backbones at a scaled GLDv2 shape and check its memory model. Targets: "
                    ">= 3x the authors', >= 99%% identical rows, <= 1.5x the floor, peak RSS "
                    "<= reference bytes + 2 GB. Writes OUT.")
    bench_ret.add_argument("--out", type=Path, default=Path("metrics/bench/retrieve.json"),
                           help="result file (default: %(default)s)")
    bench_ret.add_argument("--references", type=int, nargs="+", default=[200_000, 1_000_000],
                           help="reference counts to compare at (default: 200000 1000000)")
    bench_ret.add_argument("--queries", type=int, default=200, help="default: %(default)s")
    bench_ret.add_argument("--index", type=int, default=20_000, help="default: %(default)s")
    bench_ret.add_argument("--dim", type=int, default=512, help="default: %(default)s")
    bench_ret.add_argument("--sample", type=int, default=20,
                           help="queries the authors' per-query part is timed on "
                                "(default: %(default)s)")
    bench_ret.add_argument("--memory-index", type=int, default=190_000,
                           help="index images of the 4-backbone memory check (0: skip it; "
                                "default: %(default)s, a quarter of GLDv2's)")
    bench_ret.add_argument("--memory-references", type=int, default=10_000,
                           help="references of the memory check (default: %(default)s)")
    bench_ret.add_argument("--workdir", type=Path, default=None,
                           help="where the generated features go (default: a temporary folder)")
    bench_ret.add_argument("--precision", dest="precisions", nargs="+",
                           choices=["float32", "bfloat16", "float16"],
                           default=["float32", "bfloat16", "float16"],
                           help="retrieve.precision values: each is timed in the stage where "
                                "this CPU computes it natively (float32; bfloat16 with AMX / "
                                "AVX-512 BF16), and each is counted (candidates per row, rows "
                                "redone) at the accounting shape (default: all three)")
    bench_ret.add_argument("--accounting", type=int, nargs=3, default=[200, 2_000, 20_000],
                           metavar=("QUERIES", "INDEX", "REFERENCES"),
                           help="shape of the per-precision counts, small enough for emulated "
                                "kernels (0 0 0: skip; default: 200 2000 20000)")
    bench_ret.set_defaults(func=cmd_bench_retrieve)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # its CPU-feature probing
    try:
        args.func(args)
    except UserError as err:
        log.error("%s", err)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
