"""Stage `extract`: features of the validation queries, the evaluation index and the reference
set, with a backbone's last-phase model; the cached features are DVC-tracked artifacts.

Writes `data/features/<backbone>/`:

    query.npy, index.npy, ref.npy      float16 (N, D), L2-normalized rows
    query.parquet, index.parquet       id (row order of the matching .npy)
    ref.parquet                        id, label, country, continent
    info.json                          model folder, size, scales, counts

Batched, in training's precision (`train.precision`: fp32, bf16, or auto: fp16 on CUDA, bf16
on a CPU with native bfloat16, else fp32; logged as `precision: …`), channels_last, DataLoader
workers (at most the node's CPUs per process), features copied to the host one batch behind
the device; optional multi-scale (e.g. 0.707, 1, 1.414: side rounded down to a multiple of 16,
features averaged then re-normalized). Under torchrun each rank
extracts a disjoint set of shards. Every finished shard is saved at once under
`runs/extract/<backbone>/<fingerprint>/`, so an interrupted run resumes where it stopped;
rank 0 then assembles the parts in shard order, so the result does not depend on the number of
processes or workers.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader

from glr import files, shards
from glr.data import EvalTransform, ExtractStream, normalize
from glr.model.folder import WEIGHTS, file_digest, load_model
from glr.params import Params
from glr.progress import progress_bar
from glr.runtime import (
    Dist,
    LaunchError,
    available_cpus,
    cpu_kernels_name,
    local_processes,
    pin_cpu_kernels,
    precision_context,
    precision_name,
    relaunch_under_torchrun,
    resolve_precision,
    setup_distributed,
    worker_fit,
)

log = logging.getLogger(__name__)

SETS = ("query", "index", "ref")
SET_NAMES = {"query": "query", "index": "index", "ref": "reference"}
FORMAT = 2  # bump when the parts or features written for the same inputs change


def set_groups(shard_dir: Path, sets: tuple[str, ...] = SETS) -> dict[str, list[str]]:
    """The shard groups of each feature set in `sets` (the references' from the shard lists,
    read only when asked for)."""
    groups = {"query": ["query"], "index": ["eval_index"]}
    if "ref" in sets:
        groups["ref"] = shards.read_lists(shard_dir)["reference"]
    return {name: groups[name] for name in sets}


def scaled_sides(size: int, scales: list[float]) -> list[int]:
    """Input side per scale: size × scale rounded down to a multiple of 16 (size itself at 1)."""
    return [size if scale == 1.0 else max(16, int(size * scale) // 16 * 16) for scale in scales]


def embed(model: torch.nn.Module, images: torch.Tensor, sides: list[int], autocast
          ) -> torch.Tensor:
    """L2-normalized features of a normalized float batch, averaged over input sides."""
    total = None
    for side in sides:
        batch = images if side == images.shape[-1] else F.interpolate(
            images, size=(side, side), mode="bilinear", align_corners=False, antialias=True)
        with autocast:
            features = model(batch.contiguous(memory_format=torch.channels_last)).float()
        features = F.normalize(features, dim=1)
        total = features if total is None else total + features
    assert total is not None
    return F.normalize(total, dim=1)


def fingerprint(model_dir: Path, size: int, scales: list[float], precision: str = "fp32",
                device: str = "cpu") -> str:
    """The parts' folder name: parts made with other weights, sizes, scales, precision (the
    resolved one: fp32, bf16, fp16) or device kind are never mixed into one result."""
    blob = json.dumps({"weights": file_digest(model_dir / WEIGHTS), "size": size,
                       "scales": scales, "format": FORMAT, "precision": precision,
                       "device": device}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def extract_parts(model: torch.nn.Module, urls: list[str], counts: list[int], parts: Path,
                  size: int, scales: list[float], batch: int, workers: int, env: Dist,
                  desc: str, precision: str = "fp32") -> None:
    """Features of every shard in `urls` not yet in `parts`; one .npy + .json per shard."""
    parts.mkdir(parents=True, exist_ok=True)
    mine = list(range(len(urls)))[env.rank::env.world]
    todo = [n for n in mine if not (parts / f"{n:06d}.npy").is_file()]
    if len(todo) < len(mine):
        log.info("%s: resuming: %d of %d shard parts already extracted in %s, %d to go", desc,
                 len(mine) - len(todo), len(mine), parts, len(todo))
    for number in [n for n in todo if counts[n] == 0]:  # every image of the shard was bad
        _save_part(parts, number, [], dim=0)
    todo = [n for n in todo if counts[n] > 0]
    if not todo:
        return
    # Batches within a shard: a resumed or distributed run computes each shard in the same
    # batches as a single uninterrupted one, so its features are the same bytes.
    stream = ExtractStream([urls[n] for n in todo], EvalTransform(size), split_by_rank=False,
                           batch_size=batch)
    loader = DataLoader(stream, batch_size=None, num_workers=workers,
                        pin_memory=env.device.type == "cuda")
    autocast, _ = precision_context(env.device, precision)
    sides = scaled_sides(size, scales)
    pending: dict[int, list[tuple[int, np.ndarray, str]]] = {}
    bar = progress_bar(total=sum(counts[n] for n in todo), desc=desc, unit="img",
                       disable=not env.main)

    def computed() -> Iterator[tuple]:
        for images, numbers, positions, metas in loader:
            images = normalize(images.to(env.device, non_blocking=True))
            yield embed(model, images, sides, autocast), numbers, positions, metas

    with torch.inference_mode():
        for features, numbers, positions, metas in host_features(computed()):
            for row, (local, position) in enumerate(zip(numbers.tolist(), positions.tolist(),
                                                        strict=True)):
                number = todo[local]
                pending.setdefault(number, []).append((position, features[row], metas[row]))
                if len(pending[number]) == counts[number]:
                    _save_part(parts, number, pending.pop(number))
            bar.update(len(features))
    bar.close()
    if pending:
        raise RuntimeError(f"incomplete shards {sorted(pending)} in {parts}: the shards hold "
                           "fewer samples than their manifests say")


def host_features(batches: Iterator[tuple]) -> Iterator[tuple]:
    """(features on the device, *rest) → (float16 numpy features, *rest), one batch behind on
    a GPU: batch n's copy to the host starts without waiting, and batch n is handed on once
    batch n + 1 is queued, so the host never waits for the device between batches (a `.cpu()`
    per batch would). The float16 rounding happens on the device (half the bytes to copy; the
    same round-to-nearest-even as numpy's)."""
    waiting = None
    for features, *rest in batches:
        host = features.to(torch.float16).to("cpu", non_blocking=True)  # pinned on CUDA
        done = None
        if features.is_cuda:
            done = torch.cuda.Event()
            done.record()
        if waiting is not None:
            yield _on_host(*waiting)
        waiting = (host, done, rest)
    if waiting is not None:
        yield _on_host(*waiting)


def _on_host(host: torch.Tensor, done, rest: list) -> tuple:
    if done is not None:
        done.synchronize()  # the copy has landed
    return (host.numpy(), *rest)


PART_SCHEMA = pa.schema([("id", pa.string()), ("label", pa.int64()),
                         ("country", pa.string()), ("continent", pa.string())])


def _save_part(parts: Path, number: int, rows: list[tuple[int, np.ndarray, str]],
               dim: int | None = None) -> None:
    """One shard's features (.npy) and id table (.parquet; label/country empty for queries)."""
    rows.sort(key=lambda row: row[0])
    metas = [json.loads(r[2]) for r in rows]
    table = pa.table({name: pa.array([m.get(name) for m in metas], type=field.type)
                      for name, field in zip(PART_SCHEMA.names, PART_SCHEMA, strict=True)})
    pq.write_table(table, parts / f"{number:06d}.parquet")
    features = (np.stack([r[1] for r in rows]) if rows
                else np.zeros((0, dim or 0), dtype=np.float16))
    with files.atomic(parts / f"{number:06d}.npy", suffix=".npy") as tmp:
        np.save(tmp, features)  # last: a .npy marks a finished shard


def check_parts(parts: Path, num_shards: int, world: int) -> None:
    """Every shard's part is in `parts` before rank 0 assembles them: with several nodes, a
    rank writes its parts into its own node's runs folder, so they meet only on a shared
    filesystem."""
    missing = [n for n in range(num_shards) if not (parts / f"{n:06d}.npy").is_file()
               or not (parts / f"{n:06d}.parquet").is_file()]
    if missing:
        owners = sorted({n % world for n in missing})
        raise LaunchError(
            f"{parts}: {len(missing)} of {num_shards} shard parts are missing (e.g. "
            f"{missing[0]:06d}.npy, written by rank {missing[0] % world}; ranks "
            f"{', '.join(map(str, owners[:8]))}{' …' if len(owners) > 8 else ''}): the runs "
            "folder must be on a filesystem every node shares (docs/machines.md)")


def assemble(parts: Path, num_shards: int, out_npy: Path, out_table: Path,
             columns: list[str], dim: int) -> int:
    """Concatenate the parts in shard order into one float16 .npy and one id table, part by
    part (4.9M reference rows never pass through Python objects or one big array)."""
    tables = [pq.read_table(parts / f"{number:06d}.parquet") for number in range(num_shards)]
    counts = [t.num_rows for t in tables]
    with files.atomic(out_npy, suffix=".npy") as tmp:
        matrix = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16,
                                           shape=(sum(counts), dim))
        row = 0
        for number, count in enumerate(counts):
            if count:
                matrix[row: row + count] = np.load(parts / f"{number:06d}.npy")
            row += count
        matrix.flush()
        del matrix
    table = pa.concat_tables(tables).select(columns)
    pq.write_table(table, out_table)
    return sum(counts)


