"""glr.rerank against plain loop implementations, hand-computed cases and memory-mapped inputs."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from glr import rerank, search
from glr.rerank import QueryTags

DIM, NUM_CLASSES, NUM_COUNTRIES = 16, 12, 5

# ---------------------------------------------------------------- rounding bounds
#
# The module computes in float32 (faiss or BLAS dot products, numpy's SIMD exp), the loop
# references below in float64 or with other kernels. Every tolerance is a bound on the float32
# error that holds whatever the CPU's instruction set, BLAS kernel or thread count.

# float32 unit roundoff: every float32 operation is exact up to a relative 2^-24.
U32 = 2.0**-24
# numpy's float32 exp is within 3 ulp of the correctly rounded value on each of its SIMD paths
# (numpy's own accuracy tests, umath-validation-set-exp.csv), so within 3.5 ulp of exp itself;
# one ulp is at most 2u relative: 7u.
EXP32 = 7 * U32


def dot_error(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per pair, a bound on |float32 a_i·b_j − a_i·b_j| for any kernel: γ_d Σ|a b|.

    A dot product of length d summed in any order, with or without FMA, is off by at most
    γ_d Σ|a_k b_k|, γ_d = d·u/(1 − d·u) (Higham, Accuracy and Stability, §3.1): ≤ 9.5e-7 for
    unit rows of d = 16.
    """
    dim = a.shape[1]
    gamma = dim * U32 / (1 - dim * U32)
    return gamma * (np.abs(a.astype(np.float64)) @ np.abs(b.astype(np.float64)).T)


def assert_clear_cut(queries: np.ndarray, database: np.ndarray, k: int) -> None:
    """Each query's k nearest rows beat all others by more than float32 rounding can undo.

    Then every kernel (faiss's SIMD or BLAS path in any block size, numpy, float64) keeps the
    same k rows, and a discrete result built on them can be compared exactly.
    """
    if k >= len(database):
        return
    exact = queries.astype(np.float64) @ database.astype(np.float64).T
    bound = dot_error(queries, database)
    order = np.argsort(-exact, axis=1, kind="stable")
    kept = np.zeros(exact.shape, dtype=bool)
    kept[np.arange(len(queries))[:, None], order[:, :k]] = True
    lowest_kept = np.where(kept, exact - bound, np.inf).min(axis=1)
    best_left_out = np.where(kept, -np.inf, exact + bound).max(axis=1)
    assert np.all(lowest_kept > best_left_out), "near-tie at the k-th neighbor: change the data"


def k_reciprocal_error(lambda_value: float) -> float:
    """A bound on |float32 k_reciprocal_distance − the float64 loops| on any CPU.

    Both rank the same float32 distance matrix (the same matmul on the same array, so the same
    kernel), hence build the same sets R*; only the weights exp(−d) differ, by a relative
    ε ≤ EXP32. Normalizing (V = w/Σw) makes that 2ε; m = Σmin(V_i, V_j) ≤ 1 is then off by 2εm,
    and Σmax = 2 − m (every V sums to 1), so d_J = 1 − m/(2 − m), of slope at most 2 in m, is
    off by ≤ 4ε. The final (1 − λ)d_J + λd adds its float32 cast (u); u more covers the float64
    steps (~1e-15). For λ = 0.5: 16u = 9.5e-7.
    """
    return (1 - lambda_value) * 4 * EXP32 + 2 * U32


# ---------------------------------------------------------------- data


