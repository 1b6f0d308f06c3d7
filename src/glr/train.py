"""Stages `init` and `train`: starting weights, then one training phase of one backbone.

`glr init --backbone B` writes `models/B/pretrained/`: the backbone's starting weights (timm's
ImageNet weights, a local file, or a seeded random init), so that every phase starts from a
DVC-tracked model folder. `glr train --backbone B --phase P` trains phase P from the folder of
the phase named in its `init` and writes `models/B/P/` (model.safetensors + config.json).

The loop, by method.md: SGD (momentum 0.9, biases at 2× LR), cosine schedule with linear
warmup counted in epochs and stepped per iteration, ArcFace + cross-entropy, mixed precision
(fp16 + GradScaler on CUDA, bf16 autocast on a CPU with native bfloat16, fp32 on other CPUs),
channels_last. Under torchrun every rank
reads its own part of the shards; only rank 0 logs and writes. One DataLoader serves the whole
phase (its workers live across epochs); each node logs its footprint and warns when the
workers outnumber its CPUs or the buffers could fill half its memory. Resumable: a checkpoint
(model, optimizer, scheduler, scaler, epoch, RNG states, the DVCLive files so far) is written
every `train.checkpoint_every` epochs to `runs/B/P/checkpoint.pt`, and a restarted stage
resumes from it when it belongs to the same phase settings and starting weights.

Logs: TensorBoard in `runs/B/P/tensorboard`, and DVCLive in `metrics/train/B/P/` (one folder
per stage, declared in dvc.yaml): `params.yaml` (the phase's resolved settings),
`metrics.json` (`dvc metrics` / `dvc exp show`: `B.P.epoch`, `B.P.loss`, `B.P.top1`, updated
while the phase runs) and `plots/metrics/{epoch,train}/*.tsv` (`dvc plots show`). Steps, as
TensorBoard's: `epoch/loss` and `epoch/top1` are logged at step = the epoch (1-based); the
curves of every LOG_EVERY steps, `train/loss`, `train/top1` (the means of those steps) and
`train/lr`, at step = the iteration (0-based over the whole phase, the window's last). Only
deterministic values go to these files, so a resumed stage writes the very bytes of an
uninterrupted one; times (speed, the phase's estimated duration) go to the log and TensorBoard.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import random
import shutil
import time
from pathlib import Path

import torch
import torch.distributed as dist
from timm.scheduler import CosineLRScheduler
from torch.utils.data import DataLoader
from torch.utils.tensorboard import SummaryWriter

from glr import files, shards
from glr.data import TrainStream, TrainTransform, normalize
from glr.data.samplers import continent_group_probs
from glr.model import build_model, dynamic_margins, load_phase_weights, param_groups
from glr.model.folder import WEIGHTS, file_digest, load_model, save_model
from glr.model.packaged import PackagedWeightsError, load_packaged, package_weights_file
from glr.params import FIRST_INIT, ModelParams, Params, ParamsError, PhaseParams
from glr.progress import progress_bar
from glr.runtime import (
    Dist,
    LaunchError,
    available_cpus,
    cpu_kernels_name,
    host_memory_bytes,
    local_processes,
    pin_cpu_kernels,
    pin_cuda_algorithms,
    precision_context,
    precision_name,
    relaunch_under_torchrun,
    setup_distributed,
    worker_fit,
)

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- starting weights


def _model_kwargs(params: ModelParams, phase: PhaseParams | None = None) -> dict:
    """build_model's keywords: the model params, with a phase's own ArcFace s and m."""
    s = phase.arcface_s if phase is not None and phase.arcface_s is not None else None
    m = phase.arcface_m if phase is not None and phase.arcface_m is not None else None
    return {"embedding_dim": params.embedding_dim, "gem_p": params.gem_p,
            "arcface_s": params.arcface_s if s is None else s,
            "arcface_m": params.arcface_m if m is None else m,
            "arcface_subcenters": 1 if phase is None else phase.arcface_subcenters}


def label_images(manifests: list[dict], num_classes: int, where: Path) -> torch.Tensor:
    """Images per label (int64, (num_classes,)) of a list's groups, from their manifests."""
    counts = torch.zeros(num_classes, dtype=torch.int64)
    for manifest in manifests:
        if "labels" not in manifest:
            raise shards.ShardError(f"{where}: the manifest of group {manifest['group']} has no "
                                    "label counts (written by an older glr); rerun the shard "
                                    "stage (dvc repro shard)")
        counts.index_add_(0, torch.tensor(manifest["labels"], dtype=torch.int64),
                          torch.tensor(manifest["label_images"], dtype=torch.int64))
    return counts


