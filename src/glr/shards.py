"""Stage `shard`: GLDv2 images → webdataset tar shards, grouped for sampling, pre-resized.

Groups. The training images are split into disjoint groups, (list increment) × continent:

    clean       the images of train_clean.csv                       (clean)
    c2x_extra   the noisy extras of clean landmarks: c2x − clean     (noisy)
    full_extra  the images of landmarks absent from clean: full − c2x (noisy)
    index       index images mapped into `all`                       (clean, as the authors did)
    test        labelled test images in `all` (none when validation queries are held out)

so that every training list is a union of groups (`clean` = clean; `c2x` = + c2x_extra;
`full` = + full_extra; `all` = + index + test) and the continent-aware sampler mixes group
streams with fixed probabilities without reading data it discards. The reference set for
feature extraction is the union of the training groups but `test` (no second copy of 4.9M
images). The validation queries (`query`) and the evaluation index (`eval_index`) get their own
groups.
Test images with label −1 are no training target and no reference: they are not sharded.

Samples are `<key>.jpg` + `<key>.json` (id, split, label, clean, country, continent). Within a
group the samples are shuffled once with a fixed seed (so each shard mixes many labels) and cut
into shards of `samples_per_shard`: the assignment depends only on the prepared tables and the
params, never on worker count or interruptions. Each shard is written under a temporary name and
renamed when complete, with a small `<shard>.info.json` (samples, bytes, sha256, bad images and a
fingerprint of its plan and settings); a rerun keeps every shard whose fingerprint still matches
and writes only the rest. Per group, `manifest.json` lists shard files, sample counts, bytes and
sha256; `train/lists.json` says which groups make each list; `report.json` lists skipped
images. Training groups are written under `train/`, `query` and `eval_index` under `eval/`.

Pre-resizing: an image with a side longer than training at `max_side` needs is downscaled and
re-encoded (see `target_size`: `square`, the default, clamps each side to max_side, which the
recipe's square resize makes lossless; `cover` and `fit` keep the aspect ratio). Other JPEGs are
copied byte for byte; EXIF-rotated or non-JPEG images are re-encoded upright as JPEG.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import io
import json
import logging
import os
import re
import shutil
import tarfile
from concurrent.futures import FIRST_EXCEPTION, wait
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageOps

from glr import files, gldv2
from glr.errors import ShardError
from glr.params import Params, ShardParams
from glr.progress import progress_bar
from glr.workers import process_pool

log = logging.getLogger(__name__)

INCREMENTS = ("clean", "c2x_extra", "full_extra", "index", "test")
LIST_INCREMENTS = {
    "clean": ("clean",),
    "c2x": ("clean", "c2x_extra"),
    "full": ("clean", "c2x_extra", "full_extra"),
    "all": INCREMENTS,
}
EVAL_GROUPS = ("query", "eval_index")
SHARD_FORMAT = 1  # bump when the bytes a shard holds for the same plan change


class DiskFullError(ShardError):
    """The disk filled up while a shard was written (raised in a worker, completed by the
    parent with the space the remaining shards need)."""

    def __init__(self, path: str, free: int, written: int, samples: int):
        super().__init__(path, free, written, samples)  # args: picklable across processes
        self.path, self.free, self.written, self.samples = path, free, written, samples

    def __str__(self) -> str:
        return (f"{self.path}: no space left on the device while writing this shard "
                f"({human_bytes(self.free)} free)")


def human_bytes(count: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(count) < 1000 or unit == "TB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000
    raise AssertionError("unreachable")


# --------------------------------------------------------------------------- planning


def continent_slug(continent: str) -> str:
    return continent.lower().replace(" ", "_")


def group_name(increment: str, continent: str) -> str:
    return f"{increment}-{continent_slug(continent)}"


def assign_groups(all_list: pd.DataFrame, num_clean_labels: int) -> pd.DataFrame:
    """The labelled rows of `all`, each with its increment and group; vectorized.

    `all` holds every training image (one row per image and label); prepare's rules make the
    increments readable from each row: a train image with a clean landmark's label is in
    `clean` if its clean flag is set (it is in that landmark's clean list) and a `c2x` extra
    otherwise; a train image with a later label is a `full` extra; index and test rows are
    their split.
    """
    rows = all_list[all_list["label"] >= 0].reset_index(drop=True)
    split = rows["split"].astype(str).to_numpy()
    label = rows["label"].to_numpy()
    clean = rows["clean"].to_numpy(dtype=bool)
    increment = np.select(
        [(split == "train") & (label < num_clean_labels) & clean,
         (split == "train") & (label < num_clean_labels),
         split == "train", split == "index"],
        ["clean", "c2x_extra", "full_extra", "index"], default="test")
    continent = rows["continent"].astype(str)
    rows["increment"] = increment
    rows["group"] = pd.Series(increment, index=rows.index) + "-" + continent.map(continent_slug)
    return rows


def list_groups(groups: pd.DataFrame) -> dict[str, list[str]]:
    """Which groups make each list, and the reference set: every training group but the test
    images' (the authors' references are `full` + index images; a test image must never be a
    reference, or the rerank would tag a validation query with its own label)."""
    names = groups.drop_duplicates("group")
    result = {name: sorted(names.loc[names["increment"].isin(incs), "group"])
              for name, incs in LIST_INCREMENTS.items()}
    result["reference"] = sorted(names.loc[names["increment"] != "test", "group"])
    return result


@dataclass(frozen=True)
class ShardTask:
    """One shard to write: its group, file name and planned samples (a table slice)."""

    group: str
    name: str
    rows: pd.DataFrame  # id, split, and the metadata columns stored with each sample
    images: str = ""  # digest of the images fingerprint entries of its rows (image_digests)

    def keys(self) -> list[str]:
        """Sample keys: the id, plus the label in training groups (an image can carry two)."""
        ids = self.rows["id"].astype(str)
        if "label" not in self.rows or self.group in EVAL_GROUPS:
            return ids.tolist()
        return (ids + "_" + self.rows["label"].astype(str)).tolist()

    def metas(self) -> list[str]:
        """The JSON stored with each sample."""
        columns = {}
        for name in self.rows.columns:
            values = self.rows[name]
            if name == "label":
                columns[name] = values.astype(int).tolist()
            elif name == "clean":
                columns[name] = values.astype(bool).tolist()
            else:
                columns[name] = values.astype(str).tolist()
        names = sorted(columns)
        return [json.dumps(dict(zip(names, values, strict=True)), sort_keys=True)
                for values in zip(*(columns[n] for n in names), strict=True)]


def plan_shards(frame: pd.DataFrame, group: str, samples_per_shard: int,
                seed: int | None) -> list[ShardTask]:
    """Cut one group's rows into shard tasks (shuffled with `seed`, or in order if None)."""
    if seed is not None:
        digest = int(hashlib.sha256(group.encode()).hexdigest()[:8], 16)
        frame = frame.iloc[np.random.default_rng([seed, digest]).permutation(len(frame))]
    frame = frame.reset_index(drop=True)
    return [ShardTask(group=group, name=f"{group}-{number:06d}.tar",
                      rows=frame.iloc[start: start + samples_per_shard])
            for number, start in enumerate(range(0, len(frame), samples_per_shard))]


