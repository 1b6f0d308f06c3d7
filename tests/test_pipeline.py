"""End to end: `dvc repro` of the whole pipeline on a small mini-GLDv2 in a fresh copy of the
repository (what `make repro` does on a fresh clone), then the metrics, the DAG, and the round
trip of every artifact through a DVC remote into a fresh clone."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow  # minutes: `pytest -m "not slow"` skips it

REPO = Path(__file__).resolve().parents[1]
# The embedded default's backbone, its phases and its model's artifact name, from the repository
_DEFAULT = yaml.safe_load((REPO / "params.yaml").read_text())
B = _DEFAULT["model"]["backbones"][0]
PHASES = [entry["phase"] for entry in _DEFAULT["train"]["recipe"].values()
          if entry["backbone"] == B]
FIRST, LAST = PHASES[0], PHASES[-1]
(ARTIFACT,) = [name for name, artifact in
               yaml.safe_load((REPO / "dvc.yaml").read_text())["artifacts"].items()
               if artifact["path"] == f"models/{B}/{LAST}"]
SMALL = {"clean_landmarks": 6, "extra_landmarks": 4, "test_landmarks": 4,
         "distractor_landmarks": 4, "ignored_queries": 3, "clean_images": [2, 4],
         "extra_images": [2, 3], "index_images": [2, 3], "image_width": 64, "image_height": 48}


def official_map100(solution_csv: Path, submission_csv: Path) -> float:
    """GLDv2's mAP@100, written out independently of glr.metric: per scored query the sum of
    precision at each hit in the first 100 predictions (a repeated id is neither hit nor miss
    but keeps its rank) over min(|truth|, 100); the mean over every scored query."""
    import csv

    with solution_csv.open() as file:
        truth = {row["id"]: set(row["images"].split()) for row in csv.DictReader(file)
                 if row["Usage"] != "Ignored"}
    with submission_csv.open() as file:
        predicted = {row["id"]: row["images"].split() for row in csv.DictReader(file)}
    total = 0.0
    for query, relevant in truth.items():
        seen, hits, ap = set(), 0, 0.0
        for rank, image in enumerate(predicted.get(query, [])[:100], 1):
            if image not in seen:
                seen.add(image)
                if image in relevant:
                    hits += 1
                    ap += hits / rank
        total += ap / min(len(relevant), 100)
    return total / len(truth)


def chance_map100(solution_csv: Path, index_size: int) -> float:
    """The expected mAP@100 of a random order of the whole index, exactly: for a query with R
    ground-truth images among N, rank r holds one with probability R/N, and then the hits up
    to r number 1 + (r − 1)(R − 1)/(N − 1) on average, so E[AP@100] =
    Σ_{r ≤ min(100, N)} (R/N)(1 + (r − 1)(R − 1)/(N − 1))/r / min(R, 100)."""
    import csv

    with solution_csv.open() as file:
        sizes = [len(row["images"].split()) for row in csv.DictReader(file)
                 if row["Usage"] != "Ignored"]
    n = index_size
    total = 0.0
    for r_true in sizes:
        hits_after = (r_true - 1) / (n - 1) if n > 1 else 0.0
        total += sum(r_true / n * (1 + (rank - 1) * hits_after) / rank
                     for rank in range(1, min(100, n) + 1)) / min(r_true, 100)
    return total / len(sizes)


def test_chance_map100_is_the_mean_over_every_order_of_the_index(tmp_path):
    """The helper above against all 720 orders of a 6-image index (queries with 1, 2 and 3
    ground-truth images), scored by `official_map100`: equal up to float64 sums of ~10^3
    terms below 1 (1e-12 is ample)."""
    import itertools

    solution = tmp_path / "solution.csv"
    solution.write_text("id,images,Usage\nq1,a,Public\nq2,a b,Private\nq3,c d e,Public\n")
    submission = tmp_path / "submission.csv"
    scores = []
    for order in itertools.permutations("abcdef"):
        submission.write_text("id,images\n" + "".join(f"{q},{' '.join(order)}\n"
                                                      for q in ("q1", "q2", "q3")))
        scores.append(official_map100(solution, submission))
    assert chance_map100(solution, 6) == pytest.approx(sum(scores) / len(scores), abs=1e-12)


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
    for phase in params["train"]["phases"].values():
        phase["epochs"] = 2
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    _git("init", "-q", cwd=dest)
    _git("add", "-A", cwd=dest)
    _git("-c", "user.name=test", "-c", "user.email=test@example.org", "commit", "-q", "-m",
         "fresh", cwd=dest)
    return dest


def _run_dvc(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """`dvc ARGS` with this venv's `glr` first on PATH (the stages call it)."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["DVC_NO_ANALYTICS"] = "1"
    return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=cwd, env=env,
                          capture_output=True, text=True)


