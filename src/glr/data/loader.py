"""Webdataset pipelines over the shards, for training and for feature extraction.

Both read shard lists from the manifests `glr shard` wrote and know about DDP ranks and
DataLoader workers (through webdataset's `pytorch_worker_info`: RANK/WORLD_SIZE from torchrun,
or an initialized process group).

- `TrainStream`, mode `epoch` (softmax sampling): every epoch the list's shards are shuffled
  with a seed shared by all ranks and dealt out rank by rank, then worker by worker, so ranks
  read disjoint shards; a shuffle buffer mixes samples across the shards a worker reads.
- `TrainStream`, mode `mix` (continent-aware sampling): each group is an endless resampled
  stream with its own shuffle buffer; each sample is drawn from group g with probability p_g.
- The epoch (`set_epoch`) is shared with the DataLoader workers, so they can be kept across
  epochs (`persistent_workers=True`): a worker reads it each time its iterator starts.
- Batches are assembled in the workers; each rank yields exactly `batches_per_epoch` batches
  (split over its workers), so every rank runs the same number of steps; random streams are
  seeded by (seed, epoch, rank, worker): different on every rank and worker, the same on a
  rerun.
- `ExtractStream`: every sample of given shards once, shards split across ranks and workers,
  each sample tagged with its shard number and position for a deterministic reassembly.
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
    """Training batches (uint8 images (B, 3, S, S), labels (B,)) from shard groups.

    Every rank yields exactly `batches_per_epoch` batches of `batch_size` (its DataLoader
    workers split them), so all DDP ranks run the same number of steps. `probs` switches from
    shuffled epochs to the group mix; `pk_instances` assembles P×K batches (id_uniform).
    """

    def __init__(self, shard_dir: Path, groups: list[str],
                 transform: Callable[[bytes, random.Random], torch.Tensor],
                 batch_size: int, batches_per_epoch: int, *, probs: list[float] | None = None,
                 pk_instances: int | None = None, seed: int = 0, shuffle_buffer: int = 1000):
        super().__init__()
        if probs is not None and len(probs) != len(groups):
            raise ValueError("one probability per group is needed")
        if pk_instances is not None and batch_size % pk_instances:
            raise ValueError(f"batch size {batch_size} is not a multiple of K={pk_instances}")
        self.shard_dir = Path(shard_dir)
        self.groups = list(groups)
        self.transform = transform
        self.batch_size = batch_size
        self.batches_per_epoch = batches_per_epoch
        self.probs = probs
        self.pk_instances = pk_instances
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer
        # in shared memory: persistent DataLoader workers read the epoch the parent sets
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()
        self.urls = {group: shard_urls(self.shard_dir, [group]) for group in self.groups}

    def set_epoch(self, epoch: int) -> None:
        """Call before each epoch's DataLoader iterator is made (as with DistributedSampler).
        The value lives in shared memory, so workers kept across epochs
        (`persistent_workers=True`) see it when their next iterator starts."""
        self._epoch.fill_(epoch)

    @property
    def epoch(self) -> int:
        return int(self._epoch)

    def _epoch_samples(self, rank: int, world: int, worker: int, workers: int,
                       rng: random.Random) -> Iterator[dict]:
        for cycle in itertools.count():
            urls = [url for group in self.groups for url in self.urls[group]]
            random.Random(stream_seed(self.seed, self.epoch, cycle)).shuffle(urls)
            mine = urls[rank::world][worker::workers]
            if not mine:  # fewer shards than readers: fall back to one shard each
                mine = [urls[(rank * workers + worker) % len(urls)]]
            yield from wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer // 10,
                                   rng=rng)(_samples(mine))

    def _mixed_samples(self, rank: int, worker: int, rng: random.Random) -> Iterator[dict]:
        streams = []
        for number, group in enumerate(self.groups):
            seed = stream_seed(self.seed, self.epoch, rank, worker, number)
            shards = wds.ResampledShards(self.urls[group], seed=seed, deterministic=True,
                                         worker_seed=lambda: 0)
            # the buffers share `shuffle_buffer` by probability: ~40 groups × a full buffer
            # each would hold tens of thousands of JPEGs per worker on GLDv2
            size = max(16, round(self.shuffle_buffer * (self.probs or [])[number]))
            buffer = wds.shuffle(size, initial=max(1, size // 10), rng=random.Random(seed))
            streams.append(iter(buffer(wds.tarfile_samples(iter(shards)))))
        return mix(streams, self.probs or [], rng)

    def samples(self, rank: int, world: int, worker: int, workers: int
                ) -> Iterator[tuple[torch.Tensor, int]]:
        """This reader's endless stream of transformed (image, label) samples."""
        rng = random.Random(stream_seed(self.seed, self.epoch, rank, worker, -1))
        if self.probs is None:
            raw = self._epoch_samples(rank, world, worker, workers, rng)
        else:
            raw = self._mixed_samples(rank, worker, rng)
        for sample in raw:
            yield self.transform(sample["jpg"], rng), json.loads(sample["json"])["label"]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        from glr.data.samplers import pk_batches

        rank, world, worker, workers = pytorch_worker_info()
        count = share(self.batches_per_epoch, worker, workers)
        if not any(self.urls.values()):
            raise ValueError(f"{self.shard_dir}: groups {self.groups} have no shards")
        samples = self.samples(rank, world, worker, workers)
        if self.pk_instances is not None:
            rng = random.Random(stream_seed(self.seed, self.epoch, rank, worker, -2))
            batches = pk_batches(samples, self.batch_size // self.pk_instances,
                                 self.pk_instances, rng, self.shuffle_buffer)
            yield from itertools.islice(batches, count)
            return
        for _ in range(count):
            images, labels = zip(*itertools.islice(samples, self.batch_size), strict=True)
            yield torch.stack(images), torch.tensor(labels)

    def __len__(self) -> int:
        """Batches per epoch on this rank."""
        return self.batches_per_epoch

    def reader_bytes(self, image_side: int, prefetch: int = 2) -> int:
        """Host memory one reader (a DataLoader worker, or the process itself without workers)
        holds at most: its shuffle buffer(s) of raw JPEGs (the groups' mean shard bytes per
        sample), the P×K pool of decoded images (id_uniform) and `prefetch` finished batches.
        """
        samples = sum(read_manifest(self.shard_dir, g)["samples"] for g in self.groups)
        jpeg = sum(read_manifest(self.shard_dir, g)["bytes"] for g in self.groups) / max(1, samples)
        if self.probs is None:
            buffered = self.shuffle_buffer
        else:  # as `_mixed_samples` sizes them
            buffered = sum(max(16, round(self.shuffle_buffer * p)) for p in self.probs)
        image = 3 * image_side * image_side  # uint8, after the transform
        pool = self.shuffle_buffer * image if self.pk_instances is not None else 0
        return round(buffered * jpeg + pool + prefetch * self.batch_size * image)