def init_main(params: Params, backbone: str, models_dir: Path) -> Path:
    """Write the starting weights of `backbone` to models/<backbone>/pretrained/.

    Raises ParamsError (one line from `glr`, exit status 2) for a backbone outside
    model.backbones, a missing weights file, or timm weights that cannot be fetched.
    """
    if backbone not in params.model.backbones:
        raise ParamsError(f"--backbone {backbone}: not in params model.backbones "
                          f"({', '.join(params.model.backbones)})")
    # random initial weights come from vectorized kernels too
    pin_cpu_kernels(params.train.cpu_kernels, params.train.cpu_threads)
    log.info("cpu: %s", cpu_kernels_name(params.train.cpu_kernels))
    torch.manual_seed(params.train.seed)
    weights = None
    if params.model.weights_dir:
        weights = Path(params.model.weights_dir) / f"{backbone}.pth"
        if not weights.is_file():
            if not params.model.pretrained:
                raise ParamsError(f"model.weights_dir: no file {weights} for backbone "
                                  f"{backbone} (model.pretrained is false, so there is no "
                                  "fallback to timm's weights)")
            log.info("%s: no %s; taking timm's ImageNet weights (model.pretrained)", backbone,
                     weights)
            weights = None  # this backbone falls back to timm's weights
    packaged = (params.model.pretrained and weights is None
                and params.model.pretrained_source == "package")
    model = build_model(backbone, 1,
                        pretrained=params.model.pretrained and weights is None and not packaged,
                        pretrained_path=str(weights) if weights else None,
                        skip_fc_keys=weights is not None and backbone in params.model.skip_fc_keys,
                        **_model_kwargs(params.model))
    source = str(weights) if weights else ("timm" if params.model.pretrained else "random")
    if packaged:
        try:
            path = package_weights_file(backbone)
            load_packaged(model.backbone, backbone)
        except PackagedWeightsError as err:
            raise ParamsError(f"model.pretrained_source: package: {err}") from None
        source = f"package {path.parent.parent.name}: {path.name}"
    folder = Path(models_dir) / backbone / FIRST_INIT
    save_model(model, folder, {"model": model.config, "source": source,
                               "seed": params.train.seed})
    log.info("%s: starting weights (%s) -> %s", backbone, source, folder)
    return folder


# --------------------------------------------------------------------------- schedule


def make_scheduler(optimizer: torch.optim.Optimizer, lr: float, epochs: int,
                   warmup_epochs: float) -> CosineLRScheduler:
    """The authors' LR schedule: timm's CosineLRScheduler with their `create_scheduler` settings.

    Time counts in (fractional) epochs. Warmup: linear from 0.01·lr over `warmup_epochs`
    (none at 0). Then a cosine from each group's own LR (its `initial_lr`) down to 0.002·lr
    at t = `epochs`, computed over the whole run, warmup included (no warmup prefix): after
    1 warmup epoch of 10 it starts at 0.9755·lr, not at lr. The start (0.01·lr) and the floor
    (0.002·lr) are one value for all groups, as in the authors' code, so the bias group at
    2·lr warms up from 0.01·lr and decays to 0.002·lr: it is at 2× only in between, up to
    those two. `train_phase` calls `scheduler.step(epoch_time(...))` before each iteration,
    which makes the LR a function of (epoch, step) alone (the same after a resume); the
    authors step after each iteration to the next one's time, which gives the same LRs.
    """
    return CosineLRScheduler(
        optimizer, t_initial=epochs, lr_min=0.002 * lr, cycle_mul=1.0, cycle_decay=0.1,
        cycle_limit=1, warmup_t=warmup_epochs, warmup_lr_init=0.01 * lr, warmup_prefix=False,
        t_in_epochs=True, noise_range_t=None)


def epoch_time(epoch: int, step: int, steps_per_epoch: int) -> float:
    """The scheduler's time at iteration `step` of epoch `epoch` (both from 0), in epochs."""
    return epoch + step / steps_per_epoch


# --------------------------------------------------------------------------- the phase


@dataclasses.dataclass(frozen=True)
class PhasePlan:
    """Everything a phase's run derives from params and the shards."""

    backbone: str
    name: str
    phase: PhaseParams  # this backbone's settings, resolved (size, ArcFace, checkpoints)
    snapshots: tuple[int, ...]  # epochs to keep as models/<backbone>/<name>/epoch-<N>/
    size: int
    groups: list[str]
    probs: list[float] | None
    num_classes: int
    label_images: torch.Tensor | None  # per label, for dynamic margins (arcface_dynamic)
    list_samples: int
    steps_per_epoch: int
    init_dir: Path
    out_dir: Path
    run_dir: Path


