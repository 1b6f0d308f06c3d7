"""Training: schedule, samplers, a tiny real run, kill-and-resume, DDP on CPU, recipes."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import endless
from glr import runtime, shards, train
from glr.data import mix
from glr.data.samplers import continent_group_probs
from glr.model import build_model
from glr.model.folder import load_model
from glr.params import ContinentParams, Params, PhaseParams, load_params, parse_params

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _outside_the_repository(tmp_path, monkeypatch):
    """Run from a scratch folder: DVCLive looks for a DVC repository from the working folder,
    and would mark steps of the repository's experiments (.dvc/tmp/exps) otherwise."""
    monkeypatch.chdir(tmp_path)


def _weights_and_biases(lr: float) -> torch.optim.SGD:
    """An optimizer shaped like train_phase's: a weight group at lr, a bias group at 2·lr."""
    weight, bias = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    return torch.optim.SGD([{"params": [weight], "lr": lr}, {"params": [bias], "lr": 2 * lr}],
                           lr=lr, momentum=0.9)


def _lrs(optimizer: torch.optim.Optimizer) -> list[float]:
    return [group["lr"] for group in optimizer.param_groups]


def test_lr_warmup_then_cosine():
    # lr 0.1 (biases 0.2), 10 epochs, 1 warmup epoch, 4 steps an epoch. By hand, from timm's
    # formula with the authors' settings (start 0.01·lr = 0.001, floor 0.002·lr = 0.0002):
    # warmup t < 1: 0.001 + t·(lr_g − 0.001); then 0.0002 + (lr_g − 0.0002)·(1 + cos(πt/10))/2.
    optimizer = _weights_and_biases(0.1)
    scheduler = train.make_scheduler(optimizer, 0.1, epochs=10, warmup_epochs=1.0)
    assert _lrs(optimizer) == [0.001, 0.001]  # already set at construction

    def lrs_at(epoch: int, step: int) -> list[float]:
        scheduler.step(train.epoch_time(epoch, step, 4))
        return _lrs(optimizer)

    close = dict(rel=1e-12, abs=0)
    assert lrs_at(0, 0) == pytest.approx([0.001, 0.001], **close)  # the start: 0.01·lr
    assert lrs_at(0, 1) == pytest.approx([0.02575, 0.05075], **close)
    assert lrs_at(0, 3) == pytest.approx([0.07525, 0.15025], **close)  # last warmup step
    # end of warmup, t = 1: the cosine over all 10 epochs (no warmup prefix), cos(π/10)
    assert lrs_at(1, 0) == pytest.approx([0.0975577201631282, 0.195110545977886], **close)
    assert lrs_at(2, 2) == pytest.approx([0.0853846283812087, 0.170739967440536], **close)
    assert lrs_at(5, 0) == pytest.approx([0.0501, 0.1001], **close)  # mid-run, cos(π/2) = 0
    # the last iteration, t = 9.75: cos(0.975π) = −0.996917333733128
    assert lrs_at(9, 3) == pytest.approx([0.000353825046716914, 0.000507958360060515], **close)
    scheduler.step(10.0)  # the end, t = T: the floor 0.002·lr, the same for the bias group
    assert _lrs(optimizer) == pytest.approx([0.0002, 0.0002], **close)


def test_lr_without_warmup_starts_at_each_groups_lr():
    # the authors' phases 2-4 (warmup 0): lr 0.008, biases 0.016, 4 epochs
    optimizer = _weights_and_biases(0.008)
    scheduler = train.make_scheduler(optimizer, 0.008, epochs=4, warmup_epochs=0.0)
    assert _lrs(optimizer) == [0.008, 0.016]
    close = dict(rel=1e-12, abs=0)
    scheduler.step(train.epoch_time(0, 0, 10))
    assert _lrs(optimizer) == pytest.approx([0.008, 0.016], **close)
    scheduler.step(train.epoch_time(2, 0, 10))  # 0.000016 + (lr_g − 0.000016)/2
    assert _lrs(optimizer) == pytest.approx([0.004008, 0.008008], **close)
    scheduler.step(train.epoch_time(3, 9, 10))  # t = 3.9: cos(0.975π) again
    assert _lrs(optimizer) == pytest.approx([2.83060037373531e-05, 4.06366688048412e-05], **close)
    scheduler.step(4.0)
    assert _lrs(optimizer) == pytest.approx([0.000016, 0.000016], **close)


