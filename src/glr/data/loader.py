"""Webdataset pipelines over the shards, for training and for feature extraction.

Both read shard lists from the manifests `glr shard` wrote and know about DDP ranks and
DataLoader workers (through webdataset's `pytorch_worker_info`: RANK/WORLD_SIZE from torchrun,
or an initialized process group).

- `TrainStream`, mode `epoch` (softmax sampling): every epoch the list's shards are shuffled
  with a seed shared by all ranks and dealt out rank by rank, then worker by worker, so ranks
  read disjoint shards; a shuffle buffer mixes samples across the shards a worker reads.
- `TrainStream`, mode `mix` (continent-aware sampling): each group is an endless resampled
  stream with its own shuffle buffer; each sample is drawn from group g with probability p_g.
- Each rank yields exactly `samples_per_epoch / world_size` samples per epoch (split over its
  workers), so every rank runs the same number of steps; random streams are seeded by
  (seed, epoch, rank, worker): different on every rank and worker, the same on a rerun.
- `ExtractStream`: every sample of the groups once, shards split across ranks and workers.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import random
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import webdataset as wds
from torch.utils.data import IterableDataset
from webdataset.utils import pytorch_worker_info

from glr.shards import read_manifest, shard_urls


def stream_seed(*parts: int) -> int:
    """A 63-bit seed from integers, stable across processes and Python versions."""
    blob = json.dumps(parts).encode()
    return int(hashlib.sha256(blob).hexdigest()[:16], 16) >> 1


def share(total: int, part: int, parts: int) -> int:
    """How many of `total` items part `part` of `parts` takes (the first ones take the rest)."""
    return total // parts + (1 if part < total % parts else 0)


def _samples(urls: list[str]) -> Iterator[dict]:
    return wds.tarfile_samples({"url": url} for url in urls)


def mix(streams: list[Iterator[dict]], probs: list[float], rng: random.Random
        ) -> Iterator[dict]:
    """Draw each next sample from stream i with probability probs[i] (streams are endless)."""
    cumulative = list(itertools.accumulate(probs))
    while True:
        index = min(len(streams) - 1, _bisect(cumulative, rng.random() * cumulative[-1]))
        yield next(streams[index])


def _bisect(cumulative: list[float], value: float) -> int:
    lo, hi = 0, len(cumulative)
    while lo < hi:
        mid = (lo + hi) // 2
        if cumulative[mid] <= value:
            lo = mid + 1
        else:
            hi = mid
    return lo


class TrainStream(IterableDataset):
    """(uint8 image, label) training samples from shard groups; see the module doc."""

    def __init__(self, shard_dir: Path, groups: list[str],
                 transform: Callable[[bytes, random.Random], torch.Tensor],
                 samples_per_epoch: int, *, probs: list[float] | None = None, seed: int = 0,
                 shuffle_buffer: int = 1000):
        super().__init__()
        if probs is not None and len(probs) != len(groups):
            raise ValueError("one probability per group is needed")
        self.shard_dir = Path(shard_dir)
        self.groups = list(groups)
        self.transform = transform
        self.samples_per_epoch = samples_per_epoch
        self.probs = probs
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer
        self.epoch = 0
        self.urls = {group: shard_urls(self.shard_dir, [group]) for group in self.groups}

    def set_epoch(self, epoch: int) -> None:
        """Call before each epoch's DataLoader iterator is made (as with DistributedSampler)."""
        self.epoch = epoch

    def _epoch_samples(self, rank: int, world: int, worker: int, workers: int,
                       rng: random.Random) -> Iterator[dict]:
        for cycle in itertools.count():
            urls = [url for group in self.groups for url in self.urls[group]]
            random.Random(stream_seed(self.seed, self.epoch, cycle)).shuffle(urls)
            mine = urls[rank::world][worker::workers]
            if not mine:  # fewer shards than readers: fall back to a seeded share of all
                mine = [urls[(rank * workers + worker) % len(urls)]]
            yield from wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer // 10,
                                   rng=rng)(_samples(mine))

    def _mixed_samples(self, rank: int, worker: int, rng: random.Random) -> Iterator[dict]:
        streams = []
        for number, group in enumerate(self.groups):
            seed = stream_seed(self.seed, self.epoch, rank, worker, number)
            shards = wds.ResampledShards(self.urls[group], seed=seed, deterministic=True,
                                         worker_seed=lambda: 0)
            group_rng = random.Random(seed)
            streams.append(iter(wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer
                                            // 10, rng=group_rng)(
                wds.tarfile_samples(iter(shards)))))
        return mix(streams, self.probs or [], rng)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, int]]:
        rank, world, worker, workers = pytorch_worker_info()
        rng = random.Random(stream_seed(self.seed, self.epoch, rank, worker, -1))
        if self.probs is None:
            samples = self._epoch_samples(rank, world, worker, workers, rng)
        else:
            samples = self._mixed_samples(rank, worker, rng)
        count = share(share(self.samples_per_epoch, rank, world), worker, workers)
        for sample in itertools.islice(samples, count):
            meta = json.loads(sample["json"])
            yield self.transform(sample["jpg"], rng), meta["label"]

    def __len__(self) -> int:
        """Samples per epoch on this rank (what a DataLoader over this dataset yields)."""
        rank, world, _, _ = pytorch_worker_info()
        return share(self.samples_per_epoch, rank, world)


class ExtractStream(IterableDataset):
    """Every sample of the groups once, as (uint8 image, id); shards split by rank, worker."""

    def __init__(self, shard_dir: Path, groups: list[str],
                 transform: Callable[[bytes], torch.Tensor]):
        super().__init__()
        self.urls = shard_urls(Path(shard_dir), list(groups))
        self.total = sum(read_manifest(Path(shard_dir), g)["samples"] for g in groups)
        self.transform = transform

    def __iter__(self) -> Iterator[tuple[torch.Tensor, str]]:
        rank, world, worker, workers = pytorch_worker_info()
        for sample in _samples(self.urls[rank::world][worker::workers]):
            meta = json.loads(sample["json"])
            yield self.transform(sample["jpg"]), meta["id"]
