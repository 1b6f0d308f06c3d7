"""timm backbones: any timm model, plus IBN-a conversion, last stride 1 and local weights.

A backbone name is either a name of glr's table (`glr.model.table.BACKBONES`: the authors' IBN-a
variants, which timm lacks, and the recipes' backbones) or any timm model name (`timm.list_models`,
a pretrained tag such as `convnext_tiny.fb_in22k` allowed). Two paths build them:

- the ResNet path, for the table and every timm model of a ResNet family (`RESNET_FAMILIES`):
  timm's model with IBN-a conversion (the `*_ibn_a` names) and last stride 1, as the authors
  built their backbones; the code needs timm's ResNet layout, stages `layer1`..`layer4` of blocks
  whose first norm is `bn1`;
- the generic path, for every other timm model (ConvNeXt, EfficientNet, RegNet, ViT, Swin, ...):
  the model as timm builds it (`create_timm_generic`), at timm's own output stride (usually 32);
  `glr.model.layers.FeatureMap` turns its output (NCHW, NHWC or tokens) into a map for GeM.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import re
import urllib.error
from collections.abc import Mapping
from pathlib import Path

import timm
import torch
from timm.layers import BlurPool2d
from timm.models.resnest import ResNestBottleneck
from torch import nn

from glr.errors import PretrainedWeightsError, UnknownBackboneError
from glr.model.layers import IBN
from glr.model.table import (  # the name checks live beside the table, for glr.params
    BACKBONES,
    BackboneSpec,
    backbone_problem,
    has_timm_weights,
    timm_family,
)

log = logging.getLogger(__name__)

# timm modules whose models have the ResNet layout (stem, layer1..layer4 of blocks with `bn1`)
# that IBN-a conversion and last stride 1 work on: they take the ResNet path. Every other timm
# model (res2net, whose stride-1 blocks keep a 3x3 average pool, resnetv2, regnet, convnext,
# vision_transformer, ...) takes the generic path, unchanged.
RESNET_FAMILIES = ("timm.models.resnet", "timm.models.resnest")


def backbone_spec(name: str) -> BackboneSpec:
    """How to build backbone `name`: its table entry, or the timm model as is.

    Raises UnknownBackboneError (a ParamsError, so a ValueError) naming `model.backbones`, the
    name and close matches when `name` is neither (see `backbone_problem`).
    """
    problem = backbone_problem(name)
    if problem is not None:
        raise UnknownBackboneError(f"model.backbones: {problem}")
    return BACKBONES.get(name) or BackboneSpec(name)


def takes_resnet_path(spec: BackboneSpec) -> bool:
    """Whether `spec` is built the ResNet way (IBN-a if asked, last stride 1): the IBN-a entries
    and every timm model of `RESNET_FAMILIES`; the others take the generic path."""
    return spec.ibn_a or timm_family(spec.timm_name) in RESNET_FAMILIES


IBN_STAGES = ("layer1", "layer2", "layer3")
# Pooling layers that downsample inside a residual block; at stride 1 timm builds nn.Identity.
DOWNSAMPLING_POOLS = (nn.AvgPool2d, nn.MaxPool2d, BlurPool2d)


def convert_ibn_a(model: nn.Module) -> nn.Module:
    """Turn a timm ResNet-family model into IBN-a, in place: `bn1` of every block in stages 1-3.

    Works for timm's `BasicBlock`, `Bottleneck` and `ResNestBottleneck`, which all name the
    normalization after their first convolution `bn1`; stage 4 and every other norm stay
    BatchNorm2d. The new IBN starts from the replaced BatchNorm's values (affine parameters of
    the first half go to IN, everything of the second half to BN), so a converted ImageNet model
    keeps what it can of its weights; the parameter count does not change.
    """
    for stage_name in IBN_STAGES:
        for block in getattr(model, stage_name):
            batch_norm = block.bn1
            if not isinstance(batch_norm, nn.BatchNorm2d):
                raise TypeError(f"{stage_name} block has bn1 of type {type(batch_norm).__name__}, "
                                "expected BatchNorm2d")
            block.bn1 = _ibn_from_batch_norm(batch_norm)
    return model


def _ibn_from_batch_norm(batch_norm: nn.BatchNorm2d) -> IBN:
    """An IBN layer for `batch_norm`'s channels, initialized from its parameters and statistics."""
    ibn = IBN(batch_norm.num_features).to(batch_norm.weight.device, batch_norm.weight.dtype)
    half = ibn.half
    with torch.no_grad():
        ibn.IN.weight.copy_(batch_norm.weight[:half])
        ibn.IN.bias.copy_(batch_norm.bias[:half])
        ibn.BN.weight.copy_(batch_norm.weight[half:])
        ibn.BN.bias.copy_(batch_norm.bias[half:])
        ibn.BN.running_mean.copy_(batch_norm.running_mean[half:])
        ibn.BN.running_var.copy_(batch_norm.running_var[half:])
        ibn.BN.num_batches_tracked.copy_(batch_norm.num_batches_tracked)
    ibn.train(batch_norm.training)
    return ibn


