"""benchmarks.authors_retrieval: the clustered-feature writer, and the authors' transcription of
the Landmark-Country rerank against glr's own implementation (glr.rerank, glr.retrieve)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from benchmarks.authors_retrieval import (
    AuthorsResult,
    authors_retrieval,
    k_reciprocal_final_distance,
    write_clustered_features,
)
from glr import rerank, retrieve
from glr.params import parse_params

# ---------------------------------------------------------------- rounding bounds

U16 = 2.0**-11  # float16 unit roundoff (11-bit significand)
U32 = 2.0**-24  # float32 unit roundoff
# numpy's float32 exp: within 3 ulp of the correctly rounded value (numpy's accuracy tests),
# so within 3.5 ulp of exp itself; one ulp is at most 2u relative.
EXP32 = 7 * U32


def gamma(n: int) -> float:
    """γ_n = n·u/(1 − n·u): relative error bound of a float32 sum or dot product of n terms in
    any order, with or without FMA (Higham, Accuracy and Stability, §3.1)."""
    return n * U32 / (1 - n * U32)


def unit_norm_tolerance(dim: int) -> float:
    """|‖x̂‖ − 1| for a float32 unit row x rounded to float16 x̂.

    Before the cast, each component x_k / ‖x‖ is a float32 division of a float32 norm: the
    row's norm is 1 within dim·u32 (a generous bound of the sum-of-squares and sqrt roundings).
    The cast moves each normal component by at most u16·|x_k| and a subnormal one (< 2^-14) by
    at most half its spacing, 2^-25, so ‖x̂ − x‖ ≤ u16·‖x‖ + sqrt(dim)·2^-25 (triangle
    inequality): at dim 64, 4.9e-4 + 2.4e-7 + 3.8e-6.
    """
    return U16 + np.sqrt(dim) * 2.0**-25 + dim * U32


def similarity_error(dim: int, k1: int, k2: int, lambda_value: float) -> float:
    """A bound on |authors' similarity − glr's similarity| (1 − final distance), any CPU.

    Provided both sides build the same sets R* (the ranks agree; checked through the identical
    tags and rows below), they differ only by rounding:
    - d = (1 − cos)/2 of unit-ish rows: each side's dot product (torch / numpy kernels) is off
      the exact one by γ_D·Σ|x y| ≤ γ_D·1.001 (float16 norms, above); 1 − c and /2 add ≤ 2u:
      e_d ≤ γ_D/2·1.001 + 2u ≤ γ_D per side.
    - authors (float32): w = exp(−d) is off by e_d (from d) + EXP32, relative; V = w/Σw over
      |R*| ≤ K = (k1 + 1)(⌊k1/2⌉ + 2) terms adds γ_K + u and doubles the w part; the mean over
      k2 rows adds γ_k2 + u; Σmin over M ≤ k2·K terms adds γ_M. Relative error of m = Σmin:
      ε_A = 2(e_d + EXP32) + γ_K + u + γ_k2 + u + γ_M.
    - glr (float64 after d): ε_G = 2·e_d.
    d_J = 1 − m/(2 − m) (rows of V sum to 1, m ≤ 1) has slope ≤ 2 in m: Δd_J ≤ 2(ε_A + ε_G).
    The final (1 − λ)d_J + λd, its float32 casts and 1 − final add ≤ 4u:
    e = λ·2e_d + (1 − λ)·2(ε_A + ε_G) + 4u; at dim 64, k1 = 10, k2 = 3, λ = .5: 3.9e-5.
    """
    e_d = gamma(dim)
    half = int(np.around(k1 / 2))
    num_weights = (k1 + 1) * (half + 2)
    eps_a = (2 * (e_d + EXP32) + gamma(num_weights) + gamma(k2) + 2 * U32
             + gamma(k2 * num_weights))
    eps_g = 2 * e_d
    return lambda_value * 2 * e_d + (1 - lambda_value) * 2 * (eps_a + eps_g) + 4 * U32


# ---------------------------------------------------------------- write_clustered_features

SMALL = {"num_queries": 30, "num_index": 200, "num_refs": 2000, "dim": 64, "num_landmarks": 50,
         "num_countries": 6}


def test_clustered_features_layout_and_geometry(tmp_path: Path) -> None:
    write_clustered_features(tmp_path, seed=3, chunk_rows=500, **SMALL)
    features = retrieve.load_features(tmp_path)
    for name, rows in (("query", 30), ("index", 200), ("ref", 2000)):
        stored = np.load(tmp_path / f"{name}.npy", mmap_mode="r")
        assert stored.dtype == np.float16 and stored.shape == (rows, 64)
        norms = np.linalg.norm(stored.astype(np.float64), axis=1)
        np.testing.assert_allclose(norms, 1.0, rtol=0, atol=unit_norm_tolerance(64))
    assert features.query.shape == (30, 64) and features.index.shape == (200, 64)
    assert features.ref.shape == (2000, 64)
    assert len(features.query_ids) == 30 and len(set(features.index_ids)) == 200
    assert all(isinstance(i, str) and len(i) == 16 for i in features.query_ids)
    table = pq.read_table(tmp_path / "ref.parquet")
    assert table.column_names == ["id", "label", "country", "continent"]
    assert str(table.schema.field("label").type) == "int64"
    assert features.ref_labels.dtype == np.int64
    assert features.ref_labels.min() >= 0 and features.ref_labels.max() < 50
    assert features.ref_countries.str.fullmatch(r"C00[0-5]").all()
    # one country per landmark
    per_landmark = table.to_pandas().groupby("label")["country"].nunique()
    assert (per_landmark == 1).all()

    refs = features.ref.astype(np.float64)
    cosine = refs @ refs.T
    same = features.ref_labels[:, None] == features.ref_labels[None, :]
    np.fill_diagonal(same, False)
    other = ~same
    np.fill_diagonal(other, False)
    # Same landmark: ≈ 1/sqrt((1 + s1²)(1 + s2²)), s uniform in [.5, 1] → mean ≈ .64; random
    # centres at dim 64 are nearly orthogonal: mean ≈ 0 (std .125 per pair, ~4M pairs).
    assert 0.55 < cosine[same].mean() < 0.75
    assert abs(cosine[other].mean()) < 0.02
    assert np.percentile(cosine[same], 5) > 0.4


def test_clustered_features_deterministic_and_chunk_independent(tmp_path: Path) -> None:
    folders = {name: tmp_path / name for name in ("a", "b", "chunked", "other")}
    write_clustered_features(folders["a"], seed=9, **SMALL)
    write_clustered_features(folders["b"], seed=9, **SMALL)
    write_clustered_features(folders["chunked"], seed=9, chunk_rows=7, **SMALL)
    write_clustered_features(folders["other"], seed=10, **SMALL)
    for name in ("query.npy", "index.npy", "ref.npy"):
        reference = (folders["a"] / name).read_bytes()
        assert (folders["b"] / name).read_bytes() == reference
        assert (folders["chunked"] / name).read_bytes() == reference  # chunking: same bytes
        assert (folders["other"] / name).read_bytes() != reference
    for name in ("query.parquet", "index.parquet", "ref.parquet"):
        reference = pq.read_table(folders["a"] / name)
        # the chunked ref.parquet has other row groups, so compare contents, not bytes
        assert pq.read_table(folders["b"] / name).equals(reference)
        assert pq.read_table(folders["chunked"] / name).equals(reference)


# ---------------------------------------------------------------- the k-reciprocal transcription


def test_k_reciprocal_final_distance_hand_case() -> None:
    # Items 0 and 1 coincide, item 2 is orthogonal: d = [[0, 0, .5], [0, 0, .5], [.5, .5, 0]].
    # k1 = 1: R(0) = R(1) = {0, 1}, R(2) = {2}; V_0 = (.5, .5, 0), V_2 = (0, 0, 1); d_J(0, 2) = 1,
    # final = .5·1 + .5·.5. With k2 = 2, V_2 becomes the mean of V_2 and V_0 = (.25, .25, .5):
    # Σmin(V_0, V_2) = .5, d_J = 1 − .5/1.5 = 2/3, final = .5·2/3 + .5·.5 = 7/12.
    # Cosines, d and exp(0) = 1 are exact; what rounds is float32 arithmetic on values ≤ 2:
    # a few u (tolerance 4u).
    features = torch.eye(3)[[0, 0, 1]]
    np.testing.assert_allclose(k_reciprocal_final_distance(features, 1, 1, 0.5), [0, 0, 0.75],
                               rtol=0, atol=4 * U32)
    np.testing.assert_allclose(k_reciprocal_final_distance(features, 1, 2, 0.5), [0, 0, 7 / 12],
                               rtol=0, atol=4 * U32)


# ---------------------------------------------------------------- agreement with glr

K_NEIGHBORS = 20  # method.md's 30 costs the dense loops 3x the time; the procedure is the same
AGREEMENT = {"num_queries": 40, "num_index": 500, "num_refs": 5000, "dim": 64,
             "num_landmarks": 1500, "num_countries": 8}  # ~3 refs per landmark: mixed votes


@pytest.fixture(scope="module")
def agreement(tmp_path_factory: pytest.TempPathFactory):
    folder = tmp_path_factory.mktemp("clustered")
    write_clustered_features(folder, seed=21, **AGREEMENT)
    features = retrieve.load_features(folder)
    codes = {c: i for i, c in enumerate(sorted(features.ref_countries.unique()))}
    countries = features.ref_countries.map(codes).to_numpy(dtype=np.int64)
    authors = authors_retrieval(features.query, features.index, features.ref,
                                features.ref_labels, countries, k_neighbors=K_NEIGHBORS)
    return features, codes, countries, authors


def glr_side(features: retrieve.Features, countries: np.ndarray):
    """glr's composition in retrieve.backbone_scores, step by step."""
    plain = rerank.cosine_scores(features.query, features.index)
    index_labels, index_countries = rerank.index_tags(features.index, features.ref,
                                                      features.ref_labels, countries)
    tags = rerank.query_tags(features.query, features.ref, features.ref_labels, countries,
                             k_neighbors=K_NEIGHBORS)
    scores = rerank.landmark_country_rerank(plain, index_labels, index_countries, tags)
    return index_labels, index_countries, tags, scores


