"""Stage `prepare`: the four training lists and the evaluation sets, by method.md's rules.

Reads a GLDv2 root (real or mini) and writes to `data/prepared/`:

    labels.parquet        label, landmark_id, category, country, continent (one row per label)
    clean|c2x|full|all.parquet
                          id, split, label, clean, country, continent
                          (one row per image and label)
    reference.parquet     `all` without test images (`full` + index): the cached references
    val_queries.parquet   id, usage, images (ground-truth index ids): non-Ignored test queries
    eval_index.parquet    id: the index the validation queries are searched in
    summary.json          all counts

and the counts: `summary.json` (everything, per list, split and continent) and the headline
numbers `metrics/prepare.json` for `dvc metrics show`. Everything is vectorized (pandas/numpy
joins on uint64 ids): no Python loop runs per image, so real GLDv2 (4.1M train rows) takes
seconds.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from glr import files, gldv2
from glr.gldv2 import GLDv2FormatError, Layout
from glr.params import Params, PrepareParams

log = logging.getLogger(__name__)

LISTS = ("clean", "c2x", "full", "all")
CONTINENTS = ("Asia", "Europe", "Africa", "North America", "South America", "Antarctica",
              "Oceania", "OTHER")


@dataclass
class Metadata:
    """Everything `prepare` reads from one GLDv2 root, parsed and validated."""

    train: pd.DataFrame  # id (uint64), landmark_id
    clean_landmarks: np.ndarray  # landmark_id per train_clean.csv row
    clean_images: pd.DataFrame  # row, id
    train_categories: pd.DataFrame  # landmark_id, category
    index: pd.DataFrame  # id, landmark_id
    index_categories: pd.DataFrame  # landmark_id, category
    solution: pd.DataFrame  # id, usage, images (uint64 arrays)
    country_of_category: pd.DataFrame  # category, country
    continents: dict[str, str]
    continent_table: Path
    layout: Layout


def read_metadata(root: str | Path, continent_table: str | Path) -> Metadata:
    layout = Layout(Path(root))
    clean_landmarks, clean_images = gldv2.read_train_clean(layout.train_clean_csv)
    return Metadata(
        train=gldv2.read_train(layout.train_csv),
        clean_landmarks=clean_landmarks,
        clean_images=clean_images,
        train_categories=gldv2.read_label_to_category(layout.train_categories_csv),
        index=gldv2.read_index(layout.index_csv),
        index_categories=gldv2.read_label_to_category(layout.index_categories_csv),
        solution=gldv2.read_solution(layout.solution_csv),
        country_of_category=gldv2.read_country_categories(layout),
        continents=gldv2.read_continents(Path(continent_table)),
        continent_table=Path(continent_table),
        layout=layout,
    )


# --------------------------------------------------------------------------- labels


def label_table(meta: Metadata) -> pd.DataFrame:
    """One row per global label: clean rows first (file order), then the landmarks absent from
    train_clean.csv in order of first appearance in train.csv; with category, country, continent.
    """
    clean = np.asarray(meta.clean_landmarks)
    in_train = pd.unique(meta.train["landmark_id"].to_numpy())
    extra = in_train[~np.isin(in_train, clean)]
    labels = pd.DataFrame({"label": np.arange(len(clean) + len(extra), dtype=np.int64),
                           "landmark_id": np.concatenate([clean, extra]).astype(np.int64)})
    labels = labels.merge(meta.train_categories, on="landmark_id", how="left")
    labels = labels.merge(meta.country_of_category, on="category", how="left")
    missing = labels["country"].isna()
    if missing.any():
        log.warning("%d of %d labels have no country (category missing from the country "
                    "files); they get country OTHER", int(missing.sum()), len(labels))
    labels["country"] = labels["country"].fillna("OTHER")
    labels["continent"] = labels["country"].map(meta.continents)
    unknown = labels.loc[labels["continent"].isna(), "country"].unique()
    if len(unknown):
        raise GLDv2FormatError(
            f"{meta.continent_table}: no continent for country code(s) "
            f"{', '.join(sorted(unknown))} (listed in {meta.layout.country_codes_json})")
    return labels


# --------------------------------------------------------------------------- lists


def _image_list(ids: np.ndarray, split: str, labels: np.ndarray, clean: np.ndarray | bool
                ) -> pd.DataFrame:
    return pd.DataFrame({"id": np.asarray(ids, dtype=np.uint64),
                         "split": split,
                         "label": np.asarray(labels, dtype=np.int64),
                         "clean": np.broadcast_to(np.asarray(clean, dtype=bool), len(ids))})


def clean_list(meta: Metadata) -> pd.DataFrame:
    """train_clean.csv: label = row number, every image clean."""
    rows = meta.clean_images
    return _image_list(rows["id"].to_numpy(), "train", rows["row"].to_numpy(), True)


def full_list(meta: Metadata, labels: pd.DataFrame) -> pd.DataFrame:
    """Every train.csv row; clean if listed for its own landmark in train_clean.csv."""
    label_of = pd.Series(labels["label"].to_numpy(), index=labels["landmark_id"].to_numpy())
    train = meta.train
    image_label = label_of.reindex(train["landmark_id"].to_numpy()).to_numpy()
    listed = meta.clean_images.drop_duplicates("id")
    listed_row = pd.Series(listed["row"].to_numpy(), index=listed["id"].to_numpy())
    row_of_image = listed_row.reindex(train["id"].to_numpy()).to_numpy()
    is_clean = row_of_image == image_label  # NaN (not listed) compares False
    return _image_list(train["id"].to_numpy(), "train", image_label, is_clean)


def c2x_list(full: pd.DataFrame, num_clean_labels: int) -> pd.DataFrame:
    """The images of `full` whose landmark is in train_clean.csv."""
    return full[full["label"] < num_clean_labels].reset_index(drop=True)


def index_labels(meta: Metadata, labels: pd.DataFrame) -> pd.Series:
    """Train label of each index landmark through its category (missing where none matches).

    A category shared by several train landmarks maps to the last of them in
    train_label_to_category.csv, as the authors' dict did.
    """
    last_landmark = meta.train_categories.drop_duplicates("category", keep="last")
    train_by_category = (last_landmark.merge(labels[["landmark_id", "label"]], on="landmark_id")
                         .set_index("category")["label"])
    mapped = meta.index_categories["category"].map(train_by_category)
    return pd.Series(mapped.to_numpy(), index=meta.index_categories["landmark_id"].to_numpy())


def all_list(meta: Metadata, full: pd.DataFrame, labels: pd.DataFrame,
             holdout_val_queries: bool) -> pd.DataFrame:
    """`full` + index images mapped to a train label + test images (Ignored → -1; a scored query
    once per distinct label of its ground truth, unless validation queries are held out)."""
    landmark_label = index_labels(meta, labels)
    index = meta.index
    index_label = landmark_label.reindex(index["landmark_id"].to_numpy()).to_numpy()
    keep = ~np.isnan(index_label)
    index_part = _image_list(index["id"].to_numpy()[keep], "index", index_label[keep], True)

    solution = meta.solution
    ignored = solution[solution["usage"] == "Ignored"]
    ignored_part = _image_list(ignored["id"].to_numpy(), "test", np.full(len(ignored), -1), True)
    parts = [full, index_part, ignored_part]
    if not holdout_val_queries:
        parts.append(_test_query_part(meta, landmark_label))
    return pd.concat(parts, ignore_index=True)


def _test_query_part(meta: Metadata, landmark_label: pd.Series) -> pd.DataFrame:
    pairs = ground_truth_pairs(meta)
    index_landmark = pd.Series(meta.index["landmark_id"].to_numpy(),
                               index=meta.index["id"].to_numpy())
    pairs["label"] = landmark_label.reindex(
        index_landmark.reindex(pairs["image"].to_numpy()).to_numpy()).to_numpy()
    pairs = pairs.dropna(subset=["label"]).drop_duplicates(["query", "label"])
    return _image_list(pairs["query"].to_numpy(), "test", pairs["label"].to_numpy(), True)


def ground_truth_pairs(meta: Metadata) -> pd.DataFrame:
    """(query, image) per ground-truth index image of each scored query, in file order.

    Every ground-truth id must be in index_image_to_landmark.csv.
    """
    scored = meta.solution[meta.solution["usage"] != "Ignored"]
    # int64 even when there is no scored query (an empty map gives an object array, which
    # np.repeat refuses); readers reject such a solution, but Metadata can be built by hand.
    counts = scored["images"].map(len).to_numpy(dtype=np.int64)
    pairs = pd.DataFrame({
        "query": np.repeat(scored["id"].to_numpy(), counts),
        "image": (np.concatenate(scored["images"].to_list()) if len(scored)
                  else np.zeros(0, dtype=np.uint64)),
    })
    unknown = ~np.isin(pairs["image"].to_numpy(), meta.index["id"].to_numpy())
    if unknown.any():
        row = int(np.flatnonzero(unknown)[0])
        image, query = (gldv2.uint64_to_hex(pairs.iloc[row][["image", "query"]].to_numpy(
            dtype=np.uint64)).to_pylist())
        raise GLDv2FormatError(f"{meta.layout.solution_csv}: ground-truth image {image} of query "
                               f"{query} is not in {meta.layout.index_csv}")
    return pairs


def with_geography(images: pd.DataFrame, labels: pd.DataFrame) -> pd.DataFrame:
    """Add each image's country and continent (from its label; label -1 gets NONE)."""
    images = images.copy()
    label = images["label"].to_numpy()
    for column in ("country", "continent"):
        per_label = pd.Categorical(np.append(labels[column].to_numpy(dtype=object),
                                             gldv2.NO_COUNTRY))
        # Index the per-label codes (label -1 picks the appended NONE): no per-image strings.
        images[column] = pd.Categorical.from_codes(per_label.codes[label], per_label.categories)
    return images