def set_last_stride_1(model: nn.Module) -> nn.Module:
    """Keep stage 4 (`layer4`) at stride 1, in place: the feature map becomes input / 16.

    ResNeSt models (stage 4 of timm's `ResNestBottleneck`) go to `set_last_stride_1_resnest`,
    which follows the authors' ResNeSt (stride 1 kept by dilation). Every other ResNet-family
    model goes to `set_last_stride_1_plain` (stride 1, no dilation), as in the authors' other
    backbones: `_make_layer(block, 512, layers[3], stride=1)` in `model/backbones/
    se_resnet_ibn_a.py` and `resnext_ibn.py`, `stride=last_stride` in `resnet.py` (the last two
    read in their `submission/input/util-code/backbones/` copies), none with a dilation.
    """
    if all(isinstance(block, ResNestBottleneck) for block in model.layer4):
        return set_last_stride_1_resnest(model)
    return set_last_stride_1_plain(model)


def set_last_stride_1_plain(model: nn.Module) -> nn.Module:
    """Stride 1 in stage 4 without dilation, in place: the feature map becomes input / 16.

    Every place that downsamples sits in the first block of `layer4`: the strided 3x3 conv
    (BasicBlock `conv1`, Bottleneck `conv2`), the strided 1x1 conv of the plain downsample path,
    the stride-2 average pool of the 'd'-style downsample path (`downsample.0`), and the
    anti-aliasing pool `aa` of the -aa/-blur variants. Strided convs get stride 1 (their padding
    already keeps the size at stride 1); the pools become `nn.Identity`, which is what timm
    builds at stride 1. Every convolution keeps dilation 1. Any other module that still reports
    a stride above 1 raises TypeError rather than being silently kept.
    """
    _unstride_first_block(model.layer4[0])
    return model


def set_last_stride_1_resnest(model: nn.Module) -> nn.Module:
    """Stride 1 in stage 4 of a timm ResNeSt (`resnest14d` .. `resnest269e`), as the authors
    built it, in place: the feature map becomes input / 16.

    The authors' ResNeSt (`backbones/resnest.py` of their repository, read in its
    `submission/input/util-code/` copy; its `ResNet` and `Bottleneck` are those of
    zhanghang1989/ResNeSt `resnest/torch/resnet.py`) sets `dilation = 2` when `last_stride == 1`
    and builds stage 4 as `_make_layer(block, 512, layers[3], stride=1, dilation=2)`. There:

    - block 1 gets `dilation=1` and `is_first=True`, so its split-attention 3x3 conv keeps
      dilation 1 and padding 1, and its `avd` pool (`avd and (stride > 1 or is_first)`) is
      kept as `AvgPool2d(3, stride=1, padding=1)`: at stride 1 it still averages 3x3
      neighbourhoods, which the ImageNet weights were trained behind;
    - blocks 2..n get `dilation=2`: their 3x3 conv has dilation 2 and padding 2;
    - block 1's downsample path (`avg_down`, dilation 2) is `AvgPool2d(kernel_size=1,
      stride=1, ceil_mode=True, count_include_pad=False)` (the identity; `nn.Identity` here),
      then the 1x1 conv and BN.

    timm's blocks are the official ones ported (same names and weights): here the avd pool of
    block 1 (`avd_first` or `avd_last`) gets stride 1, the downsample pool becomes
    `nn.Identity`, any strided conv of block 1 gets stride 1 (with avd it has none), and every
    3x3 conv of blocks 2..n gets dilation 2 and padding 2. (timm's own `output_stride=16`
    differs: it drops block 1's avd pool and puts a 2x2 `AvgPool2dSame` in the downsample path.)
    """
    first_block, *other_blocks = model.layer4
    for name in ("avd_first", "avd_last"):
        pool = getattr(first_block, name, None)
        if isinstance(pool, nn.AvgPool2d) and _largest_stride(pool) != 1:
            setattr(first_block, name, nn.AvgPool2d(
                pool.kernel_size, stride=1, padding=pool.padding, ceil_mode=pool.ceil_mode,
                count_include_pad=pool.count_include_pad, divisor_override=pool.divisor_override))
    _unstride_first_block(first_block)
    for block in other_blocks:
        for module in block.modules():
            if isinstance(module, nn.Conv2d) and module.kernel_size != (1, 1):
                module.dilation = (2, 2)
                # Dilation 2 keeps the size with padding 2 * (k - 1) / 2: 2 for the 3x3 convs.
                module.padding = tuple(size - 1 for size in module.kernel_size)
    return model


