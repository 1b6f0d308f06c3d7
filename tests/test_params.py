"""The typed params loader: the repo's params.yaml loads; bad params name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

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
