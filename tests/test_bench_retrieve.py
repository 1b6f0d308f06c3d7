"""`glr bench retrieve`: its arithmetic, and one tiny run through every part."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks import retrieve as bench_retrieve
from glr import runtime
from glr.retrieve import SCORE_CHUNK_ELEMENTS
from glr.search import RESCORE_ELEMENTS


def test_memory_model_of_the_full_gldv2_shape_is_within_8_gb() -> None:
    shape = bench_retrieve.GLDV2
    model = bench_retrieve.memory_model(shape["queries"], shape["index"], 512, 262_144,
                                        shape["backbones"])
    assert model["ensemble_scores"] == 4 * 1_129 * 761_757  # 3.44e9 bytes
    assert model["index_features"] == 6 * 761_757 * 512
    assert model["reference_block"] == 4 * 262_144 * 512
    assert model["score_chunks"] == 12 * SCORE_CHUNK_ELEMENTS
    assert model["rescoring"] == 10 * RESCORE_ELEMENTS
    assert model["total"] == sum(model[name] for name in
                                 ("ensemble_scores", "index_features", "reference_block",
                                  "rescoring", "score_chunks"))
    assert model["total"] < 8 * 2**30
    with_kr = bench_retrieve.memory_model(shape["queries"], shape["index"], 512, 262_144, 4,
                                          full_kr=True)
    assert with_kr["total"] - model["total"] == 2 * 4 * 1_129 * 761_757


def test_tiny_run_reports_consistent_numbers(tmp_path: Path) -> None:
    out = tmp_path / "retrieve.json"
    report = bench_retrieve.main(out, [3_000], queries=8, index=300, dim=32, sample=3,
                                 memory_index=400, memory_references=500, memory_queries=6,
                                 workdir=tmp_path / "work", accounting_shape=(8, 60, 600))
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    size, = report["sizes"]
    # glr's retrieval equals the authors' procedure on the sampled queries
    assert size["identical_top100_rows"] == 1.0
    assert size["authors_queries_timed"] == 3 and size["authors_query_scale"] == round(8 / 3, 3)
    parts = size["authors_parts_s"]
    scaled = (parts["reference_load_s"] + parts["index_tagging_s"]
              + 8 / 3 * (parts["per_query_s"] + parts["scoring_s"]))
    assert abs(size["authors_s"] - scaled) <= 0.05  # from the rounded parts
    assert 0 < size["distinct_first_level"] <= 8 * 30
    assert size["flops"] == 2 * 32 * ((8 + 300) * 3_000 + size["distinct_first_level"] * 3_000
                                      + 8 * 300)
    assert size["floor_rate_gflops"] == max(report["gemm_gflops"].values())
    assert size["reference_gb"] == round(3_000 * 32 * 2 / 2**30, 3)
    memory = report["memory"]
    assert memory["shape"] == {"queries": 6, "index": 400, "references": 500, "backbones": 4,
                               "dim": 32}
    assert memory["measured_gb"] >= 0 and memory["gldv2_model_gb"]["total"] < 8
    # the stage timed in float32, and in bfloat16 as a bf16-native CPU (make test-bf16)
    native_bf16 = runtime.cpu_has_fast_bf16()
    assert list(size["precisions"]) == ["float32", "bfloat16"][:1 + native_bf16]
    timed = size["precisions"]["float32"]
    assert timed["seconds"] == size["ours_s"] and timed["backend"] == "cpu-float32 (faiss)"
    assert timed["rows"] == (8 + 300) * 1 + size["distinct_first_level"]  # one block, 2 passes
    assert timed["candidates_per_row"] >= 1 and timed["rows_redone"] >= 0
    # counted in every precision on the same features: a wider margin, more candidates
    counts = report["accounting"]["precisions"]
    assert list(counts) == ["float32", "bfloat16", "float16"]
    assert [counts[p]["kernel"] for p in counts] == [
        "native", "native" if native_bf16 else "emulated", "emulated"]
    assert all(counts[p]["rows"] == counts["float32"]["rows"] for p in counts)
    assert (counts["float32"]["candidates_per_row"] <= counts["float16"]["candidates_per_row"]
            <= counts["bfloat16"]["candidates_per_row"])


def test_only_native_precisions_are_timed(monkeypatch) -> None:
    monkeypatch.setenv("GLR_MACHINE", "plain-cpu")
    assert bench_retrieve.timed_precisions(["float32", "bfloat16", "float16"]) == ["float32"]
    monkeypatch.setenv("GLR_MACHINE", "bf16-cpu")
    assert bench_retrieve.timed_precisions(["float32", "bfloat16", "float16"]) == [
        "float32", "bfloat16"]
