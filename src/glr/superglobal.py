"""SuperGlobal's training-free rerank on global features (Shao et al., ICCV 2023, "Global
Features are All You Need for Image Retrieval and Reranking"): MDescAug, then RerankwMDA.

For one query q and its top-M index images (features x_1 … x_M, in the ranking's order):

1. MDescAug (top-M descriptor augmentation): among the M, each x_i's K + 1 nearest by cosine
   (itself first) with weights 1 for the first and β·cos for the others; x̃_i = their weighted
   mean (not renormalized). The candidates are reordered by q·x̃_i.
2. RerankwMDA (reranking with maximum descriptor aggregation): x̂ = the elementwise maximum
   of the K + 1 first x̃ in that order; each candidate scores (q·x̃_i + x̂·x̃_i) / 2.

The M candidates come first, by that score; the rest keep their order behind them. The
paper's values: M = 400, K = 9, β = 0.15 (`retrieve.superglobal_m`, `_k`, `_beta`). As in the
authors' code (`modules/reranking/MDescAug.py`, `RerankwMDA.py` of ShihaoShao-GH/SuperGlobal)
the weights' first entry is set to 1 whatever the similarity, and ties go to the earlier
candidate.

With the Landmark-Country rerank (`rerank_superglobal`): the candidates are the top M of the
reranked scores, and each candidate's new score is its SuperGlobal score plus its tag boosts
(α·w + β·v), so that the two compose: the tags pull a landmark's images into the candidates,
SuperGlobal refines their similarity.

Arithmetic: float64 throughout from the float16 features; a query's cost is an M × M and two
M-vector products (M·(M + 2)·d multiply-adds: 0.08 GFLOP at M = 400, d = 512, about 90 GFLOP
for GLDv2's 1,129 queries), and its memory M × (M + K + 1) × d values (the gathered neighbour
descriptors), a query at a time. The index neighbours SuperGlobal needs are the query's top M,
which the retrieve stage's exact scores give; nothing else is searched.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from glr.rerank import top_k_ids


@dataclass(frozen=True)
class SuperGlobalSettings:
    """M candidates per query, K neighbours (besides itself) per candidate, weight β."""

    m: int = 400
    k: int = 9
    beta: float = 0.15


def augment(candidates: np.ndarray, k: int, beta: float) -> np.ndarray:
    """MDescAug: each candidate's weighted mean with its k nearest among the candidates
    (float64, (M, d))."""
    similarity = candidates @ candidates.T
    width = min(k + 1, len(candidates))
    # stable: of equal similarities the earlier candidate comes first
    nearest = np.argsort(-similarity, axis=1, kind="stable")[:, :width]
    weights = np.take_along_axis(similarity, nearest, axis=1)
    weights[:, 1:] *= beta
    weights[:, 0] = 1.0
    summed = np.einsum("mk,mkd->md", weights, candidates[nearest])
    return summed / weights.sum(axis=1, keepdims=True)


def refined_scores(query: np.ndarray, candidates: np.ndarray, settings: SuperGlobalSettings
                   ) -> np.ndarray:
    """SuperGlobal's score (q·x̃ + x̂·x̃) / 2 of each candidate, in the candidates' order."""
    candidates = np.asarray(candidates, dtype=np.float64)
    query = np.asarray(query, dtype=np.float64)
    augmented = augment(candidates, settings.k, settings.beta)
    first = augmented @ query
    order = np.argsort(-first, kind="stable")
    strongest = augmented[order[: min(settings.k + 1, len(order))]].max(axis=0)
    return (first + augmented @ strongest) / 2


def rerank_rows(scores: np.ndarray, queries: np.ndarray, index: np.ndarray, k: int,
                settings: SuperGlobalSettings, boosts: np.ndarray | None = None
                ) -> tuple[np.ndarray, np.ndarray]:
    """Top-k index ids and scores of each query after SuperGlobal. `scores` (nQ, nX): the
    ranking whose top M are the candidates (ties to the lower index); `boosts` (nQ, nX), when
    given, are added to the candidates' new scores (the Landmark-Country rerank's tags).
    Beyond the M candidates the ranking keeps `scores`' order and values."""
    num_index = scores.shape[1]
    m = min(settings.m, num_index)
    width = min(k, num_index)
    # the top max(M, k) of every row at once (a partial selection, not a sort of the row):
    # descending by score, ties to the lower index, the stage's own order
    order, ordered = top_k_ids(scores, max(m, width))
    top_ids = np.empty((len(scores), width), dtype=np.int64)
    top_scores = np.empty(top_ids.shape, dtype=np.float32)
    for row in range(len(scores)):  # an M × M product per query, M × d memory
        candidates = order[row, :m]
        new = refined_scores(queries[row], index[candidates], settings)
        if boosts is not None:
            new = new + boosts[row, candidates]
        by_new = np.argsort(-new, kind="stable")
        ids = np.concatenate([candidates[by_new], order[row, m:]])
        values = np.concatenate([new[by_new], ordered[row, m:]])
        top_ids[row] = ids[:width]
        top_scores[row] = values[:width]
    return top_ids, top_scores