def _dvc(*args: str, cwd: Path) -> str:
    result = _run_dvc(*args, cwd=cwd)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def _alive_in(folder: Path) -> list[int]:
    """Live (not zombie) processes whose working directory is `folder`."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if (proc.name.isdigit() and Path(os.readlink(proc / "cwd")) == folder
                    and "zombie" not in (proc / "status").read_text()):
                pids.append(int(proc.name))
        except OSError:  # gone meanwhile, or not ours to read
            continue
    return pids


KILLED: dict[str, str] = {}  # what the interrupted run left, for test_a_killed_dvc_repro_...


@pytest.fixture(scope="module")
def reproduced_repo(fresh_repo) -> Path:
    """`fresh_repo` after `dvc repro` of the whole pipeline (run once per module): a first
    `dvc repro` is killed with SIGKILL (its whole process group, as a scheduler's preemption
    does) once the first training phase has started; a second one finishes the pipeline."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["DVC_NO_ANALYTICS"] = "1"
    log_path = fresh_repo.parent / "killed-repro.log"
    with log_path.open("w") as log_file:
        run = subprocess.Popen([sys.executable, "-m", "dvc", "repro"], cwd=fresh_repo, env=env,
                               stdout=log_file, stderr=subprocess.STDOUT,
                               start_new_session=True)
    started = fresh_repo / f"runs/{B}/{FIRST}/tensorboard"
    deadline = time.monotonic() + 600
    while not started.exists() and run.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    os.killpg(run.pid, signal.SIGKILL)
    run.wait()
    deadline = time.monotonic() + 20
    while _alive_in(fresh_repo) and time.monotonic() < deadline:
        time.sleep(0.2)
    KILLED["left_running"] = str(_alive_in(fresh_repo))
    KILLED["log"] = log_path.read_text()
    KILLED["training_started"] = str(started.exists())
    KILLED["second_run"] = _dvc("repro", cwd=fresh_repo)
    return fresh_repo


def test_a_killed_dvc_repro_leaves_nothing_running_and_the_next_one_goes_on(reproduced_repo):
    assert KILLED["training_started"] == "True", KILLED["log"][-3000:]
    assert KILLED["left_running"] == "[]"
    second = KILLED["second_run"]
    # The stages that had finished are not run again; the killed one and the rest are.
    for stage in ("synth", "prepare", "shard", f"init@{B}"):
        assert f"Stage '{stage}' didn't change, skipping" in second, second
    assert f"Running stage 'train@{B}-{FIRST}'" in second
    assert "Running stage 'evaluate'" in second