def last_phase(params: Params, backbone: str) -> str:
    """The phase whose model `extract` uses by default: the backbone's last one."""
    return params.plan(backbone)[-1].name


def main(params: Params, backbone: str, shard_dir: Path, models_dir: Path, out_dir: Path,
         runs_dir: Path, phase: str | None = None, argv: list[str] | None = None,
         sets: tuple[str, ...] = SETS) -> dict:
    """Features of `sets` (query, index, ref) with MODELS/<backbone>/<phase>; the feature
    counts per set on the main process, {} on the others."""
    unknown = sorted(set(sets) - set(SETS))
    if unknown or not sets:
        raise ValueError(f"feature sets must be some of {', '.join(SETS)}, got {list(sets)}")
    settings = params.extract
    pin_cpu_kernels(params.train.cpu_kernels, params.train.cpu_threads)
    if settings.processes > 1 and "LOCAL_RANK" not in os.environ and argv is not None:
        relaunch_under_torchrun(settings.processes, argv)
    env = setup_distributed(params.train.timeout_minutes)
    if env.main:
        log.info("cpu: %s", cpu_kernels_name(params.train.cpu_kernels))
    try:
        phase = phase or settings.phase or last_phase(params, backbone)
        return _extract(params, backbone, Path(shard_dir), Path(models_dir), Path(out_dir),
                        Path(runs_dir), phase, env, sets)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _extract(params: Params, backbone: str, shard_dir: Path, models_dir: Path, out_dir: Path,
             runs_dir: Path, phase: str, env: Dist, sets: tuple[str, ...] = SETS) -> dict:
    settings = params.extract
    model_dir = models_dir / backbone / phase
    model, config = load_model(model_dir)
    model = model.to(env.device, memory_format=torch.channels_last).eval()
    size = params.model.size
    precision = params.train.precision
    resolved = resolve_precision(env.device, precision)
    key = fingerprint(model_dir, size, settings.scales, resolved, env.device.type)
    work = runs_dir / "extract" / backbone / key
    if env.main:
        log.info("%s: extracting with %s at %d px (scales %s) on %d process(es); parts in %s",
                 backbone, model_dir, size, settings.scales, env.world, work)
        log.info("precision: %s", precision_name(env.device, precision))
    # the features do not depend on the worker count (batches never span two shards, and
    # parts are filed by shard): more workers than the node's CPUs hold would only compete
    workers = min(settings.workers, worker_fit(local_processes(), available_cpus()))
    if workers < settings.workers and env.local_rank == 0:
        log.info("extract.workers %d capped to %d: %d process(es) share %d CPU(s) on this "
                 "node", settings.workers, workers, local_processes(), available_cpus())
    groups = set_groups(shard_dir, sets)
    shards.check_size(shard_dir, [g for name in sets for g in groups[name]], size,
                      "model.size (the extraction size)")
    parts: dict[str, Path] = {}
    for name in sets:
        entries = [(g, e) for g in groups[name] for e in shards.read_manifest(shard_dir, g)
                   ["shards"]]
        urls = shards.shard_urls(shard_dir, groups[name])  # the same order as `entries`
        counts = [e["samples"] for _, e in entries]
        # parts belong to these very shards: a changed evaluation set gets new parts
        content = hashlib.sha256(json.dumps([e["sha256"] for _, e in entries]).encode())
        parts[name] = work / f"{name}-{content.hexdigest()[:16]}"
        extract_parts(model, urls, counts, parts[name], size, settings.scales, settings.batch,
                      workers, env, desc=f"{backbone} {name}", precision=precision)
    if dist.is_initialized():
        dist.barrier()
    summary: dict = {}
    if env.main:
        out_dir.mkdir(parents=True, exist_ok=True)
        dim = config["model"]["embedding_dim"]
        for name in sets:
            num_shards = sum(len(shards.read_manifest(shard_dir, g)["shards"])
                             for g in groups[name])
            columns = ["id", "label", "country", "continent"] if name == "ref" else ["id"]
            check_parts(parts[name], num_shards, env.world)
            summary[name] = assemble(parts[name], num_shards, out_dir / f"{name}.npy",
                                     out_dir / f"{name}.parquet", columns, dim)
        info = {"backbone": backbone, "model": str(model_dir), "phase": phase, "size": size,
                "scales": settings.scales, "dim": dim, "counts": summary,
                "processes": env.world, "precision": resolved}
        (out_dir / "info.json").write_text(json.dumps(info, indent=2) + "\n")
        log.info("%s: %s -> %s", backbone, ", ".join(
            f"{summary[name]} {SET_NAMES[name]} features" for name in sets), out_dir)
    return summary
