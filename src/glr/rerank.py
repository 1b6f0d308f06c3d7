"""Landmark-Country aware rerank (the authors' post-processing), k-reciprocal rerank, ensembles.

Per backbone, with L2-normalized query features Q, index features X and reference features R
(reference labels g and country codes c):

1. S = Q·Xᵀ, the cosine scores (`cosine_scores`).
2. Index tags: index image j gets the label and country of its top-1 reference (`index_tags`).
3. Query tags: query q gets a k-reciprocal similarity to the references near it; the `top` (3)
   best references vote for their labels with their similarities, normalized to sum 1, and
   likewise for their countries (`query_tags`, `tag_weights`).
4. S[q, j] += α·w_t when index image j has label tag t, and += β·v_c when it has country tag c
   (`landmark_country_rerank`).

The k-reciprocal similarity is Zhong et al. 2017 ("Re-ranking Person Re-identification with
k-reciprocal Encoding") on a small set: the query, its `k_neighbors` nearest references and
their own `k_neighbors` nearest references (`k_reciprocal_distance`). The same function computes
the optional full k-reciprocal rerank of the queries against a small index
(`k_reciprocal_rerank`).

Memory: the reference matrix R (4.9M rows, float16, possibly memory-mapped) is only read through
`glr.search.multi_topk`, block by block in two passes (`reference_neighbors`), and by gathering
the few rows near the queries; no query × reference or index × reference matrix is built.
Query × index matrices are processed in row chunks, so temporaries stay small next to S itself.

Ties are resolved towards the lower index everywhere (nearest-neighbor ranks, the best
references of a query, `top_k_ids`), so results do not depend on sort algorithms.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from glr.search import (
    DEFAULT_BLOCK_ROWS,
    Backend,
    as_float32_rows,
    multi_topk,
    rows_per_chunk,
    smallest_k,
    topk_inner_product,
)


@dataclass(frozen=True)
class QueryTags:
    """Landmark and country tags of each query, padded to `top` slots per query.

    `labels`/`countries` are int64 (nQ, top), `label_weights`/`country_weights` float32 (nQ, top).
    A query's weights sum to 1 over its used slots; slots are ordered by weight descending (ties
    by the rank of the first reference voting for the tag); unused slots hold tag -1, weight 0.
    """

    labels: np.ndarray
    label_weights: np.ndarray
    countries: np.ndarray
    country_weights: np.ndarray

    def rows(self, part: slice) -> QueryTags:
        """The tags of some queries."""
        return QueryTags(self.labels[part], self.label_weights[part], self.countries[part],
                         self.country_weights[part])


def top_k_ids(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k best index images per query: (indices int64 (nQ, k), their float32 scores).

    Rows are sorted by score descending, ties to the lower index; k is clipped to nX.
    """
    if scores.ndim != 2:
        raise ValueError(f"scores must be (nQ, nX), got shape {scores.shape}")
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    indices = smallest_k(scores, k, descending=True)
    top_scores = np.take_along_axis(np.asarray(scores), indices, axis=1).astype(np.float32)
    return indices, top_scores


def cosine_scores(
    queries: np.ndarray, index: np.ndarray, *, block_rows: int = DEFAULT_BLOCK_ROWS
) -> np.ndarray:
    """Dense cosine scores Q·Xᵀ, float32 (nQ, nX), for L2-normalized features.

    The index features may be float16 or memory-mapped: they are converted block by block.
    """
    if queries.ndim != 2 or index.ndim != 2 or queries.shape[1] != index.shape[1]:
        raise ValueError(f"incompatible shapes {queries.shape} and {index.shape}")
    query_rows = as_float32_rows(queries)
    scores = np.empty((query_rows.shape[0], index.shape[0]), dtype=np.float32)
    for start in range(0, index.shape[0], block_rows):
        block = as_float32_rows(index[start : start + block_rows])
        np.matmul(query_rows, block.T, out=scores[:, start : start + block.shape[0]])
    return scores


@dataclass(frozen=True)
class ReferenceNeighbors:
    """What the rerank needs from the reference set (reference row numbers, int64).

    `index_nearest` (nX,): each index image's top-1 reference; `query_neighbors` (nQ, k): each
    query's k nearest references; `first_ids`: their distinct ids, sorted; `second_level`
    (len(first_ids), k): the k nearest references of each of those.
    """

    index_nearest: np.ndarray
    query_neighbors: np.ndarray
    first_ids: np.ndarray
    second_level: np.ndarray


