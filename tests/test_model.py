"""Model: GeM, ArcFace, IBN-a, last stride 1, the retrieval net and its training helpers."""

from __future__ import annotations

import copy
import json
import math
import re

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.models.resnest import ResNestBottleneck
from torch import nn

from glr.model import (
    BACKBONES,
    IBN,
    ArcFace,
    GeM,
    build_model,
    convert_ibn_a,
    count_parameters,
    create_backbone,
    dynamic_margins,
    load_backbone_weights,
    load_phase_weights,
    map_ibn_net_keys,
    model_from_config,
    param_groups,
    set_last_stride_1,
)

# Parameter counts of timm 1.0 backbones built with num_classes=0 (no classifier).
RESNET10T_PARAMS = 4_922_488
RESNET18_PARAMS = 11_176_512
RESNET50_PARAMS = 23_508_032
SERESNET101_PARAMS = 47_277_872
RESNEXT101_32X4D_PARAMS = 42_128_704


def timm_features(name: str) -> nn.Module:
    """A plain timm feature extractor, random weights."""
    return timm.create_model(name, pretrained=False, num_classes=0, global_pool="")


def randomize_norms(model: nn.Module, seed: int = 0) -> None:
    """Give every norm layer non-default affine parameters and running statistics."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d, nn.InstanceNorm2d)):
                size = module.weight.shape
                module.weight.copy_(torch.rand(size, generator=generator) + 0.5)
                module.bias.copy_(torch.randn(size, generator=generator))
                if module.running_mean is not None:
                    module.running_mean.copy_(torch.randn(size, generator=generator))
                    module.running_var.copy_(torch.rand(size, generator=generator) + 0.5)


# --- GeM ---------------------------------------------------------------------------------------

# float32 unit roundoff: every float32 operation is exact up to a relative 2^-24. Tolerances
# below are bounds for any summation order (any SIMD width, BLAS kernel or thread count).
FLOAT32_U = 2.0**-24


def gem_float32_rtol(positions: int, eps: float = 1e-6) -> float:
    """Relative error bound of float32 GeM (p = 3) over `positions` values per channel.

    x^3 and y^(1/3) are each within 2 ulp (4u); the mean adds at most positions * u, and the
    cube root divides the error it receives by 3; the exponent 1/3 rounded to float32 (off by
    u/3) multiplies the result by y^(u/3), i.e. by u/3 * |ln y| <= u/3 * ln(1 / eps^3).
    """
    return ((positions + 4) / 3 + 4 + math.log(1.0 / eps**3) / 3) * FLOAT32_U


def test_gem_known_values() -> None:
    x = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]], [[-1.0, 2.0], [0.0, 0.0]]]])
    pooled = GeM(p=3.0)(x)
    assert pooled.shape == (1, 2)
    # ((1 + 8 + 27 + 64) / 4)^(1/3) = 25^(1/3); negatives and zeros clamp to eps: (8 / 4)^(1/3).
    assert pooled[0, 0].item() == pytest.approx(2.9240177382128660, rel=gem_float32_rtol(4))
    assert pooled[0, 1].item() == pytest.approx(1.2599210498948732, rel=gem_float32_rtol(4))


def test_gem_matches_float64_reference() -> None:
    x = torch.randn(2, 5, 3, 4, generator=torch.Generator().manual_seed(1))
    reference = x.double().clamp(min=1e-6).pow(3.0).mean(dim=(2, 3)).pow(1.0 / 3.0)
    torch.testing.assert_close(GeM(p=3.0)(x).double(), reference, rtol=gem_float32_rtol(12),
                               atol=0)


def test_gem_with_p1_is_average_pooling() -> None:
    x = torch.rand(2, 4, 5, 3, generator=torch.Generator().manual_seed(2)) + 0.1
    expected = F.adaptive_avg_pool2d(x, 1).flatten(1)
    # Two means of 15 positive values by different kernels: each within 15u of the exact one
    # (x^1 and its 1st root are exact or within 2 ulp each).
    torch.testing.assert_close(GeM(p=1.0)(x), expected, rtol=2 * (15 + 8) * FLOAT32_U, atol=0)


# --- ArcFace -----------------------------------------------------------------------------------


def arcface_reference(features: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                      s: float, m: float) -> torch.Tensor:
    """ArcFace logits in float64, through the angle theta itself."""
    f = features.double() / features.double().norm(dim=1, keepdim=True)
    w = weight.double() / weight.double().norm(dim=1, keepdim=True)
    cosine = f @ w.T
    logits = s * cosine.clone()
    for row, label in enumerate(labels.tolist()):
        theta = math.acos(max(-1.0, min(1.0, cosine[row, label].item())))
        if theta + m < math.pi:  # i.e. cos(theta) > cos(pi - m)
            logits[row, label] = s * math.cos(theta + m)
        else:
            logits[row, label] = s * (cosine[row, label].item() - m * math.sin(math.pi - m))
    return logits


def arcface_inputs(head: ArcFace) -> tuple[torch.Tensor, torch.Tensor]:
    """Features covering both margin branches, and their labels."""
    weight = head.weight.detach()
    generator = torch.Generator().manual_seed(3)
    features = torch.stack([
        torch.randn(head.in_features, generator=generator),  # generic angle
        weight[1] * 2.0,  # parallel to its target: theta = 0
        -weight[2] * 0.5,  # anti-parallel to its target: theta = pi, past pi - m
        -weight[3] + 0.05 * weight[0],  # almost anti-parallel: theta just under pi
    ])
    return features, torch.tensor([0, 1, 2, 3])


def arcface_float32_tolerance(s: float, dim: int) -> float:
    """A bound on |float32 ArcFace logit - exact logit| for unit-normalized inputs of `dim`.

    First-order error analysis, valid for any summation order (so for any BLAS kernel, SIMD
    width or thread count): F.normalize scales each row by 1/|x| with |x| off by at most
    (dim/2 + 2)u, and rounds each component (u); a dot product of length dim adds at most
    dim*u. So a cosine is off by at most (2*dim + 6)u. The stable sine (|a - b| |a + b| / 2)
    sums dim squares of differences whose components are off by (dim/2 + 3)u each, which gives
    at most (4*dim + 20)u. The target logit s(c cos m - sin sin m) and the others s*c are then
    off by at most s(6*dim + 30)u.
    """
    return s * (6 * dim + 30) * FLOAT32_U


def test_arcface_matches_float64_reference_on_both_branches() -> None:
    torch.manual_seed(0)
    head = ArcFace(in_features=6, num_classes=5, s=30.0, m=0.3)
    features, labels = arcface_inputs(head)
    cosine = F.normalize(features.double()) @ F.normalize(head.weight.double()).T
    target_cosine = cosine[torch.arange(4), labels]
    threshold = math.cos(math.pi - 0.3)
    # Rows 0 and 1 take cos(theta + m); rows 2 and 3 take the linear penalty.
    assert (target_cosine[:2] > threshold).all()
    assert (target_cosine[2:] < threshold).all()

    logits = head(features, labels)
    assert logits.shape == (4, 5)
    assert logits.dtype == torch.float32
    reference = arcface_reference(features, head.weight.detach(), labels, 30.0, 0.3)
    tolerance = arcface_float32_tolerance(30.0, 6)  # 1.2e-4; sqrt(1 - cos^2) was off by 4e-3
    torch.testing.assert_close(logits.double(), reference, rtol=0, atol=tolerance)
    # Known values: theta = 0 gives s cos(m); theta = pi gives s (-1 - m sin(m)).
    assert logits[1, 1].item() == pytest.approx(30.0 * math.cos(0.3), abs=tolerance)
    assert logits[2, 2].item() == pytest.approx(-32.659681860, abs=tolerance)
    # Every non-target logit is s cos(theta).
    non_target = torch.ones(4, 5, dtype=torch.bool)
    non_target[torch.arange(4), labels] = False
    torch.testing.assert_close(logits[non_target].double(), 30.0 * cosine[non_target],
                               rtol=0, atol=tolerance)


def test_arcface_margin_is_accurate_near_theta_0_in_float32() -> None:
    """Angles of 1e-3 .. 1e-7 rad, where cos is within a few ulps of 1: the margin logit
    s cos(theta + m) must keep float32 accuracy (sqrt(1 - cos^2) loses half the digits)."""
    torch.manual_seed(0)
    dim = 64
    head = ArcFace(in_features=dim, num_classes=8, s=30.0, m=0.3)
    weight = F.normalize(head.weight.detach().double())
    direction = torch.randn(8, dim, dtype=torch.float64)
    # A unit vector orthogonal to each target row, then features at angle theta from it.
    orthogonal = F.normalize(direction - (direction * weight).sum(1, keepdim=True) * weight)
    thetas = torch.tensor([1e-3, 3e-4, 1e-4, 3e-5, 1e-5, 3e-6, 1e-6, 1e-7], dtype=torch.float64)
    features = (weight * thetas.cos()[:, None] + orthogonal * thetas.sin()[:, None]).float()
    labels = torch.arange(8)
    logits = head(features, labels)
    exact = 30.0 * torch.cos(thetas + 0.3)
    # The float32 features themselves sit at an angle off theta by up to ~sqrt(dim) * u.
    tolerance = arcface_float32_tolerance(30.0, dim) + 30.0 * math.sqrt(dim) * FLOAT32_U
    torch.testing.assert_close(logits[labels, labels].double(), exact, rtol=0, atol=tolerance)


def test_arcface_gradients_are_finite_at_theta_0_and_pi() -> None:
    torch.manual_seed(0)
    head = ArcFace(in_features=6, num_classes=5, s=30.0, m=0.3)
    features, labels = arcface_inputs(head)
    features.requires_grad_(True)
    F.cross_entropy(head(features, labels), labels).backward()
    assert torch.isfinite(features.grad).all()
    assert torch.isfinite(head.weight.grad).all()


def test_arcface_computes_in_float32_under_autocast() -> None:
    torch.manual_seed(0)
    head = ArcFace(in_features=6, num_classes=5, s=30.0, m=0.3)
    features, labels = arcface_inputs(head)
    expected = head(features, labels)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = head(features, labels)
        half_precision_logits = head(features.bfloat16(), labels)
    assert logits.dtype == half_precision_logits.dtype == torch.float32
    # Autocast is off inside the head: float32 inputs run the very same float32 kernels.
    torch.testing.assert_close(logits, expected, rtol=0, atol=0)
    # bfloat16 features: each component is rounded by at most 2^-9 of itself, so a feature
    # turns by at most asin(2^-9) rad, and every logit (s cos(theta), s cos(theta + m) or the
    # linear penalty) moves by at most s times that: 0.059, plus the float32 error. A bfloat16
    # matmul inside the head would add up to s * 2 * 2^-8 = 0.23 on top.
    tolerance = 30.0 * math.asin(2.0**-9) + 2 * arcface_float32_tolerance(30.0, 6)
    torch.testing.assert_close(half_precision_logits, expected, rtol=0, atol=tolerance)


def test_subcenter_arcface_takes_each_class_best_center() -> None:
    """k = 3 sub-centers (the 1st place's): a class's cosine is the best of its 3 centers
    (rows c·3 … c·3 + 2), and the target's margin uses the angle to that best center, so the
    logits equal one-center ArcFace with each class's nearest center as its weight."""
    torch.manual_seed(0)
    head = ArcFace(in_features=6, num_classes=4, s=45.0, m=0.3, subcenters=3)
    assert head.weight.shape == (12, 6)
    features = torch.randn(5, 6)
    labels = torch.tensor([0, 1, 2, 3, 1])
    logits = head(features, labels)
    unit = F.normalize(features.double())
    centers = F.normalize(head.weight.detach().double()).view(4, 3, 6)
    per_center = torch.einsum("bd,ckd->bck", unit, centers)
    # the reference with, for every row, each class's best center as that class's weight
    for row in range(5):
        best = per_center[row].argmax(dim=1)
        weight = centers[torch.arange(4), best]
        expected = arcface_reference(features[row:row + 1], weight, labels[row:row + 1],
                                     45.0, 0.3)
        torch.testing.assert_close(logits[row:row + 1].double(), expected, rtol=0,
                                   atol=arcface_float32_tolerance(45.0, 6))


def test_arcface_margins_per_class() -> None:
    """set_margins: each target gets its own class's margin; the rule past π − m uses it too."""
    torch.manual_seed(0)
    head = ArcFace(in_features=6, num_classes=5, s=30.0, m=0.3)
    margins = torch.tensor([0.05, 0.5, 0.2, 0.45, 0.1], dtype=torch.float64)
    head.set_margins(margins)
    # margins = atan2(sin m, cos m) of the float32-rounded sine and cosine: their rounding
    # (2^-24 of each) turns the angle by at most (sin m + cos m)·2^-24 <= 1.5·2^-24, and
    # float32 atan2 (within 1 ulp of m <= 0.5, i.e. 2^-25) rounds once more
    torch.testing.assert_close(head.margins.double(), margins, rtol=0,
                               atol=(1.5 + 0.5 + 0.5) * FLOAT32_U)
    features, labels = arcface_inputs(head)
    logits = head(features, labels)
    tolerance = arcface_float32_tolerance(30.0, 6)
    for row, label in enumerate(labels.tolist()):
        expected = arcface_reference(features[row:row + 1], head.weight.detach(),
                                     labels[row:row + 1], 30.0, float(margins[label]))
        torch.testing.assert_close(logits[row:row + 1].double(), expected, rtol=0,
                                   atol=tolerance)
    with pytest.raises(ValueError, match=r"margins of shape \(3,\) for 5 classes"):
        head.set_margins(torch.zeros(3))


def test_dynamic_margins_follow_the_formula() -> None:
    """m_c = low + (high − low)·(t_c − min t)/(max t − min t), t_c = n_c^(−1/4): 1, 16, 81 and
    10,000 images give t = 1, 1/2, 1/3, 1/10, i.e. 0.5, 0.25, 1/6 and 0.05 with [0.05, 0.5].
    A class without images and a list of equal counts get `high`."""
    margins = dynamic_margins([1, 16, 81, 0, 10_000], 0.05, 0.5)
    assert margins.dtype == torch.float64
    torch.testing.assert_close(margins, torch.tensor([0.5, 0.25, 1 / 6, 0.5, 0.05],
                                                     dtype=torch.float64),
                               rtol=0, atol=8 * 2.0**-52)
    assert dynamic_margins([7, 7, 0], 0.05, 0.5).tolist() == [0.5, 0.5, 0.5]


def test_subcenter_classifier_grows_by_whole_classes() -> None:
    """A later phase with more classes keeps the old classes' k centers each (class-major
    rows) and adds k fresh rows per new class."""
    old = small_model(num_classes=5, embedding_dim=8, arcface_subcenters=3)
    torch.manual_seed(1)
    new = build_model("resnet10t", 9, embedding_dim=8, arcface_subcenters=3)
    fresh = new.head.weight.detach().clone()
    load_phase_weights(new, old.state_dict())
    assert new.head.weight.shape == (27, 8)
    torch.testing.assert_close(new.head.weight[:15], old.head.weight, rtol=0, atol=0)
    torch.testing.assert_close(new.head.weight[15:], fresh[15:], rtol=0, atol=0)
    assert model_from_config(new.config).head.subcenters == 3


def test_arcface_weight_init_is_xavier_uniform() -> None:
    torch.manual_seed(0)
    head = ArcFace(in_features=64, num_classes=2000)
    bound = math.sqrt(6.0 / (64 + 2000))
    assert head.weight.shape == (2000, 64)
    assert head.weight.abs().max().item() <= bound
    # Uniform(-b, b) has standard deviation b / sqrt(3).
    assert head.weight.std().item() == pytest.approx(bound / math.sqrt(3.0), rel=0.02)


# --- IBN ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("channels", [6, 5])
def test_ibn_is_instance_norm_then_batch_norm(channels: int) -> None:
    ibn = IBN(channels)
    half = int(channels * 0.5)
    assert ibn.half == half
    randomize_norms(ibn)
    instance_norm = nn.InstanceNorm2d(half, affine=True)
    batch_norm = nn.BatchNorm2d(channels - half)
    instance_norm.load_state_dict(ibn.IN.state_dict())
    batch_norm.load_state_dict(ibn.BN.state_dict())

    x = torch.randn(3, channels, 4, 5, generator=torch.Generator().manual_seed(4))
    for train in (True, False):
        ibn.train(train)
        instance_norm.train(train)
        batch_norm.train(train)
        expected = torch.cat((instance_norm(x[:, :half]), batch_norm(x[:, half:])), dim=1)
        torch.testing.assert_close(ibn(x), expected, rtol=0, atol=0)
    torch.testing.assert_close(ibn.BN.running_mean, batch_norm.running_mean)


def test_ibn_state_dict_uses_ibn_net_names() -> None:
    assert set(IBN(8).state_dict()) == {
        "IN.weight", "IN.bias",
        "BN.weight", "BN.bias", "BN.running_mean", "BN.running_var", "BN.num_batches_tracked",
    }


IBN_BN1 = re.compile(r"layer[123]\.\d+\.bn1(\..*)?")


@pytest.mark.parametrize(("name", "blocks_in_stages_1_to_3", "expected_params"), [
    ("resnet18", 2 + 2 + 2, RESNET18_PARAMS),
    ("resnet50", 3 + 4 + 6, RESNET50_PARAMS),
])
def test_convert_ibn_a(name: str, blocks_in_stages_1_to_3: int, expected_params: int) -> None:
    original = timm_features(name)
    randomize_norms(original)
    converted = convert_ibn_a(copy.deepcopy(original))

    assert count_parameters(original) == expected_params
    assert count_parameters(converted) == expected_params
    for stage in ("layer1", "layer2", "layer3"):
        for block, original_block in zip(getattr(converted, stage),
                                         getattr(original, stage), strict=True):
            assert isinstance(block.bn1, IBN)
            # The IBN starts from the replaced BatchNorm's values.
            half = block.bn1.half
            torch.testing.assert_close(block.bn1.IN.weight, original_block.bn1.weight[:half])
            torch.testing.assert_close(block.bn1.IN.bias, original_block.bn1.bias[:half])
            torch.testing.assert_close(block.bn1.BN.weight, original_block.bn1.weight[half:])
            torch.testing.assert_close(block.bn1.BN.running_var,
                                       original_block.bn1.running_var[half:])
    assert all(type(block.bn1) is nn.BatchNorm2d for block in converted.layer4)
    assert sum(isinstance(m, IBN) for m in converted.modules()) == blocks_in_stages_1_to_3
    # Everything else keeps its type.
    original_types = {name: type(module) for name, module in original.named_modules()}
    for module_name, module in converted.named_modules():
        if not IBN_BN1.fullmatch(module_name):
            assert type(module) is original_types[module_name], module_name


@pytest.mark.parametrize(("name", "expected_params"), [
    ("seresnet101_ibn_a", SERESNET101_PARAMS),
    ("resnext101_32x4d_ibn_a", RESNEXT101_32X4D_PARAMS),
])
def test_ibn_backbones_keep_the_parameter_count(name: str, expected_params: int) -> None:
    backbone, channels = create_backbone(name)
    assert channels == 2048
    assert count_parameters(backbone) == expected_params
    assert sum(isinstance(m, IBN) for m in backbone.modules()) == 3 + 4 + 23
    assert all(type(block.bn1) is nn.BatchNorm2d for block in backbone.layer4)
    # IBN-Net's SE reduces C to int(C / 16); timm must match for its checkpoint to load.
    for block in backbone.modules():
        if hasattr(block, "se") and block.se is not None:
            out_channels, in_channels = block.se.fc1.weight.shape[:2]
            assert out_channels == in_channels // 16
    backbone.eval()
    with torch.no_grad():
        # Last stride 1: a 32x32 input gives a 2x2 map (1x1 at the usual stride 32).
        assert backbone(torch.randn(2, 3, 32, 32)).shape == (2, 2048, 2, 2)


# --- last stride 1 -----------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "channels"), [
    ("resnet10t", 512),
    ("resnet18", 512),
    ("resnet18_ibn_a", 512),
    ("resnet50", 2048),
    ("resnest26d", 2048),
])
def test_backbone_feature_map_is_input_over_16(name: str, channels: int) -> None:
    backbone, num_features = create_backbone(name)
    assert num_features == channels
    backbone.eval()
    with torch.no_grad():
        assert backbone(torch.randn(2, 3, 64, 64)).shape == (2, channels, 4, 4)


