"""Building blocks of the retrieval model: IBN-a normalization, GeM pooling, ArcFace margin head."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class IBN(nn.Module):
    """Instance-Batch Normalization (IBN-a): InstanceNorm on the first half of the channels."""

    def __init__(self, planes: int, ratio: float = 0.5) -> None:
        super().__init__()
        self.half = int(planes * ratio)
        # `IN` / `BN` are the attribute names of the IBN-Net release, so its checkpoints load as-is.
        self.IN = nn.InstanceNorm2d(self.half, affine=True)
        self.BN = nn.BatchNorm2d(planes - self.half)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        instance_part, batch_part = torch.split(x, [self.half, x.shape[1] - self.half], dim=1)
        return torch.cat((self.IN(instance_part), self.BN(batch_part)), dim=1)


class GeM(nn.Module):
    """Generalized-mean pooling with a fixed exponent p: (B, C, H, W) -> (B, C)."""

    def __init__(self, p: float = 3.0, eps: float = 1e-6) -> None:
        super().__init__()
        self.p = float(p)
        self.eps = float(eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x^p of fp16 activations overflows easily, so pool in float32.
        x = x.float().clamp(min=self.eps).pow(self.p)
        return F.avg_pool2d(x, kernel_size=x.shape[-2:]).pow(1.0 / self.p).flatten(1)

    def extra_repr(self) -> str:
        return f"p={self.p}, eps={self.eps}"


class ArcFace(nn.Module):
    """Additive angular margin classifier (ArcFace): s * cos(theta + m) for the target class."""

    def __init__(self, in_features: int, num_classes: int, s: float = 30.0, m: float = 0.3) -> None:
        super().__init__()
        self.in_features = in_features
        self.num_classes = num_classes
        self.s = float(s)
        self.m = float(m)
        self.weight = nn.Parameter(torch.empty(num_classes, in_features))
        nn.init.xavier_uniform_(self.weight)
        # Past theta = pi - m, theta + m would wrap around and raise the logit again; use a
        # linear penalty there instead (the insightface rule).
        self.threshold = math.cos(math.pi - self.m)
        self.linear_penalty = math.sin(math.pi - self.m) * self.m

    def forward(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        # The margin needs float32 precision even when the rest of the model runs under autocast.
        with torch.autocast(device_type=features.device.type, enabled=False):
            cosine = F.linear(F.normalize(features.float()), F.normalize(self.weight.float()))
            # Only the target column gets the margin; everything else stays s * cos(theta).
            index = labels.long().view(-1, 1)
            target_cosine = cosine.gather(1, index)
            # The floor keeps sqrt's gradient finite at cos = +-1 (torch.where backpropagates
            # through both branches, so an inf there would turn into NaN).
            target_sine = (1.0 - target_cosine.pow(2)).clamp(min=1e-12).sqrt()
            cos_theta_plus_m = target_cosine * math.cos(self.m) - target_sine * math.sin(self.m)
            target_logit = torch.where(
                target_cosine > self.threshold,
                cos_theta_plus_m,
                target_cosine - self.linear_penalty,
            )
            return self.s * cosine.scatter(1, index, target_logit)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, num_classes={self.num_classes}, "
                f"s={self.s}, m={self.m}")