def reference_neighbors(
    queries: np.ndarray,
    index: np.ndarray | None,
    references: np.ndarray,
    k_neighbors: int = 30,
    *,
    block_rows: int = DEFAULT_BLOCK_ROWS,
    backend: Backend | None = None,
    progress: bool = False,
) -> ReferenceNeighbors:
    """Every reference search of the rerank, in two passes over the reference matrix.

    Pass 1 serves the index images' top 1 and the queries' first level together; pass 2 the
    second level, whose rows (the distinct first-level neighbours) are known only once pass 1
    has seen every reference. On GLDv2 pass 1 carries 1,129 + 761,757 rows and pass 2 at most
    1,129 × 30, so each block of pass 1 is converted once for 96% of all products.
    `index` None: no index tagging. Exact (see glr.search), on `backend`.
    """
    if k_neighbors < 1:
        raise ValueError("k_neighbors must be at least 1")
    sets = [(queries, k_neighbors)] + ([] if index is None else [(index, 1)])
    found = multi_topk(sets, references, block_rows=block_rows, backend=backend,
                       progress=progress)
    first_level = found[0][1]
    index_nearest = (np.zeros(0, np.int64) if index is None else found[1][1][:, 0])
    first_ids = np.unique(first_level)
    (_, second_level), = multi_topk([(np.asarray(references[first_ids]), k_neighbors)],
                                    references, block_rows=block_rows, backend=backend,
                                    progress=progress)
    return ReferenceNeighbors(index_nearest, first_level, first_ids, second_level)