def test_dvc_repro_runs_every_stage_and_writes_metrics(reproduced_repo):
    fresh_repo = reproduced_repo
    truth = json.loads((fresh_repo / "data/mini-gldv2/synth_truth.json").read_text())
    shown = json.loads(_dvc("metrics", "show", "--json", cwd=fresh_repo))
    metrics = next(iter(shown.values()))["data"]["metrics/prepare.json"]["data"]
    assert metrics["clean"]["images"] == truth["clean"]["images"]
    assert metrics["c2x"]["images"] == truth["c2x"]["images"]
    assert metrics["full"]["labels"] == truth["full"]["labels"]
    assert metrics["all"]["images"] == truth["all_holdout"]["images"]
    assert metrics["val_queries"] == truth["val_queries"]
    assert (fresh_repo / "data/prepared/all.parquet").is_file()
    evaluation = next(iter(shown.values()))["data"]["metrics/evaluate/metrics.json"]["data"]
    # one backbone: no ensemble variants, which would repeat its rankings
    assert {key for key, value in evaluation.items() if isinstance(value, dict)} == {B}
    assert set(evaluation[B]) == {"pretrained", "plain", "rerank"}
    assert evaluation["map100"] == evaluation[B]["rerank"]["map100"]
    assert evaluation["contaminated"] is False
    # the stage's headline is the official mAP@100 of the submission it wrote, recomputed here
    # from the two CSV files (sums of at most a few hundred float64 terms: 1e-12 is ample)
    official = official_map100(fresh_repo / "data/mini-gldv2/test/retrieval_solution_v2.1.csv",
                               fresh_repo / "data/retrieval/submission.csv")
    assert evaluation["map100"] == pytest.approx(official, abs=1e-12) and official > 0
    # What every ranking must reach: better than a random order of the index, by a margin
    # (this 2-epoch, 64 px run: no training 0.56, plain 0.44, rerank 0.63, chance 0.24; its
    # short training loses to the starting weights, so no order between them is asserted)
    import pyarrow.parquet as pq

    index_size = pq.read_metadata(fresh_repo / "data/prepared/eval_index.parquet").num_rows
    chance = chance_map100(fresh_repo / "data/mini-gldv2/test/retrieval_solution_v2.1.csv",
                           index_size)
    for kind in ("pretrained", "plain", "rerank"):
        assert evaluation[B][kind]["map100"] > chance + 0.1, (kind, evaluation[B], chance)
    training = next(iter(shown.values()))["data"][f"metrics/train/{B}/{LAST}/metrics.json"]
    assert training["data"][B][LAST]["epoch"] == 2
    assert evaluation["queries"] == truth["val_queries"]["total"]
    submission = (fresh_repo / "data/retrieval/submission.csv").read_text().splitlines()
    assert submission[0] == "id,images" and len(submission) == 1 + truth["val_queries"]["total"]
    assert (fresh_repo / f"models/{B}/{LAST}/model.safetensors").is_file()
    assert (fresh_repo / f"data/features/{B}/ref.npy").is_file()
    from PIL import Image

    from glr import visualize
    with Image.open(fresh_repo / "metrics/visualize/plots/images/retrieval.png") as picture:
        width, height = visualize.TILE + 2 * visualize.BORDER, (
            visualize.TILE + 2 * visualize.BORDER + visualize.STRIP)
        rows = min(8, truth["val_queries"]["total"])
        assert picture.size == (9 * width + 8, rows * height)
    # Nothing is left to do: every stage is up to date with its params, code and data.
    assert _dvc("status", cwd=fresh_repo).strip().endswith("up to date.")


def test_glr_query_finds_the_landmarks_of_test_photos(reproduced_repo):
    """`glr query` on mini-GLDv2 test photos whose landmark the pipeline found: where the
    stage's final ranking has a ground-truth image first, clearly ahead of the second, and the
    stage's top-3 vote named that image's landmark (the train label it maps to) decisively, the
    query tool puts the image first and names the landmark first too. (Clearly and decisively:
    the photos are embedded in another batch than the stage's, whose kernels may round
    differently; gaps of 0.01 in score and 0.1 in vote weight are far above that.)"""
    import pandas as pd
    import pyarrow.parquet as pq

    from glr import metric

    repo = reproduced_repo
    root = repo / "data/mini-gldv2"
    ranking = pq.read_table(repo / f"data/retrieval/topk/{B}-rerank.parquet").to_pydict()
    votes = pd.read_parquet(repo / f"data/retrieval/tags/{B}-queries.parquet")
    votes = dict(zip(votes["id"], zip(votes["labels"], votes["label_weights"], strict=True),
                     strict=True))
    solution = metric.read_solution_csv(root / "test/retrieval_solution_v2.1.csv")
    # the train label of each index image mapped to one (prepare's `all` list, by category)
    prepared = pd.read_parquet(repo / "data/prepared/all.parquet", columns=["id", "split",
                                                                            "label"])
    index_rows = prepared[prepared["split"] == "index"]
    label_of = dict(zip(index_rows["id"], index_rows["label"], strict=True))

    def decisive(query: str, label: int) -> bool:
        labels, weights = votes[query]
        runner_up = weights[1] if len(weights) > 1 else 0.0
        return len(labels) > 0 and labels[0] == label and weights[0] - runner_up > 0.1

    chosen = [(query, images[0]) for query, images, scores in
              zip(ranking["id"], ranking["images"], ranking["scores"], strict=True)
              if images[0] in solution[query].truth and images[0] in label_of
              and scores[0] - scores[1] > 0.01 and decisive(query, label_of[images[0]])][:3]
    assert chosen, "no query with a clear, correct first result and landmark"
    photos = [str(root / "test" / q[0] / q[1] / q[2] / f"{q}.jpg") for q, _ in chosen]
    result = subprocess.run([sys.executable, "-m", "glr", "query", "--json", "--top", "5",
                             *photos], cwd=repo, check=True, capture_output=True, text=True)
    report = json.loads(result.stdout)
    assert [entry["photo"] for entry in report] == photos
    for entry, (_, first) in zip(report, chosen, strict=True):
        assert len(entry["index"]) == 5
        assert entry["index"][0]["id"] == first
        assert entry["landmarks"][0]["label"] == label_of[first]


