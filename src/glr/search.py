"""Exact top-k inner-product search over a database too large to hold in float32 at once.

The database (e.g. 4.9M reference features, float16 and memory-mapped) is read in blocks of
`block_rows` rows. Each block is converted to float32, searched exhaustively with faiss and its
top-k merged into the running top-k, so peak memory is one float32 block plus O(nq·k) results;
no query × database matrix is ever built.

Order and ties: every result row is sorted by (score descending, database index ascending), and
an exact tie is always resolved towards the lower index, also across block boundaries. faiss's
heaps do not promise that order among equal scores, so each block is searched for k + 1 results:
where the k-th and (k+1)-th scores differ the block's top k is unambiguous and merged by the
key above; the rare rows where they tie (duplicate images) are redone for that block with numpy
and an explicit (score, index) selection (`smallest_k`).
"""

from __future__ import annotations

import faiss
import numpy as np

DEFAULT_BLOCK_ROWS = 262_144
# faiss's GPU k-selection supports k up to 2048; beyond it the CPU path is used.
GPU_MAX_K = 2048
# Temporaries of row-chunked work on a (rows, cols) matrix stay near this many elements.
CHUNK_ELEMENTS = 1 << 22


def gpu_available() -> bool:
    """True when the installed faiss has GPU support and sees at least one GPU."""
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def as_float32_rows(array: np.ndarray) -> np.ndarray:
    """A C-contiguous float32 view or copy of a 2-D array (a copy only when needed)."""
    return np.ascontiguousarray(array, dtype=np.float32)


