"""glr.data: the transforms against torchvision's, and the loaders' splitting and mixing."""

from __future__ import annotations

import io
import json
import math
import random
import tarfile
from collections import Counter

import numpy as np
import pytest
import torch
import torchvision.transforms as T
from PIL import Image

from conftest import endless
from glr import shards
from glr.data import (
    EvalTransform,
    ExtractStream,
    TrainStream,
    TrainTransform,
    decode_resized,
    hflip,
    mix,
    normalize,
    pad_random_crop,
    random_erasing,
    share,
)
from glr.data.transforms import MEAN_PIXEL, STD

# float32 unit roundoff: every float32 operation is exact up to a relative 2^-24.
U32 = 2.0**-24


def jpeg(width: int, height: int, seed: int = 0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="JPEG", quality=95)
    return out.getvalue()


def test_decode_resized_is_square_uint8_chw():
    image = decode_resized(jpeg(160, 120), 64)
    assert image.shape == (3, 64, 64) and image.dtype == torch.uint8


def test_decode_draft_close_to_full_decode():
    """Draft decoding (1/2 scale here) changes pixels only a little against a full decode."""
    data = jpeg(256, 256)
    full = np.asarray(Image.open(io.BytesIO(data)).convert("RGB").resize(
        (64, 64), Image.Resampling.BILINEAR), dtype=float)
    drafted = decode_resized(data, 64).permute(1, 2, 0).numpy().astype(float)
    # random noise images: the hardest case. libjpeg-turbo and PIL work in integers (the SIMD
    # paths give the C code's bytes), so the mean (8.2) is a property of the image, the same
    # on any CPU; 12 is headroom against changes of the decoder, not a rounding tolerance.
    assert np.abs(full - drafted).mean() < 12


def test_hflip():
    image = torch.arange(12, dtype=torch.uint8).view(1, 3, 4)
    assert torch.equal(hflip(image, random.Random(0), p=1.0)[0, 0], torch.tensor([3, 2, 1, 0],
                                                                                 dtype=torch.uint8))
    assert torch.equal(hflip(image, random.Random(0), p=0.0), image)


def test_pad_random_crop_equals_pad_then_crop():
    image = torch.randint(1, 255, (3, 12, 10), dtype=torch.uint8)
    pad = 3
    padded = torch.nn.functional.pad(image, (pad, pad, pad, pad))
    for seed in range(20):
        rng = random.Random(seed)
        out = pad_random_crop(image, pad, rng)
        check = random.Random(seed)
        dy, dx = check.randint(-pad, pad), check.randint(-pad, pad)
        top, left = dy + pad, dx + pad
        assert torch.equal(out, padded[:, top: top + 12, left: left + 10])


def test_random_erasing_area_aspect_and_fill():
    # Each side of the box is rounded to whole pixels (±1/2), so for an area A in
    # [0.02, 0.2]·64² and an aspect r in [0.3, 1/0.3] the box covers A ± (√(Ar) + √(A/r))/2 + 1/4:
    # between 0.0174 and 0.2084 of the image, within the bounds below on any CPU.
    rng = random.Random(0)
    areas = []
    for _ in range(200):
        image = torch.zeros(3, 64, 64, dtype=torch.uint8)
        out = random_erasing(image, rng)
        mask = (out != 0).any(0)
        areas.append(mask.float().mean().item())
        ys, xs = torch.nonzero(mask, as_tuple=True)
        box = out[:, ys.min(): ys.max() + 1, xs.min(): xs.max() + 1]
        assert (box == torch.tensor(MEAN_PIXEL, dtype=torch.uint8).view(3, 1, 1)).all()
    assert min(areas) >= 0.015 and max(areas) <= 0.21


class ScriptedRng:
    """A stand-in for random.Random with scripted draws: uniform(a, b) = a + (b − a)·u for the
    next scripted u (CPython's formula), randint(a, b) = b, so a box lands in the bottom-right
    corner; it counts the draws and records randint's bounds."""

    def __init__(self, *us: float):
        self.us = list(us)
        self.draws = 0
        self.randint_bounds = []

    def uniform(self, a: float, b: float) -> float:
        self.draws += 1
        return a + (b - a) * self.us.pop(0)

    def random(self) -> float:
        return self.uniform(0.0, 1.0)

    def randint(self, a: int, b: int) -> int:
        self.draws += 1
        self.randint_bounds.append((a, b))
        return b


