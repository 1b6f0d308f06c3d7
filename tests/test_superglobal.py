"""glr.superglobal: SuperGlobal's MDescAug + RerankwMDA against loops written from the paper's
definition, and its place in a ranking."""

from __future__ import annotations

import numpy as np
import pytest

from glr import superglobal
from glr.superglobal import SuperGlobalSettings

U64 = 2.0**-53


def unit_rows(rows: np.ndarray) -> np.ndarray:
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def loop_refined(query, candidates, k, beta):
    """The definition, one candidate and one coordinate at a time, in float64."""
    q = [float(v) for v in query]
    xs = [[float(v) for v in row] for row in candidates]
    dim = len(q)

    def dot(a, b):
        return sum(a[i] * b[i] for i in range(dim))

    augmented = []
    for x in xs:
        sims = [dot(x, y) for y in xs]
        nearest = sorted(range(len(xs)), key=lambda j: (-sims[j], j))[: k + 1]
        weights = [1.0] + [beta * sims[j] for j in nearest[1:]]
        total = sum(weights)
        augmented.append([sum(w * xs[j][i] for w, j in zip(weights, nearest, strict=True))
                          / total for i in range(dim)])
    first = [dot(q, a) for a in augmented]
    order = sorted(range(len(xs)), key=lambda j: (-first[j], j))[: k + 1]
    strongest = [max(augmented[j][i] for j in order) for i in range(dim)]
    return [(first[j] + dot(strongest, augmented[j])) / 2 for j in range(len(xs))]


def test_the_paper_values_are_the_defaults():
    assert SuperGlobalSettings() == SuperGlobalSettings(m=400, k=9, beta=0.15)


@pytest.mark.parametrize(("k", "beta"), [(9, 0.15), (2, 0.5), (0, 0.15)])
def test_refined_scores_follow_the_definition(k, beta):
    """Numpy's vectorized form against the loops: both in float64 on unit rows (|values| <= 1,
    sums of at most 2·d products), so they differ by at most a few d·2^-53."""
    rng = np.random.default_rng(5)
    candidates = unit_rows(rng.standard_normal((30, 12)))
    query = unit_rows(rng.standard_normal((1, 12)))[0]
    got = superglobal.refined_scores(query, candidates, SuperGlobalSettings(30, k, beta))
    np.testing.assert_allclose(got, loop_refined(query, candidates, k, beta), rtol=0,
                               atol=8 * 12 * U64)


def test_augment_by_hand():
    """Three 2-d candidates, K = 1: each is averaged with its nearest other, weighted 1 and
    β·cos."""
    x = np.array([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]])
    augmented = superglobal.augment(x, k=1, beta=0.15)
    np.testing.assert_allclose(augmented[0], (x[0] + 0.15 * 0.8 * x[1]) / (1 + 0.12),
                               rtol=0, atol=4 * U64)
    np.testing.assert_allclose(augmented[1], (x[1] + 0.15 * 0.8 * x[0]) / (1 + 0.12),
                               rtol=0, atol=4 * U64)
    np.testing.assert_allclose(augmented[2], (x[2] + 0.15 * 0.6 * x[1]) / (1 + 0.09),
                               rtol=0, atol=4 * U64)


def test_rerank_rows_reorders_the_top_m_and_keeps_the_rest():
    """The M candidates come first by SuperGlobal's score; the others follow in the ranking's
    own order (ties to the lower index) with their own scores."""
    rng = np.random.default_rng(8)
    index = unit_rows(rng.standard_normal((40, 16)))
    queries = unit_rows(index[[3, 17]] + 0.3 * rng.standard_normal((2, 16)))
    scores = (queries @ index.T).astype(np.float32)
    settings = SuperGlobalSettings(m=10, k=3, beta=0.15)
    ids, values = superglobal.rerank_rows(scores, queries, index, 25, settings)
    assert ids.shape == values.shape == (2, 25)
    for row in range(2):
        order = np.lexsort((np.arange(40), -scores[row]))
        candidates = order[:10]
        new = loop_refined(queries[row], index[candidates], 3, 0.15)
        expected = [candidates[j] for j in sorted(range(10), key=lambda j: (-new[j], j))]
        assert ids[row, :10].tolist() == [int(i) for i in expected]
        assert ids[row, 10:].tolist() == order[10:25].tolist()
        np.testing.assert_array_equal(values[row, 10:], scores[row, order[10:25]])
        np.testing.assert_allclose(values[row, :10], np.sort(new)[::-1], rtol=0,
                                   atol=8 * 16 * U64 + 2.0**-24)


