"""Stage `synth`: the embedded mini-GLDv2, a small generated dataset in the exact GLDv2 layout.

Every later stage reads it through the same code as the real GLDv2 (see `glr.gldv2`). Its
content makes the method's parts measurable:

- a landmark is a procedurally drawn scene (sky, ground, a building of blocks, roofs, domes,
  towers with window patterns and ornaments); a photo of it is the scene seen from a random
  viewpoint (perspective warp), scale and crop, with illumination and colour change, blur or
  noise, and partial occlusion;
- landmarks of one country share a palette, sky, ground, shape vocabulary and pattern, so a
  country tag carries signal; continents are skewed like GLDv2 (Asia-heavy);
- train.csv holds the clean images, noisy extras of clean landmarks (junk, or photos of another
  landmark carrying this label) and landmarks absent from train_clean.csv;
- the index holds the test landmarks' images plus distractor landmarks, most of which map to
  train landmarks through their categories and some not; a few test landmarks have a twin
  (the same scene under a second train landmark and category), so their queries' ground truth
  spans two labels; test has Public, Private and Ignored (non-landmark) queries.

The same seed gives the same bytes. Every random choice draws from a stream of its own, keyed
by the seed and the entity it decides (a landmark, a photo set, an image, a country's style, a
scene, one selection such as the test landmarks): the order of the code and the worker count
never decide the data, and adding a draw for one entity changes no other.
`synth_truth.json` (outside the GLDv2 files) records the counts the plan implies, which the
tests compare with what `prepare` derives; `images.md5` (md5sum format) fingerprints the images
for the shard stage, as GLDv2's official md5 files do.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter

from glr.gldv2 import Layout, image_relpath
from glr.params import SynthParams
from glr.progress import progress_bar
from glr.workers import process_pool

log = logging.getLogger(__name__)

# Country pool by continent; the generator picks `countries` of them, plus XK and OTHER.
COUNTRY_POOL = {
    "Asia": ["JP", "CN", "IN", "TH", "KR", "VN", "ID", "NP", "TR"],
    "Europe": ["FR", "IT", "DE", "ES", "GB", "GR", "PL"],
    "North America": ["US", "MX", "CA", "CU"],
    "South America": ["BR", "PE", "AR"],
    "Africa": ["EG", "MA", "ZA", "NA"],
    "Oceania": ["AU", "NZ"],
    "Antarctica": ["AQ"],
}
# Share of landmarks per continent (Asia-heavy like GLDv2's test landmarks).
CONTINENT_WEIGHTS = {"Asia": 0.42, "Europe": 0.24, "North America": 0.1, "Africa": 0.08,
                     "South America": 0.06, "Oceania": 0.04, "Antarctica": 0.02, "OTHER": 0.04}
SHAPES = ("block", "roof", "dome", "tower", "arch", "columns")
PATTERNS = ("windows", "stripes", "bricks", "dots")
PLACES = ("Temple", "Church", "Tower", "Gate", "Palace", "Bridge", "Fort", "Shrine", "Hall",
          "Pagoda", "Museum", "Castle", "Mosque", "Lighthouse")
# Seed-stream tags: each random stream is keyed by (seed, tag, *indices), one per entity.
_COUNTRIES, _LANDMARK, _SELECT, _PHOTO_SET, _IMAGE, _STYLE, _SCENE, _PHOTO, _JUNK = range(9)
# The selections (_SELECT, one stream each): landmarks to train ids, test landmarks among the
# clean ones and among the extra ones, mapped distractors, index ids.
_TRAIN_IDS, _TEST_FROM_CLEAN, _TEST_FROM_EXTRA, _MAPPED, _INDEX_IDS = range(5)
# The roles of an image (_PHOTO_SET and _IMAGE keys: role, landmark, number): a clean train
# photo, a noisy extra of a clean landmark, a photo of an extra landmark or twin, an index
# photo, a query, an Ignored (non-landmark) query.
CLEAN, NOISY, EXTRA, INDEX, QUERY, IGNORED = range(6)


# --------------------------------------------------------------------------- plan


@dataclass
class Country:
    code: str
    continent: str
    style_index: int


@dataclass
class Landmark:
    """A landmark of the world: one scene, one category, one country."""

    index: int
    category: str
    country: str
    train_id: int | None = None  # landmark_id in train.csv, if a train landmark
    index_id: int | None = None  # landmark_id in the index, if it has index images
    twin_of: int | None = None  # a second landmark showing the same scene


@dataclass
class ImageSpec:
    """One image to write: a photo of a scene (scene >= 0) or junk (scene = -1). `key`
    (role, landmark, number) names its random streams."""

    id: str
    split: str
    scene: int
    key: tuple[int, int, int]
    landscape: bool


@dataclass
class Plan:
    countries: list[Country]
    landmarks: list[Landmark]
    images: list[ImageSpec] = field(default_factory=list)
    train_rows: list[tuple[str, int]] = field(default_factory=list)  # (id, train landmark_id)
    clean_rows: list[tuple[int, list[str]]] = field(default_factory=list)
    index_rows: list[tuple[str, int]] = field(default_factory=list)
    solution_rows: list[tuple[str, list[str], str]] = field(default_factory=list)
    truth: dict = field(default_factory=dict)


def _rng(seed: int, tag: int, *indices: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, tag, *indices]))


def _uniform_int(rng: np.random.Generator, bounds: list[int]) -> int:
    return int(rng.integers(bounds[0], bounds[1] + 1))


def choose_countries(rng: np.random.Generator, count: int) -> list[Country]:
    """`count` countries from the pool, every continent represented while counts allow."""
    pool = [(code, cont) for cont, codes in COUNTRY_POOL.items() for code in codes]
    firsts = [codes[0] for codes in COUNTRY_POOL.values()][:count]
    rest = [code for code, _ in pool if code not in firsts]
    picked = firsts + list(rng.choice(rest, size=max(0, count - len(firsts)), replace=False))
    continent_of = dict(pool)
    countries = [Country(code, continent_of[code], i) for i, code in enumerate(picked)]
    countries.append(Country("XK", "Europe", len(countries)))  # method.md: XK → Europe
    countries.append(Country("OTHER", "OTHER", len(countries)))
    return countries


def _country_weights(countries: list[Country]) -> np.ndarray:
    per_continent = {}
    for country in countries:
        per_continent[country.continent] = per_continent.get(country.continent, 0) + 1
    weights = np.array([CONTINENT_WEIGHTS[c.continent] / per_continent[c.continent]
                        for c in countries])
    return weights / weights.sum()


@dataclass(frozen=True)
class Counts:
    """How many landmarks of each kind a plan has (from the synth params)."""

    clean: int
    extra: int
    test: int
    twins: int
    distractors: int
    mapped: int

    @classmethod
    def of(cls, params: SynthParams) -> Counts:
        n_clean, n_extra = params.clean_landmarks, params.extra_landmarks
        n_test = min(params.test_landmarks, n_clean + n_extra)
        return cls(n_clean, n_extra, n_test, min(params.split_landmarks, n_test),
                   params.distractor_landmarks,
                   min(round(params.distractor_landmarks * params.distractor_mapped_fraction),
                       n_clean + n_extra - n_test))

    @property
    def world(self) -> int:
        return self.clean + self.extra + self.twins + self.distractors - self.mapped


def make_landmarks(params: SynthParams, countries: list[Country], count: int) -> list[Landmark]:
    """The world's landmarks, each its country and name from its own stream."""
    weights = _country_weights(countries)
    landmarks = []
    for i in range(count):
        rng = _rng(params.seed, _LANDMARK, i)
        country = countries[int(rng.choice(len(countries), p=weights))]
        name = f"Mini_{PLACES[int(rng.integers(len(PLACES)))]}_{i:04d}_{country.code}"
        if i % 7 == 3:  # some categories need CSV quoting, as in GLDv2
            name += f",_District_{i % 5}"
        landmarks.append(Landmark(i, name, country.code))
    return landmarks