def erased_box(out: torch.Tensor) -> tuple[int, int, int, int]:
    """(top, left, h, w) of the one non-zero rectangle of a zero image."""
    mask = (out.numpy() != 0).any(0)
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    top, left, h, w = int(rows[0]), int(cols[0]), len(rows), len(cols)
    assert rows[-1] - top + 1 == h and cols[-1] - left + 1 == w and mask.sum() == h * w
    return top, left, h, w


# (u of the area, u of the aspect) → (h, w) on a 300 × 400 image (area 120,000), worked out by
# hand from the authors' rule: area = (0.02 + 0.18u)·120,000, aspect = 0.3 + (1/0.3 − 0.3)u,
# h = round(√(area·aspect)) rows, w = round(√(area/aspect)) columns. u = 0.5 tells the uniform
# aspect (1.8167: 155 × 85) from a log-uniform one (1: 115 × 115) and h from w.
@pytest.mark.parametrize(("us", "box"), [
    ((0.0, 0.0), (27, 89)),     # 2,400 px, aspect 0.3: √720 = 26.8, √8,000 = 89.4
    ((0.5, 0.5), (155, 85)),    # 13,200 px, aspect 1.8167: √23,980 = 154.9, √7,266 = 85.2
    ((1.0, 1.0), (283, 85)),    # 24,000 px, aspect 1/0.3: √80,000 = 282.8, √7,200 = 84.9
])
def test_random_erasing_box_follows_the_authors_rule(us, box):
    rng = ScriptedRng(0.0, *us)
    out = random_erasing(torch.zeros(3, 300, 400, dtype=torch.uint8), rng)
    h, w = box
    assert erased_box(out) == (300 - h, 400 - w, h, w)
    assert rng.randint_bounds == [(0, 300 - h), (0, 400 - w)]  # top first, both inclusive
    assert rng.draws == 1 + 2 + 2 and not rng.us  # p, area, aspect, top, left


def test_random_erasing_probability_compares_with_ge():
    """Skipped when the first draw is >= p (the authors' `uniform(0, 1) >= probability`)."""
    def erases(u: float, p: float) -> bool:
        rng = ScriptedRng(u, 0.0, 0.0)
        erased = bool(random_erasing(torch.zeros(3, 30, 40, dtype=torch.uint8), rng, p=p).any())
        assert rng.draws == (5 if erased else 1)
        return erased

    assert not erases(0.5, p=0.5) and erases(0.4999, p=0.5)
    assert erases(0.9999, p=1.0) and not erases(0.0, p=0.0)  # the recipe's p = 1: always


ASPECT_2 = (2 - 0.3) / (1 / 0.3 - 0.3)  # the u that gives aspect 2
ASPECT_HALF = (0.5 - 0.3) / (1 / 0.3 - 0.3)  # the u that gives aspect 0.5


# The smallest area (2 px of 100) with aspect 2 gives h = √4 = 2, w = 1; with aspect 0.5,
# h = 1, w = 2. A box as tall (or as wide) as the image does not fit: the next try is taken.
@pytest.mark.parametrize(("shape", "tie", "fit", "box"), [
    ((2, 50), (0.0, ASPECT_2), (0.0, 0.0), (1, 3)),       # h = H = 2; then aspect 0.3: 1 × 3
    ((50, 2), (0.0, ASPECT_HALF), (0.0, ASPECT_2), (2, 1)),  # w = W = 2; then aspect 2: 2 × 1
])
def test_random_erasing_box_must_be_strictly_smaller(shape, tie, fit, box):
    rng = ScriptedRng(0.0, *tie, *fit)
    out = random_erasing(torch.zeros(3, *shape, dtype=torch.uint8), rng)
    assert erased_box(out)[2:] == box and rng.draws == 1 + 2 + 2 + 2


# On a 2 × 50 image (area 100) a near-largest draw (20 px, aspect 3.33) gives an 8-row box: a
# miss.
MISS = (0.999, 0.999)
FIT = (0.0, 0.0)  # 2 px, aspect 0.3: 1 × 3


def test_random_erasing_tries_100_times():
    rng = ScriptedRng(0.0, *MISS * 99, *FIT)
    out = random_erasing(torch.zeros(3, 2, 50, dtype=torch.uint8), rng)
    assert erased_box(out) == (1, 47, 1, 3)
    assert rng.draws == 1 + 2 * 100 + 2