def test_authors_transcription_agrees_with_glr(agreement) -> None:
    features, codes, countries, authors = agreement
    index_labels, index_countries, tags, scores = glr_side(features, countries)
    params = parse_params({"retrieve": {"k_neighbors": K_NEIGHBORS}})
    np.testing.assert_array_equal(retrieve.backbone_scores(features, params, codes)[1], scores)

    assert authors.query_rows.tolist() == list(range(40))
    np.testing.assert_array_equal(authors.index_labels, index_labels)
    np.testing.assert_array_equal(authors.index_countries, index_countries)

    error = similarity_error(64, 10, 3, 0.5)
    mixed = 0
    weight_bounds = []
    for q in range(40):
        # A weight A/T (sums of at most `top` similarities, each off by ≤ e) is off by
        # ≤ 2·top·e/(T − top·e), plus u for float32 casts: ~1e-4 here (T ≈ 1.5 to 2.4).
        total = float(authors.best_similarities[q].sum())
        weight_error = 2 * 3 * error / (total - 3 * error) + U32
        weight_bounds.append(weight_error)
        for got_tags, got_weights, want in (
            (tags.labels[q], tags.label_weights[q], authors.label_tags[q]),
            (tags.countries[q], tags.country_weights[q], authors.country_tags[q]),
        ):
            used = got_tags != -1
            assert got_tags[used].tolist() == list(want)
            np.testing.assert_allclose(got_weights[used], list(want.values()), rtol=0,
                                       atol=weight_error)
            mixed += len(want) > 1
    assert mixed >= 20  # the weights are not all a trivial 1.0

    # S = cosine + α·w + β·v: each side's cosine is off the exact one by ≤ γ_D·1.001; an index
    # image gets at most one label and one country boost (≤ weight error each, α = 1, β = .1);
    # the float32 product and two sums round by ≤ u·|S| ≤ 2.2u each: 2γ_D + 1.1·Δw + 8u.
    score_error = 2 * gamma(64) * 1.001 + 1.1 * max(weight_bounds) + 8 * U32
    np.testing.assert_allclose(authors.scores, scores, rtol=0, atol=score_error)
    top_ids, _ = rerank.top_k_ids(scores, 100)
    identical = (authors.top_ids == top_ids).all(axis=1)
    assert identical.mean() == 1.0  # observed: all 40 rows identical