def test_unmodified_timm_backbone_is_input_over_32() -> None:
    with torch.no_grad():
        assert timm_features("resnet18").eval()(torch.randn(1, 3, 64, 64)).shape == (1, 512, 2, 2)


@pytest.fixture(scope="module")
def resnest101e() -> nn.Module:
    """glr's resnest101e backbone (random weights), built once: it takes a few seconds."""
    torch.manual_seed(0)
    backbone, _ = create_backbone("resnest101e")
    return backbone


def conv3x3s(block: nn.Module) -> list[nn.Conv2d]:
    """The convolutions of `block` with a kernel larger than 1x1."""
    return [m for m in block.modules() if isinstance(m, nn.Conv2d) and m.kernel_size != (1, 1)]


def test_resnest_last_stride_1_dilates_like_the_authors(resnest101e: nn.Module) -> None:
    # The authors' `_make_layer(block, 512, layers[3], stride=1, dilation=2)`: block 1 at
    # dilation 1 keeping its 3x3 avd pool at stride 1; blocks 2..n at dilation 2.
    first, *others = resnest101e.layer4
    assert len(others) == 2
    assert all(m.stride == (1, 1) for m in resnest101e.layer4.modules()
               if isinstance(m, nn.Conv2d))
    assert [(c.dilation, c.padding) for c in conv3x3s(first)] == [((1, 1), (1, 1))]
    for block in others:
        assert [(c.dilation, c.padding) for c in conv3x3s(block)] == [((2, 2), (2, 2))]
        assert block.avd_first is None and block.avd_last is None
    pool = first.avd_last
    assert type(pool) is nn.AvgPool2d
    assert (pool.kernel_size, pool.stride, pool.padding) == (3, 1, 1)
    assert pool.count_include_pad and not pool.ceil_mode  # nn.AvgPool2d(3, 1, padding=1)
    assert first.avd_first is None
    # Downsample path: the authors' AvgPool2d(kernel_size=1, stride=1) is the identity.
    assert isinstance(first.downsample[0], nn.Identity)
    assert first.downsample[1].kernel_size == (1, 1)
    assert not any(isinstance(m, (nn.AvgPool2d, nn.MaxPool2d)) and m is not pool
                   for m in resnest101e.layer4.modules())
    # Stages 1-3 are untouched: layer3 still downsamples by its avd pool and its 'd' path.
    assert resnest101e.layer3[0].avd_last.stride == 2
    assert resnest101e.layer3[0].downsample[0].stride == 2
    assert all(c.dilation == (1, 1) for c in conv3x3s(resnest101e.layer3))
    resnest101e.eval()
    with torch.no_grad():
        assert resnest101e(torch.randn(1, 3, 64, 64)).shape == (1, 2048, 4, 4)