def unit_rows(data: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm, float32."""
    data = data.astype(np.float32)
    return data / np.linalg.norm(data, axis=1, keepdims=True)


def landmark_data(seed: int, num_queries: int = 7, num_index: int = 40, num_refs: int = 300):
    """Clustered features: each image lies near the center of its landmark class."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((NUM_CLASSES, DIM))
    class_country = rng.integers(0, NUM_COUNTRIES, NUM_CLASSES)

    def around(classes: np.ndarray) -> np.ndarray:
        return unit_rows(centers[classes] + 2.0 * rng.standard_normal((len(classes), DIM)))

    ref_labels = rng.integers(0, NUM_CLASSES, num_refs)
    # Mostly the landmark's country, sometimes another (photos of one landmark from abroad).
    ref_countries = np.where(rng.random(num_refs) < 0.8, class_country[ref_labels],
                             rng.integers(0, NUM_COUNTRIES, num_refs))
    queries = around(rng.integers(0, NUM_CLASSES, num_queries))
    index = around(rng.integers(0, NUM_CLASSES, num_index))
    return queries, index, around(ref_labels), ref_labels, ref_countries


# ---------------------------------------------------------------- loop reference implementations


def ref_nearest(database: np.ndarray, vector: np.ndarray, k: int) -> list[int]:
    """Ids of the k rows with the highest inner product (in float64), ties to the lower id."""
    scores = [float(np.dot(row.astype(np.float64), vector.astype(np.float64)))
              for row in database]
    return sorted(range(len(database)), key=lambda j: (-scores[j], j))[:k]


def ref_k_reciprocal(features: np.ndarray, k1: int, k2: int, lambda_value: float,
                     rows: list[int] | None = None) -> np.ndarray:
    """Zhong et al.'s re-ranking, step by step as in the paper and its reference code."""
    cosine = features @ features.T
    original = (1 - cosine) / 2
    n = len(features)
    rank = np.argsort(original, axis=1, kind="stable")

    def k_reciprocal_set(i: int, k: int) -> list[int]:
        """R(i, k): the members of N(i, k) that have i in their own N(·, k)."""
        return [int(j) for j in rank[i, : k + 1] if i in rank[j, : k + 1]]

    weights = np.zeros((n, n))
    for i in range(n):
        reciprocal = k_reciprocal_set(i, k1)
        expanded = list(reciprocal)
        for candidate in reciprocal:
            half = k_reciprocal_set(candidate, int(np.around(k1 / 2)))
            if len(set(half) & set(reciprocal)) > 2 / 3 * len(half):
                expanded += half
        expanded = sorted(set(expanded))
        gaussian = {j: np.exp(-float(original[i, j])) for j in expanded}
        total = sum(gaussian.values())
        for j, value in gaussian.items():
            weights[i, j] = value / total
    if k2 > 1:
        weights = np.array([weights[rank[i, :k2]].mean(axis=0) for i in range(n)])

    rows = list(range(n)) if rows is None else rows
    final = np.zeros((len(rows), n))
    for a, i in enumerate(rows):
        for j in range(n):
            sum_min = sum(min(weights[i, c], weights[j, c]) for c in range(n))
            sum_max = sum(max(weights[i, c], weights[j, c]) for c in range(n))
            jaccard = 1 - sum_min / sum_max
            final[a, j] = (1 - lambda_value) * jaccard + lambda_value * original[i, j]
    return final


def ref_weighted_tags(tags: list[int], similarities: list[float]) -> list[tuple[int, float]]:
    """Each distinct tag with its share of the similarity, by share desc then first appearance."""
    shares: dict[int, float] = {}
    for tag, similarity in zip(tags, similarities, strict=True):
        shares[tag] = shares.get(tag, 0.0) + similarity
    total = sum(similarities)
    ordered = sorted(shares.items(), key=lambda item: -item[1])  # sorted() is stable
    return [(tag, share / total) for tag, share in ordered]


def ref_query_tags(queries, references, ref_labels, ref_countries, k_neighbors, k1, k2,
                   lambda_value, top):
    """Per query: the union set, the k-reciprocal similarity, the top references, tag dicts.

    Checks on the way that the module, in float32 on any CPU, must find the same neighbors and
    the same `top` references (no near-tie at either cut). Returns per query (label tags,
    country tags, the sum of the `top` similarities).
    """
    assert_clear_cut(queries, references, k_neighbors)
    # The module's similarities 1 − d are off by the distance error plus their own cast.
    similarity_error = k_reciprocal_error(lambda_value) + U32
    result = []
    for query in queries:
        first_level = ref_nearest(references, query, k_neighbors)
        assert_clear_cut(references[first_level], references, k_neighbors)
        members = set(first_level)
        for reference in first_level:
            members |= set(ref_nearest(references, references[reference], k_neighbors))
        members = sorted(members)
        features = np.concatenate([query[None, :], references[members]])
        distance = ref_k_reciprocal(features, k1, k2, lambda_value, rows=[0])[0, 1:]
        similarity = 1 - distance
        ranked = sorted(range(len(members)), key=lambda p: (-similarity[p], p))
        best = ranked[:top]
        if len(ranked) > top:
            assert similarity[best[-1]] - similarity[ranked[top]] > 2 * similarity_error
        best_sims = [float(similarity[p]) for p in best]
        labels = ref_weighted_tags([int(ref_labels[members[p]]) for p in best], best_sims)
        countries = ref_weighted_tags([int(ref_countries[members[p]]) for p in best], best_sims)
        result.append((labels, countries, sum(best_sims)))
    return result


def assert_tags_equal(tags: QueryTags, expected, top: int, lambda_value: float = 0.5) -> None:
    """QueryTags equals the per-query lists of (tag, weight), padded with (-1, 0)."""
    similarity_error = k_reciprocal_error(lambda_value) + U32
    for q, (labels, countries, total) in enumerate(expected):
        # A weight A/T (A, T sums of at most `top` similarities, each off by at most
        # similarity_error =: e) is off by (|ΔA| + w|ΔT|)/(T − |ΔT|) ≤ 2·top·e/(T − top·e), plus
        # u for its float32 cast: at most 4.6e-6 here.
        weight_error = 2 * top * similarity_error / (total - top * similarity_error) + U32
        for got_tags, got_weights, want in (
            (tags.labels[q], tags.label_weights[q], labels),
            (tags.countries[q], tags.country_weights[q], countries),
        ):
            want_weights = [w for _, w in want]
            # Tags are ordered by weight: distinct weights must be further apart than their
            # errors for the order to be the same on every CPU.
            assert all(a - b > 2 * weight_error for a, b in itertools.pairwise(want_weights))
            want = want + [(-1, 0.0)] * (top - len(want))
            assert got_tags.tolist() == [tag for tag, _ in want]
            np.testing.assert_allclose(got_weights, [w for _, w in want], rtol=0,
                                       atol=weight_error)


# ---------------------------------------------------------------- k-reciprocal distance


def assert_same_ranking(result: np.ndarray, expected: np.ndarray, descending: bool,
                        error: float) -> None:
    """Each row of `result`, sorted, orders the `expected` values the same way.

    `error` bounds |result − expected|, so two values less than 2·error apart may come in either
    order (e.g. two items symmetric to a query); beyond that the orders must agree.
    """
    sign = -1.0 if descending else 1.0
    order = np.argsort(sign * result, axis=1, kind="stable")
    expected_in_result_order = sign * np.take_along_axis(expected, order, axis=1)
    assert np.all(np.diff(expected_in_result_order, axis=1) >= -2 * error)
    strict = np.argsort(sign * expected, axis=1, kind="stable")
    gaps = np.diff(np.take_along_axis(sign * expected, strict, axis=1), axis=1)
    # Where expected values are well apart, the rankings agree exactly.
    clear = np.all(gaps > 2 * error, axis=1)
    assert clear.any()  # the check below is not empty
    np.testing.assert_array_equal(order[clear], strict[clear])




@pytest.mark.parametrize(("k1", "k2", "lambda_value"),
                         [(10, 3, 0.5), (6, 1, 0.3), (7, 4, 0.5), (20, 6, 0.0), (3, 2, 1.0)])
def test_k_reciprocal_distance_matches_loops(k1: int, k2: int, lambda_value: float) -> None:
    features = unit_rows(np.random.default_rng(5).standard_normal((60, DIM)))
    result = rerank.k_reciprocal_distance(features, k1, k2, lambda_value)
    expected = ref_k_reciprocal(features, k1, k2, lambda_value)
    assert result.dtype == np.float32 and result.shape == (60, 60)
    error = k_reciprocal_error(lambda_value)
    np.testing.assert_allclose(result, expected, rtol=0, atol=error)
    assert_same_ranking(result, expected, descending=False, error=error)
    # The first 5 rows alone go through the very same operations on the same arrays (the full
    # distance matrix, the same sparse sums in the same order), so they are bit-identical.
    first_rows = rerank.k_reciprocal_distance(features, k1, k2, lambda_value, num_queries=5)
    np.testing.assert_array_equal(first_rows, result[:5])


def test_k_reciprocal_distance_with_duplicates_and_tiny_sets() -> None:
    rng = np.random.default_rng(6)
    features = unit_rows(rng.standard_normal((30, DIM)))
    features[[4, 9, 17]] = features[2]  # exact duplicates: exact distance ties
    error = k_reciprocal_error(0.5)
    np.testing.assert_allclose(rerank.k_reciprocal_distance(features, 5, 3, 0.5),
                               ref_k_reciprocal(features, 5, 3, 0.5), rtol=0, atol=error)
    for n in (1, 2, 5):  # fewer items than k1 + 1
        small = features[:n]
        np.testing.assert_allclose(rerank.k_reciprocal_distance(small, 10, 3, 0.5),
                                   ref_k_reciprocal(small, 10, 3, 0.5), rtol=0, atol=error)


def test_k_reciprocal_distance_hand_case() -> None:
    # Items 0 and 1 coincide, item 2 is orthogonal: d = [[0, 0, .5], [0, 0, .5], [.5, .5, 0]].
    # k1 = 1: R(0) = R(1) = {0, 1}, R(2) = {2}; V_0 = V_1 = (.5, .5, 0), V_2 = (0, 0, 1).
    # Cosines, distances and weights (exp(0) = 1 only) are exact; what rounds is the float64
    # ratio (~1e-16) and the float32 cast of a value ≤ 1 (≤ u): tolerance u.
    features = np.eye(3, dtype=np.float32)[[0, 0, 1]]
    no_expansion = rerank.k_reciprocal_distance(features, k1=1, k2=1, lambda_value=0.5)
    # d_J(0, 2) = 1, so the final distance is .5·1 + .5·.5.
    np.testing.assert_allclose(no_expansion, [[0, 0, 0.75], [0, 0, 0.75], [0.75, 0.75, 0]],
                               rtol=0, atol=U32)
    # k2 = 2: V_2 becomes the mean of V_2 and V_0 = (.25, .25, .5); Σmin(V_0, V_2) = .5,
    # Σmax = 1.5, d_J = 2/3, final = .5·2/3 + .5·.5 = 7/12.
    expanded = rerank.k_reciprocal_distance(features, k1=1, k2=2, lambda_value=0.5)
    np.testing.assert_allclose(expanded[0], [0, 0, 7 / 12], rtol=0, atol=U32)


def test_k_reciprocal_rerank_matches_loops() -> None:
    queries, index, *_ = landmark_data(7, num_queries=6, num_index=30)
    features = np.concatenate([queries, index])
    # The sparse path ranks neighbors by faiss and weighs pairs by their own dot products, not
    # the loops' matmul: every k1 + 1 nearest set must be clear of that rounding ...
    assert_clear_cut(features, features, 8 + 1)
    result = rerank.k_reciprocal_rerank(queries, index, k1=8, k2=3, lambda_value=0.3,
                                        block_rows=16)
    expected = 1 - ref_k_reciprocal(features, 8, 3, 0.3, rows=list(range(6)))[:, 6:]
    assert result.shape == (6, 30)
    # ... and each distance d = (1 − cos)/2 is off by at most γ_D/2 (unit rows: Σ|x y| ≤ 1),
    # which moves exp(−d) by that relative amount on top of EXP32 (see k_reciprocal_error),
    # and the λ·d term by λ times it; u more for the float32 1 − d.
    dim = features.shape[1]
    delta = dim * U32 / (1 - dim * U32) / 2
    error = (1 - 0.3) * 4 * (EXP32 + delta) + 0.3 * delta + 3 * U32
    np.testing.assert_allclose(result, expected, rtol=0, atol=error)
    assert_same_ranking(result, expected, descending=True, error=error)


def test_k_reciprocal_rerank_equals_the_dense_distance() -> None:
    """The sparse full rerank computes what k_reciprocal_distance computes densely."""
    queries, index, *_ = landmark_data(9, num_queries=5, num_index=40)
    features = np.concatenate([queries, index])
    assert_clear_cut(features, features, 10 + 1)
    dense = 1 - rerank.k_reciprocal_distance(features, 10, 3, 0.3, num_queries=5)[:, 5:]
    sparse = rerank.k_reciprocal_rerank(queries, index, k1=10, k2=3, lambda_value=0.3)
    dim = features.shape[1]
    delta = dim * U32 / (1 - dim * U32) / 2  # the two paths' dot products, as above
    np.testing.assert_allclose(sparse, dense, rtol=0,
                               atol=(1 - 0.3) * 4 * (2 * EXP32 + 2 * delta) + 2 * delta
                               + 4 * U32)
    empty = rerank.k_reciprocal_rerank(queries, index[:0])
    assert empty.shape == (5, 0)


# ---------------------------------------------------------------- tags


def test_index_tags_match_loops() -> None:
    _, index, references, ref_labels, ref_countries = landmark_data(8)
    assert_clear_cut(index, references, 1)  # faiss in float32 finds the float64 top 1
    labels, countries = rerank.index_tags(index, references, ref_labels, ref_countries,
                                          block_rows=64)
    for j, image in enumerate(index):
        nearest = ref_nearest(references, image, 1)[0]
        assert labels[j] == ref_labels[nearest]
        assert countries[j] == ref_countries[nearest]
    assert labels.dtype == countries.dtype == np.int64


def test_tag_weights_hand_case() -> None:
    # Weights are float64 ratios (off by ~1e-16) cast to float32 (off by ≤ u·w ≤ u): 2u covers.
    # Best references with labels [5, 5, 7] and similarities [.9, .8, .3]: 5 → 1.7/2, 7 → .3/2.
    labels, weights = rerank.tag_weights(np.array([[5, 5, 7]]), np.array([[0.9, 0.8, 0.3]]))
    assert labels.tolist() == [[5, 7, -1]]
    np.testing.assert_allclose(weights, [[1.7 / 2.0, 0.3 / 2.0, 0.0]], rtol=0, atol=2 * U32)
    # The heavier tag comes first even if a lighter one holds the best reference.
    labels, weights = rerank.tag_weights(np.array([[2, 3, 3], [4, 4, 4]]),
                                         np.array([[0.9, 0.6, 0.5], [0.2, 0.2, 0.1]]))
    assert labels.tolist() == [[3, 2, -1], [4, -1, -1]]
    np.testing.assert_allclose(weights, [[1.1 / 2.0, 0.9 / 2.0, 0], [1, 0, 0]], rtol=0,
                               atol=2 * U32)
    # Unused slots (fewer references than `top`) vote for nothing.
    labels, weights = rerank.tag_weights(np.array([[1, 8, 0]]), np.array([[0.6, 0.2, 0.0]]),
                                         valid=np.array([[True, True, False]]))
    assert labels.tolist() == [[1, 8, -1]]
    np.testing.assert_allclose(weights, [[0.75, 0.25, 0]], rtol=0, atol=2 * U32)


@pytest.mark.parametrize(("seed", "k_neighbors", "k1", "k2", "top"),
                         [(9, 30, 10, 3, 3), (10, 8, 10, 3, 3), (11, 12, 7, 1, 5)])
def test_query_tags_match_loops(seed: int, k_neighbors: int, k1: int, k2: int, top: int) -> None:
    queries, _, references, ref_labels, ref_countries = landmark_data(seed)
    tags = rerank.query_tags(queries, references, ref_labels, ref_countries,
                             k_neighbors=k_neighbors, k1=k1, k2=k2, top=top)
    expected = ref_query_tags(queries, references, ref_labels, ref_countries, k_neighbors, k1, k2,
                              0.5, top)
    assert tags.labels.shape == tags.label_weights.shape == (7, top)
    assert tags.labels.dtype == tags.countries.dtype == np.int64
    assert tags.label_weights.dtype == tags.country_weights.dtype == np.float32
    assert_tags_equal(tags, expected, top)
    # The float64 weights sum to 1 (~1e-16); casting each to float32 moves the sum by ≤ u·Σw = u
    # and the float32 sum of `top` values adds ≤ (top − 1)u.
    np.testing.assert_allclose(tags.label_weights.sum(axis=1), 1, rtol=0, atol=(top + 1) * U32)


def test_query_tags_with_fewer_references_than_top() -> None:
    queries, _, references, ref_labels, ref_countries = landmark_data(12)
    references, ref_labels, ref_countries = references[:2], ref_labels[:2], ref_countries[:2]
    tags = rerank.query_tags(queries, references, ref_labels, ref_countries, top=3)
    expected = ref_query_tags(queries, references, ref_labels, ref_countries, 30, 10, 3, 0.5, 3)
    assert_tags_equal(tags, expected, 3)
    assert np.all(tags.labels[:, 2] == -1) and np.all(tags.label_weights[:, 2] == 0)


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_blocked_memmap_references_equal_in_memory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   precision: str) -> None:
    """Both CPU backends, named (not what this machine would pick): faiss float32, whose
    searches are recorded, and torch bfloat16 (emulated on a CPU without it: slow, exact)."""
    backend = search.Backend("cpu", precision)
    queries, index, references, ref_labels, ref_countries = landmark_data(13)
    path = tmp_path / "references.npy"
    np.save(path, references.astype(np.float16))
    mapped = np.load(path, mmap_mode="r")
    in_memory = mapped.astype(np.float32)
    # No near-tie at any cut (first level, second level, top 1 of the index images): whatever
    # the block size, every search keeps the same rows on any CPU, and all that follows runs
    # the same code on the same float32 rows, so the results are identical.
    assert_clear_cut(queries, in_memory, 30)
    first_level = np.argsort(-(queries.astype(np.float64) @ in_memory.T), axis=1)[:, :30]
    assert_clear_cut(in_memory[np.unique(first_level)], in_memory, 30)
    assert_clear_cut(index, in_memory, 1)

    expected_tags = rerank.query_tags(queries, in_memory, ref_labels, ref_countries)
    expected_index = rerank.index_tags(index, in_memory, ref_labels, ref_countries)

    # From here on, every exact search sees at most 64 database rows at a time.
    import faiss  # glr.search imports it where it runs it; the patch reaches it there

    searched_rows: list[int] = []
    knn = faiss.knn

    def recording_knn(queries, database, k, **kwargs):
        searched_rows.append(database.shape[0])
        return knn(queries, database, k, **kwargs)

    monkeypatch.setattr(faiss, "knn", recording_knn)
    tags = rerank.query_tags(queries, mapped, ref_labels, ref_countries, block_rows=64,
                             backend=backend)
    labels, countries = rerank.index_tags(index, mapped, ref_labels, ref_countries, block_rows=64,
                                          backend=backend)

    if backend.uses_faiss:
        assert searched_rows and max(searched_rows) <= 64
    else:
        assert searched_rows == []
    for name in ("labels", "label_weights", "countries", "country_weights"):
        np.testing.assert_array_equal(getattr(tags, name), getattr(expected_tags, name))
    np.testing.assert_array_equal(labels, expected_index[0])
    np.testing.assert_array_equal(countries, expected_index[1])


