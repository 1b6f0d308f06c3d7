"""Building blocks of the retrieval model: IBN-a normalization, backbone output layout, GeM
pooling, ArcFace margin head (with sub-centers and margins per class)."""

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


class FeatureMap(nn.Module):
    """A timm backbone's output as the (B, C, H, W) map GeM pools; no parameters.

    - NCHW maps (ResNets, ConvNeXt, EfficientNet, RegNet, ...) pass unchanged.
    - NHWC maps (`output_fmt="NHWC"`, e.g. Swin) are permuted to NCHW.
    - Tokens (B, N, C) of ViT-like models: GeM runs over the patch tokens. The
      `num_prefix_tokens` class/distillation/register tokens in front are dropped (they are no
      positions of the image; they still shape the patch tokens through attention), and the
      N - prefix patch tokens become a (B, C, 1, N - prefix) map, so the head is the method's
      GeM -> Linear -> BN at every backbone. Like any GeM input, values below eps (LayerNorm'd
      tokens are signed) count as eps.
    - (B, C) of the few timm models that cannot disable their own pooling (see
      `glr.model.backbones.create_timm_generic`) pass unchanged: already pooled, GeM is skipped.

    A channel count other than `channels` raises RuntimeError naming both (instead of a shape
    error in the Linear that follows).
    """

    def __init__(self, channels: int, output_fmt: str = "NCHW", num_prefix_tokens: int = 0
                 ) -> None:
        super().__init__()
        if output_fmt not in ("NCHW", "NHWC"):
            raise ValueError(f"output_fmt {output_fmt!r}: expected NCHW or NHWC")
        self.channels = int(channels)
        self.output_fmt = output_fmt
        self.num_prefix_tokens = int(num_prefix_tokens)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = tuple(x.shape)
        if x.ndim == 4 and self.output_fmt == "NHWC":
            x = x.permute(0, 3, 1, 2)
        elif x.ndim == 3:
            x = x[:, self.num_prefix_tokens:].transpose(1, 2).unsqueeze(2)
        elif x.ndim not in (2, 4):
            raise RuntimeError(f"backbone output of shape {shape}: expected a map "
                               "(B, C, H, W), tokens (B, N, C) or pooled features (B, C)")
        if x.shape[1] != self.channels:
            raise RuntimeError(f"backbone output of shape {shape} (read as {self.output_fmt} "
                               f"map, tokens or pooled) has {x.shape[1]} channels, not the "
                               f"{self.channels} the head was built for")
        return x

    def extra_repr(self) -> str:
        return (f"channels={self.channels}, output_fmt={self.output_fmt}, "
                f"num_prefix_tokens={self.num_prefix_tokens}")


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
    """Additive angular margin classifier (ArcFace): s * cos(theta + m) for the target class,
    with optional sub-centers (a class's cosine is the best of its k centers) and margins per
    class (`set_margins`)."""

    def __init__(self, in_features: int, num_classes: int, s: float = 30.0, m: float = 0.3,
                 subcenters: int = 1) -> None:
        super().__init__()
        if subcenters < 1:
            raise ValueError(f"subcenters must be at least 1, got {subcenters}")
        self.in_features = in_features
        self.num_classes = num_classes
        self.subcenters = int(subcenters)
        self.s = float(s)
        self.m = float(m)
        # rows class-major (class c's centers are rows c·k … c·k + k − 1), so a later phase
        # with more classes appends rows and keeps the old classes' centers
        self.weight = nn.Parameter(torch.empty(num_classes * self.subcenters, in_features))
        nn.init.xavier_uniform_(self.weight)
        # per class: cos m, sin m, the threshold cos(π − m) and the penalty sin(π − m)·m, in
        # float64 rounded once to float32 (what a Python float m becomes in a float32 op);
        # not saved with the weights: each phase sets its own
        for name in ("cos_m", "sin_m", "threshold", "penalty"):
            self.register_buffer(name, torch.empty(num_classes), persistent=False)
        self.set_margins(torch.full((num_classes,), self.m, dtype=torch.float64))

    def set_margins(self, margins: torch.Tensor) -> None:
        """Margins per class (e.g. `dynamic_margins`, float64) instead of the fixed m."""
        if tuple(margins.shape) != (self.num_classes,):
            raise ValueError(f"margins of shape {tuple(margins.shape)} for "
                             f"{self.num_classes} classes")
        m = margins.to(torch.float64)
        for name, values in (("cos_m", m.cos()), ("sin_m", m.sin()),
                             ("threshold", torch.cos(math.pi - m)),
                             ("penalty", torch.sin(math.pi - m) * m)):
            getattr(self, name).copy_(values.to(device=self.cos_m.device, dtype=torch.float32))

    @property
    def margins(self) -> torch.Tensor:
        """The margin of each class (float32, recovered from its sine and cosine)."""
        return torch.atan2(self.sin_m, self.cos_m)

    def cosines(self, unit_features: torch.Tensor, unit_weight: torch.Tensor) -> torch.Tensor:
        """cos θ of each class (B, C): the best of its sub-centers."""
        cosine = F.linear(unit_features, unit_weight)
        if self.subcenters == 1:
            return cosine
        return cosine.view(len(unit_features), self.num_classes, self.subcenters).amax(dim=2)

    def forward(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        # The margin needs float32 precision even when the rest of the model runs under autocast.
        with torch.autocast(device_type=features.device.type, enabled=False):
            unit_features = F.normalize(features.float())
            # normalized once: the cosines and the target's sine backpropagate through it
            unit_weight = F.normalize(self.weight.float())
            cosine = self.cosines(unit_features, unit_weight)
            # Only the target column gets the margin; everything else stays s * cos(theta).
            index = labels.long().view(-1, 1)
            target_cosine = cosine.gather(1, index)
            target_sine = _sine_between(unit_features, self._target_centers(
                unit_features, unit_weight, labels.long()))
            target = labels.long()
            cos_theta_plus_m = (target_cosine * self.cos_m[target].view(-1, 1)
                                - target_sine * self.sin_m[target].view(-1, 1))
            # Past theta = pi - m, theta + m would wrap around and raise the logit again; use a
            # linear penalty there instead (the insightface rule, per class).
            target_logit = torch.where(
                target_cosine > self.threshold[target].view(-1, 1),
                cos_theta_plus_m,
                target_cosine - self.penalty[target].view(-1, 1),
            )
            return self.s * cosine.scatter(1, index, target_logit)

    def _target_centers(self, unit_features: torch.Tensor, unit_weight: torch.Tensor,
                        labels: torch.Tensor) -> torch.Tensor:
        """The unit center of each sample's class nearest to it (B, D): the one whose cosine
        is the class's."""
        if self.subcenters == 1:
            return unit_weight[labels]
        centers = unit_weight.view(self.num_classes, self.subcenters, -1)[labels]  # (B, k, D)
        best = torch.einsum("bd,bkd->bk", unit_features, centers).argmax(dim=1)
        return centers[torch.arange(len(labels)), best]

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, num_classes={self.num_classes}, "
                f"subcenters={self.subcenters}, s={self.s}, m={self.m}")