@pytest.mark.parametrize("warmup", [1.0, 0.5, 0.0])
def test_lr_per_iteration_is_the_authors(warmup):
    """Every iteration's LR: the authors' loop (step after iteration n of 1-based epoch E to
    E + (n + 1)/L − 1) and the closed form give the LRs that train_phase sets before it."""
    lr, epochs, steps = 0.08, 3, 5
    ours, theirs = _weights_and_biases(lr), _weights_and_biases(lr)
    our_scheduler = train.make_scheduler(ours, lr, epochs, warmup)
    their_scheduler = train.make_scheduler(theirs, lr, epochs, warmup)
    seen = []
    for epoch in range(1, epochs + 1):
        for n_iter in range(steps):
            our_scheduler.step(train.epoch_time(epoch - 1, n_iter, steps))
            t = epoch - 1 + n_iter / steps
            for group_lr, ours_lr, theirs_lr in zip((lr, 2 * lr), _lrs(ours), _lrs(theirs),
                                                     strict=True):
                if t < warmup:
                    expected = 0.01 * lr + t / warmup * (group_lr - 0.01 * lr)
                else:
                    expected = 0.002 * lr + (group_lr - 0.002 * lr) * (
                        1 + math.cos(math.pi * t / epochs)) / 2
                assert ours_lr == pytest.approx(expected, rel=1e-12, abs=0)
                assert ours_lr == pytest.approx(theirs_lr, rel=1e-12, abs=0)
            seen.append(_lrs(ours)[0])
            their_scheduler.step(epoch + float(n_iter + 1) / steps - 1)
    after_warmup = seen[math.ceil(warmup * steps):]
    assert all(a > b for a, b in itertools.pairwise(after_warmup))


def test_lr_schedule_resumes_from_a_checkpoint(tmp_path):
    optimizer = _weights_and_biases(0.05)
    scheduler = train.make_scheduler(optimizer, 0.05, epochs=3, warmup_epochs=1.0)
    scheduler.step(train.epoch_time(0, 3, 4))
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()},
               tmp_path / "checkpoint.pt")
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)  # as train.try_resume
    resumed = _weights_and_biases(0.05)
    resumed_scheduler = train.make_scheduler(resumed, 0.05, epochs=3, warmup_epochs=1.0)
    resumed.load_state_dict(state["optimizer"])
    resumed_scheduler.load_state_dict(state["scheduler"])
    for epoch, step in [(1, 0), (1, 3), (2, 2)]:
        scheduler.step(train.epoch_time(epoch, step, 4))
        resumed_scheduler.step(train.epoch_time(epoch, step, 4))
        assert _lrs(resumed) == _lrs(optimizer)


def _manifest(continent, clean, samples):
    return {"continent": continent, "clean": clean, "samples": samples}


def test_continent_probabilities():
    manifests = [_manifest("Asia", True, 300), _manifest("Asia", True, 100),
                 _manifest("Asia", False, 50), _manifest("Europe", True, 10),
                 _manifest("Africa", False, 7)]
    params = ContinentParams(asia=0.5, europe=0.3, africa=0.2, north_america=0.0,
                             south_america=0.0, antarctica=0.0, oceania=0.0, other=0.0)
    probs = continent_group_probs(manifests, params)
    assert probs == pytest.approx([0.5 * 0.66 * 0.75, 0.5 * 0.66 * 0.25, 0.5 * 0.34, 0.3, 0.2])
    # continents without images drop out and the rest is renormalized
    probs = continent_group_probs(manifests[:3], ContinentParams())
    assert sum(probs) == pytest.approx(1.0) and probs[2] == pytest.approx(0.34)


def test_continent_sampler_proportions_over_100k_draws():
    manifests = [_manifest("Asia", True, 500), _manifest("Asia", False, 300),
                 _manifest("Europe", True, 200), _manifest("Europe", False, 100),
                 _manifest("Africa", True, 50), _manifest("North America", False, 80),
                 _manifest("OTHER", True, 5)]
    probs = continent_group_probs(manifests, ContinentParams())

    stream = mix([endless(i) for i in range(len(manifests))], probs, random.Random(0))
    draws = Counter(next(stream) for _ in range(100_000))
    continents = Counter()
    clean = Counter()
    for group, count in draws.items():
        continents[manifests[group]["continent"]] += count
        clean[manifests[group]["continent"], manifests[group]["clean"]] += count
    present = 0.5 + 0.2 + 0.15 + 0.1 + 0.01  # South America, Antarctica, Oceania have no images
    for continent, p in (("Asia", 0.5), ("Europe", 0.2), ("Africa", 0.15),
                         ("North America", 0.1), ("OTHER", 0.01)):
        assert abs(continents[continent] / 100_000 - p / present) < 0.02, continent
    assert abs(clean["Asia", True] / continents["Asia"] - 0.66) < 0.02
    assert abs(clean["Europe", True] / continents["Europe"] - 0.66) < 0.02


# --------------------------------------------------------------------------- real runs


