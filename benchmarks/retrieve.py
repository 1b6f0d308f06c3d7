"""`glr bench retrieve`: the retrieve stage against the authors' per-query procedure.

On generated clustered features (`authors_retrieval.write_clustered_features`, float16, the
`glr extract` layout) of one backbone, at each reference count asked for:

- ours: the tag stage (`glr.tag.main`: the index images' top 1, one pass over the
  memory-mapped references) then `glr.retrieve.main` (the queries' two passes, exact
  re-scoring, the rerank, rankings written to disk), both in one child process, so that its peak RSS
  is its own. The mapped reference pages it touched count in that RSS.
- the authors': `authors_retrieval.authors_retrieval` (per index image a top-1 search by a
  batched torch.mm, per query a 1 × N and a 30 × N product, the dense local k-reciprocal
  re-ranking, top-3 vote), also in a child process. Its per-query part runs on a sample of
  queries and is scaled to all of them (time per query × queries); index tagging and the
  reference loading run in full. The sample's top-100 rows are compared with ours.
- the floor: the products ours needs (pass 1: (queries + index) × references, pass 2: the
  distinct first-level neighbours × references, plain: queries × index; 2·d FLOP each)
  at this machine's best measured GEMM rate: float32 (torch and numpy's BLAS), and bfloat16
  when the CPU computes it natively (AMX / AVX-512 BF16; elsewhere bf16 is emulated and
  retrieval never uses it).

A memory check runs both stages with four backbones at a scaled GLDv2 shape (all
1,129 queries, a quarter of the index, few references) and compares its peak RSS with the
stage's memory model (`memory_model`), which then gives the figure for the full shape.

Writes metrics/bench/retrieve.json.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import resource
import tempfile
import time
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

BACKBONE = "resnet18"  # any valid backbone name: the folder the features lie in
GLDV2 = {"queries": 1_129, "index": 761_757, "references": 4_900_000, "backbones": 4}
PRECISIONS = ("float32", "bfloat16", "float16")
TARGETS = {"speedup": 3.0, "identical_rows": 0.99, "floor_ratio": 1.5, "rss_over_refs_gb": 2.0}


def machine() -> dict:
    """CPU model, the vector extensions that matter here, threads, library versions."""
    import faiss
    import torch

    from benchmarks.extract import cpu_summary

    cpu = cpu_summary()
    return {"cpu": cpu["model"], "avx2": "avx2" in cpu["flags"],
            "avx512f": "avx512f" in cpu["flags"], "amx_bf16": "amx_bf16" in cpu["flags"],
            "native_bf16": cpu["native_bf16"], "torch_threads": torch.get_num_threads(),
            "faiss_threads": faiss.omp_get_max_threads(), "torch": torch.__version__,
            "faiss": faiss.__version__, "numpy": np.__version__}


def gemm_rates(dim: int = 512, rows: int = 2048, cols: int = 32_768, repeats: int = 3) -> dict:
    """Best GFLOP/s of a (rows × dim) · (dim × cols) product: torch float32, numpy float32
    (its BLAS, like faiss's), torch bfloat16 (only meaningful with native bf16)."""
    import torch

    from glr.runtime import cpu_has_fast_bf16

    rng = np.random.default_rng(0)
    left = rng.standard_normal((rows, dim), dtype=np.float32)
    right = rng.standard_normal((cols, dim), dtype=np.float32)
    flops = 2.0 * rows * cols * dim

    def best(run) -> float:
        run()  # warm-up
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            run()
            times.append(time.perf_counter() - start)
        return flops / min(times) / 1e9

    left_t, right_t = torch.from_numpy(left), torch.from_numpy(right)
    rates = {"torch_float32": best(lambda: torch.mm(left_t, right_t.T)),
             "numpy_float32": best(lambda: left @ right.T)}
    if cpu_has_fast_bf16():
        left_b, right_b = left_t.bfloat16(), right_t.bfloat16()
        rates["torch_bfloat16"] = best(lambda: torch.mm(left_b, right_b.T))
    return {name: round(rate, 1) for name, rate in rates.items()}


def memory_model(queries: int, index: int, dim: int, block_rows: int, backbones: int,
                 full_kr: bool = False) -> dict:
    """Bytes `glr.retrieve.main` holds beyond the interpreter and the page cache, by part
    (see the retrieve module docstring)."""
    from glr.retrieve import SCORE_CHUNK_ELEMENTS
    from glr.search import RESCORE_ELEMENTS

    parts = {
        "ensemble_scores": 4 * queries * index,  # one dense float32 matrix for all backbones
        "index_features": 6 * index * dim,  # float16 as loaded + float32, of one backbone
        "reference_block": 4 * block_rows * dim,  # one block converted to float32
        "rescoring": 10 * RESCORE_ELEMENTS,  # candidate rows gathered (float16) and in float64
        "score_chunks": 3 * 4 * SCORE_CHUNK_ELEMENTS,  # plain, reranked, and a temporary
    }
    if full_kr:
        parts["full_kr"] = 2 * 4 * queries * index
    parts["total"] = sum(parts.values())
    parts["backbones"] = backbones  # the total does not grow with them
    return parts


def _peak_rss_bytes() -> int:
    """This process's peak resident set. VmHWM belongs to the address space, so a spawned
    child starts from zero (ru_maxrss would carry over the parent's peak across fork + exec)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: kilobytes


def _run_ours(features_dir: str, out_dir: str, backbones: list[str], block_rows: int,
              precision: str, result: dict) -> None:
    """Child process: the tag and retrieve stages; their time, peak RSS, search counts and
    the rerank's top-100."""
    import pyarrow.parquet as pq

    from glr import retrieve, search, tag
    from glr.params import parse_params

    recipe = {f"{name}-p1": {"backbone": name, "phase": "p1", "init": "pretrained"}
              for name in backbones}
    params = parse_params({"model": {"pretrained": False, "backbones": backbones},
                           "train": {"recipe": recipe},
                           "retrieve": {"block_rows": block_rows, "precision": precision}})
    baseline = _peak_rss_bytes()
    stats: dict = {}
    tagging = search.select_backend(precision=precision)
    start = time.perf_counter()
    for name in backbones:
        tag.main(params, name, Path(features_dir), Path(out_dir) / "tags", backend=tagging)
    tagged = time.perf_counter()
    rankings = retrieve.main(params, Path(features_dir), Path(out_dir) / "tags",
                             Path(out_dir) / "retrieval", stats=stats)
    seconds = time.perf_counter() - start
    result["seconds"] = seconds
    result["tag_seconds"] = tagged - start
    result["peak_rss_bytes"] = _peak_rss_bytes()
    result["baseline_rss_bytes"] = baseline
    result["backend"] = search.select_backend(precision=precision).name
    # the index searches of every backbone's tagging and the first backbone's query searches
    result["search"] = (tagging.stats + stats[backbones[0]]).summary()
    first = Path(features_dir) / backbones[0]
    index_ids = pq.read_table(first / "index.parquet").column("id").to_pylist()
    position = {name: row for row, name in enumerate(index_ids)}
    table = rankings[f"{backbones[0]}-rerank"]
    result["top_ids"] = [[position[name] for name in row] for row in table["images"]]


def _run_authors(features_dir: str, sample: list[int], result: dict) -> None:
    """Child process: the authors' procedure on a sample of queries."""
    from benchmarks.authors_retrieval import authors_retrieval
    from glr.retrieve import load_features

    features = load_features(Path(features_dir))
    outcome = authors_retrieval(features.query, features.index, features.ref,
                                features.ref_labels, features.ref_countries.to_numpy(),
                                query_subset=sample)
    times = outcome.times
    result["times"] = {"reference_load_s": times.reference_load_s,
                       "index_tagging_s": times.index_tagging_s,
                       "per_query_s": times.per_query_s, "scoring_s": times.scoring_s}
    result["peak_rss_bytes"] = _peak_rss_bytes()
    result["top_ids"] = outcome.top_ids.tolist()


def _in_child(target, *args) -> dict:
    """Run target(*args, result) in a fresh process; its result dict."""
    context = multiprocessing.get_context("spawn")
    with context.Manager() as manager:
        shared = manager.dict()
        process = context.Process(target=target, args=(*args, shared))
        process.start()
        process.join()
        if process.exitcode != 0:
            raise RuntimeError(f"{target.__name__} failed with exit code {process.exitcode}")
        return dict(shared)


def distinct_first_level(features_dir: Path, k_neighbors: int = 30) -> int:
    """|U|: distinct first-level neighbours of the queries (pass 2's rows), for the FLOPs."""
    from glr import search
    from glr.retrieve import load_features

    features = load_features(features_dir)
    _, first = search.topk_inner_product(features.query, features.ref, k_neighbors)
    return len(np.unique(first))


def timed_precisions(precisions: list[str]) -> list[str]:
    """The precisions the stage is timed in on this machine: float32, and bfloat16 where the
    CPU computes it natively (emulated, its time says nothing; float16 is a GPU's)."""
    from glr.runtime import cpu_has_fast_bf16

    return [p for p in precisions if p == "float32" or (p == "bfloat16" and cpu_has_fast_bf16())]


def compare(num_refs: int, *, num_queries: int, num_index: int, dim: int, sample: int,
            workdir: Path, rates: dict, precisions: list[str] = ("float32",),
            seed: int = 0) -> dict:
    """Ours (in each of `precisions`) against the authors' at one reference count."""
    from benchmarks.authors_retrieval import write_clustered_features

    folder = workdir / f"refs-{num_refs}"
    features_dir = folder / "features"
    log.info("writing %d queries, %d index images, %d references (d = %d)", num_queries,
             num_index, num_refs, dim)
    write_clustered_features(features_dir / BACKBONE, num_queries=num_queries,
                             num_index=num_index, num_refs=num_refs, dim=dim,
                             num_landmarks=max(1, num_refs // 10), num_countries=200,
                             seed=seed)
    runs = {}
    for precision in precisions:
        log.info("ours: glr.retrieve.main, retrieve.precision %s", precision)
        runs[precision] = _in_child(_run_ours, str(features_dir),
                                    str(folder / f"retrieval-{precision}"), [BACKBONE], 262_144,
                                    precision)
    ours = runs[precisions[0]]
    rows = np.random.default_rng(seed).choice(num_queries, size=min(sample, num_queries),
                                              replace=False)
    rows = sorted(int(r) for r in rows)
    log.info("authors': index tagging in full, per-query part on %d queries", len(rows))
    theirs = _in_child(_run_authors, str(features_dir / BACKBONE), rows)
    times = theirs["times"]
    scale = num_queries / len(rows)
    authors_seconds = (times["reference_load_s"] + times["index_tagging_s"]
                       + scale * (times["per_query_s"] + times["scoring_s"]))
    for precision, run in runs.items():  # every precision ranks the same (exact scores)
        if run["top_ids"] != ours["top_ids"]:
            raise RuntimeError(f"retrieve.precision {precision} ranked differently from "
                               f"{precisions[0]}")
    ours_top = np.asarray(ours["top_ids"])[rows]
    identical = float(np.mean([a == b for a, b in zip(ours_top.tolist(), theirs["top_ids"],
                                                       strict=True)]))
    distinct = distinct_first_level(features_dir / BACKBONE)
    flops = 2.0 * dim * ((num_queries + num_index) * num_refs + distinct * num_refs
                         + num_queries * num_index)
    best_rate = max(rates.values())
    floor = flops / (best_rate * 1e9)
    ref_bytes = num_refs * dim * 2
    return {
        "references": num_refs, "queries": num_queries, "index": num_index, "dim": dim,
        "ours_s": round(ours["seconds"], 2), "ours_tag_s": round(ours["tag_seconds"], 2),
        "ours_backend": ours["backend"],
        "precisions": {precision: {"backend": run["backend"], "seconds": round(run["seconds"], 2),
                                   "speedup": round(authors_seconds / run["seconds"], 2),
                                   **run["search"]}
                       for precision, run in runs.items()},
        "authors_s": round(authors_seconds, 2),
        "authors_parts_s": {name: round(value, 2) for name, value in times.items()},
        "authors_queries_timed": len(rows), "authors_query_scale": round(scale, 3),
        "speedup": round(authors_seconds / ours["seconds"], 2),
        "identical_top100_rows": identical,
        "distinct_first_level": distinct, "flops": flops,
        "floor_s": round(floor, 2), "floor_rate_gflops": best_rate,
        "ours_over_floor": round(ours["seconds"] / floor, 2),
        "ours_peak_rss_gb": round(ours["peak_rss_bytes"] / 2**30, 3),
        "authors_peak_rss_gb": round(theirs["peak_rss_bytes"] / 2**30, 3),
        "reference_gb": round(ref_bytes / 2**30, 3),
        "rss_over_references_gb": round((ours["peak_rss_bytes"] - ref_bytes) / 2**30, 3),
    }


def accounting(workdir: Path, precisions: list[str], *, queries: int, index: int,
               references: int, dim: int = 512, seed: int = 0) -> dict:
    """Candidates per row and rows redone of the reference searches (both passes of
    `rerank.reference_neighbors`, k 1 and 30) in each precision on the same clustered
    features, at a shape small enough for the emulated products (float16 on a CPU, bfloat16
    without native support): the counts depend on the margin and the data, not on the
    kernel's speed. Seconds are reported, but mean something only for native kernels."""
    from benchmarks.authors_retrieval import write_clustered_features
    from glr import rerank, search
    from glr.retrieve import load_features
    from glr.runtime import cpu_has_fast_bf16

    folder = workdir / "accounting"
    write_clustered_features(folder / BACKBONE, num_queries=queries, num_index=index,
                             num_refs=references, dim=dim,
                             num_landmarks=max(1, references // 10), num_countries=200,
                             seed=seed)
    features = load_features(folder / BACKBONE)
    counts = {}
    for precision in precisions:
        backend = search.Backend("cpu", precision)
        start = time.perf_counter()
        rerank.reference_neighbors(features.query, features.index, features.ref, 30,
                                   backend=backend)
        native = precision == "float32" or (precision == "bfloat16" and cpu_has_fast_bf16())
        counts[precision] = {**backend.stats.summary(),
                             "seconds": round(time.perf_counter() - start, 2),
                             "kernel": "native" if native else "emulated"}
        log.info("accounting, %s: %s", precision, backend.stats.describe())
    return {"shape": {"queries": queries, "index": index, "references": references,
                      "dim": dim}, "precisions": counts}


def memory_check(workdir: Path, *, index: int, references: int, dim: int = 512,
                 backbones: int = 4, queries: int = GLDV2["queries"], seed: int = 1) -> dict:
    """retrieve.main with several backbones at a scaled shape: measured vs modelled."""
    from benchmarks.authors_retrieval import write_clustered_features

    folder = workdir / "memory"
    names = ["resnet18", "resnet34", "resnet50", "resnet101"][:backbones]
    for offset, name in enumerate(names):
        write_clustered_features(folder / "features" / name, num_queries=queries,
                                 num_index=index, num_refs=references, dim=dim,
                                 num_landmarks=max(1, references // 10), num_countries=200,
                                 seed=seed + offset)  # the ids are the same for every seed
    block_rows = 262_144
    run = _in_child(_run_ours, str(folder / "features"), str(folder / "retrieval"), names,
                    block_rows, "auto")
    model = memory_model(queries, index, dim, min(block_rows, references), backbones)
    measured = run["peak_rss_bytes"] - run["baseline_rss_bytes"]
    refs_mapped = references * dim * 2  # the last backbone's mapped references, at most
    full = memory_model(GLDV2["queries"], GLDV2["index"], dim, block_rows, GLDV2["backbones"])
    return {
        "shape": {"queries": queries, "index": index, "references": references,
                  "backbones": backbones, "dim": dim},
        "seconds": round(run["seconds"], 1),
        "measured_gb": round(measured / 2**30, 3),
        "mapped_references_gb": round(refs_mapped / 2**30, 3),
        "model_gb": {name: round(value / 2**30, 3) for name, value in model.items()
                     if name != "backbones"},
        "interpreter_gb": round(run["baseline_rss_bytes"] / 2**30, 3),
        "gldv2_model_gb": {name: round(value / 2**30, 3) for name, value in full.items()
                           if name != "backbones"},
        "gldv2_shape": GLDV2,
        "target_gb": 8.0,
    }


def main(out: Path, references: list[int], *, queries: int = 200, index: int = 20_000,
         dim: int = 512, sample: int = 20, memory_index: int = 190_000,
         memory_references: int = 10_000, memory_queries: int = GLDV2["queries"],
         workdir: Path | None = None, precisions: list[str] = PRECISIONS,
         accounting_shape: tuple[int, int, int] = (200, 2_000, 20_000)) -> dict:
    """Run every comparison, the accounting per precision and the memory check; write
    `out`."""
    with tempfile.TemporaryDirectory(prefix="glr-bench-retrieve-") as scratch:
        base = Path(workdir) if workdir else Path(scratch)
        base.mkdir(parents=True, exist_ok=True)
        rates = gemm_rates(dim)
        log.info("GEMM rates (GFLOP/s): %s", rates)
        timed = timed_precisions(list(precisions)) or ["float32"]
        sizes = [compare(n, num_queries=queries, num_index=index, dim=dim, sample=sample,
                         workdir=base, rates=rates, precisions=timed) for n in references]
        counts = (accounting(base, list(precisions), queries=accounting_shape[0],
                             index=accounting_shape[1], references=accounting_shape[2],
                             dim=dim) if accounting_shape[2] else None)
        memory = (memory_check(base, index=memory_index, references=memory_references, dim=dim,
                               queries=memory_queries) if memory_index else None)
    report = {"benchmark": "retrieve", "machine": machine(), "gemm_gflops": rates,
              "targets": TARGETS, "sizes": sizes, "accounting": counts, "memory": memory}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    for size in sizes:
        for precision, run in size["precisions"].items():
            log.info("%d references, %s: %.1f s (%.2f× the authors'), %.1f candidates per "
                     "row (max %d), %d of %d rows redone", size["references"], precision,
                     run["seconds"], run["speedup"], run["candidates_per_row"],
                     run["candidates_max"], run["rows_redone"], run["rows"])
        log.info("%d references: ours %.1f s, authors' %.1f s (%.2f×), floor %.1f s "
                 "(ours %.2f× it), identical rows %.1f%%, peak RSS %.2f GB (refs %.2f GB)",
                 size["references"], size["ours_s"], size["authors_s"], size["speedup"],
                 size["floor_s"], size["ours_over_floor"], 100 * size["identical_top100_rows"],
                 size["ours_peak_rss_gb"], size["reference_gb"])
    log.info("wrote %s", out)
    return report
