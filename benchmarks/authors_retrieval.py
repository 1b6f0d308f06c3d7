"""The authors' retrieval side for `glr bench retrieve`, and clustered features to run it on.

Two pure pieces:

- `write_clustered_features`: synthetic, clustered, L2-normalized float16 features in the
  artifact layout of `glr extract` (read by `glr.retrieve.load_features`), streamed to disk so
  that a million references × 512 never sit in memory at once.
- `authors_retrieval`: the Landmark-Country aware rerank as the authors' code runs it,
  transcribed from the project's specification of the method (summarized in
  docs/method.md, "Retrieval and the Landmark-Country rerank") in torch on the CPU,
  float32, one query at a time:
  index tags from each index image's top-1 reference (a batched torch.mm + top-1 over blocks
  of reference rows); per query q·Rᵀ → its 30 nearest references, their own 30 × N product →
  30 nearest each, U = the union; on {q} ∪ U Zhong et al.'s k-reciprocal re-ranking in its
  classic dense form (the whole n × n distance matrix, a full argsort per row, R/R* with the
  1/2 expansion and 2/3 rule, V with exp(−d) weights, local query expansion over k2, the
  Jaccard distance through an inverted index, a loop over rows as in the reference
  `re_ranking` code); the `top` best references vote for labels and countries; finally
  S = Q·Xᵀ plus α·w for a same-landmark and β·v for a same-country index image.

It is written independently of glr.rerank / glr.search, so that agreement between the two is
a real check of glr's vectorized implementation. Where the transcription departs from Zhong
et al.'s code, it is to compute the quantity glr defines (see `k_reciprocal_final_distance`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

# ---------------------------------------------------------------- clustered features

# Each image is its landmark's unit centre plus Gaussian noise of norm ≈ s, s uniform in
# [NOISE_MIN, NOISE_MAX] per image: two images of one landmark then have cosine
# ≈ 1/sqrt((1 + s1²)(1 + s2²)), between 0.5 and 0.8; random centres are near-orthogonal
# (cosine ~ N(0, 1/dim)), so cross-landmark cosines are ≈ 0.
NOISE_MIN, NOISE_MAX = 0.5, 1.0
# Share of index images drawn around no centre at all (distractors, label -1).
DISTRACTOR_SHARE = 0.2
# Index images per landmark of the query/index subset, on average.
INDEX_PER_LANDMARK = 4
CONTINENTS = ("Asia", "Europe", "Africa", "North America", "South America", "Oceania")
REF_SCHEMA = pa.schema([("id", pa.string()), ("label", pa.int64()),
                        ("country", pa.string()), ("continent", pa.string())])
ID_SCHEMA = pa.schema([("id", pa.string())])


def _unit_rows(rows: np.ndarray) -> np.ndarray:
    """Rows divided by their L2 norm, float32; the norm is summed in float64 (numpy's fixed
    pairwise order) and rounded once, so it does not depend on SIMD or BLAS kernels."""
    norms = np.sqrt(np.square(rows, dtype=np.float64).sum(axis=1, keepdims=True))
    return rows / norms.astype(np.float32)


def _noisy_rows(centres: np.ndarray, labels: np.ndarray, noise_rng: np.random.Generator,
                scale_rng: np.random.Generator, dim: int) -> np.ndarray:
    """float16 unit rows around centres[labels] (label -1: pure noise, a distractor)."""
    noise = noise_rng.standard_normal((len(labels), dim), dtype=np.float32)
    scale = scale_rng.uniform(NOISE_MIN, NOISE_MAX, len(labels)).astype(np.float32)
    noise *= (scale / np.float32(np.sqrt(dim)))[:, None]
    around = labels >= 0
    noise[around] += centres[labels[around]]
    return _unit_rows(noise).astype(np.float16)


def _write_rows(path: Path, num_rows: int, dim: int, chunk_rows: int,
                next_labels: Callable[[int], np.ndarray], centres: np.ndarray,
                rngs: tuple[np.random.Generator, np.random.Generator],
                on_chunk: Callable[[int, np.ndarray], None]) -> None:
    """Write a float16 (num_rows, dim) .npy chunk by chunk; on_chunk(start, labels) per chunk.

    `rngs`: the noise and the noise-scale streams. Each stream draws one kind of value only
    and numpy's Generator fills arrays sequentially, so every stream is consumed in row order
    whatever the chunk size: the bytes do not depend on `chunk_rows`.
    """
    matrix = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(num_rows, dim))
    for start in range(0, num_rows, chunk_rows):
        labels = next_labels(min(chunk_rows, num_rows - start))
        matrix[start:start + len(labels)] = _noisy_rows(centres, labels, *rngs, dim)
        on_chunk(start, labels)
    matrix.flush()
    del matrix


def _ids(prefix: str, start: int, count: int) -> list[str]:
    """16-character ids like GLDv2's: a prefix letter and 15 hex digits of the row number."""
    return [f"{prefix}{row:015x}" for row in range(start, start + count)]


