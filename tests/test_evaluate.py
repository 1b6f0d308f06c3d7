"""Stages evaluate and visualize: what they log through DVCLive, and `glr report`'s reading."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from glr import baseline, evaluate, metric, visualize
from glr.errors import UserError
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
    # no baseline folder given, retrieve.superglobal off
    none = {"pretrained": None, "superglobal": None, "rerank_superglobal": None}
    assert curve[:3] == [{"k": 1, "plain": 0.5, "rerank": 1.0, **none},
                         {"k": 2, "plain": 0.5, "rerank": 0.75, **none},
                         {"k": 3, "plain": 0.5, "rerank": pytest.approx(0.5), **none}]

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
    none = {"pretrained": None, "superglobal": None, "rerank_superglobal": None}
    assert evaluate.curve_rows(curves, "resnest101e", ks=(1, 5)) == [
        {"k": 1, "plain": 0.2, "rerank": pytest.approx(0.3), **none},
        {"k": 5, "plain": 0.4, "rerank": pytest.approx(0.6), **none}]
    assert evaluate.split_variant("resnet50.a1_in1k-rerank") == ("resnet50.a1_in1k", "rerank")
    # retrieve.rerank: false: no rerank rankings, a null field (dvc.yaml's chart names both)
    assert evaluate.curve_rows({"resnet50-plain": [0.5, 0.25]}, "resnet50", ks=(1, 5)) == [
        {"k": 1, "plain": 0.5, "rerank": None, **none},
        {"k": 5, "plain": 0.25, "rerank": None, **none}]


def test_the_starting_weights_search_is_scored_as_pretrained(tmp_path):
    """The baseline stage's ranking of each backbone becomes `<backbone>.pretrained.map100`, a
    field of its precision@k chart and the headline's first row; a missing one is an error
    naming the file and the stage to run."""
    params = parse_params({})
    backbone = params.model.backbones[0]
    solution = tmp_path / "solution.csv"
    solution.write_text("id,images,Usage\nq1,a,Public\nq2,b c,Private\n")
    retrieval = write_retrieval(tmp_path / "retrieval", {
        f"{backbone}-plain": {"q1": ["a"], "q2": ["b", "c"]},
        f"{backbone}-rerank": {"q1": ["a"], "q2": ["b", "c"]},
    }, final=f"{backbone}-rerank")
    start = baseline.ranking_path(tmp_path / "baseline", backbone)
    start.parent.mkdir(parents=True)
    # q1's one truth at rank 3 (AP 1/3); q2 finds c of {b, c} at rank 1 (AP 1/2)
    pq.write_table(pa.table({"id": ["q1", "q2"], "images": [["x", "y", "a"], ["c"]]}), start)
    live = tmp_path / "live"
    summary = evaluate.main(params, retrieval, solution, live, baseline_dir=tmp_path / "baseline")

    assert summary[backbone]["pretrained"] == {"map100": pytest.approx(5 / 12),
                                               "map100_public": pytest.approx(1 / 3),
                                               "map100_private": 0.5}
    assert summary["map100"] == 1.0  # the submission stays retrieve's final variant
    curve = json.loads((live / f"plots/custom/precision_at_k/{backbone}.json").read_text())
    assert curve[0]["pretrained"] == 0.5 and curve[2]["pretrained"] == pytest.approx(1 / 3)
    rows = [line.split() for line in evaluate.headline(summary).splitlines()[2:4]]
    assert rows == [[backbone, "no", "training", "0.4167", "0.3333", "0.5000"],
                    [backbone, "plain", "search", "1.0000", "1.0000", "1.0000"]]

    start.unlink()
    with pytest.raises(UserError, match=rf"{start}: not found.*dvc repro baseline@{backbone}"):
        evaluate.main(params, retrieval, solution, live, baseline_dir=tmp_path / "baseline")


def test_superglobal_variants_are_scored_charted_and_shown():
    """retrieve.superglobal: `<backbone>-superglobal` and `-rerank_superglobal` become
    `<backbone>.superglobal.map100` and `.rerank_superglobal.map100`, fields of the model's
    precision@k chart, and rows of the headline."""
    names = {"resnet50-plain": 0.4, "resnet50-rerank": 0.5, "resnet50-superglobal": 0.45,
             "resnet50-rerank_superglobal": 0.55}
    results = {name: {"map@100": value, "map@100_public": value, "map@100_private": value,
                      "queries": 2, "queries_public": 1, "queries_private": 1, "answered": 2}
               for name, value in names.items()}
    summary = evaluate.summarize(results, "resnet50-rerank", False)
    assert summary["resnet50"]["superglobal"]["map100"] == 0.45
    assert summary["resnet50"]["rerank_superglobal"]["map100"] == 0.55
    curves = {name: [value] for name, value in names.items()}
    assert evaluate.curve_rows(curves, "resnet50", ks=(1,)) == [
        {"k": 1, "pretrained": None, "plain": 0.4, "rerank": 0.5, "superglobal": 0.45,
         "rerank_superglobal": 0.55}]
    rows = [line.split() for line in evaluate.headline(summary).splitlines()[2:6]]
    assert [row[1:-3] for row in rows] == [["plain", "search"], ["+", "rerank"],
                                          ["SuperGlobal"], ["rerank", "+", "SG"]]
    assert [row[-3] for row in rows] == ["0.4000", "0.5000", "0.4500", "0.5500"]


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


HEX_SOLUTION = ("id,images,Usage\n"
                "00000000000000a1,00000000000000b1 00000000000000b2,Public\n"
                "00000000000000a2,00000000000000c1,Private\n"
                "00000000000000a3,None,Ignored\n")


def test_standalone_refuses_upper_cased_image_ids_naming_the_file_and_an_example(tmp_path,
                                                                                  caplog):
    """Upper-cased image ids would score 0 without a word, as upper-cased query ids would if
    glr.metric did not refuse them: the same clear error, naming the file and an example."""
    from glr.cli import main as cli

    solution = tmp_path / "solution.csv"
    solution.write_text(HEX_SOLUTION)
    submission = tmp_path / "upper.csv"
    submission.write_text("id,images\n00000000000000a1,00000000000000B1 00000000000000B2\n"
                          "00000000000000a2,00000000000000C1\n")
    with pytest.raises(metric.MetricError) as error:
        evaluate.standalone(solution, submission, None)
    assert str(error.value) == (
        f"{submission}: image id '00000000000000B1' of query '00000000000000a1' has upper-case "
        "letters (and 2 more); the solution's ids are lower-case hex, so it can never match "
        "(write the ids as index.csv has them)")
    # the command: the error in the log, exit status 2, no metrics file
    out = tmp_path / "m.json"
    assert cli(["evaluate", "--solution", str(solution), "--submission", str(submission),
                "--out", str(out)]) == 2
    assert "upper.csv: image id '00000000000000B1' of query '00000000000000a1' has upper-case"\
        in caplog.text
    assert not out.exists()
    # the same ids in lower case score: q1 both hits (AP 1), q2 its one hit (AP 1)
    submission.write_text(submission.read_text().lower())
    assert evaluate.standalone(solution, submission, None)["map100"] == 1.0


def test_upper_case_ids_pass_when_the_solution_itself_has_them(tmp_path, caplog):
    """Not GLDv2's hex ids: a solution with upper-case ids makes the case meaningful."""
    solution = tmp_path / "solution.csv"
    solution.write_text("id,images,Usage\nq1,A,Public\nq2,b,Private\n")
    submission = tmp_path / "submission.csv"
    submission.write_text("id,images\nq1,A\nq2,B\n")
    assert evaluate.standalone(solution, submission, None)["map100"] == 0.5
    assert "WARNING" not in caplog.text


