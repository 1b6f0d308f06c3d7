"""`glr query PHOTO...`: search the trained system with new photos.

Each photo gets the preprocessing its features would get in the pipeline: `glr shard`'s resize
and JPEG re-encoding (`shard.max_side`, `shard.resize`, `shard.jpeg_quality`), extraction's square
resize to `model.size` and normalization; each backbone of `model.backbones` embeds it with
the model `glr extract` used (`models/<backbone>/<phase>/`, `extract.scales`), and the
features are rounded to float16 as the cached ones are. The search is the retrieve stage's own
code (`glr.retrieve`): the cosine against the cached index features (`data/features/`), the
Landmark-Country rerank with the index images' tags that `glr tag` stored
(`data/tags/`) and the photos' own tags from the cached reference features, the
weighted ensemble. Per photo: the top index images with their scores, and the most likely
landmarks: the photos' landmark tags (the top-3 vote of the rerank), averaged over the
backbones with the ensemble weights, as GLDv2 train landmark ids and their categories.

Every readable photo is answered; an unreadable one (a missing or empty file, a folder, a file
that is not an image, a corrupt or truncated image) is named with its problem in a one-line
error, and in the output it keeps its place with the problem instead of results: in --json an
entry `{"photo": PATH, "error": PROBLEM}` (answered photos have "photo", "index" and
"landmarks"), in the text output the path and `  not answered: PROBLEM`. The command fails
(rc 2) only when no photo could be read. A photo under MIN_SIDE pixels on a side is answered
with a warning: its results carry little. `--out`'s folder must exist: it is checked before
any model is loaded. The models compute in `train.precision`, the one precision setting every
stage follows, logged once.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image, UnidentifiedImageError

from glr import retrieve, search, shards, tag
from glr.data import EvalTransform, normalize
from glr.errors import UserError
from glr.extract import embed, last_phase, scaled_sides
from glr.model.folder import load_model
from glr.params import Params
from glr.runtime import (
    cpu_kernels_name,
    pin_cpu_kernels,
    precision_context,
    precision_name,
)

log = logging.getLogger(__name__)


# A photo smaller than this on a side is answered with a warning. The backbones reduce their
# input 32-fold to the last feature map, so such a photo is less than one cell of it at its own
# size: upscaled to model.size it is a blur whose features carry no landmark detail, yet the
# rerank's vote still names landmarks with confident-looking weights. (`glr synth --size`
# refuses the same minimum.)
MIN_SIDE = 32


class UnreadablePhoto(Exception):
    """A photo that cannot be answered; the message is the problem in words (no path)."""


def read_photo(path: Path, params: Params) -> torch.Tensor:
    """One photo as the extraction stage sees it: uint8 (3, size, size). Raises
    `UnreadablePhoto` with the problem in words; warns (naming the path and its size) about a
    photo under MIN_SIDE pixels on a side."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise UnreadablePhoto("no such file") from None
    except IsADirectoryError:
        raise UnreadablePhoto("a folder, not a photo") from None
    except PermissionError:
        raise UnreadablePhoto("cannot be read: permission denied") from None
    except OSError as err:
        raise UnreadablePhoto(f"cannot be read: {err.strerror or err}") from None
    if not data:
        raise UnreadablePhoto("empty file (0 bytes)")
    try:
        # PIL's own message for this names an in-memory buffer, not the file: say it in words
        with Image.open(io.BytesIO(data)) as image:
            kind, (width, height) = image.format or "image", image.size
    except UnidentifiedImageError:
        raise UnreadablePhoto(f"not an image (no image format recognised in its {len(data)} "
                              "bytes)") from None
    except Image.DecompressionBombError as err:
        raise UnreadablePhoto(f"too large to decode safely ({err})") from None
    except (OSError, ValueError, SyntaxError, EOFError) as err:
        raise UnreadablePhoto(f"corrupt or truncated image header ({err})") from None
    try:
        data, _ = shards.prepare_image(data, params.shard.max_side, params.shard.resize,
                                       params.shard.jpeg_quality)
        pixels = EvalTransform(params.model.size)(data)
    except Image.DecompressionBombError as err:
        raise UnreadablePhoto(f"too large to decode safely ({err})") from None
    except (OSError, ValueError, SyntaxError, EOFError) as err:
        # PIL raises these for damaged data (SyntaxError and EOFError from some decoders)
        raise UnreadablePhoto(f"corrupt or truncated {kind} image ({err})") from None
    if min(width, height) < MIN_SIDE:
        log.warning("%s: only %d×%d px, under %d px on a side: answered, but its features are "
                    "a blur of a few pixels and its results and landmarks mean little", path,
                    width, height, MIN_SIDE)
    return pixels


