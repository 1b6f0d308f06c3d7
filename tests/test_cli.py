"""The `glr` entry point: help texts, dispatch, and clean errors for bad params or data."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from glr.cli import build_parser, main


def test_top_level_help_lists_the_stages(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for stage in ("synth", "prepare", "bench"):
        assert stage in out


@pytest.mark.parametrize("stage", ["synth", "prepare"])
def test_stage_help_says_what_it_reads_and_writes(stage):
    help_text = build_parser()._subparsers._group_actions[0].choices[stage].format_help()
    assert "Reads:" in help_text and "Writes:" in help_text


def test_bad_params_exit_2_with_the_key(tmp_path, caplog):
    params = tmp_path / "params.yaml"
    params.write_text("prepare: {eval_index: everything}\n")
    assert main(["prepare", "--params", str(params)]) == 2
    assert "prepare.eval_index: 'everything' is not allowed" in caplog.text


def test_missing_gldv2_root_exit_2(tmp_path, caplog):
    params = tmp_path / "params.yaml"
    params.write_text(f"data: {{root: {tmp_path / 'nowhere'}}}\n")
    assert main(["prepare", "--params", str(params), "--out", str(tmp_path / "out")]) == 2
    assert "train_clean.csv: file not found" in caplog.text


def test_synth_then_prepare_through_the_console_script(tmp_path):
    params = tmp_path / "params.yaml"
    root = tmp_path / "mini"
    params.write_text(json.dumps({
        "data": {"root": str(root), "continent_table": str(root / "continent_codes.csv")},
        "synth": {"clean_landmarks": 4, "extra_landmarks": 2, "test_landmarks": 3,
                  "distractor_landmarks": 2, "ignored_queries": 2, "clean_images": [2, 3]},
    }))
    glr = [sys.executable, "-m", "glr"]
    subprocess.run([*glr, "synth", "--params", str(params), "--out", str(root),
                    "--image-size", "64x40", "--workers", "1"], check=True)
    jpeg = next(root.rglob("*.jpg"))
    from PIL import Image
    with Image.open(jpeg) as image:
        assert sorted(image.size) == [40, 64]
    subprocess.run([*glr, "prepare", "--params", str(params), "--out", str(tmp_path / "prep"),
                    "--metrics", str(tmp_path / "prepare.json")], check=True)
    truth = json.loads((root / "synth_truth.json").read_text())
    metrics = json.loads((tmp_path / "prepare.json").read_text())
    assert metrics["clean"]["images"] == truth["clean"]["images"]
    assert metrics["all"]["images"] == truth["all_holdout"]["images"]


def _variant(value: float) -> dict:
    return {"map100": value, "map100_public": value / 2, "map100_private": value * 2}


def test_report_prints_the_headline(tmp_path, capsys):
    one = {"map100": 0.3, "map100_public": 0.15, "map100_private": 0.6, "queries": 79,
           "contaminated": False,
           "ensemble": {"plain": _variant(0.1), "rerank": _variant(0.3)},
           "resnet18": {"plain": _variant(0.1), "rerank": _variant(0.3)}}
    path = tmp_path / "metrics.json"
    path.write_text(json.dumps(one))
    main(["report", "--metrics", str(path)])
    lines = capsys.readouterr().out.splitlines()
    # one backbone: no ensemble rows, which would repeat the backbone's
    assert lines == [
        f"mAP@100 on 79 validation queries ({path})",
        "                           all  public  private",
        "resnet18  plain search  0.1000  0.0500   0.2000",
        "resnet18  + rerank      0.3000  0.1500   0.6000",
        "submission: mAP@100 0.3000 (public 0.1500, private 0.6000)",
    ]


def test_report_shows_the_ensemble_of_several_backbones():
    from glr.evaluate import headline

    metrics = {"map100": 0.5, "map100_public": 0.25, "map100_private": 1.0,
               "queries": 1129, "contaminated": True,
               **{name: {kind: _variant(value) for kind, value in (("plain", 0.2),
                                                                   ("rerank", 0.5))}
                  for name in ("resnest101", "resnet50", "ensemble")}}
    lines = headline(metrics).splitlines()
    assert lines[0] == "mAP@100 on 1129 validation queries (metrics/evaluate/metrics.json)"
    assert [line.split()[0] for line in lines[2:8]] == ["resnest101"] * 2 + ["resnet50"] * 2 + [
        "ensemble"] * 2
    assert lines[-1].endswith("(contaminated: validation queries were trained on)")


def test_report_without_metrics_says_what_to_run(tmp_path, caplog):
    assert main(["report", "--metrics", str(tmp_path / "missing.json")]) == 2
    assert "missing.json: no such file; run `dvc repro`" in caplog.text


def test_query_names_a_missing_photo_or_model(tmp_path, caplog):
    from PIL import Image

    assert main(["query", str(tmp_path / "nowhere.jpg")]) == 2
    assert f"{tmp_path / 'nowhere.jpg'}: no such file" in caplog.text
    assert "no photo could be read (1 given, each named above with its problem)" in caplog.text
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    assert main(["query", str(broken)]) == 2
    assert (f"{broken}: not an image (no image format recognised in its 10 bytes)"
            in caplog.text)
    assert "BytesIO" not in caplog.text  # PIL's message names its buffer, not the file
    photo = tmp_path / "photo.jpg"
    Image.new("RGB", (64, 48), (120, 30, 200)).save(photo)
    # a readable photo beside the broken one goes on, to the model
    assert main(["query", str(photo), str(broken), "--models", str(tmp_path / "models")]) == 2
    assert "no trained model; run `dvc repro` first" in caplog.text


def test_query_refuses_a_missing_out_folder_before_reading_anything(tmp_path, caplog):
    out = tmp_path / "missing" / "dir" / "x.png"
    assert main(["query", str(tmp_path / "nowhere.jpg"), "--out", str(out)]) == 2
    assert (f"--out {out}: the folder {out.parent} does not exist; create it first"
            in caplog.text)
    assert "nowhere.jpg" not in caplog.text  # refused before the photos are read
    assert not (tmp_path / "missing").exists()