# --------------------------------------------------------------------------- evaluation sets


def validation_queries(meta: Metadata) -> pd.DataFrame:
    """Scored (non-Ignored) test queries with Usage and ground-truth index ids."""
    scored = meta.solution[meta.solution["usage"] != "Ignored"].reset_index(drop=True)
    ground_truth_pairs(meta)  # validates that every ground-truth id is an index image
    return scored


def evaluation_index(meta: Metadata, params: PrepareParams) -> np.ndarray:
    """Index ids searched at validation, in index-file order.

    `all`: the whole index. `list`: the ids of a file, `sample`: a seeded sample; both expanded
    with every ground-truth image of the validation queries, as the authors did.
    """
    index_ids = meta.index["id"].to_numpy()
    if params.eval_index == "all":
        return index_ids
    if params.eval_index == "list":
        chosen = read_id_list(Path(params.eval_index_list or ""))
        unknown = ~np.isin(chosen, index_ids)
        if unknown.any():
            bad = gldv2.uint64_to_hex(chosen[unknown][:1])[0].as_py()
            raise GLDv2FormatError(f"{params.eval_index_list}: id {bad} is not in "
                                   f"{meta.layout.index_csv}")
    else:
        rng = np.random.default_rng(params.seed)
        size = min(params.eval_index_sample, len(index_ids))
        chosen = rng.choice(index_ids, size=size, replace=False)
    keep = np.isin(index_ids, chosen) | np.isin(index_ids, ground_truth_pairs(meta)["image"])
    return index_ids[keep]


