"""`glr bench default`: its pure parts (the pipeline runs themselves take half an hour)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from benchmarks import default as bench_default
from glr.params import parse_params


def test_each_seed_runs_as_a_named_experiment_with_every_stage() -> None:
    assert bench_default.experiment_command("dvc", "bench-default-seed-7",
                                            ["synth.seed=7", "retrieve.k=50"]) == [
        "dvc", "exp", "run", "--temp", "--force", "--name", "bench-default-seed-7",
        "--set-param", "synth.seed=7", "--set-param", "retrieve.k=50"]


def test_a_seed_run_sets_a_valid_synth_seed() -> None:
    """The value `-S synth.seed=11` sets passes the params loader."""
    params = yaml.safe_load(Path("params.yaml").read_text())
    params["synth"]["seed"] = 11
    assert parse_params(params).synth.seed == 11


def _scores(plain: float, rerank: float, pretrained: float | None = None) -> dict:
    start = {} if pretrained is None else {"pretrained": {
        "map100": pretrained, "map100_public": pretrained, "map100_private": pretrained}}
    return {**start, "plain": {"map100": plain, "map100_public": plain - 0.01,
                               "map100_private": plain + 0.01},
            "rerank": {"map100": rerank, "map100_public": rerank - 0.02,
                       "map100_private": rerank + 0.02}}


def test_final_scores_prefer_the_ensemble() -> None:
    metrics = {"map100": 0.6, "queries": 100, "resnet18": _scores(0.4, 0.5, 0.1)}
    assert bench_default.final_scores(metrics) == {
        "model": "resnet18", "plain": 0.4, "rerank": 0.5, "pretrained": 0.1,
        "plain_public": 0.4 - 0.01,
        "plain_private": 0.4 + 0.01, "rerank_public": 0.5 - 0.02, "rerank_private": 0.5 + 0.02}
    metrics.update(resnet34=_scores(0.45, 0.55, 0.2), ensemble=_scores(0.5, 0.6))
    scores = bench_default.final_scores(metrics)
    assert (scores["model"], scores["plain"], scores["rerank"], scores["pretrained"]) == (
        "ensemble", 0.5, 0.6, None)  # an ensemble has no starting weights of its own


def test_summary_means_spreads_and_targets() -> None:
    runs = [{"plain": 0.52, "rerank": 0.63, "pretrained": 0.20, "seconds": 500.0},
            {"plain": 0.50, "rerank": 0.60, "pretrained": 0.25, "seconds": 590.0},
            {"plain": 0.57, "rerank": 0.65, "pretrained": 0.30, "seconds": 420.0}]
    summary = bench_default.summarize(runs)
    assert summary["plain_mean"] == pytest.approx(0.53)
    assert summary["rerank_mean"] == pytest.approx(1.88 / 3)
    assert summary["rerank_gain_mean"] == pytest.approx(0.29 / 3)
    assert summary["training_gain_mean"] == pytest.approx(0.28)
    assert summary["plain_spread"] == pytest.approx(0.07)
    assert summary["rerank_spread"] == pytest.approx(0.05)
    assert summary["seconds_max"] == 590.0
    assert summary["meets"] == {"plain_mean": True, "rerank_gain": False, "spread": True,
                                "training_gain": True, "time": True}
    runs[2] = {"plain": 0.30, "rerank": 0.42, "pretrained": None, "seconds": 700.0}
    summary = bench_default.summarize(runs)
    assert summary["training_gain_mean"] == pytest.approx(0.285)  # the runs that have one
    assert summary["meets"] == {"plain_mean": False, "rerank_gain": True, "spread": False,
                                "training_gain": True, "time": False}
    for run in runs:
        run["pretrained"] = None
    summary = bench_default.summarize(runs)
    assert summary["training_gain_mean"] is None and summary["meets"]["training_gain"] is None


def test_the_metrics_are_read_from_the_experiment_commit(tmp_path) -> None:
    """An experiment ref as DVC writes it (refs/exps/<2>/<38>/<name>); the workspace's own
    metrics file is not what is read."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args],
                              cwd=tmp_path, check=True, capture_output=True, text=True).stdout

    git("init", "-q")
    metrics = tmp_path / bench_default.METRICS_FILE
    metrics.parent.mkdir(parents=True)
    metrics.write_text('{"map100": 0.1}')
    git("add", "-A")
    git("commit", "-qm", "workspace")
    metrics.write_text('{"map100": 0.7}')
    git("commit", "-qam", "experiment")
    experiment = git("rev-parse", "HEAD").strip()
    git("reset", "-q", "--hard", "HEAD~1")
    git("update-ref", "refs/exps/ab/cdef0123/bench-default-seed-7", experiment)
    assert bench_default.experiment_metrics(tmp_path, "bench-default-seed-7") == {"map100": 0.7}
    with pytest.raises(RuntimeError, match="0 experiments named 'bench-default-seed-11'"):
        bench_default.experiment_metrics(tmp_path, "bench-default-seed-11")