def authors_resnest_stage4(inplanes: int, planes: int, blocks: int) -> nn.Sequential:
    """Stage 4 as the authors' ResNeSt `_make_layer(block, planes, blocks, stride=1,
    dilation=2)` builds it (`is_first=True`; avg_down; radix 2, avd, avd_last), made of timm's
    port of their Bottleneck with the same arguments."""
    downsample = nn.Sequential(
        nn.AvgPool2d(kernel_size=1, stride=1, ceil_mode=True, count_include_pad=False),
        nn.Conv2d(inplanes, planes * 4, kernel_size=1, stride=1, bias=False),
        nn.BatchNorm2d(planes * 4),
    )
    layers = [ResNestBottleneck(inplanes, planes, 1, downsample, radix=2, avd=True,
                                is_first=True, dilation=1)]
    layers += [ResNestBottleneck(planes * 4, planes, radix=2, avd=True, dilation=2)
               for _ in range(1, blocks)]
    return nn.Sequential(*layers)


def test_resnest_stage_4_computes_the_authors_stage_4(resnest101e: nn.Module) -> None:
    reference = authors_resnest_stage4(1024, 512, 3)
    layer4 = copy.deepcopy(resnest101e.layer4)
    randomize_norms(layer4, seed=12)
    reference.load_state_dict(layer4.state_dict())
    layer4.eval()
    reference.eval()
    x = torch.randn(2, 1024, 5, 6, generator=torch.Generator().manual_seed(13))
    with torch.no_grad():
        # Same weights, same operations in the same order: the very same float32 kernels.
        torch.testing.assert_close(layer4(x), reference(x), rtol=0, atol=0)
        assert layer4(x).shape == (2, 2048, 5, 6)


