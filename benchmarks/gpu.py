"""`glr bench gpu`: a GPU's training, extraction and retrieval rates, and training's scaling
over the node's GPUs, in under 10 minutes.

Three parts, on generated data (photos by `glr synth`, sharded by `glr shard`'s writer at the
recipe's size; see `benchmarks.extract.make_shards`):

(a) training: steps of the quick recipe's phase p1 (recipes/gldv2-r50-256.yaml: ResNet50 at
    256 px, batch 128, SGD, ArcFace over GLDv2's 81,313 clean landmarks, fp16 autocast +
    GradScaler, channels_last), each `glr.train.train_step`, the stage's own step:
    - loader: batches from `TrainStream` (the recipe's augmentation) in DataLoader workers;
    - memory: one uint8 batch held on the GPU, the same step on it.
    One DataLoader serves every round, its workers kept across rounds as the stage keeps them
    across epochs; each round is a new epoch, whose first steps refill the shuffle buffers
    and are not timed, since an epoch amortizes them over thousands of steps. Target:
    loader ≥ 0.9 × memory.
(b) extraction: `glr bench extract`'s comparison (`benchmarks.extract.compare`) of the stage's
    loop against the model alone, with the recipe's backbone, size and extraction batch.
(c) retrieval at GLDv2 scale: `glr.rerank.reference_neighbors` for 1,129 queries and a
    50,000-image index against 1,000,000 references (random unit-norm float16 rows of 512),
    k = 30, on `glr.search.select_backend(device="cuda")`, with its candidates per row and
    rows redone (`glr.search.SearchStats`). Reported as not available when
    that API is missing (it is imported only here).

(d) with `--gpus N` (default: every visible GPU; 1 skips it): the steps of (a) under torchrun,
    with 1 process and then with N (DDP over nccl), and the scaling ratio
    (`benchmarks.scaling`).

Rounds of (a) and (b) alternate between their two sides; medians are reported, with ratios.
Results go to metrics/bench/gpu.json. Without a GPU the command says so and writes nothing,
unless --dry-run, which runs every part on the CPU at toy sizes (ResNet18, 64 px, a few steps,
a few thousand references) so that tests exercise the whole code path.

Needs torch, timm, numpy, pandas, pyarrow, Pillow and webdataset (the shard reader); not dvc;
no faiss: on a GPU `glr.search` runs torch, and imports faiss only for its CPU float32
backend.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from benchmarks import extract as bench_extract
from benchmarks import scaling as bench_scaling

log = logging.getLogger(__name__)

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "gldv2-r50-256.yaml"
GLDV2_CLEAN_LANDMARKS = 81_313  # the recipe's classes in phase p1 (train_clean.csv)


@dataclasses.dataclass(frozen=True)
class Sizes:
    """What each part measures."""

    backbone: str
    size: int
    pad: int
    train_batch: int
    lr: float
    weight_decay: float
    classes: int | None  # None: the labels of the generated data
    warm_steps: int  # per round, not timed
    steps: int  # per round, timed
    shuffle_buffer: int  # samples per DataLoader worker
    extract_batch: int
    extract_images: int  # per round
    distinct_images: int  # generated photos (the shards repeat beyond them)
    photo_size: tuple[int, int]  # of the generated photos, before sharding
    rounds: int
    workers: int
    queries: int
    index: int
    references: int
    dim: int
    k_neighbors: int
    device: str


def full_sizes(workers: int | None = None) -> Sizes:
    """The recipe's phase p1 and extraction settings, at GLDv2's retrieval scale."""
    from glr.params import load_params

    recipe = load_params(RECIPE)
    backbone = recipe.model.backbones[0]
    phase = recipe.phase_plan(backbone, "p1")
    workers = workers if workers is not None else max(1, (os.cpu_count() or 2) - 1)
    return Sizes(backbone=backbone, size=phase.size, pad=phase.settings.pad,
                 train_batch=phase.settings.batch, lr=phase.settings.lr,
                 weight_decay=phase.settings.weight_decay, classes=GLDV2_CLEAN_LANDMARKS,
                 warm_steps=20, steps=100, shuffle_buffer=recipe.train.shuffle_buffer,
                 extract_batch=recipe.extract.batch, extract_images=recipe.extract.batch * 400,
                 distinct_images=recipe.extract.batch * max(16, workers),
                 photo_size=(800, 600), rounds=3,
                 workers=workers, queries=1_129, index=50_000, references=1_000_000,
                 dim=recipe.model.embedding_dim, k_neighbors=30, device="cuda")


def dry_sizes(workers: int | None = None) -> Sizes:
    """Toy sizes for the CPU: every code path, in seconds."""
    return Sizes(backbone="resnet18", size=64, pad=4, train_batch=4, lr=0.01,
                 weight_decay=5e-4, classes=None, warm_steps=1, steps=2, shuffle_buffer=16,
                 extract_batch=8, extract_images=16, distinct_images=16,
                 photo_size=(96, 72), rounds=1,
                 workers=0 if workers is None else workers, queries=20, index=500,
                 references=3_000, dim=512, k_neighbors=30, device="cpu")


# --------------------------------------------------------------------------- (a) training


def time_training(sizes: Sizes, shard_dir: Path, device: torch.device) -> dict:
    """Training images/s through the real loader versus from a batch held on the device."""
    from torch.utils.data import DataLoader

    from glr import shards
    from glr.data import TrainStream, TrainTransform
    from glr.model import build_model, param_groups
    from glr.runtime import precision_context
    from glr.train import RunningStats, train_step

    groups = [bench_extract.GROUP]
    classes = sizes.classes or 1 + shards.read_manifest(shard_dir, groups[0])["max_label"]
    torch.manual_seed(0)
    model = build_model(sizes.backbone, classes, pretrained=False)
    model = model.to(device, memory_format=torch.channels_last).train()
    optimizer = torch.optim.SGD(param_groups(model, sizes.lr, sizes.weight_decay), lr=sizes.lr,
                                momentum=0.9)
    autocast, scaler = precision_context(device, "auto")
    criterion = torch.nn.CrossEntropyLoss()
    batch, steps = sizes.train_batch, sizes.warm_steps + sizes.steps
    stream = TrainStream(shard_dir, groups, TrainTransform(sizes.size, sizes.pad),
                         batch_size=batch, batches_per_epoch=steps, seed=0,
                         shuffle_buffer=sizes.shuffle_buffer)

    def run(batches) -> float:
        """Images/s of the timed steps (after the warm ones) over an iterator of batches."""
        stats, start, number = RunningStats(device), time.perf_counter(), -1
        for number, (images, labels) in enumerate(batches):
            if number == sizes.warm_steps:
                bench_extract.synchronize(device)
                start = time.perf_counter()
            labels = labels.to(device, non_blocking=True)
            loss, logits = train_step(model, images, labels, criterion, optimizer, scaler,
                                      autocast)
            stats.add(loss, logits, labels)  # as the stage's loop: no host read per step
        stats.read()  # waits for the last step
        if number + 1 != steps:
            raise RuntimeError(f"the loader gave {number + 1} batches, not {steps}")
        return sizes.steps * batch / (time.perf_counter() - start)

    epochs = iter(range(1_000_000))
    kept = DataLoader(stream, batch_size=None, num_workers=sizes.workers,
                      pin_memory=device.type == "cuda", persistent_workers=sizes.workers > 0)

    def loader() -> float:
        stream.set_epoch(next(epochs))  # other samples each round, as each epoch
        return run(kept)

    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (batch, 3, sizes.size, sizes.size), dtype=torch.uint8,
                           generator=generator).to(device)
    labels = torch.randint(0, classes, (batch,), generator=generator).to(device)

    def memory() -> float:
        return run((images, labels) for _ in range(steps))

    memory()  # warm-up: kernel choice, the allocator, GradScaler's first scales
    result = bench_extract.alternate(sizes.rounds, {"loader": loader, "memory": memory})
    return {"backbone": sizes.backbone, "size": sizes.size, "batch": batch,
            "classes": classes, "steps": sizes.steps, "warm_steps": sizes.warm_steps,
            "images": sizes.steps * batch, "workers": sizes.workers, "rounds": sizes.rounds,
            **result}


# --------------------------------------------------------------------------- (c) retrieval


def unit_rows(rows: int, dim: int, generator: torch.Generator, device: torch.device,
              chunk: int = 100_000) -> np.ndarray:
    """Random unit-norm float16 rows, made `chunk` rows at a time on `device`."""
    out = np.empty((rows, dim), dtype=np.float16)
    for first in range(0, rows, chunk):
        count = min(chunk, rows - first)
        block = torch.randn(count, dim, generator=generator, device=device)
        out[first: first + count] = torch.nn.functional.normalize(block, dim=1).half().cpu()
    return out


def time_retrieval(sizes: Sizes, device: torch.device) -> dict:
    """Seconds of `reference_neighbors` at the given sizes; not available without the API."""
    try:
        from glr import rerank, search

        reference_neighbors, select_backend = rerank.reference_neighbors, search.select_backend
    except (ImportError, AttributeError) as err:
        log.warning("retrieval: not available (%s: %s)", type(err).__name__, err)
        return {"status": "not available", "reason": f"{type(err).__name__}: {err}"}
    generator = torch.Generator(device=device).manual_seed(0)
    queries, index, references = (unit_rows(n, sizes.dim, generator, device)
                                  for n in (sizes.queries, sizes.index, sizes.references))
    backend = select_backend(device=sizes.device)
    log.info("retrieval: %d queries, %d index, %d references × %d on %s", sizes.queries,
             sizes.index, sizes.references, sizes.dim, backend.name)
    bench_extract.synchronize(device)
    start = time.perf_counter()
    result = reference_neighbors(queries, index, references, k_neighbors=sizes.k_neighbors,
                                 backend=backend)
    bench_extract.synchronize(device)
    seconds = time.perf_counter() - start
    shapes = {name: list(np.shape(getattr(result, name)))
              for name in ("index_nearest", "query_neighbors")}
    log.info("retrieval: %.2f s (%.0f references/s); %s", seconds, sizes.references / seconds,
             backend.stats.describe())
    return {"status": "ok", "backend": backend.name, "queries": sizes.queries,
            "index": sizes.index, "references": sizes.references, "dim": sizes.dim,
            "k_neighbors": sizes.k_neighbors, "seconds": round(seconds, 4),
            # from the reported seconds, so that the two agree (a test recomputes it)
            "references_per_s": round(sizes.references / round(seconds, 4), 1),
            "shapes": shapes,
            # candidates per row and rows redone of the exact re-scoring (glr.search)
            "search": backend.stats.summary()}


# --------------------------------------------------------------------------- the command


def timed(name: str, part: Callable[[], dict]) -> dict:
    start = time.perf_counter()
    result = part()
    log.info("%s: done in %.1f s", name, time.perf_counter() - start)
    return {**result, "wall_s": round(time.perf_counter() - start, 1)}


def scaling_processes(gpus: int | None, dry_run: bool, visible: int) -> int:
    """The processes of part (d): --gpus, by default every visible GPU (1 in a dry run: the
    part is skipped unless asked for); more than the visible GPUs is a one-line error."""
    from glr.runtime import LaunchError

    if gpus is None:
        return 1 if dry_run else visible
    if gpus < 1:
        raise LaunchError(f"--gpus {gpus}: at least 1")
    if not dry_run and gpus > visible:
        raise LaunchError(f"--gpus {gpus}: torch sees {visible} GPU(s) on this node")
    return gpus


def main(out: Path, dry_run: bool = False, workers: int | None = None,
         workdir: Path | None = None, gpus: int | None = None) -> dict | None:
    """Run (a), (b), (c), (d) and write OUT; without a GPU (and no dry run) only say so."""
    if not dry_run and not torch.cuda.is_available():
        log.warning("no GPU: torch sees no CUDA device; nothing measured, nothing written "
                    "(--dry-run runs every part on the CPU at toy sizes)")
        return None
    processes = scaling_processes(gpus, dry_run,
                                  torch.cuda.device_count() if not dry_run else 0)
    sizes = dry_sizes(workers) if dry_run else full_sizes(workers)
    device = torch.device("cuda:0" if sizes.device == "cuda" else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)  # cuDNN settings left as the stages leave them
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="glr-bench-gpu-") as tmp:
        work = Path(workdir) if workdir else Path(tmp)
        shard_dir = timed("data", lambda: {"shards": str(bench_extract.make_shards(
            work, sizes.distinct_images, sizes.extract_batch, sizes.size, sizes.photo_size,
            workers=max(1, sizes.workers)))})["shards"]
        training = timed("training", lambda: time_training(sizes, Path(shard_dir), device))
        extractor = bench_extract.build_extractor(sizes.backbone, device, sizes.dim)
        extraction = timed("extraction", lambda: bench_extract.compare(
            extractor, Path(shard_dir), sizes.extract_images, sizes.size, sizes.extract_batch,
            sizes.workers, sizes.rounds, device, work))
        scaling = (timed("scaling", lambda: bench_scaling.measure(
            sizes, Path(shard_dir), processes, work)) if processes > 1
            else {"status": "skipped", "reason": "one GPU (--gpus N runs N processes)"})
    retrieval = timed("retrieval", lambda: time_retrieval(sizes, device))
    result = {
        "benchmark": "gpu", "dry_run": dry_run,
        "card": torch.cuda.get_device_name(device) if device.type == "cuda" else "none (CPU)",
        "torch": torch.__version__, "cuda": torch.version.cuda,
        "training": training, "extraction": extraction, "retrieval": retrieval,
        "scaling": scaling,
        "wall_s": round(time.perf_counter() - started, 1),
        "machine": bench_extract.machine_info(device),
    }
    log.info("training %.1f images/s through the loader, %.1f from memory: ratio %.3f",
             training["rates_per_s"]["loader"], training["rates_per_s"]["memory"],
             training["ratio"])
    log.info("extraction %.1f images/s through the loader, %.1f forward only: ratio %.3f",
             extraction["rates_per_s"]["extract"], extraction["rates_per_s"]["forward"],
             extraction["ratio"])
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    log.info("-> %s", out)
    return result