def index_tags(
    index: np.ndarray,
    references: np.ndarray,
    ref_labels: np.ndarray,
    ref_countries: np.ndarray,
    *,
    block_rows: int = DEFAULT_BLOCK_ROWS,
    backend: Backend | None = None,
    nearest: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Label and country (int64, (nX,) each) of every index image's top-1 reference by cosine.

    `nearest`: the top-1 reference ids when already found (`reference_neighbors`); else the
    references are searched here, streamed in blocks of `block_rows` rows.
    """
    if nearest is None:
        _, found = topk_inner_product(index, references, 1, block_rows=block_rows,
                                      backend=backend)
        nearest = found[:, 0]
    labels = np.asarray(ref_labels)[nearest].astype(np.int64)
    countries = np.asarray(ref_countries)[nearest].astype(np.int64)
    return labels, countries


def tag_weights(
    tags: np.ndarray, similarities: np.ndarray, valid: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Turn each query's best references into weighted tags (labels or countries).

    `tags` (nQ, top): the tag of each best reference; `similarities` (nQ, top) their similarity
    to the query; `valid` (nQ, top) marks the slots that hold a reference (default: all). Each
    distinct tag scores the sum of its references' similarities, divided by the sum over all
    references, so a query's weights sum to 1 (if that sum is not positive, every reference
    counts 1 instead). Returns (tags int64, weights float32), both (nQ, top), sorted by weight
    descending, ties by first appearance; unused slots get tag -1 and weight 0.
    """
    tags = np.asarray(tags, dtype=np.int64)
    similarities = np.asarray(similarities, dtype=np.float64)
    valid = np.ones(tags.shape, dtype=bool) if valid is None else np.asarray(valid, dtype=bool)
    similarities = np.where(valid, similarities, 0.0)
    total = similarities.sum(axis=1, keepdims=True)
    votes = np.where(total > 0, similarities, valid.astype(np.float64))
    total = votes.sum(axis=1, keepdims=True)

    # same[q, s, t]: slots s and t of query q both hold references with the same tag.
    same = (tags[:, :, None] == tags[:, None, :]) & valid[:, :, None] & valid[:, None, :]
    tag_sums = (same * votes[:, None, :]).sum(axis=2)
    num_slots = tags.shape[1]
    earlier = np.tri(num_slots, num_slots, k=-1, dtype=bool)  # earlier[s, t]: t < s
    first_of_tag = valid & ~(same & earlier).any(axis=2)
    weights = np.divide(tag_sums, total, out=np.zeros_like(tag_sums), where=first_of_tag)

    # Used slots first, by weight descending; lexsort is stable, so ties keep slot order.
    order = np.lexsort((-weights, ~first_of_tag), axis=1)
    kept = np.take_along_axis(first_of_tag, order, axis=1)
    sorted_tags = np.where(kept, np.take_along_axis(tags, order, axis=1), -1)
    sorted_weights = np.where(kept, np.take_along_axis(weights, order, axis=1), 0.0)
    return sorted_tags, sorted_weights.astype(np.float32)


def query_tags(
    queries: np.ndarray,
    references: np.ndarray,
    ref_labels: np.ndarray,
    ref_countries: np.ndarray,
    *,
    k_neighbors: int = 30,
    k1: int = 10,
    k2: int = 3,
    lambda_value: float = 0.5,
    top: int = 3,
    block_rows: int = DEFAULT_BLOCK_ROWS,
    backend: Backend | None = None,
    neighbors: ReferenceNeighbors | None = None,
) -> QueryTags:
    """Landmark and country tags of each query from its k-reciprocal best references.

    For query q: U = its `k_neighbors` nearest references ∪ their own `k_neighbors` nearest
    references; on {q} ∪ U, `k_reciprocal_distance` gives the final distance of q to each member
    of U; the `top` members with the highest similarity 1 − distance (ties: lower reference id)
    vote for their labels and countries (`tag_weights`). `neighbors`: the searches' result
    when already done (`reference_neighbors`, with `k_neighbors` neighbours); else the
    reference matrix is streamed here (`reference_neighbors` without index). Only rows of U
    are gathered from it afterwards.
    """
    if top < 1 or k_neighbors < 1:
        raise ValueError("top and k_neighbors must be at least 1")
    query_rows = as_float32_rows(queries)
    num_queries = query_rows.shape[0]
    if neighbors is None:
        neighbors = reference_neighbors(query_rows, None, references, k_neighbors,
                                        block_rows=block_rows, backend=backend)
    if neighbors.query_neighbors.shape[0] != num_queries:
        raise ValueError("neighbors were found for other queries")
    first_level, first_ids = neighbors.query_neighbors, neighbors.first_ids
    second_level = neighbors.second_level
    second_of_first = np.searchsorted(first_ids, first_level)

    best = np.full((num_queries, top), -1, dtype=np.int64)
    best_similarity = np.zeros((num_queries, top), dtype=np.float32)
    for query in range(num_queries):
        neighbors = second_level[second_of_first[query]].ravel()
        # Sorted ids: ties between members then resolve to the lower reference id.
        members = np.unique(np.concatenate([first_level[query], neighbors]))
        member_rows = as_float32_rows(references[members])
        features = np.concatenate([query_rows[query : query + 1], member_rows])
        distance = k_reciprocal_distance(features, k1, k2, lambda_value, num_queries=1)[0, 1:]
        chosen = smallest_k(distance[None, :], top)[0]
        best[query, : len(chosen)] = members[chosen]
        best_similarity[query, : len(chosen)] = 1.0 - distance[chosen]

    valid = best >= 0
    best_ids = np.where(valid, best, 0)
    labels, label_weights = tag_weights(np.asarray(ref_labels)[best_ids], best_similarity, valid)
    countries, country_weights = tag_weights(
        np.asarray(ref_countries)[best_ids], best_similarity, valid
    )
    return QueryTags(labels, label_weights, countries, country_weights)


def landmark_country_rerank(
    scores: np.ndarray,
    index_labels: np.ndarray,
    index_countries: np.ndarray,
    tags: QueryTags,
    alpha: float = 1.0,
    beta: float = 0.1,
    *,
    inplace: bool = False,
) -> np.ndarray:
    """S[q, j] + α·w(q, label_j) + β·v(q, country_j), float32 (nQ, nX).

    w and v are the query's tag weights (0 for a tag the query lacks). Returns a new array unless
    `inplace` is True, which adds into `scores` itself (it must then be a writable float32 array)
    and saves a second nQ × nX matrix. Vectorized per row chunk and tag slot.
    """
    if scores.ndim != 2:
        raise ValueError(f"scores must be (nQ, nX), got shape {scores.shape}")
    num_queries, num_index = scores.shape
    if index_labels.shape != (num_index,) or index_countries.shape != (num_index,):
        raise ValueError("index_labels and index_countries must have one entry per index image")
    for name in ("labels", "label_weights", "countries", "country_weights"):
        if getattr(tags, name).shape[0] != num_queries:
            raise ValueError(f"tags.{name} must have one row per query")
    if inplace:
        if scores.dtype != np.float32 or not scores.flags.writeable:
            raise ValueError("inplace=True needs a writable float32 scores array")
        result = scores
    else:
        result = np.array(scores, dtype=np.float32, copy=True)

    boosts = (
        (index_labels, tags.labels, np.float32(alpha) * tags.label_weights),
        (index_countries, tags.countries, np.float32(beta) * tags.country_weights),
    )
    chunk_rows = rows_per_chunk(num_index)
    for start in range(0, num_queries, chunk_rows):
        block = result[start : start + chunk_rows]
        for index_tag, query_tag, boost in boosts:
            for slot in range(query_tag.shape[1]):
                matches = index_tag[None, :] == query_tag[start : start + chunk_rows, slot, None]
                boost_column = boost[start : start + chunk_rows, slot, None].astype(np.float32)
                np.add(block, boost_column, out=block, where=matches)
    return result


def ensemble(scores: Sequence[np.ndarray], weights: Sequence[float]) -> np.ndarray:
    """Σ_b weights[b]·scores[b], float32; all score matrices must have the same shape."""
    if len(scores) == 0 or len(scores) != len(weights):
        raise ValueError(f"need one weight per score matrix, got {len(scores)} and {len(weights)}")
    shape = scores[0].shape
    for score in scores:
        if score.shape != shape:
            raise ValueError(f"score shapes differ: {shape} and {score.shape}")
    if len(shape) == 0:
        raise ValueError("score matrices must have at least one dimension")
    total = np.zeros(shape, dtype=np.float32)
    chunk_rows = rows_per_chunk(int(np.prod(shape[1:])))
    for start in range(0, shape[0], chunk_rows):
        rows = slice(start, start + chunk_rows)
        for score, weight in zip(scores, weights, strict=True):
            total[rows] += np.float32(weight) * np.asarray(score[rows], dtype=np.float32)
    return total


def _gather_segments(indptr: np.ndarray, segments: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Positions of all items of the given CSR segments, and which request each belongs to.

    Segment s covers positions indptr[s] .. indptr[s + 1] - 1. Returns (owner, position): for
    every item of every requested segment, its index into `segments` and its position.
    """
    starts = indptr[segments]
    counts = indptr[segments + 1] - starts
    owner = np.repeat(np.arange(len(segments)), counts)
    offsets = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
    return owner, starts[owner] + offsets


def _indptr(sorted_ids: np.ndarray, size: int) -> np.ndarray:
    """CSR offsets of a sorted id array: ids == s occupy indptr[s] .. indptr[s + 1] - 1."""
    return np.concatenate([[0], np.cumsum(np.bincount(sorted_ids, minlength=size))])


def _reciprocal(neighbors: np.ndarray) -> np.ndarray:
    """reciprocal[i, a]: item i is also in the neighbor list of its neighbor neighbors[i, a]."""
    num_items, width = neighbors.shape
    owners = np.repeat(np.arange(num_items), width)
    targets = neighbors.ravel()
    forward_pairs = owners * num_items + targets
    return np.isin(targets * num_items + owners, forward_pairs).reshape(num_items, width)


def _expanded_reciprocal_sets(ranked: np.ndarray, k1: int) -> tuple[np.ndarray, np.ndarray]:
    """R*(i, k1) of every item as sorted (row, column) pairs.

    R(i, k) = the j among i's k + 1 nearest (itself included) that have i among their k + 1
    nearest. R*(i, k1) = R(i, k1) ∪ R(c, round(k1/2)) for each c ∈ R(i, k1) whose half set
    shares more than 2/3 of its members with R(i, k1). `ranked` holds each row's nearest items.
    """
    num_items = ranked.shape[0]
    half_k = int(np.around(k1 / 2))  # np.around as in the reference code (round half to even)
    forward = ranked[:, : k1 + 1]
    half = ranked[:, : half_k + 1]
    reciprocal = _reciprocal(forward)
    half_reciprocal = _reciprocal(half)

    owners = np.arange(num_items)[:, None]
    set_pairs = (owners * num_items + forward)[reciprocal]
    candidate_half = half[forward]  # (n, k1 + 1, half_k + 1): half lists of the candidates
    candidate_valid = half_reciprocal[forward]
    candidate_pairs = owners[:, :, None] * num_items + candidate_half
    shared = (np.isin(candidate_pairs, set_pairs) & candidate_valid).sum(axis=2)
    size = candidate_valid.sum(axis=2)
    # |R(c, k1/2) ∩ R(i, k1)| > 2/3 |R(c, k1/2)|, in integers.
    accepted = reciprocal & (3 * shared > 2 * size)
    expansion_pairs = candidate_pairs[accepted[:, :, None] & candidate_valid]
    pairs = np.unique(np.concatenate([set_pairs, expansion_pairs]))
    return pairs // num_items, pairs % num_items


def _local_query_expansion(
    rows: np.ndarray, cols: np.ndarray, values: np.ndarray, neighbors: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sparse V_i ← mean of V over the rows neighbors[i] (i's k2 nearest, itself included)."""
    num_items, width = neighbors.shape
    owner, position = _gather_segments(_indptr(rows, num_items), neighbors.ravel())
    pairs = (owner // width) * num_items + cols[position]
    unique_pairs, inverse = np.unique(pairs, return_inverse=True)
    means = np.bincount(inverse, values[position], minlength=len(unique_pairs)) / width
    return unique_pairs // num_items, unique_pairs % num_items, means


def _jaccard_distance(
    rows: np.ndarray, cols: np.ndarray, values: np.ndarray, num_items: int, num_rows: int
) -> np.ndarray:
    """d_J(i, j) = 1 − Σ min(V_i, V_j) / Σ max(V_i, V_j) for i < num_rows, all j, float64.

    V is sparse, given as row-sorted (rows, cols, values) pairs. Only pairs sharing a column
    contribute to Σ min; Σ max = ΣV_i + ΣV_j − Σ min.
    """
    by_column = np.argsort(cols, kind="stable")
    column_indptr = _indptr(cols[by_column], num_items)
    column_rows, column_values = rows[by_column], values[by_column]
    row_indptr = _indptr(rows, num_items)
    row_sums = np.bincount(rows, values, minlength=num_items)

    distance = np.empty((num_rows, num_items), dtype=np.float64)
    chunk_rows = rows_per_chunk(num_items)
    for start in range(0, num_rows, chunk_rows):
        stop = min(num_rows, start + chunk_rows)
        entries = np.arange(row_indptr[start], row_indptr[stop])
        owner, partner = _gather_segments(column_indptr, cols[entries])
        overlap = np.minimum(values[entries][owner], column_values[partner])
        cells = (rows[entries][owner] - start) * num_items + column_rows[partner]
        sum_min = np.bincount(cells, overlap, minlength=(stop - start) * num_items)
        sum_min = sum_min.reshape(stop - start, num_items)
        sum_max = row_sums[start:stop, None] + row_sums[None, :] - sum_min
        ratio = np.divide(sum_min, sum_max, out=np.zeros_like(sum_min), where=sum_max > 0)
        distance[start:stop] = 1.0 - ratio
    return distance


def k_reciprocal_distance(
    features: np.ndarray,
    k1: int = 10,
    k2: int = 3,
    lambda_value: float = 0.5,
    *,
    num_queries: int | None = None,
) -> np.ndarray:
    """Zhong et al.'s final distance among a small set of L2-normalized features.

    Steps, as in Zhong et al.'s reference code, on all n items of the set:
    d(i, j) = (1 − cos)/2 (their code instead squares a given distance and divides by its column
    maximum); ranks by d (ties: lower index; an item's k nearest include itself); R*(i, k1) with
    the 1/2 expansion and the 2/3 overlap rule; V_i(j) = exp(−d(i, j)) on R*(i, k1), normalized
    to sum 1; local query expansion V_i ← mean of V over i's k2 nearest (itself included;
    skipped when k2 = 1); d_J(i, j) = 1 − Σ min(V_i, V_j) / Σ max(V_i, V_j);
    final = (1 − λ)·d_J + λ·d.
    Returns float32 (m, n): the rows of the first m = `num_queries` items (default: all n).
    Needs O(n²) memory for d; everything after the neighbor ranks is sparse.
    """
    if k1 < 1 or k2 < 1:
        raise ValueError(f"k1 and k2 must be at least 1, got {k1} and {k2}")
    feature_rows = as_float32_rows(features)
    num_items = feature_rows.shape[0]
    num_rows = num_items if num_queries is None else num_queries
    if not 0 <= num_rows <= num_items:
        raise ValueError(f"num_queries must be in [0, {num_items}], got {num_queries}")
    if num_items == 0:
        return np.zeros((num_rows, 0), dtype=np.float32)

    distance = feature_rows @ feature_rows.T
    np.subtract(1.0, distance, out=distance)
    distance /= 2
    ranked = smallest_k(distance, max(k1 + 1, k2))

    rows, cols = _expanded_reciprocal_sets(ranked, k1)
    # exp in float64: numpy's float32 exp differs by an ulp between its SIMD paths (AVX2,
    # AVX-512, baseline), which would make the weights depend on the CPU.
    weights = np.exp(-distance[rows, cols].astype(np.float64))
    values = weights / np.bincount(rows, weights, minlength=num_items)[rows]
    if k2 > 1:
        rows, cols, values = _local_query_expansion(rows, cols, values, ranked[:, :k2])
    jaccard = _jaccard_distance(rows, cols, values, num_items, num_rows)
    final = (1.0 - lambda_value) * jaccard + lambda_value * distance[:num_rows]
    return final.astype(np.float32)


def k_reciprocal_rerank(
    queries: np.ndarray,
    index: np.ndarray,
    k1: int = 10,
    k2: int = 3,
    lambda_value: float = 0.3,
    *,
    block_rows: int = DEFAULT_BLOCK_ROWS,
) -> np.ndarray:
    """Full k-reciprocal re-ranking of queries against the index: similarity float32 (nQ, nX),
    1 − the final distance of `k_reciprocal_distance` on the set Q ∪ X. (Off in the authors'
    submission.)

    Without an (nQ + nX)² matrix, so that it runs at the validation size (1,129 queries +
    78,959 index images): the neighbor ranks come from an exact blocked self-search, the
    weights from the distances of the pairs in the R* sets only, and only the query rows of
    the Jaccard and original distances are dense, nQ × (nQ + nX).
    """
    if k1 < 1 or k2 < 1:
        raise ValueError(f"k1 and k2 must be at least 1, got {k1} and {k2}")
    features = np.concatenate([as_float32_rows(queries), as_float32_rows(index)])
    num_queries, num_items = queries.shape[0], features.shape[0]
    if num_queries == 0 or index.shape[0] == 0:
        return np.zeros((num_queries, index.shape[0]), dtype=np.float32)
    # Nearest first, exact ties to the lower index: the order of d = (1 - cos)/2.
    _, ranked = topk_inner_product(features, features, max(k1 + 1, k2), block_rows=block_rows)
    rows, cols = _expanded_reciprocal_sets(ranked, k1)
    # exp in float64, as in k_reciprocal_distance
    weights = np.exp(-_pair_distances(features, rows, cols).astype(np.float64))
    values = weights / np.bincount(rows, weights, minlength=num_items)[rows]
    if k2 > 1:
        rows, cols, values = _local_query_expansion(rows, cols, values, ranked[:, :k2])
    final = _jaccard_distance(rows, cols, values, num_items, num_queries)
    final *= 1.0 - lambda_value
    chunk_rows = rows_per_chunk(num_items)
    for start in range(0, num_queries, chunk_rows):
        stop = min(num_queries, start + chunk_rows)
        original = (1.0 - features[start:stop] @ features.T) / 2
        final[start:stop] += lambda_value * original
    return (1.0 - final[:, num_queries:]).astype(np.float32)


def _pair_distances(features: np.ndarray, rows: np.ndarray, cols: np.ndarray,
                    chunk: int = 65_536) -> np.ndarray:
    """d = (1 − cos)/2 of the (rows[i], cols[i]) pairs, float32, a chunk of pairs at a time."""
    distance = np.empty(len(rows), dtype=np.float32)
    for start in range(0, len(rows), chunk):
        part = slice(start, start + chunk)
        cosine = np.einsum("ij,ij->i", features[rows[part]], features[cols[part]])
        distance[part] = (1.0 - cosine) / 2
    return distance
