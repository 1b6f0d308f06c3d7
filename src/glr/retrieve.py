"""Stage `retrieve`: search the evaluation index, Landmark-Country rerank, ensemble, submission.

Per backbone: S = Q·Xᵀ (exact cosine); optionally (`retrieve.full_kr`, off in the authors'
submission) S is replaced by the full k-reciprocal similarity of queries and index, as in
their code; then, when `retrieve.rerank` is on, the authors' Landmark-Country aware rerank
(glr.rerank: index images tagged by their top-1 reference, which the `tag` stage stored in
`data/tags/`; queries by k-reciprocal similarity to the references; S += α·w_label +
β·v_country). The ensemble is the weighted sum of the backbones' S. For the queries' tags the
reference matrix (4.9M × 512 on GLDv2) is memory-mapped and streamed in blocks, twice per
backbone (`rerank.reference_neighbors`, 1,129 and at most 1,129 × 30 rows), by glr.search on
the `retrieve.device` / `retrieve.precision` backend; no query×reference matrix is built.

Memory (GLDv2: 1,129 queries × 761,757 index images, d = 512, any number of backbones): one
dense float32 query × index matrix, the ensemble's plain scores (3.4 GB; none with a single
backbone); the current
backbone's index features in float32 (1.6 GB); one converted reference block (0.5 GB) and
chunks of ~128 MB. Every per-backbone ranking and the reranked variants are computed a chunk
of queries at a time; the rerank's boosts are sparse (tags), added per chunk. About 6 GB in
all, beyond the page cache of the memory-mapped features. `retrieve.full_kr` adds two dense
matrices (6.9 GB).

Writes `data/retrieval/`:

    submission.csv                  Kaggle format (id,images): the final ranking (top k)
    topk/<variant>.parquet          id, images (top-k index ids), scores: every variant,
                                    <backbone>-plain, <backbone>-rerank, and with several
                                    backbones ensemble-plain, ensemble-rerank (the -rerank
                                    ones when a rerank is on); with `retrieve.superglobal`
                                    <backbone>-superglobal and <backbone>-rerank_superglobal
                                    (glr.superglobal; per backbone, not for the ensemble)
    tags/<backbone>-queries.parquet id, labels, label_weights, countries, country_weights:
                                    each query's tags (the top-3 vote)
    variants.json                   the variants and which one is final
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from glr import files, metric, rerank, search, superglobal, tag
from glr.params import Params, RetrieveParams

log = logging.getLogger(__name__)

# Query × index scores computed at a time: 32M float32 (128 MB), 42 queries on GLDv2.
SCORE_CHUNK_ELEMENTS = 1 << 25


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


@dataclass
class BackboneTags:
    """The Landmark-Country rerank's tags of one backbone: index images' (label, country) and
    the queries' weighted tags."""

    index_labels: np.ndarray
    index_countries: np.ndarray
    queries: rerank.QueryTags


def backbone_tags(features: Features, settings: RetrieveParams, codes: dict[str, int],
                  backend: search.Backend | None = None,
                  index_tags: tuple[np.ndarray, np.ndarray] | None = None) -> BackboneTags:
    """The rerank's tags of one backbone. `index_tags`: the index images' (labels, country
    codes) as the `tag` stage stored them (`tag.read_index_tags`), and only the queries search
    the references; None: both search them, in the same two passes
    (`rerank.reference_neighbors`; small sets and tests)."""
    countries = features.ref_countries.map(codes).to_numpy(dtype=np.int64)
    neighbors = rerank.reference_neighbors(
        features.query, None if index_tags is not None else features.index, features.ref,
        settings.k_neighbors, block_rows=settings.block_rows, backend=backend, progress=True)
    if index_tags is None:
        index_tags = rerank.index_tags(features.index, features.ref, features.ref_labels,
                                       countries, nearest=neighbors.index_nearest)
    queries = rerank.query_tags(features.query, features.ref, features.ref_labels, countries,
                                k_neighbors=settings.k_neighbors, k1=settings.k1, k2=settings.k2,
                                lambda_value=settings.lambda_value, top=settings.top,
                                neighbors=neighbors)
    return BackboneTags(*index_tags, queries)


def write_query_tags(tags: BackboneTags, features: Features, codes: dict[str, int],
                     path: Path) -> None:
    """Each query's weighted label and country tags (the top-3 vote) as a table, to see why a
    query was reranked as it was."""
    country_names = np.array(sorted(codes, key=codes.get), dtype=object)
    query = tags.queries
    used = query.labels >= 0
    files.write_parquet(path, pd.DataFrame({
        "id": features.query_ids,
        "labels": [list(row[keep]) for row, keep in zip(query.labels, used, strict=True)],
        "label_weights": [list(map(float, row[keep])) for row, keep in
                          zip(query.label_weights, used, strict=True)],
        "countries": [list(country_names[row[row >= 0]]) for row in query.countries],
        "country_weights": [list(map(float, weights[row >= 0])) for row, weights in
                            zip(query.countries, query.country_weights, strict=True)],
    }))


