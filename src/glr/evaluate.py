"""Stage `evaluate`: mAP@100 (the official GLDv2 definition, glr.metric) for `dvc metrics`.

Scores every ranking `retrieve` wrote (each backbone before and after the rerank, the
ensemble) against the GLDv2 solution file, so `dvc metrics diff` shows what each part adds:

    metrics/evaluate.json          final map@100 (+ public/private), precision@k, recall@100,
                                   and per variant: map@100, public, private
    metrics/precision_at_k.tsv     mean precision@k, k = 1..100, one column per variant
                                   (`dvc plots show`)

`glr evaluate --solution S --submission SUB --out M.json` scores any Kaggle-format
submission on its own.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pyarrow.parquet as pq

from glr import metric
from glr.params import Params

log = logging.getLogger(__name__)

CURVE_KS = (1, 2, 3, 5, 10, 20, 30, 50, 75, 100)


def read_ranking(path: Path) -> dict[str, list[str]]:
    table = pq.read_table(path, columns=["id", "images"]).to_pydict()
    return dict(zip(table["id"], table["images"], strict=True))


def precision_curve(solution: dict[str, metric.Query], submission: dict[str, list[str]],
                    ks: tuple[int, ...] = CURVE_KS) -> list[float]:
    """Mean precision@k over the scored queries, for each k."""
    scored = [q for q, row in solution.items() if row.scored]
    return [sum(metric.precision_at(submission.get(q, []), solution[q].truth, k)
                for q in scored) / max(1, len(scored)) for k in ks]


def contaminated(params: Params) -> bool:
    """True when the validation queries leak into the result: without the holdout they are in
    `all`, so a phase trained on `all` has seen them. (They are never references: the rerank
    cannot tag a query with its own label.)"""
    return (not params.prepare.holdout_val_queries
            and any(phase.settings.list == "all" for backbone in params.model.backbones
                    for phase in params.plan(backbone)))


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    tmp.replace(path)


def main(params: Params, retrieval_dir: Path, solution_csv: Path, metrics_path: Path,
         curve_path: Path) -> dict:
    solution = metric.read_solution_csv(solution_csv)
    listing = json.loads((Path(retrieval_dir) / "variants.json").read_text())
    results, curves = {}, {}
    for name in listing["variants"]:
        submission = read_ranking(Path(retrieval_dir) / "topk" / f"{name}.parquet")
        results[name] = metric.score(solution, submission)
        curves[name] = precision_curve(solution, submission)
        log.info("%-24s mAP@100 %.4f (public %.4f, private %.4f)", name,
                 results[name]["map@100"], results[name]["map@100_public"],
                 results[name]["map@100_private"])
    final = results[listing["final"]]
    summary = {key: final[key] for key in final if not key.startswith("queries")
               and key != "answered"}
    summary["queries"] = final["queries"]
    summary["contaminated"] = contaminated(params)
    summary["variants"] = {name: {key: result[key] for key in
                                  ("map@100", "map@100_public", "map@100_private")}
                           for name, result in results.items()}
    _write(Path(metrics_path), json.dumps(summary, indent=2) + "\n")
    names = sorted(curves)
    lines = ["\t".join(["k", *names])]
    lines += ["\t".join([str(k), *(f"{curves[n][i]:.6f}" for n in names)])
              for i, k in enumerate(CURVE_KS)]
    _write(Path(curve_path), "\n".join(lines) + "\n")
    log.info("final (%s): mAP@100 %.4f%s", listing["final"], summary["map@100"],
             " — CONTAMINATED: a phase trained on `all`, which holds the validation queries"
             if summary["contaminated"] else "")
    return summary


def standalone(solution_csv: Path, submission_csv: Path, out: Path | None) -> dict:
    """Score one Kaggle-format submission file; print and optionally write the metrics."""
    result = metric.evaluate_files(solution_csv, submission_csv)
    text = json.dumps(result, indent=2) + "\n"
    if out is not None:
        _write(Path(out), text)
    print(text, end="")
    return result


def headline(metrics: dict) -> str:
    """The result in a few lines: mAP@100 (all, public, private) of each backbone with and
    without the rerank, the ensemble's only when there are several backbones, then the final
    submission's. `metrics` is what `main` writes (metrics/evaluate.json)."""
    variants = metrics.get("variants", {})
    backbones = sorted({name.rsplit("-", 1)[0] for name in variants} - {"ensemble"})
    rows = []
    for backbone in [*backbones, *(["ensemble"] if len(backbones) > 1 else [])]:
        for kind, label in (("plain", "plain search"), ("rerank", "+ rerank")):
            result = variants.get(f"{backbone}-{kind}")
            if result is not None:
                rows.append((backbone, label, result))
    width = max([len(b) for b, _, _ in rows] + [8])
    lines = [f"mAP@100 on {metrics.get('queries', '?')} validation queries "
             "(metrics/evaluate.json)",
             f"{'':{width}}  {'':12}  {'all':>6}  {'public':>6}  {'private':>7}"]
    for backbone, label, result in rows:
        lines.append(f"{backbone:{width}}  {label:12}  {result['map@100']:6.4f}  "
                     f"{result['map@100_public']:6.4f}  {result['map@100_private']:7.4f}")
    if "map@100" in metrics:
        flag = "  (contaminated: validation queries were trained on)" if metrics.get(
            "contaminated") else ""
        lines.append(f"submission: mAP@100 {metrics['map@100']:.4f} (public "
                     f"{metrics['map@100_public']:.4f}, private "
                     f"{metrics['map@100_private']:.4f}){flag}")
    return "\n".join(lines)