def test_resnest_avd_first_variant_keeps_its_pool_at_stride_1() -> None:
    # resnest50d_1s4x24d pools before its split-attention conv (avd_first) and has radix 1.
    backbone, _ = create_backbone("resnest50d_1s4x24d")
    first, *others = backbone.layer4
    assert type(first.avd_first) is nn.AvgPool2d and first.avd_first.stride == 1
    assert first.avd_last is None
    assert all(c.dilation == (2, 2) and c.padding == (2, 2)
               for block in others for c in conv3x3s(block))
    with torch.no_grad():
        assert backbone.eval()(torch.randn(1, 3, 64, 64)).shape == (1, 2048, 4, 4)


@pytest.mark.parametrize("name", ["resnet50", "resnet26d"])
def test_plain_resnet_last_stride_1_has_no_dilation(name: str) -> None:
    model = set_last_stride_1(timm_features(name))
    first = model.layer4[0]
    assert first.conv2.stride == (1, 1)
    assert all(m.stride == (1, 1) for m in model.layer4.modules() if isinstance(m, nn.Conv2d))
    assert all((c.dilation, c.padding) == ((1, 1), (1, 1)) for c in conv3x3s(model.layer4))
    if name == "resnet26d":  # the 'd' downsample path: its stride-2 average pool goes
        assert isinstance(first.downsample[0], nn.Identity)
    else:
        assert first.downsample[0].stride == (1, 1)
    assert model.layer3[0].conv2.stride == (2, 2)
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 3, 64, 64)).shape == (1, 2048, 4, 4)


def test_last_stride_1_removes_anti_aliasing_pool() -> None:
    model = set_last_stride_1(timm_features("resnetblur18")).eval()
    assert isinstance(model.layer4[0].aa, nn.Identity)
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 512, 4, 4)


def test_last_stride_1_refuses_unknown_downsampling() -> None:
    class Strided(nn.Module):
        """A made-up layer that downsamples."""

        stride = 2

    model = nn.Module()
    model.layer4 = nn.Sequential(nn.Sequential(nn.Conv2d(2, 2, 3, stride=2), Strided()))
    with pytest.raises(TypeError, match="Strided"):
        set_last_stride_1(model)


def test_misspelt_backbone_suggests_the_timm_name() -> None:
    with pytest.raises(ValueError, match=r"close matches: vit_base_patch16_224\b"):
        create_backbone("vit_bse_patch16_224")


def test_all_backbones_are_timm_architectures() -> None:
    assert {"resnet50", "resnest101e", "resnest269e", "seresnet101_ibn_a",
            "resnext101_32x4d_ibn_a", "resnet18", "resnet10t", "resnet34"} <= set(BACKBONES)
    assert all(timm.is_model(spec.timm_name) for spec in BACKBONES.values())


def test_pretrained_without_timm_weights_asks_for_a_file() -> None:
    # timm has no ImageNet seresnet101; the IBN-Net release file must be given instead.
    with pytest.raises(ValueError, match=re.escape("se_resnet101_ibn_a-fabed4e2.pth")):
        create_backbone("seresnet101_ibn_a", pretrained=True)


# --- pretrained weights from a file ------------------------------------------------------------


def test_pretrained_path_loads_wrapped_prefixed_weights(tmp_path) -> None:
    source, _ = create_backbone("resnet18_ibn_a")
    randomize_norms(source, seed=5)
    state = {f"module.{key}": value for key, value in source.state_dict().items()}
    state["module.fc.weight"] = torch.randn(1000, 512)
    state["module.fc.bias"] = torch.randn(1000)
    path = tmp_path / "weights.pth"
    torch.save({"state_dict": state}, path)

    model = build_model("resnet18_ibn_a", 4, embedding_dim=8, pretrained_path=str(path))
    loaded = model.backbone.state_dict()
    assert loaded.keys() == source.state_dict().keys()
    for key, value in source.state_dict().items():
        torch.testing.assert_close(loaded[key], value, rtol=0, atol=0, msg=key)


def test_pretrained_path_with_a_missing_key_names_it(tmp_path) -> None:
    source, _ = create_backbone("resnet18_ibn_a")
    state = source.state_dict()
    del state["layer2.1.bn1.IN.weight"]
    state["extra.weight"] = torch.zeros(1)
    path = tmp_path / "weights.pth"
    torch.save(state, path)
    with pytest.raises(ValueError, match=re.escape("missing keys: ['layer2.1.bn1.IN.weight']")):
        build_model("resnet18_ibn_a", 4, pretrained_path=path)
    with pytest.raises(ValueError, match=re.escape("unexpected keys: ['extra.weight']")):
        build_model("resnet18_ibn_a", 4, pretrained_path=path)


