"""`glr shard`: round trip, groups, resume, bad images, pre-resizing, tar sources."""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import io
import json
import re
import shutil
import tarfile
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from glr import prepare, shards
from glr.gldv2 import Layout, image_relpath
from glr.params import Params


def with_shard(params: Params, **changes) -> Params:
    return dataclasses.replace(params, shard=dataclasses.replace(params.shard, **changes))


def with_root(params: Params, root: Path) -> Params:
    return dataclasses.replace(params, data=dataclasses.replace(params.data, root=str(root)))


def read_group(shard_dir: Path, group: str) -> list[tuple[str, bytes, dict]]:
    """(key, jpg bytes, meta) of every sample of a group, via its manifest."""
    samples = []
    for url in shards.shard_urls(shard_dir, [group]):
        with tarfile.open(url) as tar:
            members = tar.getmembers()
            for jpg, meta in zip(members[0::2], members[1::2], strict=True):
                assert jpg.name[:-4] == meta.name[:-5]
                samples.append((jpg.name[:-4], tar.extractfile(jpg).read(),
                                json.loads(tar.extractfile(meta).read())))
    return samples


def digest(folder: Path) -> dict[str, str]:
    """sha256 of shards, info files, manifests and lists (report.json records the settings)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != "report.json"}


@pytest.fixture(scope="module")
def sharded(small_pipeline, tmp_path_factory):
    params, prepared = small_pipeline
    out = tmp_path_factory.mktemp("shards") / "shards"
    totals = shards.main(params, prepared, out, out.parent / "shard.json", progress=False)
    return params, prepared, out, totals


def test_every_image_once_with_its_metadata(sharded):
    params, prepared, out, totals = sharded
    all_list = prepare.read_list(prepared / "all.parquet")
    expected = all_list[all_list["label"] >= 0]
    lists = shards.read_lists(out)
    found = [meta for group in lists["all"] for _, _, meta in read_group(out, group)]
    got = pd.DataFrame(found)[["id", "label", "clean", "country", "continent", "split"]]
    want = expected[["id", "label", "clean", "country", "continent", "split"]].astype(
        {"country": str, "continent": str, "split": str})
    key = ["id", "label"]
    assert len(got) == len(want) and not got.duplicated(key).any()
    merged = want.merge(got, on=key, suffixes=("", "_shard"))
    assert len(merged) == len(want)
    for column in ("clean", "country", "continent", "split"):
        assert (merged[column] == merged[f"{column}_shard"]).all(), column
    # the image bytes are the source JPEG's (all mini images are small: copied as they are)
    root = Layout(Path(params.data.root))
    _, data, meta = read_group(out, lists["clean"][0])[0]
    assert data == (root.root / image_relpath(meta["split"], meta["id"])).read_bytes()
    assert totals["samples"] == totals["planned"] and totals["bad"] == 0


def test_group_union_equals_each_list(sharded):
    _, prepared, out, _ = sharded
    lists = shards.read_lists(out)
    for name in ("clean", "c2x", "full", "all"):
        frame = prepare.read_list(prepared / f"{name}.parquet")
        frame = frame[frame["label"] >= 0]
        pairs = {(m["id"], m["label"]) for g in lists[name] for _, _, m in read_group(out, g)}
        assert pairs == set(zip(frame["id"], frame["label"], strict=True)), name
        manifests = [shards.read_manifest(out, g) for g in lists[name]]
        assert sum(m["samples"] for m in manifests) == len(frame)
    assert lists["reference"] == lists["all"]
    # groups are per increment and continent; the clean ones hold only clean images
    for group in lists["all"]:
        manifest = shards.read_manifest(out, group)
        metas = [m for _, _, m in read_group(out, group)]
        assert {m["continent"] for m in metas} == {manifest["continent"]}
        assert {m["clean"] for m in metas} == {manifest["clean"]}


def test_query_and_eval_index_groups(sharded):
    _, prepared, out, _ = sharded
    queries = prepare.read_list(prepared / "val_queries.parquet")
    got = [m for _, _, m in read_group(out, "query")]
    assert [m["id"] for m in got] == queries["id"].tolist()  # in prepared order
    assert {m["usage"] for m in got} <= {"Public", "Private"}
    index = prepare.read_list(prepared / "eval_index.parquet")
    assert [m["id"] for _, _, m in read_group(out, "eval_index")] == index["id"].tolist()
    # evaluation shards apart from the training ones: two DVC outputs
    assert sorted(p.name for p in (out / "eval").iterdir()) == ["eval_index", "query"]
    assert sorted(p.name for p in out.iterdir()) == ["eval", "report.json", "train"]
    assert (out / "train" / "lists.json").is_file()


def test_manifest_records_match_files(sharded):
    _, _, out, _ = sharded
    manifest = shards.read_manifest(out, "eval_index")
    for entry in manifest["shards"]:
        data = (shards.group_dir(out, "eval_index") / entry["file"]).read_bytes()
        assert entry["bytes"] == len(data)
        assert entry["sha256"] == hashlib.sha256(data).hexdigest()
    assert manifest["samples"] == sum(e["samples"] for e in manifest["shards"])


def test_resume_after_interruption_gives_identical_shards(sharded, tmp_path):
    params, prepared, out, _ = sharded
    resumed = tmp_path / "shards"
    with pytest.raises(KeyboardInterrupt):
        shards.main(params, prepared, resumed, tmp_path / "m.json", progress=False,
                    stop_after=3)
    written = {p: p.stat().st_mtime_ns for p in resumed.rglob("*.tar")}
    assert len(written) == 3
    group_dir = next(p for p in (resumed / "train").iterdir() if p.is_dir())
    (group_dir / f".{group_dir.name}-000009.tar.tmp123").write_bytes(b"half a shard")
    shards.main(with_shard(params, workers=2), prepared, resumed, tmp_path / "m.json",
                progress=False)
    assert digest(resumed) == digest(out)  # byte-identical, whatever the worker count
    assert all(p.stat().st_mtime_ns == t for p, t in written.items())  # kept, not rewritten


def test_changed_settings_rewrite_and_remove_stale(sharded, tmp_path):
    params, prepared, out, _ = sharded
    copy = tmp_path / "shards"
    shutil.copytree(out, copy)
    shards.main(with_shard(params, samples_per_shard=25), prepared, copy, tmp_path / "m.json",
                progress=False)
    manifest = shards.read_manifest(copy, "eval_index")
    assert all(e["samples"] <= 25 for e in manifest["shards"])
    files = sorted(p.name for p in shards.group_dir(copy, "eval_index").glob("*.tar"))
    assert files == sorted(e["file"] for e in manifest["shards"])


def test_missing_and_corrupt_images_are_skipped_and_reported(small_pipeline, tmp_path):
    params, prepared = small_pipeline
    root = tmp_path / "mini"
    shutil.copytree(params.data.root, root)
    index = prepare.read_list(prepared / "eval_index.parquet")["id"].tolist()
    layout = Layout(root)
    layout.image_path("index", index[0]).unlink()
    corrupt = layout.image_path("index", index[1])
    corrupt.write_bytes(corrupt.read_bytes()[: len(corrupt.read_bytes()) // 3])
    params = with_shard(with_root(params, root), max_bad_fraction=0.5)
    out = tmp_path / "shards"
    totals = shards.main(params, prepared, out, tmp_path / "m.json", progress=False)
    report = json.loads((out / "report.json").read_text())
    problems = {b["id"]: b["problem"] for b in report["bad_images"]}
    assert problems[index[0]].startswith("missing")
    assert problems[index[1]].startswith("corrupt")
    assert totals["samples"] == totals["planned"] - totals["bad"]
    ids = [m["id"] for _, _, m in read_group(out, "eval_index")]
    assert index[0] not in ids and index[1] not in ids and len(ids) == len(index) - 2

    with pytest.raises(shards.ShardError, match=r"are missing or corrupt, more than "
                                                r"shard\.max_bad_fraction.*report\.json"):
        shards.main(with_shard(params, max_bad_fraction=0.0), prepared, out,
                    tmp_path / "m.json", progress=False)


def _jpeg(size: tuple[int, int], exif_orientation: int | None = None) -> bytes:
    image = Image.new("RGB", size, (200, 10, 10))
    image.paste((10, 200, 10), (0, 0, size[0] // 2, size[1]))
    out = io.BytesIO()
    exif = Image.Exif()
    if exif_orientation:
        exif[0x0112] = exif_orientation
    image.save(out, format="JPEG", quality=90, exif=exif)
    return out.getvalue()


@pytest.mark.parametrize(("mode", "expected"), [("cover", (133, 100)), ("fit", (100, 75))])
def test_large_images_are_shrunk_small_ones_copied(mode, expected):
    large = _jpeg((800, 600))
    data, changed = shards.prepare_image(large, 100, mode, 90)
    assert changed and Image.open(io.BytesIO(data)).size == expected
    small = _jpeg((90, 60))
    assert shards.prepare_image(small, 100, mode, 90) == (small, False)


def test_exif_rotated_image_is_stored_upright():
    data, changed = shards.prepare_image(_jpeg((80, 40), exif_orientation=6), 512, "cover", 90)
    assert changed and Image.open(io.BytesIO(data)).size == (40, 80)


def test_non_jpeg_is_reencoded_as_jpeg():
    out = io.BytesIO()
    Image.new("RGB", (30, 20)).save(out, format="PNG")
    data, changed = shards.prepare_image(out.getvalue(), 512, "cover", 90)
    assert changed and Image.open(io.BytesIO(data)).format == "JPEG"


def test_official_tar_archives_as_source(sharded, tmp_path):
    """GLDv2 as distributed (images_XXX.tar per split) gives the same shards as the tree."""
    params, prepared, out, _ = sharded
    root = tmp_path / "gldv2"
    source = Path(params.data.root)
    for split in ("train", "index", "test"):
        (root / split).mkdir(parents=True)
        images = sorted((source / split).rglob("*.jpg"))
        for number in range(2):
            with tarfile.open(root / split / f"images_{number:03d}.tar", "w") as tar:
                for path in images[number::2]:
                    tar.add(path, arcname=str(path.relative_to(source / split)))
    from_tars = tmp_path / "shards"
    params = with_shard(with_root(params, root), source="tar")
    shards.main(params, prepared, from_tars, tmp_path / "m.json", progress=False)
    # The same bytes in every shard and manifest; only the info files' fingerprints differ,
    # as they record where the images came from.
    assert ({k: v for k, v in digest(from_tars).items() if not k.endswith(".info.json")}
            == {k: v for k, v in digest(out).items() if not k.endswith(".info.json")})


# --------------------------------------------------------------------------- what a rerun notices


def mtimes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*.tar")}


def shards_holding(shard_dir: Path, image_id: str) -> list[str]:
    """The shard files (relative to shard_dir) that hold a sample of `image_id`."""
    names = []
    for path in sorted(shard_dir.rglob("*.tar")):
        with tarfile.open(path) as tar:
            if any(name.startswith(image_id) for name in tar.getnames()):
                names.append(str(path.relative_to(shard_dir)))
    return names


def copy_dataset(params: Params, root: Path) -> Params:
    """A copy of the mini dataset at `root`, with params reading it and its fingerprint."""
    shutil.copytree(params.data.root, root)
    params = with_root(params, root)
    return dataclasses.replace(params, data=dataclasses.replace(
        params.data, images_fingerprint=str(root / "images.md5")))


def test_shards_written_from_a_wrong_root_are_rewritten_once_it_is_fixed(sharded, tmp_path):
    params, prepared, out, _ = sharded
    shard_dir = tmp_path / "shards"
    wrong = tmp_path / "empty"
    wrong.mkdir()
    with pytest.raises(shards.ShardError, match="are missing or corrupt"):
        shards.main(with_root(params, wrong), prepared, shard_dir, tmp_path / "m.json",
                    progress=False)
    totals = shards.main(params, prepared, shard_dir, tmp_path / "m.json", progress=False)
    assert totals["bad"] == 0 and totals["samples"] == totals["planned"]
    assert digest(shard_dir) == digest(out)


def test_a_shard_that_skipped_images_retries_them(sharded, tmp_path, caplog):
    params, prepared, _, _ = sharded
    params = with_shard(copy_dataset(params, tmp_path / "mini"), max_bad_fraction=0.5)
    index = prepare.read_list(prepared / "eval_index.parquet")["id"].tolist()
    image = Layout(tmp_path / "mini").image_path("index", index[0])
    good = image.read_bytes()
    image.write_bytes(good[: len(good) // 3])  # truncated
    shard_dir = tmp_path / "shards"
    totals = shards.main(params, prepared, shard_dir, tmp_path / "m.json", progress=False)
    # an index image is in the evaluation index and (mapped to a train landmark) in `all`
    assert totals["bad"] == 2
    before = mtimes(shard_dir)
    image.write_bytes(good)  # restored: the fingerprint file did not change
    caplog.set_level("INFO", logger="glr.shards")
    totals = shards.main(params, prepared, shard_dir, tmp_path / "m.json", progress=False)
    assert totals["bad"] == 0 and totals["samples"] == totals["planned"]
    assert "writing 2 shards again that skipped" in caplog.text
    after = mtimes(shard_dir)
    holding = shards_holding(shard_dir, index[0])
    assert "eval/eval_index/eval_index-000000.tar" in holding and len(holding) == 2
    assert sorted(name for name in after if after[name] != before[name]) == holding
    assert index[0] in [m["id"] for _, _, m in read_group(shard_dir, "eval_index")]


def test_a_replaced_image_rewrites_only_its_shard_once_the_fingerprint_says_so(sharded,
                                                                               tmp_path):
    params, prepared, _, _ = sharded
    params = copy_dataset(params, tmp_path / "mini")
    shard_dir = tmp_path / "shards"
    shards.main(params, prepared, shard_dir, tmp_path / "m.json", progress=False)
    before = mtimes(shard_dir)
    index = prepare.read_list(prepared / "eval_index.parquet")["id"].tolist()
    relpath = image_relpath("index", index[0])
    new = _jpeg((60, 40))
    (tmp_path / "mini" / relpath).write_bytes(new)
    # Without a new fingerprint nothing is noticed (the stage never hashes the images) ...
    shards.main(params, prepared, shard_dir, tmp_path / "m.json", progress=False)
    assert mtimes(shard_dir) == before
    # ... with it, exactly the shard holding the image is written again.
    fingerprint = tmp_path / "mini/images.md5"
    lines = [f"{hashlib.md5(new).hexdigest()}  {relpath}" if line.endswith(f"  {relpath}")
             else line for line in fingerprint.read_text().splitlines()]
    fingerprint.write_text("\n".join(lines) + "\n")
    shards.main(params, prepared, shard_dir, tmp_path / "m.json", progress=False)
    after = mtimes(shard_dir)
    holding = shards_holding(shard_dir, index[0])
    assert "eval/eval_index/eval_index-000000.tar" in holding and len(holding) == 2
    assert sorted(name for name in after if after[name] != before[name]) == holding
    stored = {m["id"]: data for _, data, m in read_group(shard_dir, "eval_index")}
    assert stored[index[0]] == new


def test_image_digests_follow_each_images_entry_or_its_splits_archives():
    def task(name: str, split: str, ids: list[str]) -> shards.ShardTask:
        return shards.ShardTask(group=name, name=f"{name}.tar",
                                rows=pd.DataFrame({"id": ids, "split": split}))

    tasks = [task("a", "train", ["0123456789abcdef", "fedcba9876543210"]),
             task("b", "index", ["00000000000000aa"])]

    def digests(lines: list[str]) -> list[str]:
        frame = pd.DataFrame([line.split("  ") for line in lines], columns=["md5", "path"])
        return shards.image_digests(tasks, frame)[0]

    per_image = ["0" * 32 + "  train/0/1/2/0123456789abcdef.jpg",
                 "1" * 32 + "  train/f/e/d/fedcba9876543210.jpg"]
    archives = ["2" * 32 + "  index/images_000.tar"]
    base = digests([*per_image, *archives])
    # one image's entry changes: only its task
    changed = digests(["f" * 32 + "  train/0/1/2/0123456789abcdef.jpg", *per_image[1:],
                       *archives])
    assert changed[0] != base[0] and changed[1] == base[1]
    # an archive of the index split changes: only the task with index images
    changed = digests([*per_image, "3" * 32 + "  index/images_000.tar"])
    assert changed[0] == base[0] and changed[1] != base[1]
    # an archive without a split prefix (GLDv2's md5 files concatenated) covers every split
    changed = digests([*per_image, *archives, "4" * 32 + "  images_007.tar"])
    assert changed[0] != base[0] and changed[1] != base[1]
    # images without any entry are counted
    assert shards.image_digests(tasks, pd.DataFrame({"md5": [], "path": []}, dtype=str))[1] == 3


def test_a_malformed_fingerprint_file_is_a_clear_error(tmp_path):
    path = tmp_path / "images.md5"
    path.write_text("0" * 32 + "  train/0/1/2/0123456789abcdef.jpg\nnot-an-md5  x.jpg\n")
    with pytest.raises(shards.ShardError, match=r"images\.md5: entry 2 is not `<md5>  <path>`"):
        shards.read_image_fingerprints(path)
    with pytest.raises(shards.ShardError, match="images fingerprint not found"):
        shards.read_image_fingerprints(tmp_path / "absent.md5")


@pytest.mark.parametrize("workers", [1, 2])  # in this process, and in pool workers (fork)
def test_a_full_disk_is_one_clear_error_and_leaves_no_temporary_files(sharded, tmp_path,
                                                                      monkeypatch, workers):
    params, prepared, _, _ = sharded
    shard_dir = tmp_path / "shards"
    real_member = shards._tar_member
    calls = {"n": 0}

    def member_until_full(tar, name, payload):
        calls["n"] += 1
        if calls["n"] > 25:  # in the 13th sample: shards hold 10 here
            raise OSError(errno.ENOSPC, "No space left on device")
        real_member(tar, name, payload)

    monkeypatch.setattr(shards, "_tar_member", member_until_full)
    with pytest.raises(shards.ShardError) as raised:
        shards.main(with_shard(params, workers=workers), prepared, shard_dir,
                    tmp_path / "m.json", progress=False)
    message = str(raised.value)
    assert "\n" not in message
    assert re.match(r".*/shards/train/[a-z0-9_-]+/[a-z0-9_-]+-\d{6}\.tar: no space left on "
                    r"the device while writing this shard \(\d+\.\d [KMGT]B free\); the \d+ "
                    r"images still to shard need about \d+\.\d [KMG]B", message), message
    assert not [p for p in shard_dir.rglob("*") if ".tmp" in p.name]
    # the finished shards are kept, each with its info file
    finished = list(shard_dir.rglob("*.tar"))
    assert finished and len(list(shard_dir.rglob("*.info.json"))) == len(finished)


def test_missing_prepared_tables_are_a_clear_error(sharded, tmp_path):
    params, _, _, _ = sharded
    with pytest.raises(shards.ShardError, match=r"clean\.parquet: not found; run `glr prepare`"):
        shards.main(params, tmp_path / "nothing", tmp_path / "shards", tmp_path / "m.json",
                    progress=False)


def test_test_images_are_never_references():
    """With the validation queries put back into `all` (holdout off), their group trains but
    is no reference: the rerank would tag each query with its own label."""
    rows = pd.DataFrame({"increment": ["clean", "index", "test"],
                         "group": ["clean-asia", "index-asia", "test-asia"]})
    lists = shards.list_groups(rows)
    assert lists["all"] == ["clean-asia", "index-asia", "test-asia"]
    assert lists["reference"] == ["clean-asia", "index-asia"]


def test_a_disk_full_before_the_shards_first_sample_still_estimates_what_the_rest_needs(
        monkeypatch):
    """In a pool worker the disk may fill at a shard's first sample, before the parent has
    collected any finished shard: the worker's own finished shards give the size per image
    (this once made the message lose its estimate, depending on scheduling)."""
    def full(*args):
        raise shards.DiskFullError("out/clean-asia-000003.tar", 10**9, 0, 0)

    monkeypatch.setattr(shards, "write_shard", full)
    monkeypatch.setattr(shards, "_WORKER_DONE", {"bytes": 5_000, "samples": 10})
    with pytest.raises(shards.DiskFullError) as raised:
        shards._run_task((None, None, None))
    assert (raised.value.written, raised.value.samples) == (5_000, 10)
    message = shards.disk_full_message(raised.value, remaining=100, finished=[])
    assert message.startswith("out/clean-asia-000003.tar: no space left on the device while "
                              "writing this shard (")
    assert f"; the 100 images still to shard need about {shards.human_bytes(50_000)} (at " \
           f"{shards.human_bytes(500)} per image)" in message