def _slicer(values: np.ndarray) -> Callable[[int], np.ndarray]:
    """next_labels for precomputed labels: successive slices of `values`."""
    position = [0]

    def take(count: int) -> np.ndarray:
        chunk = values[position[0]:position[0] + count]
        position[0] += count
        return chunk

    return take


def write_clustered_features(folder: Path, *, num_queries: int, num_index: int, num_refs: int,
                             dim: int = 512, num_landmarks: int, num_countries: int, seed: int,
                             chunk_rows: int = 65_536) -> None:
    """Clustered features in `glr extract`'s layout: query/index/ref .npy (float16, unit rows),
    query/index .parquet (id), ref .parquet (id, label int64, country, continent).

    References: labels uniform over the landmarks, each row around its landmark's centre; a
    landmark's country is drawn once (country "C000".. , continent from the country). Queries
    and non-distractor index images lie around the centres of a random subset of landmarks
    (about `INDEX_PER_LANDMARK` index images each); `DISTRACTOR_SHARE` of the index images lie
    around no centre. Memory: the centres plus one chunk of `chunk_rows` rows.

    Deterministic for a seed: the values depend only on numpy's Generator streams (PCG64, its
    normal and uniform samplers) and float32 elementwise arithmetic, plus a float64 sum of
    squares in numpy's fixed pairwise order and a correctly rounded sqrt and float16 cast; so
    they are the same on every x86-64 CPU, up to the usual caveat (the samplers' rare tail
    branches call libm's log/exp, which another libm could round differently).
    """
    if min(num_queries, num_index, num_refs, dim, num_landmarks, num_countries, chunk_rows) < 1:
        raise ValueError("all sizes must be at least 1")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    # One independent stream per kind of value and set (see _write_rows).
    streams = [np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(8)]
    layout, ref_label_rng = streams[0], streams[1]
    query_rngs, index_rngs, ref_rngs = (streams[2], streams[3]), (streams[4], streams[5]), (
        streams[6], streams[7])  # (noise, noise scale) of each set

    centres = _unit_rows(layout.standard_normal((num_landmarks, dim), dtype=np.float32))
    landmark_country = layout.integers(0, num_countries, num_landmarks)
    subset_size = min(num_landmarks, max(1, num_index // INDEX_PER_LANDMARK))
    subset = layout.permutation(num_landmarks)[:subset_size]
    query_labels = subset[layout.integers(0, subset_size, num_queries)]
    index_labels = np.where(layout.random(num_index) < DISTRACTOR_SHARE, -1,
                            subset[layout.integers(0, subset_size, num_index)])

    for name, prefix, labels, rngs in (("query", "q", query_labels, query_rngs),
                                       ("index", "x", index_labels, index_rngs)):
        ids: list[str] = []
        _write_rows(folder / f"{name}.npy", len(labels), dim, chunk_rows, _slicer(labels),
                    centres, rngs, lambda start, chunk, ids=ids, prefix=prefix:
                    ids.extend(_ids(prefix, start, len(chunk))))
        pq.write_table(pa.table({"id": ids}, schema=ID_SCHEMA), folder / f"{name}.parquet")

    with pq.ParquetWriter(folder / "ref.parquet", REF_SCHEMA) as writer:

        def write_table(start: int, labels: np.ndarray) -> None:
            country = landmark_country[labels]
            writer.write_table(pa.table({
                "id": _ids("r", start, len(labels)), "label": labels.astype(np.int64),
                "country": [f"C{c:03d}" for c in country],
                "continent": [CONTINENTS[c % len(CONTINENTS)] for c in country],
            }, schema=REF_SCHEMA))

        _write_rows(folder / "ref.npy", num_refs, dim, chunk_rows,
                    lambda count: ref_label_rng.integers(0, num_landmarks, count), centres,
                    ref_rngs, write_table)


# ---------------------------------------------------------------- the authors' retrieval


@dataclass(frozen=True)
class AuthorsTimes:
    """Wall seconds of each part (per_query covers only the queries that were run)."""

    reference_load_s: float  # references → float32 torch blocks
    index_tagging_s: float
    per_query_s: float
    scoring_s: float  # S = Q·Xᵀ, the tag boosts and the top-k


@dataclass(frozen=True)
class AuthorsResult:
    """The authors' side on the queries `query_rows` (rows of `scores`, `top_ids`, tags)."""

    index_refs: np.ndarray  # int64 (nX,): each index image's top-1 reference
    index_labels: np.ndarray  # (nX,): that reference's label
    index_countries: np.ndarray  # (nX,): that reference's country
    query_rows: np.ndarray  # int64 (m,): the queries run, in order
    label_tags: list[dict[int, float]]  # per query run: label → weight, by weight descending
    country_tags: list[dict]  # per query run: country → weight, by weight descending
    best_refs: np.ndarray  # int64 (m, top): the voting references, best first (-1: none)
    best_similarities: np.ndarray  # float32 (m, top): their similarity 1 − final distance
    scores: np.ndarray  # float32 (m, nX): the final S
    top_ids: np.ndarray  # int64 (m, min(k, nX)): by score descending, ties to the lower index
    times: AuthorsTimes


def reference_blocks(references: np.ndarray, block_rows: int) -> list[torch.Tensor]:
    """The references as float32 torch tensors of `block_rows` rows each (read block by block,
    so a float16 memory map is converted without a second full copy)."""
    return [torch.from_numpy(np.ascontiguousarray(references[start:start + block_rows],
                                                  dtype=np.float32))
            for start in range(0, references.shape[0], block_rows)]


def index_top_reference(index: np.ndarray, blocks: list[torch.Tensor],
                        index_batch: int) -> np.ndarray:
    """Each index image's top-1 reference by cosine, int64 (nX,).

    Index images in batches, torch.mm against each block, the block's top-1 merged into the
    running best. torch.max is top-1 with the first (lowest) index on exact ties, and a later
    block replaces the best only when strictly better: ties go to the lower reference id.
    """
    result = np.empty(index.shape[0], dtype=np.int64)
    for start in range(0, index.shape[0], index_batch):
        batch = torch.from_numpy(np.ascontiguousarray(index[start:start + index_batch],
                                                      dtype=np.float32))
        best = torch.full((batch.shape[0],), -torch.inf)
        best_id = torch.zeros(batch.shape[0], dtype=torch.int64)
        offset = 0
        for block in blocks:
            value, position = torch.mm(batch, block.t()).max(dim=1)
            better = value > best
            best = torch.where(better, value, best)
            best_id = torch.where(better, position + offset, best_id)
            offset += block.shape[0]
        result[start:start + batch.shape[0]] = best_id.numpy()
    return result


def nearest_rows(scores: torch.Tensor, k: int) -> np.ndarray:
    """The k highest-scoring columns per row, int64 (rows, k), best first, ties to the lower
    column: torch.topk, reordered by (score desc, column asc); a row whose k-th and (k+1)-th
    scores tie (topk may then keep either column) is fully sorted instead."""
    num_cols = scores.shape[1]
    k = min(k, num_cols)
    values, columns = torch.topk(scores, min(k + 1, num_cols), dim=1)
    values, columns = values.numpy(), columns.numpy()
    result = np.empty((scores.shape[0], k), dtype=np.int64)
    for row in range(scores.shape[0]):
        if k < num_cols and values[row, k - 1] == values[row, k]:
            result[row] = np.argsort(-scores[row].numpy(), kind="stable")[:k]
        else:
            order = np.lexsort((columns[row, :k], -values[row, :k]))
            result[row] = columns[row, :k][order]
    return result


def scores_against(rows: torch.Tensor, blocks: list[torch.Tensor]) -> torch.Tensor:
    """rows · Rᵀ, float32 (len(rows), N), one block of references at a time."""
    return torch.cat([torch.mm(rows, block.t()) for block in blocks], dim=1)


def k_reciprocal_final_distance(features: torch.Tensor, k1: int, k2: int,
                                lambda_value: float) -> np.ndarray:
    """Final distance of item 0 (the query) to all n items, float32 (n,): Zhong et al.'s
    re_ranking in its dense form, with item 0 the only probe row.

    Where this differs from Zhong et al.'s reference code (to compute what glr defines):
    - d = (1 − cos)/2 of unit rows; their code squares a Euclidean distance and divides each
      column by its maximum (for unit rows that is (2 − 2cos)/max, the same order per row
      except for the column scaling);
    - ranks by a stable argsort (exact ties to the lower index); theirs uses np.argsort's
      default quicksort, whose order among equal distances is unspecified;
    - V, its expansion and the Jaccard sums in float32; theirs stores V and d_J in float16.
    """
    num_items = features.shape[0]
    original = ((1.0 - torch.mm(features, features.t())) / 2).numpy()
    initial_rank = np.argsort(original, axis=1, kind="stable")
    half = int(np.around(k1 / 2))

    def reciprocal(item: int, k: int) -> np.ndarray:
        forward = initial_rank[item, :k + 1]
        backward = initial_rank[forward, :k + 1]
        return forward[np.where(backward == item)[0]]

    weights = np.zeros((num_items, num_items), dtype=np.float32)
    for item in range(num_items):
        k_reciprocal = reciprocal(item, k1)
        expansion = k_reciprocal
        for candidate in k_reciprocal:
            candidate_reciprocal = reciprocal(int(candidate), half)
            shared = len(np.intersect1d(candidate_reciprocal, k_reciprocal))
            if shared > 2 / 3 * len(candidate_reciprocal):
                expansion = np.append(expansion, candidate_reciprocal)
        expansion = np.unique(expansion)
        weight = np.exp(-original[item, expansion])
        weights[item, expansion] = weight / np.sum(weight)

    if k2 != 1:
        expanded = np.zeros_like(weights)
        for item in range(num_items):
            expanded[item] = np.mean(weights[initial_rank[item, :k2]], axis=0)
        weights = expanded

    inverted = [np.where(weights[:, column] != 0)[0] for column in range(num_items)]
    sum_min = np.zeros(num_items, dtype=np.float32)
    for column in np.where(weights[0] != 0)[0]:
        holders = inverted[column]
        sum_min[holders] += np.minimum(weights[0, column], weights[holders, column])
    # Every row of V sums to 1, so Σmax = 2 − Σmin.
    jaccard = 1 - sum_min / (2 - sum_min)
    return (jaccard * (1 - lambda_value) + original[0] * lambda_value).astype(np.float32)


def weighted_tags(tags: list, similarities: list[float]) -> dict:
    """Each distinct tag with its share of the summed similarity, by share descending (ties:
    the first to appear); if the similarities sum to 0, each reference counts 1."""
    if sum(similarities) <= 0:
        similarities = [1.0] * len(similarities)
    shares: dict = {}
    for tag, similarity in zip(tags, similarities, strict=True):
        shares[tag] = shares.get(tag, 0.0) + similarity
    total = sum(similarities)
    return {tag: share / total
            for tag, share in sorted(shares.items(), key=lambda item: -item[1])}


def query_best_references(query: torch.Tensor, blocks: list[torch.Tensor], *,
                          k_neighbors: int, k1: int, k2: int, lambda_value: float,
                          top: int) -> tuple[np.ndarray, np.ndarray]:
    """One query's `top` best references (ids, similarities 1 − final distance), best first.

    U = the query's k_neighbors nearest references ∪ each one's own k_neighbors nearest; the
    set {q} ∪ U lists U by ascending reference id, so equal distances go to the lower id.
    """
    first = nearest_rows(scores_against(query[None, :], blocks), k_neighbors)[0]
    first_rows = torch.cat([_gather(blocks, int(ref))[None, :] for ref in first])
    second = nearest_rows(scores_against(first_rows, blocks), k_neighbors)
    members = np.unique(np.concatenate([first, second.ravel()]))
    features = torch.cat([query[None, :]] + [_gather(blocks, int(ref))[None, :]
                                              for ref in members])
    distance = k_reciprocal_final_distance(features, k1, k2, lambda_value)[1:]
    best = np.argsort(distance, kind="stable")[:top]
    return members[best], (1.0 - distance[best]).astype(np.float32)


def _gather(blocks: list[torch.Tensor], ref: int) -> torch.Tensor:
    """Reference row `ref` from the blocks (all blocks but the last have the same length)."""
    size = blocks[0].shape[0]
    return blocks[ref // size][ref % size]


def boosted_scores(queries: torch.Tensor, index: torch.Tensor, index_labels: np.ndarray,
                   index_countries: np.ndarray, label_tags: list[dict], country_tags: list[dict],
                   alpha: float, beta: float) -> np.ndarray:
    """S = Q·Xᵀ, then per query S[q, j] += α·w for each tag label of j, += β·v for its country
    (labels first, then countries, each a float32 addition)."""
    scores = torch.mm(queries, index.t()).numpy()
    for row in range(scores.shape[0]):
        for tags, index_tags, factor in ((label_tags[row], index_labels, alpha),
                                         (country_tags[row], index_countries, beta)):
            for tag, weight in tags.items():
                scores[row, index_tags == tag] += np.float32(factor) * np.float32(weight)
    return scores


def authors_retrieval(query: np.ndarray, index: np.ndarray, references: np.ndarray,
                      ref_labels: np.ndarray, ref_countries: np.ndarray, *,
                      k_neighbors: int = 30, k1: int = 10, k2: int = 3,
                      lambda_value: float = 0.5, top: int = 3, alpha: float = 1.0,
                      beta: float = 0.1, k: int = 100, index_batch: int = 1024,
                      reference_block: int = 65_536,
                      query_subset: np.ndarray | list[int] | None = None) -> AuthorsResult:
    """The authors' Landmark-Country aware rerank of one backbone (see the module docstring).

    `references` may be a float16 memory map; it is converted to float32 torch blocks of
    `reference_block` rows once and held, as the authors' code holds its reference features.
    `query_subset`: the query rows to run (default all): the per-query part, the scores and
    the top-k cover only those, in the given order.
    """
    if top < 1 or k_neighbors < 1 or k < 1:
        raise ValueError("top, k_neighbors and k must be at least 1")
    rows = (np.arange(query.shape[0]) if query_subset is None
            else np.asarray(query_subset, dtype=np.int64))
    ref_labels = np.asarray(ref_labels)
    ref_countries = np.asarray(ref_countries)

    clock = time.perf_counter()
    blocks = reference_blocks(references, reference_block)
    reference_load = time.perf_counter() - clock

    clock = time.perf_counter()
    index_refs = index_top_reference(index, blocks, index_batch)
    index_labels, index_countries = ref_labels[index_refs], ref_countries[index_refs]
    index_tagging = time.perf_counter() - clock

    clock = time.perf_counter()
    queries = torch.from_numpy(np.ascontiguousarray(query[rows], dtype=np.float32))
    best_refs = np.full((len(rows), top), -1, dtype=np.int64)
    best_similarities = np.zeros((len(rows), top), dtype=np.float32)
    label_tags: list[dict[int, float]] = []
    country_tags: list[dict] = []
    for position in range(len(rows)):
        best, similarity = query_best_references(
            queries[position], blocks, k_neighbors=k_neighbors, k1=k1, k2=k2,
            lambda_value=lambda_value, top=top)
        best_refs[position, :len(best)] = best
        best_similarities[position, :len(best)] = similarity
        votes = [float(s) for s in similarity]
        label_tags.append(weighted_tags(ref_labels[best].tolist(), votes))
        country_tags.append(weighted_tags(ref_countries[best].tolist(), votes))
    per_query = time.perf_counter() - clock

    clock = time.perf_counter()
    index_rows = torch.from_numpy(np.ascontiguousarray(index, dtype=np.float32))
    scores = boosted_scores(queries, index_rows, index_labels, index_countries, label_tags,
                            country_tags, alpha, beta)
    top_ids = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    scoring = time.perf_counter() - clock

    return AuthorsResult(
        index_refs=index_refs, index_labels=index_labels, index_countries=index_countries,
        query_rows=rows, label_tags=label_tags, country_tags=country_tags, best_refs=best_refs,
        best_similarities=best_similarities, scores=scores, top_ids=top_ids,
        times=AuthorsTimes(reference_load, index_tagging, per_query, scoring))