def test_dvc_dag_shows_the_stages(fresh_repo):
    dag = _dvc("dag", "--md", cwd=fresh_repo)
    for stage in ("synth", "prepare", "shard", f"init@{B}",
                  *(f"train@{B}-{phase}" for phase in PHASES), f"extract@{B}", f"baseline@{B}",
                  f"tag@{B}",
                  "retrieve", "evaluate", "visualize"):
        assert stage in dag


def _commit(repo: Path, message: str) -> None:
    _git("add", "-A", cwd=repo)
    _git("-c", "user.name=test", "-c", "user.email=test@example.org", "commit", "-q",
         "--allow-empty", "-m", message, cwd=repo)


def _sha256s(repo: Path, outs: list[str]) -> dict[str, str]:
    """sha256 of every file of the given outputs (files or directories), keyed by path."""
    digests = {}
    for out in outs:
        path = repo / out
        for file in sorted(path.rglob("*")) if path.is_dir() else [path]:
            if file.is_file():
                digests[file.relative_to(repo).as_posix()] = hashlib.sha256(
                    file.read_bytes()).hexdigest()
    return digests


def test_artifacts_survive_a_dvc_remote(reproduced_repo, tmp_path):
    """Push every output of the finished pipeline to a local DVC remote, clone the git repo,
    pull: the clone is up to date, with byte-identical outputs and identical metrics."""
    origin = reproduced_repo
    _commit(origin, "dvc repro")
    assert _git("status", "--porcelain", cwd=origin) == ""
    assert json.loads(_dvc("data", "status", "--json", cwd=origin)) == {}
    lock = yaml.safe_load((origin / "dvc.lock").read_text())
    # dvc.lock keeps the entries of stages dvc.yaml no longer has (DVC does not prune them)
    stages = set(_dvc("stage", "list", "--name-only", cwd=origin).split())
    outs = {out["path"]: out for name, stage in lock["stages"].items() if name in stages
            for out in stage["outs"]}
    # `cache: false` outputs (the metrics and plots, all under metrics/) are not DVC's to push:
    # git carries them. `persist: true` ones (the shards) are cached like any other output:
    # persist only stops `dvc repro` from deleting them before their stage runs.
    uncached = sorted(path for path in outs if path.startswith("metrics/"))
    cached = sorted(path for path in outs if path not in uncached)
    assert "metrics/evaluate/metrics.json" in uncached
    assert {"data/shards/train", "data/shards/eval", f"data/features/{B}",
            f"models/{B}/{LAST}"} <= set(cached)
    assert _git("ls-files", *uncached, cwd=origin).split() == sorted(_sha256s(origin, uncached))

    # The remote goes into the committed .dvc/config, so that every clone sees it.
    remote = tmp_path / "remote"
    _dvc("remote", "add", "-d", "storage", str(remote), cwd=origin)
    _commit(origin, "DVC remote")
    before = json.loads(_dvc("data", "status", "--not-in-remote", "--json", cwd=origin))
    assert sorted(path.rstrip("/") for path in before["not_in_remote"]) == cached
    _dvc("push", cwd=origin)
    assert json.loads(_dvc("data", "status", "--not-in-remote", "--json", cwd=origin)) == {}
    assert json.loads(_dvc("status", "--cloud", "--json", cwd=origin)) == {}
    for path, out in outs.items():  # DVC 3 remote layout: files/md5/<2 chars>/<rest>
        stored = (remote / "files" / "md5" / out["md5"][:2] / out["md5"][2:]).is_file()
        assert stored == (path in cached), path

    clone = tmp_path / "clone"
    _git("clone", "-q", str(origin), str(clone), cwd=tmp_path)
    assert _dvc("remote", "list", cwd=clone).split()[:2] == ["storage", str(remote)]
    assert _dvc("config", "core.remote", cwd=clone).strip() == "storage"
    assert not any((clone / path).exists() for path in cached)
    assert all((clone / path).exists() for path in uncached)
    _dvc("pull", cwd=clone)

    assert json.loads(_dvc("status", "--json", cwd=clone)) == {}
    assert _dvc("status", cwd=clone).strip().endswith("up to date.")
    assert json.loads(_dvc("status", "--cloud", "--json", cwd=clone)) == {}
    assert json.loads(_dvc("data", "status", "--json", cwd=clone)) == {}
    assert _git("status", "--porcelain", cwd=clone) == ""
    # Byte for byte: every file of every output, the counts checked against dvc.lock.
    pulled, original = _sha256s(clone, list(outs)), _sha256s(origin, list(outs))
    assert pulled == original
    for path, out in outs.items():
        if "nfiles" in out:
            assert sum(name.startswith(path + "/") for name in pulled) == out["nfiles"], path
    shards = sorted(name for name in pulled if name.endswith(".tar"))
    assert any(name.startswith("data/shards/train/") for name in shards)
    assert any(name.startswith("data/shards/eval/") for name in shards)
    for name in (f"data/features/{B}/ref.npy", f"data/features/{B}/query.npy",
                 f"models/{B}/{LAST}/model.safetensors", "data/retrieval/submission.csv",
                 shards[0], shards[-1]):
        assert name in pulled and pulled[name] == original[name], name
    # cache.type = reflink,hardlink,symlink: a hardlinked output is the cache object itself,
    # so it must be read-only (an edit in place would corrupt the cache).
    ref = clone / f"data/features/{B}/ref.npy"
    if not ref.is_symlink() and ref.stat().st_nlink > 1:
        digest = hashlib.md5(ref.read_bytes()).hexdigest()
        assert ref.samefile(clone / ".dvc/cache/files/md5" / digest[:2] / digest[2:])
        assert stat.S_IMODE(ref.stat().st_mode) & 0o222 == 0

    metrics = sorted(path.relative_to(origin / "metrics").as_posix()
                     for path in (origin / "metrics").rglob("*.json"))
    assert {"prepare.json", "shard.json", "evaluate/metrics.json",
            f"train/{B}/{FIRST}/metrics.json"} <= set(metrics)
    for name in metrics:
        assert (clone / "metrics" / name).read_bytes() == (origin / "metrics" / name).read_bytes()
    assert (json.loads(_dvc("metrics", "show", "--json", cwd=clone))
            == json.loads(_dvc("metrics", "show", "--json", cwd=origin)))