def _select(params: SynthParams, which: int) -> np.random.Generator:
    return _rng(params.seed, _SELECT, which)


def _count(params: SynthParams, role: int, landmark: int, bounds: list[int]) -> int:
    """How many images of `role` landmark `landmark` has (its photo set's stream)."""
    return _uniform_int(_rng(params.seed, _PHOTO_SET, role, landmark), bounds)


def make_plan(params: SynthParams) -> Plan:
    """Decide every landmark, image id, label and query; no pixels yet."""
    n = Counts.of(params)
    countries = choose_countries(_rng(params.seed, _COUNTRIES), params.countries)
    landmarks = make_landmarks(params, countries, n.world)
    trained = n.clean + n.extra + n.twins
    train_ids = _select(params, _TRAIN_IDS).choice(np.arange(1, 203_094), size=trained,
                                                   replace=False)
    for landmark, train_id in zip(landmarks[:trained], train_ids, strict=True):
        landmark.train_id = int(train_id)
    clean = landmarks[:n.clean]
    extra = landmarks[n.clean: n.clean + n.extra]
    twins = landmarks[n.clean + n.extra: trained]
    unmapped = landmarks[trained:]

    # Test landmarks: a share from clean, the rest from the extra landmarks.
    from_extra = min(n.test - min(round(n.test * params.test_landmarks_from_clean), n.clean),
                     n.extra)
    from_clean = n.test - from_extra
    test = ([clean[i] for i in _select(params, _TEST_FROM_CLEAN).choice(
                n.clean, size=from_clean, replace=False)]
            + [extra[i] for i in _select(params, _TEST_FROM_EXTRA).choice(
                n.extra, size=from_extra, replace=False)])
    for twin, original in zip(twins, test[:n.twins], strict=True):
        twin.twin_of = original.index  # same scene, own train landmark and category
        twin.country = original.country
        twin.category = f"{original.category.split(',')[0]}_(north_side)"
    test_set = {lm.index for lm in test}
    others = [lm for lm in clean + extra if lm.index not in test_set]
    mapped = [others[i] for i in _select(params, _MAPPED).choice(len(others), size=n.mapped,
                                                                  replace=False)]
    index_landmarks = test + twins + mapped + unmapped
    index_ids = _select(params, _INDEX_IDS).choice(np.arange(1, 100_000),
                                                   size=len(index_landmarks), replace=False)
    for landmark, index_id in zip(index_landmarks, index_ids, strict=True):
        landmark.index_id = int(index_id)

    plan = Plan(countries, landmarks)
    photos = _PhotoMaker(params, plan)
    # train.csv: clean images + noisy extras of clean landmarks, extra landmarks, twins
    train_rows: list[tuple[str, int]] = []
    n_extras = 0
    for landmark in clean:
        ids = [photos.take(CLEAN, landmark, k)
               for k in range(_count(params, CLEAN, landmark.index, params.clean_images))]
        plan.clean_rows.append((landmark.train_id, ids))
        train_rows += [(i, landmark.train_id) for i in ids]
        for k in range(_count(params, NOISY, landmark.index, params.noisy_extras)):
            train_rows.append((photos.noisy(landmark, k), landmark.train_id))
            n_extras += 1
    for landmark in extra + twins:
        train_rows += [(photos.take(EXTRA, landmark, k), landmark.train_id)
                       for k in range(_count(params, EXTRA, landmark.index, params.extra_images))]
    # train.csv is not grouped by landmark: rows in the order of their (random) ids;
    # train_clean.csv is sorted by landmark_id
    plan.train_rows = sorted(train_rows)
    plan.clean_rows.sort(key=lambda row: row[0])

    # index: images of every index landmark
    index_images: dict[int, list[str]] = {}
    for landmark in index_landmarks:
        ids = [photos.take(INDEX, landmark, k)
               for k in range(_count(params, INDEX, landmark.index, params.index_images))]
        index_images[landmark.index] = ids
        plan.index_rows += [(i, landmark.index_id) for i in ids]

    # test: queries of test landmarks (ground truth = their index images and their twin's)
    twin_of = {twin.twin_of: twin for twin in twins}
    queries: list[tuple[str, str, list[str]]] = []
    query_labels = 0  # a query of a landmark with a twin carries both labels
    for landmark in test:
        truth = list(index_images[landmark.index])
        if landmark.index in twin_of:
            truth += index_images[twin_of[landmark.index].index]
        for k in range(_count(params, QUERY, landmark.index, params.queries_per_landmark)):
            queries.append((*photos.query(landmark, k), truth))
            query_labels += 2 if landmark.index in twin_of else 1
    queries += [(photos.take(IGNORED, None, k), "Ignored", [])
                for k in range(params.ignored_queries)]
    plan.solution_rows = [(i, truth, usage) for i, usage, truth in sorted(queries)]
    photos.check_unique()
    n_index_mapped = sum(len(index_images[lm.index]) for lm in test + twins + mapped)
    plan.truth = plan_truth(plan, params, n, n_extras, n_index_mapped, query_labels)
    return plan