def read_id_list(path: Path) -> np.ndarray:
    """Ids from a file: one per line, or a CSV with an `id` column."""
    if not path.is_file():
        raise GLDv2FormatError(f"{path}: id list not found")
    lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if lines and lines[0].split(",")[0] == "id":
        lines = [line.split(",")[0] for line in lines[1:]]
    return gldv2.hex_to_uint64(lines, str(path))


# --------------------------------------------------------------------------- summary


def list_counts(images: pd.DataFrame) -> dict:
    labelled = images["label"] >= 0
    counts = {
        "images": len(images),
        "unique_images": int(images["id"].nunique()),
        "labels": int(images.loc[labelled, "label"].nunique()),
        "clean": int(images["clean"].sum()),
        "noisy": int((~images["clean"]).sum()),
        "unlabelled": int((~labelled).sum()),
    }
    by_split = images["split"].value_counts()
    counts["by_split"] = {split: int(by_split.get(split, 0)) for split in gldv2.SPLITS}
    by_continent = images["continent"].value_counts()
    counts["by_continent"] = {c: int(by_continent.get(c, 0)) for c in CONTINENTS}
    return counts


@dataclass
class Prepared:
    labels: pd.DataFrame
    lists: dict[str, pd.DataFrame]
    reference: pd.DataFrame
    val_queries: pd.DataFrame
    eval_index: np.ndarray


