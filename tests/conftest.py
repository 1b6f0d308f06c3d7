"""Shared test helpers: tiny hand-built GLDv2 roots and small synth params.

The suite answers the same on every machine. No test sees a GPU (`CUDA_VISIBLE_DEVICES` is
emptied here, before torch looks, and every subprocess inherits it); torch runs AVX2 kernels,
as the stages do with `train.cpu_kernels: avx2`; `glr.runtime` answers as a plain AVX2 CPU
(`GLR_MACHINE=plain-cpu`) unless the environment names another machine:
`GLR_MACHINE=bf16-cpu make test` runs the suite as an AMX / AVX-512 BF16 CPU would (`.ci/run`
does both). Tests of a machine-dependent choice set it themselves.
"""

from __future__ import annotations

import os

os.environ["CUDA_VISIBLE_DEVICES"] = ""
os.environ.setdefault("GLR_MACHINE", "plain-cpu")

from glr.runtime import CPU_KERNELS  # imports torch, which reads these at its first computation

# The kernels `train.cpu_kernels: avx2` (the default) pins in the stages' processes, pinned for
# this one too before torch computes anything: in-process and subprocess runs compare equal.
os.environ.update(CPU_KERNELS["avx2"])

import csv
import json
from pathlib import Path

import pytest

from glr.gldv2 import Layout
from glr.params import SynthParams

URL = "http://commons.wikimedia.org/wiki/Category:"


def hexid(name: str) -> str:
    """A readable test id as 16 hex chars: hexid('a1') == '00000000000000a1'."""
    return f"{int(name, 16):016x}"


def write_csv(path: Path, header: list[str], rows: list[tuple]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)


def write_gldv2(root: Path, *, train: list[tuple[str, int]], clean: list[tuple[int, list[str]]],
                train_categories: dict[int, str], index: list[tuple[str, int]],
                index_categories: dict[int, str], solution: list[tuple[str, list[str], str]],
                countries: dict[str, list[str]], continents: dict[str, str]) -> Layout:
    """Write a GLDv2 metadata tree; ids are given as short hex names (see `hexid`)."""
    layout = Layout(root)
    write_csv(layout.train_csv, ["id", "url", "landmark_id"],
              [(hexid(i), f"http://example.org/{i}.jpg", lm) for i, lm in train])
    write_csv(layout.train_clean_csv, ["landmark_id", "images"],
              [(lm, " ".join(hexid(i) for i in ids)) for lm, ids in clean])
    write_csv(layout.train_categories_csv, ["landmark_id", "category"],
              [(lm, URL + name) for lm, name in train_categories.items()])
    write_csv(layout.index_csv, ["id", "landmark_id"], [(hexid(i), lm) for i, lm in index])
    write_csv(layout.index_categories_csv, ["landmark_id", "category"],
              [(lm, URL + name) for lm, name in index_categories.items()])
    write_csv(layout.solution_csv, ["id", "images", "Usage"],
              [(hexid(q), " ".join(hexid(i) for i in gt) if gt else "None", usage)
               for q, gt, usage in solution])
    layout.country_dir.mkdir(parents=True, exist_ok=True)
    layout.country_codes_json.write_text(json.dumps(list(countries)))
    for code, names in countries.items():
        (layout.country_dir / f"{code}.json").write_text(json.dumps([{"name": n} for n in names]))
    write_csv(layout.continent_csv, ["Continent_Name", "Two_Letter_Country_Code"],
              [(cont, code) for code, cont in continents.items()])
    return layout


@pytest.fixture
def tiny_gldv2(tmp_path: Path) -> Layout:
    """A hand-built GLDv2 whose lists are known (see test_prepare.py for the expected answers).

    Train landmarks 20 and 10 are in train_clean.csv (rows 0 and 1 → labels 0 and 1); 30 and 40
    are not (labels 2 and 3, in order of first appearance in train.csv: c1 before d1).
    """
    return write_gldv2(
        tmp_path / "gldv2",
        train=[("a1", 10), ("c1", 30), ("b1", 20), ("a3", 10), ("d1", 40), ("c2", 30),
               ("b2", 20), ("e1", 20)],
        clean=[(20, ["b1", "b2"]), (10, ["a1"])],
        train_categories={10: "Cat_A", 20: "Cat_B,_Town", 30: "Cat_C", 40: "Cat_D"},
        index=[("f1", 500), ("f2", 600), ("f3", 700), ("f4", 500), ("f5", 700), ("f6", 700)],
        index_categories={500: "Cat_A", 600: "Cat_B,_Town", 700: "Cat_Z"},
        solution=[("91", ["f1", "f2"], "Private"), ("92", ["f4"], "Public"),
                  ("93", [], "Ignored"), ("94", ["f3"], "Public")],
        countries={"JP": ["Cat_A"], "XK": ["Cat_B,_Town"], "OTHER": ["Cat_C"], "NA": ["Cat_D"]},
        continents={"JP": "Asia", "NA": "Africa"},
    )


@pytest.fixture(scope="session")
def small_synth() -> SynthParams:
    """A mini-GLDv2 small enough for unit tests (a few hundred tiny images)."""
    return SynthParams(countries=4, clean_landmarks=8, clean_images=[3, 5], noisy_extras=[1, 2],
                       extra_landmarks=5, extra_images=[2, 4], test_landmarks=6,
                       queries_per_landmark=[1, 2], index_images=[2, 3], distractor_landmarks=6,
                       split_landmarks=2, ignored_queries=4, image_width=48, image_height=36)


@pytest.fixture(scope="session")
def small_pipeline(tmp_path_factory, small_synth):
    """A small mini-GLDv2 taken through synth and prepare: (params, prepared dir)."""
    from glr import prepare, synth
    from glr.params import parse_params

    base = tmp_path_factory.mktemp("pipeline")
    root = base / "mini"
    synth.generate(small_synth, root, workers=1, progress=False)
    params = parse_params({
        "data": {"root": str(root), "continent_table": str(root / "continent_codes.csv"),
                 "images_fingerprint": str(root / "images.md5")},
        "shard": {"samples_per_shard": 10, "workers": 1},
    })
    prepare.main(params, base / "prepared", base / "prepare.json")
    return params, base / "prepared"


@pytest.fixture(scope="session")
def small_shards(small_pipeline, tmp_path_factory):
    """The small pipeline's shards (written once per test session)."""
    from glr import shards

    params, prepared = small_pipeline
    out = tmp_path_factory.mktemp("shards") / "shards"
    shards.main(params, prepared, out, out.parent / "m.json", progress=False)
    return out


def endless(value):
    """An endless stream of one value (for mixing tests)."""
    while True:
        yield value