class _PhotoMaker:
    """Adds the plan's images, each with its id, orientation and choices drawn from its own
    stream (role, landmark, number)."""

    def __init__(self, params: SynthParams, plan: Plan):
        self.params, self.plan = params, plan

    def _image(self, role: int, landmark: Landmark | None, k: int, scene: int | None = None
               ) -> tuple[str, np.random.Generator]:
        owner = 0 if landmark is None else landmark.index  # Ignored queries: the role says it
        rng = _rng(self.params.seed, _IMAGE, role, owner, k)
        image_id = f"{int(rng.integers(0, 2**63)) * 2 + int(rng.integers(0, 2)):016x}"
        landscape = bool(rng.random() < 0.7)
        if scene is None:
            scene = -1 if landmark is None else _scene_of(landmark)
        split = {INDEX: "index", QUERY: "test", IGNORED: "test"}.get(role, "train")
        self.plan.images.append(ImageSpec(image_id, split, scene, (role, owner, k), landscape))
        return image_id, rng

    def take(self, role: int, landmark: Landmark | None, k: int) -> str:
        return self._image(role, landmark, k)[0]

    def noisy(self, landmark: Landmark, k: int) -> str:
        """A noisy extra of a clean landmark: junk, or a photo of another landmark."""
        choice = _rng(self.params.seed, _IMAGE, NOISY, landmark.index, k, 1)
        landmarks = self.plan.landmarks
        scene = -1
        if choice.random() >= self.params.junk_fraction and len(landmarks) > 1:
            other = int(choice.integers(len(landmarks) - 1))
            scene = _scene_of(landmarks[other + (other >= landmark.index)])
        return self._image(NOISY, landmark, k, scene)[0]

    def query(self, landmark: Landmark, k: int) -> tuple[str, str]:
        """A query of a test landmark: (id, Public or Private)."""
        image_id, rng = self._image(QUERY, landmark, k)
        return image_id, "Public" if rng.random() < self.params.public_fraction else "Private"

    def check_unique(self) -> None:
        ids = [spec.id for spec in self.plan.images]
        if len(set(ids)) != len(ids):  # 64-bit random ids: about n²/2^65, never seen
            raise ValueError(f"synth.seed {self.params.seed} draws one image id twice; "
                             "choose another seed")