def tiny_params(base: Params, p2_init: str = "p1", **train_changes) -> Params:
    """resnet10t at 32 px, phases of 3 and 1 epochs on the small shards; fp32 for
    determinism."""
    raw = {
        "data": dataclasses.asdict(base.data), "shard": dataclasses.asdict(base.shard),
        "model": {"pretrained": False, "backbones": ["resnet10t"], "size": 32, "embedding_dim": 32},
        "train": {"workers": 0, "checkpoint_every": 1, "precision": "fp32",
                  "shuffle_buffer": 50,
                  "phases": {
                      "p1": {"list": "clean", "epochs": 3, "lr": 0.05, "batch": 8,
                             "warmup_epochs": 1.0, "pad": 2},
                      "p2": {"list": "all", "epochs": 1, "lr": 0.01, "batch": 8,
                             "warmup_epochs": 0.0, "pad": 2, "sampler": "continent"}},
                  "recipe": {
                      "resnet10t-p1": {"backbone": "resnet10t", "phase": "p1",
                                       "init": "pretrained"},
                      "resnet10t-p2": {"backbone": "resnet10t", "phase": "p2",
                                       "init": p2_init}}},
    }
    raw["train"].update(train_changes)
    return parse_params(raw)


@pytest.fixture(scope="module")
def shard_dir(small_shards):
    return small_shards


def run_phase(params, shard_dir, root: Path, phase: str, stop_after_epochs=None):
    plan = train.plan_phase(params, "resnet10t", phase, shard_dir, root / "models",
                            root / "runs", world=1)
    return train.train_phase(params, plan, shard_dir, root / "metrics" / phase,
                             runtime.Dist(), stop_after_epochs=stop_after_epochs)


def live_files(folder: Path) -> dict[str, bytes]:
    """Every file of a DVCLive folder, relative path -> bytes."""
    return {path.relative_to(folder).as_posix(): path.read_bytes()
            for path in sorted(folder.rglob("*")) if path.is_file()}


def tsv(path: Path) -> list[list[str]]:
    return [line.split("\t") for line in path.read_text().splitlines()]


