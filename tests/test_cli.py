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
