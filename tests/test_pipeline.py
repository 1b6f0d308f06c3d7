"""End to end: `dvc repro` of the whole pipeline on a small mini-GLDv2 in a fresh copy of the
repository (what `make repro` does on a fresh clone), then the metrics and the DAG."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SMALL = {"clean_landmarks": 6, "extra_landmarks": 4, "test_landmarks": 4,
         "distractor_landmarks": 4, "ignored_queries": 3, "clean_images": [2, 4],
         "extra_images": [2, 3], "index_images": [2, 3], "image_width": 64, "image_height": 48}


def _git(*args: str, cwd: Path) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True,
                          text=True).stdout


@pytest.fixture(scope="module")
def fresh_repo(tmp_path_factory) -> Path:
    """The working tree as a fresh clone would see it: tracked and untracked, not ignored."""
    files = _git("ls-files", "-z", "--cached", "--others", "--exclude-standard", cwd=REPO)
    dest = tmp_path_factory.mktemp("e2e") / "repo"
    for name in filter(None, files.split("\0")):
        source = REPO / name
        if source.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)
    params = yaml.safe_load((dest / "params.yaml").read_text())
    params["synth"].update(SMALL)
    params["model"]["size"] = 64
    for phase in params["train"]["phases"]:
        phase["epochs"] = 2
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    _git("init", "-q", cwd=dest)
    _git("add", "-A", cwd=dest)
    _git("-c", "user.name=test", "-c", "user.email=test@example.org", "commit", "-q", "-m",
         "fresh", cwd=dest)
    return dest


def _dvc(*args: str, cwd: Path) -> str:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["DVC_NO_ANALYTICS"] = "1"
    result = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=cwd, env=env,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_dvc_repro_runs_every_stage_and_writes_metrics(fresh_repo):
    _dvc("repro", cwd=fresh_repo)
    truth = json.loads((fresh_repo / "data/mini-gldv2/synth_truth.json").read_text())
    shown = json.loads(_dvc("metrics", "show", "--json", cwd=fresh_repo))
    metrics = next(iter(shown.values()))["data"]["metrics/prepare.json"]["data"]
    assert metrics["clean"]["images"] == truth["clean"]["images"]
    assert metrics["c2x"]["images"] == truth["c2x"]["images"]
    assert metrics["full"]["labels"] == truth["full"]["labels"]
    assert metrics["all"]["images"] == truth["all_holdout"]["images"]
    assert metrics["val_queries"] == truth["val_queries"]
    assert (fresh_repo / "data/prepared/all.parquet").is_file()
    evaluation = next(iter(shown.values()))["data"]["metrics/evaluate.json"]["data"]
    assert set(evaluation["variants"]) == {"resnet18-plain", "resnet18-rerank",
                                           "ensemble-plain", "ensemble-rerank"}
    assert evaluation["map@100"] == evaluation["variants"]["ensemble-rerank"]["map@100"]
    assert 0.0 < evaluation["map@100"] <= 1.0 and evaluation["contaminated"] is False
    assert evaluation["queries"] == truth["val_queries"]["total"]
    submission = (fresh_repo / "data/retrieval/submission.csv").read_text().splitlines()
    assert submission[0] == "id,images" and len(submission) == 1 + truth["val_queries"]["total"]
    assert (fresh_repo / "models/resnet18/p2/model.safetensors").is_file()
    assert (fresh_repo / "data/features/resnet18/ref.npy").is_file()
    from PIL import Image

    from glr import visualize
    with Image.open(fresh_repo / "metrics/retrieval.png") as picture:
        width, height = visualize.TILE + 2 * visualize.BORDER, (
            visualize.TILE + 2 * visualize.BORDER + visualize.STRIP)
        rows = min(8, truth["val_queries"]["total"])
        assert picture.size == (9 * width + 8, rows * height)
    # Nothing is left to do: every stage is up to date with its params, code and data.
    assert _dvc("status", cwd=fresh_repo).strip().endswith("up to date.")


def test_dvc_dag_shows_the_stages(fresh_repo):
    dag = _dvc("dag", "--md", cwd=fresh_repo)
    for stage in ("synth", "prepare", "shard", "init@resnet18", "train@resnet18-phase0",
                  "train@resnet18-phase1", "extract@resnet18", "retrieve", "evaluate",
                  "visualize"):
        assert stage in dag
