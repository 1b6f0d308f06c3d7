"""Stages evaluate and visualize: what they log through DVCLive, and `glr report`'s reading."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from glr import evaluate, metric, visualize
from glr.params import parse_params


@pytest.fixture(autouse=True)
def _outside_the_repository(tmp_path, monkeypatch):
    """DVCLive looks for a DVC repository from the working folder: run from a scratch one."""
    monkeypatch.chdir(tmp_path)


def write_retrieval(folder: Path, rankings: dict[str, dict[str, list[str]]], final: str) -> Path:
    """A retrieve output: topk/<variant>.parquet (id, images) and variants.json."""
    (folder / "topk").mkdir(parents=True)
    for name, ranking in rankings.items():
        pq.write_table(pa.table({"id": list(ranking), "images": list(ranking.values())}),
                       folder / "topk" / f"{name}.parquet")
    (folder / "variants.json").write_text(json.dumps({"final": final,
                                                      "variants": sorted(rankings)}))
    return folder


def files_of(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def test_evaluate_logs_short_names_per_variant_and_one_precision_chart_per_model(tmp_path):
    solution = tmp_path / "solution.csv"
    solution.write_text("id,images,Usage\nq1,a,Public\nq2,b c,Private\nq3,None,Ignored\n")
    retrieval = write_retrieval(tmp_path / "retrieval", {
        "resnet18-plain": {"q1": ["x", "a"], "q2": ["b", "y", "c"]},
        "resnet18-rerank": {"q1": ["a"], "q2": ["b", "c"]},
    }, final="resnet18-rerank")
    live = tmp_path / "metrics/evaluate"
    (live / "plots/metrics").mkdir(parents=True)
    (live / "plots/metrics/stale.tsv").write_text("step\tstale\n0\t1\n")  # an earlier run's
    summary = evaluate.main(parse_params({}), retrieval, solution, live)

    # plain: q1 hits at rank 2 (AP 1/2), q2 at ranks 1 and 3 (AP (1 + 2/3)/2 = 5/6)
    plain = {"map100": pytest.approx((1 / 2 + 5 / 6) / 2), "map100_public": 0.5,
             "map100_private": pytest.approx(5 / 6)}
    assert json.loads((live / "metrics.json").read_text()) == summary == {
        "map100": 1.0, "map100_public": 1.0, "map100_private": 1.0,
        "precision1": 1.0, "precision5": pytest.approx(0.3), "precision10": pytest.approx(0.15),
        "precision100": pytest.approx(0.015), "recall100": 1.0, "queries": 2,
        "contaminated": False,
        "resnet18": {"plain": plain,
                     "rerank": {"map100": 1.0, "map100_public": 1.0, "map100_private": 1.0}},
    }
    assert files_of(live) == ["metrics.json", "plots/custom/precision_at_k/resnet18.json"]
    curve = json.loads((live / "plots/custom/precision_at_k/resnet18.json").read_text())
    assert [row["k"] for row in curve] == list(evaluate.CURVE_KS)
    assert curve[:3] == [{"k": 1, "plain": 0.5, "rerank": 1.0},
                         {"k": 2, "plain": 0.5, "rerank": 0.75},
                         {"k": 3, "plain": 0.5, "rerank": pytest.approx(0.5)}]

    headline = evaluate.headline(summary).splitlines()
    assert headline[2].split() == ["resnet18", "plain", "search", "0.6667", "0.5000", "0.8333"]
    assert headline[-1] == "submission: mAP@100 1.0000 (public 1.0000, private 1.0000)"


def test_several_backbones_nest_per_model_and_plot_one_chart_per_model():
    result = {"map@100": 0.5, "map@100_public": 0.25, "map@100_private": 0.75,
              "precision@1": 0.5, "recall@100": 0.9, "queries": 4, "queries_public": 2,
              "queries_private": 2, "answered": 4}
    names = [f"{model}-{kind}" for model in ("resnet50", "resnest101e", "ensemble")
             for kind in ("plain", "rerank")]
    summary = evaluate.summarize(dict.fromkeys(names, result), "ensemble-rerank", True)
    assert list(summary) == ["map100", "map100_public", "map100_private", "precision1",
                             "recall100", "queries", "contaminated", "ensemble", "resnest101e",
                             "resnet50"]
    assert summary["resnest101e"]["rerank"] == {"map100": 0.5, "map100_public": 0.25,
                                                "map100_private": 0.75}
    curves = {name: [0.1 * i, 0.2 * i] for i, name in enumerate(names)}
    assert evaluate.curve_rows(curves, "resnest101e", ks=(1, 5)) == [
        {"k": 1, "plain": 0.2, "rerank": pytest.approx(0.3)},
        {"k": 5, "plain": 0.4, "rerank": pytest.approx(0.6)}]
    assert evaluate.split_variant("resnet50.a1_in1k-rerank") == ("resnet50.a1_in1k", "rerank")
    # retrieve.rerank: false: no rerank rankings, a null field (dvc.yaml's chart names both)
    assert evaluate.curve_rows({"resnet50-plain": [0.5, 0.25]}, "resnet50", ks=(1, 5)) == [
        {"k": 1, "plain": 0.5, "rerank": None}, {"k": 5, "plain": 0.25, "rerank": None}]


def test_standalone_scores_a_submission_with_the_same_short_names(tmp_path, capsys):
    solution = tmp_path / "solution.csv"
    solution.write_text("id,images,Usage\nq1,a,Public\nq2,b,Private\n")
    submission = tmp_path / "submission.csv"
    submission.write_text("id,images\nq1,a\nq2,x b\n")
    result = evaluate.standalone(solution, submission, tmp_path / "m.json")
    assert result["map100"] == 0.75 and result["map100_private"] == 0.5
    assert {"precision1", "precision5", "precision10", "precision100", "recall100",
            "queries_public", "answered"} <= set(result)
    assert json.loads((tmp_path / "m.json").read_text()) == result
    assert json.loads(capsys.readouterr().out) == result


def test_visualize_logs_the_picture_with_dvclive(small_pipeline, small_shards, tmp_path):
    params, _ = small_pipeline
    solution_csv = Path(params.data.root) / "test/retrieval_solution_v2.1.csv"
    solution = metric.read_solution_csv(solution_csv)
    scored = sorted(q for q, row in solution.items() if row.scored)
    # each query's own ground truth first, then another query's: green, then red frames
    ranking = {q: sorted(solution[q].truth) + sorted(solution[scored[i - 1]].truth)
               for i, q in enumerate(scored)}
    retrieval = write_retrieval(tmp_path / "retrieval", {"resnet18-rerank": ranking},
                                final="resnet18-rerank")
    live = tmp_path / "metrics/visualize"
    path = visualize.main(retrieval, small_shards, solution_csv, live, queries=3, top=4)
    assert path == live / "plots/images/retrieval.png"
    assert files_of(live) == ["plots/images/retrieval.png"]  # no empty metrics.json
    from PIL import Image

    with Image.open(path) as picture:
        width = visualize.TILE + 2 * visualize.BORDER
        assert picture.size == (5 * width + 8, 3 * (width + visualize.STRIP))