def test_two_phases_grow_the_classifier_and_write_models(small_pipeline, shard_dir, tmp_path,
                                                         caplog, monkeypatch):
    params = tiny_params(small_pipeline[0])
    train.init_main(params, "resnet10t", tmp_path / "models")
    monkeypatch.setattr(train, "CPU_WARN_SECONDS", 0.0)  # any phase is "long" on this CPU
    caplog.set_level("INFO")
    run_phase(params, shard_dir, tmp_path, "p1")
    # the time estimate: early (after ETA_SKIP + ETA_PROBE steps), then after every epoch;
    # the CPU warning once, with the first estimate
    estimates = re.findall(r"resnet10t/p1: about .+ for the whole phase \(3 epochs × \d+ steps "
                           r"× [\d.e-]+ s/step\); .+ left, ends about \d{4}-\d\d-\d\d \d\d:\d\d",
                           caplog.text)
    assert len(estimates) == 4, caplog.text
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and warnings[0].startswith("resnet10t/p1 at size 32 on a CPU (fp32)")
    # with the first estimate: after the first epoch here (4 steps, fewer than the probe's)
    assert caplog.text.index("on a CPU (fp32)") < caplog.text.index("resnet10t/p1 epoch 2:")
    run_phase(params, shard_dir, tmp_path, "p2")
    p1 = load_file(str(tmp_path / "models/resnet10t/p1/model.safetensors"))
    p2_model, config = load_model(tmp_path / "models/resnet10t/p2")
    lists = shards.read_lists(shard_dir)
    classes = {name: 1 + max(shards.read_manifest(shard_dir, g)["max_label"]
                             for g in lists[name]) for name in ("clean", "all")}
    assert p1["head.weight"].shape[0] == classes["clean"]
    assert p2_model.head.weight.shape[0] == classes["all"] > classes["clean"]
    assert config["phase"] == "p2" and config["settings"]["list"] == "all"
    assert config["size"] == 32
    # DVCLive: step = epoch for the per-epoch values; the LOG_EVERY curves carry iterations
    live = tmp_path / "metrics/p1"
    plan = train.plan_phase(params, "resnet10t", "p1", shard_dir, tmp_path / "models",
                            tmp_path / "runs", world=1)
    assert sorted(live_files(live)) == [
        "metrics.json", "params.yaml", "plots/metrics/epoch/loss.tsv",
        "plots/metrics/epoch/top1.tsv", "plots/metrics/train/loss.tsv",
        "plots/metrics/train/lr.tsv", "plots/metrics/train/top1.tsv"]
    epoch_loss = tsv(live / "plots/metrics/epoch/loss.tsv")
    assert epoch_loss[0] == ["step", "loss"] and [r[0] for r in epoch_loss[1:]] == ["1", "2", "3"]
    windows = [(e * plan.steps_per_epoch + s) for e in range(3)
               for s in range(plan.steps_per_epoch)
               if (s + 1) % train.LOG_EVERY == 0 or s + 1 == plan.steps_per_epoch]
    train_top1 = tsv(live / "plots/metrics/train/top1.tsv")
    assert train_top1[0] == ["step", "top1"]
    assert [int(r[0]) for r in train_top1[1:]] == windows
    # each epoch's top-1 is its windows' top-1 weighted by their steps (every batch is full):
    # ratios of integer counts, exact but for float64 rounding (a few 2^-53)
    epoch_top1 = [float(r[1]) for r in tsv(live / "plots/metrics/epoch/top1.tsv")[1:]]
    windows_top1 = [float(r[1]) for r in train_top1[1:]]
    ends = [(w % plan.steps_per_epoch) + 1 for w in windows]  # a window's last step, 1-based
    for epoch in range(3):
        mine = range(len(ends) * epoch // 3, len(ends) * (epoch + 1) // 3)
        steps = [end - (ends[i - 1] if i > mine.start else 0) for i, end in
                 zip(mine, (ends[i] for i in mine), strict=True)]
        weighted = sum(n * windows_top1[i] for n, i in zip(steps, mine, strict=True))
        assert weighted / plan.steps_per_epoch == pytest.approx(epoch_top1[epoch], abs=1e-12)
    assert [r[0] for r in tsv(live / "plots/metrics/train/lr.tsv")[1:]] == [str(w) for w in windows]
    final = load_model(tmp_path / "models/resnet10t/p1")[1]["final"]
    # metrics.json: the last epoch's values under names of this phase's own (no `step`)
    assert json.loads((live / "metrics.json").read_text()) == {
        "resnet10t": {"p1": {"epoch": 3, "loss": final["loss"], "top1": final["top1"]}}}
    logged = yaml.safe_load((live / "params.yaml").read_text())
    assert logged["backbone"] == "resnet10t" and logged["phase"] == "p1"
    assert logged["init"] == "pretrained" and logged["size"] == 32 and logged["epochs"] == 3
    assert logged["steps_per_epoch"] == plan.steps_per_epoch and logged["precision"] == "fp32"
    assert yaml.safe_load((tmp_path / "metrics/p2/params.yaml").read_text())["init"] == "p1"
    assert list((tmp_path / "runs/resnet10t/p1/tensorboard").iterdir())


def test_subcenters_and_dynamic_margins_through_two_phases(small_pipeline, shard_dir, tmp_path,
                                                           monkeypatch):
    """The 1st place's loss in both phases: 3 centers per class (the classifier grows by whole
    classes), and each phase's margins are `dynamic_margins` of its list's images per label,
    counted here from the shards' own samples."""
    import tarfile

    from glr.model.layers import ArcFace, dynamic_margins

    loss = {"arcface_subcenters": 3, "arcface_dynamic": [0.05, 0.5]}
    base = tiny_params(small_pipeline[0])
    phases = {name: {**dataclasses.asdict(phase), **loss}
              for name, phase in base.train.phases.items()}
    params = tiny_params(small_pipeline[0], phases=phases)
    train.init_main(params, "resnet10t", tmp_path / "models")
    applied = []
    set_margins = ArcFace.set_margins

    def recording(self, margins):
        applied.append(margins.clone())
        set_margins(self, margins)

    monkeypatch.setattr(ArcFace, "set_margins", recording)
    for phase in ("p1", "p2"):
        applied.clear()
        run_phase(params, shard_dir, tmp_path, phase)
        plan = train.plan_phase(params, "resnet10t", phase, shard_dir, tmp_path / "models",
                                tmp_path / "runs", world=1)
        counts = Counter()
        for group in plan.groups:
            for path in sorted(shards.group_dir(shard_dir, group).glob("*.tar")):
                with tarfile.open(path) as tar:
                    counts.update(json.loads(tar.extractfile(m).read())["label"]
                                  for m in tar.getmembers() if m.name.endswith(".json"))
        expected = torch.tensor([counts[label] for label in range(plan.num_classes)])
        assert torch.equal(plan.label_images, expected)
        # the fixed m when the model is built, then the phase's dynamic margins
        assert torch.equal(applied[-1], dynamic_margins(expected, 0.05, 0.5))
        model, _ = load_model(tmp_path / "models/resnet10t" / phase)
        assert model.config["arcface_subcenters"] == 3
        assert model.head.weight.shape[0] == 3 * plan.num_classes


def test_kill_and_resume_reaches_the_same_weights(small_pipeline, shard_dir, tmp_path):
    params = tiny_params(small_pipeline[0])
    for name in ("straight", "resumed"):
        train.init_main(params, "resnet10t", tmp_path / name / "models")
    run_phase(params, shard_dir, tmp_path / "straight", "p1")
    with pytest.raises(KeyboardInterrupt):
        run_phase(params, shard_dir, tmp_path / "resumed", "p1", stop_after_epochs=1)
    assert not (tmp_path / "resumed/models/resnet10t/p1").exists()
    # as if the run had been killed during epoch 2, after it had logged some of its steps
    live = tmp_path / "resumed/metrics/p1"
    with (live / "plots/metrics/train/loss.tsv").open("a") as file:
        file.write("999\t1.5\n")
    (live / "metrics.json").write_text('{"resnet10t": {"p1": {"epoch": 1.5, "loss": 9.0}}}')
    run_phase(params, shard_dir, tmp_path / "resumed", "p1")
    straight = load_file(str(tmp_path / "straight/models/resnet10t/p1/model.safetensors"))
    resumed = load_file(str(tmp_path / "resumed/models/resnet10t/p1/model.safetensors"))
    assert straight.keys() == resumed.keys()
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key
    resumed_live = live_files(tmp_path / "resumed/metrics/p1")
    assert [r[0] for r in tsv(tmp_path / "resumed/metrics/p1/plots/metrics/epoch/top1.tsv")[1:]
            ] == ["1", "2", "3"]
    # Same outputs as the uninterrupted run: every DVCLive file byte for byte (numbers stay
    # numbers through the checkpoint; no time in them), config.json but for the `init`
    # folder, which lies under another root here.
    assert resumed_live == live_files(tmp_path / "straight/metrics/p1")
    configs = [(tmp_path / name / "models/resnet10t/p1/config.json").read_text()
               .replace(str(tmp_path / name), "ROOT") for name in ("straight", "resumed")]
    assert configs[0] == configs[1]


def test_torchrun_two_processes_on_cpu(small_pipeline, shard_dir, tmp_path):
    params = tiny_params(small_pipeline[0], processes=2)
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(dataclasses.asdict(params), sort_keys=False))
    train.init_main(params, "resnet10t", tmp_path / "models")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    result = subprocess.run(
        [sys.executable, "-m", "glr", "train", "--params", str(params_file),
         "--backbone", "resnet10t", "--phase", "p1", "--shards", str(shard_dir),
         "--models", str(tmp_path / "models"), "--runs", str(tmp_path / "runs"),
         "--metrics", str(tmp_path / "metrics")],
        capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "starting 2 processes" in result.stderr
    _, config = load_model(tmp_path / "models/resnet10t/p1")
    assert config["world_size"] == 2 and config["effective_batch"] == 16
    metrics = json.loads((tmp_path / "metrics/resnet10t/p1/metrics.json").read_text())
    assert metrics["resnet10t"]["p1"]["epoch"] == 3
    assert len(tsv(tmp_path / "metrics/resnet10t/p1/plots/metrics/epoch/loss.tsv")) == 4


def _processes_mentioning(text: str) -> dict[int, dict[str, str]]:
    """pid -> environment of every live process whose command line contains `text`."""
    found = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if text not in (proc / "cmdline").read_bytes().decode(errors="replace"):
                continue
            if "zombie" in (proc / "status").read_text():
                continue
            environ = (proc / "environ").read_bytes().split(b"\0")
        except OSError:  # gone meanwhile
            continue
        found[int(proc.name)] = dict(item.decode(errors="replace").partition("=")[::2]
                                     for item in environ if item)
    return found


def test_a_dead_rank_under_torchrun_stops_the_run_and_a_rerun_resumes(small_pipeline,
                                                                      shard_dir, tmp_path):
    """kill -9 of one rank: torchrun stops the other rank and fails, no process is left
    behind, and the rerun resumes from the last checkpoint."""
    params = tiny_params(small_pipeline[0], processes=2)
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(dataclasses.asdict(params), sort_keys=False))
    train.init_main(params, "resnet10t", tmp_path / "models")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    command = [sys.executable, "-m", "glr", "train", "--params", str(params_file),
               "--backbone", "resnet10t", "--phase", "p1", "--shards", str(shard_dir),
               "--models", str(tmp_path / "models"), "--runs", str(tmp_path / "runs"),
               "--metrics", str(tmp_path / "metrics")]
    log_path = tmp_path / "run.log"
    with log_path.open("w") as log_file:
        run = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env=env,
                               start_new_session=True)
    try:
        checkpoint = tmp_path / "runs/resnet10t/p1/checkpoint.pt"
        deadline = time.monotonic() + 300
        while not checkpoint.exists() and run.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert checkpoint.exists(), log_path.read_text()[-3000:]
        ranks = {env.get("LOCAL_RANK"): pid
                 for pid, env in _processes_mentioning(str(tmp_path / "runs")).items()}
        assert {"0", "1"} <= set(ranks), ranks
        os.kill(ranks["1"], signal.SIGKILL)
        returncode = run.wait(timeout=180)
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
    output = log_path.read_text()
    assert returncode != 0
    assert "Signal 9 (SIGKILL)" in output or "exitcode  : -9" in output, output[-3000:]
    deadline = time.monotonic() + 30
    while _processes_mentioning(str(tmp_path / "runs")) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _processes_mentioning(str(tmp_path / "runs")), "a rank outlived the run"
    assert not (tmp_path / "models/resnet10t/p1").exists()

    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert re.search(r"resuming resnet10t/p1 from .* after epoch [12]", result.stderr)
    _, config = load_model(tmp_path / "models/resnet10t/p1")
    assert config["final"]["epoch"] == 3 and config["world_size"] == 2