def photo_batch(paths: list[Path], params: Params
                ) -> tuple[torch.Tensor | None, list[str | None]]:
    """The readable photos as the extraction stage sees them, uint8 (n, 3, size, size) (None
    when none is readable), and per given photo its problem (None when it was read). Each
    unreadable photo is logged as an error naming its path and its problem."""
    images, problems = [], []
    for path in paths:
        try:
            images.append(read_photo(path, params))
            problems.append(None)
        except UnreadablePhoto as err:
            log.error("%s: %s", path, err)
            problems.append(str(err))
    return (torch.stack(images) if images else None), problems


def check_out(out: Path) -> None:
    """Refuse, before any model work, an --out the picture cannot be saved to: a folder that
    does not exist (it is not created: a typo would otherwise grow a tree), a path that is a
    folder, a suffix PIL has no format for."""
    out = Path(out)
    folder = out.parent
    if not folder.is_dir():
        what = "is not a folder" if folder.exists() else "does not exist"
        raise UserError(f"--out {out}: the folder {folder} {what}; create it first")
    if out.is_dir():
        raise UserError(f"--out {out}: is a folder; name a file, e.g. {out / 'query.png'}")
    if out.suffix.lower() not in Image.registered_extensions():
        raise UserError(f"--out {out}: no picture format for the suffix {out.suffix!r}; "
                          "use .png")


def embed_photos(batch: torch.Tensor, model_dir: Path, params: Params) -> np.ndarray:
    """Float16 features (n, d) of a uint8 batch with the model in `model_dir`."""
    model, _ = load_model(model_dir)
    model = model.to(memory_format=torch.channels_last).eval()
    sides = scaled_sides(params.model.size, params.extract.scales)
    # train.precision, the one precision setting every stage follows, so that a photo of an
    # indexed image gets the features the extraction stage gave it
    autocast, _ = precision_context(torch.device("cpu"), params.train.precision)
    with torch.inference_mode():
        features = embed(model, normalize(batch), sides, autocast)
    return features.numpy().astype(np.float16)


def search_photos(photo_features: dict[str, np.ndarray], params: Params, features_dir: Path,
                  tags_dir: Path, top: int, backend: search.Backend | None = None
                  ) -> tuple[list[list[tuple[str, float]]], list[dict[int, float]]]:
    """Per photo: the `top` index images (id, score) of the ensemble ranking and its label
    tags {global label: weight} averaged over the backbones."""
    settings = params.retrieve
    backbones = params.model.backbones
    weights = settings.weights or [1.0] * len(backbones)
    total = None
    votes: list[dict[int, float]] = []
    index_ids: list[str] = []
    for backbone, weight in zip(backbones, weights, strict=True):
        features = retrieve.load_features(Path(features_dir) / backbone)
        features = dataclasses.replace(features, query=photo_features[backbone].astype(
            np.float32))
        index_ids = features.index_ids
        rows = slice(0, len(features.query))
        tags = None
        if settings.rerank:
            codes = tag.country_codes(features.ref_countries)
            index_tags = tag.read_index_tags(Path(tags_dir) / f"{backbone}.parquet",
                                             index_ids, codes)
            tags = retrieve.backbone_tags(features, settings, codes, backend, index_tags)
            votes = votes or [{} for _ in range(len(features.query))]
            for photo, (slots, slot_weights) in enumerate(
                    zip(tags.queries.labels, tags.queries.label_weights, strict=True)):
                for label, share in zip(slots, slot_weights, strict=True):
                    if label >= 0:
                        votes[photo][int(label)] = votes[photo].get(int(label), 0.0) + (
                            weight * float(share) / sum(weights))
        plain, reranked = retrieve.chunk_scores(features, rows, settings, tags, None)
        scores = reranked if reranked is not None else plain
        total = weight * scores if total is None else total + weight * scores
    assert total is not None
    order, best = retrieve.rerank.top_k_ids(total, top)
    results = [[(index_ids[j], float(s)) for j, s in zip(row, scores, strict=True)]
               for row, scores in zip(order, best, strict=True)]
    votes = votes or [{} for _ in results]
    return results, [dict(sorted(v.items(), key=lambda kv: (-kv[1], kv[0]))) for v in votes]