def _unstride_first_block(first_block: nn.Module) -> None:
    """Take every stride out of `first_block`: strided convs get stride 1, strided pools of
    `DOWNSAMPLING_POOLS` become nn.Identity; anything else that downsamples raises TypeError."""
    if isinstance(getattr(first_block, "stride", None), int):
        first_block.stride = 1  # bookkeeping only; timm's blocks do not read it in forward
    for name, module in list(first_block.named_modules()):
        if not name:
            continue
        if isinstance(module, nn.Conv2d) and module.stride != (1, 1):
            module.stride = (1, 1)
        elif isinstance(module, DOWNSAMPLING_POOLS) and _largest_stride(module) != 1:
            _replace_submodule(first_block, name, nn.Identity())
        elif _largest_stride(module) > 1:
            raise TypeError(f"layer4.0.{name} ({type(module).__name__}) downsamples and is not "
                            "handled by set_last_stride_1")


def _largest_stride(module: nn.Module) -> int:
    """A module's stride as one int (the largest, if given per axis; 1 if it has none).

    Per axis covers 1-D layers too: the ECA attention's Conv1d reports stride (1,).
    """
    stride = getattr(module, "stride", None)
    if stride is None:
        return 1
    return stride if isinstance(stride, int) else max(stride)


def _replace_submodule(root: nn.Module, dotted_name: str, replacement: nn.Module) -> None:
    """Set `root.<dotted_name>` to `replacement` (works inside nn.Sequential too)."""
    parent_name, _, child_name = dotted_name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child_name, replacement)


def create_backbone(name: str, pretrained: bool = False,
                    pretrained_path: str | Path | None = None, *,
                    skip_fc_keys: bool = False) -> tuple[nn.Module, int]:
    """A timm feature extractor (no pooling, no classifier) and its number of output channels.

    `name` is a name of glr's table or any timm model (see `backbone_spec`; an unknown name
    raises UnknownBackboneError). The ResNet path (`takes_resnet_path`) applies IBN-a conversion
    (for the `*_ibn_a` names) and last stride 1; the generic path builds the model as timm does
    (`create_timm_generic`), and the channels are `backbone_channels`. `pretrained=True` takes
    timm's ImageNet weights (for IBN names: those of the plain architecture, converted);
    `pretrained_path` instead loads a local file after conversion (see `load_backbone_weights`,
    which `skip_fc_keys` is passed to), e.g. the IBN-Net release checkpoints, and then timm's
    weights are not fetched. Weights that cannot be fetched raise PretrainedWeightsError at once
    (see `check_timm_weights`). `skip_fc_keys` concerns a weights file only: with timm's
    weights it raises ValueError (timm loads every key), without any weights it changes nothing.
    """
    spec = backbone_spec(name)
    resnet_path = takes_resnet_path(spec)
    if skip_fc_keys and pretrained and pretrained_path is None:
        raise ValueError(f"skip_fc_keys applies to a weights file (pretrained_path), not to "
                         f"timm's ImageNet weights for {name}")
    if pretrained and pretrained_path is None:
        model = create_timm_pretrained(name, spec.timm_name, generic=not resnet_path)
    elif resnet_path:
        model = timm.create_model(spec.timm_name, pretrained=False, num_classes=0,
                                  global_pool="")
    else:
        model = create_timm_generic(spec.timm_name, pretrained=False)
    if resnet_path:
        if spec.ibn_a:
            convert_ibn_a(model)
        set_last_stride_1(model)
    if pretrained_path is not None:
        load_backbone_weights(model, pretrained_path, skip_fc_keys=skip_fc_keys)
    return model, (model.num_features if resnet_path else backbone_channels(model))


