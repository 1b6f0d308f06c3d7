"""`glr bench gpu --gpus N`, part (d): data-parallel training over a node's GPUs.

The same training steps as part (a) (`glr.train.train_step` on `TrainStream` batches in
DataLoader workers, the recipe's per-process batch), run by torchrun with 1 process, then with
N (one per GPU, DistributedDataParallel over nccl). Each run's throughput is every rank's
images over the slowest rank's seconds; the scaling ratio is N processes' throughput over N
times one process's (1.0: perfect). Both runs read the same shards, side by side in one call.

A dry run does the same on the CPU (gloo, toy sizes), so the tests run the torchrun path.
Run as a module by the parent: `python -m torch.distributed.run ... -m benchmarks.scaling
--sizes SIZES.json --shards DIR --out RESULT.json`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


def rank_run(sizes, shard_dir: Path, workers: int) -> dict:
    """This rank's timed steps under DDP; returns its images and seconds."""
    from torch.utils.data import DataLoader

    from benchmarks import extract as bench_extract
    from glr import shards
    from glr.data import TrainStream, TrainTransform
    from glr.model import build_model, param_groups
    from glr.runtime import precision_context, setup_distributed
    from glr.train import RunningStats, train_step

    env = setup_distributed(timeout_minutes=10)
    group = bench_extract.GROUP
    classes = sizes.classes or 1 + shards.read_manifest(shard_dir, group)["max_label"]
    torch.manual_seed(0)
    model = build_model(sizes.backbone, classes, pretrained=False)
    model = model.to(env.device, memory_format=torch.channels_last).train()
    net = model
    if env.world > 1:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[env.device.index] if env.device.type == "cuda" else None)
    optimizer = torch.optim.SGD(param_groups(model, sizes.lr, sizes.weight_decay), lr=sizes.lr,
                                momentum=0.9)
    autocast, scaler = precision_context(env.device, "auto")
    criterion = torch.nn.CrossEntropyLoss()
    steps = sizes.warm_steps + sizes.steps
    stream = TrainStream(shard_dir, [group], TrainTransform(sizes.size, sizes.pad),
                         batch_size=sizes.train_batch, batches_per_epoch=steps, seed=0,
                         shuffle_buffer=sizes.shuffle_buffer)
    loader = DataLoader(stream, batch_size=None, num_workers=workers,
                        pin_memory=env.device.type == "cuda")
    stats, start, number = RunningStats(env.device), time.perf_counter(), -1
    for number, (images, labels) in enumerate(loader):
        if number == sizes.warm_steps:
            bench_extract.synchronize(env.device)
            if env.world > 1:
                dist.barrier()  # every rank starts its clock together
            start = time.perf_counter()
        labels = labels.to(env.device, non_blocking=True)
        loss, logits = train_step(net, images, labels, criterion, optimizer, scaler, autocast)
        stats.add(loss, logits, labels)
    stats.read()
    seconds = time.perf_counter() - start
    if number + 1 != steps:
        raise RuntimeError(f"rank {env.rank}: the loader gave {number + 1} batches, not {steps}")
    mine = {"rank": env.rank, "device": str(env.device), "images": sizes.steps * sizes.train_batch,
            "seconds": seconds}
    ranks: list = [None] * env.world
    if env.world > 1:
        dist.all_gather_object(ranks, mine)
        dist.destroy_process_group()
    else:
        ranks = [mine]
    return {"processes": env.world, "workers": workers, "ranks": ranks}


def throughput(run: dict) -> float:
    """Every rank's images over the slowest rank's seconds."""
    return sum(r["images"] for r in run["ranks"]) / max(r["seconds"] for r in run["ranks"])


def summarize(runs: dict[int, dict]) -> dict:
    """Images/s of each run, per process, and the scaling ratio of the largest run."""
    out: dict = {"runs": {}}
    for processes, run in sorted(runs.items()):
        rate = throughput(run)
        out["runs"][str(processes)] = {
            "processes": processes, "workers_per_process": run["workers"],
            "images_per_s": round(rate, 2), "images_per_s_per_process": round(rate / processes, 2),
            "per_rank_images_per_s": [round(r["images"] / r["seconds"], 2)
                                      for r in run["ranks"]]}
    many = max(runs)
    out["processes"] = many
    out["scaling"] = round(throughput(runs[many]) / (many * throughput(runs[1])), 3)
    return out


def measure(sizes, shard_dir: Path, processes: int, work: Path) -> dict:
    """torchrun with 1, then `processes` processes over the same shards; the summary."""
    from glr.runtime import available_cpus, worker_fit

    work.mkdir(parents=True, exist_ok=True)
    spec = work / "scaling-sizes.json"
    spec.write_text(json.dumps(dataclasses.asdict(sizes)))
    environ = dict(os.environ)
    if sizes.device == "cpu":
        environ["GLR_MACHINE"] = "plain-cpu"  # a dry run stays on the CPU, GPU or not
    runs = {}
    for count in sorted({1, processes}):
        # as many workers as the node's CPUs hold, shared by the processes (the part (a) count
        # at most), so that the runs compare GPUs, not CPU contention
        workers = min(sizes.workers, worker_fit(count, available_cpus()))
        out = work / f"scaling-{count}.json"
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   f"--nproc_per_node={count}", "-m", "benchmarks.scaling", "--sizes", str(spec),
                   "--shards", str(shard_dir), "--workers", str(workers), "--out", str(out)]
        log.info("scaling: %d process(es): %s", count, " ".join(command))
        subprocess.run(command, check=True, env=environ)
        runs[count] = json.loads(out.read_text())
    result = summarize(runs)
    log.info("scaling: %s; ratio %.3f", ", ".join(
        f"{r['processes']} process(es) {r['images_per_s']:.1f} images/s"
        for r in result["runs"].values()), result["scaling"])
    return result


def main(argv: list[str] | None = None) -> None:
    from benchmarks.gpu import Sizes

    parser = argparse.ArgumentParser(prog="python -m benchmarks.scaling",
                                     description="one rank of `glr bench gpu`'s part (d)")
    parser.add_argument("--sizes", type=Path, required=True)
    parser.add_argument("--shards", type=Path, required=True)
    parser.add_argument("--workers", type=int, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    fields = json.loads(args.sizes.read_text())
    fields["photo_size"] = tuple(fields["photo_size"])
    result = rank_run(Sizes(**fields), args.shards, args.workers)
    if int(os.environ.get("RANK", "0")) == 0:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    main()