def task_fingerprint(task: ShardTask, settings: dict) -> str:
    """What a shard's bytes depend on: its planned samples, where they are read from (root,
    source), the fingerprint entries of its images and the writer's settings."""
    digest = hashlib.sha256(json.dumps({"settings": settings, "format": SHARD_FORMAT,
                                        "columns": list(task.rows.columns),
                                        "images": task.images},
                                       sort_keys=True).encode())
    rows = task.rows.astype({c: str for c in ("split", "country", "continent", "usage")
                             if c in task.rows})
    digest.update(pd.util.hash_pandas_object(rows, index=False).to_numpy().tobytes())
    return digest.hexdigest()


# --------------------------------------------------------------------------- image fingerprints

# A per-image entry of the fingerprint file: `<split>/<a>/<b>/<c>/<id>.jpg` (what `glr synth`
# writes, and what `md5sum` over an extracted GLDv2 tree gives). Every other entry (GLDv2's
# per-archive `images_XXX.tar`, with or without a `<split>/` prefix) covers a whole split.
_IMAGE_ENTRY = r"(train|index|test)/[0-9a-f]/[0-9a-f]/[0-9a-f]/[0-9a-f]{16}\.jpg"
_MD5 = re.compile(r"^[0-9a-fA-F]{32}$")


