"""glr.search: blocked exact top-k inner-product search against numpy brute force."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from glr import search
from glr.search import topk_inner_product

# float32 unit roundoff: every float32 operation is exact up to a relative 2^-24.
U32 = 2.0**-24


def unit_rows(rng: np.random.Generator, rows: int, dim: int = 16) -> np.ndarray:
    """Random L2-normalized float32 rows."""
    data = rng.standard_normal((rows, dim)).astype(np.float32)
    return data / np.linalg.norm(data, axis=1, keepdims=True)


def rounding_bounds(queries: np.ndarray, database: np.ndarray) -> np.ndarray:
    """Per pair, a bound on |float32 q·x − q·x| that holds for every kernel.

    A float32 dot product of length d, summed in any order, with or without FMA, is off by at
    most γ_d Σ|q_i x_i|, γ_d = d·u/(1 − d·u) (Higham, Accuracy and Stability, §3.1): faiss's
    SIMD loop, its BLAS path (sgemm, any block or thread split) and the numpy redo all qualify.
    For unit rows of d = 16 that is ≤ 9.5e-7. Inputs (float32, or float16 widened) are exact in
    float64, whose own rounding (~d·2^-53) is far below it.
    """
    dim = queries.shape[1]
    gamma = dim * U32 / (1 - dim * U32)
    return gamma * (np.abs(queries.astype(np.float64)) @ np.abs(database.astype(np.float64)).T)


def assert_top_k(queries: np.ndarray, database: np.ndarray, scores: np.ndarray,
                 ids: np.ndarray, k: int) -> None:
    """`scores`, `ids` are the exact top k up to float32 rounding, whichever kernel ran.

    1. every score is its pair's inner product within the rounding bound;
    2. every row is sorted by score descending, equal scores by index ascending, no repeats;
    3. no row left out beats a kept one by more than the two pairs' bounds.
    Where the exact scores are further apart than the bounds this is the float64 brute-force
    answer itself; only near-ties (as close as 1.7e-6 in the k = 150 case) may come in either
    order, since which of them wins depends on the kernel's summation order.
    """
    exact = queries.astype(np.float64) @ database.astype(np.float64).T
    bound = rounding_bounds(queries, database)
    assert scores.shape == ids.shape == (len(queries), k)
    rows = np.arange(len(queries))[:, None]
    assert np.all(np.abs(scores - exact[rows, ids]) <= bound[rows, ids])
    steps, id_steps = np.diff(scores, axis=1), np.diff(ids, axis=1)
    assert np.all((steps < 0) | ((steps == 0) & (id_steps > 0)))
    kept = np.zeros(exact.shape, dtype=bool)
    kept[rows, ids] = True
    assert np.all(kept.sum(axis=1) == k)
    # A kept row i and a left-out row j were computed with s_i >= s_j, so
    # exact_i + bound_i >= exact_j - bound_j.
    lowest_kept = np.where(kept, exact + bound, np.inf).min(axis=1)
    best_left_out = np.where(kept, -np.inf, exact - bound).max(axis=1)
    assert np.all(best_left_out <= lowest_kept)


@pytest.mark.parametrize("block_rows", [5000, 1000, 256, 97, 7])
@pytest.mark.parametrize("k", [1, 10, 150])
def test_matches_brute_force(block_rows: int, k: int) -> None:
    rng = np.random.default_rng(0)
    queries, database = unit_rows(rng, 25), unit_rows(rng, 1000)
    scores, ids = topk_inner_product(queries, database, k, block_rows=block_rows)
    assert scores.dtype == np.float32 and ids.dtype == np.int64
    assert_top_k(queries, database, scores, ids, k)


@pytest.mark.parametrize("block_rows", [262_144, 128, 33])
def test_float16_memmap_database(tmp_path: Path, block_rows: int) -> None:
    rng = np.random.default_rng(1)
    queries = unit_rows(rng, 9)
    path = tmp_path / "database.npy"
    np.save(path, unit_rows(rng, 500).astype(np.float16))
    database = np.load(path, mmap_mode="r")
    assert isinstance(database, np.memmap) and database.dtype == np.float16

    scores, ids = topk_inner_product(queries, database, 40, block_rows=block_rows)
    assert_top_k(queries, database, scores, ids, 40)


def test_float16_queries() -> None:
    rng = np.random.default_rng(2)
    queries, database = unit_rows(rng, 4).astype(np.float16), unit_rows(rng, 300)
    scores, ids = topk_inner_product(queries, database, 5, block_rows=64)
    assert_top_k(queries, database, scores, ids, 5)


@pytest.mark.parametrize("block_rows", [1000, 16])
def test_k_larger_than_database(block_rows: int) -> None:
    rng = np.random.default_rng(3)
    queries, database = unit_rows(rng, 3), unit_rows(rng, 50)
    scores, ids = topk_inner_product(queries, database, 80, block_rows=block_rows)
    assert_top_k(queries, database, scores, ids, 50)
    for row in ids:
        assert sorted(row) == list(range(50))


@pytest.mark.parametrize("num_queries", [1, 25])  # faiss's sequential and BLAS paths
@pytest.mark.parametrize("block_rows", [50, 20, 5, 3])
def test_exact_ties_go_to_the_lower_index(num_queries: int, block_rows: int) -> None:
    # Row i is the one-hot vector e_(i mod 8): scores are exactly 1 or 0, with many ties. Every
    # product is 0 or 1 and every partial sum 0 or 1, so any kernel computes them without
    # rounding, and the ids and scores can be compared exactly.
    database = np.eye(8, dtype=np.float32)[np.arange(50) % 8]
    queries = np.repeat(np.eye(8, dtype=np.float32)[[3]], num_queries, axis=0)
    scores, ids = topk_inner_product(queries, database, 10, block_rows=block_rows)
    matches = [3, 11, 19, 27, 35, 43]
    expected_ids = [*matches, 0, 1, 2, 4]
    np.testing.assert_array_equal(ids, np.tile(expected_ids, (num_queries, 1)))
    np.testing.assert_array_equal(scores, np.tile([1.0] * 6 + [0.0] * 4, (num_queries, 1)))


def test_no_queries() -> None:
    scores, ids = topk_inner_product(np.zeros((0, 4), np.float32), np.eye(4, dtype=np.float32), 2)
    assert scores.shape == ids.shape == (0, 2)


def test_invalid_arguments() -> None:
    queries, database = np.eye(4, dtype=np.float32), np.eye(4, dtype=np.float32)
    with pytest.raises(ValueError, match="k must be"):
        topk_inner_product(queries, database, 0)
    with pytest.raises(ValueError, match="block_rows"):
        topk_inner_product(queries, database, 1, block_rows=0)
    with pytest.raises(ValueError, match="dimension mismatch"):
        topk_inner_product(queries, database[:, :3], 1)


@pytest.mark.skipif(search.gpu_available(), reason="a GPU is present")
def test_cuda_without_gpu_raises() -> None:
    with pytest.raises(RuntimeError, match="no CUDA GPU"):
        search.select_backend("cuda")


def test_backend_selection(monkeypatch: pytest.MonkeyPatch) -> None:
    assert search.select_backend("cpu", "float32").uses_faiss
    assert not search.select_backend("cpu", "bfloat16").uses_faiss
    # auto, as each kind of machine answers (glr.runtime's GLR_MACHINE), whatever this one is
    monkeypatch.setenv("GLR_MACHINE", "plain-cpu")
    assert search.select_backend() == search.Backend("cpu", "float32")
    assert search.select_backend("cpu") == search.Backend("cpu", "float32")
    monkeypatch.setenv("GLR_MACHINE", "bf16-cpu")
    # a bf16-native CPU too: bfloat16's margin costs more re-scoring than its product saves
    assert search.select_backend() == search.Backend("cpu", "float32")
    assert search.select_backend("auto", "float32").uses_faiss
    with pytest.raises(RuntimeError, match="no CUDA GPU"):
        search.select_backend("cuda")  # a CPU profile hides any GPU
    with pytest.raises(ValueError, match="float16 products on a CPU"):
        search.select_backend("cpu", "float16")
    with pytest.raises(ValueError, match="precision must be"):
        search.select_backend("cpu", "int8")


def correctly_rounded_top_k(queries: np.ndarray, database: np.ndarray, k: int
                            ) -> tuple[np.ndarray, np.ndarray]:
    """The reference answer: float64 products rounded to float32, sorted by (score desc, id
    asc). Asserts the premise that makes it unique: no float64 product lies within
    d·2^-52·Σ|q_i x_i| (a bound on two float64 sums' disagreement) of a float32 rounding
    midpoint, so every backend's float64 re-scoring rounds to these same float32 values."""
    q64, x64 = queries.astype(np.float64), database.astype(np.float64)
    exact = q64 @ x64.T
    rounded = exact.astype(np.float32)
    toward = np.nextafter(rounded, np.where(exact > rounded, np.inf, -np.inf).astype(np.float32))
    midpoint = (rounded.astype(np.float64) + toward.astype(np.float64)) / 2
    slack = queries.shape[1] * 2.0**-52 * (np.abs(q64) @ np.abs(x64).T)
    assert np.all(np.abs(exact - midpoint) > slack)
    order = np.lexsort((np.broadcast_to(np.arange(len(database)), rounded.shape), -rounded),
                       axis=1)[:, :k]
    return np.take_along_axis(rounded, order, axis=1), order


BACKENDS = [search.Backend("cpu", "float32"), search.Backend("cpu", "bfloat16"),
            search.Backend("cpu", "float16"),  # torch's float16 on a CPU: slow, but exact here
            search.Backend("cpu", "bfloat16", extra=0), search.Backend("cpu", "float32", extra=0)]


@pytest.mark.parametrize("backend", BACKENDS, ids=lambda b: f"{b.precision}-extra{b.extra}")
@pytest.mark.parametrize("k", [1, 30])
def test_every_backend_gives_the_correctly_rounded_top_k(backend: search.Backend, k: int) -> None:
    # Clustered rows (near-duplicates within 0.02) put many candidates inside the bfloat16
    # margin, and extra=0 sends rows down the redo path.
    rng = np.random.default_rng(7)
    centres = unit_rows(rng, 20, dim=64)
    database = centres[rng.integers(0, 20, 900)] + 0.02 * rng.standard_normal((900, 64))
    database = (database / np.linalg.norm(database, axis=1, keepdims=True)).astype(np.float16)
    queries = centres[rng.integers(0, 20, 30)] + 0.05 * rng.standard_normal((30, 64))
    queries = (queries / np.linalg.norm(queries, axis=1, keepdims=True)).astype(np.float32)
    expected_scores, expected_ids = correctly_rounded_top_k(queries, database, k)
    for block_rows in (1000, 128):
        scores, ids = search.topk_inner_product(queries, database, k, block_rows=block_rows,
                                                backend=backend)
        np.testing.assert_array_equal(ids, expected_ids)
        np.testing.assert_array_equal(scores, expected_scores)


def test_one_pass_serves_several_query_sets() -> None:
    rng = np.random.default_rng(8)
    database = unit_rows(rng, 700)
    first, second = unit_rows(rng, 12), unit_rows(rng, 40)
    results = search.multi_topk([(first, 5), (second, 1)], database, block_rows=256)
    for (scores, ids), (queries, k) in zip(results, [(first, 5), (second, 1)], strict=True):
        expected_scores, expected_ids = correctly_rounded_top_k(queries, database, k)
        np.testing.assert_array_equal(ids, expected_ids)
        np.testing.assert_array_equal(scores, expected_scores)


# merge_top_k and smallest_k only compare and move the given values (no arithmetic), so their
# results are exact on any CPU.


def test_merge_top_k_orders_by_score_then_id() -> None:
    scores, ids = search.merge_top_k(
        np.array([[0.9, 0.5]], np.float32), np.array([[7, 2]]),
        np.array([[0.5, 0.9, 0.1]], np.float32), np.array([[1, 4, 0]]), 3,
    )
    np.testing.assert_array_equal(ids, [[4, 7, 1]])
    np.testing.assert_array_equal(scores, np.array([[0.9, 0.9, 0.5]], np.float32))


@pytest.mark.parametrize("descending", [False, True])
@pytest.mark.parametrize("k", [1, 4, 9, 12])
def test_smallest_k_is_a_stable_argsort(monkeypatch: pytest.MonkeyPatch, descending: bool,
                                        k: int) -> None:
    monkeypatch.setattr(search, "CHUNK_ELEMENTS", 20)  # several row chunks
    rng = np.random.default_rng(4)
    values = rng.integers(0, 4, size=(11, 9)).astype(np.float32)  # many exact ties
    values[3, [1, 5]] = np.nan
    values[7, :] = np.nan
    result = search.smallest_k(values, k, descending=descending)
    expected = np.argsort(-values if descending else values, axis=1, kind="stable")[:, :k]
    np.testing.assert_array_equal(result, expected)


def test_smallest_k_hand_case() -> None:
    values = np.array([[0.5, 0.1, 0.5, 0.1, 0.9]])
    np.testing.assert_array_equal(search.smallest_k(values, 3), [[1, 3, 0]])
    np.testing.assert_array_equal(search.smallest_k(values, 2, descending=True), [[4, 0]])


def test_exact_cuda_matmul_pins_cublas_and_restores_it() -> None:
    """While a GPU search runs: no TF32 (through `fp32_precision` where torch has it, never
    mixed with the legacy switch), no reduced-precision reductions, no fp16 accumulation; the
    switches as they were afterwards. Only torch's switches: no GPU is needed."""
    matmul = torch.backends.cuda.matmul
    names = [n for n in search._REDUCED_MATMUL if hasattr(matmul, n)]
    tf32 = "fp32_precision" if hasattr(matmul, "fp32_precision") else "allow_tf32"
    before = {n: getattr(matmul, n) for n in [tf32, *names]}
    with search._exact_cuda_matmul():
        assert getattr(matmul, tf32) == ("ieee" if tf32 == "fp32_precision" else False)
        assert not any(getattr(matmul, n) for n in names)
    assert {n: getattr(matmul, n) for n in [tf32, *names]} == before


def test_exact_cuda_matmul_with_a_torch_before_the_new_flags(monkeypatch) -> None:
    """torch before 2.9: the legacy `allow_tf32` switch, and only the reduced-precision
    switches that torch has; all as they were afterwards."""
    from types import SimpleNamespace

    matmul = SimpleNamespace(allow_tf32=True, allow_fp16_reduced_precision_reduction=True)
    monkeypatch.setattr(torch.backends.cuda, "matmul", matmul)
    with search._exact_cuda_matmul():
        assert vars(matmul) == {"allow_tf32": False,
                                "allow_fp16_reduced_precision_reduction": False}
    assert vars(matmul) == {"allow_tf32": True, "allow_fp16_reduced_precision_reduction": True}


def test_search_stats_count_candidates_and_redone_rows() -> None:
    """Every row's true top k are among its candidates; bfloat16's margin (2^-8) lets more
    through than float32's (2^-24) on clustered rows; extra=0 sends rows down the redo path."""
    rng = np.random.default_rng(7)
    centres = unit_rows(rng, 20, dim=64)
    database = centres[rng.integers(0, 20, 900)] + 0.02 * rng.standard_normal((900, 64))
    database = (database / np.linalg.norm(database, axis=1, keepdims=True)).astype(np.float16)
    queries = unit_rows(rng, 30, dim=64)
    found = {}
    for precision, extra in (("float32", 8), ("bfloat16", 8), ("bfloat16", 0)):
        backend = search.Backend("cpu", precision, extra=extra)
        search.topk_inner_product(queries, database, 10, block_rows=300, backend=backend)
        found[precision, extra] = backend.stats.summary()
        assert backend.stats.rows == 30 * 3  # (query row, block) pairs
        assert backend.stats.candidates >= 10 * backend.stats.rows
        assert backend.stats.candidates_max >= 10
    assert (found["bfloat16", 8]["candidates_per_row"]
            > found["float32", 8]["candidates_per_row"])
    assert found["bfloat16", 0]["rows_redone"] > 0
    assert found["bfloat16", 0]["candidates_per_row"] == found["bfloat16", 8]["candidates_per_row"]
    stats = search.SearchStats(rows=4, candidates=50, candidates_max=20, redone=1)
    assert stats.describe() == "12.5 candidates per row (max 20), 1 of 4 rows redone"
    stats.reset()
    assert stats == search.SearchStats()