def _scene_of(landmark: Landmark) -> int:
    return landmark.twin_of if landmark.twin_of is not None else landmark.index


def plan_truth(plan: Plan, params: SynthParams, n: Counts, n_extras: int,
               n_index_mapped: int, query_labels: int) -> dict:
    """The counts the plan implies, per list (what `prepare` must derive): `n_extras` noisy
    extras, `n_index_mapped` index images of train landmarks, `query_labels` (query, label)
    pairs."""
    n_clean_images = sum(len(ids) for _, ids in plan.clean_rows)
    n_train = len(plan.train_rows)
    n_all = n_train + n_index_mapped + params.ignored_queries
    n_train_labels = n.clean + n.extra + n.twins
    scored = [usage for _, _, usage in plan.solution_rows if usage != "Ignored"]
    return {
        "clean": {"images": n_clean_images, "labels": n.clean},
        "c2x": {"images": n_clean_images + n_extras, "labels": n.clean, "noisy": n_extras},
        "full": {"images": n_train, "labels": n_train_labels,
                 "noisy": n_train - n_clean_images},
        "all_holdout": {"images": n_all, "labels": n_train_labels,
                        "unlabelled": params.ignored_queries},
        "all_authors": {"images": n_all + query_labels, "labels": n_train_labels,
                        "unlabelled": params.ignored_queries},
        "reference_holdout": {"images": n_all - params.ignored_queries},
        "index": {"images": len(plan.index_rows), "mapped": n_index_mapped,
                  "unmapped": len(plan.index_rows) - n_index_mapped},
        "val_queries": {"total": len(scored), "public": scored.count("Public"),
                        "private": scored.count("Private")},
        "landmarks": {"clean": n.clean, "extra": n.extra, "twins": n.twins, "test": n.test,
                      "distractors_mapped": n.mapped,
                      "distractors_unmapped": n.distractors - n.mapped},
    }