def test_phase_live_follows_a_running_epoch_and_resumes_on_a_checkpoints_files(tmp_path):
    folder = tmp_path / "metrics/train/resnet18/p1"
    live = train.PhaseLive(folder, "resnet18", "p1", {"epochs": 2, "size": 64}, train.Resumed())

    def metrics() -> dict:
        return json.loads((folder / "metrics.json").read_text())["resnet18"]["p1"]

    # 40 steps an epoch, LOG_EVERY 20: a window's means on the curves, the epoch so far in
    # metrics.json (what `dvc exp show` shows of a running experiment)
    live.window(19, 9.5, 0.25, 0.1, progress=0.5, epoch_loss=9.5, epoch_top1=0.25)
    assert metrics() == {"epoch": 0.5, "loss": 9.5, "top1": 0.25}
    live.window(39, 8.5, 0.75, 0.05, progress=1.0, epoch_loss=9.0, epoch_top1=0.5)
    live.epoch({"epoch": 1, "loss": 9.0, "top1": 0.5, "lr": 0.05})
    files = live.files()
    assert json.loads(files["metrics.json"]) == {"resnet18": {"p1": {"epoch": 1, "loss": 9.0,
                                                                     "top1": 0.5}}}
    assert files["plots/metrics/train/loss.tsv"] == "step\tloss\n19\t9.5\n39\t8.5\n"
    assert files["plots/metrics/train/lr.tsv"] == "step\tlr\n19\t0.1\n39\t0.05\n"
    assert files["plots/metrics/epoch/top1.tsv"] == "step\ttop1\n1\t0.5\n"
    assert yaml.safe_load(files["params.yaml"]) == {"epochs": 2, "size": 64}
    live.window(59, 7.0, 0.5, 0.01, progress=1.5, epoch_loss=7.0, epoch_top1=0.5)

    # a run resumed from the checkpoint of epoch 1: the window logged after it is gone
    resumed = train.PhaseLive(folder, "resnet18", "p1", {"epochs": 2, "size": 64},
                              train.Resumed(1, {}, files))
    assert resumed.files() == files
    resumed.window(59, 6.0, 1.0, 0.01, progress=1.5, epoch_loss=6.0, epoch_top1=1.0)
    resumed.epoch({"epoch": 2, "loss": 6.0, "top1": 1.0, "lr": 0.01})
    resumed.end()
    assert (folder / "plots/metrics/train/loss.tsv").read_text() == (
        "step\tloss\n19\t9.5\n39\t8.5\n59\t6.0\n")
    assert (folder / "plots/metrics/epoch/loss.tsv").read_text() == "step\tloss\n1\t9.0\n2\t6.0\n"
    assert metrics() == {"epoch": 2, "loss": 6.0, "top1": 1.0}


