"""The recipe's samplers on top of the group streams (method.md).

- softmax: plain shuffled epochs of the list (TrainStream's epoch mode).
- continent: each continent c gets probability p_c; within it, `clean_share` (66%) of the
  draws come from its clean groups and the rest from its noisy groups, each group in
  proportion to its size (TrainStream's mix mode with `continent_group_probs`).
- id_uniform (P×K): batches of P labels with K images each, assembled from a shuffled stream
  (`pk_batches`). On a stream this is an approximation: labels are picked among those with K
  images in the buffer, so the buffer must hold several images of many labels.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

import torch

from glr.params import ContinentParams

CONTINENT_KEYS = {"Asia": "asia", "Europe": "europe", "Africa": "africa",
                  "North America": "north_america", "South America": "south_america",
                  "Antarctica": "antarctica", "Oceania": "oceania", "OTHER": "other"}


def continent_group_probs(manifests: list[dict], params: ContinentParams) -> list[float]:
    """Probability of drawing from each group (manifest: continent, clean, samples).

    A continent's share is split clean_share / 1 − clean_share between its clean and noisy
    groups (all of it to one kind if the continent lacks the other), and within a kind in
    proportion to the groups' sizes. Continents without images drop out and the rest are
    renormalized.
    """
    probs = [0.0] * len(manifests)
    for continent, key in CONTINENT_KEYS.items():
        members = [i for i, m in enumerate(manifests) if m["continent"] == continent
                   and m["samples"] > 0]
        share = getattr(params, key)
        clean = [i for i in members if manifests[i]["clean"]]
        noisy = [i for i in members if not manifests[i]["clean"]]
        for kind, kind_share in ((clean, params.clean_share), (noisy, 1 - params.clean_share)):
            if not kind:
                continue
            if not clean or not noisy:
                kind_share = 1.0
            total = sum(manifests[i]["samples"] for i in kind)
            for i in kind:
                probs[i] = share * kind_share * manifests[i]["samples"] / total
    total = sum(probs)
    if total <= 0:
        raise ValueError("no group has images of a continent with a positive probability")
    return [p / total for p in probs]


def pk_batches(samples: Iterator[tuple[torch.Tensor, int]], labels_per_batch: int,
               instances: int, rng: random.Random, buffer_size: int
               ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless P×K batches (images stacked, labels) from a stream of (image, label)."""
    pool: dict[int, list[torch.Tensor]] = {}
    buffered = 0
    for image, label in samples:
        pool.setdefault(label, []).append(image)
        buffered += 1
        ready = [lb for lb, images in pool.items() if len(images) >= instances]
        if len(ready) < labels_per_batch and buffered < buffer_size:
            continue
        if len(ready) < labels_per_batch:  # buffer full: fill up with the fullest labels
            ready = sorted(pool, key=lambda lb: -len(pool[lb]))[:labels_per_batch]
        if len(ready) >= labels_per_batch:
            chosen = rng.sample(ready, labels_per_batch)
        else:  # the whole pool has fewer labels than a batch needs: repeat some
            chosen = [ready[i % len(ready)] for i in range(labels_per_batch)]
        images, targets = [], []
        for lb in chosen:
            available = pool.get(lb) or []
            if not available:  # a repeated label whose images this batch already took
                earlier = [img for img, t in zip(images, targets, strict=True) if t == lb]
                images += [earlier[i % len(earlier)] for i in range(instances)]
                targets += [lb] * instances
                continue
            taken = [available.pop(rng.randrange(len(available)))
                     for _ in range(min(instances, len(available)))]
            while len(taken) < instances:  # too few images: repeat some
                taken.append(taken[rng.randrange(len(taken))])
            images += taken
            targets += [lb] * instances
            if not available:
                del pool[lb]
        buffered = sum(len(v) for v in pool.values())
        yield torch.stack(images), torch.tensor(targets)
