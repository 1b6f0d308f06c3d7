"""Stage `evaluate`: mAP@100 (the official GLDv2 definition, glr.metric) for `dvc metrics`.

Scores every ranking `retrieve` wrote (each backbone before and after the rerank, the
ensemble) and each backbone's starting weights' plain search (the `baseline` stage) against
the GLDv2 solution file, so `dvc metrics diff` shows what each part adds.
It logs through DVCLive into one folder (default metrics/evaluate/):

    metrics.json       the final submission's map100, map100_public, map100_private,
                       precision1, precision5, precision10, precision100, recall100, queries,
                       contaminated; and per model and variant, e.g. resnet18.pretrained,
                       resnet18.plain and resnet18.rerank (ensemble.* with several
                       backbones): map100, map100_public, map100_private
    plots/custom/precision_at_k/<model>.json
                       mean precision@k (k from 1 to 100) of the model's rankings
                       (fields k, pretrained, plain, rerank, superglobal,
                       rerank_superglobal, null where absent: one chart per model)

Names are glr.metric's without the `@` (map@100 -> map100), short enough for `dvc exp show`.
`glr evaluate --solution S --submission SUB --out M.json` scores any Kaggle-format
submission on its own, with the same names.

Both check the submitted image ids against what the solution knows of the index, its
ground-truth ids, before scoring (`check_image_ids`): an upper-cased id, which can never match
the lower-case hex ids of GLDv2, is an error naming the file and an example (as an upper-cased
query id is: glr.metric does not know it); a submission none of whose image ids is a
ground-truth id of any query (also one with no image ids at all, e.g. only the header) is legal
and scored, mAP@100 0, but warned about, naming the file.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pyarrow.parquet as pq

from glr import baseline, files, metric
from glr.errors import UserError
from glr.metric import MetricError
from glr.params import Params

log = logging.getLogger(__name__)

CURVE_KS = (1, 2, 3, 5, 10, 20, 30, 50, 75, 100)


def read_ranking(path: Path) -> dict[str, list[str]]:
    table = pq.read_table(path, columns=["id", "images"]).to_pydict()
    return dict(zip(table["id"], table["images"], strict=True))


def check_image_ids(solution: dict[str, metric.Query], submission: dict[str, list[str]],
                    source: str | Path) -> None:
    """Refuse upper-cased image ids; warn when no submitted image id is a ground-truth id.

    With only the solution at hand, the known index ids are its queries' ground-truth ids (a
    subset of the index). An id that differs from its lower-case form can never match them
    when the solution's ids are lower case, as GLDv2's hex ids are: scoring it would quietly
    give 0, so it is a `MetricError` naming `source` and an example. A submission none of whose
    ids is a ground-truth id scores 0 too, yet may be legal (a header-only file, or a system
    that misses everything): a warning naming `source`.
    """
    truth = set().union(*(query.truth for query in solution.values()))
    lower_case = all(i == i.lower() for i in (*solution, *truth))
    submitted = [(query_id, image_id) for query_id, images in submission.items()
                 for image_id in images]
    if lower_case:
        upper = [(q, i) for q, i in submitted if i != i.lower()]
        if upper:
            query_id, image_id = upper[0]
            more = f" (and {len(upper) - 1} more)" if len(upper) > 1 else ""
            raise MetricError(
                f"{source}: image id {image_id!r} of query {query_id!r} has upper-case letters"
                f"{more}; the solution's ids are lower-case hex, so it can never match (write "
                "the ids as index.csv has them)")
    if not submitted:
        log.warning("%s: no image ids at all (%d query rows): every query scores 0",
                    source, len(submission))
    elif not any(image_id in truth for _, image_id in submitted):
        log.warning("%s: none of its %d image ids is a ground-truth image of any query in the "
                    "solution: every query scores 0. Are they ids of this index?", source,
                    len(submitted))


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


def short_names(result: dict) -> dict:
    """glr.metric's keys without the `@`: map@100 -> map100, precision@1 -> precision1."""
    return {key.replace("@", ""): value for key, value in result.items()}


def split_variant(name: str) -> tuple[str, str]:
    """`resnet18-rerank` -> (resnet18, rerank): the model (a backbone or `ensemble`) and the
    kind of ranking, as retrieve names its variants."""
    model, _, kind = name.rpartition("-")
    return model, kind


VARIANT_KEYS = ("map100", "map100_public", "map100_private")


def summarize(results: dict[str, dict], final: str, contaminated_flag: bool) -> dict:
    """metrics.json's content from the variants' glr.metric results (short names): the final
    variant's numbers, then each model's variants nested (`resnet18: {plain: {...}}`)."""
    summary = {key: value for key, value in short_names(results[final]).items()
               if not key.startswith("queries") and key != "answered"}
    summary["queries"] = results[final]["queries"]
    summary["contaminated"] = contaminated_flag
    for name in sorted(results):
        model, kind = split_variant(name)
        short = short_names(results[name])
        summary.setdefault(model, {})[kind] = {key: short[key] for key in VARIANT_KEYS}
    return summary


# the rankings per model: the starting weights' plain search (`baseline`), then what retrieve
# writes (the SuperGlobal ones with retrieve.superglobal)
KINDS = ("pretrained", "plain", "rerank", "superglobal", "rerank_superglobal")


def curve_rows(curves: dict[str, list[float]], model: str,
               ks: tuple[int, ...] = CURVE_KS) -> list[dict]:
    """A model's precision@k points: one row per k with a field per kind, null for a kind
    retrieve did not write (`retrieve.rerank: false`): dvc.yaml's chart names both fields,
    and `dvc plots show` fails on a missing field but leaves a null line out."""
    kinds = {kind: curves.get(f"{model}-{kind}") for kind in KINDS}
    return [{"k": k, **{kind: None if values is None else values[i]
                        for kind, values in kinds.items()}}
            for i, k in enumerate(ks)]


