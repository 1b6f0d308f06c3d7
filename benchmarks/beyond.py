"""`glr bench beyond`: the 1st place's loss and SuperGlobal against the authors', on the
embedded default over several mini-GLDv2 draws.

For each synth seed (2021, 7 and 11 by default) the whole pipeline runs twice as DVC
experiments of this repository (`dvc exp run --temp --force`, as `glr bench default`), both
with `retrieve.superglobal: true`:

- `bench-beyond-authors-<seed>`: the embedded default's loss (the authors' ArcFace, s 30,
  m 0.3, one center per class);
- `bench-beyond-subcenter-<seed>`: the 1st place's (Henkel, GLR 2021): s 45, 3 sub-centers,
  dynamic margins [0.05, 0.5] in every phase (`LOSSES`).

Each run scores four rankings of its backbone: plain, the Landmark-Country rerank,
SuperGlobal, and both (`rerank_superglobal`). The summary holds, per loss and ranking, the
mean mAP@100 over the seeds and each seed's value, and the differences that answer the
questions: the 1st place's loss against the authors' (per ranking), and SuperGlobal and both
against the Landmark-Country rerank (per loss), each with its mean and the seeds' minimum and
maximum. Written to metrics/bench/beyond.json; six pipeline runs, about 30 minutes on a 2-core
CPU.
"""

from __future__ import annotations

import json
import logging
import statistics
from collections.abc import Sequence
from pathlib import Path

import yaml

from benchmarks.default import SEEDS, experiment_metrics, run_experiment

log = logging.getLogger(__name__)

RANKINGS = ("plain", "rerank", "superglobal", "rerank_superglobal")
# each loss: model params, and the params of every phase, in DVC's -S grammar
LOSSES = {
    "authors": {"model": [], "phase": []},
    "subcenter": {"model": ["arcface_s=45"],
                  "phase": ["arcface_subcenters=3", "arcface_dynamic=[0.05,0.5]"]},
}
COMMON = ["retrieve.superglobal=true"]


def experiment_name(loss: str, seed: int) -> str:
    return f"bench-beyond-{loss}-{seed}"


def overrides(loss: str, seed: int, phases: Sequence[str]) -> list[str]:
    """The experiment's -S values: the seed, SuperGlobal on, and the loss in every phase."""
    return [f"synth.seed={seed}", *COMMON,
            *(f"model.{value}" for value in LOSSES[loss]["model"]),
            *(f"train.phases.{phase}.{value}" for phase in phases
              for value in LOSSES[loss]["phase"])]


def params_phases(repo: Path) -> list[str]:
    """The phases of the repository's params.yaml (train.phases), in order."""
    return list(yaml.safe_load((Path(repo) / "params.yaml").read_text())["train"]["phases"])


def scores(metrics: dict) -> dict[str, float]:
    """mAP@100 of each ranking of the (single) backbone, from the evaluate stage's file."""
    models = {key: value for key, value in metrics.items() if isinstance(value, dict)}
    if len(models) != 1:
        raise ValueError(f"expected one backbone in the metrics, got {sorted(models)}")
    (rankings,) = models.values()
    missing = [name for name in RANKINGS if name not in rankings]
    if missing:
        raise ValueError(f"rankings missing from the metrics: {', '.join(missing)} "
                         "(retrieve.superglobal must be on)")
    return {name: rankings[name]["map100"] for name in RANKINGS}


def _spread(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "min": min(values), "max": max(values)}


def summarize(runs: Sequence[dict]) -> dict:
    """Means per loss and ranking, and the differences asked for, over the seeds' runs (each:
    loss, seed, scores)."""
    table: dict[str, dict[str, dict[int, float]]] = {}
    for run in runs:
        for name, value in run["scores"].items():
            table.setdefault(run["loss"], {}).setdefault(name, {})[run["seed"]] = value
    means = {loss: {name: statistics.fmean(by_seed.values()) for name, by_seed in ranks.items()}
             for loss, ranks in table.items()}
    seeds = sorted({run["seed"] for run in runs})
    summary: dict = {"mean": means, "per_seed": table}
    if {"authors", "subcenter"} <= set(table):
        summary["subcenter_minus_authors"] = {
            name: _spread([table["subcenter"][name][s] - table["authors"][name][s]
                           for s in seeds]) for name in RANKINGS}
    summary["minus_lc_rerank"] = {
        loss: {name: _spread([ranks[name][s] - ranks["rerank"][s] for s in seeds])
               for name in ("superglobal", "rerank_superglobal")}
        for loss, ranks in table.items()}
    best = max(((loss, name) for loss in means for name in RANKINGS),
               key=lambda pair: means[pair[0]][pair[1]])
    summary["best"] = {"loss": best[0], "ranking": best[1], "mean": means[best[0]][best[1]]}
    return summary


def main(out: Path, seeds: Sequence[int] = SEEDS, repo: Path = Path("."),
         logs: Path = Path("metrics/bench/beyond-logs"),
         losses: Sequence[str] = tuple(LOSSES)) -> dict:
    from benchmarks.extract import machine_info

    repo = Path(repo).resolve()
    phases = params_phases(repo)
    runs = []
    for seed in seeds:
        for loss in losses:
            name = experiment_name(loss, seed)
            logfile = Path(logs) / f"{name}.log"
            log.info("%s: dvc exp run (log %s)", name, logfile)
            seconds = run_experiment(repo, name, overrides(loss, seed, phases), logfile)
            run = {"loss": loss, "seed": seed, "experiment": name, "seconds": round(seconds, 1),
                   "scores": scores(experiment_metrics(repo, name))}
            log.info("%s: %s in %.0f s", name, ", ".join(
                f"{key} {value:.4f}" for key, value in run["scores"].items()), seconds)
            runs.append(run)
    result = {"seeds": list(seeds),
              "losses": {loss: overrides(loss, seeds[0], phases)[1 + len(COMMON):]
                         for loss in losses},
              "common": COMMON, "runs": runs, **summarize(runs), "machine": machine_info()}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    for loss, ranks in result["mean"].items():
        log.info("%s loss, mean mAP@100: %s", loss,
                 ", ".join(f"{name} {value:.4f}" for name, value in ranks.items()))
    log.info("best: %s loss, %s (%.4f); written to %s", result["best"]["loss"],
             result["best"]["ranking"], result["best"]["mean"], out)
    return result
