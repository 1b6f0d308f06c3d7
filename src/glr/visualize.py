"""Stage `visualize`: a picture of retrieval results for `dvc plots` and for people.

For a few validation queries (the first N in id order, so the picture is comparable across
experiments): the query, then its top-k index images of the final ranking, each framed green
when it is a ground-truth image and red when it is not, with the query's AP@100 in the
label strip. Images come from the query and evaluation-index shards. The picture is logged
with DVCLive (`log_image`) into `<live dir>/plots/images/retrieval.png`, default
metrics/visualize/, which dvc.yaml declares as a plot: `dvc plots show` shows it.
"""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import pyarrow.parquet as pq
from PIL import Image, ImageDraw

from glr import metric, shards

TILE = 112
BORDER = 5
STRIP = 16
GREEN, RED, BLUE, GREY = (30, 170, 60), (210, 40, 40), (40, 90, 210), (150, 150, 150)
PICTURE = "retrieval.png"


def read_images(shard_dir: Path, groups: list[str], wanted: set[str]) -> dict[str, bytes]:
    """JPEG bytes of the wanted ids, read from the groups' shards."""
    found: dict[str, bytes] = {}
    for url in shards.shard_urls(shard_dir, groups):
        with tarfile.open(url) as tar:
            for member in tar:
                image_id = member.name.split(".")[0].split("_")[0]
                if member.name.endswith(".jpg") and image_id in wanted:
                    found[image_id] = tar.extractfile(member).read()
    return found


def tile(data: bytes | None, frame: tuple[int, int, int], label: str) -> Image.Image:
    """One framed thumbnail with a label strip under it."""
    canvas = Image.new("RGB", (TILE + 2 * BORDER, TILE + 2 * BORDER + STRIP), frame)
    if data is not None:
        with Image.open(io.BytesIO(data)) as image:
            thumb = image.convert("RGB")
            thumb.thumbnail((TILE, TILE))
        canvas.paste(thumb, (BORDER + (TILE - thumb.width) // 2,
                             BORDER + (TILE - thumb.height) // 2))
    draw = ImageDraw.Draw(canvas)
    draw.rectangle([0, TILE + 2 * BORDER, canvas.width, canvas.height], fill=(255, 255, 255))
    draw.text((3, TILE + 2 * BORDER + 2), label, fill=(0, 0, 0))
    return canvas


def render(rows: list[tuple[str, list[str], frozenset[str] | None, float | None]],
           images: dict[str, bytes], top: int) -> Image.Image:
    """rows: (query id, ranked index ids, ground truth, AP) → a grid image. Without a ground
    truth (None: `glr query`'s photos) the results are framed grey and the query unlabelled."""
    width, height = TILE + 2 * BORDER, TILE + 2 * BORDER + STRIP
    grid = Image.new("RGB", ((top + 1) * width + 8, len(rows) * height), (255, 255, 255))
    for r, (query, ranked, truth, ap) in enumerate(rows):
        label = "query" if ap is None else f"AP {ap:.2f}"
        grid.paste(tile(images.get(query), BLUE, label), (0, r * height))
        for c, image_id in enumerate(ranked[:top]):
            frame = GREY if truth is None else GREEN if image_id in truth else RED
            grid.paste(tile(images.get(image_id), frame, f"#{c + 1}"),
                       (8 + (c + 1) * width, r * height))
    return grid


def main(retrieval_dir: Path, shard_dir: Path, solution_csv: Path, live_dir: Path,
         queries: int = 8, top: int = 8) -> Path:
    """Draw the picture and log it with DVCLive into `live_dir` (emptied first); returns the
    picture's path."""
    from dvclive import Live  # imports DVC: only where the stage runs

    listing = json.loads((Path(retrieval_dir) / "variants.json").read_text())
    table = pq.read_table(Path(retrieval_dir) / "topk" / f"{listing['final']}.parquet",
                          columns=["id", "images"]).to_pydict()
    ranking = dict(zip(table["id"], table["images"], strict=True))
    solution = metric.read_solution_csv(solution_csv)
    chosen = sorted(q for q in ranking if q in solution and solution[q].scored)[:queries]
    rows = [(q, ranking[q], solution[q].truth,
             metric.average_precision(ranking[q], solution[q].truth)) for q in chosen]
    wanted = set(chosen) | {i for q in chosen for i in ranking[q][:top]}
    images = read_images(Path(shard_dir), ["query", "eval_index"], wanted)
    live_dir = Path(live_dir)
    shutil.rmtree(live_dir, ignore_errors=True)  # nothing of an earlier run stays
    live = Live(str(live_dir), dvcyaml=False, save_dvc_exp=False)
    live.log_image(PICTURE, render(rows, images, top))
    # no live.end(): it would add an empty metrics.json; log_image has written the file
    return live_dir / "plots" / "images" / PICTURE