def test_phase_estimate_leaves_out_the_warm_up_steps():
    # 12 epochs of 21 steps; the first two steps (9 s, 4 s) warm up, then 1.25, 1.0, 0.75 s
    estimate = train.estimate_phase([9.0, 4.0, 1.25, 1.0, 0.75], steps_done=5,
                                    steps_per_epoch=21, epochs=12)
    assert estimate == train.Estimate(seconds_per_step=1.0, total_seconds=252.0,
                                      remaining_seconds=247.0)
    # a resumed run: 3 epochs were done before it, 2 steps by it (too few to leave any out)
    estimate = train.estimate_phase([3.0, 5.0], steps_done=3 * 21 + 2, steps_per_epoch=21,
                                    epochs=4)
    assert estimate == train.Estimate(4.0, 336.0, 76.0)
    # the end of the phase
    assert train.estimate_phase([2.0] * 10, 84, 21, 4).remaining_seconds == 0.0
    with pytest.raises(ValueError, match="no measured step"):
        train.estimate_phase([], 0, 21, 4)
    assert [train.format_duration(s) for s in (45, 720, 14400, 3 * 86400)] == [
        "45 s", "12 min", "4.0 h", "3.0 days"]


def test_a_long_phase_on_a_cpu_is_a_warning_naming_the_estimate_and_its_cause():
    plan = train.PhasePlan(
        backbone="resnet18", name="p1", phase=PhaseParams(epochs=12, batch=32), snapshots=(),
        size=512, groups=["clean"], probs=None, num_classes=60, label_images=None,
        list_samples=672,
        steps_per_epoch=21, init_dir=Path("models/resnet18/pretrained"),
        out_dir=Path("models/resnet18/p1"), run_dir=Path("runs/resnet18/p1"))
    slow = train.estimate_phase([80.0, 60.0, 57.5, 57.0, 56.5], 5, 21, 12)  # 57 s/step
    assert slow.total_seconds == 14364.0  # 4.0 h
    assert train.cpu_warning(plan, slow, torch.device("cpu"), "fp32") == (
        "resnet18/p1 at size 512 on a CPU (fp32): about 4.0 h for the whole phase (12 epochs "
        "× 21 steps × 57.0 s/step, batch 32). A GPU runs such steps tens of times faster; on "
        "a CPU a smaller model.size or fewer train.phases.p1.epochs shorten it (the time grows "
        "with size²).")
    assert train.cpu_warning(plan, slow, torch.device("cuda", 0), "fp16") is None
    quick = train.estimate_phase([9.0, 4.0, 1.0], 3, 21, 12)  # 252 s
    assert train.cpu_warning(plan, quick, torch.device("cpu"), "fp32") is None