@pytest.mark.parametrize(("rows", "expected"), [
    ("", "no image ids at all (0 query rows): every query scores 0"),
    ("00000000000000a1,\n00000000000000a2,\n",
     "no image ids at all (2 query rows): every query scores 0"),
    ("00000000000000a1,00000000000000ff 00000000000000ee\n00000000000000a2,00000000000000dd\n",
     "none of its 3 image ids is a ground-truth image of any query in the solution: every "
     "query scores 0. Are they ids of this index?"),
])
def test_standalone_warns_when_no_submitted_image_id_is_known(tmp_path, caplog, capsys, rows,
                                                             expected):
    """A header-only submission, empty cells, or ids that are no query's ground truth are
    legal and score 0, with a warning naming the file."""
    solution = tmp_path / "solution.csv"
    solution.write_text(HEX_SOLUTION)
    submission = tmp_path / "submission.csv"
    submission.write_text("id,images\n" + rows)
    with caplog.at_level("WARNING", logger="glr.evaluate"):
        result = evaluate.standalone(solution, submission, None)
    assert result["map100"] == 0.0 and result["queries"] == 2
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert [r.getMessage() for r in warnings] == [f"{submission}: {expected}"]


@pytest.mark.parametrize(("images", "expected"), [
    # q1: its hit at rank 2 of 2 ground-truth ids: AP (1/2)/2; q2 absent: 0
    ("00000000000000ff 00000000000000b2", 0.125),
    # q2's ground truth is a known index id too: a miss for q1, but no sign of a wrong index
    ("00000000000000c1", 0.0),
])
def test_standalone_is_silent_when_one_image_id_is_known(tmp_path, caplog, images, expected):
    solution = tmp_path / "solution.csv"
    solution.write_text(HEX_SOLUTION)
    submission = tmp_path / "submission.csv"
    submission.write_text(f"id,images\n00000000000000a1,{images}\n")
    with caplog.at_level("WARNING", logger="glr.evaluate"):
        result = evaluate.standalone(solution, submission, None)
    assert result["map100"] == pytest.approx(expected)
    assert not [r for r in caplog.records if r.levelname == "WARNING"]


