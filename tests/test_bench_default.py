"""`glr bench default`: its pure parts (the pipeline runs themselves take half an hour)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from glr.bench import default as bench_default
from glr.params import parse_params


def test_seeded_params_changes_only_the_synth_seed() -> None:
    text = Path("params.yaml").read_text()
    seeded = yaml.safe_load(bench_default.seeded_params(text, 7))
    original = yaml.safe_load(text)
    assert seeded["synth"]["seed"] == 7
    seeded["synth"]["seed"] = original["synth"]["seed"]
    assert seeded == original
    parse_params(yaml.safe_load(bench_default.seeded_params(text, 11)))  # still valid


def _scores(plain: float, rerank: float) -> dict:
    return {"plain": {"map100": plain, "map100_public": plain - 0.01,
                      "map100_private": plain + 0.01},
            "rerank": {"map100": rerank, "map100_public": rerank - 0.02,
                       "map100_private": rerank + 0.02}}


def test_final_scores_prefer_the_ensemble() -> None:
    metrics = {"map100": 0.6, "queries": 100, "resnet18": _scores(0.4, 0.5)}
    assert bench_default.final_scores(metrics) == {
        "model": "resnet18", "plain": 0.4, "rerank": 0.5, "plain_public": 0.4 - 0.01,
        "plain_private": 0.4 + 0.01, "rerank_public": 0.5 - 0.02, "rerank_private": 0.5 + 0.02}
    metrics.update(resnet34=_scores(0.45, 0.55), ensemble=_scores(0.5, 0.6))
    scores = bench_default.final_scores(metrics)
    assert (scores["model"], scores["plain"], scores["rerank"]) == ("ensemble", 0.5, 0.6)


def test_summary_means_spreads_and_targets() -> None:
    runs = [{"plain": 0.42, "rerank": 0.50, "seconds": 500.0},
            {"plain": 0.40, "rerank": 0.47, "seconds": 590.0},
            {"plain": 0.47, "rerank": 0.54, "seconds": 420.0}]
    summary = bench_default.summarize(runs)
    assert summary["plain_mean"] == pytest.approx(0.43)
    assert summary["rerank_mean"] == pytest.approx(0.50333, abs=1e-5)
    assert summary["rerank_gain_mean"] == pytest.approx(0.07333, abs=1e-5)
    assert summary["plain_spread"] == pytest.approx(0.07)
    assert summary["rerank_spread"] == pytest.approx(0.07)
    assert summary["seconds_max"] == 590.0
    assert summary["meets"] == {"plain_mean": True, "rerank_gain": True, "spread": True,
                                "time": True}
    runs[2] = {"plain": 0.30, "rerank": 0.32, "seconds": 700.0}
    summary = bench_default.summarize(runs)
    assert summary["meets"] == {"plain_mean": False, "rerank_gain": True, "spread": False,
                                "time": False}


def test_a_project_holds_the_pipeline_with_the_seed(tmp_path) -> None:
    project = bench_default.make_project(Path.cwd(), tmp_path, 7)
    assert project == tmp_path / "seed-7"
    assert yaml.safe_load((project / "params.yaml").read_text())["synth"]["seed"] == 7
    assert (project / "dvc.yaml").read_text() == Path("dvc.yaml").read_text()
    assert (project / "src/glr/train.py").is_file()
    assert (project / ".dvc").is_dir()