def test_the_loader_report_warns_of_too_many_workers_and_buffers_over_half_the_memory():
    gib, mib = 2 ** 30, 2 ** 20
    # the authors' 8 ranks × 8 workers, 10,000-sample buffers of ~100 KB JPEGs: ~1 GiB each
    line, warnings = train.loader_report(8, 8, 32, 1024 * mib, 512 * gib, 10_000)
    assert line == ("loader: 8 process(es) × 8 DataLoader worker(s) on 32 CPU(s); shuffle "
                    "buffers and prefetched batches up to 64.00 GiB of the host's 512 GiB "
                    "(1024 MiB per reader)")
    assert warnings == [
        "train.workers 8 × 8 process(es) = 64 DataLoader workers on 32 CPU(s): they compete "
        "for the CPUs, and 4 per process would fit. Not capped here, since the worker count "
        "decides the batches: set train.workers"]
    _, warnings = train.loader_report(8, 8, 128, 1024 * mib, 96 * gib, 10_000)
    assert warnings == [
        "the loader may hold 64.0 GiB on this node (64 readers × 1024 MiB, mostly the shuffle "
        "buffers of train.shuffle_buffer 10000 samples), over half of the host's 96 GiB: "
        "lower train.shuffle_buffer or train.workers"]
    # no workers: the process is its one reader
    line, warnings = train.loader_report(0, 1, 2, 64 * mib, 24 * gib, 1000)
    assert "up to 0.06 GiB" in line and warnings == []


# --------------------------------------------------------------------------- recipes