def test_boosts_are_added_to_the_candidates_new_scores():
    """With the Landmark-Country rerank: a candidate's score is SuperGlobal's plus its boost,
    so a large boost puts it first."""
    rng = np.random.default_rng(2)
    index = unit_rows(rng.standard_normal((20, 8)))
    queries = unit_rows(rng.standard_normal((1, 8)))
    scores = (queries @ index.T).astype(np.float32)
    boosts = np.zeros_like(scores)
    last_candidate = int(np.lexsort((np.arange(20), -scores[0]))[7])
    boosts[0, last_candidate] = 1.1  # α·w of a tag: more than any cosine gap
    settings = SuperGlobalSettings(m=8, k=2, beta=0.15)
    ids, values = superglobal.rerank_rows(scores + boosts, queries, index, 8, settings,
                                          boosts=boosts)
    plain_ids, plain_values = superglobal.rerank_rows(scores, queries, index, 8, settings)
    assert ids[0, 0] == last_candidate
    assert set(ids[0].tolist()) == set(plain_ids[0].tolist())
    position = plain_ids[0].tolist().index(last_candidate)
    assert values[0, 0] == pytest.approx(plain_values[0, position] + 1.1, abs=2.0**-20)


def test_the_retrieve_stage_writes_both_superglobal_variants(tmp_path):
    """retrieve.superglobal: `<backbone>-superglobal` is SuperGlobal on the plain cosine,
    `<backbone>-rerank_superglobal` on the reranked scores with the tags' boosts added; the
    final submission stays the Landmark-Country rerank."""
    import json

    from benchmarks.authors_retrieval import write_clustered_features
    from glr import rerank, retrieve, tag
    from glr.params import parse_params

    write_clustered_features(tmp_path / "features" / "resnet18", num_queries=6, num_index=90,
                             num_refs=300, dim=16, num_landmarks=30, num_countries=4, seed=4)
    params = parse_params({"model": {"pretrained": False, "backbones": ["resnet18"]},
                           "train": {"recipe": {"resnet18-p1": {
                               "backbone": "resnet18", "phase": "p1", "init": "pretrained"}}},
                           "retrieve": {"k": 20, "k_neighbors": 8, "superglobal": True,
                                        "superglobal_m": 30, "superglobal_k": 4}})
    tag.main(params, "resnet18", tmp_path / "features", tmp_path / "tags")
    rankings = retrieve.main(params, tmp_path / "features", tmp_path / "tags",
                             tmp_path / "retrieval")
    assert set(rankings) == {"resnet18-plain", "resnet18-rerank", "resnet18-superglobal",
                             "resnet18-rerank_superglobal"}
    listing = json.loads((tmp_path / "retrieval/variants.json").read_text())
    assert listing["final"] == "resnet18-rerank"
    features = retrieve.load_features(tmp_path / "features" / "resnet18")
    codes = tag.country_codes(features.ref_countries)
    plain, reranked = retrieve.backbone_scores(features, params, codes)
    settings = SuperGlobalSettings(30, 4, 0.15)
    ids = np.asarray(features.index_ids, dtype=object)
    expected, _ = superglobal.rerank_rows(plain, features.query, features.index, 20, settings)
    assert rankings["resnet18-superglobal"]["images"].tolist() == [list(ids[row])
                                                                   for row in expected]
    boosts = np.zeros_like(plain)  # the tags' α·w + β·v, as the stage adds them
    tags = retrieve.backbone_tags(features, params.retrieve, codes)
    retrieve.add_boosts(boosts, tags, slice(0, len(features.query)), params.retrieve)
    expected, _ = superglobal.rerank_rows(reranked, features.query, features.index, 20,
                                          settings, boosts=boosts)
    got = rankings["resnet18-rerank_superglobal"]["images"].tolist()
    assert got == [list(ids[row]) for row in expected]
    assert rankings["resnet18-rerank"]["images"].tolist() == [
        list(ids[row]) for row in rerank.top_k_ids(reranked, 20)[0]]