def main(params: Params, photos: list[Path], *, top: int, models_dir: Path, features_dir: Path,
         tags_dir: Path, labels_table: Path, as_json: bool, out_png: Path | None,
         shard_dir: Path) -> list[dict]:
    """Embed, search, print; optionally draw the results. Returns the report: per photo, in
    the given order, its results or its problem (see the module docstring)."""
    if out_png is not None:
        check_out(out_png)
    batch, problems = photo_batch(photos, params)
    if batch is None:
        raise UserError(f"no photo could be read ({len(photos)} given, each named above with "
                          "its problem): nothing to search")
    answered = [photo for photo, problem in zip(photos, problems, strict=True) if problem is None]
    device = torch.device("cpu")
    # the extraction stage's kernels, threads and precision: a photo of an indexed image gets
    # the features the stage gave it
    pin_cpu_kernels(params.train.cpu_kernels, params.train.cpu_threads)
    log.info("cpu: %s", cpu_kernels_name(params.train.cpu_kernels))
    log.info("precision: %s", precision_name(device, params.train.precision))
    photo_features = {}
    for backbone in params.model.backbones:
        phase = params.extract.phase or last_phase(params, backbone)
        model_dir = Path(models_dir) / backbone / phase
        if not (model_dir / "config.json").is_file():
            raise UserError(f"{model_dir}: no trained model; run `dvc repro` first")
        photo_features[backbone] = embed_photos(batch, model_dir, params)
    results, votes = search_photos(photo_features, params, features_dir, tags_dir, top)
    if not Path(labels_table).is_file():
        raise UserError(f"{labels_table}: no label table; run `dvc repro prepare` first")
    landmarks = pd.read_parquet(labels_table, columns=["label", "landmark_id", "category"])
    pairs = zip(landmarks["landmark_id"], landmarks["category"], strict=True)
    landmark_of = dict(zip(landmarks["label"], pairs, strict=True))
    answers = []
    for photo, ranked, vote in zip(answered, results, votes, strict=True):
        answers.append({
            "photo": str(photo),
            "index": [{"id": image_id, "score": round(score, 6)} for image_id, score in ranked],
            "landmarks": [{"landmark_id": int(landmark_of[label][0]), "label": label,
                           "category": landmark_of[label][1], "score": round(share, 6)}
                          for label, share in vote.items()],
        })
    # every photo keeps its place in the output, the unreadable ones with their problem
    answer = iter(answers)
    report = [next(answer) if problem is None else {"photo": str(photo), "error": problem}
              for photo, problem in zip(photos, problems, strict=True)]
    if as_json:
        print(json.dumps(report, indent=2))
    else:
        for entry in report:
            print(entry["photo"])
            if "error" in entry:
                print(f"  not answered: {entry['error']}")
                continue
            for rank, hit in enumerate(entry["index"], 1):
                print(f"  {rank:3d}. {hit['id']}  {hit['score']:.4f}")
            print("  landmarks:" + ("" if entry["landmarks"] else " none (no rerank)"))
            for guess in entry["landmarks"]:
                print(f"    {guess['score']:.2f}  {guess['landmark_id']}  {guess['category']}")
    if out_png is not None:
        draw(answers, answered, Path(shard_dir), Path(out_png))
    return report


def draw(report: list[dict], photos: list[Path], shard_dir: Path, out: Path) -> Path:
    """The (answered) photos and their top index images, like the visualize stage's picture.
    The folder of `out` must exist (`check_out`)."""
    from glr import visualize

    wanted = {hit["id"] for entry in report for hit in entry["index"]}
    images = visualize.read_images(shard_dir, ["eval_index"], wanted)
    rows = []
    for number, (entry, photo) in enumerate(zip(report, photos, strict=True)):
        key = f"photo-{number}"
        images[key] = Path(photo).read_bytes()
        rows.append((key, [hit["id"] for hit in entry["index"]], None, None))
    top = max(len(entry["index"]) for entry in report)
    visualize.render(rows, images, top).save(out)
    log.info("wrote %s", out)
    return out