def test_pretrained_path_with_a_wrong_shape_names_it(tmp_path) -> None:
    source, _ = create_backbone("resnet10t")
    state = source.state_dict()
    state["conv1.0.weight"] = torch.zeros(1, 3, 3, 3)
    path = tmp_path / "weights.pth"
    torch.save({"model": state}, path)
    with pytest.raises(ValueError, match=r"conv1\.0\.weight: file \(1, 3, 3, 3\)"):
        create_backbone("resnet10t", pretrained_path=path)


def test_map_ibn_net_keys_renames_the_se_block() -> None:
    down, up, conv = torch.randn(16, 256), torch.randn(256, 16), torch.randn(64, 64, 1, 1)
    mapped = map_ibn_net_keys({
        "layer1.0.se.fc.0.weight": down,
        "layer1.0.se.fc.2.weight": up,
        "layer1.0.conv1.weight": conv,
        "layer1.0.bn1.IN.weight": torch.ones(32),
    })
    assert set(mapped) == {
        "layer1.0.se.fc1.weight", "layer1.0.se.fc1.bias",
        "layer1.0.se.fc2.weight", "layer1.0.se.fc2.bias",
        "layer1.0.conv1.weight", "layer1.0.bn1.IN.weight",
    }
    assert mapped["layer1.0.se.fc1.weight"].shape == (16, 256, 1, 1)
    assert mapped["layer1.0.se.fc2.weight"].shape == (256, 16, 1, 1)
    assert torch.equal(mapped["layer1.0.se.fc1.bias"], torch.zeros(16))
    assert torch.equal(mapped["layer1.0.se.fc2.bias"], torch.zeros(256))
    assert mapped["layer1.0.conv1.weight"] is conv

    # timm's SEModule with the mapped weights computes IBN-Net's bias-free SELayer:
    # x * sigmoid(W2 relu(W1 mean(x))).
    se_module = timm_features("seresnet18").layer3[0].se.double()
    assert se_module.fc1.weight.shape == (16, 256, 1, 1)  # 256 channels, reduction 16
    generator = torch.Generator().manual_seed(5)
    down = torch.randn(16, 256, generator=generator, dtype=torch.float64)
    up = torch.randn(256, 16, generator=generator, dtype=torch.float64)
    se_module.load_state_dict(
        {key.removeprefix("se."): value
         for key, value in map_ibn_net_keys({"se.fc.0.weight": down, "se.fc.2.weight": up}).items()}
    )
    x = torch.randn(2, 256, 3, 3, generator=generator, dtype=torch.float64)
    squeeze = x.mean(dim=(2, 3))
    gate = torch.sigmoid(torch.relu(squeeze @ down.T) @ up.T)
    expected = x * gate[:, :, None, None]
    # In float64 the mapping is what is tested, not float32 kernels: dot products of 256 terms
    # of size ~1 are off by at most 256 * 2^-53 * sum|w x| (~1e-12); a wrong mapping by ~1.
    torch.testing.assert_close(se_module(x), expected, rtol=0, atol=1e-10)


def write_ibn_net_checkpoint(backbone: nn.Module, path) -> dict[str, torch.Tensor]:
    """Save `backbone`'s weights named the IBN-Net way: SE as `se.fc.0/2.weight` (Linear, no
    bias) and a 1000-class `fc` classifier; returns the saved state dict."""
    ibn_net_state = {}
    for key, value in backbone.state_dict().items():
        if re.search(r"\.se\.fc[12]\.bias$", key):
            continue  # IBN-Net's SE has no bias
        key = re.sub(r"\.se\.fc1\.weight$", ".se.fc.0.weight", key)
        key = re.sub(r"\.se\.fc2\.weight$", ".se.fc.2.weight", key)
        ibn_net_state[key] = value.flatten(1) if ".se.fc." in key else value
    ibn_net_state["fc.weight"] = torch.randn(1000, backbone.num_features)
    ibn_net_state["fc.bias"] = torch.randn(1000)
    torch.save(ibn_net_state, path)
    return ibn_net_state


def ibn_seresnet18() -> nn.Module:
    """An SE-ResNet-IBN-a with last stride 1; seresnet18 stands in for seresnet101 to keep the
    checkpoint small."""
    return set_last_stride_1(convert_ibn_a(timm_features("seresnet18")))


def test_ibn_net_style_se_checkpoint_loads(tmp_path) -> None:
    # A checkpoint named the IBN-Net way (se.fc.0/2 without bias, IN/BN halves, fc classifier)
    # for an SE-ResNet-IBN-a.
    source = ibn_seresnet18()
    randomize_norms(source, seed=6)
    path = tmp_path / "se_resnet_ibn_a.pth"
    ibn_net_state = write_ibn_net_checkpoint(source, path)
    assert "layer1.0.se.fc.0.weight" in ibn_net_state
    # (timm rounds 64 / 16 up to 8 here; seresnet101's SE widths are all exactly C / 16.)
    assert ibn_net_state["layer1.0.se.fc.0.weight"].shape == (8, 64)

    target = ibn_seresnet18()
    load_backbone_weights(target, path)
    for key, value in target.state_dict().items():
        if re.search(r"\.se\.fc[12]\.bias$", key):
            assert torch.equal(value, torch.zeros_like(value)), key
        else:
            torch.testing.assert_close(value, source.state_dict()[key], rtol=0, atol=0, msg=key)


def test_skip_fc_keys_keeps_the_se_layers_own_init(tmp_path) -> None:
    # The authors' SE-ResNet101-IBN-a loader skips every key containing "fc": SE layers too.
    torch.manual_seed(1)
    source = ibn_seresnet18()
    randomize_norms(source, seed=6)
    path = tmp_path / "se_resnet_ibn_a.pth"
    write_ibn_net_checkpoint(source, path)

    torch.manual_seed(2)
    target = ibn_seresnet18()
    own_init = copy.deepcopy(target.state_dict())
    load_backbone_weights(target, path, skip_fc_keys=True)
    fc_keys = [key for key in own_init if "fc" in key]
    assert len(fc_keys) == 8 * 4  # se.fc1/fc2 weight and bias in each of the 8 blocks
    assert all(".se.fc" in key for key in fc_keys)
    for key, value in target.state_dict().items():
        expected = own_init[key] if key in fc_keys else source.state_dict()[key]
        torch.testing.assert_close(value, expected, rtol=0, atol=0, msg=key)
    # The file's SE weights were really left out (the two random inits differ).
    assert not torch.equal(target.layer1[0].se.fc1.weight, source.layer1[0].se.fc1.weight)


def test_skip_fc_keys_still_names_other_missing_keys(tmp_path) -> None:
    source = ibn_seresnet18()
    path = tmp_path / "se_resnet_ibn_a.pth"
    state = write_ibn_net_checkpoint(source, path)
    del state["layer4.1.conv2.weight"]
    torch.save(state, path)
    with pytest.raises(ValueError, match=re.escape("missing keys: ['layer4.1.conv2.weight']")):
        load_backbone_weights(ibn_seresnet18(), path, skip_fc_keys=True)