def _gto(*args: str, cwd: Path) -> str:
    """GTO (a dvc dependency) as its console script does. GTO runs git itself, and a tag needs
    an identity: the test's own, whatever git config the machine has."""
    env = dict(os.environ, DVC_NO_ANALYTICS="1")
    for role in ("AUTHOR", "COMMITTER"):
        env[f"GIT_{role}_NAME"], env[f"GIT_{role}_EMAIL"] = "test", "test@example.org"
    result = subprocess.run([sys.executable, "-c", "import sys; from gto.cli import app; "
                             "sys.exit(app())", *args], cwd=cwd, env=env,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout + result.stderr


def test_a_gto_registered_artifact_is_got_by_name(reproduced_repo, tmp_path):
    """The README's artifact flow after `dvc repro`: commit the run's dvc.lock and metrics,
    `gto register NAME`, `dvc artifacts get . NAME -o model`. The fixture's HEAD is the
    pre-repro commit, whose dvc.lock names other model bytes than this run's, as on any machine
    but the one that made the committed outputs: GTO tags a commit, and `dvc artifacts get`
    reads the model's hash from that commit's dvc.lock, so the commit comes first."""
    repo = reproduced_repo
    _commit(repo, "dvc repro")  # a no-op commit where an earlier test committed the run
    assert _git("status", "--porcelain", cwd=repo) == ""
    assert _git("show", "HEAD:dvc.lock", cwd=repo) == (repo / "dvc.lock").read_text()

    said = _gto("register", ARTIFACT, cwd=repo)
    assert f"Created git tag '{ARTIFACT}@v0.0.1'" in said, said
    assert _git("tag", "--list", f"{ARTIFACT}@*", cwd=repo).split() == [f"{ARTIFACT}@v0.0.1"]
    assert (_git("rev-parse", f"{ARTIFACT}@v0.0.1^{{commit}}", cwd=repo)
            == _git("rev-parse", "HEAD", cwd=repo))
    assert _git("cat-file", "-t", f"{ARTIFACT}@v0.0.1", cwd=repo).strip() == "tag"  # annotated

    model = tmp_path / "model"
    said = _dvc("artifacts", "get", ".", ARTIFACT, "-o", str(model), cwd=repo)
    assert "Downloaded 2 file(s)" in said, said
    got = sorted(path.name for path in model.rglob("*"))
    assert got == sorted(path.name for path in (repo / f"models/{B}/{LAST}").rglob("*"))
    assert got == ["config.json", "model.safetensors"]
    for name in got:
        assert (model / name).read_bytes() == (repo / f"models/{B}/{LAST}" / name).read_bytes()
    from glr.model.folder import load_model
    net, config = load_model(model)
    assert config["model"]["backbone"] == B and config["phase"] == LAST
    assert sum(parameter.numel() for parameter in net.parameters()) > 0
    # A tag and a download outside the repository: the workspace stays clean for the others.
    assert _git("status", "--porcelain", cwd=repo) == ""


# One of each kind of value glr.params rejects, as `dvc exp run -S` sets it, and the start of
# the one line that names it (`+` adds a key params.yaml lacks, in DVC's override grammar).
BAD_VALUES = {
    "out of range": ("model.size=0", "params.yaml: model.size: 0 is out of range"),
    "wrong type": ("retrieve.k=many", "params.yaml: retrieve.k: expected an integer"),
    "not a choice": ("train.precision=fp8", "params.yaml: train.precision: "),
    "a contradiction between keys": ("extract.phase=p9", "params.yaml: extract.phase: "),
    "an unknown key": ("+model.sise=64", "params.yaml: unknown key model.sise"),
}


def test_a_rejected_params_value_deletes_no_output(reproduced_repo):
    """`dvc exp run -S` with each kind of bad value, after the whole pipeline ran: the `check`
    stage (first in the DAG, every stage depends on its mark) stops DVC before it deletes any
    stage's outputs. Every output and every tracked metric file keeps its bytes; params.yaml
    keeps the bad value until `git checkout HEAD -- params.yaml`, after which DVC finds the
    pipeline up to date (nothing to redo)."""
    repo = reproduced_repo
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    outs = sorted({out["path"] for stage in lock["stages"].values() for out in stage["outs"]})
    assert {f"models/{B}/{FIRST}", f"metrics/train/{B}/{FIRST}/metrics.json", "data/retrieval",
            "data/params.checked"} <= set(outs)
    before = _sha256s(repo, ["data", "models", "metrics"])
    params = (repo / "params.yaml").read_bytes()
    for kind, (value, message) in BAD_VALUES.items():
        result = _run_dvc("exp", "run", "-S", value, cwd=repo)
        assert result.returncode != 0, (kind, result.stdout[-2000:])
        assert "Running stage 'check'" in result.stdout, (kind, result.stdout[-2000:])
        assert message in result.stdout + result.stderr, (kind, result.stdout, result.stderr)
        assert not any(f"Running stage '{name}'" in result.stdout for name in lock["stages"]
                       if name != "check"), (kind, result.stdout)
        assert _sha256s(repo, ["data", "models", "metrics"]) == before, kind
        assert (repo / "params.yaml").read_bytes() != params, kind  # the bad value stays
        _git("checkout", "HEAD", "--", "params.yaml", cwd=repo)
        assert (repo / "params.yaml").read_bytes() == params
    assert _dvc("status", cwd=repo).strip().endswith("up to date.")


def test_a_rerank_experiment_reruns_no_tagging(reproduced_repo):
    """`dvc exp run -S retrieve.alpha=0.5`: the index tags depend on the features only, so the
    experiment reruns retrieve and what follows, and no tag, extract or train stage. Run in a
    temporary directory (`--temp`): the workspace keeps its outputs."""
    repo = reproduced_repo
    before = _sha256s(repo, ["data", "models", "metrics"])
    output = _dvc("exp", "run", "--temp", "--name", "alpha-half", "-S", "retrieve.alpha=0.5",
                  cwd=repo)
    ran = re.findall(r"Running stage '([^']+)'", output)
    assert ran == ["check", "retrieve", "evaluate", "visualize"], output
    assert f"Stage 'tag@{B}' didn't change, skipping" in output
    assert _sha256s(repo, ["data", "models", "metrics"]) == before
    _dvc("exp", "remove", "alpha-half", cwd=repo)