# ---------------------------------------------------------------- glr bench beyond


def test_beyond_runs_the_first_places_loss_in_every_phase_with_superglobal() -> None:
    from benchmarks import beyond

    phases = beyond.params_phases(Path("."))
    assert phases == ["p1", "p2"]  # the embedded default's
    assert beyond.overrides("authors", 7, phases) == ["synth.seed=7",
                                                      "retrieve.superglobal=true"]
    sub = beyond.overrides("subcenter", 7, phases)
    assert sub[:3] == ["synth.seed=7", "retrieve.superglobal=true", "model.arcface_s=45"]
    assert set(sub[3:]) == {f"train.phases.{p}.{key}" for p in phases for key in (
        "arcface_subcenters=3", "arcface_dynamic=[0.05,0.5]")}
    # the overrides give valid params
    params = yaml.safe_load(Path("params.yaml").read_text())
    params["model"]["arcface_s"] = 45
    for phase in phases:
        params["train"]["phases"][phase].update(arcface_subcenters=3,
                                                arcface_dynamic=[0.05, 0.5])
    plan = parse_params(params).plan(params["model"]["backbones"][0])
    assert [(p.settings.arcface_s, p.settings.arcface_subcenters, p.settings.arcface_dynamic)
            for p in plan] == [(45.0, 3, [0.05, 0.5])] * 2


def test_beyond_summary_means_and_differences() -> None:
    from benchmarks import beyond

    def run(loss, seed, plain, rerank, sg, both):
        return {"loss": loss, "seed": seed, "scores": {
            "plain": plain, "rerank": rerank, "superglobal": sg, "rerank_superglobal": both}}

    runs = [run("authors", 1, 0.50, 0.60, 0.55, 0.62), run("authors", 2, 0.40, 0.50, 0.41, 0.56),
            run("subcenter", 1, 0.52, 0.61, 0.50, 0.60), run("subcenter", 2, 0.44, 0.49, 0.45,
                                                               0.52)]
    summary = beyond.summarize(runs)
    assert summary["mean"]["authors"]["rerank"] == pytest.approx(0.55)
    assert summary["subcenter_minus_authors"]["plain"] == {
        "mean": pytest.approx(0.03), "min": pytest.approx(0.02), "max": pytest.approx(0.04)}
    assert summary["minus_lc_rerank"]["authors"]["rerank_superglobal"] == {
        "mean": pytest.approx(0.04), "min": pytest.approx(0.02), "max": pytest.approx(0.06)}
    assert summary["best"] == {"loss": "authors", "ranking": "rerank_superglobal",
                               "mean": pytest.approx(0.59)}
    with pytest.raises(ValueError, match="rankings missing from the metrics: superglobal"):
        beyond.scores({"map100": 0.5, "resnet18": {"plain": {"map100": 0.4},
                                                   "rerank": {"map100": 0.5},
                                                   "rerank_superglobal": {"map100": 0.5}}})
