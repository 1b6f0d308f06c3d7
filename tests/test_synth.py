"""The mini-GLDv2 generator: GLDv2 layout, determinism, and counts that `prepare` recovers."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from glr import prepare, synth
from glr.gldv2 import Layout, image_relpath, read_country_categories
from glr.params import ParamsError, PrepareParams, SynthParams, parse_params


def tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def generated(tmp_path_factory, small_synth) -> tuple[Layout, synth.Plan]:
    root = tmp_path_factory.mktemp("synth") / "mini"
    plan = synth.generate(small_synth, root, workers=1, progress=False)
    return Layout(root), plan


def test_same_seed_same_bytes_whatever_the_worker_count(generated, small_synth, tmp_path):
    # Exact bytes are right here: both runs are on this machine, so every image goes through
    # the same numpy, LAPACK, PIL and libjpeg kernels from its own random stream; the worker
    # count only decides which process renders it. Nothing is reduced across images or
    # threads (the one LAPACK call, an 8×8 solve, is below OpenBLAS's threading threshold).
    layout, _ = generated
    again = tmp_path / "again"
    synth.generate(small_synth, again, workers=2, progress=False)
    assert tree_digest(again) == tree_digest(layout.root)
    other = tmp_path / "other"
    synth.generate(dataclasses.replace(small_synth, seed=7), other, workers=1, progress=False)
    assert tree_digest(other) != tree_digest(layout.root)


def test_every_listed_image_is_a_jpeg_at_its_gldv2_path(generated, small_synth):
    layout, plan = generated
    files = {str(p.relative_to(layout.root)) for p in layout.root.rglob("*.jpg")}
    expected = {image_relpath(spec.split, spec.id) for spec in plan.images}
    assert files == expected
    for spec in plan.images[:20]:
        assert len(spec.id) == 16 and int(spec.id, 16) >= 0
        with Image.open(layout.root / image_relpath(spec.split, spec.id)) as image:
            assert image.format == "JPEG"
            w, h = small_synth.image_width, small_synth.image_height
            assert image.size == ((w, h) if spec.landscape else (h, w))


def test_metadata_files_in_gldv2_format(generated):
    layout, plan = generated
    assert layout.train_csv.read_text().splitlines()[0] == "id,url,landmark_id"
    assert layout.train_clean_csv.read_text().splitlines()[0] == "landmark_id,images"
    assert layout.solution_csv.read_text().splitlines()[0] == "id,images,Usage"
    solution = layout.solution_csv.read_text()
    assert ",None,Ignored" in solution and ",Public" in solution and ",Private" in solution
    assert '"http://commons.wikimedia.org/wiki/Category:' in layout.train_categories_csv.read_text()
    codes = json.loads(layout.country_codes_json.read_text())
    assert codes[-2:] == ["XK", "OTHER"]
    assert len(read_country_categories(layout)) == len(plan.landmarks)


@pytest.mark.parametrize("holdout", [True, False])
def test_prepared_counts_equal_the_generators_truth(generated, holdout):
    layout, plan = generated
    truth = plan.truth
    assert json.loads((layout.root / "synth_truth.json").read_text()) == truth
    meta = prepare.read_metadata(layout.root, layout.continent_csv)
    params = PrepareParams(holdout_val_queries=holdout)
    counts = prepare.summary(prepare.prepare(meta, params), params)
    for name in ("clean", "c2x", "full"):
        for key, value in truth[name].items():
            assert counts[name][key] == value, (name, key)
    expected_all = truth["all_holdout" if holdout else "all_authors"]
    for key, value in expected_all.items():
        assert counts["all"][key] == value, key
    assert counts["all"]["by_split"]["index"] == truth["index"]["mapped"]
    if holdout:
        assert counts["reference"]["images"] == truth["reference_holdout"]["images"]
    assert counts["val_queries"] == truth["val_queries"]
    assert counts["eval_index"]["images"] == truth["index"]["images"]
    # the twins make some queries carry two labels
    assert truth["all_authors"]["images"] - truth["all_holdout"]["images"] > (
        truth["val_queries"]["total"])


def test_default_plan_is_asia_heavy():
    plan = synth.make_plan(SynthParams())
    continent = {c.code: c.continent for c in plan.countries}
    per_continent: dict[str, int] = {}
    for landmark in plan.landmarks:
        per_continent[continent[landmark.country]] = per_continent.get(
            continent[landmark.country], 0) + 1
    assert max(per_continent, key=per_continent.get) == "Asia"
    assert per_continent["Asia"] > 0.3 * len(plan.landmarks)


def test_country_style_is_shared_within_a_country():
    # The same call twice in one process: the same operations on the same draws, so == holds.
    style_a, style_b = synth.make_style(1, 0), synth.make_style(1, 1)
    assert (synth.make_style(1, 0).palette == style_a.palette).all()
    assert not (style_a.palette == style_b.palette).all()


def test_shape_mix_sets_how_alike_a_countrys_landmarks_are():
    # Dirichlet weights over the 6 shapes: a tiny concentration puts almost all weight on one
    # shape (a country of look-alikes), a large one spreads it evenly (1/6 + noise); the
    # margins are wide, so libm's last bits in the gamma draws cannot flip them.
    peaked = [synth.make_style(3, i, shape_mix=0.05).shape_weights.max() for i in range(8)]
    mixed = [synth.make_style(3, i, shape_mix=100.0).shape_weights.max() for i in range(8)]
    assert sum(peaked) / len(peaked) > 0.6 and max(mixed) < 0.25
    assert all(abs(sum(synth.make_style(3, i).shape_weights) - 1) < 1e-9 for i in range(8))


@pytest.mark.parametrize(("key", "value", "message"), [
    ("photo_scale", [0.9, 0.5], r"synth\.photo_scale: expected \[min, max\] with min <= max"),
    ("photo_tilt", 0.5, r"synth\.photo_tilt"),
    ("photo_occlusion", 1.5, r"synth\.photo_occlusion"),
    ("shape_mix", 0.0, r"synth\.shape_mix"),
])
def test_photo_and_style_params_are_checked(key, value, message):
    with pytest.raises(ParamsError, match=message):
        parse_params({"synth": {key: value}})


def test_camera_params_reach_the_photos():
    # Without blur, occluders, tilt and with the whole scene framed, two photos of one scene
    # differ only in light and colour; the defaults move the view, so they differ more
    # (correlations 0.87 against 0.68: a margin no rounding difference can close).
    scene = synth.render_scene(5, 0, synth.make_style(5, 0), 160, 120)
    still = synth.Camera(scale=(0.95, 0.95), tilt=0.0, blur=0.0, occlusion=0.0)

    def photo(camera, index):
        return np.asarray(synth.photograph(scene, synth._rng(5, 99, index), 96, 72, camera),
                          dtype=float)

    assert photo(still, 1).shape == (72, 96, 3)
    grey = [photo(still, i).mean(axis=2) for i in range(2)]
    moved = [photo(synth.Camera(scale=(0.5, 0.95), tilt=0.2), i).mean(axis=2) for i in range(2)]
    still_gap = np.corrcoef(grey[0].ravel(), grey[1].ravel())[0, 1]
    moved_gap = np.corrcoef(moved[0].ravel(), moved[1].ravel())[0, 1]
    assert still_gap > moved_gap


def test_each_image_draws_from_its_own_streams():
    """A random stream per entity: more Ignored queries add images and change no other id,
    scene or orientation; other noisy-extra counts leave every clean, index and query image
    as it was. (With one stream in program order, both would have changed every id.)"""
    base = SynthParams()
    images = {spec.key: spec for spec in synth.make_plan(base).images}
    more = {spec.key: spec for spec in synth.make_plan(
        dataclasses.replace(base, ignored_queries=base.ignored_queries + 3)).images}
    assert set(more) - set(images) == {(synth.IGNORED, 0, base.ignored_queries + k)
                                       for k in range(3)}
    assert all(more[key] == spec for key, spec in images.items())
    noisier = {spec.key: spec for spec in synth.make_plan(
        dataclasses.replace(base, noisy_extras=[base.noisy_extras[1] + 1,
                                                base.noisy_extras[1] + 2])).images}
    kept = {key: spec for key, spec in images.items() if key[0] != synth.NOISY}
    assert kept and all(noisier[key] == spec for key, spec in kept.items())
    assert len(noisier) > len(images)