# --------------------------------------------------------------------------- rendering


@dataclass
class Style:
    """A country's look: palette, sky, ground, preferred shapes and surface pattern."""

    palette: np.ndarray  # (5, 3) uint8
    sky_top: np.ndarray
    sky_bottom: np.ndarray
    ground: np.ndarray
    shape_weights: np.ndarray
    pattern: str


def make_style(seed: int, style_index: int, shape_mix: float = 0.6) -> Style:
    """A country's style; `shape_mix` is the Dirichlet concentration of its shape preferences
    (small: a country's landmarks are built of one or two shapes and look alike)."""
    rng = _rng(seed, _STYLE, style_index)
    hue = rng.random()
    palette = np.stack([_hsv(hue + rng.normal(0, 0.08), rng.uniform(0.35, 0.9),
                             rng.uniform(0.35, 0.95)) for _ in range(5)])
    sky_hue = rng.uniform(0.5, 0.7) if rng.random() < 0.7 else rng.uniform(0.0, 0.15)
    weights = rng.dirichlet(np.full(len(SHAPES), shape_mix))
    return Style(palette=palette,
                 sky_top=_hsv(sky_hue, rng.uniform(0.3, 0.8), rng.uniform(0.5, 0.9)),
                 sky_bottom=_hsv(sky_hue + 0.05, rng.uniform(0.1, 0.4), rng.uniform(0.8, 1.0)),
                 ground=_hsv(rng.random(), rng.uniform(0.2, 0.6), rng.uniform(0.25, 0.6)),
                 shape_weights=weights,
                 pattern=PATTERNS[int(rng.integers(len(PATTERNS)))])


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    color = Image.new("HSV", (1, 1), (int(h % 1.0 * 255), int(s * 255), int(v * 255)))
    return np.array(color.convert("RGB").getpixel((0, 0)), dtype=np.uint8)


def render_scene(seed: int, scene: int, style: Style, width: int, height: int) -> Image.Image:
    """Draw landmark `scene` in its country's style; coordinates are resolution-independent."""
    rng = _rng(seed, _SCENE, scene)
    horizon = rng.uniform(0.58, 0.78)
    t = np.linspace(0.0, 1.0, height)[:, None, None]
    sky = (1 - t) * style.sky_top + t * style.sky_bottom
    pixels = np.broadcast_to(sky, (height, width, 3)).copy()
    ground = style.ground.astype(float) * rng.uniform(0.8, 1.2)
    pixels[int(horizon * height):] = np.clip(ground, 0, 255)
    image = Image.fromarray(pixels.astype(np.uint8))
    draw = ImageDraw.Draw(image)
    size = np.array([width, height], dtype=float)

    def box(x0: float, y0: float, x1: float, y1: float) -> list[float]:
        return [x0 * size[0], y0 * size[1], x1 * size[0], y1 * size[1]]

    def color() -> tuple[int, ...]:
        base = style.palette[int(rng.integers(len(style.palette)))].astype(float)
        return tuple(int(c) for c in np.clip(base * rng.uniform(0.75, 1.25), 0, 255))

    # A few background hills or trees in the ground colour, then the building.
    for _ in range(int(rng.integers(1, 4))):
        cx, w = rng.uniform(0, 1), rng.uniform(0.2, 0.5)
        draw.ellipse(box(cx - w, horizon - rng.uniform(0.05, 0.15), cx + w, horizon + 0.1),
                     fill=tuple(int(c) for c in np.clip(ground * 0.8, 0, 255)))
    center = rng.uniform(0.35, 0.65)
    span = rng.uniform(0.3, 0.6)
    for _ in range(int(rng.integers(4, 8))):
        shape = SHAPES[int(rng.choice(len(SHAPES), p=style.shape_weights))]
        w = span * rng.uniform(0.2, 0.6)
        x0 = center + rng.uniform(-span / 2, span / 2) - w / 2
        top = horizon - rng.uniform(0.15, 0.5)
        _draw_shape(draw, shape, box, x0, top, w, horizon, color(), color(), style, rng)
    for _ in range(int(rng.integers(2, 5))):  # ornaments: small, landmark-specific marks
        cx = center + rng.uniform(-span / 2, span / 2)
        cy = horizon - rng.uniform(0.05, 0.45)
        r = rng.uniform(0.015, 0.04)
        points = [(cx + r * np.cos(a), cy + r * np.sin(a))
                  for a in np.linspace(0, 2 * np.pi, int(rng.integers(3, 7)), endpoint=False)]
        draw.polygon([(x * size[0], y * size[1]) for x, y in points], fill=color())
    return image


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box, x0: float, top: float, w: float,
                base: float, fill: tuple, accent: tuple, style: Style,
                rng: np.random.Generator) -> None:
    x1 = x0 + w
    if shape == "block":
        draw.rectangle(box(x0, top, x1, base), fill=fill)
        _pattern(draw, box, x0, top, x1, base, accent, style.pattern, rng)
    elif shape == "roof":
        draw.rectangle(box(x0, top + 0.1, x1, base), fill=fill)
        x_a, y_a, x_b, y_b = box(x0 - 0.02, top - 0.02, x1 + 0.02, top + 0.1)
        draw.polygon([(x_a, y_b), (x_b, y_b), ((x_a + x_b) / 2, y_a)], fill=accent)
    elif shape == "dome":
        draw.rectangle(box(x0, top + w / 2, x1, base), fill=fill)
        draw.pieslice(box(x0, top, x1, top + w), 180, 360, fill=accent)
    elif shape == "tower":
        narrow = w * 0.35
        draw.rectangle(box(x0, top - 0.15, x0 + narrow, base), fill=fill)
        _pattern(draw, box, x0, top - 0.15, x0 + narrow, base, accent, style.pattern, rng)
        x_a, y_a, x_b, y_b = box(x0 - 0.01, top - 0.25, x0 + narrow + 0.01, top - 0.15)
        draw.polygon([(x_a, y_b), (x_b, y_b), ((x_a + x_b) / 2, y_a)], fill=accent)
    elif shape == "arch":
        draw.rectangle(box(x0, top, x1, base), fill=fill)
        draw.pieslice(box(x0 + w * 0.25, top + (base - top) * 0.35, x1 - w * 0.25,
                          base + (base - top) * 0.3), 180, 360, fill=accent)
    else:  # columns
        draw.rectangle(box(x0 - 0.01, top, x1 + 0.01, top + 0.04), fill=accent)
        for x in np.linspace(x0, x1 - w / 8, int(rng.integers(3, 7))):
            draw.rectangle(box(x, top + 0.04, x + w / 8, base), fill=fill)