def prepare(meta: Metadata, params: PrepareParams) -> Prepared:
    """All lists and evaluation sets from parsed metadata (pure; no files written)."""
    labels = label_table(meta)
    full = full_list(meta, labels)
    lists = {
        "clean": clean_list(meta),
        "c2x": c2x_list(full, len(meta.clean_landmarks)),
        "full": full,
        "all": all_list(meta, full, labels, params.holdout_val_queries),
    }
    lists = {name: with_geography(images, labels) for name, images in lists.items()}
    # The authors' references: `full` + index images. Test images never are, whatever the
    # holdout: a validation query among them would tag itself with its own label.
    everything = lists["all"]
    reference = everything[(everything["label"] >= 0)
                           & (everything["split"].astype(str) != "test")].reset_index(drop=True)
    return Prepared(labels=labels, lists=lists, reference=reference,
                    val_queries=validation_queries(meta), eval_index=evaluation_index(meta, params))


def summary(result: Prepared, params: PrepareParams) -> dict:
    """Every count: per list (images, labels, clean/noisy, per split, per continent) and the
    evaluation sets. Written to data/prepared/summary.json."""
    usage = result.val_queries["usage"].value_counts()
    return {
        **{name: list_counts(images) for name, images in result.lists.items()},
        "reference": {"images": len(result.reference),
                      "labels": int(result.reference["label"].nunique())},
        "val_queries": {"total": len(result.val_queries),
                        "public": int(usage.get("Public", 0)),
                        "private": int(usage.get("Private", 0))},
        "eval_index": {"images": len(result.eval_index), "mode": params.eval_index},
        "holdout_val_queries": params.holdout_val_queries,
    }


def headline_metrics(counts: dict) -> dict:
    """The part of the summary that `dvc metrics show` prints: numbers only, one row."""
    metrics: dict = {}
    for name in LISTS:
        c = counts[name]
        metrics[name] = {key: c[key] for key in ("images", "labels", "clean", "noisy")}
    metrics["all"]["from_index"] = counts["all"]["by_split"]["index"]
    metrics["all"]["from_test"] = counts["all"]["by_split"]["test"]
    metrics["all"]["unlabelled"] = counts["all"]["unlabelled"]
    metrics["all_by_continent"] = counts["all"]["by_continent"]
    metrics["reference"] = counts["reference"]
    metrics["val_queries"] = counts["val_queries"]
    metrics["eval_index"] = {"images": counts["eval_index"]["images"]}
    return metrics


# --------------------------------------------------------------------------- files


def to_arrow(images: pd.DataFrame) -> pa.Table:
    """The on-disk form of a table: uint64 ids written back as hex strings."""
    columns = {}
    for name in images.columns:
        if name == "id":
            columns[name] = gldv2.uint64_to_hex(images[name].to_numpy())
        elif name == "images":
            columns[name] = pa.array([gldv2.uint64_to_hex(v).to_pylist() for v in images[name]],
                                     type=pa.list_(pa.string()))
        else:
            columns[name] = pa.Array.from_pandas(images[name])
    return pa.table(columns)


def read_list(path: Path) -> pd.DataFrame:
    """Read a prepared table back (ids stay hex strings)."""
    return pq.read_table(path).to_pandas()


def main(params: Params, out_dir: Path, metrics_path: Path) -> dict:
    root = Path(params.data.root)
    log.info("reading GLDv2 metadata from %s", root)
    meta = read_metadata(root, params.data.continent_table)
    result = prepare(meta, params.prepare)
    out_dir = Path(out_dir)
    files.write_parquet(out_dir / "labels.parquet", to_arrow(result.labels))
    for name, images in result.lists.items():
        files.write_parquet(out_dir / f"{name}.parquet", to_arrow(images))
    files.write_parquet(out_dir / "reference.parquet", to_arrow(result.reference))
    files.write_parquet(out_dir / "val_queries.parquet", to_arrow(result.val_queries))
    files.write_parquet(out_dir / "eval_index.parquet",
                        pa.table({"id": gldv2.uint64_to_hex(result.eval_index)}))
    counts = summary(result, params.prepare)
    files.write_json(out_dir / "summary.json", counts)
    files.write_json(Path(metrics_path), headline_metrics(counts))
    for name in LISTS:
        c = counts[name]
        log.info("%-5s %9d images %7d labels (%d clean, %d noisy)", name, c["images"], c["labels"],
                 c["clean"], c["noisy"])
    log.info("reference %d images; %d validation queries; evaluation index %d images",
             counts["reference"]["images"], counts["val_queries"]["total"],
             counts["eval_index"]["images"])
    if not params.prepare.holdout_val_queries:
        log.warning("prepare.holdout_val_queries is false: the validation queries are in `all`, "
                    "so metrics after an `all` phase are contaminated (as in the authors' runs)")
    return counts
