"""`glr query`: reading the photos (each unreadable one named, tiny ones warned about), the --out
check, the precision, and the flow from photos to the printed report with the embedding and
the search replaced (the real ones need a trained pipeline: tests/test_pipeline.py, slow)."""

from __future__ import annotations

import io
import json
import logging
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from glr import query, visualize
from glr.errors import UserError
from glr.params import parse_params
from glr.runtime import precision_name

PARAMS = parse_params({})
SIZE = PARAMS.model.size


def jpeg(path: Path, size: tuple[int, int] = (64, 48)) -> Path:
    Image.new("RGB", size, (120, 30, 200)).save(path, format="JPEG")
    return path


@pytest.fixture
def photos(tmp_path) -> dict[str, Path]:
    """One photo of each kind: good, tiny, missing, empty, text, truncated in its pixels or in
    its header, a folder."""
    good = jpeg(tmp_path / "good.jpg")
    tiny = tmp_path / "tiny.png"
    Image.new("RGB", (1, 1), (0, 0, 0)).save(tiny)
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    text = tmp_path / "notes.jpg"
    text.write_text("hello, not a photo\n")
    noise = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, format="JPEG")  # 2.5 kB: its body is the larger part
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(buffer.getvalue()[:len(buffer.getvalue()) // 2])
    header = tmp_path / "header.jpg"
    header.write_bytes(buffer.getvalue()[:300])  # ends within the tables before the pixels
    folder = tmp_path / "folder.jpg"
    folder.mkdir()
    return {"good": good, "tiny": tiny, "missing": tmp_path / "missing.jpg", "empty": empty,
            "text": text, "truncated": truncated, "header": header, "folder": folder}


def messages(caplog, level: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelname == level]


# ------------------------------------------------------------------------- reading the photos


def test_every_readable_photo_is_read_and_each_unreadable_one_named(photos, caplog):
    order = ["good", "missing", "empty", "text", "tiny", "truncated", "header", "folder"]
    with caplog.at_level(logging.INFO, logger="glr.query"):
        batch, problems = query.photo_batch([photos[name] for name in order], PARAMS)
    # the good and the tiny photo, as extraction sees them
    assert batch is not None and batch.shape == (2, 3, SIZE, SIZE) and batch.dtype == torch.uint8
    assert batch[0, :, 0, 0].tolist() == pytest.approx([120, 30, 200], abs=4)  # JPEG rounding
    assert batch[1].eq(0).all()
    expected = {
        "good": None,
        "missing": "no such file",
        "empty": "empty file (0 bytes)",
        "text": "not an image (no image format recognised in its 19 bytes)",
        "tiny": None,
        "folder": "a folder, not a photo",
    }
    got = dict(zip(order, problems, strict=True))
    # PIL's own words in brackets: they vary with its version
    assert got["truncated"].startswith("corrupt or truncated JPEG image (image file is trunc")
    assert got["header"].startswith("corrupt or truncated image header (")
    assert {name: got[name] for name in expected} == expected
    # one error line per unreadable photo, naming its path; nothing of PIL's buffer repr
    assert messages(caplog, "ERROR") == [f"{photos[name]}: {got[name]}" for name in order
                                         if got[name] is not None]
    assert "BytesIO" not in caplog.text
    assert messages(caplog, "WARNING") == [
        f"{photos['tiny']}: only 1×1 px, under 32 px on a side: answered, but its features are "
        "a blur of a few pixels and its results and landmarks mean little"]


@pytest.mark.parametrize(("size", "warned"), [((31, 400), True), ((400, 31), True),
                                              ((32, 32), False)])
def test_a_photo_under_32_px_on_a_side_is_read_with_a_warning(tmp_path, caplog, size, warned):
    photo = jpeg(tmp_path / "photo.jpg", size)
    with caplog.at_level(logging.WARNING, logger="glr.query"):
        pixels = query.read_photo(photo, PARAMS)
    assert pixels.shape == (3, SIZE, SIZE)
    assert messages(caplog, "WARNING") == ([
        f"{photo}: only {size[0]}×{size[1]} px, under 32 px on a side: answered, but its "
        "features are a blur of a few pixels and its results and landmarks mean little"]
        if warned else [])


def test_no_readable_photo_gives_no_batch(photos):
    batch, problems = query.photo_batch([photos["missing"], photos["empty"]], PARAMS)
    assert batch is None and problems == ["no such file", "empty file (0 bytes)"]


# ------------------------------------------------------------------------------- --out


def test_out_must_be_a_file_in_an_existing_folder_with_a_picture_suffix(tmp_path):
    query.check_out(tmp_path / "m.png")  # fine: nothing raised, nothing created
    assert list(tmp_path.iterdir()) == []
    missing = tmp_path / "missing" / "dir" / "x.png"
    with pytest.raises(UserError) as error:
        query.check_out(missing)
    assert str(error.value) == (f"--out {missing}: the folder {missing.parent} does not exist; "
                                "create it first")
    assert not (tmp_path / "missing").exists()
    (tmp_path / "file").write_text("")
    with pytest.raises(UserError, match=r"the folder .*file is not a folder"):
        query.check_out(tmp_path / "file" / "x.png")
    with pytest.raises(UserError, match="is a folder; name a file"):
        query.check_out(tmp_path)
    with pytest.raises(UserError, match=r"no picture format for the suffix '\.pgn'"):
        query.check_out(tmp_path / "m.pgn")


# ----------------------------------------------------------------------------- precision


@pytest.mark.parametrize("precision", ["auto", "fp32"])
def test_photos_are_embedded_in_train_precision(monkeypatch, precision):
    """embed_photos asks for train.precision's autocast, not a fixed "auto"."""
    asked = []

    def spy(device, value):
        asked.append((device.type, value))
        return nullcontext(), None

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.AdaptiveAvgPool2d(1),
                                torch.nn.Flatten())
    monkeypatch.setattr(query, "precision_context", spy)
    monkeypatch.setattr(query, "load_model", lambda folder: (model, None))
    params = parse_params({"train": {"precision": precision}})
    batch = torch.randint(0, 256, (2, 3, SIZE, SIZE), dtype=torch.uint8)
    features = query.embed_photos(batch, Path("unused"), params)
    assert asked == [("cpu", precision)]
    assert features.dtype == np.float16 and features.shape == (2, 8)
    assert np.linalg.norm(features.astype(np.float32), axis=1) == pytest.approx(1, abs=1e-3)


# ------------------------------------------------------------------- the flow, faked search


@pytest.fixture
def pipeline(tmp_path, monkeypatch):
    """A trained-model folder, a label table, and embedding and search replaced by fakes that
    record what they were given: photo i's features are [i, 0], its results name it."""
    backbone = PARAMS.model.backbones[0]
    models = tmp_path / "models"
    (models / backbone / query.last_phase(PARAMS, backbone)).mkdir(parents=True)
    (models / backbone / query.last_phase(PARAMS, backbone) / "config.json").write_text("{}")
    labels = tmp_path / "labels.parquet"
    pd.DataFrame({"label": [0, 1], "landmark_id": [1234, 5678],
                  "category": ["Category:Tower", "Category:Bridge"]}).to_parquet(labels)
    seen: dict[str, object] = {}

    def embed_photos(batch, model_dir, params):
        seen["batch"] = tuple(batch.shape)
        return np.stack([[i, 0.0] for i in range(len(batch))]).astype(np.float16)

    def search_photos(features, params, features_dir, tags_dir, top):
        rows = features[backbone][:, 0].astype(int).tolist()
        seen["rows"] = rows
        results = [[(f"index{row}a", 0.9), (f"index{row}b", 0.5)][:top] for row in rows]
        return results, [{1: 0.75, 0: 0.25} for _ in rows]

    monkeypatch.setattr(query, "embed_photos", embed_photos)
    monkeypatch.setattr(query, "search_photos", search_photos)
    monkeypatch.setattr(visualize, "read_images", lambda *args: {})  # no shards: blank tiles
    return {"models_dir": models, "features_dir": tmp_path / "features",
            "tags_dir": tmp_path / "tags", "labels_table": labels,
            "shard_dir": tmp_path / "shards", "seen": seen}


def run(pipeline: dict, photos: list[Path], **options) -> list[dict]:
    settings = {key: value for key, value in pipeline.items() if key != "seen"}
    settings.update({"top": 2, "as_json": False, "out_png": None} | options)
    return query.main(PARAMS, photos, **settings)


def answer(photo: Path, row: int) -> dict:
    return {"photo": str(photo),
            "index": [{"id": f"index{row}a", "score": 0.9}, {"id": f"index{row}b", "score": 0.5}],
            "landmarks": [{"landmark_id": 5678, "label": 1, "category": "Category:Bridge",
                           "score": 0.75},
                          {"landmark_id": 1234, "label": 0, "category": "Category:Tower",
                           "score": 0.25}]}


def test_readable_photos_are_answered_and_unreadable_ones_keep_their_place(
        pipeline, photos, tmp_path, capsys, caplog):
    given = [photos["good"], photos["empty"], photos["tiny"], photos["missing"]]
    out = tmp_path / "m.png"
    with caplog.at_level(logging.INFO, logger="glr.query"):
        report = run(pipeline, given, as_json=True, out_png=out)
    assert report == [answer(photos["good"], 0),
                      {"photo": str(photos["empty"]), "error": "empty file (0 bytes)"},
                      answer(photos["tiny"], 1),
                      {"photo": str(photos["missing"]), "error": "no such file"}]
    assert json.loads(capsys.readouterr().out) == report
    # only the readable photos were embedded and searched
    assert pipeline["seen"] == {"batch": (2, 3, SIZE, SIZE), "rows": [0, 1]}
    assert messages(caplog, "ERROR") == [f"{photos['empty']}: empty file (0 bytes)",
                                         f"{photos['missing']}: no such file"]
    assert len(messages(caplog, "WARNING")) == 1 and str(photos["tiny"]) in caplog.text
    # the precision, logged once as training logs it
    cpu = torch.device("cpu")
    assert [m for m in messages(caplog, "INFO") if m.startswith("precision:")] == [
        f"precision: {precision_name(cpu, PARAMS.train.precision)}"]
    # the picture: one row per answered photo, the photo and its 2 results
    width = visualize.TILE + 2 * visualize.BORDER
    height = width + visualize.STRIP
    with Image.open(out) as picture:
        assert picture.size == (3 * width + 8, 2 * height)


def test_the_text_output_says_which_photos_were_not_answered(pipeline, photos, capsys):
    run(pipeline, [photos["text"], photos["good"]])
    assert capsys.readouterr().out.splitlines() == [
        str(photos["text"]),
        "  not answered: not an image (no image format recognised in its 19 bytes)",
        str(photos["good"]),
        "    1. index0a  0.9000",
        "    2. index0b  0.5000",
        "  landmarks:",
        "    0.75  5678  Category:Bridge",
        "    0.25  1234  Category:Tower",
    ]


def test_no_readable_photo_is_an_error_before_any_model_work(pipeline, photos, caplog):
    with pytest.raises(UserError) as error:
        run(pipeline, [photos["empty"], photos["folder"]])
    assert str(error.value) == ("no photo could be read (2 given, each named above with its "
                                "problem): nothing to search")
    assert pipeline["seen"] == {}
    assert messages(caplog, "ERROR") == [f"{photos['empty']}: empty file (0 bytes)",
                                         f"{photos['folder']}: a folder, not a photo"]


def test_a_missing_out_folder_is_refused_before_the_photos_are_read(pipeline, photos, tmp_path,
                                                                   caplog):
    out = tmp_path / "missing" / "dir" / "x.png"
    with pytest.raises(UserError, match="does not exist; create it first"):
        run(pipeline, [photos["good"]], out_png=out)
    assert pipeline["seen"] == {} and not caplog.records
    assert not (tmp_path / "missing").exists()