def _pattern(draw: ImageDraw.ImageDraw, box, x0: float, y0: float, x1: float, y1: float,
             color: tuple, pattern: str, rng: np.random.Generator) -> None:
    rows, cols = int(rng.integers(2, 6)), int(rng.integers(2, 5))
    dx, dy = (x1 - x0) / cols, (y1 - y0) / rows
    for r in range(rows):
        for c in range(cols):
            cx0, cy0 = x0 + c * dx, y0 + r * dy
            if pattern == "windows":
                draw.rectangle(box(cx0 + dx * 0.25, cy0 + dy * 0.2, cx0 + dx * 0.75,
                                   cy0 + dy * 0.7), fill=color)
            elif pattern == "stripes" and c == 0:
                draw.rectangle(box(x0, cy0 + dy * 0.4, x1, cy0 + dy * 0.6), fill=color)
            elif pattern == "bricks" and (r + c) % 2 == 0:
                draw.rectangle(box(cx0, cy0, cx0 + dx, cy0 + dy), fill=color)
            elif pattern == "dots":
                draw.ellipse(box(cx0 + dx * 0.3, cy0 + dy * 0.3, cx0 + dx * 0.7,
                                 cy0 + dy * 0.7), fill=color)


def perspective_coefficients(dst: np.ndarray, src: np.ndarray) -> list[float]:
    """PIL PERSPECTIVE data mapping output corners `dst` onto input corners `src` (4×2 each)."""
    rows = []
    for (x, y), (u, v) in zip(dst, src, strict=True):
        rows.append([x, y, 1, 0, 0, 0, -u * x, -u * y])
        rows.append([0, 0, 0, x, y, 1, -v * x, -v * y])
    return list(np.linalg.solve(np.array(rows, float), np.asarray(src, float).reshape(8)))


