"""The parsers of `glr bench …` (results written to files): one per benchmark module."""

from __future__ import annotations

import argparse
from pathlib import Path

from glr.commands.common import image_size


def cmd_bench_prepare(args: argparse.Namespace) -> None:
    from benchmarks import prepare as bench_prepare

    bench_prepare.main(scale=args.scale, out=args.out, workdir=args.workdir)


def cmd_bench_loader(args: argparse.Namespace) -> None:
    from benchmarks import loader as bench_loader

    bench_loader.main(out=args.out, image_size=args.image_size, count=args.images,
                      rounds=args.rounds, workdir=args.workdir)


def cmd_bench_extract(args: argparse.Namespace) -> None:
    from benchmarks import extract as bench_extract

    bench_extract.main(out=args.out, backbone=args.backbone, size=args.size, batch=args.batch,
                       images=args.images, rounds=args.rounds, workers=args.workers,
                       max_side=args.max_side, image_size=args.image_size,
                       workdir=args.workdir)


def cmd_bench_retrieve(args: argparse.Namespace) -> None:
    from benchmarks import retrieve as bench_retrieve

    bench_retrieve.main(out=args.out, references=args.references, queries=args.queries,
                        index=args.index, dim=args.dim, sample=args.sample,
                        memory_index=args.memory_index,
                        memory_references=args.memory_references, workdir=args.workdir,
                        precisions=args.precisions, accounting_shape=tuple(args.accounting))


def cmd_bench_gpu(args: argparse.Namespace) -> None:
    from benchmarks import gpu as bench_gpu

    bench_gpu.main(out=args.out, dry_run=args.dry_run, workers=args.workers,
                   workdir=args.workdir, gpus=args.gpus)


def cmd_bench_default(args: argparse.Namespace) -> None:
    from benchmarks import default as bench_default

    bench_default.main(out=args.out, seeds=args.seeds, logs=args.logs)


def cmd_bench_beyond(args: argparse.Namespace) -> None:
    from benchmarks import beyond as bench_beyond

    bench_beyond.main(out=args.out, seeds=args.seeds, logs=args.logs, losses=args.losses)


def add_parser(subparsers) -> None:
    """Register `glr bench` and its benchmarks under `glr`."""
    bench = subparsers.add_parser("bench", help="benchmarks (results written to files)")
    benches = bench.add_subparsers(dest="bench", required=True, metavar="<benchmark>")
    _add_prepare(benches)
    _add_loader(benches)
    _add_extract(benches)
    _add_gpu(benches)
    _add_default(benches)
    _add_beyond(benches)
    _add_retrieve(benches)


# The arguments several benchmarks share.
def _out(parser: argparse.ArgumentParser, name: str) -> None:
    parser.add_argument("--out", type=Path, default=Path(f"metrics/bench/{name}.json"),
                        help="result file (default: %(default)s)")


def _workdir(parser: argparse.ArgumentParser, what: str = "data") -> None:
    parser.add_argument("--workdir", type=Path, default=None,
                        help=f"folder for the generated {what} (default: a temporary folder)")


def _rounds(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rounds", type=int, default=3,
                        help="alternating rounds; medians are reported (default: 3)")


def _photo_size(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--image-size", type=image_size, default=(800, 600), metavar="WxH",
                        help="generated photo size (default: 800x600)")


def _seeds_and_logs(parser: argparse.ArgumentParser, name: str, what: str) -> None:
    parser.add_argument("--seeds", type=int, nargs="+", default=[2021, 7, 11],
                        help=f"synth.seed values, {what} (default: %(default)s)")
    parser.add_argument("--logs", type=Path, default=Path(f"metrics/bench/{name}-logs"),
                        help="each run's log (default: %(default)s)")


def _add_beyond(benches) -> None:
    from benchmarks.beyond import LOSSES

    bench_beyond = benches.add_parser(
        "beyond", help="the 1st place's loss and SuperGlobal vs the authors' (~35 min on 2 cores)",
        description="On the embedded default, per synth seed, two DVC experiments with "
                    "retrieve.superglobal on: the authors' ArcFace and the 1st place's "
                    "(s 45, 3 sub-centers, dynamic margins [0.05, 0.5]); each scores plain, "
                    "Landmark-Country rerank, SuperGlobal and both. Writes OUT: each run's "
                    "mAP@100, the means per loss and ranking, and the differences (1st "
                    "place's loss minus the authors', SuperGlobal minus the LC rerank). Run it "
                    "from the repository root.")
    _out(bench_beyond, "beyond")
    _seeds_and_logs(bench_beyond, "beyond", "one experiment per loss each")
    bench_beyond.add_argument("--losses", nargs="+", choices=list(LOSSES), default=list(LOSSES),
                              help="which losses to run (default: all)")
    bench_beyond.set_defaults(func=cmd_bench_beyond)