# ---------------------------------------------------------------- rerank, ensemble, top-k


def ref_rerank(scores, index_labels, index_countries, tags: QueryTags, alpha, beta):
    """S[q, j] + α·w(label_j) + β·v(country_j) with per-query dicts, one cell at a time."""
    result = np.zeros(scores.shape)
    for q in range(scores.shape[0]):
        label_weight = {int(t): float(w) for t, w in zip(tags.labels[q], tags.label_weights[q],
                                                          strict=True) if t != -1}
        country_weight = {int(c): float(v) for c, v in zip(tags.countries[q],
                                                           tags.country_weights[q], strict=True)
                          if c != -1}
        for j in range(scores.shape[1]):
            result[q, j] = (scores[q, j] + alpha * label_weight.get(int(index_labels[j]), 0.0)
                            + beta * country_weight.get(int(index_countries[j]), 0.0))
    return result


def test_landmark_country_rerank_hand_case() -> None:
    labels, label_weights = rerank.tag_weights(np.array([[5, 5, 7]]), np.array([[0.9, 0.8, 0.3]]))
    countries, country_weights = rerank.tag_weights(np.array([[2, 3, 3]]),
                                                    np.array([[0.9, 0.8, 0.3]]))
    tags = QueryTags(labels, label_weights, countries, country_weights)
    scores = np.array([[0.1, 0.2, 0.3, 0.4, 0.5, 0.6]], dtype=np.float32)
    original = scores.copy()
    index_labels = np.array([5, 7, 5, 9, 7, 1])
    index_countries = np.array([2, 3, 4, 3, 2, 0])
    result = rerank.landmark_country_rerank(scores, index_labels, index_countries, tags,
                                            alpha=1.0, beta=0.1)
    # label 5 → .85, 7 → .15; country 3 → 1.1/2 = .55, 2 → .9/2 = .45.
    # float32 from decimal values, all ≤ 1: the stored s, w, v, β (4 roundings) and the product
    # and two sums (3 more), each ≤ u·|value| ≤ u: tolerance 7u.
    expected = [0.1 + 0.85 + 0.045, 0.2 + 0.15 + 0.055, 0.3 + 0.85, 0.4 + 0.055, 0.5 + 0.15 + 0.045,
                0.6]
    np.testing.assert_allclose(result, [expected], rtol=0, atol=7 * U32)
    assert result.dtype == np.float32
    np.testing.assert_array_equal(scores, original)  # not modified
    inplace = rerank.landmark_country_rerank(scores, index_labels, index_countries, tags,
                                             alpha=1.0, beta=0.1, inplace=True)
    assert inplace is scores
    np.testing.assert_allclose(scores, [expected], rtol=0, atol=7 * U32)