@dataclass(frozen=True)
class Camera:
    """How far photos depart from their scene (synth.photo_* params)."""

    scale: tuple[float, float] = (0.7, 0.95)  # share of the scene framed
    tilt: float = 0.06  # perspective corner jitter, share of the crop
    blur: float = 0.2  # share of blurred photos
    occlusion: float = 0.25  # share of photos with an occluding blob


def photograph(scene: Image.Image, rng: np.random.Generator, width: int, height: int,
               camera: Camera = Camera()) -> Image.Image:
    """A photo of a rendered scene: viewpoint, scale, crop, light, colour, blur/noise, occlusion."""
    sw, sh = scene.size
    scale = rng.uniform(*camera.scale)
    aspect = width / height
    crop_w = min(sw * scale, sh * scale * aspect)
    crop_h = crop_w / aspect
    cx = rng.uniform(crop_w / 2, sw - crop_w / 2)
    cy = rng.uniform(crop_h / 2, sh - crop_h / 2)
    corners = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], float) * [crop_w / 2, crop_h / 2]
    jitter = rng.uniform(-camera.tilt, camera.tilt, size=(4, 2)) * [crop_w, crop_h]
    src = np.clip(corners + jitter + [cx, cy], 0, [sw - 1, sh - 1])  # stay inside the scene
    dst = np.array([[0, 0], [width, 0], [width, height], [0, height]], float)
    photo = scene.transform((width, height), Image.Transform.PERSPECTIVE,
                            perspective_coefficients(dst, src), Image.Resampling.BILINEAR)
    photo = ImageEnhance.Brightness(photo).enhance(rng.uniform(0.6, 1.4))
    photo = ImageEnhance.Contrast(photo).enhance(rng.uniform(0.7, 1.3))
    photo = ImageEnhance.Color(photo).enhance(rng.uniform(0.6, 1.4))
    pixels = np.asarray(photo, dtype=np.float32) * (1 + rng.normal(0, 0.06, size=3))  # tint
    if rng.random() < 0.3:
        pixels += rng.normal(0, rng.uniform(3, 12), size=pixels.shape)
    photo = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    if rng.random() < camera.blur:
        photo = photo.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.5) * width / 160))
    if rng.random() < camera.occlusion:  # a passer-by, a car, a tree in front
        draw = ImageDraw.Draw(photo)
        w, h = rng.uniform(0.1, 0.25) * width, rng.uniform(0.15, 0.3) * height
        x, y = rng.uniform(0, width - w), rng.uniform(height * 0.3, height - h * 0.5)
        shade = tuple(int(c) for c in rng.integers(20, 120, size=3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x, y, x + w, y + h],
                                                                 fill=shade)
    return photo


def junk(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """A non-landmark image: random clutter of blobs and strokes over a flat or noisy ground."""
    base = rng.integers(0, 256, size=3)
    pixels = np.broadcast_to(base, (height, width, 3)).astype(np.float32)
    pixels = pixels + rng.normal(0, rng.uniform(0, 25), size=(height, width, 3))
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(5, 20))):
        x, y = rng.uniform(0, width), rng.uniform(0, height)
        r = rng.uniform(0.03, 0.25) * width
        fill = tuple(int(c) for c in rng.integers(0, 256, size=3))
        if rng.random() < 0.5:
            draw.ellipse([x - r, y - r, x + r, y + r], fill=fill)
        else:
            draw.line([x, y, x + rng.normal(0, r), y + rng.normal(0, r)], fill=fill,
                      width=max(1, int(r / 4)))
    return image.filter(ImageFilter.GaussianBlur(rng.uniform(0, 1.5) * width / 160))


# --------------------------------------------------------------------------- writing


def _encode(image: Image.Image, quality: int) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def _render_group(args: tuple) -> list[str]:
    """Render and write the images of one scene (or of junk); run in worker processes.

    Returns an `md5  path` line per image written."""
    root, seed, scene, style, specs, width, height, quality, camera = args
    scene_image = None
    lines = []
    if scene >= 0:
        scene_image = render_scene(seed, scene, style, int(width * 1.6), int(height * 1.6))
    for spec in specs:
        w, h = (width, height) if spec.landscape else (height, width)
        if scene >= 0:
            rng = _rng(seed, _PHOTO, *spec.key)
            image = photograph(scene_image, rng, w, h, camera)
        else:
            image = junk(_rng(seed, _JUNK, *spec.key), w, h)
        relpath = image_relpath(spec.split, spec.id)
        path = Path(root) / relpath
        path.parent.mkdir(parents=True, exist_ok=True)
        data = _encode(image, quality)
        path.write_bytes(data)
        lines.append(f"{hashlib.md5(data).hexdigest()}  {relpath}")
    return lines