# --------------------------------------------------------------------------- generic path


def create_timm_generic(timm_name: str, pretrained: bool = False) -> nn.Module:
    """Any timm model as a feature extractor: `num_classes=0, global_pool=""`, as timm builds it.

    Calling it gives what timm's `forward` gives without pooling and classifier: the feature
    map (NCHW, or NHWC where the model's `output_fmt` says so) or the tokens (B, N, C) of a
    ViT-like model, after whatever of the head works on it (ConvNeXt's final norm, MobileNetV3's
    1x1 head conv), so every parameter takes part (DDP needs that). Two of timm's options are
    tried in turn, each dropped when the model refuses it: `dynamic_img_size=True` (models
    that take it, ViT-likes, then accept any input size, their position embeddings resampled;
    the others raise TypeError naming it), then `global_pool=""` (the few models that cannot
    disable their pooling, e.g. distilled DeiT, CoaT, CrossViT, EfficientViT-MIT, assert it
    when they are built; they keep their own pooling and give (B, C)). Any other error, a
    network error of `pretrained=True` included, raises at once.
    """
    attempts = [{"global_pool": "", "dynamic_img_size": True}, {"global_pool": ""},
                {"dynamic_img_size": True}, {}]
    for options in attempts[:-1]:
        try:
            return timm.create_model(timm_name, pretrained=pretrained, num_classes=0, **options)
        except TypeError as err:
            if "dynamic_img_size" not in str(err):
                raise
        except AssertionError as err:
            if "global_pool" not in options:
                raise
            log.debug("%s refuses global_pool='' (%s); trying its own pooling", timm_name, err)
    return timm.create_model(timm_name, pretrained=pretrained, num_classes=0, **attempts[-1])


def backbone_channels(model: nn.Module) -> int:
    """The channels of a timm feature extractor's output: timm's `head_hidden_size` where the
    model has one (a head layer that `forward` runs without the classifier widens the features,
    e.g. MobileNetV3's 1x1 conv, 576 -> 1024), else its `num_features`."""
    return int(getattr(model, "head_hidden_size", None) or model.num_features)


def feature_layout(model: nn.Module) -> tuple[str, int]:
    """How to read a timm backbone's output: its 4-D layout ("NCHW", or "NHWC" where the model's
    `output_fmt` says so, e.g. Swin) and the number of prefix tokens (class, distillation and
    register tokens: timm's `num_prefix_tokens`, 0 without) in front of the patch tokens of a
    3-D (B, N, C) output. See `glr.model.layers.FeatureMap`."""
    output_fmt = str(getattr(model, "output_fmt", "NCHW"))
    prefix = getattr(model, "num_prefix_tokens", 0)
    return ("NHWC" if output_fmt == "NHWC" else "NCHW"), (prefix if isinstance(prefix, int) else 0)


# --------------------------------------------------------------------------- timm's weights


