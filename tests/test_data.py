"""glr.data: the transforms against torchvision's, and the loaders' splitting and mixing."""

from __future__ import annotations

import io
import json
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
    # [0.02, 0.2]·64² and an aspect r in [0.3, 3.3] the box covers A ± (√(Ar) + √(A/r))/2 + 1/4:
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