def add_boosts(scores: np.ndarray, tags: BackboneTags, rows: slice, settings: RetrieveParams,
               weight: float = 1.0) -> None:
    """scores += weight·(α·w_label + β·v_country), in place, for the queries `rows`."""
    rerank.landmark_country_rerank(scores, tags.index_labels, tags.index_countries,
                                   tags.queries.rows(rows), settings.alpha * weight,
                                   settings.beta * weight, inplace=True)


def full_kr_scores(features: Features, settings: RetrieveParams) -> np.ndarray:
    """The full k-reciprocal similarity of queries and index (dense, `retrieve.full_kr`)."""
    return rerank.k_reciprocal_rerank(features.query, features.index, k1=settings.full_kr_k1,
                                      k2=settings.full_kr_k2,
                                      lambda_value=settings.full_kr_lambda,
                                      block_rows=settings.block_rows)


def chunk_scores(features: Features, rows: slice, settings: RetrieveParams,
                 tags: BackboneTags | None, kr: np.ndarray | None
                 ) -> tuple[np.ndarray, np.ndarray | None]:
    """(plain cosine S, reranked S or None) of one backbone for the queries `rows`.

    The full k-reciprocal similarity (`kr`, off in the authors' submission) replaces the
    cosine that the Landmark-Country rerank then adds its tags to, as in the authors' code.
    """
    plain = rerank.cosine_scores(features.query[rows], features.index,
                                 block_rows=settings.block_rows)
    if tags is None and kr is None:
        return plain, None
    reranked = plain.copy() if kr is None else np.array(kr[rows], dtype=np.float32)
    if tags is not None:
        add_boosts(reranked, tags, rows, settings)
    return plain, reranked


