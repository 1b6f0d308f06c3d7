"""Extraction: files and order, resume per shard, and 2-process output equal to 1 process."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from glr import extract, prepare, train
from glr.params import parse_params


@pytest.fixture(scope="module")
def setup(small_pipeline, small_shards, tmp_path_factory):
    """Small shards and an (untrained) resnet10t model folder at models/resnet10t/p1."""
    base_params, prepared = small_pipeline
    root = tmp_path_factory.mktemp("extract")
    shard_dir = small_shards
    params = parse_params({
        "data": dataclasses.asdict(base_params.data),
        "model": {"pretrained": False, "backbones": ["resnet10t"], "size": 32, "embedding_dim": 16},
        "train": {"phases": {"p1": {}},
                  "recipe": {"resnet10t-p1": {"backbone": "resnet10t", "phase": "p1"}}},
        "extract": {"batch": 8, "workers": 0},
    })
    folder = train.init_main(params, "resnet10t", root / "models")
    (root / "models/resnet10t/p1").mkdir(parents=True)
    for name in ("model.safetensors", "config.json"):
        (root / "models/resnet10t/p1" / name).write_bytes((folder / name).read_bytes())
    return params, prepared, shard_dir, root


def run(params, shard_dir, root: Path, name: str):
    out = root / name / "features"
    extract.main(params, "resnet10t", shard_dir, root / "models", out, root / name / "runs")
    return out


def test_features_files_and_order(setup):
    params, prepared, shard_dir, root = setup
    out = run(params, shard_dir, root, "one")
    query = np.load(out / "query.npy")
    assert query.dtype == np.float16 and query.shape[1] == 16
    # Unit float32 rows stored as float16: each component moves by at most 2^-11 of itself,
    # so a norm by at most 2^-11 (plus a few float32 roundings in normalize and here).
    norms = np.linalg.norm(query.astype(np.float32), axis=1)
    assert np.abs(norms - 1.0).max() <= 2.0**-11 + (1.5 * 16 + 4) * 2.0**-24
    queries = prepare.read_list(prepared / "val_queries.parquet")["id"].tolist()
    assert pq.read_table(out / "query.parquet").column("id").to_pylist() == queries
    index = prepare.read_list(prepared / "eval_index.parquet")["id"].tolist()
    assert pq.read_table(out / "index.parquet").column("id").to_pylist() == index
    ref = pq.read_table(out / "ref.parquet").to_pandas()
    all_list = prepare.read_list(prepared / "all.parquet")
    assert len(ref) == (all_list["label"] >= 0).sum() == len(np.load(out / "ref.npy"))
    assert list(ref.columns) == ["id", "label", "country", "continent"]


def test_resume_reuses_finished_shards(setup, caplog):
    params, _, shard_dir, root = setup
    first = run(params, shard_dir, root, "resume")
    parts = sorted((root / "resume/runs/extract/resnet10t").rglob("*.npy"))
    stamps = {p: p.stat().st_mtime_ns for p in parts}
    parts[0].unlink()  # as if interrupted before the first shard was saved
    caplog.set_level("INFO", logger="glr.extract")
    again = run(params, shard_dir, root, "resume")
    # the log says what was reused: one part was missing from the set it belonged to
    resumed = [r.getMessage() for r in caplog.records if "resuming" in r.getMessage()]
    total = len(list(parts[0].parent.glob("*.npy")))
    assert any(f"{total - 1} of {total} shard parts already extracted" in m and "1 to go" in m
               for m in resumed), resumed
    assert len(resumed) == 3  # query, index and reference parts were all found
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items() if p != parts[0])
    # Exact: extraction batches within each shard, so the re-extracted shard goes through the
    # same kernels in the same batches on the same inputs as in the first run.
    for name in ("query", "index", "ref"):
        assert np.array_equal(np.load(first / f"{name}.npy"), np.load(again / f"{name}.npy"))


def test_two_processes_give_the_single_process_output(setup):
    params, _, shard_dir, root = setup
    # torchrun gives each of its processes one thread: so does the single-process run, so that
    # both compute every shard with the same kernels, in the same batches (within a shard).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = run(params, shard_dir, root, "single")
    finally:
        torch.set_num_threads(threads)
    double = root / "double"
    params2 = dataclasses.replace(params, extract=dataclasses.replace(params.extract,
                                                                      processes=2))
    params_file = root / "params2.yaml"
    params_file.write_text(yaml.safe_dump(dataclasses.asdict(params2), sort_keys=False))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"  # what torchrun sets by default, whatever the caller had
    result = subprocess.run(
        [sys.executable, "-m", "glr", "extract", "--params", str(params_file),
         "--backbone", "resnet10t", "--shards", str(shard_dir), "--models",
         str(root / "models"), "--out", str(double / "features"), "--runs",
         str(double / "runs")], capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    for name in ("query", "index", "ref"):
        a, b = np.load(single / f"{name}.npy"), np.load(double / "features" / f"{name}.npy")
        assert a.shape == b.shape
        assert np.array_equal(a, b)  # same images, same order, same batches and kernels
        ids_a = pq.read_table(single / f"{name}.parquet").to_pandas()
        ids_b = pq.read_table(double / "features" / f"{name}.parquet").to_pandas()
        assert ids_a.equals(ids_b)


@pytest.mark.parametrize(("machine", "precision", "expected"), [
    ("bf16-cpu", "fp32", "fp32"),  # `-S train.precision=fp32` on an AMX CPU: the float32 run
    ("bf16-cpu", "auto", "bf16"),
    ("plain-cpu", "auto", "fp32"),
    ("plain-cpu", "bf16", "bf16"),  # forced: emulated here, slow but correct
])
def test_extraction_computes_and_logs_in_the_training_precision(setup, caplog, monkeypatch,
                                                                machine, precision, expected):
    params, _, shard_dir, root = setup
    monkeypatch.setenv("GLR_MACHINE", machine)
    params = dataclasses.replace(params, train=dataclasses.replace(params.train,
                                                                   precision=precision))
    caplog.set_level("INFO", logger="glr.extract")
    out = run(params, shard_dir, root, f"precision-{machine}-{precision}")
    logged = [r.getMessage() for r in caplog.records if r.getMessage().startswith("precision:")]
    assert len(logged) == 1 and logged[0].split()[1] == expected, logged
    info = yaml.safe_load((out / "info.json").read_text())
    assert info["precision"] == expected
    # the parts of each precision are kept apart: a resume never mixes them
    model_dir = root / "models/resnet10t/p1"
    folder = extract.fingerprint(model_dir, 32, [1.0], expected, "cpu")
    assert (root / f"precision-{machine}-{precision}/runs/extract/resnet10t" / folder).is_dir()
    assert folder != extract.fingerprint(model_dir, 32, [1.0],
                                         "bf16" if expected == "fp32" else "fp32", "cpu")
    query = np.load(out / "query.npy")
    assert query.dtype == np.float16 and query.shape[1] == 16


def test_host_features_trail_the_device_by_one_batch_and_round_as_numpy():
    """Batch n reaches the host loop only after batch n + 1 was queued (on a GPU the device
    then computes while the host files), with numpy's float32 -> float16 rounding."""
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randn(5, 16, generator=generator) * scale for scale in (1, 1e-5, 3e4)]
    pulled = []

    def source():
        for number, features in enumerate(batches):
            pulled.append(number)
            yield features, number

    seen = []
    for host, number in extract.host_features(source()):
        seen.append((number, list(pulled)))
        expected = batches[number].numpy().astype(np.float16)
        assert host.dtype == np.float16 and host.tobytes() == expected.tobytes()
    assert seen == [(0, [0, 1]), (1, [0, 1, 2]), (2, [0, 1, 2])]