@pytest.mark.parametrize("recipe", sorted((REPO / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_recipes_load_and_their_models_run(recipe):
    params = load_params(recipe)
    assert params.train.phases
    for backbone in params.model.backbones:
        model = build_model(backbone, 10, embedding_dim=params.model.embedding_dim).eval()
        with torch.no_grad():
            features = model.extract(torch.randn(1, 3, 64, 64))
        assert features.shape == (1, params.model.embedding_dim)
        # unit rows of D float32 values: the norm is within (D + 3) * 2^-24 of 1
        dim = params.model.embedding_dim
        assert torch.allclose(features.norm(dim=1), torch.ones(1), rtol=0,
                              atol=(dim + 3) * 2.0**-24)


def test_the_code_digest_covers_every_glr_module_the_training_code_imports():
    import ast

    package = REPO / "src" / "glr"
    covered = set()
    for name in train.DIGEST_MODULES:
        path = package / name
        covered |= {p.relative_to(package).as_posix() for p in
                    (sorted(path.glob("*.py")) if path.is_dir() else [path])}
    # progress bars, error classes, whole-file writes, and what only shards.py's writer uses
    # (the shards' bytes, which the run fingerprint holds, carry its effect): no other effect
    # on a run's result
    drawn_only = {"progress.py", "errors.py", "files.py", "workers.py", "gldv2.py", "prepare.py"}
    for source in sorted(covered):
        for node in ast.walk(ast.parse((package / source).read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "glr":  # from glr import x
                names = [f"glr.{a.name}" for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            else:
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            for name in names:
                if not name.startswith("glr."):
                    continue
                parts = name.split(".")[1:]
                module = ("/".join(parts) + ".py" if (package / ("/".join(parts) + ".py")).is_file()
                          else "/".join(parts) + "/__init__.py")
                if parts[0] in ("model", "data"):
                    continue  # whole folders are covered
                assert module in covered | drawn_only, f"{source} imports {name}"
    # and the train stages depend on the same files
    deps = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["train"]["do"]["deps"]
    assert {f"src/glr/{name}" for name in train.DIGEST_MODULES} <= set(deps)


def test_repo_params_phases_chain():
    params = load_params(REPO / "params.yaml")
    plan = params.plan(params.model.backbones[0])
    assert [(p.name, p.init.folder) for p in plan] == [("p1", "pretrained"), ("p2", "p1")]
    assert plan[1].settings.sampler == "continent"


def test_a_phase_can_start_from_an_epoch_of_another(small_pipeline, shard_dir, tmp_path):
    """p2 starts from p1's epoch 2: p1 keeps that epoch's model as models/<b>/p1/epoch-2/
    (an output of its stage), and p2 loads it."""
    params = tiny_params(small_pipeline[0], p2_init="p1/epoch-2")
    train.init_main(params, "resnet10t", tmp_path / "models")
    run_phase(params, shard_dir, tmp_path, "p1")
    folder = tmp_path / "models/resnet10t/p1"
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "epoch-2",
                                                        "model.safetensors"]
    snapshot, config = load_model(folder / "epoch-2")
    final, _ = load_model(folder)
    assert config["final"]["epoch"] == 2
    assert not torch.equal(snapshot.head.weight, final.head.weight)
    plan = train.plan_phase(params, "resnet10t", "p2", shard_dir, tmp_path / "models",
                            tmp_path / "runs", world=1)
    assert plan.init_dir == folder / "epoch-2"
    run_phase(params, shard_dir, tmp_path, "p2")
    _, p2_config = load_model(tmp_path / "models/resnet10t/p2")
    assert p2_config["init"] == str(folder / "epoch-2")
    # a phase nothing starts from mid-way keeps no snapshot
    assert not list((tmp_path / "models/resnet10t/p2").glob("epoch-*"))


def test_rerun_of_a_finished_phase_restores_its_outputs(small_pipeline, shard_dir, tmp_path,
                                                         caplog):
    """DVC deletes a stage's outputs before rerunning it: the finished checkpoint restores them
    (same weights, same history) without training again."""
    params = tiny_params(small_pipeline[0])
    train.init_main(params, "resnet10t", tmp_path / "models")
    run_phase(params, shard_dir, tmp_path, "p1")
    weights = (tmp_path / "models/resnet10t/p1/model.safetensors").read_bytes()
    config = (tmp_path / "models/resnet10t/p1/config.json").read_bytes()
    history = live_files(tmp_path / "metrics/p1")
    final = json.loads(config)["final"]
    assert all(isinstance(final[key], float) for key in ("loss", "top1", "lr"))
    shutil.rmtree(tmp_path / "models/resnet10t/p1")
    shutil.rmtree(tmp_path / "metrics/p1")
    caplog.set_level("INFO")
    run_phase(params, shard_dir, tmp_path, "p1")
    assert "after epoch 3" in caplog.text and "epoch 1:" not in caplog.text.split("resuming")[1]
    assert (tmp_path / "models/resnet10t/p1/model.safetensors").read_bytes() == weights
    # config.json too: `dvc status` would otherwise see a changed model and rerun extraction.
    assert (tmp_path / "models/resnet10t/p1/config.json").read_bytes() == config
    assert live_files(tmp_path / "metrics/p1") == history


def test_a_size_above_the_shards_max_side_is_a_clear_error(small_pipeline, shard_dir, tmp_path):
    params = tiny_params(small_pipeline[0])
    # params allow it when shard.max_side is raised, but these shards were cut at 512
    phases = {**params.train.phases,
              "p1": dataclasses.replace(params.train.phases["p1"], size=1024)}
    params = dataclasses.replace(params, train=dataclasses.replace(params.train,
                                                                   phases=phases))
    with pytest.raises(shards.ShardError, match=r"1024 px .*shard\.max_side = 512"):
        train.plan_phase(params, "resnet10t", "p1", shard_dir, tmp_path, tmp_path, world=1)


def test_running_stats_sum_as_the_host_loop_did_without_reading_the_device(monkeypatch):
    """The step loop's loss/accuracy sums stay on the device between reads and still give
    the very float64 sums of the former per-step `loss.item() * len(labels)` host loop."""
    generator = torch.Generator().manual_seed(0)
    steps = [(torch.rand((), generator=generator) * 7, torch.randn(n, 5, generator=generator),
              torch.randint(0, 5, (n,), generator=generator)) for n in [8] * 30 + [3]]
    host_loss, host_correct = 0.0, 0
    for loss, logits, labels in steps:
        host_loss += loss.item() * len(labels)
        host_correct += int((logits.argmax(1) == labels).sum())
    stats = train.RunningStats(torch.device("cpu"))

    def no_read(*args):
        raise AssertionError("RunningStats.add read a value on the host")

    with monkeypatch.context() as patch:
        for name in ("item", "tolist", "__int__", "__float__", "__bool__"):
            patch.setattr(torch.Tensor, name, no_read)
        for loss, logits, labels in steps[:20]:
            stats.add(loss, logits, labels)
    first_loss, first_top1 = stats.window()
    for loss, logits, labels in steps[20:]:
        stats.add(loss, logits, labels)
    assert stats.read() == (host_loss, host_correct, 8 * 30 + 3)  # exactly, not approximately
    later_loss, _ = stats.window()
    assert first_loss == pytest.approx(sum(s[0].item() for s in steps[:20]) / 20)
    assert later_loss == pytest.approx(sum(s[0].item() * len(s[2]) for s in steps[20:]) / 83)
    assert first_top1 == sum(int((s[1].argmax(1) == s[2]).sum()) for s in steps[:20]) / 160


def test_ranks_that_found_different_checkpoints_stop_with_one_line(tmp_path):
    """Rank 0 resumed after epoch 4, rank 1 (another node, no shared filesystem) found none:
    every rank sees the gathered epochs and stops, instead of training different epochs."""
    checkpoint = tmp_path / "runs/resnet18/p1/checkpoint.pt"
    train.check_resumed_epochs([4, 4], checkpoint)
    train.check_resumed_epochs([0, 0, 0], checkpoint)
    with pytest.raises(train.LaunchError, match=r"checkpoint\.pt: the ranks found different "
                                                r"checkpoints \(rank 0: 4, rank 1: none\); the "
                                                r"runs folder must be on a filesystem"):
        train.check_resumed_epochs([4, 0], checkpoint)
