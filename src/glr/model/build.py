"""The retrieval network (backbone -> GeM -> Linear -> BN -> ArcFace) and its training helpers."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from glr.model.backbones import create_backbone, feature_layout, unwrap_state_dict
from glr.model.layers import ArcFace, FeatureMap, GeM

CONFIG_KEYS = ("backbone", "num_classes", "embedding_dim", "gem_p", "arcface_s", "arcface_m",
               "arcface_subcenters")


class RetrievalNet(nn.Module):
    """Backbone -> GeM -> Linear (no bias) -> BatchNorm1d (bias frozen at 0) -> ArcFace.

    The backbone is any timm model or a name of glr's table (`glr.model.backbones`); `to_map`
    (`FeatureMap`, no parameters) reads its output as the map GeM pools: NCHW as is, NHWC
    permuted, a ViT-like model's tokens as a map of its patch tokens (GeM over the patch tokens,
    class and register tokens dropped). The state dict holds the backbone's timm keys under
    `backbone.`, then `neck`, `bn` and `head`, for every backbone.
    `pretrained`, `pretrained_path` and `skip_fc_keys` choose the backbone's starting weights
    only (see `glr.model.backbones.create_backbone`), so they are not part of `config`, which
    describes the architecture.
    """

    def __init__(self, backbone: str, num_classes: int, *, embedding_dim: int = 512,
                 gem_p: float = 3.0, arcface_s: float = 30.0, arcface_m: float = 0.3,
                 arcface_subcenters: int = 1, pretrained: bool = False,
                 pretrained_path: str | Path | None = None, skip_fc_keys: bool = False) -> None:
        super().__init__()
        self.backbone, num_features = create_backbone(backbone, pretrained, pretrained_path,
                                                      skip_fc_keys=skip_fc_keys)
        self.to_map = FeatureMap(num_features, *feature_layout(self.backbone))
        self.pool = GeM(p=gem_p)
        self.neck = nn.Linear(num_features, embedding_dim, bias=False)
        nn.init.xavier_uniform_(self.neck.weight)
        self.bn = nn.BatchNorm1d(embedding_dim)
        # A BNNeck without shift: the bias stays 0 and is never trained.
        nn.init.zeros_(self.bn.bias)
        self.bn.bias.requires_grad_(False)
        self.head = ArcFace(embedding_dim, num_classes, s=arcface_s, m=arcface_m,
                            subcenters=arcface_subcenters)
        # Everything needed to rebuild this architecture (weights aside), JSON-serializable.
        self.config: dict[str, Any] = {
            "backbone": backbone,
            "num_classes": int(num_classes),
            "embedding_dim": int(embedding_dim),
            "gem_p": float(gem_p),
            "arcface_s": float(arcface_s),
            "arcface_m": float(arcface_m),
            "arcface_subcenters": int(arcface_subcenters),
        }

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """The BN embedding (B, D) of normalized images (B, 3, H, W), not L2-normalized."""
        return self.bn(self.neck(self.pooled(images)))

    def pooled(self, images: torch.Tensor) -> torch.Tensor:
        """The backbone's features pooled to (B, C): GeM over its map (or patch tokens), or the
        backbone's own pooling for the few timm models that cannot disable it."""
        x = self.to_map(self.backbone(images))
        return x if x.ndim == 2 else self.pool(x)

    def forward(self, images: torch.Tensor, labels: torch.Tensor | None = None
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        features = self.features(images)
        if labels is None:
            return features
        # The classifier runs inside forward so DDP sees all parameters take part.
        return self.head(features, labels), features

    @torch.no_grad()
    def extract(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalized retrieval descriptors (B, D); call in eval mode."""
        return F.normalize(self.features(images).float(), dim=1)


def build_model(backbone: str, num_classes: int, *, embedding_dim: int = 512, gem_p: float = 3.0,
                arcface_s: float = 30.0, arcface_m: float = 0.3, arcface_subcenters: int = 1,
                pretrained: bool = False, pretrained_path: str | Path | None = None,
                skip_fc_keys: bool = False) -> RetrievalNet:
    """A RetrievalNet; `pretrained`/`pretrained_path` choose the backbone's initial weights and
    `skip_fc_keys` drops every key containing "fc" from a weights file, as the authors'
    SE-ResNet101-IBN-a loader does (see `glr.model.backbones.load_backbone_weights`)."""
    return RetrievalNet(backbone, num_classes, embedding_dim=embedding_dim, gem_p=gem_p,
                        arcface_s=arcface_s, arcface_m=arcface_m,
                        arcface_subcenters=arcface_subcenters, pretrained=pretrained,
                        pretrained_path=pretrained_path, skip_fc_keys=skip_fc_keys)


def model_from_config(config: Mapping[str, Any]) -> RetrievalNet:
    """Rebuild a RetrievalNet from its `config` (random weights: load a state dict after)."""
    unknown = sorted(set(config) - set(CONFIG_KEYS))
    missing = [key for key in ("backbone", "num_classes") if key not in config]
    if unknown or missing:
        raise ValueError(f"bad model config: unknown keys {unknown}, missing keys {missing}")
    return build_model(**config, pretrained=False)


def load_phase_weights(model: RetrievalNet, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Load the previous phase's weights into `model`, growing the ArcFace classifier if needed.

    The old class rows are copied into the first rows of `head.weight` and the new rows keep
    their fresh initialization. Every other key must match in name and shape; a missing or
    unexpected key, any other shape mismatch, or a smaller new classifier raises ValueError.
    """
    state_dict = unwrap_state_dict(state_dict)
    current = model.state_dict()
    missing = sorted(set(current) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(current))
    if missing or unexpected:
        raise ValueError(f"phase weights do not fit the model: missing keys {missing}, "
                         f"unexpected keys {unexpected}")
    merged: dict[str, torch.Tensor] = {}
    for key, target in current.items():
        source = state_dict[key]
        if source.shape == target.shape:
            merged[key] = source
        elif key == "head.weight" and _grows_rows(source, target):
            grown = target.clone()
            grown[: source.shape[0]] = source.to(grown.dtype)
            merged[key] = grown
        else:
            raise ValueError(f"{key}: shape {tuple(source.shape)} of the phase weights does not "
                             f"fit {tuple(target.shape)} (only head.weight may grow in rows)")
    model.load_state_dict(merged)


def _grows_rows(source: torch.Tensor, target: torch.Tensor) -> bool:
    """Whether `target` is `source` with more rows (same row width)."""
    return (source.ndim == target.ndim == 2 and source.shape[1] == target.shape[1]
            and source.shape[0] < target.shape[0])


def param_groups(model: nn.Module, lr: float, weight_decay: float) -> list[dict[str, Any]]:
    """SGD parameter groups: biases (names ending in ".bias") at 2x lr, the rest at lr.

    Both groups use the same weight decay. Frozen parameters (requires_grad False, e.g. the
    BN neck's bias) are left out.
    """
    weights, biases = [], []
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        (biases if name.endswith(".bias") else weights).append(parameter)
    groups = [
        {"params": weights, "lr": lr, "weight_decay": weight_decay},
        {"params": biases, "lr": 2.0 * lr, "weight_decay": weight_decay},
    ]
    return [group for group in groups if group["params"]]


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameter elements in `module` (only those with requires_grad if asked)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
