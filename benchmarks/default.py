"""`glr bench default`: does the embedded default learn, whichever mini-GLDv2 is drawn?

For each synth seed (2021, 7 and 11 by default) the whole pipeline runs as a DVC experiment
of this repository: `dvc exp run --temp --force --name bench-default-seed-<seed> -S
synth.seed=<seed>`, with this interpreter's `glr` first on PATH. DVC runs it in a temporary
copy of the workspace (HEAD plus uncommitted changes), every stage afresh (`--force`: no
stage is restored from the run cache, so the wall time is the pipeline's), and keeps it as an
experiment: `dvc exp show` lists the seeds' runs beside the workspace. An earlier experiment
of the same name is replaced. Each run's wall time and final metrics (read from its
experiment commit) are kept; the summary is the mean and spread (max − min) of plain and
reranked mAP@100 over the seeds, checked against issue 19's targets:

- plain mAP@100 ≥ 0.50 on average, the rerank adding ≥ 0.10 on average;
- a spread of plain and reranked mAP@100 of at most 0.08 over the seeds;
- training adding ≥ 0.25 on average over the starting weights' own plain search
  (`<backbone>.pretrained.map100`, the baseline stage);
- each seed's pipeline in at most 10 minutes on the machine that ran it.

Results go to metrics/bench/default.json, each run's log to LOGS/seed-<seed>.log. It takes
three pipeline runs: about 15 minutes on a 2-core CPU. The experiments' outputs stay in the
DVC cache until `dvc exp remove` and `dvc gc`.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

log = logging.getLogger(__name__)

SEEDS = (2021, 7, 11)
METRICS_FILE = "metrics/evaluate/metrics.json"  # the evaluate stage's, in each project
TARGETS = {"plain_mean_min": 0.50, "rerank_gain_mean_min": 0.10, "spread_max": 0.08,
           "training_gain_mean_min": 0.25, "seconds_max": 600.0}


def experiment_name(seed: int) -> str:
    return f"bench-default-seed-{seed}"


def experiment_command(dvc: str, name: str, overrides: Sequence[str]) -> list[str]:
    """The pipeline with the params `overrides` (`key=value`, DVC's -S grammar), as experiment
    `name` in a temporary directory, every stage run (none restored from the run cache)."""
    return [dvc, "exp", "run", "--temp", "--force", "--name", name,
            *(part for override in overrides for part in ("--set-param", override))]


def experiment_metrics(repo: Path, name: str) -> dict:
    """The evaluate stage's metrics.json in the commit of experiment `name` (DVC keeps each
    experiment under refs/exps/…/<name>; metrics files are in git, `cache: false`)."""
    refs = subprocess.run(["git", "for-each-ref", "--format=%(refname)", "refs/exps"],
                          cwd=repo, check=True, capture_output=True, text=True).stdout.split()
    found = [ref for ref in refs if ref.rsplit("/", 1)[-1] == name]
    if len(found) != 1:
        raise RuntimeError(f"{repo}: {len(found)} experiments named {name!r} (refs/exps)")
    text = subprocess.run(["git", "show", f"{found[0]}:{METRICS_FILE}"], cwd=repo, check=True,
                          capture_output=True, text=True).stdout
    return json.loads(text)


def final_scores(metrics: dict) -> dict:
    """Plain and reranked mAP@100 of the final model (the ensemble with several backbones, the
    one backbone otherwise) from the evaluate stage's metrics.json, and its starting weights'
    (`pretrained`; None for an ensemble, which has none of its own)."""
    models = {key: value for key, value in metrics.items() if isinstance(value, dict)}
    name = "ensemble" if "ensemble" in models else sorted(models)[0]
    plain, rerank = models[name]["plain"], models[name]["rerank"]
    start = models[name].get("pretrained")
    return {"model": name, "plain": plain["map100"], "rerank": rerank["map100"],
            "pretrained": None if start is None else start["map100"],
            "plain_public": plain["map100_public"], "plain_private": plain["map100_private"],
            "rerank_public": rerank["map100_public"],
            "rerank_private": rerank["map100_private"]}


def summarize(runs: Sequence[dict]) -> dict:
    """Mean, spread and target checks over the seeds' runs (each: plain, rerank, seconds and
    pretrained, the starting weights' plain mAP@100 or None). Training's gain is the mean of
    plain − pretrained over the runs that have one; with none, it and its check are None."""
    plain = [run["plain"] for run in runs]
    rerank = [run["rerank"] for run in runs]
    gain = [r - p for p, r in zip(plain, rerank, strict=True)]
    trained = [run["plain"] - run["pretrained"] for run in runs
               if run.get("pretrained") is not None]
    summary = {
        "plain_mean": statistics.fmean(plain),
        "rerank_mean": statistics.fmean(rerank),
        "rerank_gain_mean": statistics.fmean(gain),
        "training_gain_mean": statistics.fmean(trained) if trained else None,
        "plain_spread": max(plain) - min(plain),
        "rerank_spread": max(rerank) - min(rerank),
        "seconds_max": max(run["seconds"] for run in runs),
    }
    summary["meets"] = {
        "plain_mean": summary["plain_mean"] >= TARGETS["plain_mean_min"],
        "rerank_gain": summary["rerank_gain_mean"] >= TARGETS["rerank_gain_mean_min"],
        "spread": max(summary["plain_spread"], summary["rerank_spread"])
        <= TARGETS["spread_max"],
        "training_gain": None if not trained
        else summary["training_gain_mean"] >= TARGETS["training_gain_mean_min"],
        "time": summary["seconds_max"] <= TARGETS["seconds_max"],
    }
    return summary


def run_experiment(repo: Path, name: str, overrides: Sequence[str], logfile: Path) -> float:
    """Experiment `name` with `overrides` in `repo` (an older one of its name removed first),
    this interpreter's scripts first on PATH; its wall seconds. The output goes to `logfile`;
    a failed run raises with the log's last lines."""
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}"
                                f"{os.environ.get('PATH', '')}")
    logfile.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([_dvc(), "exp", "remove", name], cwd=repo, env=env,
                   capture_output=True)  # none yet: nothing to remove
    start = time.perf_counter()
    with logfile.open("w") as out:
        done = subprocess.run(experiment_command(_dvc(), name, overrides), cwd=repo, env=env,
                              stdout=out, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        tail = "\n".join(logfile.read_text(errors="replace").splitlines()[-20:])
        raise RuntimeError(f"dvc exp run failed for {name} (log {logfile}):\n{tail}")
    return seconds


def _dvc() -> str:
    return str(Path(sys.executable).parent / "dvc")


def main(out: Path, seeds: Sequence[int] = SEEDS, repo: Path = Path("."),
         logs: Path = Path("metrics/bench/default-logs")) -> dict:
    from benchmarks.extract import machine_info

    repo = Path(repo).resolve()
    runs = []
    for number, seed in enumerate(seeds, 1):
        logfile = Path(logs) / f"seed-{seed}.log"
        log.info("seed %d (%d/%d): experiment %s, log %s", seed, number, len(seeds),
                 experiment_name(seed), logfile)
        seconds = run_experiment(repo, experiment_name(seed), [f"synth.seed={seed}"], logfile)
        metrics = experiment_metrics(repo, experiment_name(seed))
        run = {"seed": seed, "experiment": experiment_name(seed), "seconds": round(seconds, 1),
               **final_scores(metrics)}
        log.info("seed %d: plain %.4f, rerank %.4f mAP@100 (starting weights %s) in %.0f s",
                 seed, run["plain"], run["rerank"],
                 "-" if run["pretrained"] is None else f"{run['pretrained']:.4f}", seconds)
        runs.append(run)
    result = {"seeds": list(seeds), "runs": runs, **summarize(runs), "targets": TARGETS,
              "machine": machine_info()}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    log.info("mean plain %.4f, rerank %.4f (gain %+.4f, training's %s); spread %.4f / %.4f; "
             "slowest %.0f s; written to %s", result["plain_mean"], result["rerank_mean"],
             result["rerank_gain_mean"], "-" if result["training_gain_mean"] is None
             else f"{result['training_gain_mean']:+.4f}", result["plain_spread"],
             result["rerank_spread"], result["seconds_max"], out)
    return result