def create_timm_pretrained(backbone: str, timm_name: str, *, generic: bool = False
                           ) -> nn.Module:
    """timm's model `timm_name` with its ImageNet weights, for glr backbone `backbone`
    (`generic`: built by `create_timm_generic`, else as the ResNet path builds it).

    Fails in seconds, with one line naming the ways to supply the weights, when they are not in
    the Hugging Face cache and cannot be fetched: without a network, the hub would otherwise
    retry each file five times (about a minute) before timm's 50-line traceback.
    """
    if not has_timm_weights(timm_name):
        release = BACKBONES[backbone].ibn_net_checkpoint if backbone in BACKBONES else None
        hint = f" (IBN-Net release: {release})" if release else ""
        raise PretrainedWeightsError(
            f"timm has no ImageNet weights for {timm_name} (backbone {backbone}); give a weights "
            f"file instead: {backbone}.pth in params model.weights_dir{hint}")
    log_hub_through_root()
    source = check_timm_weights(backbone, timm_name)
    try:
        if generic:
            return create_timm_generic(timm_name, pretrained=True)
        return timm.create_model(timm_name, pretrained=True, num_classes=0, global_pool="")
    except _network_errors() as err:
        raise _weights_error(backbone, timm_name, source, _one_line(err)) from err


def check_timm_weights(backbone: str, timm_name: str) -> str:
    """Check, before timm loads them, that timm's weights for `timm_name` are in the Hugging Face
    cache or that the hub can be reached; returns where they come from (for messages).

    Reaching the hub is tried with one HEAD request without retries: the hub's own retries are
    meant for a flaky connection and, without any, cost about a minute per file. When that
    request cannot connect, or when HF_HUB_OFFLINE is set and the cache lacks the file,
    PretrainedWeightsError is raised at once. Weights timm takes from a plain URL are not
    checked here (torch.hub fails at once without a network; `create_timm_pretrained` reports it).
    """
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url, try_to_load_from_cache
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError

    cfg = timm.models.get_pretrained_cfg(timm_name)
    if cfg is None or not cfg.hf_hub_id:
        return str(getattr(cfg, "url", None) or "timm's source")
    repo_id, _, revision = cfg.hf_hub_id.partition("@")
    source = f"the Hugging Face hub ({cfg.hf_hub_id})"
    # The files timm looks for: its safetensors alternative first, then the named file.
    named = cfg.hf_hub_filename or "pytorch_model.bin"
    safe = ("model.safetensors" if named == "pytorch_model.bin"
            else re.sub(r"\.(bin|pth)$", ".safetensors", named))
    files = list(dict.fromkeys([safe, named]))
    if any(isinstance(try_to_load_from_cache(repo_id, file, revision=revision or None), str)
           for file in files):
        return source
    if constants.is_offline_mode():
        raise _weights_error(backbone, timm_name, source,
                             "HF_HUB_OFFLINE is set and they are not in the Hugging Face cache "
                             f"{constants.HF_HUB_CACHE}")
    try:
        get_hf_file_metadata(hf_hub_url(repo_id, files[0], revision=revision or None),
                             timeout=constants.HF_HUB_ETAG_TIMEOUT)
    except (HfHubHTTPError, EntryNotFoundError):
        pass  # the hub answered: timm's own download reports anything else
    except _network_errors() as err:
        raise _weights_error(backbone, timm_name, source, _one_line(err)) from err
    return source


def _network_errors() -> tuple[type[BaseException], ...]:
    """The errors of a failed connection: the hub's (its HTTP client's, and the one it raises
    when it gives up), torch.hub's and the socket's."""
    from huggingface_hub.errors import LocalEntryNotFoundError

    errors: list[type[BaseException]] = [LocalEntryNotFoundError, ConnectionError,
                                         urllib.error.URLError, TimeoutError]
    for client in ("httpx2", "httpx"):  # the hub's HTTP client, by hub version
        with contextlib.suppress(ImportError, AttributeError):
            errors.append(importlib.import_module(client).TransportError)
    return tuple(errors)


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text[:200]}"


def _weights_error(backbone: str, timm_name: str, source: str, reason: str
                   ) -> PretrainedWeightsError:
    from huggingface_hub import constants

    what = backbone if timm_name == backbone else f"{backbone} (timm's {timm_name})"
    return PretrainedWeightsError(
        f"model.pretrained: timm's ImageNet weights for {what} could not be fetched from "
        f"{source} ({reason}); supply them without a network: {backbone}.pth in the folder named "
        f"by params model.weights_dir, or a Hugging Face cache ({constants.HF_HUB_CACHE}) "
        "filled beforehand, used with HF_HUB_OFFLINE=1")


