"""The typed params loader: the repo's params.yaml loads; bad params name the key."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from glr.model.table import BACKBONES
from glr.params import Params, ParamsError, load_params, parse_params

REPO = Path(__file__).resolve().parents[1]


def test_repo_params_load():
    params = load_params(REPO / "params.yaml")
    assert params.data.root == "data/mini-gldv2"
    assert params.synth.clean_images == [8, 14]
    assert params.prepare.holdout_val_queries is True


def test_defaults_equal_repo_params():
    """params.yaml spells out every default, so the dataclasses and the file agree."""
    assert load_params(REPO / "params.yaml") == Params()


def test_empty_file_gives_defaults():
    assert parse_params(None) == Params()


@pytest.mark.parametrize(("raw", "message"), [
    ({"synth": {"clean_landmark": 5}},
     r"unknown key synth\.clean_landmark; allowed keys in synth: .*clean_landmarks"),
    ({"trian": {}}, r"unknown key trian; allowed keys: data, extract, model, prepare, "
                    r"retrieve, shard, synth, train"),
    ({"synth": {"seed": "one"}}, r"synth\.seed: expected an integer, got 'one'"),
    ({"synth": {"seed": True}}, r"synth\.seed: expected an integer, got True"),
    ({"synth": {"jpeg_quality": 101}}, r"synth\.jpeg_quality: 101 is out of range; "
                                       r"allowed: \[1, 100\]"),
    ({"synth": {"junk_fraction": -0.1}}, r"synth\.junk_fraction: -0\.1 is out of range"),
    ({"synth": {"clean_images": [5, 2]}}, r"synth\.clean_images: expected \[min, max\]"),
    ({"synth": {"clean_images": [0, 2]}}, r"synth\.clean_images\[0\]: 0 is out of range"),
    ({"synth": {"clean_images": 3}}, r"synth\.clean_images: expected list of int"),
    ({"prepare": {"eval_index": "some"}}, r"prepare\.eval_index: 'some' is not allowed; "
                                          r"allowed: 'all' \| 'list' \| 'sample'"),
    ({"prepare": {"eval_index": "list"}}, r"prepare\.eval_index_list: required"),
    ({"prepare": {"holdout_val_queries": "yes"}}, r"prepare\.holdout_val_queries: expected "
                                                  r"true or false"),
    ({"data": "x"}, r"data: expected a mapping"),
])
def test_bad_params_name_the_key(raw, message):
    with pytest.raises(ParamsError, match=message):
        parse_params(raw)


def test_int_accepted_for_float():
    assert parse_params({"synth": {"junk_fraction": 1}}).synth.junk_fraction == 1.0


def test_file_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("synth: {seed: -1}\n")
    with pytest.raises(ParamsError, match=r"bad\.yaml: synth\.seed: -1 is out of range"):
        load_params(bad)
    with pytest.raises(ParamsError, match=r"missing\.yaml: params file not found"):
        load_params(tmp_path / "missing.yaml")
    bad.write_text("synth: [\n")
    with pytest.raises(ParamsError, match=r"bad\.yaml: not valid YAML"):
        load_params(bad)


# --------------------------------------------------------------------------- between fields


def on_resnet18(raw: dict) -> dict:
    """`raw` over a resnet18 model without starting weights at 64 px (the tests below were
    written for it; the embedded default is efficientnet_lite0 from packaged weights)."""
    model = {"backbones": ["resnet18"], "size": 64, "pretrained": False,
             "pretrained_source": "timm", **raw.get("model", {})}
    return {"train": two_phase_train("resnet18"), **raw, "model": model}


def two_phase_train(*backbones: str, p1: dict | None = None, **entry_changes) -> dict:
    """train params: phases p1 and p2 (p1's defaults changed by `p1`), every backbone with
    p1 from pretrained and p2 from p1; `entry_changes` go into every p1 entry."""
    recipe = {}
    for backbone in backbones:
        recipe[f"{backbone}-p1"] = {"backbone": backbone, "phase": "p1", "init": "pretrained",
                                    **entry_changes}
        recipe[f"{backbone}-p2"] = {"backbone": backbone, "phase": "p2", "init": "p1"}
    return {"phases": {"p1": p1 or {}, "p2": {"list": "all"}}, "recipe": recipe}


@pytest.mark.parametrize(("raw", "message"), [
    ({"train": two_phase_train("resnet18", p1={"sampler": "id_uniform", "batch": 30})},
     r"train\.phases\.p1\.batch: 30 is not a multiple of train\.phases\.p1\.instances \(4\)"),
    ({"train": two_phase_train("resnet18", sampler="id_uniform", batch=30)},
     r"train\.recipe\.resnet18-p1\.batch: 30 is not a multiple of "),
    ({"retrieve": {"weights": [1.0, 0.5]}},
     r"retrieve\.weights: 2 value\(s\) for 1 backbone\(s\) in model\.backbones \(resnet18\)"),
    ({"model": {"backbones": ["resnet18", "resnet34"]},
      "train": two_phase_train("resnet18", "resnet34"), "retrieve": {"weights": [1.0]}},
     r"retrieve\.weights: 1 value\(s\) for 2 backbone\(s\)"),
    ({"extract": {"phase": "p3"}}, r"extract\.phase: resnet18 has no phase 'p3' in train\.recipe"),
    ({"train": two_phase_train("resnet18", size=640)},
     r"train\.recipe\.resnet18-p1\.size: 640 is above shard\.max_side: .* 512 px"),
    ({"train": two_phase_train("resnet18", p1={"size": 640})},
     r"train\.phases\.p1\.size: 640 is above shard\.max_side: .*raise shard\.max_side"),
    ({"model": {"size": 600}}, r"model\.size: 600 is above shard\.max_side: .* 512 px"),
    ({"shard": {"max_side": 48}}, r"model\.size: 64 is above shard\.max_side: .* 48 px"),
    ({"train": {"phases": {"a/b": {}}, "recipe": {}}},
     r"train\.phases\.a/b: not a phase name"),
    ({"model": {"backbones": ["resnet18", "resnet34"]}},
     r"train\.recipe: no entry for backbone resnet34 \(add resnet34-<phase> entries"),
    ({"train": {"phases": {"p1": {}}, "recipe": {"resnet18-p1": {
        "backbone": "resnet18", "phase": "p2"}}}},
     r"train\.recipe\.resnet18-p1\.phase: 'p2' is not in train\.phases \(p1\)"),
    ({"train": {"phases": {"p1": {}}, "recipe": {"r18-p1": {
        "backbone": "resnet18", "phase": "p1"}}}},
     r"train\.recipe\.r18-p1: the key must be <backbone>-<phase>, i\.e\. resnet18-p1"),
    ({"train": two_phase_train("resnet18", lr="fast")},
     r"train\.recipe\.resnet18-p1\.lr: expected a number, got 'fast'"),
    ({"train": two_phase_train("resnet18", speed=2)},
     r"unknown key train\.recipe\.resnet18-p1\.speed; allowed keys .*backbone, phase, init, "
     r"list, epochs"),
    ({"train": {**two_phase_train("resnet18"), "recipe": {
        "resnet18-p1": {"backbone": "resnet18", "phase": "p1", "init": "p2"},
        "resnet18-p2": {"backbone": "resnet18", "phase": "p2", "init": "p1"}}}},
     r"train\.recipe\.resnet18-p1\.init: 'p2', but the first phase of resnet18 must start "
     r"from pretrained"),
    ({"train": {**two_phase_train("resnet18"), "recipe": {
        "resnet18-p1": {"backbone": "resnet18", "phase": "p1"},
        "resnet18-p2": {"backbone": "resnet18", "phase": "p2", "init": "p1/epoch-12"}}}},
     r"train\.recipe\.resnet18-p2\.init: epoch 12 is not within phase p1's 1\.\.11 \(its end "
     r"is just 'p1'\)"),
    ({"train": {**two_phase_train("resnet18"), "recipe": {
        "resnet18-p1": {"backbone": "resnet18", "phase": "p1"},
        "resnet18-p2": {"backbone": "resnet18", "phase": "p2", "init": "p1@2"}}}},
     r"train\.recipe\.resnet18-p2\.init: 'p1@2' is not pretrained, <phase> or "
     r"<phase>/epoch-<N>"),
    ({"model": {"backbones": ["seresnet101_ibn_a"], "pretrained": True},
      "train": two_phase_train("seresnet101_ibn_a")},
     r"model\.pretrained: timm has no ImageNet weights for seresnet101 \(model\.backbones\[0\] = "
     r"seresnet101_ibn_a\); set model\.weights_dir .*se_resnet101_ibn_a-fabed4e2\.pth"),
], ids=["id_uniform-batch", "id_uniform-batch-override", "weights-too-many", "weights-too-few",
        "extract-phase", "override-size-max-side", "phase-size-max-side",
        "model-size-max-side", "shard-max-side", "phase-name", "backbone-without-recipe",
        "recipe-unknown-phase", "recipe-key", "override-type", "override-unknown-key",
        "first-init", "init-epoch-range", "init-spelling", "pretrained-ibn"])
def test_constraints_between_fields_name_the_key(raw, message):
    with pytest.raises(ParamsError, match=message):
        parse_params(on_resnet18(raw))


@pytest.mark.parametrize("raw", [
    {"train": two_phase_train("resnet18", p1={"sampler": "id_uniform", "batch": 32})},
    {"train": two_phase_train("resnet18", p1={"sampler": "softmax", "batch": 30})},
    {"model": {"backbones": ["resnet18", "resnet34"]},
     "train": two_phase_train("resnet18", "resnet34"), "retrieve": {"weights": [1.0, 0.5]}},
    {"extract": {"phase": "p1"}},
    {"model": {"size": 600}, "shard": {"max_side": 600}},
    {"model": {"backbones": ["seresnet101_ibn_a"], "pretrained": True, "weights_dir": "w"},
     "train": two_phase_train("seresnet101_ibn_a")},
], ids=["id_uniform-multiple", "softmax-any-batch", "weights-per-backbone", "extract-phase",
        "max-side-raised", "ibn-with-weights-dir"])
def test_consistent_params_load(raw):
    raw = on_resnet18(raw)
    params = dataclasses.asdict(parse_params(raw))
    for section, values in raw.items():  # every value given comes back as given
        for key, value in values.items():
            if section == "train":
                assert set(value) <= set(params["train"][key]), key  # phases, recipe entries
            else:
                assert params[section][key] == value, f"{section}.{key}"


def test_per_backbone_overrides_and_mid_phase_starts_resolve():
    params = parse_params(on_resnet18({"model": {"backbones": ["resnet18", "resnet34"]}, "train": {
        "phases": {"p1": {"epochs": 6, "lr": 0.08}, "p2": {"list": "all", "lr": 0.008}},
        "recipe": {
            "resnet18-p1": {"backbone": "resnet18", "phase": "p1", "init": "pretrained"},
            "resnet18-p2": {"backbone": "resnet18", "phase": "p2", "init": "p1/epoch-4"},
            "resnet34-p1": {"backbone": "resnet34", "phase": "p1", "init": "pretrained",
                            "size": 96, "arcface_s": 60, "arcface_m": 0.0},
            "resnet34-p2": {"backbone": "resnet34", "phase": "p2", "init": "p1", "lr": 0.01}}}}))
    r18, r34 = params.plan("resnet18"), params.plan("resnet34")
    assert [(p.name, p.init.phase, p.init.epoch) for p in r18] == [("p1", "pretrained", None),
                                                                     ("p2", "p1", 4)]
    assert r18[0].snapshots == (4,) and r18[1].snapshots == ()  # p1 keeps its epoch-4 model
    assert r34[0].snapshots == ()
    assert (r18[0].size, r34[0].size, r34[1].size) == (64, 96, 64)
    assert (r34[0].settings.arcface_s, r34[0].settings.arcface_m) == (60.0, 0.0)
    assert (r18[0].settings.arcface_s, r18[0].settings.arcface_m) == (30.0, 0.3)
    assert (r18[1].settings.lr, r34[1].settings.lr) == (0.008, 0.01)
    assert r18[1].init.folder == "p1/epoch-4"


@pytest.mark.parametrize("recipe", sorted((REPO / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_recipes_load(recipe):
    raw = yaml.safe_load(recipe.read_text())
    params = load_params(recipe)
    assert params.model.backbones == raw["model"]["backbones"]
    assert list(params.train.recipe) == list(raw["train"]["recipe"])
    assert [plan.name for backbone in params.model.backbones
            for plan in params.plan(backbone)] == [entry["phase"] for entry in
                                                     raw["train"]["recipe"].values()]


def test_a_file_error_names_the_file_and_the_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("retrieve: {weights: [1, 2, 3]}\n")
    with pytest.raises(ParamsError, match=r"bad\.yaml: retrieve\.weights: 3 value\(s\)"):
        load_params(bad)


def test_loading_the_usual_params_imports_neither_timm_nor_torch():
    """Checking the table's backbone names is free: every stage loads params first."""
    code = ("import sys; from glr.params import load_params; "
            "[load_params(p) for p in sys.argv[1:]]; "
            "print(sorted(m for m in ('timm', 'torch') if m in sys.modules))")
    files = [REPO / "params.yaml", *sorted((REPO / "recipes").glob("*.yaml"))]
    result = subprocess.run([sys.executable, "-c", code, *map(str, files)], check=True,
                            capture_output=True, text=True)
    assert result.stdout.strip() == "[]"


# --------------------------------------------------------------------------- backbone names


@pytest.mark.parametrize(("names", "message"), [
    (["resnet18", "resnet5O"], r"model\.backbones\[1\]: unknown backbone 'resnet5O', neither in "
                               r"glr's table nor a timm model; close matches: resnet50\b"),
    (["seresnet101_ibn"], r"model\.backbones\[0\]: unknown backbone .*close matches: "
                          r"seresnet101_ibn_a\b"),
])
def test_bad_backbone_names_the_key(names, message):
    with pytest.raises(ParamsError, match=message):
        parse_params({"model": {"backbones": names}})


def test_timm_resnet_family_names_are_backbones():
    # any timm model is a backbone, not only the ResNet families
    names = ["resnet18", "resnest14d", "resnet26d", "resnet50.a1_in1k", "vit_base_patch16_224",
             "res2net50_26w_4s", "convnext_tiny"]
    params = parse_params(on_resnet18({"model": {"backbones": names},
                                       "train": two_phase_train(*names)}))
    assert params.model.backbones[1] == "resnest14d"
    assert params.model.backbones[-1] == "convnext_tiny"


def test_timm_name_without_timm_weights_needs_a_file_when_pretrained():
    with pytest.raises(ParamsError, match=r"model\.pretrained: timm has no ImageNet weights for "
                                          r"seresnet18 \(model\.backbones\[0\] = seresnet18\)"):
        parse_params(on_resnet18({"model": {"backbones": ["seresnet18"], "pretrained": True},
                          "train": two_phase_train("seresnet18")}))
    parse_params(on_resnet18({"model": {"backbones": ["resnet26d"], "pretrained": True},
                      "train": two_phase_train("resnet26d")}))


def test_backbone_table_agrees_with_timm():
    from timm.models import is_model_pretrained

    from glr.model.backbones import RESNET_FAMILIES, timm_family

    for name, spec in BACKBONES.items():
        assert spec.timm_weights == is_model_pretrained(spec.timm_name), name
    resnets = [n for n, s in BACKBONES.items() if timm_family(s.timm_name) in RESNET_FAMILIES]
    assert set(BACKBONES) - set(resnets) == {"efficientnet_lite0", "efficientnet_lite1",
                                             "efficientnet_lite2"}


@pytest.mark.parametrize("name", ["resnet18d", "resnest14d", "ecaresnet26t", "resnet26d.bt_in1k"])
def test_a_timm_name_params_accept_builds(name):
    """Names outside the table build as timm builds them, last stride 1 included (ECA's
    Conv1d attention, stride (1,), is not mistaken for downsampling)."""
    import torch

    from glr.model import build_model, create_backbone

    parse_params(on_resnet18({"model": {"backbones": [name]}, "train": two_phase_train(name)}))
    backbone, channels = create_backbone(name)
    with torch.no_grad():
        features = backbone.eval()(torch.randn(1, 3, 64, 64))
    assert features.shape == (1, channels, 4, 4)
    assert build_model(name, 5, embedding_dim=8).config["backbone"] == name


def test_create_backbone_refuses_unknown_names():
    from glr.model import create_backbone

    with pytest.raises(ValueError, match=r"close matches: resnet50\b"):
        create_backbone("resnet5O")


def test_params_round_trip_through_asdict():
    """What dataclasses.asdict writes (tests dump params files that way) loads back the same,
    recipe overrides included."""
    import dataclasses

    params = parse_params(on_resnet18({"train": two_phase_train("resnet18", lr=0.05, size=96)}))
    assert params.train.recipe["resnet18-p1"].overrides == {"lr": 0.05, "size": 96}
    assert parse_params(dataclasses.asdict(params)) == params


def test_check_writes_the_same_mark_for_any_valid_params_and_nothing_for_bad_ones(tmp_path):
    """`glr check` (the pipeline's first stage): a valid file gives the mark, whose bytes do
    not depend on the params (so the stages depending on it rerun for their own params only);
    a bad one stops with the key and leaves an earlier mark as it was, even a read-only one
    (DVC links outputs read-only into its cache: the mark is replaced, never written in place)."""
    from glr.params import CHECK_MARK, check_params

    mark = tmp_path / "data" / "params.checked"
    check_params(REPO / "params.yaml", mark)
    assert mark.read_text() == CHECK_MARK
    mark.chmod(0o444)
    check_params(REPO / "recipes" / "gldv2-authors.yaml", mark)
    assert mark.read_text() == CHECK_MARK
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  size: 0\n")
    stamp = mark.stat().st_mtime_ns
    with pytest.raises(ParamsError, match=r"bad\.yaml: model\.size: 0 is out of range"):
        check_params(bad, mark)
    assert mark.stat().st_mtime_ns == stamp and mark.read_text() == CHECK_MARK
    assert sorted(p.name for p in mark.parent.iterdir()) == ["params.checked"]


def test_determinism_and_cudnn_benchmark_exclude_each_other():
    with pytest.raises(ParamsError, match=r"train\.deterministic and train\.cudnn_benchmark "
                                          r"exclude each other"):
        parse_params({"train": {"deterministic": True, "cudnn_benchmark": True}})
    assert parse_params({"train": {"deterministic": True}}).train.deterministic