def test_workers_beyond_the_nodes_cpus_are_capped_and_change_no_feature(setup, caplog,
                                                                          monkeypatch):
    params, _, shard_dir, root = setup
    baseline = run(params, shard_dir, root, "workers-0")
    monkeypatch.setattr(extract, "available_cpus", lambda: 2)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    many = dataclasses.replace(params, extract=dataclasses.replace(params.extract, workers=64))
    caplog.set_level("INFO", logger="glr.extract")
    out = run(many, shard_dir, root, "workers-64")
    assert "extract.workers 64 capped to 2: 1 process(es) share 2 CPU(s) on this node" in [
        r.getMessage() for r in caplog.records]
    for name in ("query", "index", "ref"):
        assert (out / f"{name}.npy").read_bytes() == (baseline / f"{name}.npy").read_bytes()


def test_assembly_stops_when_parts_of_another_node_are_missing(tmp_path):
    """Two "nodes" without a shared filesystem: each rank writes the parts of its shards
    (shard n: rank n mod world) into its own node's runs folder, so rank 0 finds only its own.
    It stops naming the missing parts and their ranks instead of a FileNotFoundError."""
    node0, node1 = tmp_path / "node0" / "parts", tmp_path / "node1" / "parts"
    for folder, rank in ((node0, 0), (node1, 1)):
        folder.mkdir(parents=True)
        for number in range(rank, 5, 2):  # 5 shards over 2 ranks
            (folder / f"{number:06d}.npy").write_bytes(b"")
            (folder / f"{number:06d}.parquet").write_bytes(b"")
    with pytest.raises(extract.LaunchError, match=r"2 of 5 shard parts are missing \(e\.g\. "
                                                  r"000001\.npy, written by rank 1; ranks 1\)"
                                                  r": the runs folder must be on a filesystem"):
        extract.check_parts(node0, 5, world=2)
    for number in (1, 3):  # a shared filesystem: both nodes' parts in one folder
        (node0 / f"{number:06d}.npy").write_bytes(b"")
        (node0 / f"{number:06d}.parquet").write_bytes(b"")
    extract.check_parts(node0, 5, world=2)