def test_skip_fc_keys_reaches_the_backbone_through_build_model(tmp_path) -> None:
    source, _ = create_backbone("seresnet18")
    randomize_norms(source, seed=7)
    path = tmp_path / "se_resnet.pth"
    write_ibn_net_checkpoint(source, path)

    torch.manual_seed(3)
    random_init = build_model("seresnet18", 4, embedding_dim=8)
    torch.manual_seed(3)
    skipped = build_model("seresnet18", 4, embedding_dim=8, pretrained_path=path,
                          skip_fc_keys=True)
    mapped = build_model("seresnet18", 4, embedding_dim=8, pretrained_path=path)
    for key, value in skipped.state_dict().items():
        if not key.startswith("backbone."):
            expected = random_init.state_dict()[key]  # the head is not part of the file
        elif "fc" in key:
            expected = random_init.state_dict()[key]  # the model's own initialization
        else:
            expected = source.state_dict()[key.removeprefix("backbone.")]
        torch.testing.assert_close(value, expected, rtol=0, atol=0, msg=key)
    # Without it, the SE weights are the file's (mapped from se.fc.0/2).
    torch.testing.assert_close(mapped.backbone.layer2[0].se.fc1.weight,
                               source.layer2[0].se.fc1.weight, rtol=0, atol=0)
    # Starting weights only: the architecture's config does not mention it.
    assert skipped.config == mapped.config == random_init.config
    assert "skip_fc_keys" not in skipped.config


def test_skip_fc_keys_refuses_timm_weights() -> None:
    # Raised before timm is asked for anything (no download).
    with pytest.raises(ValueError, match="skip_fc_keys"):
        create_backbone("resnet18", pretrained=True, skip_fc_keys=True)


# --- RetrievalNet ------------------------------------------------------------------------------


def small_model(num_classes: int = 5, embedding_dim: int = 8, arcface_subcenters: int = 1
                ) -> nn.Module:
    """A resnet10t RetrievalNet, seeded."""
    torch.manual_seed(0)
    return build_model("resnet10t", num_classes, embedding_dim=embedding_dim,
                       arcface_subcenters=arcface_subcenters)


def test_retrieval_net_structure() -> None:
    model = small_model(num_classes=5, embedding_dim=8)
    assert model.neck.bias is None
    assert model.neck.weight.shape == (8, 512)
    assert model.head.weight.shape == (5, 8)
    assert model.pool.p == 3.0
    assert torch.equal(model.bn.bias, torch.zeros(8))
    assert not model.bn.bias.requires_grad
    assert count_parameters(model.backbone) == RESNET10T_PARAMS
    assert count_parameters(model) == RESNET10T_PARAMS + 512 * 8 + 2 * 8 + 5 * 8
    assert count_parameters(model, trainable_only=True) == count_parameters(model) - 8
    # Xavier-uniform neck: |w| <= sqrt(6 / (fan_in + fan_out)).
    assert model.neck.weight.abs().max().item() <= math.sqrt(6.0 / (512 + 8))


def test_retrieval_net_forward_and_extract() -> None:
    model = small_model(num_classes=5, embedding_dim=8)
    images = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(7))
    labels = torch.tensor([0, 1, 4, 1])

    logits, features = model(images, labels)
    assert logits.shape == (4, 5)
    assert features.shape == (4, 8)
    torch.testing.assert_close(logits, model.head(features, labels))

    randomize_norms(model, seed=8)
    with torch.no_grad():
        model.bn.bias.zero_()
    model.eval()
    with torch.no_grad():
        features = model(images)
        descriptors = model.extract(images)
        feature_map = model.backbone(images)
    assert features.shape == (4, 8)
    # The head by hand in float64: GeM (p=3) -> x W^T -> eval-mode BN without shift.
    pooled = feature_map.double().clamp(min=1e-6).pow(3).mean(dim=(2, 3)).pow(1 / 3)
    projected = pooled @ model.neck.weight.double().T
    bn = model.bn
    expected = ((projected - bn.running_mean.double()) / (bn.running_var.double() + bn.eps).sqrt()
                * bn.weight.double())
    # Bound of the float32 head for any kernel: GeM is within gem_float32_rtol of each pooled
    # value; the neck's dot products of C terms add C*u * sum|w p|; eval-mode BN scales that
    # by |gamma| / sqrt(var + eps) and adds 4 roundings of its own.
    channels, positions = feature_map.shape[1], feature_map.shape[2] * feature_map.shape[3]
    magnitude = pooled @ model.neck.weight.double().abs().T
    scale = (bn.weight.double().abs() / (bn.running_var.double() + bn.eps).sqrt())
    bound = (scale * (channels * FLOAT32_U + gem_float32_rtol(positions)) * magnitude
             + 4 * FLOAT32_U * expected.abs())
    assert ((features.double() - expected).abs() <= bound).all()
    # Normalizing a row of D values: the norm is within (D/2 + 1)u, each component then u.
    dim = features.shape[1]
    torch.testing.assert_close(descriptors.norm(dim=1), torch.ones(4), rtol=0,
                               atol=(dim + 3) * FLOAT32_U)
    torch.testing.assert_close(descriptors.double(), F.normalize(features.double(), dim=1),
                               rtol=0, atol=(dim + 3) * FLOAT32_U)


def test_bn_bias_stays_zero_through_training_steps() -> None:
    model = small_model(num_classes=5, embedding_dim=8)
    optimizer = torch.optim.SGD(param_groups(model, lr=0.1, weight_decay=1e-3), momentum=0.9)
    images = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(9))
    labels = torch.tensor([0, 1, 2, 3])
    neck_before = model.neck.weight.detach().clone()
    bn_weight_before = model.bn.weight.detach().clone()
    for _ in range(2):
        optimizer.zero_grad()
        logits, _ = model(images, labels)
        F.cross_entropy(logits, labels).backward()
        assert model.bn.bias.grad is None
        assert model.bn.weight.grad.abs().sum() > 0
        optimizer.step()
    assert torch.equal(model.bn.bias, torch.zeros(8))
    assert not torch.equal(model.neck.weight, neck_before)
    assert not torch.equal(model.bn.weight, bn_weight_before)


def test_config_is_json_and_rebuilds_the_model() -> None:
    model = build_model("resnet10t", 7, embedding_dim=16, gem_p=3.0, arcface_s=30.0,
                        arcface_m=0.3)
    assert model.config == {"backbone": "resnet10t", "num_classes": 7, "embedding_dim": 16,
                            "gem_p": 3.0, "arcface_s": 30.0, "arcface_m": 0.3,
                            "arcface_subcenters": 1}
    # a config written before sub-centers existed rebuilds with one center per class
    older = {key: value for key, value in model.config.items() if key != "arcface_subcenters"}
    assert model_from_config(older).config == model.config
    rebuilt = model_from_config(json.loads(json.dumps(model.config)))
    assert rebuilt.config == model.config
    rebuilt.load_state_dict(model.state_dict())
    assert rebuilt.head.s == 30.0
    assert rebuilt.head.m == 0.3
    with pytest.raises(ValueError, match="pretrained"):
        model_from_config({**model.config, "pretrained": True})


# --- phase weights -----------------------------------------------------------------------------


