"""`glr bench loader`: training-loader images/s per core, glr's shards versus the authors' way.

Both loaders see the same images, generated at a GLDv2-like size (800×600 by default), and do
the whole per-sample work of the recipe's training input, on one core (torch and OpenCV held
to one thread, no DataLoader workers):

- glr: webdataset shards pre-resized by `glr shard` (each `shard.resize` mode measured:
  square, the default, cover and fit), JPEG draft decoding, square resize, flip, pad + crop
  and random erasing on uint8, then the batched normalization (counted here, though training
  runs it on the device).
- authors' style: cv2.imread of the original JPEG from the directory tree, cv2.resize to the
  square size, then torchvision's RandomHorizontalFlip, Pad, RandomCrop, ToTensor, Normalize
  and RandomErasing(p=1, value=0).

Rounds alternate between the loaders so that both see the same machine state; the median rate
of each is reported, and their ratio. Results go to metrics/bench/loader.json.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import platform
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch

from glr import prepare, shards, synth
from glr.data import TrainStream, TrainTransform, normalize
from glr.gldv2 import Layout
from glr.params import Params, parse_params

log = logging.getLogger(__name__)

MODES = ("square", "cover", "fit")
SIZES = {256: 10, 512: 20}  # training size → pad, as in the recipe
TARGETS = {256: 1.5, 512: 2.0}
BATCH = 32


def authors_transform(size: int, pad: int):
    """The authors' per-sample pipeline: cv2 read + resize, then torchvision transforms."""
    try:
        import cv2
    except ImportError:
        from glr.errors import UserError

        raise UserError("glr bench loader times the authors' cv2 pipeline against glr's: "
                        "install OpenCV with `pip install -e '.[bench]'`") from None
    import torchvision.transforms as T
    from PIL import Image

    augment = T.Compose([
        T.RandomHorizontalFlip(p=0.5), T.Pad(pad), T.RandomCrop((size, size)), T.ToTensor(),
        T.Normalize(mean=[0.485, 0.456, 0.406], std=[0.2235, 0.2235, 0.2235]),
        T.RandomErasing(p=1.0, scale=(0.02, 0.2), ratio=(0.3, 3.3), value=0),
    ])

    def load(path: str) -> torch.Tensor:
        image = cv2.imread(path, cv2.IMREAD_COLOR)
        image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
        image = cv2.resize(image, (size, size))
        return augment(Image.fromarray(image))

    return load


def time_authors(paths: list[str], size: int, pad: int) -> float:
    """Images/s of the authors'-style loader over `paths` (batches of BATCH stacked)."""
    load = authors_transform(size, pad)
    start = time.perf_counter()
    for first in range(0, len(paths), BATCH):
        torch.stack([load(p) for p in paths[first: first + BATCH]])
    return len(paths) / (time.perf_counter() - start)


def time_glr(shard_dir: Path, groups: list[str], count: int, size: int, pad: int,
             seed: int) -> float:
    """Images/s of glr's training stream from shards, normalization included."""
    stream = TrainStream(shard_dir, groups, TrainTransform(size, pad), batch_size=BATCH,
                         batches_per_epoch=max(1, count // BATCH), seed=seed, shuffle_buffer=64)
    buffer = torch.empty(BATCH, 3, size, size)  # as a training step reuses its input memory
    start = time.perf_counter()
    for images, _ in stream:
        normalize(images, out=buffer)
    return BATCH * max(1, count // BATCH) / (time.perf_counter() - start)


def make_data(work: Path, image_size: tuple[int, int], max_side: int) -> tuple[Params, dict]:
    """A mini-GLDv2 of large photos, prepared and sharded in each resize mode."""
    root = work / "gldv2"
    params = parse_params({
        "data": {"root": str(root), "continent_table": str(root / "continent_codes.csv"),
                 "images_fingerprint": str(root / "images.md5")},
        "synth": {"clean_landmarks": 12, "extra_landmarks": 6, "test_landmarks": 6,
                  "distractor_landmarks": 10, "ignored_queries": 2, "clean_images": [10, 14],
                  "image_width": image_size[0], "image_height": image_size[1]},
        "shard": {"max_side": max_side, "samples_per_shard": 64},
    })
    log.info("generating %d×%d photos under %s", *image_size, root)
    synth.generate(params.synth, root, progress=False)
    prepare.main(params, work / "prepared", work / "prepare.json")
    shard_dirs = {}
    for mode in MODES:
        moded = dataclasses.replace(params, shard=dataclasses.replace(params.shard, resize=mode))
        shard_dirs[mode] = work / f"shards-{mode}"
        shards.main(moded, work / "prepared", shard_dirs[mode], work / f"shard-{mode}.json",
                    progress=False)
    return params, shard_dirs


def main(out: Path, image_size: tuple[int, int] = (800, 600), count: int = 256,
         rounds: int = 3, workdir: Path | None = None) -> dict:
    torch.set_num_threads(1)
    import cv2

    cv2.setNumThreads(1)
    with tempfile.TemporaryDirectory(prefix="glr-bench-loader-") as tmp:
        work = Path(workdir) if workdir else Path(tmp)
        params, shard_dirs = make_data(work, image_size, max(SIZES))
        groups = shards.read_lists(shard_dirs["square"])["full"]
        train = prepare.read_list(work / "prepared" / "full.parquet")
        layout = Layout(Path(params.data.root))
        paths = [str(layout.image_path("train", i)) for i in train["id"]]
        random.Random(0).shuffle(paths)
        count = min(count, len(paths))
        results = {}
        for size, pad in SIZES.items():
            rates: dict[str, list[float]] = {"authors": [], **{f"glr_{m}": [] for m in MODES}}
            time_glr(shard_dirs["square"], groups, BATCH, size, pad, seed=99)  # warm caches
            time_authors(paths[:BATCH], size, pad)
            for r in range(rounds):
                rates["authors"].append(time_authors(paths[:count], size, pad))
                for mode in MODES:
                    rates[f"glr_{mode}"].append(
                        time_glr(shard_dirs[mode], groups, count, size, pad, seed=r))
            medians = {name: statistics.median(values) for name, values in rates.items()}
            results[str(size)] = {
                "images_per_s_per_core": {k: round(v, 1) for k, v in medians.items()},
                **{f"ratio_{m}": round(medians[f"glr_{m}"] / medians["authors"], 2)
                   for m in MODES},
                "target_ratio": TARGETS[size],
                "pad": pad,
            }
            log.info("size %d: authors %.1f img/s; glr %s", size, medians["authors"],
                     ", ".join(f"{m} {medians['glr_' + m]:.1f} "
                               f"({results[str(size)]['ratio_' + m]:.2f}x)" for m in MODES))
    result = {
        "benchmark": "loader",
        "source_image_size": list(image_size),
        "shard_max_side": max(SIZES),
        "images_per_round": count,
        "rounds": rounds,
        "threads": 1,
        "sizes": results,
        "default_resize": "square",
        "meets_targets": all(r["ratio_square"] >= r["target_ratio"] for r in results.values()),
        "machine": {"python": platform.python_version(), "platform": platform.platform(),
                    "torch": torch.__version__},
    }
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    log.info("-> %s", out)
    return result
