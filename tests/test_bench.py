"""The benchmark commands' building blocks (the benchmarks themselves are not timed tests)."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from benchmarks import prepare as bench_prepare
from glr.data import TrainTransform, normalize


def test_authors_style_loader_matches_glr_output_contract(tmp_path: Path):
    pytest.importorskip("cv2")
    from benchmarks.loader import authors_transform

    pixels = np.random.default_rng(0).integers(0, 256, (120, 160, 3), dtype=np.uint8)
    path = tmp_path / "photo.jpg"
    Image.fromarray(pixels).save(path, quality=95)
    theirs = authors_transform(64, 4)(str(path))
    ours = normalize(TrainTransform(64, 4)(path.read_bytes(), random.Random(0))[None])[0]
    assert theirs.shape == ours.shape == (3, 64, 64)
    assert theirs.dtype == ours.dtype == torch.float32
    # both normalize with the recipe's mean and std: the same value range. In float32 from an
    # integer pixel, torchvision's (x/255 − m)/s rounds at most 6 times (1/255, the product, m,
    # the difference, s, the quotient) and ours x·a − b 4 times, each by ≤ u/s, since every
    # value scaled to the output is ≤ 1/s; erased pixels are exactly 0.
    low, high = (0 - 0.485) / 0.2235, (1 - 0.406) / 0.2235
    slack = 6 * 2.0**-24 / 0.2235  # float32 unit roundoff u = 2^-24
    for tensor in (theirs, ours):
        assert low - slack <= tensor.min() and tensor.max() <= high + slack


def test_bench_prepare_metadata_has_gldv2_shape(tmp_path: Path):
    sizes = bench_prepare.generate_metadata(tmp_path / "gldv2", scale=0.001)
    from glr import prepare

    meta = prepare.read_metadata(tmp_path / "gldv2", bench_prepare.SHIPPED_CONTINENTS)
    assert len(meta.train) == sizes["train_rows"]
    assert len(meta.clean_landmarks) == sizes["clean_landmarks"]
    # clean images are drawn at random around the target share
    assert abs(len(meta.clean_images) - sizes["clean_images"]) < 0.2 * sizes["clean_images"]
    assert meta.train["landmark_id"].nunique() == sizes["landmarks"]
    assert len(meta.index) == sizes["index_images"]
    assert (meta.solution["usage"] != "Ignored").sum() == sizes["scored_queries"]