def read_image_fingerprints(path: Path) -> pd.DataFrame:
    """The entries of an md5sum-format file (`<md5>  <path>` per line): columns md5, path."""
    path = Path(path)
    try:
        frame = pd.read_csv(path, sep=r"\s+", header=None, names=["md5", "path"], dtype=str,
                            engine="c", skip_blank_lines=True, na_filter=False)
    except FileNotFoundError:
        raise ShardError(f"{path}: images fingerprint not found (params "
                         "data.images_fingerprint; see docs/gldv2.md)") from None
    except pd.errors.EmptyDataError:
        return pd.DataFrame({"md5": [], "path": []}, dtype=str)
    except (pd.errors.ParserError, UnicodeDecodeError) as err:
        raise ShardError(f"{path}: not an md5sum-format file (`<md5>  <path>` per line): "
                         f"{str(err).strip()}") from None
    frame["path"] = frame["path"].str.removeprefix("*")  # md5sum's binary-mode marker
    bad = ~frame["md5"].str.fullmatch(_MD5.pattern) | (frame["path"] == "")
    if bad.any():
        row = int(np.flatnonzero(bad.to_numpy())[0])
        raise ShardError(f"{path}: entry {row + 1} is not `<md5>  <path>`: "
                         f"{frame['md5'].iloc[row]!r} {frame['path'].iloc[row]!r}")
    return frame


def image_digests(tasks: list[ShardTask], fingerprints: pd.DataFrame) -> tuple[list[str], int]:
    """Per task, a digest of the fingerprint entries that cover its images; vectorized.

    An image is covered by its own entry where the file has one, and by every entry that is
    no single image's (e.g. GLDv2's per-archive md5 lines) of its split. Returns the digests
    and the number of planned images that no entry covers (a change to them goes unnoticed).
    """
    fingerprints = fingerprints.astype({"md5": str, "path": str})
    # fullmatch, not extract: 1 s instead of 20 s over GLDv2's 4.9M lines
    single = fingerprints["path"].str.fullmatch(_IMAGE_ENTRY).to_numpy(dtype=bool)
    per_image = pd.Series(fingerprints["md5"].to_numpy()[single].astype(str),
                          index=fingerprints["path"].to_numpy()[single].astype(str))
    per_image = per_image[~per_image.index.duplicated(keep="last")]
    others = fingerprints[~single]
    split_digest = {}
    for split in gldv2.SPLITS:
        mine = others[others["path"].str.startswith(f"{split}/")
                      | ~others["path"].str.contains("/", regex=False)]
        lines = sorted(mine["md5"].str.lower() + "  " + mine["path"])
        split_digest[split] = (hashlib.sha256("\n".join(lines).encode()).hexdigest()
                               if lines else "")
    if not tasks:
        return [], 0
    rows = pd.concat([t.rows[["split", "id"]] for t in tasks], ignore_index=True)
    ids = rows["id"].astype(str)
    # each planned image's relative path, <split>/<a>/<b>/<c>/<id>.jpg (gldv2.image_relpath)
    keys = (rows["split"].astype(str) + "/" + ids.str.slice(0, 1) + "/" + ids.str.slice(1, 2)
            + "/" + ids.str.slice(2, 3) + "/" + ids + ".jpg")
    md5 = per_image.reindex(keys.to_numpy()).str.lower()
    covered_splits = [split for split, digest in split_digest.items() if digest]
    covered = md5.notna().to_numpy() | rows["split"].astype(str).isin(covered_splits).to_numpy()
    row_hashes = pd.util.hash_pandas_object(md5.fillna("").reset_index(drop=True),
                                            index=False).to_numpy()
    digests, start = [], 0
    for task in tasks:
        end = start + len(task.rows)
        digest = hashlib.sha256(row_hashes[start:end].tobytes())
        for split in sorted(set(task.rows["split"].astype(str))):
            digest.update(f"{split}:{split_digest.get(split, '')}".encode())
        digests.append(digest.hexdigest())
        start = end
    return digests, int((~covered).sum())


# --------------------------------------------------------------------------- sources


class TreeSource:
    """Images from an extracted GLDv2 tree: `<root>/<split>/<a>/<b>/<c>/<id>.jpg`."""

    def __init__(self, root: Path):
        self.layout = gldv2.Layout(Path(root))

    def read(self, split: str, image_id: str) -> bytes:
        return self.layout.image_path(split, image_id).read_bytes()