def rankings(retrieval_dir: Path, baseline_dir: Path | None, backbones: list[str]
             ) -> dict[str, Path]:
    """Every ranking to score by variant name: retrieve's, and with `baseline_dir` each
    backbone's starting-weights search as `<backbone>-pretrained`."""
    listing = json.loads((Path(retrieval_dir) / "variants.json").read_text())
    paths = {name: Path(retrieval_dir) / "topk" / f"{name}.parquet"
             for name in listing["variants"]}
    for backbone in backbones if baseline_dir is not None else []:
        path = baseline.ranking_path(baseline_dir, backbone)
        if not path.is_file():
            raise UserError(f"{path}: not found: the starting weights' search of {backbone}; "
                            f"run `dvc repro baseline@{backbone}` (or `glr baseline "
                            f"--backbone {backbone}`)")
        paths[f"{backbone}-pretrained"] = path
    return paths


def main(params: Params, retrieval_dir: Path, solution_csv: Path, live_dir: Path,
         baseline_dir: Path | None = None) -> dict:
    """Score every variant (with `baseline_dir`, the backbones' starting weights too); write
    metrics.json and the precision@k curves with DVCLive into `live_dir` (the folder is
    emptied first). Returns metrics.json's content."""
    from dvclive import Live  # imports DVC: only where the stage runs

    solution = metric.read_solution_csv(solution_csv)
    listing = json.loads((Path(retrieval_dir) / "variants.json").read_text())
    results, curves = {}, {}
    for name, ranking in rankings(retrieval_dir, baseline_dir, params.model.backbones).items():
        submission = read_ranking(ranking)
        check_image_ids(solution, submission, ranking)
        results[name] = metric.score(solution, submission)
        curves[name] = precision_curve(solution, submission)
        log.info("%-24s mAP@100 %.4f (public %.4f, private %.4f)", name,
                 results[name]["map@100"], results[name]["map@100_public"],
                 results[name]["map@100_private"])
    summary = summarize(results, listing["final"], contaminated(params))
    live_dir = Path(live_dir)
    shutil.rmtree(live_dir, ignore_errors=True)  # nothing of an earlier run stays
    # dvcyaml=False: dvc.yaml declares the outputs; save_dvc_exp=False: `dvc exp run` records
    # the experiment. No step: metrics.json holds the numbers only.
    live = Live(str(live_dir), dvcyaml=False, save_dvc_exp=False)
    for key, value in summary.items():
        if isinstance(value, dict):
            for kind, numbers in value.items():
                for name, number in numbers.items():
                    live.log_metric(f"{key}/{kind}/{name}", number, plot=False)
        else:
            live.log_metric(key, value, plot=False)
    for model in sorted({split_variant(name)[0] for name in curves}):
        # the chart's settings are dvc.yaml's (dvcyaml=False): these only name the fields
        live.log_plot(f"precision_at_k/{model}", curve_rows(curves, model), x="k",
                      y=list(KINDS))
    live.end()
    log.info("final (%s): mAP@100 %.4f%s", listing["final"], summary["map100"],
             " — CONTAMINATED: a phase trained on `all`, which holds the validation queries"
             if summary["contaminated"] else "")
    return summary


def standalone(solution_csv: Path, submission_csv: Path, out: Path | None) -> dict:
    """Score one Kaggle-format submission file; print and optionally write the metrics."""
    solution = metric.read_solution_csv(solution_csv)
    submission = metric.read_submission_csv(submission_csv)
    check_image_ids(solution, submission, submission_csv)
    result = short_names(metric.score(solution, submission))
    text = json.dumps(result, indent=2) + "\n"
    if out is not None:
        files.write_text(Path(out), text)
    print(text, end="")
    return result


def headline(metrics: dict, source: str = "metrics/evaluate/metrics.json") -> str:
    """The result in a few lines: mAP@100 (all, public, private) of each backbone with its
    starting weights ("no training", when evaluate had the baseline stage's ranking), then
    with and without the rerank (and SuperGlobal's variants when retrieve wrote them), the
    ensemble's
    only when there are several backbones, then the final submission's. `metrics` is what
    `main` writes (`source`, named in the first line)."""
    models = {key: value for key, value in metrics.items() if isinstance(value, dict)}
    backbones = sorted(set(models) - {"ensemble"})
    rows = []
    for backbone in [*backbones, *(["ensemble"] if len(backbones) > 1 else [])]:
        for kind, label in (("pretrained", "no training"), ("plain", "plain search"),
                            ("rerank", "+ rerank"),
                            ("superglobal", "SuperGlobal"), ("rerank_superglobal", "rerank + SG")):
            result = models.get(backbone, {}).get(kind)
            if result is not None:
                rows.append((backbone, label, result))
    width = max([len(b) for b, _, _ in rows] + [8])
    lines = [f"mAP@100 on {metrics.get('queries', '?')} validation queries ({source})",
             f"{'':{width}}  {'':12}  {'all':>6}  {'public':>6}  {'private':>7}"]
    for backbone, label, result in rows:
        lines.append(f"{backbone:{width}}  {label:12}  {result['map100']:6.4f}  "
                     f"{result['map100_public']:6.4f}  {result['map100_private']:7.4f}")
    if "map100" in metrics:
        flag = "  (contaminated: validation queries were trained on)" if metrics.get(
            "contaminated") else ""
        lines.append(f"submission: mAP@100 {metrics['map100']:.4f} (public "
                     f"{metrics['map100_public']:.4f}, private "
                     f"{metrics['map100_private']:.4f}){flag}")
    return "\n".join(lines)
