"""The backbone table: names glr knows without asking timm (IBN-a conversions, recipes).

Kept apart from `glr.model.backbones` and free of torch imports, so that `glr.params` can
check backbone names in milliseconds when params load; the checks of names outside the table
(`backbone_problem`, `has_timm_weights`) import timm when they first run.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BackboneSpec:
    """How to build one backbone: the timm architecture and whether to convert it to IBN-a."""

    timm_name: str
    ibn_a: bool = False
    # Release file of the IBN-Net ImageNet weights for this architecture, for `pretrained_path`.
    ibn_net_checkpoint: str | None = None
    # Whether timm has ImageNet weights for `timm_name` (model.pretrained without weights_dir);
    # tests/test_params.py checks it against timm.
    timm_weights: bool = True


# The names glr knows without asking timm. What the table adds to timm is the IBN-a variants
# (`*_ibn_a`), which timm lacks; the plain entries are timm names listed here only so that params
# naming them load without importing timm, and build exactly what the timm name builds. Any other
# timm model name works too (`BackboneSpec(name)`, see glr.model.backbones).
BACKBONES: dict[str, BackboneSpec] = {
    # Small models for the CPU demo and tests.
    "resnet10t": BackboneSpec("resnet10t"),
    "resnet18": BackboneSpec("resnet18"),
    "resnet34": BackboneSpec("resnet34"),
    "resnet18_ibn_a": BackboneSpec("resnet18", ibn_a=True,
                                   ibn_net_checkpoint="resnet18_ibn_a-2f571257.pth"),
    # The embedded default: ImageNet weights from a pip package (model.pretrained_source
    # package, glr.model.packaged); timm itself has weights for lite0 only.
    "efficientnet_lite0": BackboneSpec("efficientnet_lite0"),
    "efficientnet_lite1": BackboneSpec("efficientnet_lite1", timm_weights=False),
    "efficientnet_lite2": BackboneSpec("efficientnet_lite2", timm_weights=False),
    # Quick recipe.
    "resnet50": BackboneSpec("resnet50"),
    # torchvision's ImageNet weights (the authors' quick recipe), timm's tag for them
    "resnet50.tv_in1k": BackboneSpec("resnet50.tv_in1k"),
    "resnet50_ibn_a": BackboneSpec("resnet50", ibn_a=True,
                                   ibn_net_checkpoint="resnet50_ibn_a-d9d0bb7b.pth"),
    # The solution's ensemble.
    "resnest101e": BackboneSpec("resnest101e"),
    "resnest269e": BackboneSpec("resnest269e"),
    "seresnet101_ibn_a": BackboneSpec("seresnet101", ibn_a=True,
                                      ibn_net_checkpoint="se_resnet101_ibn_a-fabed4e2.pth",
                                      timm_weights=False),
    "resnext101_32x4d_ibn_a": BackboneSpec("resnext101_32x4d", ibn_a=True,
                                           ibn_net_checkpoint="resnext101_ibn_a-6ace051d.pth"),
}


# --------------------------------------------------------------------------- name checks
# timm takes seconds to import: each check imports it on first use, so that params naming only
# table entries load without it.


def timm_family(name: str) -> str | None:
    """The module of timm's entrypoint for `name` (a pretrained tag is allowed), or None when
    timm has no such model."""
    import timm

    if not timm.is_model(name):
        return None
    return timm.models.model_entrypoint(name).__module__


def backbone_problem(name: str) -> str | None:
    """Why `name` is not a backbone glr can build (None when it is), naming close matches.

    Every name of glr's table and every timm model name is a backbone; for anything else the
    close matches come from the table and `timm.list_models()` (with pretrained tags when the
    name has a tag), compared case-insensitively (timm's names are lower case).
    """
    if name in BACKBONES or is_timm_name(name):
        return None
    import difflib

    import timm

    candidates = [*BACKBONES, *timm.list_models()]
    if "." in name:
        candidates += timm.list_models(pretrained=True)
    candidates = list(dict.fromkeys(candidates))
    close = difflib.get_close_matches(name.lower(), candidates, n=5, cutoff=0.6)
    hint = (f"close matches: {', '.join(close)}" if close
            else f"timm.list_models() lists timm's names; glr's table: {', '.join(BACKBONES)}")
    return f"unknown backbone {name!r}, neither in glr's table nor a timm model; {hint}"


def is_timm_name(name: str) -> bool:
    """Whether timm builds `name`: a timm architecture, with a pretrained tag timm knows if it
    has one (`timm.is_model` checks the architecture only)."""
    import timm

    if not timm.is_model(name):
        return False
    if "." not in name:
        return True
    try:
        return timm.models.get_pretrained_cfg(name, allow_unregistered=False) is not None
    except RuntimeError:  # "Invalid pretrained tag"
        return False


def has_timm_weights(timm_name: str) -> bool:
    """Whether timm has ImageNet weights for `timm_name` (no network involved)."""
    from timm.models import is_model_pretrained

    return is_model_pretrained(timm_name)