def test_load_phase_weights_grows_the_classifier() -> None:
    old = small_model(num_classes=5, embedding_dim=8)
    old.train()
    with torch.no_grad():  # move the BN statistics away from their defaults
        old(torch.randn(4, 3, 64, 64))
    torch.manual_seed(1)
    new = build_model("resnet10t", 9, embedding_dim=8)
    fresh_head = new.head.weight.detach().clone()

    saved = {f"module.{key}": value for key, value in old.state_dict().items()}  # DDP-saved
    load_phase_weights(new, saved)

    new_state, old_state = new.state_dict(), old.state_dict()
    for key, value in old_state.items():
        if key != "head.weight":
            torch.testing.assert_close(new_state[key], value, rtol=0, atol=0, msg=key)
    assert new.head.weight.shape == (9, 8)
    torch.testing.assert_close(new.head.weight[:5], old.head.weight, rtol=0, atol=0)
    torch.testing.assert_close(new.head.weight[5:], fresh_head[5:], rtol=0, atol=0)


def test_load_phase_weights_refuses_shrinking_and_other_mismatches() -> None:
    big = small_model(num_classes=9, embedding_dim=8)
    small = small_model(num_classes=5, embedding_dim=8)
    with pytest.raises(ValueError, match=r"head\.weight"):
        load_phase_weights(small, big.state_dict())
    wider = small_model(num_classes=5, embedding_dim=16)
    with pytest.raises(ValueError, match=r"neck\.weight"):
        load_phase_weights(small, wider.state_dict())
    state = small.state_dict()
    del state["bn.running_mean"]
    with pytest.raises(ValueError, match=r"missing keys \['bn\.running_mean'\]"):
        load_phase_weights(small, state)


# --- optimizer groups --------------------------------------------------------------------------


def test_param_groups_double_the_bias_learning_rate() -> None:
    model = small_model(num_classes=5, embedding_dim=8)
    groups = param_groups(model, lr=0.01, weight_decay=1e-4)
    assert [group["lr"] for group in groups] == [0.01, 0.02]
    assert all(group["weight_decay"] == 1e-4 for group in groups)

    names = {id(p): name for name, p in model.named_parameters()}
    weight_names = [names[id(p)] for p in groups[0]["params"]]
    bias_names = [names[id(p)] for p in groups[1]["params"]]
    assert all(name.endswith(".bias") for name in bias_names)
    assert not any(name.endswith(".bias") for name in weight_names)
    assert "head.weight" in weight_names
    assert "neck.weight" in weight_names
    assert "bn.bias" not in bias_names
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert sorted(weight_names + bias_names) == sorted(trainable)
    assert len(set(weight_names + bias_names)) == len(trainable)


# --- any timm model as a backbone (the generic path) -------------------------------------------

# Small timm models outside the ResNet families, with their output channels (timm's
# num_features). vit_tiny_patch16_224 runs at 64x64: glr builds it with dynamic_img_size.
GENERIC_BACKBONES = [
    ("convnext_atto", 320),
    ("efficientnet_b0", 1280),
    ("regnetx_002", 368),
    ("vit_tiny_patch16_224", 192),
]


def generic_model(name: str, num_classes: int = 5, embedding_dim: int = 8) -> nn.Module:
    """A RetrievalNet on timm model `name`, random weights, seeded."""
    torch.manual_seed(0)
    return build_model(name, num_classes, embedding_dim=embedding_dim)


def tiny_images(batch: int = 2, seed: int = 11) -> torch.Tensor:
    return torch.randn(batch, 3, 64, 64, generator=torch.Generator().manual_seed(seed))