def rows_per_chunk(num_cols: int) -> int:
    """How many rows of a matrix with `num_cols` columns to process at once."""
    return max(1, CHUNK_ELEMENTS // max(1, num_cols))


def smallest_k(values: np.ndarray, k: int, *, descending: bool = False) -> np.ndarray:
    """Column indices of the k smallest (or largest) values of each row, best first.

    Equal to `np.argsort(values, axis=1, kind="stable")[:, :k]` (on `-values` when descending):
    ties go to the lower column index, NaN ranks last. k is clipped to the number of columns.
    Works in row chunks with a partial sort, so it suits (1,129 × 762k) score matrices.
    """
    num_rows, num_cols = values.shape
    k = min(k, num_cols)
    result = np.empty((num_rows, k), dtype=np.int64)
    if k == 0:
        return result
    chunk_rows = rows_per_chunk(num_cols)
    for start in range(0, num_rows, chunk_rows):
        chunk = np.asarray(values[start : start + chunk_rows])
        if descending:
            chunk = -chunk
        if k == num_cols:
            result[start : start + len(chunk)] = np.argsort(chunk, axis=1, kind="stable")
            continue
        kth = np.partition(chunk, k - 1, axis=1)[:, k - 1 : k]
        if np.isnan(kth).any():
            # Fewer than k non-NaN values in some row: a full sort puts NaN last.
            order = np.argsort(chunk, axis=1, kind="stable")[:, :k]
            result[start : start + len(chunk)] = order
            continue
        below = chunk < kth
        at_kth = chunk == kth
        # Of the values equal to the k-th one, keep the lowest column indices that still fit.
        room = k - below.sum(axis=1, keepdims=True)
        chosen = below | (at_kth & (np.cumsum(at_kth, axis=1, dtype=np.int32) <= room))
        # np.nonzero lists each row's chosen columns in ascending order, exactly k per row.
        candidates = np.nonzero(chosen)[1].reshape(len(chunk), k)
        candidate_values = np.take_along_axis(chunk, candidates, axis=1)
        order = np.argsort(candidate_values, axis=1, kind="stable")
        result[start : start + len(chunk)] = np.take_along_axis(candidates, order, axis=1)
    return result


def merge_top_k(
    scores_a: np.ndarray, ids_a: np.ndarray, scores_b: np.ndarray, ids_b: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Merge two per-row candidate lists into the top k by (score desc, id asc).

    Each input is (nq, m) with any m; the ids of the two lists must be disjoint per row.
    """
    scores = np.concatenate([scores_a, scores_b], axis=1)
    ids = np.concatenate([ids_a, ids_b], axis=1)
    # lexsort sorts by the last key first: score descending, then id ascending.
    order = np.lexsort((ids, -scores), axis=1)[:, :k]
    return np.take_along_axis(scores, order, axis=1), np.take_along_axis(ids, order, axis=1)


class _GpuBlockSearcher:
    """Exact inner-product search of one database block at a time on GPU 0."""

    def __init__(self, dim: int) -> None:
        """Allocate the GPU resources and a flat inner-product index of dimension `dim`."""
        self.resources = faiss.StandardGpuResources()
        self.index = faiss.GpuIndexFlatIP(self.resources, dim)

    def search(self, queries: np.ndarray, block: np.ndarray, k: int) -> tuple[np.ndarray, ...]:
        """Top-k of `queries` in `block` (ids local to the block)."""
        self.index.reset()
        self.index.add(block)
        return self.index.search(queries, k)


def topk_inner_product(
    queries: np.ndarray,
    database: np.ndarray,
    k: int,
    *,
    block_rows: int = DEFAULT_BLOCK_ROWS,
    use_gpu: bool | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k database rows by inner product for every query.

    `queries` (nq, d) and `database` (n, d) may be float16 and/or memory-mapped; the queries are
    converted to float32 once, the database one block of `block_rows` rows at a time. Returns
    `(scores, indices)`: float32 and int64, both (nq, min(k, n)), each row sorted by score
    descending with exact ties resolved to the lower database index (see the module docstring).
    `use_gpu=None` uses a GPU when faiss has GPU support and sees one, else the CPU; True demands
    a GPU. faiss's global thread settings are left as they are.
    """
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    if block_rows < 1:
        raise ValueError(f"block_rows must be at least 1, got {block_rows}")
    if queries.ndim != 2 or database.ndim != 2:
        raise ValueError("queries and database must be 2-D arrays")
    if queries.shape[1] != database.shape[1]:
        raise ValueError(
            f"dimension mismatch: queries {queries.shape[1]}, database {database.shape[1]}"
        )
    if use_gpu and not gpu_available():
        raise RuntimeError("use_gpu=True but faiss has no GPU support or sees no GPU")

    num_queries, num_rows = queries.shape[0], database.shape[0]
    k = min(k, num_rows)
    if num_queries == 0 or k == 0:
        return np.zeros((num_queries, k), np.float32), np.zeros((num_queries, k), np.int64)

    best_scores = np.empty((num_queries, 0), dtype=np.float32)
    best_ids = np.empty((num_queries, 0), dtype=np.int64)
    query_rows = as_float32_rows(queries)
    # k + 1: see _block_top_k.
    on_gpu = (gpu_available() if use_gpu is None else use_gpu) and k + 1 <= GPU_MAX_K
    gpu_searcher = _GpuBlockSearcher(query_rows.shape[1]) if on_gpu else None

    for start in range(0, num_rows, block_rows):
        block = as_float32_rows(database[start : start + block_rows])
        scores, ids = _block_top_k(query_rows, block, k, gpu_searcher)
        best_scores, best_ids = merge_top_k(best_scores, best_ids, scores, ids + start, k)
    return best_scores, best_ids


def _block_top_k(
    query_rows: np.ndarray, block: np.ndarray, k: int, gpu_searcher: _GpuBlockSearcher | None
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k of float32 queries in one float32 block, ids local; exact ties to the lower id.

    Asks faiss for k + 1 results; rows whose k-th and (k+1)-th scores tie are recomputed with
    numpy, since faiss may have kept any of the tied ids.
    """
    block_len = block.shape[0]
    fetch = min(k + 1, block_len)
    if gpu_searcher is not None:
        scores, ids = gpu_searcher.search(query_rows, block, fetch)
    else:
        scores, ids = faiss.knn(query_rows, block, fetch, metric=faiss.METRIC_INNER_PRODUCT)
    if fetch <= k:  # the whole block is kept: the merge orders ties
        return scores, ids

    tied_rows = np.nonzero(scores[:, k - 1] == scores[:, k])[0]
    scores, ids = np.ascontiguousarray(scores[:, :k]), np.ascontiguousarray(ids[:, :k])
    chunk_rows = rows_per_chunk(block_len)
    for chunk_start in range(0, len(tied_rows), chunk_rows):
        rows = tied_rows[chunk_start : chunk_start + chunk_rows]
        exact = query_rows[rows] @ block.T
        top = smallest_k(exact, k, descending=True)
        ids[rows] = top
        scores[rows] = np.take_along_axis(exact, top, axis=1)
    return scores, ids