def test_random_erasing_gives_up_after_100_misses():
    rng = ScriptedRng(0.0, *MISS * 100, *FIT)
    out = random_erasing(torch.zeros(3, 2, 50, dtype=torch.uint8), rng)
    assert not out.any()
    assert rng.draws == 1 + 2 * 100 and rng.us == list(FIT)  # the 101st try is never drawn


def _max_cdf_gap(lower: np.ndarray, upper: np.ndarray, grid: np.ndarray,
                 cdf: np.ndarray) -> float:
    """The least distance by which the sample's CDF must leave `cdf` (its values on `grid`),
    knowing each value only to its interval [lower, upper]: #(value ≤ x) lies between
    #(upper ≤ x) and #(lower ≤ x)."""
    n = len(lower)
    at_least = np.searchsorted(np.sort(upper), grid, side="right") / n
    at_most = np.searchsorted(np.sort(lower), grid, side="right") / n
    return float(max((at_least - cdf).max(), (cdf - at_most).max(), 0.0))


def test_random_erasing_area_and_aspect_are_uniform():
    """Boxes of a seeded run, read back from the image: area fraction uniform in [0.02, 0.2],
    aspect uniform (not log-uniform) in [0.3, 1/0.3]."""
    height = width = 256
    n = 4000
    rng = random.Random(0)
    image = torch.zeros(1, height, width, dtype=torch.uint8)
    boxes = []
    for _ in range(n):
        top, left, h, w = erased_box(random_erasing(image, rng, fill=(255,)))
        boxes.append((h, w))
        image[:, top: top + h, left: left + w] = 0
    h, w = np.array(boxes, dtype=float).T
    # Rounding: |h − √(s·A·r)| ≤ 1/2 and |w − √(s·A/r)| ≤ 1/2 bound the drawn area fraction s
    # and aspect r to intervals (the product and the ratio of the two).
    area = height * width
    s_lo, s_hi = (h - 0.5) * (w - 0.5) / area, (h + 0.5) * (w + 0.5) / area
    r_lo, r_hi = (h - 0.5) / (w + 0.5), (h + 0.5) / (w - 0.5)
    assert (s_hi >= 0.02).all() and (s_lo <= 0.2).all()
    assert (r_hi >= 0.3).all() and (r_lo <= 1 / 0.3).all()
    # Dvoretzky–Kiefer–Wolfowitz: a sample of n from F leaves F by more than
    # ε = √(ln(2/α)/(2n)) with probability at most α; α = 1e-3 gives ε = 0.031 for n = 4,000.
    eps = math.sqrt(math.log(2 / 1e-3) / (2 * n))
    s_grid, r_grid = np.linspace(0.02, 0.2, 1001), np.linspace(0.3, 1 / 0.3, 1001)
    assert _max_cdf_gap(s_lo, s_hi, s_grid, (s_grid - 0.02) / 0.18) <= eps
    assert _max_cdf_gap(r_lo, r_hi, r_grid, (r_grid - 0.3) / (1 / 0.3 - 0.3)) <= eps
    # the check tells uniform from log-uniform (torchvision's) by far
    log_uniform = np.log(r_grid / 0.3) / np.log(1 / 0.09)
    assert _max_cdf_gap(r_lo, r_hi, r_grid, log_uniform) > 4 * eps


def test_erased_mean_pixel_normalizes_to_zero():
    erased = torch.tensor(MEAN_PIXEL, dtype=torch.uint8).view(1, 3, 1, 1)
    # MEAN_PIXEL = round(255·mean) is off by ≤ 1/2 of a level: (0.5/255)/std = 0.0088, plus the
    # float32 x·a − b (the two constants, the product and the difference: 4 roundings, each
    # ≤ u/std, since every value is ≤ 1/std).
    assert normalize(erased).abs().max() <= 0.5 / 255 / STD[0] + 4 * U32 / STD[0]


def test_normalize_equals_torchvision():
    image = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    reference = T.Normalize((0.485, 0.456, 0.406), (0.2235,) * 3)(image.float() / 255)
    # Both compute (x/255 − m)/s in float32 from an exact integer x: torchvision with 1/255 (a
    # scalar divisor is a reciprocal multiply on the CPU), m, s, a product, a difference and a
    # quotient; here a = 1/(255 s), b = m/s, a product and a difference. That is at most 10
    # roundings, each ≤ u/s since every value, scaled to the output, is ≤ 1/s: 10u/s = 2.7e-6.
    torch.testing.assert_close(normalize(image), reference, rtol=0, atol=10 * U32 / STD[0])