def test_baseline_searches_with_the_starting_weights_queries_and_index_only(setup):
    """`glr baseline`: features of the queries and the index with models/<b>/pretrained (the
    bytes `extract --phase pretrained` writes, not the trained phase's), no references, and
    the exact top-k."""
    from safetensors.torch import load_file, save_file

    from glr import baseline

    params, _, shard_dir, root = setup
    models = root / "baseline-models"  # p1 here: other weights than the starting ones
    shutil.copytree(root / "models", models)
    weights = load_file(models / "resnet10t/p1/model.safetensors")
    save_file({name: tensor * 1.5 if tensor.is_floating_point() else tensor
               for name, tensor in weights.items()}, models / "resnet10t/p1/model.safetensors")
    out = root / "baseline" / "resnet10t"
    baseline.main(params, "resnet10t", shard_dir, models, out, root / "baseline-runs")
    assert sorted(p.name for p in out.iterdir()) == [
        "index.npy", "index.parquet", "info.json", "query.npy", "query.parquet", "topk.parquet"]
    assert json.loads((out / "info.json").read_text())["phase"] == "pretrained"
    for phase, same in (("pretrained", True), ("p1", False)):
        full = root / f"full-{phase}"
        extract.main(params, "resnet10t", shard_dir, models, full, root / "full-runs",
                     phase=phase)
        for name in ("query.npy", "index.npy"):
            assert ((out / name).read_bytes() == (full / name).read_bytes()) is same, phase

    queries = np.load(out / "query.npy").astype(np.float64)
    index = np.load(out / "index.npy").astype(np.float64)
    exact = queries @ index.T
    index_ids = pq.read_table(out / "index.parquet").column("id").to_pylist()
    table = pq.read_table(out / "topk.parquet").to_pandas()
    k = min(params.retrieve.k, len(index_ids))
    # float32 dot products of 16 float16 values (unit rows): each of the 16 products and sums
    # rounds by at most 2^-24 of a running total bounded by |q||x| ≈ 1, plus the final one
    tolerance = 17 * 2.0**-24 * 1.01
    position = {image: n for n, image in enumerate(index_ids)}
    for row, (images, scores) in enumerate(zip(table["images"], table["scores"], strict=True)):
        chosen = [position[image] for image in images]
        assert len(chosen) == k == len(set(chosen))
        np.testing.assert_allclose(scores, exact[row, chosen], rtol=0, atol=tolerance)
        assert all(np.diff(scores) <= 0)
        best_left_out = np.delete(exact[row], chosen).max(initial=-np.inf)
        assert exact[row, chosen].min() >= best_left_out - 2 * tolerance