def test_landmark_country_rerank_matches_loops(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(search, "CHUNK_ELEMENTS", 100)  # several row chunks
    queries, index, references, ref_labels, ref_countries = landmark_data(14)
    scores = rerank.cosine_scores(queries, index, block_rows=16)
    exact = queries.astype(np.float64) @ index.T.astype(np.float64)
    assert np.all(np.abs(scores - exact) <= dot_error(queries, index))
    index_labels, index_countries = rerank.index_tags(index, references, ref_labels,
                                                      ref_countries)
    tags = rerank.query_tags(queries, references, ref_labels, ref_countries)
    result = rerank.landmark_country_rerank(scores, index_labels, index_countries, tags,
                                            alpha=1.0, beta=0.1)
    expected = ref_rerank(scores, index_labels, index_countries, tags, 1.0, 0.1)
    # r = (s + αw) + βv in float32 from float32 s, w, v (α = 1 exact): the two sums and the
    # product round by u of their result, β = 0.1 is stored with u·β: ≤ u(2|r| + 3βv) with
    # v ≤ 1, i.e. rtol 2u and atol u (plus O(u²)).
    np.testing.assert_allclose(result, expected, rtol=2 * U32, atol=U32)
    error = U32 * (2 * np.abs(expected).max() + 1)
    assert_same_ranking(result, expected, descending=True, error=error)
    assert not np.array_equal(result, scores)  # the tags did move some scores


def test_ensemble_matches_loops() -> None:
    rng = np.random.default_rng(15)
    scores = [rng.random((7, 40)).astype(np.float32) for _ in range(3)]
    weights = [0.5, 0.3, 0.2]
    result = rerank.ensemble(scores, weights)
    expected = np.zeros((7, 40))
    for q in range(7):
        for j in range(40):
            expected[q, j] = sum(w * float(s[q, j]) for s, w in zip(scores, weights, strict=True))
    assert result.dtype == np.float32
    # Σ w_b s_b in float32: each stored weight and product rounds (2u·w_b s_b), each of the two
    # non-trivial sums by u of its partial sum; all terms are ≥ 0 and Σ w_b s_b < 1: ≤ 4u.
    np.testing.assert_allclose(result, expected, rtol=0, atol=4 * U32)
    with pytest.raises(ValueError, match="shapes differ"):
        rerank.ensemble([scores[0], scores[1][:, :5]], [1.0, 1.0])
    with pytest.raises(ValueError, match="one weight per"):
        rerank.ensemble(scores, [1.0])


@pytest.mark.parametrize("k", [1, 5, 40, 100])
def test_top_k_ids_match_loops(monkeypatch: pytest.MonkeyPatch, k: int) -> None:
    monkeypatch.setattr(search, "CHUNK_ELEMENTS", 100)
    rng = np.random.default_rng(16)
    scores = np.round(rng.random((7, 40)), 1).astype(np.float32)  # many exact ties
    # top_k_ids only compares and gathers the given values (no arithmetic): exact on any CPU.
    indices, top_scores = rerank.top_k_ids(scores, k)
    for q in range(7):
        expected = sorted(range(40), key=lambda j: (-scores[q, j], j))[:k]
        assert indices[q].tolist() == expected
        assert top_scores[q].tolist() == [scores[q, j] for j in expected]
    assert indices.dtype == np.int64 and indices.shape == (7, min(k, 40))


# ---------------------------------------------------------------- retrieve's composition


@pytest.mark.parametrize("rerank_on", [True, False])
def test_the_full_k_reciprocal_rerank_replaces_the_cosine(rerank_on: bool) -> None:
    """retrieve.full_kr: the k-reciprocal similarity takes the cosine's place, and the
    Landmark-Country rerank adds its tags to it (the authors' after_merge)."""
    from glr import retrieve
    from glr.params import parse_params

    queries, index, refs, ref_labels, ref_countries = landmark_data(11)
    features = retrieve.Features(
        query=queries, index=index, ref=refs,
        query_ids=[f"q{i}" for i in range(len(queries))],
        index_ids=[f"x{i}" for i in range(len(index))],
        ref_labels=ref_labels, ref_countries=pd.Series([f"C{c}" for c in ref_countries]))
    codes = {f"C{c}": c for c in range(NUM_COUNTRIES)}
    params = parse_params({"retrieve": {"full_kr": True, "rerank": rerank_on}})
    plain, scores = retrieve.backbone_scores(features, params, codes)
    kr = rerank.k_reciprocal_rerank(queries, index, k1=10, k2=3, lambda_value=0.3)
    np.testing.assert_array_equal(plain, rerank.cosine_scores(queries, index))
    if not rerank_on:
        np.testing.assert_array_equal(scores, kr)
        return
    without_kr = retrieve.backbone_scores(
        features, parse_params({"retrieve": {"rerank": True}}), codes)[1]
    # the same tag boosts, on the k-reciprocal similarity instead of the cosine: each sum and
    # difference rounds once in float32 (u of its magnitude, at most |base| + |boost| <= 3)
    assert not np.array_equal(scores, without_kr)
    np.testing.assert_allclose(scores - kr, without_kr - plain, rtol=0, atol=4 * 3 * U32)


def test_retrieve_main_ensembles_several_backbones(tmp_path):
    """retrieve.main with two backbones: each backbone's variants and the weighted ensemble,
    the ensemble's rerank computed as Σ w·base + Σ w·boosts a chunk at a time, equal to the
    dense Σ w·(base + boosts) of `rerank.ensemble`. The index tags come from the tag stage's
    tables, the dense side finds them itself: each backbone's rankings are the same."""
    from benchmarks.authors_retrieval import write_clustered_features
    from glr import retrieve, tag
    from glr.params import parse_params

    names, weights = ["resnet18", "resnet34"], [1.0, 0.5]
    for seed, name in enumerate(names):
        write_clustered_features(tmp_path / "features" / name, num_queries=9, num_index=120,
                                 num_refs=400, dim=16, num_landmarks=40, num_countries=5,
                                 seed=seed)
    recipe = {f"{name}-p1": {"backbone": name, "phase": "p1", "init": "pretrained"}
              for name in names}
    params = parse_params({"model": {"pretrained": False, "backbones": names},
                           "train": {"recipe": recipe},
                           "retrieve": {"weights": weights, "k": 10, "k_neighbors": 8}})
    for name in names:
        tag.main(params, name, tmp_path / "features", tmp_path / "tags")
    rankings = retrieve.main(params, tmp_path / "features", tmp_path / "tags",
                             tmp_path / "retrieval")
    assert set(rankings) == {f"{n}-{v}" for n in [*names, "ensemble"] for v in ("plain",
                                                                               "rerank")}
    assert json.loads((tmp_path / "retrieval/variants.json").read_text())["final"] == (
        "ensemble-rerank")
    dense = []
    for name in names:
        features = retrieve.load_features(tmp_path / "features" / name)
        codes = {c: i for i, c in enumerate(sorted(features.ref_countries.unique()))}
        dense.append(retrieve.backbone_scores(features, params, codes))
    for variant, position in (("plain", 0), ("rerank", 1)):
        expected = rerank.ensemble([scores[position] for scores in dense], weights)
        _, expected_top = rerank.top_k_ids(expected, 10)
        got = np.array(rankings[f"ensemble-{variant}"]["scores"].tolist())
        # The two sums round in another order: every term is at most 1.5·(1 + α + β) = 3.15
        # and each of the ≤ 4 additions rounds by u = 2^-24 of its result (< 6.3), so the
        # sorted top scores agree within 4·6.3·2^-24 whatever ties flip.
        np.testing.assert_allclose(got, expected_top, rtol=0, atol=4 * 6.3 * U32)
        for name, scores in zip(names, dense, strict=True):
            _, own_top = rerank.top_k_ids(scores[position], 10)
            np.testing.assert_array_equal(
                np.array(rankings[f"{name}-{variant}"]["scores"].tolist()), own_top)


# ---------------------------------------------------------------- the tag stage


def tag_features(tmp_path: Path):
    """One backbone's features in the extraction layout, and their params."""
    from benchmarks.authors_retrieval import write_clustered_features
    from glr.params import parse_params

    write_clustered_features(tmp_path / "features" / "resnet18", num_queries=5, num_index=60,
                             num_refs=300, dim=16, num_landmarks=30, num_countries=4, seed=3)
    params = parse_params({"retrieve": {"block_rows": 64}})
    return tmp_path / "features", params


def test_the_tag_stage_gives_each_index_image_its_nearest_references_tags(tmp_path):
    """`glr tag`: every index image gets the label and country of the reference with the
    highest exact inner product (float64 here; no near-tie, so any kernel finds the same one),
    searched in blocks of retrieve.block_rows."""
    from glr import retrieve, tag

    features_dir, params = tag_features(tmp_path)
    out = tag.main(params, "resnet18", features_dir, tmp_path / "tags")
    assert out == tmp_path / "tags" / "resnet18.parquet"
    features = retrieve.load_features(features_dir / "resnet18")
    references = np.asarray(features.ref, dtype=np.float32)
    assert_clear_cut(features.index, references, 1)
    nearest = np.argmax(features.index.astype(np.float64) @ references.astype(np.float64).T,
                        axis=1)
    table = pd.read_parquet(out)
    assert table["id"].tolist() == features.index_ids
    assert table["label"].tolist() == features.ref_labels[nearest].tolist()
    assert table["country"].tolist() == features.ref_countries.to_numpy()[nearest].tolist()
    # read back as the rerank's codes, in the features' order
    codes = tag.country_codes(features.ref_countries)
    labels, countries = tag.read_index_tags(out, features.index_ids, codes)
    assert labels.tolist() == table["label"].tolist()
    assert countries.tolist() == [codes[c] for c in table["country"]]


def test_stored_index_tags_are_checked_against_the_features(tmp_path):
    """A missing table, or one of other index images, is a one-line error naming the file and
    the stage to rerun; a country the references lack matches nothing (-1)."""
    from glr import tag
    from glr.errors import UserError

    path = tmp_path / "resnet18.parquet"
    with pytest.raises(UserError, match=r"resnet18\.parquet: no index tags; run `dvc repro tag`"):
        tag.read_index_tags(path, ["a"], {"JP": 0})
    pd.DataFrame({"id": ["a", "b"], "label": [4, 7], "country": ["JP", "XX"]}).to_parquet(path)
    with pytest.raises(UserError, match=r"resnet18\.parquet: its index ids differ"):
        tag.read_index_tags(path, ["b", "a"], {"JP": 0})
    labels, countries = tag.read_index_tags(path, ["a", "b"], {"FR": 0, "JP": 1})
    assert labels.tolist() == [4, 7] and countries.tolist() == [1, -1]