def test_normalize_constants_are_made_once_per_device_and_serve_training_after_inference():
    """No tensor is built per batch (on a GPU a blocking host-to-device copy); constants first
    asked for under inference_mode (extraction, glr query) still serve a training step."""
    from glr.data import transforms

    image = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    transforms._normalize_constants.cache_clear()
    with torch.inference_mode():
        first = normalize(image)
    assert transforms._normalize_constants.cache_info().misses == 1
    weight = torch.ones(3, 1, 1, requires_grad=True)
    (normalize(image) * weight).sum().backward()  # a plain tensor, not an inference tensor
    assert transforms._normalize_constants.cache_info().hits == 1
    assert torch.equal(first, normalize(image)) and weight.grad is not None


def test_train_transform_output():
    out = TrainTransform(size=48, pad=4)(jpeg(160, 120), random.Random(1))
    assert out.shape == (3, 48, 48) and out.dtype == torch.uint8


def test_share_splits_exactly():
    assert [share(10, p, 4) for p in range(4)] == [3, 3, 2, 2]
    assert sum(share(1001, p, 7) for p in range(7)) == 1001


def test_mix_proportions():
    stream = mix([endless("a"), endless("b"), endless("c")], [0.5, 0.3, 0.2], random.Random(3))
    draws = Counter(next(stream) for _ in range(100_000))
    assert abs(draws["a"] / 100_000 - 0.5) < 0.02
    assert abs(draws["b"] / 100_000 - 0.3) < 0.02
    assert abs(draws["c"] / 100_000 - 0.2) < 0.02


@pytest.fixture(scope="module")
def shard_dir(small_shards):
    return small_shards


def _collect(dataset, rank, world, monkeypatch, workers=2):
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("WORLD_SIZE", str(world))
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=workers)
    return [(int(item[1]), int(item[2])) for item in loader]  # (shard number, position)


def test_extraction_splits_disjointly_over_2_ranks_and_2_workers(shard_dir, monkeypatch):
    urls = shards.shard_urls(shard_dir, ["eval_index"])
    total = shards.group_samples(shard_dir, ["eval_index"])
    dataset = ExtractStream(urls, EvalTransform(32))
    parts = [_collect(dataset, rank, 2, monkeypatch) for rank in range(2)]
    everything = _collect(dataset, 0, 1, monkeypatch, workers=0)
    assert len(everything) == total == len(set(everything))
    assert sorted(parts[0] + parts[1]) == sorted(everything)
    assert not set(parts[0]) & set(parts[1]) and all(parts)


def _keys(dataset, rank, world, monkeypatch):
    """Sample keys (jpg bytes, label) per rank; the transform returns the bytes, padded."""
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("WORLD_SIZE", str(world))
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=2)
    return [(_unpad(image), int(label)) for images, labels in loader
            for image, label in zip(images, labels, strict=True)]


RAW = 40_000  # bytes: more than any tiny test JPEG