def plan_phase(params: Params, backbone: str, phase_name: str, shard_dir: Path,
               models_dir: Path, runs_dir: Path, world: int) -> PhasePlan:
    resolved = params.phase_plan(backbone, phase_name)
    phase = resolved.settings
    groups = shards.read_lists(shard_dir)[phase.list]
    if not groups:
        raise shards.ShardError(f"{shard_dir}: list {phase.list} has no images")
    shards.check_size(shard_dir, groups, resolved.size,
                      f"phase {phase_name}'s size for {backbone}")
    manifests = [shards.read_manifest(shard_dir, g) for g in groups]
    list_samples = sum(m["samples"] for m in manifests)
    num_classes = 1 + max(m["max_label"] for m in manifests)
    probs = (continent_group_probs(manifests, params.train.continent)
             if phase.sampler == "continent" else None)
    # An epoch is the list's size over all ranks (method.md: L = list size / world size).
    steps = max(1, list_samples // (phase.batch * world))
    counts = (label_images(manifests, num_classes, shard_dir)
              if phase.arcface_dynamic is not None else None)
    return PhasePlan(backbone=backbone, name=phase_name, phase=phase,
                     snapshots=resolved.snapshots, size=resolved.size,
                     groups=groups, probs=probs, num_classes=num_classes, label_images=counts,
                     list_samples=list_samples, steps_per_epoch=steps,
                     init_dir=Path(models_dir) / backbone / resolved.init.folder,
                     out_dir=Path(models_dir) / backbone / phase_name,
                     run_dir=Path(runs_dir) / backbone / phase_name)


# The code a training run's result depends on: the loop, its params and runtime, the model,
# the loader and the shard reader the loader calls (tests/test_train.py checks that every glr
# module these import is here, or only draws progress bars). The train stages in dvc.yaml
# depend on the same files.
DIGEST_MODULES = ("train.py", "params.py", "runtime.py", "shards.py", "model", "data")


def code_digest() -> str:
    """sha256 of the code a training run depends on (`DIGEST_MODULES`)."""
    package = Path(__file__).parent
    sources = []
    for name in DIGEST_MODULES:
        path = package / name
        sources += sorted(path.glob("*.py")) if path.is_dir() else [path]
    digest = hashlib.sha256()
    for path in sources:
        digest.update(path.read_bytes())
    return digest.hexdigest()


def shards_digest(shard_dir: Path, groups: list[str]) -> str:
    """sha256 over the sha256 of every shard of `groups` (from their manifests)."""
    entries = [(g, e["file"], e["sha256"]) for g in groups
               for e in shards.read_manifest(shard_dir, g)["shards"]]
    return hashlib.sha256(json.dumps(entries).encode()).hexdigest()


def run_fingerprint(params: Params, plan: PhasePlan, shard_dir: Path, world: int) -> str:
    """What a checkpoint must match to be resumed: every setting that changes the result, the
    shards' bytes, the code and the starting weights (not workers or checkpoint frequency)."""
    train = dataclasses.asdict(params.train)
    for unrelated in ("workers", "checkpoint_every", "phases", "recipe", "processes"):
        train.pop(unrelated)  # phases, recipe: this phase's resolved settings below
    model = dataclasses.asdict(params.model)
    for unrelated in ("backbones", "size", "arcface_s", "arcface_m", "pretrained",
                      "pretrained_source", "weights_dir"):
        model.pop(unrelated)  # size, ArcFace: in the phase; weights: the init digest below
    phase = dataclasses.asdict(plan.phase)
    phase.pop("checkpoint_every")  # when checkpoints are written does not change the result
    blob = json.dumps({"phase": phase, "size": plan.size, "snapshots": plan.snapshots,
                       "train": train, "model": model, "code": code_digest(),
                       "shards": shards_digest(shard_dir, plan.groups),
                       "classes": plan.num_classes, "world": world,
                       "init": file_digest(plan.init_dir / WEIGHTS)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def make_stream(params: Params, plan: PhasePlan, shard_dir: Path) -> TrainStream:
    phase = plan.phase
    return TrainStream(shard_dir, plan.groups, TrainTransform(plan.size, phase.pad),
                       batch_size=phase.batch, batches_per_epoch=plan.steps_per_epoch,
                       probs=plan.probs,
                       pk_instances=phase.instances if phase.sampler == "id_uniform" else None,
                       seed=params.train.seed, shuffle_buffer=params.train.shuffle_buffer)


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def save_checkpoint(path: Path, model, optimizer, scheduler, scaler, epoch: int,
                    fingerprint: str, summary: dict, live_files: dict[str, str]) -> None:
    state = {
        # the last epoch's summary and the DVCLive files as they were at this epoch's end, as
        # JSON strings: numbers stay numbers and come back as the same floats
        "summary": json.dumps(summary), "live": json.dumps(live_files),
        "model": model.state_dict(), "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else {},
        "epoch": epoch, "fingerprint": fingerprint,
        "torch_rng": torch.get_rng_state(),
        # this rank's own device only: restoring every GPU's state on every rank would open a
        # CUDA context on each GPU from each process
        "cuda_rng": (torch.cuda.get_rng_state(model_device(model))
                     if model_device(model).type == "cuda" else torch.zeros(0, dtype=torch.uint8)),
        "python_rng": list(random.getstate()[1]),
    }
    with files.atomic(path) as tmp:
        torch.save(state, tmp)


@dataclasses.dataclass(frozen=True)
class Resumed:
    """What a checkpoint restores besides the training state."""

    epoch: int = 0  # finished epochs
    summary: dict = dataclasses.field(default_factory=dict)  # the last epoch's
    live_files: dict = dataclasses.field(default_factory=dict)  # DVCLive folder, path -> text


def check_resumed_epochs(epochs: list[int], checkpoint: Path) -> None:
    """Every rank resumes from the same epoch, or the ranks would train different epochs and
    wait for each other at the end forever. Only rank 0 writes the checkpoint: on several
    nodes the others find it only on a shared filesystem."""
    if len(set(epochs)) > 1:
        found = ", ".join(f"rank {rank}: {epoch or 'none'}" for rank, epoch in enumerate(epochs))
        raise LaunchError(f"{checkpoint}: the ranks found different checkpoints ({found}); the "
                          "runs folder must be on a filesystem every node shares "
                          "(docs/machines.md)")


def try_resume(path: Path, fingerprint: str, model, optimizer, scheduler, scaler) -> Resumed:
    """Load a matching checkpoint; Resumed() (epoch 0) without one."""
    if not path.is_file():
        return Resumed()
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state.get("fingerprint") != fingerprint:
        log.warning("%s belongs to other settings, code or starting weights; starting afresh",
                    path)
        return Resumed()
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if scaler is not None and state["scaler"]:
        scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(state["torch_rng"])
    if len(state["cuda_rng"]) and model_device(model).type == "cuda":
        torch.cuda.set_rng_state(state["cuda_rng"], model_device(model))
    random.setstate((3, tuple(state["python_rng"]), None))
    return Resumed(int(state["epoch"]), json.loads(state["summary"]),
                   json.loads(state["live"]))


class PhaseLive:
    """The DVCLive folder of one phase (rank 0 only): params, metrics.json and curves.

    metrics.json holds `{<backbone>: {<phase>: {epoch, loss, top1}}}`: names no other
    stage's file has, so `dvc exp show` gives each a short column of its own
    (`resnet18.p1.loss`) where shared names would each be prefixed with their file's path.
    For the same reason it has no DVCLive `step` (which `next_step()` would write into every
    phase's file): `live.step` is set while values are logged, for the curves' step column,
    and None otherwise, and `sync()` closes an epoch. Between epochs the three values follow
    the running epoch (epoch as a fraction, loss and top-1 as the epoch's means so far), so
    `dvc exp show` follows a running experiment.

    DVC deletes the stage's outputs before it reruns the stage, and a run killed after its
    last checkpoint has logged epochs that the resumed run trains again: the folder is
    therefore rebuilt from the files the checkpoint holds (as they were at its epoch's end)
    and DVCLive resumes on them, so a resumed phase ends with the same bytes as an
    uninterrupted one.
    """

    def __init__(self, folder: Path, backbone: str, phase: str, params: dict,
                 resumed: Resumed):
        from dvclive import Live  # imports DVC: only where a phase really logs

        self.folder = Path(folder)
        self.backbone, self.phase = backbone, phase
        shutil.rmtree(self.folder, ignore_errors=True)
        for name, text in resumed.live_files.items():
            (self.folder / name).parent.mkdir(parents=True, exist_ok=True)
            with open(self.folder / name, "w", encoding="utf-8", newline="") as file:
                file.write(text)  # newline="": the very bytes, line ends included
        # dvcyaml=False: dvc.yaml declares these files as the stage's outputs itself;
        # save_dvc_exp=False: `dvc exp run` records the experiment, not DVCLive
        self.live = Live(str(self.folder), resume=bool(resumed.live_files), dvcyaml=False,
                         save_dvc_exp=False)
        self.live.step = None  # see the class docstring
        self.live.log_params(params)

    def _log(self, step: int, values: dict[str, float]) -> None:
        live = self.live
        live.step = step
        for name, value in values.items():
            live.log_metric(name, value)
        live.step = None

    def _summary(self, epoch: float, loss: float, top1: float) -> None:
        self.live.summary = {self.backbone: {self.phase: {"epoch": epoch, "loss": loss,
                                                          "top1": top1}}}

    def window(self, iteration: int, loss: float, top1: float, lr: float, progress: float,
               epoch_loss: float, epoch_top1: float) -> None:
        """The means of the last LOG_EVERY steps at their last iteration (the curves); the
        epoch so far (`progress` in epochs, its means) in metrics.json."""
        self._log(iteration, {"train/loss": loss, "train/top1": top1, "train/lr": lr})
        self._summary(progress, epoch_loss, epoch_top1)
        self.live.make_summary()

    def epoch(self, summary: dict) -> None:
        """An epoch's loss and top-1, at step = its number (1-based)."""
        self._log(summary["epoch"], {"epoch/loss": summary["loss"],
                                     "epoch/top1": summary["top1"]})
        self._summary(summary["epoch"], summary["loss"], summary["top1"])
        self.live.sync()

    def files(self) -> dict[str, str]:
        """Every file of the folder (relative path -> text), for the checkpoint."""
        files = {}
        for path in sorted(self.folder.rglob("*")):
            if path.is_file():
                with open(path, encoding="utf-8", newline="") as file:
                    files[path.relative_to(self.folder).as_posix()] = file.read()
        return files

    def end(self) -> None:
        self.live.end()


def live_params(plan: PhasePlan, env: Dist, precision: str) -> dict:
    """The phase's resolved settings for DVCLive's params.yaml (no absolute paths, so that a
    run under another root writes the same file)."""
    settings = dataclasses.asdict(plan.phase)
    settings["size"] = plan.size
    return {"backbone": plan.backbone, "phase": plan.name,
            "init": plan.init_dir.relative_to(plan.out_dir.parent).as_posix(),
            **settings, "steps_per_epoch": plan.steps_per_epoch, "images": plan.list_samples,
            "classes": plan.num_classes, "processes": env.world,
            "effective_batch": plan.phase.batch * env.world, "precision": precision}


# --------------------------------------------------------------------------- time estimate

# Steps left out of the time estimate: the first ones include one-time warm-up (allocator,
# kernel selection, the first DataLoader workers starting).
ETA_SKIP = 2
# Measured steps (after the skipped ones) before the first estimate is logged.
ETA_PROBE = 3
# On a CPU, a phase estimated to take longer than this is worth a warning.
CPU_WARN_SECONDS = 3600.0


@dataclasses.dataclass(frozen=True)
class Estimate:
    """How long a phase takes, from measured step times."""

    seconds_per_step: float
    total_seconds: float  # the whole phase, every epoch, as if it ran at this pace throughout
    remaining_seconds: float  # the steps not done yet


def estimate_phase(step_seconds: list[float], steps_done: int, steps_per_epoch: int,
                   epochs: int, skip: int = ETA_SKIP) -> Estimate:
    """The phase's duration from the durations of this run's steps, in order.

    The first `skip` steps are left out when later ones exist (warm-up); `steps_done` counts
    the phase's finished steps, those of epochs a resumed run skipped included.
    """
    if not step_seconds:
        raise ValueError("no measured step")
    steady = step_seconds[skip:] if len(step_seconds) > skip else step_seconds
    per_step = sum(steady) / len(steady)
    total_steps = steps_per_epoch * epochs
    return Estimate(per_step, per_step * total_steps,
                    per_step * max(0, total_steps - steps_done))


def format_duration(seconds: float) -> str:
    """45 s, 12 min, 4.1 h, 2.3 days."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    if seconds < 48 * 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def cpu_warning(plan: PhasePlan, estimate: Estimate, device: torch.device,
                precision: str) -> str | None:
    """The warning for a phase that takes hours on a CPU (None on a GPU or when it is short)."""
    if device.type != "cpu" or estimate.total_seconds <= CPU_WARN_SECONDS:
        return None
    return (f"{plan.backbone}/{plan.name} at size {plan.size} on a CPU ({precision}): about "
            f"{format_duration(estimate.total_seconds)} for the whole phase "
            f"({plan.phase.epochs} epoch{'s' if plan.phase.epochs > 1 else ''} × "
            f"{plan.steps_per_epoch} steps × "
            f"{estimate.seconds_per_step:.1f} s/step, batch {plan.phase.batch}). A GPU runs "
            f"such steps tens of times faster; on a CPU a smaller model.size or fewer "
            f"train.phases.{plan.name}.epochs shorten it (the time grows with size²).")


def log_estimate(plan: PhasePlan, estimate: Estimate) -> None:
    ends = time.strftime("%Y-%m-%d %H:%M", time.localtime(time.time()
                                                          + estimate.remaining_seconds))
    epochs = plan.phase.epochs
    log.info("%s/%s: about %s for the whole phase (%d epoch%s × %d steps × %.3g s/step); "
             "%s left, ends about %s", plan.backbone, plan.name,
             format_duration(estimate.total_seconds), epochs, "s" if epochs > 1 else "",
             plan.steps_per_epoch, estimate.seconds_per_step,
             format_duration(estimate.remaining_seconds), ends)


# Steps between reads of the running loss and accuracy for TensorBoard and the progress bar.
# Each read (`.item()`) makes the host wait until the GPU has run every queued kernel; reading
# every step would keep the GPU from running ahead of the input pipeline.
LOG_EVERY = 20


class RunningStats:
    """An epoch's loss sum and correct count, kept on the training device between reads.

    The loss sum is float64: each term, a float32 batch mean times the batch size (< 2^29), is
    exact in float64, and the terms are added one by one in step order, so the sum is bit for
    bit the one of a host loop over `loss.item() * len(labels)` in Python floats (IEEE float64
    addition on any device). The epoch's loss and top-1 in the run history thus do not depend
    on how often they are read.
    """

    def __init__(self, device: torch.device):
        self.loss = torch.zeros((), dtype=torch.float64, device=device)
        self.correct = torch.zeros((), dtype=torch.int64, device=device)
        self.seen = 0  # batch sizes are known on the host without asking the device
        self.logged: tuple[float, int, int] = (0.0, 0, 0)  # the sums at the last window

    def add(self, loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> None:
        """Count one step (queues device work only; never waits for it)."""
        self.loss += loss.detach().double() * labels.shape[0]
        self.correct += (logits.detach().argmax(1) == labels).sum()
        self.seen += labels.shape[0]

    def read(self) -> tuple[float, int, int]:
        """(loss sum, correct, seen) of the epoch so far; waits for the device."""
        return self.loss.item(), int(self.correct.item()), self.seen

    def window(self) -> tuple[float, float]:
        """Mean loss and top-1 over the steps since the previous window (reads the device).

        A difference of running sums: off by float64 rounding of the sums, for curves only.
        """
        now = self.read()
        loss, correct, seen = (a - b for a, b in zip(now, self.logged, strict=True))
        self.logged = now
        return loss / max(1, seen), correct / max(1, seen)


def log_steps(writer: SummaryWriter, bar, stats: RunningStats, optimizer: torch.optim.Optimizer,
              scaler, global_step: int, live: PhaseLive | None, progress: float) -> None:
    """One TensorBoard and DVCLive point per LOG_EVERY steps (their means, at the last one's
    step; `progress`: the phase's epochs done, a fraction) and the progress bar's figures: the
    only places the step loop reads from the device."""
    loss, top1 = stats.window()
    lr = optimizer.param_groups[0]["lr"]
    writer.add_scalar("train/loss", loss, global_step)
    writer.add_scalar("train/top1", top1, global_step)
    writer.add_scalar("train/lr", lr, global_step)
    if scaler is not None:
        writer.add_scalar("train/grad_scale", scaler.get_scale(), global_step)  # reads too
    loss_sum, correct, seen = stats.logged
    if live is not None:
        live.window(global_step, loss, top1, lr, progress, loss_sum / max(1, seen),
                    correct / max(1, seen))
    bar.set_postfix(loss=f"{loss:.3f}", acc=f"{correct / max(1, seen):.3f}")


def train_step(net: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, criterion,
               optimizer: torch.optim.Optimizer, scaler, autocast
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step on a uint8 batch (moved to the labels' device, normalized there,
    channels_last); returns (loss, logits), still on the device. `glr bench gpu` times it."""
    images = normalize(images.to(labels.device, non_blocking=True))
    images = images.contiguous(memory_format=torch.channels_last)
    with autocast:
        logits, _ = net(images, labels)
        loss = criterion(logits.float(), labels)
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        optimizer.step()
    return loss, logits


def phase_model(params: Params, plan: PhasePlan) -> torch.nn.Module:
    """The phase's network: built for its classes and loss, with the weights of the model it
    starts from (the classifier grown) and, with dynamic margins, its margins per class."""
    phase = plan.phase
    init_model, _ = load_model(plan.init_dir)
    model = build_model(plan.backbone, plan.num_classes, **_model_kwargs(params.model, phase))
    load_phase_weights(model, init_model.state_dict())
    if phase.arcface_dynamic is not None:  # the 1st place's margins per class
        model.head.set_margins(dynamic_margins(plan.label_images, *phase.arcface_dynamic))
    return model


def train_phase(params: Params, plan: PhasePlan, shard_dir: Path, live_dir: Path,
                env: Dist, stop_after_epochs: int | None = None) -> dict:
    """Train one phase; returns the final epoch's summary. Rank 0 writes all files: the model
    folder, TensorBoard under the run folder, DVCLive in `live_dir`."""
    phase = plan.phase
    torch.manual_seed(params.train.seed)
    model = phase_model(params, plan).to(env.device, memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(param_groups(model, phase.lr, phase.weight_decay),
                                lr=phase.lr, momentum=0.9)
    scheduler = make_scheduler(optimizer, phase.lr, phase.epochs, phase.warmup_epochs)
    autocast, scaler = precision_context(env.device, params.train.precision)
    if env.main:
        log.info("precision: %s", precision_name(env.device, params.train.precision))
    precision = precision_name(env.device, params.train.precision).split()[0]  # fp32, bf16...
    fingerprint = run_fingerprint(params, plan, shard_dir, env.world)
    checkpoint = plan.run_dir / "checkpoint.pt"
    resumed = try_resume(checkpoint, fingerprint, model, optimizer, scheduler, scaler)
    if env.world > 1:
        epochs: list[int] = [0] * env.world
        dist.all_gather_object(epochs, resumed.epoch)
        check_resumed_epochs(epochs, checkpoint)
    if resumed.epoch:
        log.info("resuming %s/%s from %s after epoch %d", plan.backbone, plan.name,
                 checkpoint, resumed.epoch)
    net = model
    if env.world > 1:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[env.local_rank] if env.device.type == "cuda" else None)
    stream = make_stream(params, plan, shard_dir)
    loader = phase_loader(stream, params, plan, env)
    writer = SummaryWriter(str(plan.run_dir / "tensorboard")) if env.main else None
    # DVC removed the stage's outputs before running it: PhaseLive rebuilds them
    live = (PhaseLive(live_dir, plan.backbone, plan.name, live_params(plan, env, precision),
                      resumed) if env.main else None)
    criterion = torch.nn.CrossEntropyLoss()
    summary: dict = dict(resumed.summary)
    step_seconds: list[float] = []  # this run's steps, for the time estimate (rank 0)
    warned = False
    for epoch in range(resumed.epoch, phase.epochs):
        stream.set_epoch(epoch)  # before the epoch's iterator starts the workers' streams
        net.train()
        stats = RunningStats(env.device)
        started = last = time.perf_counter()
        desc = f"{plan.backbone}/{plan.name} epoch {epoch + 1}/{phase.epochs}"
        bar = progress_bar(loader, total=plan.steps_per_epoch, disable=not env.main,
                           unit="step", desc=desc)
        step = 0
        for step, (images, labels) in enumerate(bar):
            # this iteration's LR, from (epoch, step) alone: a resumed run gets the same ones
            scheduler.step(epoch_time(epoch, step, plan.steps_per_epoch))
            labels = labels.to(env.device, non_blocking=True)
            loss, logits = train_step(net, images, labels, criterion, optimizer, scaler,
                                      autocast)
            stats.add(loss, logits, labels)  # no host read here: the GPU runs on ahead
            if writer is not None and (step + 1) % LOG_EVERY == 0:
                log_steps(writer, bar, stats, optimizer, scaler,
                          epoch * plan.steps_per_epoch + step, live,
                          round(epoch + (step + 1) / plan.steps_per_epoch, 4))
            if not env.main:
                continue
            probing = len(step_seconds) < ETA_SKIP + ETA_PROBE
            if probing and env.device.type == "cuda":
                torch.cuda.synchronize(env.device)  # a few waits, so the first steps time true
            now = time.perf_counter()
            step_seconds.append(now - last)
            last = now
            if probing and len(step_seconds) == ETA_SKIP + ETA_PROBE:
                warned = report_estimate(plan, step_seconds, epoch * plan.steps_per_epoch
                                         + step + 1, env.device, precision, warned)
        if writer is not None and stats.seen > stats.logged[2]:  # the epoch's last few steps
            log_steps(writer, bar, stats, optimizer, scaler, epoch * plan.steps_per_epoch + step,
                      live, round(epoch + (step + 1) / plan.steps_per_epoch, 4))
        loss_sum, correct, seen = stats.read()
        seconds = time.perf_counter() - started
        if step_seconds:  # the wait for the device at the epoch's end belongs to its last step
            step_seconds[-1] += time.perf_counter() - last
        images_per_s = seen * env.world / seconds
        # Only deterministic values go to files (DVCLive's, config.json): a rerun with the
        # same seed then reproduces every DVC output byte for byte. Times go to the log and
        # TensorBoard.
        summary = {"epoch": epoch + 1, "loss": loss_sum / max(1, seen),
                   "top1": correct / max(1, seen),
                   "lr": optimizer.param_groups[0]["lr"]}  # the epoch's last LR
        if env.main:
            assert writer is not None and live is not None
            writer.add_scalar("epoch/loss", summary["loss"], epoch + 1)
            writer.add_scalar("epoch/top1", summary["top1"], epoch + 1)
            writer.add_scalar("epoch/images_per_s", images_per_s, epoch + 1)
            live.epoch(summary)
            log.info("%s/%s epoch %d: loss %.4f, top-1 %.3f, %.1f images/s", plan.backbone,
                     plan.name, epoch + 1, summary["loss"], summary["top1"], images_per_s)
            if step_seconds:
                warned = report_estimate(plan, step_seconds, (epoch + 1) * plan.steps_per_epoch,
                                         env.device, precision, warned)
            if epoch + 1 in plan.snapshots:  # a later phase starts from this epoch's model
                save_model(model, plan.run_dir / f"epoch-{epoch + 1}",
                           model_config(plan, model, env, summary))
            final = epoch + 1 == phase.epochs
            if (epoch + 1) % (phase.checkpoint_every or 1) == 0 or final:
                save_checkpoint(checkpoint, model, optimizer, scheduler, scaler, epoch + 1,
                                fingerprint, summary, live.files())
        if stop_after_epochs is not None and epoch + 1 >= stop_after_epochs:
            raise KeyboardInterrupt(f"stopped after epoch {epoch + 1} (simulated)")
    if writer is not None:
        writer.close()
    if live is not None:
        live.end()
    if env.main:
        save_model(model, plan.out_dir, model_config(plan, model, env, summary))
        for epoch in plan.snapshots:  # kept in runs/ across restarts, copied into the output
            shutil.copytree(plan.run_dir / f"epoch-{epoch}", plan.out_dir / f"epoch-{epoch}",
                            dirs_exist_ok=True)
        log.info("%s/%s done -> %s%s", plan.backbone, plan.name, plan.out_dir,
                 f" (with the models of epochs {list(plan.snapshots)})" if plan.snapshots
                 else "")
    return summary


def phase_loader(stream: TrainStream, params: Params, plan: PhasePlan, env: Dist) -> DataLoader:
    """One DataLoader for the phase: its workers live across epochs and read each epoch's
    number from the stream (`set_epoch`) instead of being started again every epoch. The
    first process of each node logs the loader's footprint there (`loader_report`)."""
    workers = params.train.workers
    if env.local_rank == 0:
        line, warnings = loader_report(workers, local_processes(), available_cpus(),
                                       stream.reader_bytes(plan.size), host_memory_bytes(),
                                       params.train.shuffle_buffer)
        log.info("%s", line)
        for warning in warnings:
            log.warning("%s", warning)
    return DataLoader(stream, batch_size=None, num_workers=workers,
                      pin_memory=env.device.type == "cuda", persistent_workers=workers > 0)


def loader_report(workers: int, local: int, cpus: int, reader_bytes: int, host_bytes: int,
                  shuffle_buffer: int) -> tuple[str, list[str]]:
    """The training loader's footprint on this node in words, and warnings: more DataLoader
    workers than CPUs, buffers over half the host's memory. Workers are not capped to the
    CPUs: the worker count decides which shards each worker reads, so a cap would make the
    batches, and the trained weights, depend on the machine."""
    readers = local * max(1, workers)
    node = readers * reader_bytes
    gib = 2 ** 30
    line = (f"loader: {local} process(es) × {workers} DataLoader worker(s) on {cpus} CPU(s); "
            f"shuffle buffers and prefetched batches up to {node / gib:.2f} GiB of the host's "
            f"{host_bytes / gib:.0f} GiB ({reader_bytes / 2 ** 20:.0f} MiB per reader)")
    warnings = []
    if local * workers > cpus:
        warnings.append(
            f"train.workers {workers} × {local} process(es) = {local * workers} DataLoader "
            f"workers on {cpus} CPU(s): they compete for the CPUs, and {worker_fit(local, cpus)} "
            "per process would fit. Not capped here, since the worker count decides the "
            "batches: set train.workers")
    if node > host_bytes / 2:
        warnings.append(
            f"the loader may hold {node / gib:.1f} GiB on this node ({readers} readers × "
            f"{reader_bytes / 2 ** 20:.0f} MiB, mostly the shuffle buffers of "
            f"train.shuffle_buffer {shuffle_buffer} samples), over half of the host's "
            f"{host_bytes / gib:.0f} GiB: lower train.shuffle_buffer or train.workers")
    return line, warnings


def report_estimate(plan: PhasePlan, step_seconds: list[float], steps_done: int,
                    device: torch.device, precision: str, warned: bool) -> bool:
    """Log the phase's estimated duration and end; on a CPU, warn once when it takes hours.
    Returns whether the warning has been given."""
    estimate = estimate_phase(step_seconds, steps_done, plan.steps_per_epoch,
                              plan.phase.epochs)
    log_estimate(plan, estimate)
    warning = None if warned else cpu_warning(plan, estimate, device, precision)
    if warning:
        log.warning("%s", warning)
    return warned or warning is not None


def model_config(plan: PhasePlan, model: torch.nn.Module, env: Dist, summary: dict) -> dict:
    """config.json of a phase's model folder (or of an epoch snapshot: `final` says which)."""
    return {"model": model.config, "phase": plan.name,
            "settings": dataclasses.asdict(plan.phase), "size": plan.size,
            "init": str(plan.init_dir), "world_size": env.world,
            "effective_batch": plan.phase.batch * env.world, "final": summary}


def main(params: Params, backbone: str, phase_name: str, shard_dir: Path, models_dir: Path,
         runs_dir: Path, metrics_dir: Path, argv: list[str] | None = None) -> dict | None:
    pin_cpu_kernels(params.train.cpu_kernels, params.train.cpu_threads)
    if (params.train.processes > 1 and "LOCAL_RANK" not in os.environ
            and argv is not None):
        relaunch_under_torchrun(params.train.processes, argv)
    env = setup_distributed(params.train.timeout_minutes)
    if env.device.type == "cpu" and env.world > 1 and params.train.cpu_threads == 0:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // env.world))
    algorithms = pin_cuda_algorithms(params.train.deterministic, params.train.cudnn_benchmark)
    if env.main:
        log.info("cpu: %s", cpu_kernels_name(params.train.cpu_kernels))
        if env.device.type == "cuda":
            log.info("cuda: %s", algorithms)
    if backbone not in params.model.backbones:
        raise ParamsError(f"--backbone {backbone}: not in params model.backbones "
                          f"({', '.join(params.model.backbones)})")
    plan = plan_phase(params, backbone, phase_name, shard_dir, models_dir, runs_dir, env.world)
    if env.main:
        log.info("%s/%s: list %s (%d images, %d classes), %s sampler, size %d, %d epochs × "
                 "%d steps of %d × %d process(es), device %s", backbone, phase_name,
                 plan.phase.list, plan.list_samples, plan.num_classes, plan.phase.sampler,
                 plan.size, plan.phase.epochs, plan.steps_per_epoch, plan.phase.batch,
                 env.world, env.device)
    try:
        return train_phase(params, plan, shard_dir, Path(metrics_dir) / backbone / phase_name,
                           env)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
