"""Stage `retrieve`: search the evaluation index, Landmark-Country rerank, ensemble, submission.

Per backbone: S = Q·Xᵀ (exact cosine); optionally (`retrieve.full_kr`, off in the authors'
submission) S is replaced by the full k-reciprocal similarity of queries and index, as in
their code; then, when `retrieve.rerank` is on, the authors' Landmark-Country aware rerank
(glr.rerank: index images tagged by their top-1 reference, queries by k-reciprocal
similarity to the references, S += α·w_label + β·v_country). The ensemble is the
weighted sum of the backbones' S. The reference matrix (4.9M × 512 on GLDv2) is memory-mapped
and streamed in blocks by glr.search; no query×reference or index×reference matrix is built.

Writes `data/retrieval/`:

    submission.csv                  Kaggle format (id,images): the final ranking (top k)
    topk/<variant>.parquet          id, images (top-k index ids), scores: every variant,
                                    <backbone>-plain, <backbone>-rerank, ensemble-plain,
                                    ensemble-rerank (the -rerank ones when a rerank is on)
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from glr import metric, rerank
from glr.params import Params

log = logging.getLogger(__name__)


@dataclass
class Features:
    """One backbone's extracted features and id tables."""

    query: np.ndarray
    index: np.ndarray
    ref: np.ndarray  # memory-mapped float16
    query_ids: list[str]
    index_ids: list[str]
    ref_labels: np.ndarray
    ref_countries: pd.Series


def load_features(folder: Path) -> Features:
    folder = Path(folder)
    ref_table = pq.read_table(folder / "ref.parquet").to_pandas()
    return Features(
        query=np.load(folder / "query.npy").astype(np.float32),
        index=np.load(folder / "index.npy").astype(np.float32),
        ref=np.load(folder / "ref.npy", mmap_mode="r"),
        query_ids=pq.read_table(folder / "query.parquet").column("id").to_pylist(),
        index_ids=pq.read_table(folder / "index.parquet").column("id").to_pylist(),
        ref_labels=ref_table["label"].to_numpy(dtype=np.int64),
        ref_countries=ref_table["country"].astype(str),
    )


def backbone_scores(features: Features, params: Params, country_codes: dict[str, int]
                    ) -> tuple[np.ndarray, np.ndarray | None]:
    """(plain cosine S, reranked S or None) of one backbone."""
    settings = params.retrieve
    plain = rerank.cosine_scores(features.query, features.index)
    # The full k-reciprocal rerank (off in the submission) replaces the cosine similarity that
    # the Landmark-Country rerank then adds its tags to, as in the authors' code.
    base = (rerank.k_reciprocal_rerank(features.query, features.index, k1=settings.full_kr_k1,
                                       k2=settings.full_kr_k2,
                                       lambda_value=settings.full_kr_lambda,
                                       block_rows=settings.block_rows)
            if settings.full_kr else plain)
    if not settings.rerank:
        return plain, (base if settings.full_kr else None)
    countries = features.ref_countries.map(country_codes).to_numpy(dtype=np.int64)
    index_labels, index_countries = rerank.index_tags(
        features.index, features.ref, features.ref_labels, countries,
        block_rows=settings.block_rows)
    tags = rerank.query_tags(features.query, features.ref, features.ref_labels, countries,
                             k_neighbors=settings.k_neighbors, k1=settings.k1, k2=settings.k2,
                             lambda_value=settings.lambda_value, top=settings.top,
                             block_rows=settings.block_rows)
    reranked = rerank.landmark_country_rerank(base, index_labels, index_countries, tags,
                                              settings.alpha, settings.beta)
    return plain, reranked


def ranking_table(scores: np.ndarray, query_ids: list[str], index_ids: list[str], k: int
                  ) -> pd.DataFrame:
    """Top-k index ids and scores per query."""
    order, top_scores = rerank.top_k_ids(scores, k)
    ids = np.asarray(index_ids, dtype=object)
    return pd.DataFrame({"id": query_ids, "images": [list(ids[row]) for row in order],
                         "scores": [list(map(float, row)) for row in top_scores]})


def write_ranking(table: pd.DataFrame, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    pq.write_table(pa.Table.from_pandas(table, preserve_index=False), tmp)
    tmp.replace(path)


def main(params: Params, features_dir: Path, out_dir: Path) -> dict[str, pd.DataFrame]:
    settings = params.retrieve
    backbones = params.model.backbones
    weights = settings.weights or [1.0] * len(backbones)
    if len(weights) != len(backbones):
        raise ValueError(f"params retrieve.weights has {len(weights)} values for "
                         f"{len(backbones)} backbones ({', '.join(backbones)})")
    out_dir = Path(out_dir)
    rankings: dict[str, pd.DataFrame] = {}
    ensemble_plain = ensemble_rerank = None
    query_ids: list[str] = []
    index_ids: list[str] = []
    for backbone, weight in zip(backbones, weights, strict=True):
        features = load_features(Path(features_dir) / backbone)
        if query_ids and (features.query_ids != query_ids or features.index_ids != index_ids):
            raise ValueError(f"{Path(features_dir) / backbone}: query or index ids differ from "
                             f"{backbones[0]}'s; re-extract all backbones")
        query_ids, index_ids = features.query_ids, features.index_ids
        codes = {c: i for i, c in enumerate(sorted(features.ref_countries.unique()))}
        log.info("%s: %d queries × %d index images, %d references", backbone,
                 len(query_ids), len(index_ids), len(features.ref))
        plain, reranked = backbone_scores(features, params, codes)
        rankings[f"{backbone}-plain"] = ranking_table(plain, query_ids, index_ids, settings.k)
        ensemble_plain = plain * weight if ensemble_plain is None else (
            ensemble_plain + plain * weight)
        if reranked is not None:
            rankings[f"{backbone}-rerank"] = ranking_table(reranked, query_ids, index_ids,
                                                           settings.k)
            ensemble_rerank = reranked * weight if ensemble_rerank is None else (
                ensemble_rerank + reranked * weight)
        del plain, reranked, features
    assert ensemble_plain is not None
    rankings["ensemble-plain"] = ranking_table(ensemble_plain, query_ids, index_ids, settings.k)
    final = "ensemble-plain"
    if ensemble_rerank is not None:
        rankings["ensemble-rerank"] = ranking_table(ensemble_rerank, query_ids, index_ids,
                                                    settings.k)
        final = "ensemble-rerank"
    for name, table in rankings.items():
        write_ranking(table, out_dir / "topk" / f"{name}.parquet")
    final_table = rankings[final]
    metric.write_submission_csv(out_dir / "submission.csv",
                                dict(zip(final_table["id"], final_table["images"], strict=True)))
    (out_dir / "variants.json").write_text(json.dumps({"final": final,
                                                       "variants": sorted(rankings)}, indent=2))
    log.info("wrote %s (%s) and %d rankings", out_dir / "submission.csv", final, len(rankings))
    return rankings
