"""`glr plan`: the recipes resolve to the authors' values, backbone by backbone, phase by phase.

The tables below are the authors' configs (configs/GLDv2/*.yml of their repository; batch is
SOLVER.IMS_PER_BATCH, per GPU on 8 GPUs), written here as data, independently of the recipes.
"""

from __future__ import annotations

import json
from pathlib import Path

from glr import cli

REPO = Path(__file__).resolve().parents[1]
COLUMNS = ("list", "size", "pad", "batch", "epochs", "lr", "weight_decay", "warmup_epochs",
           "sampler", "arcface_s", "arcface_m", "arcface_subcenters", "arcface_dynamic", "init")
LISTS = {"p1": "clean", "p2": "c2x", "p3": "full", "p4": "all"}

# backbone: phase -> (size, pad, batch, epochs, lr, weight decay, s, m, starts from)
AUTHORS = {
    "seresnet101_ibn_a": {
        "p1": (384, 15, 96, 10, 0.08, 5e-4, 30, 0.3, "pretrained"),
        "p2": (384, 15, 96, 6, 0.008, 5e-4, 30, 0.3, "p1"),
        "p3": (512, 20, 18, 4, 0.0008, 1e-5, 30, 0.3, "p2"),
        "p4": (512, 20, 18, 4, 0.0008, 1e-5, 30, 0.3, "p3@2")},
    "resnext101_32x4d_ibn_a": {
        "p1": (384, 15, 40, 10, 0.08, 5e-4, 30, 0.3, "pretrained"),
        "p2": (384, 15, 40, 6, 0.008, 5e-4, 30, 0.3, "p1"),
        "p3": (512, 20, 18, 4, 0.0008, 1e-5, 30, 0.3, "p2@2"),
        "p4": (512, 20, 18, 4, 0.0008, 1e-5, 30, 0.3, "p3@2")},
    "resnest101e": {
        "p1": (384, 15, 36, 10, 0.08, 5e-4, 30, 0.3, "pretrained"),
        "p2": (384, 15, 88, 6, 0.008, 5e-4, 30, 0.3, "p1"),
        "p3": (512, 20, 40, 2, 0.0008, 1e-5, 30, 0.3, "p2"),
        "p4": (512, 20, 40, 2, 0.0008, 1e-5, 30, 0.3, "p3")},
    "resnest269e": {
        "p1": (448, 18, 28, 10, 0.08, 5e-4, 30, 0.3, "pretrained"),
        "p2": (448, 18, 28, 6, 0.008, 5e-4, 30, 0.3, "p1"),
        "p3": (512, 20, 6, 2, 0.0008, 5e-4, 60, 0.0, "p2@4"),
        "p4": (512, 20, 6, 2, 0.0008, 5e-4, 60, 0.0, "p3")},
}


def expected_row(values: tuple, phase: str, list_name: str, sampler: str) -> dict:
    size, pad, batch, epochs, lr, wd, s, m, init = values
    phase_name, _, epoch = init.partition("@")
    return {"list": list_name, "size": size, "pad": pad, "batch": batch, "epochs": epochs,
            "lr": lr, "weight_decay": wd, "warmup_epochs": 1.0 if phase == "p1" else 0.0,
            "sampler": sampler, "arcface_s": float(s), "arcface_m": m,
            "arcface_subcenters": 1, "arcface_dynamic": None,
            "init": {"phase": phase_name, "epoch": int(epoch) if epoch else None}}


def plan_json(recipe: Path, capsys) -> dict:
    assert cli.main(["plan", "--json", "--params", str(recipe)]) == 0
    return json.loads(capsys.readouterr().out)


def test_the_authors_recipe_is_their_table(capsys):
    plan = plan_json(REPO / "recipes/gldv2-authors.yaml", capsys)
    expected = {backbone: {phase: expected_row(values, phase, LISTS[phase],
                                               "continent" if phase == "p4" else "softmax")
                           for phase, values in phases.items()}
                for backbone, phases in AUTHORS.items()}
    assert plan == expected
    assert all(list(phases) == ["p1", "p2", "p3", "p4"] for phases in plan.values())


def test_the_beyond_recipe_is_the_authors_with_the_first_places_loss(capsys):
    """gldv2-beyond.yaml: every phase of every backbone as the authors' table, except the loss:
    s 45, 3 sub-centers, dynamic margins [0.05, 0.5] (the ResNeSt269's s 60, m 0 dropped)."""
    plan = plan_json(REPO / "recipes/gldv2-beyond.yaml", capsys)
    expected = {backbone: {phase: {**expected_row(values, phase, LISTS[phase],
                                                  "continent" if phase == "p4" else "softmax"),
                                   "arcface_s": 45.0, "arcface_m": 0.3,
                                   "arcface_subcenters": 3, "arcface_dynamic": [0.05, 0.5]}
                           for phase, values in phases.items()}
                for backbone, phases in AUTHORS.items()}
    assert plan == expected
    assert cli.main(["plan", "--params", str(REPO / "recipes/gldv2-beyond.yaml")]) == 0
    rows = capsys.readouterr().out.splitlines()
    assert rows[1].split()[-4:] == ["3", "[0.05,", "0.5]", "pretrained"]


def test_the_quick_r50_recipe_is_theirs(capsys):
    plan = plan_json(REPO / "recipes/gldv2-r50-256.yaml", capsys)
    assert plan == {"resnet50.tv_in1k": {
        "p1": expected_row((256, 10, 128, 10, 0.08, 5e-4, 30, 0.3, "pretrained"), "p1",
                           "clean", "softmax"),
        "p2": expected_row((256, 10, 128, 2, 0.008, 5e-4, 30, 0.3, "p1@6"), "p2", "all",
                           "continent")}}


def test_plan_prints_a_table_with_every_column(capsys):
    assert cli.main(["plan", "--params", str(REPO / "params.yaml")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["backbone", "phase", *COLUMNS]
    assert [line.split()[:2] for line in lines[1:]] == [["efficientnet_lite0", "p1"],
                                                        ["efficientnet_lite0", "p2"]]
    assert lines[2].split()[-1] == "p1" and lines[1].split()[-1] == "pretrained"