def test_stage_refuses_upper_cased_image_ids_and_warns_about_unknown_ones(tmp_path, caplog):
    """The stage checks each of retrieve's rankings the same way, naming its parquet file."""
    solution = tmp_path / "solution.csv"
    solution.write_text(HEX_SOLUTION)
    upper = write_retrieval(tmp_path / "upper", {
        "resnet18-plain": {"00000000000000a1": ["00000000000000b1"]},
        "resnet18-rerank": {"00000000000000a1": ["00000000000000B1"]},
    }, final="resnet18-rerank")
    with pytest.raises(metric.MetricError, match=r"resnet18-rerank\.parquet: image id "
                       r"'00000000000000B1' of query '00000000000000a1' has upper-case"):
        evaluate.main(parse_params({}), upper, solution, tmp_path / "live-upper")
    unknown = write_retrieval(tmp_path / "unknown", {
        "resnet18-plain": {"00000000000000a1": ["00000000000000ee", "00000000000000b1"]},
        "resnet18-rerank": {"00000000000000a1": ["00000000000000ee"]},
    }, final="resnet18-rerank")
    with caplog.at_level("WARNING", logger="glr.evaluate"):
        summary = evaluate.main(parse_params({}), unknown, solution, tmp_path / "live")
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warnings == [f"{unknown / 'topk/resnet18-rerank.parquet'}: none of its 1 image ids "
                        "is a ground-truth image of any query in the solution: every query "
                        "scores 0. Are they ids of this index?"]
    # plain: q1's hit at rank 2 of its 2 ground-truth ids, AP 1/4; q2 absent: mean 1/8
    assert summary["resnet18"]["plain"]["map100"] == pytest.approx(0.125)
    assert summary["map100"] == 0.0


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