def log_hub_through_root() -> None:
    """Let huggingface_hub's log records reach the application's handlers once.

    On import, huggingface_hub puts a StreamHandler of its own on its logger and leaves the
    logger propagating to the root logger, so once the root is configured (`glr`'s
    logging.basicConfig) every hub warning is printed twice: bare by the hub's handler, then
    formatted by the root's. Removing the hub's own handler leaves one line per record, in the
    application's format (and Python's last-resort handler still prints warnings when nothing
    is configured).
    """
    hub_logger = logging.getLogger("huggingface_hub")
    for handler in list(hub_logger.handlers):
        if type(handler) is logging.StreamHandler:
            hub_logger.removeHandler(handler)


def map_ibn_net_keys(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename the keys of an IBN-Net release checkpoint to timm's names; others pass unchanged.

    The IBN-Net checkpoints (`resnet50_ibn_a-d9d0bb7b.pth`, `resnext101_ibn_a-6ace051d.pth`,
    `se_resnet101_ibn_a-fabed4e2.pth`, ...) use torchvision names: `conv1.weight`, `bn1.*`,
    `layerX.Y.convK.weight`, `layerX.Y.bnK.*`, `layerX.Y.downsample.{0,1}.*` and `fc.*`, with
    the IBN halves at `layerX.Y.bn1.IN.{weight,bias}` and `layerX.Y.bn1.BN.*`. All of these are
    timm's names too (our IBN calls its halves `IN` and `BN` for this reason); `fc.*` is dropped
    by the loader.

    Only the SE block of se_resnet101_ibn_a differs. IBN-Net's `SELayer` is
    `fc = Sequential(Linear(C, C/16, bias=False), ReLU, Linear(C/16, C, bias=False), Sigmoid)`,
    stored as `layerX.Y.se.fc.0.weight` (C/16, C) and `layerX.Y.se.fc.2.weight` (C, C/16);
    timm's `SEModule` uses 1x1 convs with bias, `layerX.Y.se.fc1.{weight,bias}` (C/16, C, 1, 1)
    and `layerX.Y.se.fc2.{weight,bias}`. The weights are renamed and reshaped, and the missing
    biases are filled with zeros, which computes exactly IBN-Net's bias-free SE (same reduction:
    C/16 for every stage). This mapping is read from IBN-Net's source (`ibnnet/modules.py`);
    it has not been run against the downloaded files, so anything else that differs shows up
    as missing/unexpected keys in `load_backbone_weights`' error.
    """
    mapped: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        match = re.fullmatch(r"((?:.*\.)?se)\.fc\.([02])\.weight", key)
        if match is None:
            mapped[key] = value
            continue
        prefix, layer_index = match.groups()
        conv_name = f"{prefix}.fc1" if layer_index == "0" else f"{prefix}.fc2"
        # Linear (out, in) -> 1x1 conv (out, in, 1, 1).
        mapped[f"{conv_name}.weight"] = value.reshape(*value.shape[:2], 1, 1)
        bias_key = f"{conv_name}.bias"
        if bias_key not in state_dict:
            mapped[bias_key] = torch.zeros(value.shape[0], dtype=value.dtype)
    return mapped


def unwrap_state_dict(checkpoint: Mapping) -> dict[str, torch.Tensor]:
    """The state dict in a checkpoint (plain or under "state_dict"/"model"), "module." stripped."""
    for wrapper_key in ("state_dict", "model"):
        if isinstance(checkpoint.get(wrapper_key), Mapping):
            checkpoint = checkpoint[wrapper_key]
            break
    # DataParallel / DDP checkpoints prefix every key with "module.".
    return {key.removeprefix("module."): value for key, value in checkpoint.items()}


def load_backbone_weights(model: nn.Module, path: str | Path, *,
                          skip_fc_keys: bool = False) -> None:
    """Load a local weights file into a backbone, strictly; classifier keys are dropped.

    Accepts a plain state dict or one under "state_dict"/"model", with or without a "module."
    prefix, in timm or IBN-Net naming (see `map_ibn_net_keys`): for a generic timm model, the
    `state_dict()` of timm's model of that name (e.g. `timm.create_model(name,
    pretrained=True).state_dict()` saved with torch.save), whose classifier keys (`fc.*` and
    those under timm's `pretrained_cfg["classifier"]`, `head.fc.*` for ConvNeXt, `head.*` for
    ViT, see `classifier_prefixes`) the backbone lacks and are dropped. Raises ValueError
    listing the missing and unexpected keys (and shape mismatches) if the file does not fit the
    backbone.
    Missing `num_batches_tracked` counters are tolerated: older checkpoints predate them.

    `skip_fc_keys=True` loads the way the authors load SE-ResNet101-IBN-a: their
    `ResNet.load_param` (`model/backbones/se_resnet_ibn_a.py`) skips every checkpoint key that
    contains "fc" (`if 'fc' in i: continue`), which drops the classifier and also every SE layer
    (`layerX.Y.se.fc.0/2.weight`), so their SE weights start from the model's own random
    initialization. Here every file key containing "fc" is dropped (after the "module." prefix is
    removed), the model's own parameters and buffers whose names contain "fc" keep their current
    values (timm's initialization for a fresh model; timm names the SE convs `se.fc1/fc2`), and
    their absence from the file is not an error; every other key is loaded strictly as above.
    timm's init (Kaiming-normal fan-out 1x1 convs, PyTorch's default biases) need not be the
    authors' (their `SELayer` comes from `model/backbones/se_module.py`, and their init loop
    covers only Conv2d and norm layers; IBN-Net's `SELayer` is made of `nn.Linear` layers): the
    SE layers start random in both, possibly from different distributions.
    Note that timm's ResNeSt names its split-attention convs `conv2.fc1/fc2` too: the authors'
    ResNeSt loader (`ResNet.load_param` in `backbones/resnest.py`) does not skip them, so
    neither should a ResNeSt file be loaded with `skip_fc_keys` (nor a ViT-like file: its MLPs
    are `mlp.fc1/fc2`). Without it (the default), the classifier keys alone are dropped and the
    IBN-Net SE keys are mapped onto timm's SE (ImageNet SE weights).
    """
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    state_dict = unwrap_state_dict(checkpoint)
    expected = model.state_dict()
    if skip_fc_keys:
        skipped = [key for key in state_dict if "fc" in key]
        state_dict = {key: value for key, value in state_dict.items() if "fc" not in key}
        log.info("%s: skipped %d keys containing 'fc' (skip_fc_keys); those parameters keep the "
                 "model's own initialization", path, len(skipped))
    else:
        classifier = classifier_prefixes(model)
        state_dict = {key: value for key, value in state_dict.items()
                      if not (key.startswith(classifier) and key not in expected)}
        state_dict = map_ibn_net_keys(state_dict)

    missing = [key for key in expected
               if key not in state_dict and not key.endswith("num_batches_tracked")
               and not (skip_fc_keys and "fc" in key)]
    unexpected = [key for key in state_dict if key not in expected]
    mismatched = [f"{key}: file {tuple(state_dict[key].shape)} vs model {tuple(value.shape)}"
                  for key, value in expected.items()
                  if key in state_dict and state_dict[key].shape != value.shape]
    if missing or unexpected or mismatched:
        raise ValueError(f"weights in {path} do not fit the backbone:\n"
                         f"  missing keys: {missing}\n"
                         f"  unexpected keys: {unexpected}\n"
                         f"  shape mismatches: {mismatched}")
    model.load_state_dict(state_dict, strict=False)


def classifier_prefixes(model: nn.Module) -> tuple[str, ...]:
    """Key prefixes of a timm model's ImageNet classifier, which a backbone built with
    `num_classes=0` lacks: "fc." (timm's and torchvision's ResNets) and "<name>." for each name
    in timm's `pretrained_cfg["classifier"]` of the model ("head.fc" for ConvNeXt, "classifier"
    for EfficientNet, "head" and "head_dist" for distilled DeiT)."""
    names = {"fc"}
    classifier = (getattr(model, "pretrained_cfg", None) or {}).get("classifier")
    if isinstance(classifier, str):
        names.add(classifier)
    elif classifier:
        names.update(classifier)
    return tuple(f"{name}." for name in sorted(names))