class ExtractStream(IterableDataset):
    """Every sample of some shards once, as (uint8 image, shard number, position, meta JSON).

    `urls` are split across ranks, then workers; the shard number is the index into `urls`, so
    a caller can put every feature back in a fixed order whatever the process layout. With
    `batch_size`, it yields batches (images stacked, numbers, positions, metas) that never
    span two shards: each shard is then computed in the same batches whatever the process
    layout or a resume, so the same kernels see the same inputs and give the same features.
    """

    def __init__(self, urls: list[str], transform: Callable[[bytes], torch.Tensor],
                 split_by_rank: bool = True, batch_size: int | None = None):
        super().__init__()
        self.urls = list(urls)
        self.transform = transform
        self.split_by_rank = split_by_rank  # False: the caller gave this rank its own urls
        self.batch_size = batch_size

    def __iter__(self) -> Iterator[tuple]:
        rank, world, worker, workers = pytorch_worker_info()
        if not self.split_by_rank:
            rank, world = 0, 1
        numbers = list(range(len(self.urls)))[rank::world][worker::workers]
        for number in numbers:
            samples = ((self.transform(sample["jpg"]), number, position,
                        sample["json"].decode())
                       for position, sample in enumerate(_samples([self.urls[number]])))
            if self.batch_size is None:
                yield from samples
                continue
            while batch := list(itertools.islice(samples, self.batch_size)):
                images, shard_numbers, positions, metas = zip(*batch, strict=True)
                yield (torch.stack(images), torch.tensor(shard_numbers),
                       torch.tensor(positions), list(metas))