def _add_prepare(benches) -> None:
    bench_prep = benches.add_parser(
        "prepare", help="time and peak memory of `prepare` on GLDv2-sized metadata",
        description="Generate metadata CSVs of real GLDv2 size (4,132,914 train rows, 203,094 "
                    "landmarks, 761,757 index images), run `glr prepare` on them in a "
                    "subprocess and write its wall time and peak memory to OUT.")
    bench_prep.add_argument("--scale", type=float, default=1.0,
                            help="fraction of GLDv2's size to generate (default: 1.0)")
    _out(bench_prep, "prepare")
    _workdir(bench_prep, "CSVs")
    bench_prep.set_defaults(func=cmd_bench_prepare)


def _add_loader(benches) -> None:
    bench_load = benches.add_parser(
        "loader", help="training-loader images/s per core: glr shards vs the authors' way",
        description="Generate GLDv2-like photos, shard them (resize cover and fit), then time "
                    "glr's training stream (draft decode, uint8 augmentation, batched "
                    "normalization) against an authors'-style loader (cv2.imread + cv2.resize "
                    "of the original JPEG + torchvision transforms) on one core, at sizes 256 "
                    "and 512, in alternating rounds. Writes OUT.")
    _out(bench_load, "loader")
    _photo_size(bench_load)
    bench_load.add_argument("--images", type=int, default=256,
                            help="images per loader per round (default: %(default)s)")
    _rounds(bench_load)
    _workdir(bench_load)
    bench_load.set_defaults(func=cmd_bench_loader)


def _add_extract(benches) -> None:
    bench_ext = benches.add_parser(
        "extract", help="extraction images/s: `glr extract`'s loop vs the model alone",
        description="Generate GLDv2-like photos and shard them, then time `glr extract`'s own "
                    "loop (shards -> DataLoader workers -> normalization -> channels_last "
                    "forward in the stage's precision -> float16 features per shard) against "
                    "the same model's forward on a batch held in memory, at the same batch and "
                    "size, in alternating rounds after a warm-up; a model with random weights "
                    "(nothing is downloaded). Reports the median rates, their ratio (target "
                    ">= 0.9), threads, CPU (bf16/AMX), GPU and torch versions. Writes OUT.")
    _out(bench_ext, "extract")
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
    _rounds(bench_ext)
    bench_ext.add_argument("--workers", type=int, default=None,
                           help="DataLoader workers (default: params extract.workers' default)")
    bench_ext.add_argument("--max-side", type=int, default=None,
                           help="shard.max_side of the generated shards, at least --size "
                                "(default: params shard.max_side's default)")
    _photo_size(bench_ext)
    _workdir(bench_ext)
    bench_ext.set_defaults(func=cmd_bench_extract)


def _add_gpu(benches) -> None:
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
    _out(bench_gpu, "gpu")
    bench_gpu.add_argument("--dry-run", action="store_true",
                           help="every part on the CPU at toy sizes (ResNet18, 64 px, a few "
                                "steps, 3,000 references): checks the code path, not speed")
    bench_gpu.add_argument("--workers", type=int, default=None,
                           help="DataLoader workers (default: CPU count - 1; 0 in a dry run)")
    _workdir(bench_gpu)
    bench_gpu.add_argument("--gpus", type=int, default=None,
                           help="processes of the scaling part (d), one per GPU (default: "
                                "every visible GPU; 1 skips it; in a dry run, CPU processes "
                                "over gloo, default 1)")
    bench_gpu.set_defaults(func=cmd_bench_gpu)


def _add_default(benches) -> None:
    bench_def = benches.add_parser(
        "default", help="the embedded default over several synth seeds (~15 min on 2 cores)",
        description="Runs the whole pipeline once per synth seed as a DVC experiment of this "
                    "repository (`dvc exp run --temp --force --name bench-default-seed-SEED -S "
                    "synth.seed=SEED`: a temporary copy of the workspace, every stage run; "
                    "`dvc exp show` lists them) and writes OUT: each seed's mAP@100 with the "
                    "starting weights, plain and reranked, and wall time, their means, gains and "
                    "spreads, and issue 19's targets (plain >= 0.50 on average, rerank +0.10, "
                    "training +0.25 over the starting weights, spread <= 0.08, each run <= 10 "
                    "min). Run it from the repository root.")
    _out(bench_def, "default")
    _seeds_and_logs(bench_def, "default", "one pipeline run each")
    bench_def.set_defaults(func=cmd_bench_default)


def _add_retrieve(benches) -> None:
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
    _out(bench_ret, "retrieve")
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
    _workdir(bench_ret, "features")
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
