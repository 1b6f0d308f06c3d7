"""Exact top-k inner-product search over a database too large to hold in float32 at once.

The database (e.g. 4.9M reference features, float16 and memory-mapped) is read in blocks of
`block_rows` rows, and each block is read and converted once for every query set searched
against it (`multi_topk`: the index images' top 1 and the queries' top 30 share one pass).
No query × database matrix is ever built: peak memory is one block plus O(rows · k) results.

Exact fast products. Each block is scored by a fast kernel, the `Backend`: faiss's float32
sgemm on a CPU, bfloat16 on a CPU that computes it natively (AMX, AVX-512 BF16), float16 on a
GPU. The fast scores only choose candidates; the candidates are then re-scored in float64 and
rounded to float32. A row's candidates are all database rows whose fast score is within a
margin of its k-th fast score, where the margin is a bound on the fast kernel's error derived
from its arithmetic (`error_bound`), so the true top k is always among them. A row whose
candidates do not fit in the k + `extra` the kernel returned is redone with all its fast
scores. Scores are therefore the exact inner products correctly rounded to float32 (the
float64 sum of d exact products is within d·2^-53 relative of the exact value; it rounds
differently only when it lies that close to a float32 rounding boundary), and every backend,
CPU, BLAS and thread count gives the same ids and scores.

Order and ties: every result row is sorted by (score descending, database index ascending), and
an exact tie is always resolved towards the lower index, also across block boundaries.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import numpy as np
import torch

from glr.runtime import cuda_available

log = logging.getLogger(__name__)

DEFAULT_BLOCK_ROWS = 262_144
# Temporaries of row-chunked work on a (rows, cols) matrix stay near this many elements.
CHUNK_ELEMENTS = 1 << 22
# Fast scores of one (rows × block) chunk on a device: elements at once (fp32: 256 MB on a CPU,
# 1 GB on a GPU).
SCORE_ELEMENTS = {"cpu": 1 << 26, "cuda": 1 << 28}
# Candidates re-scored at once (float64 rows of d values each): about 256 MB at d = 512.
RESCORE_ELEMENTS = 1 << 25
PRECISIONS = ("float32", "bfloat16", "float16")
U32 = 2.0**-24  # float32 unit roundoff (round to nearest)
UNIT_ROUNDOFF = {"float32": 2.0**-24, "bfloat16": 2.0**-8, "float16": 2.0**-11}
# Accumulation: sums in float32 that may truncate instead of round (tensor cores), or split
# and reorder: one float32 ulp per addition, u = 2^-23, any order.
ACCUMULATION_U = 2.0**-23
# float16 gradual underflow: a value below 2^-14 is rounded with an absolute error ≤ 2^-25.
FLOAT16_ABS = 2.0**-25


def gpu_available() -> bool:
    """True when torch sees a CUDA GPU (and `GLR_MACHINE` does not hide it)."""
    return cuda_available()


@dataclass
class SearchStats:
    """What the exact re-scoring cost, counted over (query row, block) pairs: the candidates
    (fast scores within the margin of the row's k-th) and the rows redone from their full
    fast-score rows (more candidates than the k + extra the kernel returned). The counts
    depend on the precision's margin and the data, not on the kernel's speed."""

    rows: int = 0
    candidates: int = 0
    candidates_max: int = 0
    redone: int = 0

    def add(self, counts: np.ndarray, redone: int) -> None:
        self.rows += len(counts)
        self.candidates += int(counts.sum())
        self.candidates_max = max(self.candidates_max, int(counts.max(initial=0)))
        self.redone += redone

    def __add__(self, other: SearchStats) -> SearchStats:
        """The counts of both searches together."""
        return SearchStats(self.rows + other.rows, self.candidates + other.candidates,
                           max(self.candidates_max, other.candidates_max),
                           self.redone + other.redone)

    def reset(self) -> None:
        """Count afresh (the retrieve stage does so per backbone)."""
        self.rows = self.candidates = self.candidates_max = self.redone = 0

    def summary(self) -> dict:
        return {"rows": self.rows,
                "candidates_per_row": round(self.candidates / max(1, self.rows), 2),
                "candidates_max": self.candidates_max, "rows_redone": self.redone,
                "rows_redone_share": round(self.redone / max(1, self.rows), 4)}

    def describe(self) -> str:
        summary = self.summary()
        return (f"{summary['candidates_per_row']:.1f} candidates per row (max "
                f"{summary['candidates_max']}), {self.redone} of {self.rows} rows redone")


@dataclass(frozen=True)
class Backend:
    """Where and in which precision the fast products run.

    `extra`: candidates kept beyond k per row before the margin test (more: fewer rows redone
    with all their scores, a slightly larger top-k selection). `stats` counts what the searches
    on this backend cost (`SearchStats`).
    """

    device: str = "cpu"
    precision: str = "float32"
    extra: int = 8
    stats: SearchStats = field(default_factory=SearchStats, compare=False, repr=False)

    @property
    def name(self) -> str:
        kernel = "faiss" if self.uses_faiss else "torch"
        return f"{self.device}-{self.precision} ({kernel})"

    @property
    def uses_faiss(self) -> bool:
        return self.device == "cpu" and self.precision == "float32"


def select_backend(device: str = "auto", precision: str = "auto") -> Backend:
    """The backend for this machine: `device` auto|cpu|cuda, `precision` auto|float32|bfloat16|
    float16. auto: float16 on a GPU, float32 on any CPU. bfloat16, which a CPU with AVX-512
    BF16 or AMX multiplies 1.9–4× as fast as float32, only when asked for: its wider margin
    (inputs and output rounded at 2^-8) lets so many candidates through on clustered features
    that the exact re-scoring costs more than the product saves (docs/benchmarks.md,
    from `glr bench retrieve --precision`). float16 on a CPU is refused (CPUs emulate it:
    about 11 GFLOP/s on a 2-core AVX2 CPU)."""
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, got {device!r}")
    if precision not in ("auto", *PRECISIONS):
        raise ValueError(f"precision must be auto or one of {', '.join(PRECISIONS)}, "
                         f"got {precision!r}")
    if device == "auto":
        device = "cuda" if gpu_available() else "cpu"
    if device == "cuda" and not gpu_available():
        raise RuntimeError("retrieval on cuda was asked for, but torch sees no CUDA GPU")
    if precision == "auto":
        precision = "float16" if device == "cuda" else "float32"
    if device == "cpu" and precision == "float16":
        raise ValueError("float16 products on a CPU are emulated and very slow; use float32, "
                         "or bfloat16 on a CPU with AMX / AVX-512 BF16")
    return Backend(device, precision)


def error_bound(backend: Backend, dim: int, query_dtype: np.dtype, database_dtype: np.dtype,
                output_dtype: torch.dtype = torch.float32) -> tuple[float, float]:
    """(relative c, absolute a): |fast(q·x) − q·x| ≤ c·‖q‖‖x‖ + a·(‖q‖ + ‖x‖) for every pair.

    Inputs are rounded to the fast dtype (relative u_in each, 0 where already representable:
    float16 data in float16, anything in float32), multiplied, summed in float32 in any order
    (γ_d = d·u_acc/(1 − d·u_acc) of Σ|q̂_i x̂_i|, Higham §3.1), and the sum is rounded to the
    output dtype (bfloat16 on a CPU: u_out = 2^-8; float32 elsewhere: 2^-24). By Cauchy–Schwarz
    Σ|q_i x_i| ≤ ‖q‖‖x‖, so c = (1 + u_q)(1 + u_x)(1 + γ_d)(1 + u_out) − 1. float16 inputs
    rounded below 2^-14 carry an absolute error ≤ 2^-25 each instead: a = 2^-25·√d.
    """
    precision = backend.precision
    u_fast = UNIT_ROUNDOFF[precision]

    def input_u(dtype: np.dtype) -> float:
        exact = (precision == "float32" and dtype in (np.float16, np.float32)) or (
            precision == "float16" and dtype == np.float16)
        return 0.0 if exact else u_fast

    u_q, u_x = input_u(np.dtype(query_dtype)), input_u(np.dtype(database_dtype))
    u_acc = U32 if backend.uses_faiss else ACCUMULATION_U  # faiss: CPU sgemm rounds to nearest
    gamma = dim * u_acc / (1 - dim * u_acc)
    u_out = {torch.bfloat16: UNIT_ROUNDOFF["bfloat16"], torch.float16: UNIT_ROUNDOFF["float16"]
             }.get(output_dtype, U32)
    relative = (1 + u_q) * (1 + u_x) * (1 + gamma) * (1 + u_out) - 1
    absolute = FLOAT16_ABS * math.sqrt(dim) if precision == "float16" and (u_q or u_x) else 0.0
    return relative, absolute


def as_float32_rows(array: np.ndarray) -> np.ndarray:
    """A C-contiguous float32 view or copy of a 2-D array (a copy only when needed)."""
    return np.ascontiguousarray(array, dtype=np.float32)


def rows_per_chunk(num_cols: int, elements: int = CHUNK_ELEMENTS) -> int:
    """How many rows of a matrix with `num_cols` columns to process at once."""
    return max(1, elements // max(1, num_cols))


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


# cuBLAS switches that would change the sums the error bound assumes: TF32 inputs, reduced-
# precision reductions of fp16 / bf16 products, fp16 accumulation (each where torch has it).
_REDUCED_MATMUL = ("allow_fp16_reduced_precision_reduction",
                   "allow_bf16_reduced_precision_reduction", "allow_fp16_accumulation")


@contextmanager
def _exact_cuda_matmul():
    """No TF32, no reduced-precision reductions and no fp16 accumulation in cuBLAS while
    searching: the error bound assumes float32 accumulation. TF32 through torch's
    `fp32_precision` flag where torch has it (it refuses a mix of it and the legacy
    `allow_tf32` in one process, see glr.runtime.exact_cuda_float32)."""
    matmul = torch.backends.cuda.matmul
    switches = [name for name in _REDUCED_MATMUL if hasattr(matmul, name)]
    tf32 = "fp32_precision" if hasattr(matmul, "fp32_precision") else "allow_tf32"
    saved = {name: getattr(matmul, name) for name in [tf32, *switches]}
    setattr(matmul, tf32, "ieee" if tf32 == "fp32_precision" else False)
    for name in switches:
        setattr(matmul, name, False)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(matmul, name, value)


class _QuerySet:
    """One set of query rows prepared for a backend: float32 rows, fast rows, float64 norms."""

    def __init__(self, rows: np.ndarray, k: int, backend: Backend) -> None:
        self.k = k
        self.rows32 = as_float32_rows(rows)
        self.norms = _row_norms(self.rows32)
        self.device = torch.device(backend.device)
        self.on_device = torch.from_numpy(self.rows32).to(self.device)
        fast = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(backend.precision)
        self.fast = None if backend.uses_faiss else (
            self.on_device if fast is None else self.on_device.to(fast))
        # Rows that float16 holds exactly (features stored as float16) are not rounded again.
        self.dtype = (np.dtype(np.float16) if backend.precision == "float16"
                      and torch.equal(self.on_device.half().float(), self.on_device)
                      else np.dtype(np.float32))

    def __len__(self) -> int:
        return len(self.rows32)


class _Block:
    """One database block, read and converted once: the stored rows on the device (for the
    float64 re-scoring), the fast copy and a bound on its largest row norm."""

    def __init__(self, raw: np.ndarray, backend: Backend) -> None:
        if not raw.flags.writeable and not backend.uses_faiss:
            raw = raw.copy()  # a read-only memory map: torch wants writable memory
        self.raw = raw
        self.dtype = raw.dtype
        with warnings.catch_warnings():  # faiss's read-only memory map: torch only reads it
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            self.stored = torch.from_numpy(raw).to(backend.device)
        if backend.uses_faiss:
            self.fast32 = as_float32_rows(raw)
            self.fast = None
        else:
            fast = {"bfloat16": torch.bfloat16, "float16": torch.float16,
                    "float32": torch.float32}[backend.precision]
            self.fast = self.stored.to(fast)
            self.fast32 = None
        # The largest row norm, from float32 sums of squares (relative error ≤ (d + 2)·2^-24
        # after the square root), rounded up by that much.
        if len(raw) == 0:
            self.max_norm = 0.0
        elif self.fast32 is not None:
            self.max_norm = float(np.sqrt(np.einsum("ij,ij->i", self.fast32, self.fast32).max()))
        else:
            self.max_norm = float(torch.linalg.vector_norm(self.stored.float(), dim=1).max())
        self.max_norm *= 1 + (raw.shape[1] + 2) * 2.0**-23

    def __len__(self) -> int:
        return len(self.raw)


def _row_norms(rows: np.ndarray) -> np.ndarray:
    """Float64 L2 norms of each row, computed a chunk at a time."""
    norms = np.empty(len(rows), dtype=np.float64)
    chunk = rows_per_chunk(rows.shape[1] if rows.ndim == 2 else 1)
    for start in range(0, len(rows), chunk):
        part = np.asarray(rows[start : start + chunk], dtype=np.float64)
        norms[start : start + chunk] = np.sqrt(np.einsum("ij,ij->i", part, part))
    return norms


def _fast_scores(queries: _QuerySet, rows: slice, block: _Block) -> torch.Tensor:
    """Fast scores of some query rows against the whole block, (rows, B), torch backends."""
    left, right = queries.fast[rows], block.fast.T
    if left.is_cuda and left.dtype != torch.float32:
        try:
            return torch.mm(left, right, out_dtype=torch.float32)
        except torch.cuda.OutOfMemoryError:
            raise  # not a missing feature: the bound must not switch to the output's dtype
        except (TypeError, RuntimeError):  # an older torch: the bound then uses the output dtype
            return torch.mm(left, right)
    return torch.mm(left, right)


def _rescore_top_k(queries: _QuerySet, rows: torch.Tensor, block: _Block,
                   candidates: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The top k of each row's candidates by float64 score rounded to float32, ties to the
    lower id: (scores float32 (m, k), ids int64 (m, k)), on the block's device."""
    num, width = candidates.shape
    dim = block.stored.shape[1]
    scores = torch.empty((num, k), dtype=torch.float32, device=candidates.device)
    ids = torch.empty((num, k), dtype=torch.int64, device=candidates.device)
    chunk = rows_per_chunk(width * dim, RESCORE_ELEMENTS)
    for start in range(0, num, chunk):
        part = slice(start, start + chunk)
        cand, _ = candidates[part].sort(dim=1)  # ascending ids: a stable sort keeps them so
        vectors = block.stored[cand].double()
        query = queries.on_device[rows[part]].double()
        exact = torch.einsum("rd,rcd->rc", query, vectors).float()
        order = torch.sort(exact, dim=1, descending=True, stable=True).indices[:, :k]
        scores[part] = exact.gather(1, order)
        ids[part] = cand.gather(1, order)
    return scores, ids


def _block_top_k(queries: _QuerySet, block: _Block, k: int, backend: Backend
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Exact top k of every query row in one block (ids local to the block), as numpy."""
    num_cols = len(block)
    keep = min(k + backend.extra, num_cols)
    out_scores = np.empty((len(queries), k), dtype=np.float32)
    out_ids = np.empty((len(queries), k), dtype=np.int64)
    device = block.stored.device
    dim = block.stored.shape[1]
    chunk = (65_536 if backend.uses_faiss
             else rows_per_chunk(num_cols, SCORE_ELEMENTS[backend.device]))
    for start in range(0, len(queries), chunk):
        rows = slice(start, min(len(queries), start + chunk))
        if backend.uses_faiss:
            full = None
            import faiss  # here: a GPU machine needs no faiss

            values, cand = faiss.knn(queries.rows32[rows], block.fast32, keep,
                                     metric=faiss.METRIC_INNER_PRODUCT)
            values, cand = torch.from_numpy(values), torch.from_numpy(cand)
            output_dtype = torch.float32
        else:
            full = _fast_scores(queries, rows, block)
            output_dtype = full.dtype
            if k == 1:  # a max is one pass over the scores; topk is several on a GPU
                values, cand = full.max(dim=1, keepdim=True)
            else:
                values, cand = full.topk(keep, dim=1)
            values = values.float()
        relative, absolute = error_bound(backend, dim, queries.dtype, block.dtype, output_dtype)
        norms = torch.from_numpy(queries.norms[rows]).to(device)
        product = norms * block.max_norm
        # Candidates: fast score ≥ k-th fast score − 2·bound; plus 2^-22·‖q‖‖x‖ for the final
        # float32 rounding of the re-scored values (see the module docstring).
        margin = 2 * (relative * product + absolute * (norms + block.max_norm)) + 2.0**-22 * product
        threshold = (values[:, k - 1].double() - margin).float()
        # float32 threshold rounded down so that no candidate is lost to its rounding
        threshold = torch.nextafter(threshold, torch.full_like(threshold, -math.inf))
        # candidates of each row: its fast scores at or above the threshold (an overflowing
        # row's count comes from its full row in _redo_overflow)
        if full is not None and k == 1:  # the max path: a second candidate?
            counts = (full.float() >= threshold[:, None]).sum(dim=1)
            overflow = counts > 1
        else:
            counts = (values >= threshold[:, None]).sum(dim=1)
            overflow = (values[:, keep - 1] >= threshold if keep < num_cols
                        else torch.zeros(len(values), dtype=torch.bool, device=values.device))
        row_ids = torch.arange(rows.start, rows.stop, device=device)
        fits = ~overflow
        scores, ids = _rescore_top_k(queries, row_ids[fits.to(device)], block,
                                     cand[fits].to(device), k)
        local_fits = torch.nonzero(fits).ravel().cpu().numpy()
        out_scores[rows.start + local_fits] = scores.cpu().numpy()
        out_ids[rows.start + local_fits] = ids.cpu().numpy()
        over_rows = torch.nonzero(overflow).ravel()
        counts = counts.cpu().numpy()
        if len(over_rows):
            over_scores, over_ids, over_counts = _redo_overflow(
                queries, rows.start, over_rows, block, full, threshold[over_rows], k)
            local = over_rows.cpu().numpy()
            out_scores[rows.start + local] = over_scores
            out_ids[rows.start + local] = over_ids
            counts[local] = over_counts
        backend.stats.add(counts, len(over_rows))
    return out_scores, out_ids


def _redo_overflow(queries: _QuerySet, first_row: int, over_rows: torch.Tensor, block: _Block,
                   full: torch.Tensor | None, thresholds: torch.Tensor, k: int
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows with more candidates than the kernel returned: all their columns above the
    threshold, from their full fast-score rows; (scores, ids, candidates per row)."""
    device = block.stored.device
    if full is None:  # faiss: the rows' float32 scores again, with numpy's sgemm
        rows = first_row + over_rows.numpy()
        full = torch.from_numpy(queries.rows32[rows] @ block.fast32.T)
    else:
        full = full[over_rows.to(full.device)]
    thresholds = thresholds.to(full.device)
    counts = (full.float() >= thresholds[:, None]).sum(dim=1)
    width = max(int(counts.max()), k)
    _, cand = full.topk(width, dim=1)
    row_ids = (first_row + over_rows).to(device)
    log.debug("%d rows re-scored with %d candidates each", len(row_ids), width)
    scores, ids = _rescore_top_k(queries, row_ids, block, cand.to(device), k)
    return scores.cpu().numpy(), ids.cpu().numpy(), counts.cpu().numpy()


def _check_inputs(query_sets: Sequence[tuple[np.ndarray, int]], database: np.ndarray,
                  block_rows: int) -> None:
    if block_rows < 1:
        raise ValueError(f"block_rows must be at least 1, got {block_rows}")
    if database.ndim != 2:
        raise ValueError("queries and database must be 2-D arrays")
    for queries, k in query_sets:
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        if queries.ndim != 2:
            raise ValueError("queries and database must be 2-D arrays")
        if queries.shape[1] != database.shape[1]:
            raise ValueError(f"dimension mismatch: queries {queries.shape[1]}, "
                             f"database {database.shape[1]}")


def multi_topk(
    query_sets: Sequence[tuple[np.ndarray, int]],
    database: np.ndarray,
    *,
    block_rows: int = DEFAULT_BLOCK_ROWS,
    backend: Backend | None = None,
    progress: bool = False,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Exact top-k database rows by inner product for several query sets in one pass.

    `query_sets` holds (queries (nq, d), k) pairs; the database (n, d) may be float16 and/or
    memory-mapped and is read one block of `block_rows` rows at a time, converted once per
    block for all sets. Returns per set `(scores, indices)`: float32 and int64, both
    (nq, min(k, n)), each row sorted by score descending with exact ties resolved to the
    lower database index; scores are the exact inner products rounded to float32 (see the
    module docstring), whatever the backend (default: `select_backend()`).
    """
    _check_inputs(query_sets, database, block_rows)
    backend = backend or select_backend()
    num_rows = database.shape[0]
    sets = [_QuerySet(queries, min(k, num_rows), backend) for queries, k in query_sets]
    results = [(np.zeros((len(s), s.k), np.float32), np.zeros((len(s), s.k), np.int64))
               for s in sets]
    active = [i for i, s in enumerate(sets) if len(s) and s.k]
    if not active:
        return results
    best = {i: (np.empty((len(sets[i]), 0), np.float32), np.empty((len(sets[i]), 0), np.int64))
            for i in active}
    starts = range(0, num_rows, block_rows)
    if progress:
        from glr.progress import progress_bar

        starts = progress_bar(starts, total=len(starts), unit="block",
                              desc=f"search {num_rows:,} rows ({backend.name})")
    with _exact_cuda_matmul() if backend.device == "cuda" else nullcontext():
        for start in starts:
            block = _Block(np.ascontiguousarray(database[start : start + block_rows]), backend)
            for i in active:
                k = sets[i].k
                scores, ids = _block_top_k(sets[i], block, min(k, len(block)), backend)
                best[i] = merge_top_k(*best[i], scores, ids + start, k)
    for i in active:
        results[i] = best[i]
    return results


def topk_inner_product(
    queries: np.ndarray,
    database: np.ndarray,
    k: int,
    *,
    block_rows: int = DEFAULT_BLOCK_ROWS,
    backend: Backend | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k database rows by inner product for every query: `multi_topk` of one set."""
    return multi_topk([(queries, k)], database, block_rows=block_rows, backend=backend)[0]
