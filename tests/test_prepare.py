"""`glr prepare` on a hand-built GLDv2 with known answers (fixture `tiny_gldv2` in conftest)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import hexid, write_csv
from glr import prepare
from glr.gldv2 import GLDv2FormatError, uint64_to_hex
from glr.params import Params, PrepareParams, parse_params


def run(layout, **overrides) -> prepare.Prepared:
    meta = prepare.read_metadata(layout.root, layout.continent_csv)
    return prepare.prepare(meta, PrepareParams(**overrides))


def rows(images: pd.DataFrame) -> list[tuple]:
    ids = uint64_to_hex(images["id"].to_numpy()).to_pylist()
    return [(i.lstrip("0"), int(label), bool(clean))
            for i, label, clean in zip(ids, images["label"], images["clean"], strict=True)]


def test_labels_clean_rows_first_then_first_appearance(tiny_gldv2):
    labels = run(tiny_gldv2).labels
    assert labels["landmark_id"].tolist() == [20, 10, 30, 40]
    assert labels["label"].tolist() == [0, 1, 2, 3]
    assert labels["category"].tolist() == ["Cat_B,_Town", "Cat_A", "Cat_C", "Cat_D"]
    assert labels["country"].tolist() == ["XK", "JP", "OTHER", "NA"]
    assert labels["continent"].tolist() == ["Europe", "Asia", "OTHER", "Africa"]


def test_clean_full_c2x(tiny_gldv2):
    lists = run(tiny_gldv2).lists
    assert rows(lists["clean"]) == [("b1", 0, True), ("b2", 0, True), ("a1", 1, True)]
    assert rows(lists["full"]) == [("a1", 1, True), ("c1", 2, False), ("b1", 0, True),
                                   ("a3", 1, False), ("d1", 3, False), ("c2", 2, False),
                                   ("b2", 0, True), ("e1", 0, False)]
    assert rows(lists["c2x"]) == [("a1", 1, True), ("b1", 0, True), ("a3", 1, False),
                                  ("b2", 0, True), ("e1", 0, False)]


def test_all_as_the_authors_built_it(tiny_gldv2):
    result = run(tiny_gldv2, holdout_val_queries=False)
    all_list = result.lists["all"]
    # index: f3, f5, f6 (category Cat_Z, no train landmark) are dropped
    # test: 93 is Ignored → -1; 91's ground truth spans labels 1 then 0 → twice; 94's ground
    # truth has no train label → not added
    assert rows(all_list)[8:] == [("f1", 1, True), ("f2", 0, True), ("f4", 1, True),
                                  ("93", -1, True), ("91", 1, True), ("91", 0, True),
                                  ("92", 1, True)]
    assert all_list["split"].tolist()[8:] == ["index"] * 3 + ["test"] * 4
    ignored = all_list[all_list["label"] == -1]
    assert ignored["country"].tolist() == ["NONE"] and ignored["continent"].tolist() == ["NONE"]
    # references: full + index images, never a test image (91 and 92 are validation queries)
    assert len(result.reference) == len(all_list) - 4
    assert (result.reference["label"] >= 0).all()
    assert set(result.reference["split"].astype(str)) == {"train", "index"}


def test_holdout_keeps_validation_queries_out_of_all(tiny_gldv2):
    all_list = run(tiny_gldv2, holdout_val_queries=True).lists["all"]
    assert rows(all_list)[8:] == [("f1", 1, True), ("f2", 0, True), ("f4", 1, True),
                                  ("93", -1, True)]


def test_geography_per_image(tiny_gldv2):
    full = run(tiny_gldv2).lists["full"]
    assert full["country"].astype(str).tolist() == ["JP", "OTHER", "XK", "JP", "NA", "OTHER",
                                                    "XK", "XK"]
    assert full["continent"].astype(str).tolist()[:5] == ["Asia", "OTHER", "Europe", "Asia",
                                                          "Africa"]


def test_validation_queries_and_evaluation_index(tiny_gldv2, tmp_path):
    result = run(tiny_gldv2)
    queries = result.val_queries
    assert uint64_to_hex(queries["id"].to_numpy()).to_pylist() == [hexid(q) for q in
                                                                    ("91", "92", "94")]
    assert queries["usage"].tolist() == ["Private", "Public", "Public"]
    assert [len(g) for g in queries["images"]] == [2, 1, 1]
    assert len(result.eval_index) == 6  # mode all: the whole index

    id_file = tmp_path / "ids.txt"
    id_file.write_text(hexid("f5") + "\n")
    listed = run(tiny_gldv2, eval_index="list", eval_index_list=str(id_file)).eval_index
    # f5 plus every ground-truth image (f1, f2, f4, f3), in index order; f6 is left out
    assert uint64_to_hex(listed).to_pylist() == [hexid(i) for i in ("f1", "f2", "f3", "f4",
                                                                    "f5")]
    sampled = run(tiny_gldv2, eval_index="sample", eval_index_sample=1, seed=3).eval_index
    assert len(sampled) in (4, 5)
    assert set(uint64_to_hex(sampled).to_pylist()) >= {hexid(i) for i in ("f1", "f2", "f3",
                                                                           "f4")}


def test_summary_counts(tiny_gldv2):
    params = PrepareParams(holdout_val_queries=False)
    result = run(tiny_gldv2, holdout_val_queries=False)
    counts = prepare.summary(result, params)
    assert counts["full"] | {"by_split": None, "by_continent": None} == {
        "images": 8, "unique_images": 8, "labels": 4, "clean": 3, "noisy": 5, "unlabelled": 0,
        "by_split": None, "by_continent": None}
    assert counts["all"]["images"] == 15 and counts["all"]["unique_images"] == 14
    assert counts["all"]["by_continent"]["Asia"] == 6  # label 1: a1 a3, f1 f4, queries 91 92
    assert counts["val_queries"] == {"total": 3, "public": 2, "private": 1}
    headline = prepare.headline_metrics(counts)
    assert headline["all"]["from_index"] == 3 and headline["all"]["unlabelled"] == 1


def test_main_writes_parquet_and_metrics(tiny_gldv2, tmp_path):
    params = parse_params({"data": {"root": str(tiny_gldv2.root),
                                    "continent_table": str(tiny_gldv2.continent_csv)}})
    assert isinstance(params, Params)
    out, metrics = tmp_path / "prepared", tmp_path / "metrics" / "prepare.json"
    prepare.main(params, out, metrics)
    full = prepare.read_list(out / "full.parquet")
    assert full["id"].tolist()[0] == hexid("a1")
    assert list(full.columns) == ["id", "split", "label", "clean", "country", "continent"]
    queries = prepare.read_list(out / "val_queries.parquet")
    assert list(queries["images"].iloc[0]) == [hexid("f1"), hexid("f2")]
    assert json.loads(metrics.read_text())["full"]["images"] == 8
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["labels.parquet", "clean.parquet", "c2x.parquet", "full.parquet", "all.parquet",
         "reference.parquet", "val_queries.parquet", "eval_index.parquet", "summary.json"])


# --------------------------------------------------------------------------- malformed input


def test_missing_column_names_file_and_column(tiny_gldv2):
    write_csv(tiny_gldv2.train_csv, ["id", "url"], [(hexid("a1"), "x")])
    with pytest.raises(GLDv2FormatError, match=r"train\.csv: missing column\(s\) landmark_id"):
        prepare.read_metadata(tiny_gldv2.root, tiny_gldv2.continent_csv)


def test_non_integer_landmark_id(tiny_gldv2):
    write_csv(tiny_gldv2.train_csv, ["id", "url", "landmark_id"],
              [(hexid("a1"), "x", 10), (hexid("a2"), "x", "abc")])
    with pytest.raises(GLDv2FormatError, match=r"train\.csv: .*'abc'.*expected an integer"):
        prepare.read_metadata(tiny_gldv2.root, tiny_gldv2.continent_csv)


def test_country_without_continent(tiny_gldv2):
    write_csv(tiny_gldv2.continent_csv, ["Continent_Name", "Two_Letter_Country_Code"],
              [("Asia", "JP")])
    with pytest.raises(GLDv2FormatError, match=r"continent_codes\.csv: no continent for "
                                               r"country code\(s\) NA"):
        run(tiny_gldv2)


def test_ground_truth_outside_the_index(tiny_gldv2):
    write_csv(tiny_gldv2.solution_csv, ["id", "images", "Usage"],
              [(hexid("91"), hexid("ff"), "Public")])
    with pytest.raises(GLDv2FormatError, match=r"ground-truth image 0+ff of query 0+91 is not"):
        run(tiny_gldv2)


def test_eval_index_list_with_unknown_id(tiny_gldv2, tmp_path: Path):
    id_file = tmp_path / "ids.txt"
    id_file.write_text("id\n" + hexid("abc") + "\n")
    with pytest.raises(GLDv2FormatError, match=r"ids\.txt: id 0+abc is not in"):
        run(tiny_gldv2, eval_index="list", eval_index_list=str(id_file))


def test_label_without_country_gets_other(tiny_gldv2, caplog):
    (tiny_gldv2.country_dir / "NA.json").write_text("[]")
    labels = run(tiny_gldv2).labels
    assert labels["country"].tolist()[3] == "OTHER"
    assert "1 of 4 labels have no country" in caplog.text
    assert np.all(labels["continent"].notna())


def test_shared_category_maps_to_the_last_train_landmark_in_file_order(tiny_gldv2):
    """Landmarks 40 (label 3) and 10 (label 1) share Cat_A; 10 comes last in the file."""
    write_csv(tiny_gldv2.train_categories_csv, ["landmark_id", "category"],
              [(40, "http://commons.wikimedia.org/wiki/Category:Cat_A"),
               (10, "http://commons.wikimedia.org/wiki/Category:Cat_A"),
               (20, "http://commons.wikimedia.org/wiki/Category:Cat_B,_Town"),
               (30, "http://commons.wikimedia.org/wiki/Category:Cat_C")])
    all_list = run(tiny_gldv2).lists["all"]
    index = all_list[all_list["split"] == "index"]
    assert rows(index) == [("f1", 1, True), ("f2", 0, True), ("f4", 1, True)]


@pytest.mark.parametrize(("file", "header"), [
    ("train_csv", ["id", "url", "landmark_id"]),
    ("train_clean_csv", ["landmark_id", "images"]),
    ("solution_csv", ["id", "images", "Usage"]),
])
def test_header_only_metadata_file_stops_prepare(tiny_gldv2, file, header):
    """A header-only train list used to give empty lists and rc 0; a header-only solution a
    numpy TypeError in ground_truth_pairs."""
    path = getattr(tiny_gldv2, file)
    write_csv(path, header, [])
    with pytest.raises(GLDv2FormatError, match=rf"{path.name}: no data rows after the header"):
        prepare.read_metadata(tiny_gldv2.root, tiny_gldv2.continent_csv)


def test_ground_truth_pairs_without_scored_queries_is_empty(tiny_gldv2):
    """Metadata built by hand (no reader check) with only Ignored queries: no pairs, no error."""
    meta = prepare.read_metadata(tiny_gldv2.root, tiny_gldv2.continent_csv)
    meta.solution = meta.solution[meta.solution["usage"] == "Ignored"].reset_index(drop=True)
    pairs = prepare.ground_truth_pairs(meta)
    assert len(pairs) == 0 and pairs["image"].dtype == np.uint64