class TarSource:
    """Images read straight out of the official `<split>/images_XXX.tar` archives.

    The member index (id → archive, offset, size) is built once by scanning the tar headers
    (no image data is read) and saved as .npy files that worker processes memory-map.
    """

    def __init__(self, root: Path, index_dir: Path):
        self.root = Path(root)
        self.index_dir = Path(index_dir)
        self._index: dict[str, tuple[np.ndarray, ...]] = {}
        self._archives: dict[str, list[str]] = {}

    def build_index(self, splits: list[str]) -> None:
        self.index_dir.mkdir(parents=True, exist_ok=True)
        for split in splits:
            archives = sorted((self.root / split).glob("images_*.tar"))
            if not archives:
                raise ShardError(f"{self.root / split}: no images_*.tar archives "
                                 "(params shard.source is 'tar')")
            ids, which, offsets, sizes = [], [], [], []
            bar = progress_bar(archives, desc=f"index {split} tars", unit="tar")
            for number, archive in enumerate(bar):
                with tarfile.open(archive, "r:") as tar:
                    for member in tar:
                        name = os.path.basename(member.name)
                        if member.isfile() and name.endswith(".jpg"):
                            ids.append(name[:-4])
                            which.append(number)
                            offsets.append(member.offset_data)
                            sizes.append(member.size)
            keys = gldv2.hex_to_uint64(ids, f"{self.root / split} (tar member names)")
            order = np.argsort(keys)
            np.save(self.index_dir / f"{split}-ids.npy", keys[order])
            np.save(self.index_dir / f"{split}-tar.npy", np.asarray(which, np.int32)[order])
            np.save(self.index_dir / f"{split}-offset.npy", np.asarray(offsets, np.int64)[order])
            np.save(self.index_dir / f"{split}-size.npy", np.asarray(sizes, np.int64)[order])
            (self.index_dir / f"{split}-archives.json").write_text(
                json.dumps([str(a) for a in archives]))

    def _load(self, split: str) -> tuple[np.ndarray, ...]:
        if split not in self._index:
            self._index[split] = tuple(np.load(self.index_dir / f"{split}-{part}.npy",
                                               mmap_mode="r")
                                       for part in ("ids", "tar", "offset", "size"))
            self._archives[split] = json.loads(
                (self.index_dir / f"{split}-archives.json").read_text())
        return self._index[split]

    def read(self, split: str, image_id: str) -> bytes:
        ids, which, offsets, sizes = self._load(split)
        key = gldv2.hex_to_uint64([image_id])[0]
        pos = int(np.searchsorted(ids, key))
        if pos >= len(ids) or ids[pos] != key:
            raise FileNotFoundError(f"{image_id} is in no {split}/images_*.tar archive")
        with open(self._archives[split][int(which[pos])], "rb") as handle:
            handle.seek(int(offsets[pos]))
            return handle.read(int(sizes[pos]))


# --------------------------------------------------------------------------- images


def target_size(width: int, height: int, max_side: int, mode: str) -> tuple[int, int] | None:
    """The size to downscale to, or None when the image is small enough to keep as it is.

    square: each side clamped to max_side on its own (800×600 → 512×512 at 512): exactly what
            the recipe's square resize to any size ≤ max_side needs, so nothing it uses is lost.
    cover:  aspect kept, shorter side → max_side (800×600 → 683×512): lossless as well.
    fit:    aspect kept, longer side → max_side (800×600 → 512×384): the square resize then
            upsamples the shorter side, i.e. loses resolution there.
    """
    if mode == "square":
        target = (min(width, max_side), min(height, max_side))
        return None if target == (width, height) else target
    side = min(width, height) if mode == "cover" else max(width, height)
    if side <= max_side:
        return None
    scale = max_side / side
    return max(1, round(width * scale)), max(1, round(height * scale))


