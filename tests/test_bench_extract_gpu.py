"""`glr bench extract` and `glr bench gpu`: the whole code path at toy sizes on the CPU.

Timings are machine-dependent: only "> 0" is asserted of them, and that the reported ratios are
the reported rates' quotients. timm models are built with random weights (no download).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from benchmarks import extract as bench_extract
from benchmarks import gpu as bench_gpu
from benchmarks import scaling as bench_scaling
from glr import cli


def check_comparison(part: dict, names: tuple[str, str], images: int) -> None:
    """Counts as asked, positive rates, one per round, and ratio = first rate / second."""
    assert part["images"] == images
    rates = part["rates_per_s"]
    assert set(rates) == set(names) and all(rate > 0 for rate in rates.values())
    assert all(len(part["rounds_per_s"][name]) == part["rounds"] for name in names)
    # the ratio is rounded to 3 decimals from the reported (rounded) rates
    assert part["ratio"] == pytest.approx(rates[names[0]] / rates[names[1]], abs=5e-4)
    assert part["target_ratio"] == 0.9
    assert part["meets_target"] == (rates[names[0]] / rates[names[1]] >= 0.9)


def test_bench_extract_at_a_tiny_size_through_the_cli(tmp_path: Path):
    out = tmp_path / "extract.json"
    status = cli.main(["bench", "extract", "--out", str(out), "--backbone", "resnet10t",
                       "--size", "32", "--batch", "4", "--images", "7", "--rounds", "2",
                       "--workers", "0", "--image-size", "64x48",
                       "--workdir", str(tmp_path / "work")])
    assert status == 0
    result = json.loads(out.read_text())
    assert result["benchmark"] == "extract" and result["backbone"] == "resnet10t"
    assert (result["size"], result["batch"], result["workers"]) == (32, 4, 0)
    check_comparison(result, ("extract", "forward"), images=8)  # 7 rounded up to 2 batches
    machine = result["machine"]
    assert machine["torch"] == torch.__version__ and machine["threads"] >= 1
    assert machine["device"] == "cpu" and isinstance(machine["cpu"]["native_bf16"], bool)
    assert set(machine["cpu"]["flags"]) <= {"avx2", "avx512f", "avx512_bf16", "amx_tile",
                                            "amx_bf16"}
    assert not list((tmp_path / "work").glob("parts*")), "feature parts are left behind"


def test_bench_shards_are_full_and_repeat_to_the_count_asked(tmp_path: Path):
    shard_dir = bench_extract.make_shards(tmp_path, distinct=8, per_shard=4, max_side=32,
                                          image_size=(64, 48), workers=1)
    urls, counts = bench_extract.shard_list(shard_dir, 40)
    assert sum(counts) == 40 and set(counts) == {4}
    distinct = sorted(set(urls))
    assert len(distinct) >= 2 and urls[: len(distinct)] == distinct  # in order, then again
    with pytest.raises(ValueError, match="multiple of the shard size"):
        bench_extract.shard_list(shard_dir, 6)


def test_bench_gpu_dry_run_measures_every_part(tmp_path: Path):
    out = tmp_path / "gpu.json"
    status = cli.main(["bench", "gpu", "--dry-run", "--out", str(out),
                       "--workdir", str(tmp_path / "work"), "--gpus", "2"])
    assert status == 0
    result = json.loads(out.read_text())
    sizes = bench_gpu.dry_sizes()
    assert result["benchmark"] == "gpu" and result["dry_run"] is True
    assert result["card"] == "none (CPU)" and result["torch"] == torch.__version__
    training = result["training"]
    assert training["backbone"] == "resnet18" and training["size"] == 64
    assert training["batch"] == sizes.train_batch and training["steps"] == sizes.steps
    assert training["classes"] >= 2  # the generated data's labels
    check_comparison(training, ("loader", "memory"), images=sizes.steps * sizes.train_batch)
    check_comparison(result["extraction"], ("extract", "forward"), images=sizes.extract_images)
    retrieval = result["retrieval"]
    if retrieval["status"] == "ok":
        assert retrieval["references"] == sizes.references and retrieval["seconds"] > 0
        assert retrieval["references_per_s"] == pytest.approx(
            sizes.references / retrieval["seconds"], rel=2e-3)
        assert retrieval["shapes"] == {"index_nearest": [sizes.index],
                                       "query_neighbors": [sizes.queries, sizes.k_neighbors]}
        # both passes: the queries and index rows, then the distinct first-level neighbours
        search = retrieval["search"]
        assert search["rows"] >= sizes.queries + sizes.index
        assert search["candidates_per_row"] >= 1 and 0 <= search["rows_redone_share"] <= 1
    else:  # the API is being written elsewhere: the part says so instead of failing
        assert retrieval["status"] == "not available" and retrieval["reason"]
    assert all(result[part]["wall_s"] >= 0 for part in ("training", "extraction", "retrieval",
                                                         "scaling"))
    # (d): torchrun with 1 then 2 processes (gloo on the CPU), each rank timing its steps
    scaling = result["scaling"]
    assert scaling["processes"] == 2 and list(scaling["runs"]) == ["1", "2"]
    for count, run in scaling["runs"].items():
        assert run["processes"] == int(count) and len(run["per_rank_images_per_s"]) == int(count)
        assert run["images_per_s_per_process"] == pytest.approx(
            run["images_per_s"] / int(count), abs=0.01)
    # the rates are rounded to 0.01 (off by h = 0.005 at most), the ratio to 0.001: the ratio
    # r of the rounded rates is off by at most h / (2 (a1 - h)) + r h / (a1 - h) from the
    # exact one, which is what the bench rounds (a slow 1-process run makes a1 small)
    a1, a2, h = scaling["runs"]["1"]["images_per_s"], scaling["runs"]["2"]["images_per_s"], 0.005
    ratio = a2 / (2 * a1)
    bound = h / (2 * (a1 - h)) + ratio * h / (a1 - h) + 0.0005 + 1e-9
    assert scaling["scaling"] == pytest.approx(ratio, abs=bound)


def test_bench_scaling_summary_is_every_image_over_the_slowest_rank():
    one = {"workers": 4, "ranks": [{"images": 1000, "seconds": 2.0}]}
    two = {"workers": 2, "ranks": [{"images": 1000, "seconds": 2.5},
                                   {"images": 1000, "seconds": 2.0}]}
    summary = bench_scaling.summarize({1: one, 2: two})
    assert summary["runs"]["2"] == {"processes": 2, "workers_per_process": 2,
                                    "images_per_s": 800.0, "images_per_s_per_process": 400.0,
                                    "per_rank_images_per_s": [400.0, 500.0]}
    assert summary["runs"]["1"]["images_per_s"] == 500.0
    assert summary["scaling"] == 0.8 and summary["processes"] == 2


def test_bench_gpu_scaling_processes_default_to_the_visible_gpus():
    from glr.runtime import LaunchError

    assert bench_gpu.scaling_processes(None, dry_run=False, visible=8) == 8
    assert bench_gpu.scaling_processes(None, dry_run=True, visible=0) == 1
    assert bench_gpu.scaling_processes(2, dry_run=True, visible=0) == 2
    with pytest.raises(LaunchError, match=r"--gpus 4: torch sees 2 GPU\(s\) on this node"):
        bench_gpu.scaling_processes(4, dry_run=False, visible=2)
    with pytest.raises(LaunchError, match="--gpus 0: at least 1"):
        bench_gpu.scaling_processes(0, dry_run=False, visible=2)


def test_bench_gpu_without_a_gpu_writes_nothing(tmp_path: Path, monkeypatch, caplog):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "gpu.json"
    assert cli.main(["bench", "gpu", "--out", str(out)]) == 0
    assert not out.exists()
    assert "no GPU" in caplog.text


def test_bench_gpu_retrieval_without_the_api_is_not_available(monkeypatch):
    from glr import rerank

    monkeypatch.delattr(rerank, "reference_neighbors", raising=False)
    result = bench_gpu.time_retrieval(bench_gpu.dry_sizes(), torch.device("cpu"))
    assert result["status"] == "not available" and "reference_neighbors" in result["reason"]


def test_bench_gpu_follows_the_quick_recipe():
    sizes = bench_gpu.full_sizes(workers=4)
    assert (sizes.backbone, sizes.size, sizes.train_batch, sizes.pad) == (
        "resnet50.tv_in1k", 256, 128, 10)
    assert (sizes.queries, sizes.index, sizes.references, sizes.k_neighbors) == (
        1_129, 50_000, 1_000_000, 30)
    assert sizes.extract_images % sizes.extract_batch == 0