def gem_by_hand(values: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """GeM (p = 3, eps 1e-6) in float64 over `dims`."""
    return values.double().clamp(min=1e-6).pow(3).mean(dim=dims).pow(1 / 3)


@pytest.mark.parametrize(("name", "channels"), GENERIC_BACKBONES)
def test_any_timm_model_embeds_and_classifies(name: str, channels: int) -> None:
    model = generic_model(name)
    assert model.config["backbone"] == name
    assert model.backbone.num_features == channels
    assert model.neck.weight.shape == (8, channels)
    # The backbone's keys are timm's own, under "backbone."; the head's are the ResNet path's.
    timm_keys = timm.create_model(name, num_classes=0, global_pool="").state_dict().keys()
    keys = list(model.state_dict())
    assert [k.removeprefix("backbone.") for k in keys if k.startswith("backbone.")] == list(
        timm_keys)
    assert [k for k in keys if not k.startswith("backbone.")] == [
        "neck.weight", "bn.weight", "bn.bias", "bn.running_mean", "bn.running_var",
        "bn.num_batches_tracked", "head.weight"]

    images, labels = tiny_images(), torch.tensor([0, 4])
    logits, features = model(images, labels)
    assert logits.shape == (2, 5)
    assert features.shape == (2, 8)
    torch.testing.assert_close(logits, model.head(features, labels))
    model.eval()
    descriptors = model.extract(images)
    assert descriptors.shape == (2, 8)
    torch.testing.assert_close(descriptors.norm(dim=1), torch.ones(2), rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", ["convnext_atto", "vit_tiny_patch16_224"])
def test_any_timm_model_trains_channels_last(name: str) -> None:
    """SGD steps on one tiny batch lower the loss; every parameter gets a gradient (DDP needs
    that), biases sit in the 2x group, and channels_last works."""
    model = generic_model(name).to(memory_format=torch.channels_last)
    groups = param_groups(model, lr=0.01, weight_decay=1e-4)
    assert [group["lr"] for group in groups] == [0.01, 0.02]
    names = {id(p): n for n, p in model.named_parameters()}
    bias_names = [names[id(p)] for p in groups[1]["params"]]
    assert bias_names and all(n.endswith(".bias") for n in bias_names)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert sorted(names[id(p)] for group in groups for p in group["params"]) == sorted(trainable)

    optimizer = torch.optim.SGD(groups, momentum=0.9)
    images = tiny_images(batch=4, seed=12).contiguous(memory_format=torch.channels_last)
    labels = torch.tensor([0, 1, 2, 3])
    losses = []
    for step in range(4):
        optimizer.zero_grad()
        logits, _ = model(images, labels)
        loss = F.cross_entropy(logits, labels)
        loss.backward()
        if step == 0:
            assert [n for n, p in model.named_parameters()
                    if p.requires_grad and p.grad is None] == []
        optimizer.step()
        losses.append(loss.item())
    assert all(math.isfinite(loss) for loss in losses)
    assert losses[-1] < losses[0] - 0.1, losses
    assert torch.equal(model.bn.bias, torch.zeros(8))


@pytest.mark.parametrize("name", ["convnext_atto", "vit_tiny_patch16_224"])
def test_generic_model_round_trips_through_a_model_folder(name: str, tmp_path) -> None:
    from glr.model.folder import load_model, save_model

    model = generic_model(name, num_classes=7, embedding_dim=16)
    optimizer = torch.optim.SGD(param_groups(model, lr=0.01, weight_decay=0.0), momentum=0.9)
    labels = torch.tensor([0, 6])
    F.cross_entropy(model(tiny_images(seed=13), labels)[0], labels).backward()
    optimizer.step()  # weights and BN statistics away from any fresh init
    save_model(model, tmp_path / name, {"model": model.config})

    torch.manual_seed(1)  # the rebuilt model starts from other random weights
    loaded, config = load_model(tmp_path / name)
    assert config == {"model": model.config}
    model.eval()
    loaded.eval()
    images = tiny_images(seed=14)
    assert torch.equal(loaded.extract(images), model.extract(images))


def test_vit_pools_its_patch_tokens_with_gem() -> None:
    """A ViT gives tokens (B, 1 + 16, C) at 64x64: GeM over the 16 patch tokens, class token
    dropped."""
    model = generic_model("vit_tiny_patch16_224").eval()
    assert model.to_map.num_prefix_tokens == 1
    images = tiny_images()
    with torch.no_grad():
        tokens = model.backbone(images)
        pooled = model.pooled(images)
    assert tokens.shape == (2, 17, 192)
    torch.testing.assert_close(pooled.double(), gem_by_hand(tokens[:, 1:], (1,)),
                               rtol=1e-5, atol=1e-7)


def test_nhwc_backbone_output_is_permuted() -> None:
    """timm's MambaOut gives NHWC maps (output_fmt "NHWC"); GeM pools over H and W."""
    model = generic_model("mambaout_femto").eval()
    assert model.to_map.output_fmt == "NHWC"
    images = tiny_images()
    with torch.no_grad():
        feature_map = model.backbone(images)
        pooled = model.pooled(images)
    assert feature_map.shape == (2, 2, 2, model.to_map.channels)
    torch.testing.assert_close(pooled.double(), gem_by_hand(feature_map, (1, 2)),
                               rtol=1e-5, atol=1e-7)


def test_model_that_keeps_its_own_pooling_skips_gem() -> None:
    """Distilled DeiT cannot disable its pooling (the mean of the class and distillation
    tokens): its (B, C) output is the pooled feature as is."""
    model = generic_model("deit_tiny_distilled_patch16_224").eval()
    images = tiny_images()
    with torch.no_grad():
        output = model.backbone(images)
        assert output.shape == (2, 192)
        assert torch.equal(model.pooled(images), output)
        assert model.extract(images).shape == (2, 8)


def test_feature_map_reads_every_layout() -> None:
    from glr.model import FeatureMap

    nchw = torch.randn(2, 3, 4, 5)
    assert FeatureMap(3)(nchw) is nchw  # the ResNet path: unchanged
    assert torch.equal(FeatureMap(3, "NHWC")(nchw.permute(0, 2, 3, 1)), nchw)
    tokens = torch.randn(2, 2 + 6, 3)
    expected = tokens[:, 2:].transpose(1, 2).reshape(2, 3, 1, 6)
    assert torch.equal(FeatureMap(3, num_prefix_tokens=2)(tokens), expected)
    pooled = torch.randn(2, 3)
    assert FeatureMap(3)(pooled) is pooled
    with pytest.raises(RuntimeError, match=r"\(2, 4, 4, 5\) .* has 4 channels, not the 3"):
        FeatureMap(3)(torch.randn(2, 4, 4, 5))
    with pytest.raises(RuntimeError, match="expected a map"):
        FeatureMap(3)(torch.randn(2, 3, 4, 5, 6))
    with pytest.raises(ValueError, match="NLC"):
        FeatureMap(3, "NLC")


def test_unknown_backbone_is_a_params_error_with_close_matches() -> None:
    from glr.params import ParamsError, parse_params

    with pytest.raises(ParamsError) as error:
        build_model("convnext_tiy", 5)
    assert str(error.value).startswith(
        "model.backbones: unknown backbone 'convnext_tiy', neither in glr's table nor a timm "
        "model; close matches: convnext_tiny, ")
    with pytest.raises(ParamsError, match=r"close matches: seresnet101_ibn_a\b"):
        create_backbone("seresnet101_ibn")
    with pytest.raises(ParamsError, match=r"^model\.backbones\[1\]: unknown backbone "
                                          r"'ConvNeXt_Tiny', .*close matches: convnext_tiny\b"):
        parse_params({"model": {"pretrained": False, "backbones": ["resnet18", "ConvNeXt_Tiny"]}})
    with pytest.raises(ParamsError, match=r"close matches: .*convnext_tiny\.fb_in22k\b"):
        create_backbone("convnext_tiny.fb_in22")


def test_any_timm_name_passes_params() -> None:
    from glr.params import parse_params

    names = ["convnext_atto", "vit_tiny_patch16_224", "res2net50_26w_4s", "resnet18_ibn_a"]
    recipe = {}
    for name in names:
        recipe[f"{name}-p1"] = {"backbone": name, "phase": "p1", "init": "pretrained"}
    params = parse_params({"model": {"pretrained": False, "backbones": names},
                           "train": {"phases": {"p1": {}}, "recipe": recipe}})
    assert params.model.backbones == names


def timm_convnext_file(tmp_path, seed: int = 3) -> tuple[dict[str, torch.Tensor], object]:
    """A timm convnext_atto checkpoint with its ImageNet-style classifier (`head.fc`), wrapped
    and "module."-prefixed as DDP saves it; returns (the state dict, the file)."""
    torch.manual_seed(seed)
    state = timm.create_model("convnext_atto", num_classes=10).state_dict()
    assert "head.fc.weight" in state
    path = tmp_path / "convnext_atto.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    return state, path


def test_weights_file_loads_into_a_generic_backbone(tmp_path) -> None:
    state, path = timm_convnext_file(tmp_path)
    model = build_model("convnext_atto", 5, embedding_dim=8, pretrained_path=str(path))
    loaded = model.backbone.state_dict()
    assert set(loaded) == {k for k in state if not k.startswith("head.fc.")}
    for key, value in loaded.items():
        assert torch.equal(value, state[key]), key

    del state["stages.0.blocks.0.conv_dw.weight"]
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"missing keys: \['stages\.0\.blocks\.0\.conv_dw"):
        build_model("convnext_atto", 5, embedding_dim=8, pretrained_path=str(path))


def test_skip_fc_keys_with_a_generic_backbone(tmp_path) -> None:
    """ConvNeXt's MLPs are `mlp.fc1/fc2`: skip_fc_keys leaves them at the model's own init."""
    state, path = timm_convnext_file(tmp_path)
    torch.manual_seed(0)
    fresh = build_model("convnext_atto", 5, embedding_dim=8).backbone.state_dict()
    torch.manual_seed(0)
    model = build_model("convnext_atto", 5, embedding_dim=8, pretrained_path=str(path),
                        skip_fc_keys=True)
    loaded = model.backbone.state_dict()
    fc_keys = [key for key in loaded if "fc" in key]
    assert "stages.0.blocks.0.mlp.fc1.weight" in fc_keys
    for key, value in loaded.items():
        assert torch.equal(value, fresh[key] if "fc" in key else state[key]), key


def test_pretrained_generic_backbone_goes_through_timm(monkeypatch) -> None:
    """model.pretrained: timm loads its ImageNet weights into the generic model (the loader is
    stubbed here: nothing is downloaded)."""
    import timm.models._builder

    from glr.model import backbones

    calls = []

    def fake_load_pretrained(model, pretrained_cfg=None, num_classes=1000, **kwargs) -> None:
        calls.append((type(model).__name__, pretrained_cfg["architecture"], num_classes))
        with torch.no_grad():
            model.stem[0].weight.fill_(0.5)

    monkeypatch.setattr(backbones, "check_timm_weights", lambda backbone, timm_name: "a stub")
    monkeypatch.setattr(timm.models._builder, "load_pretrained", fake_load_pretrained)
    model = build_model("convnext_atto", 5, embedding_dim=8, pretrained=True)
    assert calls == [("ConvNeXt", "convnext_atto", 0)]
    assert torch.equal(model.backbone.stem[0].weight,
                       torch.full_like(model.backbone.stem[0].weight, 0.5))
