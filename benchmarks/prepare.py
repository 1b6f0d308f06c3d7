"""`glr bench prepare`: wall time and peak memory of `glr prepare` on GLDv2-sized metadata.

The metadata is generated with numpy (no images): train.csv with 4,132,914 rows over 203,094
landmarks (81,313 of them in train_clean.csv with 1,580,470 clean images, 3,223,078 c2x rows),
761,757 index images, a test solution with 1,129 scored queries, ~200 country files. Then
`glr prepare` runs in a fresh subprocess, timed, and its peak RSS is read from the kernel.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from glr.gldv2 import SHIPPED_CONTINENTS, Layout, uint64_to_hex

log = logging.getLogger(__name__)

GLDV2 = {"train_rows": 4_132_914, "landmarks": 203_094, "clean_landmarks": 81_313,
         "clean_images": 1_580_470, "c2x_images": 3_223_078, "index_images": 761_757,
         "index_landmarks": 101_302, "test_images": 117_577, "scored_queries": 1_129}
TARGETS = {"seconds": 60.0, "peak_rss_gb": 4.0}
CATEGORY_URL = "http://commons.wikimedia.org/wiki/Category:"


def _write(table: pa.Table, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pacsv.write_csv(table, path, pacsv.WriteOptions(quoting_style="needed"))


def _spread(rng: np.random.Generator, total: int, groups: int) -> np.ndarray:
    """Group index per item: every group gets at least one item, the rest at random."""
    extra = rng.integers(0, groups, size=total - groups)
    return np.sort(np.concatenate([np.arange(groups), extra]))


def generate_metadata(root: Path, scale: float = 1.0, seed: int = 0) -> dict:
    """Write GLDv2-shaped metadata CSVs/JSONs (no images) under `root`; returns the sizes."""
    rng = np.random.default_rng(seed)
    n = {key: max(1, int(value * scale)) for key, value in GLDV2.items()}
    n["clean_landmarks"] = min(n["clean_landmarks"], n["landmarks"] - 1)
    n["c2x_images"] = max(n["c2x_images"], n["clean_images"], n["clean_landmarks"])
    n["clean_images"] = max(n["clean_images"], n["clean_landmarks"])
    layout = Layout(root)

    landmark_ids = rng.permutation(n["landmarks"]).astype(np.int64)
    clean_lm = landmark_ids[: n["clean_landmarks"]]
    other_lm = landmark_ids[n["clean_landmarks"]:]
    c2x_group = _spread(rng, n["c2x_images"], len(clean_lm))
    other_group = _spread(rng, n["train_rows"] - n["c2x_images"], len(other_lm))
    row_landmark = np.concatenate([clean_lm[c2x_group], other_lm[other_group]])
    image_ids = rng.integers(0, 2**63, size=n["train_rows"], dtype=np.int64).astype(np.uint64)
    # clean: the first image of each clean landmark plus a random share of the others
    first = np.r_[True, c2x_group[1:] != c2x_group[:-1]]
    chance = (n["clean_images"] - len(clean_lm)) / max(1, (~first).sum())
    is_clean = first | (rng.random(len(c2x_group)) < chance)
    order = rng.permutation(n["train_rows"])
    hex_ids = uint64_to_hex(image_ids)
    url = pc.binary_join_element_wise(
        "https://upload.wikimedia.org/wikipedia/commons/a/ab/Photo_of_a_landmark_", hex_ids,
        ".jpg", "")
    _write(pa.table({"id": hex_ids.take(order), "url": url.take(order),
                     "landmark_id": pa.array(row_landmark[order])}), layout.train_csv)

    clean_rows = pd.DataFrame({"landmark_id": clean_lm[c2x_group[is_clean]],
                               "id": hex_ids.to_numpy(zero_copy_only=False)[: len(c2x_group)][
                                   is_clean]})
    clean_table = clean_rows.groupby("landmark_id", sort=True)["id"].agg(" ".join).reset_index()
    _write(pa.table({"landmark_id": clean_table["landmark_id"], "images": clean_table["id"]}),
           layout.train_clean_csv)

    names = pc.binary_join_element_wise(CATEGORY_URL + "Landmark_",
                                        pa.array(landmark_ids.astype(str)), "")
    _write(pa.table({"landmark_id": landmark_ids, "category": names}), layout.train_categories_csv)

    # index landmarks: 90% share a train landmark's category, the rest are index-only
    idx_lm = rng.permutation(10**6)[: n["index_landmarks"]].astype(np.int64)
    mapped = rng.random(len(idx_lm)) < 0.9
    idx_category = np.where(mapped, rng.choice(landmark_ids, size=len(idx_lm)).astype(str),
                            np.char.add("IndexOnly_", idx_lm.astype(str)))
    _write(pa.table({"landmark_id": idx_lm,
                     "category": pc.binary_join_element_wise(
                         CATEGORY_URL + "Landmark_", pa.array(idx_category), "")}),
           layout.index_categories_csv)
    idx_group = _spread(rng, n["index_images"], len(idx_lm))
    idx_ids = rng.integers(0, 2**63, size=n["index_images"], dtype=np.int64).astype(np.uint64)
    idx_order = rng.permutation(n["index_images"])
    _write(pa.table({"id": uint64_to_hex(idx_ids[idx_order]),
                     "landmark_id": idx_lm[idx_group][idx_order]}), layout.index_csv)

    # test: scored queries with the index images of one landmark as ground truth
    test_ids = uint64_to_hex(rng.integers(0, 2**63, size=n["test_images"],
                                          dtype=np.int64).astype(np.uint64)).to_pylist()
    starts = np.r_[0, np.flatnonzero(np.diff(idx_group)) + 1, len(idx_group)]
    idx_hex = uint64_to_hex(idx_ids).to_pylist()
    images, usage = [], []
    for q in range(n["test_images"]):
        if q < n["scored_queries"]:
            g = int(rng.integers(len(idx_lm)))
            images.append(" ".join(idx_hex[starts[g]: starts[g + 1]]))
            usage.append("Public" if q % 3 == 0 else "Private")
        else:
            images.append("None")
            usage.append("Ignored")
    _write(pa.table({"id": test_ids, "images": images, "Usage": usage}), layout.solution_csv)

    codes = pd.read_csv(SHIPPED_CONTINENTS, keep_default_na=False)["Two_Letter_Country_Code"]
    codes = [*codes.tolist()[:200], "XK", "OTHER"]
    country_of = rng.integers(0, len(codes), size=n["landmarks"])
    category_names = names.to_numpy(zero_copy_only=False)
    layout.country_dir.mkdir(parents=True, exist_ok=True)
    layout.country_codes_json.write_text(json.dumps(codes))
    for i, code in enumerate(codes):
        entries = [{"name": name[len(CATEGORY_URL):]} for name in category_names[country_of == i]]
        (layout.country_dir / f"{code}.json").write_text(json.dumps(entries))
    return n


def run_prepare(root: Path, workdir: Path) -> dict:
    """Run `glr prepare` on `root` in a subprocess; wall seconds and peak RSS."""
    params = workdir / "params.yaml"
    params.write_text(json.dumps({"data": {"root": str(root),
                                           "continent_table": str(SHIPPED_CONTINENTS)}}))
    cmd = [sys.executable, "-m", "glr", "prepare", "--params", str(params),
           "--out", str(workdir / "prepared"), "--metrics", str(workdir / "prepare.json")]
    start = time.perf_counter()
    subprocess.run(cmd, check=True)
    seconds = time.perf_counter() - start
    peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    counts = json.loads((workdir / "prepare.json").read_text())
    return {"seconds": round(seconds, 2), "peak_rss_gb": round(peak_kb / 2**20, 3),
            "counts": counts}


def main(scale: float, out: Path, workdir: Path | None) -> dict:
    with tempfile.TemporaryDirectory(prefix="glr-bench-prepare-") as tmp:
        work = Path(workdir) if workdir else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        root = work / "gldv2"
        log.info("generating GLDv2-sized metadata (scale %.3g) under %s", scale, root)
        start = time.perf_counter()
        sizes = generate_metadata(root, scale)
        log.info("generated in %.1f s; running glr prepare", time.perf_counter() - start)
        measured = run_prepare(root, work)
    result = {
        "benchmark": "prepare",
        "scale": scale,
        "sizes": sizes,
        "seconds": measured["seconds"],
        "peak_rss_gb": measured["peak_rss_gb"],
        "targets": TARGETS,
        "meets_targets": (measured["seconds"] <= TARGETS["seconds"]
                          and measured["peak_rss_gb"] <= TARGETS["peak_rss_gb"]),
        "prepared_counts": measured["counts"],
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "platform": platform.platform()},
    }
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    log.info("prepare: %.1f s, peak %.2f GB (targets %.0f s, %.0f GB) -> %s", result["seconds"],
             result["peak_rss_gb"], TARGETS["seconds"], TARGETS["peak_rss_gb"], out)
    return result