def test_query_subset_runs_only_those_queries(agreement) -> None:
    features, _, countries, authors = agreement
    subset = authors_retrieval(features.query, features.index, features.ref,
                               features.ref_labels, countries, k_neighbors=K_NEIGHBORS,
                               query_subset=[7, 2])
    assert isinstance(subset, AuthorsResult)
    assert subset.query_rows.tolist() == [7, 2]
    assert subset.scores.shape == (2, 500) and subset.top_ids.shape == (2, 100)
    np.testing.assert_array_equal(subset.index_refs, authors.index_refs)
    # The per-query part sees one query at a time with the same blocks: identical results.
    assert subset.label_tags == [authors.label_tags[7], authors.label_tags[2]]
    assert subset.country_tags == [authors.country_tags[7], authors.country_tags[2]]
    np.testing.assert_array_equal(subset.best_refs, authors.best_refs[[7, 2]])
    # Q·Xᵀ of 2 rows instead of 40 may take another kernel: each within γ_D·1.001 of exact.
    np.testing.assert_allclose(subset.scores, authors.scores[[7, 2]], rtol=0,
                               atol=2 * gamma(64) * 1.001)
    times = subset.times
    assert min(times.reference_load_s, times.index_tagging_s, times.per_query_s,
               times.scoring_s) >= 0