def superglobal_rankings(features: Features, rows: slice, settings: RetrieveParams,
                         tags: BackboneTags | None, plain: np.ndarray,
                         reranked: np.ndarray | None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """SuperGlobal's rankings of the queries `rows` (`retrieve.superglobal`): `superglobal`
    on the plain cosine, and `rerank_superglobal` on the reranked scores with the tags' boosts
    added to SuperGlobal's (glr.superglobal)."""
    options = superglobal.SuperGlobalSettings(settings.superglobal_m, settings.superglobal_k,
                                              settings.superglobal_beta)
    queries = features.query[rows]
    rankings = {"superglobal": superglobal.rerank_rows(plain, queries, features.index,
                                                       settings.k, options)}
    if reranked is not None and tags is not None:
        boosts = np.zeros_like(plain)
        add_boosts(boosts, tags, rows, settings)
        rankings["rerank_superglobal"] = superglobal.rerank_rows(
            reranked, queries, features.index, settings.k, options, boosts=boosts)
    return rankings


def backbone_scores(features: Features, params: Params, country_codes: dict[str, int],
                    backend: search.Backend | None = None
                    ) -> tuple[np.ndarray, np.ndarray | None]:
    """Dense (plain cosine S, reranked S or None) of one backbone, for small sets: the
    stage's own per-chunk arithmetic on all queries at once."""
    settings = params.retrieve
    tags = backbone_tags(features, settings, country_codes, backend) if settings.rerank else None
    kr = full_kr_scores(features, settings) if settings.full_kr else None
    return chunk_scores(features, slice(0, len(features.query)), settings, tags, kr)


def ranking_table(order: np.ndarray, top_scores: np.ndarray, query_ids: list[str],
                  index_ids: list[str]) -> pd.DataFrame:
    """Top-k index ids and scores per query, from `rerank.top_k_ids`' output."""
    ids = np.asarray(index_ids, dtype=object)
    return pd.DataFrame({"id": query_ids, "images": [list(ids[row]) for row in order],
                         "scores": [list(map(float, row)) for row in top_scores]})


def main(params: Params, features_dir: Path, tags_dir: Path, out_dir: Path,
         stats: dict | None = None) -> dict[str, pd.DataFrame]:
    """Rankings of every variant; see the module docstring for the memory they take. `stats`,
    when given, receives each backbone's `search.SearchStats` of the queries' reference
    searches (`glr bench retrieve`)."""
    settings = params.retrieve
    backbones = params.model.backbones
    weights = settings.weights or [1.0] * len(backbones)
    if len(weights) != len(backbones):
        raise ValueError(f"params retrieve.weights has {len(weights)} values for "
                         f"{len(backbones)} backbones ({', '.join(backbones)})")
    backend = search.select_backend(settings.device, settings.precision)
    log.info("reference searches on %s", backend.name)
    out_dir = Path(out_dir)
    parts: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}
    all_tags: list[tuple[float, BackboneTags]] = []
    # With one backbone an ensemble would repeat its rankings: there is none then.
    several = len(backbones) > 1
    ensemble_plain: np.ndarray | None = None
    ensemble_kr: np.ndarray | None = None
    query_ids: list[str] = []
    index_ids: list[str] = []
    for backbone, weight in zip(backbones, weights, strict=True):
        features = load_features(Path(features_dir) / backbone)
        if query_ids and (features.query_ids != query_ids or features.index_ids != index_ids):
            raise ValueError(f"{Path(features_dir) / backbone}: query or index ids differ from "
                             f"{backbones[0]}'s; re-extract all backbones")
        query_ids, index_ids = features.query_ids, features.index_ids
        shape = (len(query_ids), len(index_ids))
        codes = tag.country_codes(features.ref_countries)
        log.info("%s: %d queries × %d index images, %d references", backbone, *shape,
                 len(features.ref))
        tags = None
        if settings.rerank:
            index_tags = tag.read_index_tags(Path(tags_dir) / f"{backbone}.parquet",
                                             index_ids, codes)
            tags = backbone_tags(features, settings, codes, backend, index_tags)
            write_query_tags(tags, features, codes,
                             out_dir / "tags" / f"{backbone}-queries.parquet")
            log.info("%s: the queries' reference searches: %s", backbone,
                     backend.stats.describe())
            if stats is not None:
                stats[backbone] = dataclasses.replace(backend.stats)
            backend.stats.reset()  # the next backbone counts afresh
        kr = full_kr_scores(features, settings) if settings.full_kr else None
        if several and ensemble_plain is None:
            ensemble_plain = np.zeros(shape, dtype=np.float32)
        if several and kr is not None and ensemble_kr is None:
            ensemble_kr = np.zeros(shape, dtype=np.float32)
        for rows in query_chunks(*shape):
            plain, reranked = chunk_scores(features, rows, settings, tags, kr)
            parts.setdefault(f"{backbone}-plain", []).append(rerank.top_k_ids(plain, settings.k))
            if reranked is not None:
                parts.setdefault(f"{backbone}-rerank", []).append(
                    rerank.top_k_ids(reranked, settings.k))
            if settings.superglobal:
                for name, ranking in superglobal_rankings(features, rows, settings, tags,
                                                          plain, reranked).items():
                    parts.setdefault(f"{backbone}-{name}", []).append(ranking)
            if ensemble_plain is not None:
                ensemble_plain[rows] += np.float32(weight) * plain
            if ensemble_kr is not None:
                ensemble_kr[rows] += np.float32(weight) * kr[rows]
        if tags is not None:
            all_tags.append((weight, tags))
        del features, kr
    # The ensemble's rerank: Σ_b w_b·(base_b + boosts_b) = Σ_b w_b·base_b + Σ_b w_b·boosts_b,
    # so no backbone's reranked matrix is kept; boosts are added a chunk of queries at a time.
    rerank_variant = settings.rerank or settings.full_kr
    for rows in query_chunks(*ensemble_plain.shape) if ensemble_plain is not None else []:
        parts.setdefault("ensemble-plain", []).append(
            rerank.top_k_ids(ensemble_plain[rows], settings.k))
        if rerank_variant:
            base = ensemble_plain if ensemble_kr is None else ensemble_kr
            scores = np.array(base[rows], dtype=np.float32)
            for weight, tags in all_tags:
                add_boosts(scores, tags, rows, settings, weight)
            parts.setdefault("ensemble-rerank", []).append(rerank.top_k_ids(scores, settings.k))
    rankings = {name: ranking_table(np.concatenate([ids for ids, _ in chunks]),
                                    np.concatenate([scores for _, scores in chunks]),
                                    query_ids, index_ids)
                for name, chunks in parts.items()}
    final = f"{'ensemble' if several else backbones[0]}-{'rerank' if rerank_variant else 'plain'}"
    for name, table in rankings.items():
        files.write_parquet(out_dir / "topk" / f"{name}.parquet", table)
    final_table = rankings[final]
    metric.write_submission_csv(out_dir / "submission.csv",
                                dict(zip(final_table["id"], final_table["images"], strict=True)))
    (out_dir / "variants.json").write_text(json.dumps({"final": final,
                                                       "variants": sorted(rankings)}, indent=2))
    log.info("wrote %s (%s) and %d rankings", out_dir / "submission.csv", final, len(rankings))
    return rankings


def query_chunks(num_queries: int, num_index: int) -> list[slice]:
    """Row slices of the queries: about SCORE_CHUNK_ELEMENTS scores each."""
    step = search.rows_per_chunk(num_index, SCORE_CHUNK_ELEMENTS)
    return [slice(start, min(num_queries, start + step)) for start in range(0, num_queries, step)]