def prepare_image(data: bytes, max_side: int, mode: str, quality: int) -> tuple[bytes, bool]:
    """Check that `data` decodes; return (JPEG bytes to store, whether they were re-encoded).

    Raises OSError/ValueError (from PIL) for a corrupt or truncated image.
    """
    with Image.open(io.BytesIO(data)) as image:
        width, height = image.size
        orientation = image.getexif().get(0x0112, 1) if image.format == "JPEG" else 1
        target = target_size(width, height, max_side, mode)
        if target is None and image.format == "JPEG" and orientation == 1:
            # Decode at 1/8 scale: every entropy-coded byte is still read, so a truncated or
            # corrupt file fails here, at a fraction of a full decode's cost.
            image.draft("RGB", (max(1, width // 8), max(1, height // 8)))
            image.load()
            return data, False
        if target is not None:
            image.draft("RGB", target)
        picture = ImageOps.exif_transpose(image).convert("RGB")
        if target is not None:
            if orientation in (5, 6, 7, 8):  # a quarter turn swaps the sides
                target = target[::-1]
            picture = picture.resize(target, Image.Resampling.LANCZOS)
        out = io.BytesIO()
        picture.save(out, format="JPEG", quality=quality)
        return out.getvalue(), True


# --------------------------------------------------------------------------- writing


def _tar_member(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    info.mtime = 0  # fixed metadata: the same samples give the same bytes
    info.mode = 0o644
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(payload))


def write_shard(task: ShardTask, out_dir: Path, source, settings: dict) -> dict:
    """Write one shard atomically; return its info record (also saved beside it).

    A full disk raises DiskFullError after removing this shard's temporary files."""
    folder = group_dir(out_dir, task.group)
    final = folder / task.name
    tmp = folder / f".{task.name}.tmp{os.getpid()}"
    info_tmp = folder / f".{task.name}.info.json.tmp{os.getpid()}"
    try:
        return _write_shard(task, folder, tmp, info_tmp, source, settings)
    except OSError as err:
        if err.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        written = tmp.stat().st_size if tmp.exists() else 0
        samples = _samples_in(tmp)
        for path in (tmp, info_tmp):
            path.unlink(missing_ok=True)
        free = shutil.disk_usage(folder).free if folder.exists() else 0
        raise DiskFullError(str(final), free, written, samples) from None


def _samples_in(tar_path: Path) -> int:
    """Complete samples (.jpg + .json pairs) in a partly written tar; 0 when unreadable."""
    try:
        with tarfile.open(tar_path, "r:") as tar:
            return sum(1 for member in tar if member.name.endswith(".json"))
    except (OSError, tarfile.TarError):
        return 0


def _write_shard(task: ShardTask, folder: Path, tmp: Path, info_tmp: Path, source,
                 settings: dict) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / task.name
    bad, resized, samples = [], 0, 0
    ids, splits = task.rows["id"].astype(str).tolist(), task.rows["split"].astype(str).tolist()
    with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
        for image_id, split, meta, key in zip(ids, splits, task.metas(), task.keys(),
                                              strict=True):
            try:
                data = source.read(split, image_id)
            except OSError as err:
                bad.append({"id": image_id, "split": split, "problem": f"missing: {err}"})
                continue
            try:
                data, changed = prepare_image(data, settings["max_side"], settings["resize"],
                                              settings["jpeg_quality"])
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
                bad.append({"id": image_id, "split": split, "problem": f"corrupt: {err}"})
                continue
            resized += changed
            samples += 1
            _tar_member(tar, f"{key}.jpg", data)
            _tar_member(tar, f"{key}.json", meta.encode())
    digest = hashlib.sha256(tmp.read_bytes()).hexdigest()
    info = {"file": task.name, "samples": samples, "bytes": tmp.stat().st_size,
            "sha256": digest, "reencoded": resized, "bad": bad,
            "fingerprint": task_fingerprint(task, settings)}
    info_path = folder / f"{task.name}.info.json"
    info_tmp.write_text(json.dumps(info, indent=1) + "\n")
    tmp.replace(final)  # the shard first: an info file never describes a missing shard
    info_tmp.replace(info_path)
    return info


def finished_info(task: ShardTask, out_dir: Path, settings: dict) -> dict | None:
    """The info of an already written shard with the same plan and settings, else None."""
    folder = group_dir(out_dir, task.group)
    info_path = folder / f"{task.name}.info.json"
    if not (folder / task.name).is_file() or not info_path.is_file():
        return None
    try:
        info = json.loads(info_path.read_text())
    except json.JSONDecodeError:
        return None
    if info.get("fingerprint") != task_fingerprint(task, settings):
        return None
    if (folder / task.name).stat().st_size != info.get("bytes"):
        return None
    return info


_WORKER_SOURCE = None


def _init_worker(source) -> None:
    global _WORKER_SOURCE
    _WORKER_SOURCE = source
    _WORKER_DONE.update(bytes=0, samples=0)


# bytes and samples of the shards this process finished: the size per image for a full-disk
# message when the disk fills before the failing shard holds a sample (the parent may not have
# collected any finished shard yet)
_WORKER_DONE = {"bytes": 0, "samples": 0}


def _run_task(args: tuple) -> dict:
    task, out_dir, settings = args
    try:
        info = write_shard(task, out_dir, _WORKER_SOURCE, settings)
    except DiskFullError as err:
        if err.samples or not _WORKER_DONE["samples"]:
            raise
        raise DiskFullError(err.path, err.free, _WORKER_DONE["bytes"],
                            _WORKER_DONE["samples"]) from None
    _WORKER_DONE["bytes"] += info["bytes"]
    _WORKER_DONE["samples"] += info["samples"]
    return info


def write_all(tasks: list[ShardTask], out_dir: Path, source, settings: dict, workers: int,
              progress: bool = True, stop_after: int | None = None) -> dict[str, dict]:
    """Write every missing shard (in parallel); return the info of every shard by file name.

    A finished shard is kept when its fingerprint matches and it skipped no image; one that
    skipped missing or corrupt images is written again, so that restored images get in.
    `stop_after` simulates an interruption after that many newly written shards (tests).
    """
    infos: dict[str, dict] = {}
    todo, retry = [], 0
    for task in tasks:
        info = finished_info(task, out_dir, settings)
        if info is not None and info.get("bad"):
            retry += 1
            info = None
        if info is None:
            todo.append(task)
        else:
            infos[f"{task.group}/{task.name}"] = info
    if infos:
        log.info("resuming: %d of %d shards are already complete", len(infos), len(tasks))
    if retry:
        log.info("writing %d shards again that skipped missing or corrupt images, to retry "
                 "those images", retry)
    bar = progress_bar(total=sum(len(t.rows) for t in todo), desc="shard", unit="img",
                       disable=not progress)
    if stop_after is not None:
        todo = todo[:stop_after]
    try:
        for task, info in _write_tasks(todo, out_dir, source, settings, workers):
            infos[f"{task.group}/{task.name}"] = info
            bar.update(len(task.rows))
    except DiskFullError as err:
        remaining = sum(len(t.rows) for t in todo
                        if f"{t.group}/{t.name}" not in infos)
        raise ShardError(disk_full_message(err, remaining, infos.values())) from None
    finally:
        bar.close()
    if stop_after is not None:
        raise KeyboardInterrupt(f"stopped after {stop_after} shards (simulated interruption)")
    return infos


def _write_tasks(todo: list[ShardTask], out_dir: Path, source, settings: dict, workers: int):
    """(task, info) as each shard is finished; the first error stops the rest."""
    if workers <= 1 or len(todo) <= 1:
        _init_worker(source)
        for task in todo:
            yield task, _run_task((task, out_dir, settings))
        return
    pool = process_pool(workers, initializer=_init_worker, initargs=(source,))
    try:
        pending = {pool.submit(_run_task, (task, out_dir, settings)): task for task in todo}
        while pending:
            done, _ = wait(pending, return_when=FIRST_EXCEPTION)
            for future in done:
                task = pending.pop(future)
                yield task, future.result()  # raises the worker's error here
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def disk_full_message(err: DiskFullError, remaining: int, finished) -> str:
    """One line: the shard, the free space, and about how much the rest needs."""
    finished = [info for info in finished if info["samples"]]
    if err.samples:
        per_image = err.written / err.samples
    elif finished:
        per_image = sum(i["bytes"] for i in finished) / sum(i["samples"] for i in finished)
    else:
        per_image = None
    need = (f"; the {remaining} images still to shard need about "
            f"{human_bytes(per_image * remaining)} (at {human_bytes(per_image)} per image)"
            if per_image else "")
    return (f"{err}{need}: free space there or point --out at a bigger disk, then rerun "
            "(finished shards are kept)")


# --------------------------------------------------------------------------- manifests


def group_dir(shard_dir: Path, group: str) -> Path:
    """Training groups live under train/, the evaluation groups under eval/: two DVC outputs,
    so that a new evaluation set does not look like new training data."""
    return Path(shard_dir) / ("eval" if group in EVAL_GROUPS else "train") / group


def manifest_path(shard_dir: Path, group: str) -> Path:
    return group_dir(shard_dir, group) / "manifest.json"


def read_manifest(shard_dir: Path, group: str) -> dict:
    path = manifest_path(shard_dir, group)
    if not path.is_file():
        raise ShardError(f"{path}: no manifest; run `glr shard` (dvc repro shard)")
    return json.loads(path.read_text())


def shard_urls(shard_dir: Path, groups: list[str]) -> list[str]:
    """Paths of every shard of `groups`, from their manifests."""
    return [str(group_dir(shard_dir, group) / entry["file"])
            for group in groups for entry in read_manifest(shard_dir, group)["shards"]]


def read_lists(shard_dir: Path) -> dict[str, list[str]]:
    path = Path(shard_dir) / "train" / "lists.json"
    if not path.is_file():
        raise ShardError(f"{path}: not found; run `glr shard` (dvc repro shard)")
    return json.loads(path.read_text())


def group_samples(shard_dir: Path, groups: list[str]) -> int:
    return sum(read_manifest(shard_dir, group)["samples"] for group in groups)


def check_size(shard_dir: Path, groups: list[str], size: int, what: str) -> None:
    """Fail clearly when `size` asks for more pixels than the shards kept."""
    for group in groups:
        max_side = read_manifest(shard_dir, group).get("max_side")
        if max_side is not None and size > max_side:
            raise ShardError(f"{what} is {size} px but the shards of group {group} were shrunk "
                             f"to shard.max_side = {max_side}: raise params shard.max_side to "
                             f"at least {size} and rerun the shard stage")


def write_manifests(out_dir: Path, tasks: list[ShardTask], infos: dict[str, dict],
                    groups_meta: dict[str, dict]) -> dict:
    """Per-group manifest.json; returns totals for the report."""
    by_group: dict[str, list[dict]] = {}
    for task in tasks:
        info = infos[f"{task.group}/{task.name}"]
        by_group.setdefault(task.group, []).append(
            {key: info[key] for key in ("file", "samples", "bytes", "sha256")})
    for group, shards in by_group.items():
        manifest = {"group": group, **groups_meta[group],
                    "samples": sum(s["samples"] for s in shards),
                    "bytes": sum(s["bytes"] for s in shards), "shards": shards}
        files.write_json(manifest_path(out_dir, group), manifest, indent=1)
    return by_group


def remove_stale(out_dir: Path, tasks: list[ShardTask]) -> int:
    """Delete shards, info files, group folders and stray files the current plan no longer has
    (also the half-written temporary files of an interrupted run)."""
    wanted = {group_dir(out_dir, t.group) / t.name for t in tasks}
    wanted_dirs = {group_dir(out_dir, t.group) for t in tasks}
    removed = 0
    for part in ("train", "eval"):
        top = Path(out_dir) / part
        if not top.is_dir():
            continue
        for path in top.iterdir():
            if path.is_file() and path.name != "lists.json":
                path.unlink()
                removed += 1
            if not path.is_dir():
                continue
            for item in path.iterdir():
                keep = item.name == "manifest.json" and path in wanted_dirs
                if not keep and path / item.name.removesuffix(".info.json") not in wanted:
                    item.unlink()
                    removed += 1
            if path not in wanted_dirs:
                path.rmdir()
    return removed


# --------------------------------------------------------------------------- the stage


def plan_all(prepared_dir: Path, params: ShardParams) -> tuple[list[ShardTask], dict, dict]:
    """All shard tasks from the prepared tables; plus group metadata and the list → groups map."""
    from glr.prepare import read_list  # the stage reads prepare's artifacts

    prepared_dir = Path(prepared_dir)
    for name in ("clean", "all", "val_queries", "eval_index"):
        if not (prepared_dir / f"{name}.parquet").is_file():
            raise ShardError(f"{prepared_dir / name}.parquet: not found; run `glr prepare` "
                             "first (dvc repro prepare) or pass --prepared")
    # clean labels are 0..n-1, the rows of train_clean.csv
    num_clean = int(pd.read_parquet(prepared_dir / "clean.parquet", columns=["label"])
                    ["label"].max()) + 1
    training = assign_groups(read_list(prepared_dir / "all.parquet"), num_clean)
    clean_rows = len(pd.read_parquet(prepared_dir / "clean.parquet", columns=["label"]))
    clean_group_rows = int((training["increment"] == "clean").sum())
    if clean_group_rows != clean_rows:
        log.warning("train_clean.csv lists %d images but %d of them are train.csv rows of "
                    "their landmark; the clean groups hold the latter",
                    clean_rows, clean_group_rows)
    tasks: list[ShardTask] = []
    groups_meta: dict[str, dict] = {}
    columns = ["id", "split", "label", "clean", "country", "continent"]
    for group, frame in training.groupby("group", sort=True, observed=True):
        increment = str(frame["increment"].iloc[0])
        # images per label (planned): the dynamic ArcFace margins of a phase's list
        per_label = frame["label"].value_counts().sort_index()
        groups_meta[group] = {"increment": increment,
                              "continent": str(frame["continent"].iloc[0]),
                              "clean": increment in ("clean", "index", "test"),
                              "max_label": int(frame["label"].max()),
                              "labels": [int(v) for v in per_label.index],
                              "label_images": [int(v) for v in per_label.to_numpy()]}
        tasks += plan_shards(frame[columns], group, params.samples_per_shard, params.seed)
    queries = read_list(prepared_dir / "val_queries.parquet").assign(split="test")
    eval_index = read_list(prepared_dir / "eval_index.parquet").assign(split="index")
    for group, frame in (("query", queries[["id", "split", "usage"]]),
                         ("eval_index", eval_index[["id", "split"]])):
        groups_meta[group] = {"increment": group, "continent": None, "clean": None,
                              "max_label": None}
        tasks += plan_shards(frame, group, params.samples_per_shard, seed=None)
    return tasks, groups_meta, list_groups(training)


def settings_of(params: ShardParams, root: str | Path) -> dict:
    """What a shard's bytes depend on besides its plan (part of its fingerprint): the writer
    settings, and where its images are read from."""
    return {"max_side": params.max_side, "resize": params.resize,
            "jpeg_quality": params.jpeg_quality, "source": params.source,
            "root": os.path.normpath(str(root))}


def with_image_digests(tasks: list[ShardTask], fingerprint_path: Path) -> list[ShardTask]:
    """The tasks, each with the digest of its images' fingerprint entries."""
    digests, uncovered = image_digests(tasks, read_image_fingerprints(fingerprint_path))
    if uncovered:
        log.warning("%d of %d planned images have no entry in %s: a change to them is not "
                    "noticed by the shard stage", uncovered, sum(len(t.rows) for t in tasks),
                    fingerprint_path)
    return [dataclasses.replace(task, images=digest)
            for task, digest in zip(tasks, digests, strict=True)]


def make_source(params: Params, out_dir: Path, tasks: list[ShardTask]):
    if params.shard.source == "tree":
        return TreeSource(Path(params.data.root))
    source = TarSource(Path(params.data.root), Path(out_dir).parent / ".tar-index")
    source.build_index(sorted({split for t in tasks for split in t.rows["split"].unique()}))
    return source


def main(params: Params, prepared_dir: Path, out_dir: Path, metrics_path: Path,
         progress: bool = True, stop_after: int | None = None) -> dict:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tasks, groups_meta, lists = plan_all(prepared_dir, params.shard)
    removed = remove_stale(out_dir, tasks)
    if removed:
        log.info("removed %d files the current plan no longer has", removed)
    tasks = with_image_digests(tasks, Path(params.data.images_fingerprint))
    settings = settings_of(params.shard, params.data.root)
    log.info("%d shards in %d groups from %s (source: %s)", len(tasks), len(groups_meta),
             params.data.root, params.shard.source)
    source = make_source(params, out_dir, tasks)
    infos = write_all(tasks, out_dir, source, settings, params.shard.workers, progress,
                      stop_after)
    for meta in groups_meta.values():
        meta.update(max_side=params.shard.max_side, resize=params.shard.resize)
    write_manifests(out_dir, tasks, infos, groups_meta)
    files.write_json(out_dir / "train" / "lists.json", lists, indent=1)

    planned = sum(len(t.rows) for t in tasks)
    bad = [entry for info in infos.values() for entry in info["bad"]]
    totals = {
        "samples": sum(info["samples"] for info in infos.values()),
        "planned": planned,
        "bad": len(bad),
        "reencoded": sum(info["reencoded"] for info in infos.values()),
        "bytes": sum(info["bytes"] for info in infos.values()),
        "shards": len(tasks),
        "groups": len(groups_meta),
    }
    files.write_json(out_dir / "report.json", {**totals, "bad_images": bad,
                                               "settings": asdict(params.shard)}, indent=1)
    files.write_json(Path(metrics_path), totals, indent=1)
    fraction = len(bad) / max(1, planned)
    log.info("%d samples in %d shards (%.1f MB), %d re-encoded, %d bad images skipped",
             totals["samples"], totals["shards"], totals["bytes"] / 1e6, totals["reencoded"],
             len(bad))
    if fraction > params.shard.max_bad_fraction:
        examples = "; ".join(f"{b['split']}/{b['id']}: {b['problem']}" for b in bad[:5])
        raise ShardError(f"{len(bad)} of {planned} images ({fraction:.2%}) are missing or "
                         f"corrupt, more than shard.max_bad_fraction "
                         f"({params.shard.max_bad_fraction:.2%}); see {out_dir / 'report.json'}"
                         f"; e.g. {examples}")
    if bad:
        log.warning("%d missing or corrupt images skipped (listed in %s)", len(bad),
                    out_dir / "report.json")
    return totals
