"""`glr bench default`: does the embedded default learn, whichever mini-GLDv2 is drawn?

For each synth seed (2021, 7 and 11 by default) the whole pipeline runs in a folder of its
own, exactly as `make repro` runs it: this repository's dvc.yaml, params.yaml (with
`synth.seed` set) and src/ (the stages' code dependencies) in a fresh DVC project
(`dvc init --no-scm`), then `dvc repro` with this interpreter's `glr` first on PATH. Each
run's wall time and final metrics are kept; the summary is the mean and spread (max − min)
of plain and reranked mAP@100 over the seeds, checked against the issue's targets:

- plain mAP@100 ≥ 0.40 on average, the rerank adding ≥ 0.05 on average;
- a spread of plain and reranked mAP@100 of at most 0.08 over the seeds;
- each seed's pipeline in at most 10 minutes on the machine that ran it.

Results go to metrics/bench/default.json (and each run's log beside its folder while it
runs). It takes three pipeline runs: about half an hour on a 2-core CPU.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import yaml

log = logging.getLogger(__name__)

SEEDS = (2021, 7, 11)
METRICS_FILE = "metrics/evaluate/metrics.json"  # the evaluate stage's, in each project
TARGETS = {"plain_mean_min": 0.40, "rerank_gain_mean_min": 0.05, "spread_max": 0.08,
           "seconds_max": 600.0}
# What a pipeline run needs from the repository: the stage definitions, their parameters and
# the code the stages depend on (the stages run the installed `glr`).
PROJECT_FILES = ("dvc.yaml", "params.yaml")
PROJECT_DIRS = ("src",)


def seeded_params(params_text: str, seed: int) -> str:
    """params.yaml's text with `synth.seed` set to `seed` (comments are not kept)."""
    params = yaml.safe_load(params_text)
    params["synth"]["seed"] = int(seed)
    return yaml.safe_dump(params, sort_keys=False)


def final_scores(metrics: dict) -> dict:
    """Plain and reranked mAP@100 of the final model (the ensemble with several backbones, the
    one backbone otherwise) from the evaluate stage's metrics.json."""
    models = {key: value for key, value in metrics.items() if isinstance(value, dict)}
    name = "ensemble" if "ensemble" in models else sorted(models)[0]
    plain, rerank = models[name]["plain"], models[name]["rerank"]
    return {"model": name, "plain": plain["map100"], "rerank": rerank["map100"],
            "plain_public": plain["map100_public"], "plain_private": plain["map100_private"],
            "rerank_public": rerank["map100_public"],
            "rerank_private": rerank["map100_private"]}


def summarize(runs: Sequence[dict]) -> dict:
    """Mean, spread and target checks over the seeds' runs (each: plain, rerank, seconds)."""
    plain = [run["plain"] for run in runs]
    rerank = [run["rerank"] for run in runs]
    gain = [r - p for p, r in zip(plain, rerank, strict=True)]
    summary = {
        "plain_mean": statistics.fmean(plain),
        "rerank_mean": statistics.fmean(rerank),
        "rerank_gain_mean": statistics.fmean(gain),
        "plain_spread": max(plain) - min(plain),
        "rerank_spread": max(rerank) - min(rerank),
        "seconds_max": max(run["seconds"] for run in runs),
    }
    summary["meets"] = {
        "plain_mean": summary["plain_mean"] >= TARGETS["plain_mean_min"],
        "rerank_gain": summary["rerank_gain_mean"] >= TARGETS["rerank_gain_mean_min"],
        "spread": max(summary["plain_spread"], summary["rerank_spread"])
        <= TARGETS["spread_max"],
        "time": summary["seconds_max"] <= TARGETS["seconds_max"],
    }
    return summary


def make_project(repo: Path, work: Path, seed: int) -> Path:
    """A fresh DVC project under `work` with the repository's pipeline and synth.seed=seed."""
    project = work / f"seed-{seed}"
    if project.exists():
        shutil.rmtree(project)
    project.mkdir(parents=True)
    for name in PROJECT_FILES:
        shutil.copy2(repo / name, project / name)
    for name in PROJECT_DIRS:
        shutil.copytree(repo / name, project / name,
                        ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    (project / "params.yaml").write_text(seeded_params((repo / "params.yaml").read_text(),
                                                       seed))
    subprocess.run([_dvc(), "init", "--no-scm", "--quiet"], cwd=project, check=True)
    return project


def run_pipeline(project: Path) -> float:
    """`dvc repro` in `project`, this interpreter's scripts first on PATH; its wall seconds.
    The output goes to `<project>.log`; a failed run raises with the log's last lines."""
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}"
                                f"{os.environ.get('PATH', '')}")
    logfile = project.with_suffix(".log")
    start = time.perf_counter()
    with logfile.open("w") as out:
        done = subprocess.run([_dvc(), "repro"], cwd=project, env=env, stdout=out,
                              stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        tail = "\n".join(logfile.read_text(errors="replace").splitlines()[-20:])
        raise RuntimeError(f"dvc repro failed in {project} (log {logfile}):\n{tail}")
    return seconds


def _dvc() -> str:
    return str(Path(sys.executable).parent / "dvc")


def main(out: Path, seeds: Sequence[int] = SEEDS, repo: Path = Path("."),
         workdir: Path | None = None, keep: bool = False) -> dict:
    from glr.bench.extract import machine_info
    repo = Path(repo).resolve()
    work = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="glr-bench-default-"))
    runs = []
    try:
        for number, seed in enumerate(seeds, 1):
            log.info("seed %d (%d/%d): dvc repro in %s", seed, number, len(seeds),
                     work / f"seed-{seed}")
            project = make_project(repo, work, seed)
            seconds = run_pipeline(project)
            metrics = json.loads((project / METRICS_FILE).read_text())
            run = {"seed": seed, "seconds": round(seconds, 1), **final_scores(metrics)}
            log.info("seed %d: plain %.4f, rerank %.4f mAP@100 in %.0f s", seed, run["plain"],
                     run["rerank"], seconds)
            runs.append(run)
    finally:
        if not keep and workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    result = {"seeds": list(seeds), "runs": runs, **summarize(runs), "targets": TARGETS,
              "machine": machine_info()}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    log.info("mean plain %.4f, rerank %.4f (gain %+.4f); spread %.4f / %.4f; slowest %.0f s; "
             "written to %s", result["plain_mean"], result["rerank_mean"],
             result["rerank_gain_mean"], result["plain_spread"], result["rerank_spread"],
             result["seconds_max"], out)
    return result