def write_metadata(plan: Plan, layout: Layout) -> None:
    """The GLDv2 CSV and JSON files of a plan."""
    for folder in ("train", "index", "test"):
        (layout.root / folder).mkdir(parents=True, exist_ok=True)
    landmarks = plan.landmarks
    url = "http://commons.wikimedia.org/wiki/Category:"
    _write_csv(layout.train_csv, ["id", "url", "landmark_id"],
               [(i, f"http://upload.wikimedia.org/wikipedia/commons/{i[0]}/{i[:2]}/{i}.jpg", lm)
                for i, lm in plan.train_rows])
    _write_csv(layout.train_clean_csv, ["landmark_id", "images"],
               [(lm, " ".join(ids)) for lm, ids in plan.clean_rows])
    _write_csv(layout.train_categories_csv, ["landmark_id", "category"],
               sorted((lm.train_id, url + lm.category) for lm in landmarks
                      if lm.train_id is not None))
    _write_csv(layout.index_csv, ["id", "landmark_id"], plan.index_rows)
    _write_csv(layout.index_categories_csv, ["landmark_id", "category"],
               sorted((lm.index_id, url + lm.category) for lm in landmarks
                      if lm.index_id is not None))
    _write_csv(layout.solution_csv, ["id", "images", "Usage"],
               [(i, " ".join(truth) if truth else "None", usage)
                for i, truth, usage in plan.solution_rows])
    layout.country_dir.mkdir(parents=True, exist_ok=True)
    codes = [country.code for country in plan.countries]
    layout.country_codes_json.write_text(json.dumps(codes) + "\n")
    for code in codes:
        entries = [{"name": lm.category, "country": code} for lm in landmarks if lm.country == code]
        (layout.country_dir / f"{code}.json").write_text(json.dumps(entries, indent=1) + "\n")
    with layout.continent_csv.open("w", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(["Continent_Name", "Two_Letter_Country_Code"])
        writer.writerows((c.continent, c.code) for c in plan.countries
                         if c.code not in ("XK", "OTHER"))


def _write_csv(path: Path, header: list[str], rows) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)


def generate(params: SynthParams, out: Path, workers: int | None = None,
             progress: bool = True) -> Plan:
    """Write a whole mini-GLDv2 under `out` (replacing what was there)."""
    out = Path(out)
    tmp = out.with_name(out.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    plan = make_plan(params)
    layout = Layout(tmp)
    write_metadata(plan, layout)
    scene_of_country = {lm.index: lm.country for lm in plan.landmarks}
    style_of = {c.code: make_style(params.seed, c.style_index, params.shape_mix)
                for c in plan.countries}
    camera = Camera(scale=tuple(params.photo_scale), tilt=params.photo_tilt,
                    blur=params.photo_blur, occlusion=params.photo_occlusion)
    groups: dict[int, list[ImageSpec]] = {}
    for spec in plan.images:
        groups.setdefault(spec.scene, []).append(spec)
    tasks = [(str(tmp), params.seed, scene,
              style_of[scene_of_country[scene]] if scene >= 0 else None, specs,
              params.image_width, params.image_height, params.jpeg_quality, camera)
             for scene, specs in sorted(groups.items())]
    workers = workers or min(os.cpu_count() or 1, 8)
    bar = progress_bar(total=len(plan.images), desc="synth images", unit="img",
                       disable=not progress)
    checksums: list[str] = []
    if workers > 1:
        with process_pool(workers) as pool:
            for lines in pool.map(_render_group, tasks, chunksize=4):
                checksums += lines
                bar.update(len(lines))
    else:
        for task in tasks:
            checksums += _render_group(task)
            bar.update(len(checksums) - bar.n)
    bar.close()
    # md5 of every image (md5sum format): the cheap fingerprint the shard stage depends on
    (tmp / "images.md5").write_text("".join(f"{line}\n" for line in sorted(checksums,
                                                                          key=lambda x: x[34:])))
    (tmp / "synth_truth.json").write_text(json.dumps(plan.truth, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    tmp.replace(out)
    return plan
