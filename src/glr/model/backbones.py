"""timm backbones with IBN-a conversion, last stride 1 and local pretrained weights."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
from timm.layers import BlurPool2d
from timm.models import is_model_pretrained
from torch import nn

from glr.model.layers import IBN


@dataclass(frozen=True)
class BackboneSpec:
    """How to build one backbone: the timm architecture and whether to convert it to IBN-a."""

    timm_name: str
    ibn_a: bool = False
    # Release file of the IBN-Net ImageNet weights for this architecture, for `pretrained_path`.
    ibn_net_checkpoint: str | None = None


BACKBONES: dict[str, BackboneSpec] = {
    # Small models for the CPU demo and tests.
    "resnet10t": BackboneSpec("resnet10t"),
    "resnet18": BackboneSpec("resnet18"),
    "resnet34": BackboneSpec("resnet34"),
    "resnet18_ibn_a": BackboneSpec("resnet18", ibn_a=True,
                                   ibn_net_checkpoint="resnet18_ibn_a-2f571257.pth"),
    # Quick recipe.
    "resnet50": BackboneSpec("resnet50"),
    "resnet50_ibn_a": BackboneSpec("resnet50", ibn_a=True,
                                   ibn_net_checkpoint="resnet50_ibn_a-d9d0bb7b.pth"),
    # The solution's ensemble.
    "resnest101e": BackboneSpec("resnest101e"),
    "resnest269e": BackboneSpec("resnest269e"),
    "seresnet101_ibn_a": BackboneSpec("seresnet101", ibn_a=True,
                                      ibn_net_checkpoint="se_resnet101_ibn_a-fabed4e2.pth"),
    "resnext101_32x4d_ibn_a": BackboneSpec("resnext101_32x4d", ibn_a=True,
                                           ibn_net_checkpoint="resnext101_ibn_a-6ace051d.pth"),
}

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

    Every place that downsamples sits in the first block of `layer4`: the strided 3x3 conv
    (BasicBlock `conv1`, Bottleneck `conv2`), the strided 1x1 conv of the plain downsample path,
    the stride-2 average pools of ResNeSt (`avd_first` / `avd_last`) and of the 'd'-style
    downsample path (`downsample.0`), and the anti-aliasing pool `aa` of the -aa/-blur variants.
    Strided convs get stride 1 (their padding already keeps the size at stride 1); the pools
    become `nn.Identity`, which is what timm builds at stride 1. Any other module that still
    reports a stride above 1 raises TypeError rather than being silently kept.
    """
    first_block = model.layer4[0]
    if isinstance(getattr(first_block, "stride", None), int):
        first_block.stride = 1  # bookkeeping only; timm's blocks do not read it in forward
    for name, module in list(first_block.named_modules()):
        if not name:
            continue
        if isinstance(module, nn.Conv2d) and module.stride != (1, 1):
            module.stride = (1, 1)
        elif isinstance(module, DOWNSAMPLING_POOLS) and _pool_stride(module) != 1:
            _replace_submodule(first_block, name, nn.Identity())
        elif getattr(module, "stride", 1) not in (1, (1, 1)):
            raise TypeError(f"layer4.0.{name} ({type(module).__name__}) downsamples and is not "
                            "handled by set_last_stride_1")
    return model


def _pool_stride(pool: nn.Module) -> int:
    """The stride of a pooling layer as one int (the largest, if given per axis)."""
    stride = pool.stride
    return stride if isinstance(stride, int) else max(stride)


def _replace_submodule(root: nn.Module, dotted_name: str, replacement: nn.Module) -> None:
    """Set `root.<dotted_name>` to `replacement` (works inside nn.Sequential too)."""
    parent_name, _, child_name = dotted_name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child_name, replacement)


def create_backbone(name: str, pretrained: bool = False,
                    pretrained_path: str | Path | None = None) -> tuple[nn.Module, int]:
    """A timm feature extractor (no pooling, no classifier) and its number of output channels.

    IBN-a conversion (for the `*_ibn_a` names) and last stride 1 are applied. `pretrained=True`
    takes timm's ImageNet weights (for IBN names: those of the plain architecture, converted);
    `pretrained_path` instead loads a local file after conversion (see `load_backbone_weights`),
    e.g. the IBN-Net release checkpoints, and then timm's weights are not fetched.
    """
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; supported: {', '.join(sorted(BACKBONES))}")
    spec = BACKBONES[name]
    use_timm_weights = pretrained and pretrained_path is None
    if use_timm_weights and not is_model_pretrained(spec.timm_name):
        hint = f" (IBN-Net release: {spec.ibn_net_checkpoint})" if spec.ibn_net_checkpoint else ""
        raise ValueError(f"timm has no ImageNet weights for {spec.timm_name}; "
                         f"pass pretrained_path{hint}")
    model = timm.create_model(spec.timm_name, pretrained=use_timm_weights,
                              num_classes=0, global_pool="")
    if spec.ibn_a:
        convert_ibn_a(model)
    set_last_stride_1(model)
    if pretrained_path is not None:
        load_backbone_weights(model, pretrained_path)
    return model, model.num_features


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


def load_backbone_weights(model: nn.Module, path: str | Path) -> None:
    """Load a local weights file into a backbone, strictly; `fc.*` classifier keys are dropped.

    Accepts a plain state dict or one under "state_dict"/"model", with or without a "module."
    prefix, in timm or IBN-Net naming (see `map_ibn_net_keys`). Raises ValueError listing the
    missing and unexpected keys (and shape mismatches) if the file does not fit the backbone.
    Missing `num_batches_tracked` counters are tolerated: older checkpoints predate them.
    """
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    state_dict = unwrap_state_dict(checkpoint)
    state_dict = {key: value for key, value in state_dict.items() if not key.startswith("fc.")}
    state_dict = map_ibn_net_keys(state_dict)

    expected = model.state_dict()
    missing = [key for key in expected
               if key not in state_dict and not key.endswith("num_batches_tracked")]
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