def dynamic_margins(counts: torch.Tensor | list[int], low: float, high: float) -> torch.Tensor:
    """Margins per class from its training images (the 1st place of GLR 2021, Henkel):
    m_c = low + (high − low)·(t_c − min t)/(max t − min t), t_c = n_c^(−1/4), so the rarest
    class gets `high` and the most frequent `low`. Only classes with images count for min
    and max; a class without images (never a target in the phase) and every class when all
    counts are equal get `high`. In float64."""
    counts = torch.as_tensor(counts, dtype=torch.float64)
    present = counts > 0
    margins = torch.full(counts.shape, float(high), dtype=torch.float64)
    if not bool(present.any()):
        return margins
    t = counts[present].pow(-0.25)
    spread = t.max() - t.min()
    if float(spread) > 0:
        margins[present] = low + (high - low) * (t - t.min()) / spread
    return margins


def _sine_between(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sin of the angle between the unit rows of `a` and `b`, as a (B, 1) column.

    sqrt(1 - cos^2) is ill-conditioned near cos = +-1: a float32 cosine off by one unit in the
    last place (6e-8) moves that sine by sqrt(2 * 6e-8) = 3.5e-4, i.e. s * sin(m) * 3.5e-4 =
    0.003 on the logit. For unit vectors |a - b| |a + b| = sqrt((2 - 2c)(2 + 2c)) = 2 sin, and
    the differences a - b and a + b are computed to a few units in the last place of each
    component, so this form stays accurate to O(D * 6e-8) at every angle.
    """
    squared = (a - b).pow(2).sum(1, keepdim=True) * (a + b).pow(2).sum(1, keepdim=True)
    # The floor keeps sqrt's gradient finite at theta = 0 and pi (torch.where in the caller
    # backpropagates through both branches, so an inf there would turn into NaN); it moves the
    # sine by at most 1e-15.
    return 0.5 * squared.clamp(min=1e-30).sqrt()