def _raw(data, rng):
    """A 'transform' that keeps the JPEG bytes, zero-padded so that a batch can be stacked."""
    out = torch.zeros(RAW + 4, dtype=torch.uint8)
    out[:4] = torch.tensor(list(len(data).to_bytes(4, "big")), dtype=torch.uint8)
    out[4: 4 + len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    return out


def _unpad(tensor) -> bytes:
    size = int.from_bytes(bytes(tensor[:4].tolist()), "big")
    return bytes(tensor[4: 4 + size].numpy())


def test_training_epoch_ranks_and_workers_draw_disjoint_samples(shard_dir, monkeypatch):
    groups = shards.read_lists(shard_dir)["full"]
    total = shards.group_samples(shard_dir, groups)
    batches = total // 2 // 2 // 4  # half the list, over 2 ranks, in batches of 4
    dataset = TrainStream(shard_dir, groups, _raw, batch_size=4, batches_per_epoch=batches,
                          seed=5)
    rank0 = _keys(dataset, 0, 2, monkeypatch)
    rank1 = _keys(dataset, 1, 2, monkeypatch)
    assert len(rank0) == len(rank1) == batches * 4  # the same number of steps on every rank
    assert len(set(rank0)) == len(rank0) and not set(rank0) & set(rank1)
    assert _keys(dataset, 0, 2, monkeypatch) == rank0  # same seed and epoch: same stream
    dataset.set_epoch(1)
    assert _keys(dataset, 0, 2, monkeypatch) != rank0


def test_training_mix_follows_group_probabilities(shard_dir, monkeypatch):
    lists = shards.read_lists(shard_dir)
    groups = ["clean-asia", "c2x_extra-asia"]
    assert set(groups) <= set(lists["c2x"])
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    dataset = TrainStream(shard_dir, groups, _raw, batch_size=50, batches_per_epoch=60,
                          probs=[0.66, 0.34], seed=1, shuffle_buffer=20)
    clean_ids = _group_keys(shard_dir, groups[0])
    samples = [(_unpad(image), int(label)) for images, labels in dataset
               for image, label in zip(images, labels, strict=True)]
    share_clean = sum(key in clean_ids for key in samples) / len(samples)
    assert len(samples) == 3000 and abs(share_clean - 0.66) < 0.03


def test_pk_batches_have_p_labels_with_k_images(shard_dir, monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    groups = shards.read_lists(shard_dir)["clean"]
    dataset = TrainStream(shard_dir, groups, _raw, batch_size=6, batches_per_epoch=5,
                          pk_instances=2, seed=0, shuffle_buffer=200)
    for _, labels in dataset:
        counts = Counter(labels.tolist())
        assert len(counts) == 3 and set(counts.values()) == {2}


def _group_keys(shard_dir, group):
    """(jpg bytes, label) of every sample of a group."""
    keys = set()
    for url in shards.shard_urls(shard_dir, [group]):
        with tarfile.open(url) as tar:
            members = tar.getmembers()
            for jpg, meta in zip(members[0::2], members[1::2], strict=True):
                label = json.loads(tar.extractfile(meta).read())["label"]
                keys.add((tar.extractfile(jpg).read(), label))
    return keys


def test_pk_batches_with_fewer_labels_than_p_repeat_labels():
    from glr.data.samplers import pk_batches

    stream = ((torch.full((1,), float(i)), i % 2) for i in range(100))
    images, labels = next(pk_batches(stream, labels_per_batch=3, instances=2,
                                     rng=random.Random(0), buffer_size=10))
    assert images.shape[0] == 6 and len(labels) == 6
    assert set(labels.tolist()) == {0, 1}


def test_persistent_workers_follow_set_epoch_as_fresh_workers_do(shard_dir, monkeypatch):
    """One DataLoader kept across epochs (persistent workers) gives each epoch the batches a
    fresh DataLoader gives it: the workers read the epoch the parent set."""
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    groups = shards.read_lists(shard_dir)["full"]
    dataset = TrainStream(shard_dir, groups, _raw, batch_size=4, batches_per_epoch=6, seed=3,
                          shuffle_buffer=20)
    kept = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=2,
                                       persistent_workers=True)

    def keys(loader):
        return [(_unpad(image), int(label)) for images, labels in loader
                for image, label in zip(images, labels, strict=True)]

    persistent, fresh = [], []
    for epoch in range(3):
        dataset.set_epoch(epoch)
        persistent.append(keys(kept))
        fresh.append(keys(torch.utils.data.DataLoader(dataset, batch_size=None,
                                                      num_workers=2)))
    assert persistent == fresh
    assert len(persistent[0]) == 24 and persistent[0] != persistent[1] != persistent[2]


def test_reader_bytes_counts_buffers_pool_and_prefetched_batches(shard_dir):
    groups = ["clean-asia", "c2x_extra-asia"]
    samples = sum(shards.read_manifest(shard_dir, g)["samples"] for g in groups)
    jpeg = sum(shards.read_manifest(shard_dir, g)["bytes"] for g in groups) / samples
    image = 3 * 32 * 32
    epoch = TrainStream(shard_dir, groups, _raw, batch_size=4, batches_per_epoch=1,
                        shuffle_buffer=100)
    assert epoch.reader_bytes(32) == round(100 * jpeg + 2 * 4 * image)
    # the mix's buffers: max(16, round(100 p)) each = 90 + 16
    mixed = TrainStream(shard_dir, groups, _raw, batch_size=4, batches_per_epoch=1,
                        probs=[0.9, 0.1], shuffle_buffer=100)
    assert mixed.reader_bytes(32, prefetch=3) == round(106 * jpeg + 3 * 4 * image)
    pk = TrainStream(shard_dir, groups, _raw, batch_size=4, batches_per_epoch=1,
                     pk_instances=2, shuffle_buffer=100)
    assert pk.reader_bytes(32) == round(100 * jpeg + 100 * image + 2 * 4 * image)
