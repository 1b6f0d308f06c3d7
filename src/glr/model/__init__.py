"""The retrieval model: any timm backbone (IBN-a, last stride 1 for ResNets), GeM, BN neck and
ArcFace.

The names below are imported on first use (PEP 562), so that `glr.model.table`, which
`glr.params` reads, can be imported without torch and timm.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "BACKBONES": "glr.model.table",
    "BackboneSpec": "glr.model.table",
    "convert_ibn_a": "glr.model.backbones",
    "create_backbone": "glr.model.backbones",
    "UnknownBackboneError": "glr.model.backbones",
    "load_backbone_weights": "glr.model.backbones",
    "map_ibn_net_keys": "glr.model.backbones",
    "set_last_stride_1": "glr.model.backbones",
    "RetrievalNet": "glr.model.build",
    "build_model": "glr.model.build",
    "count_parameters": "glr.model.build",
    "load_phase_weights": "glr.model.build",
    "model_from_config": "glr.model.build",
    "param_groups": "glr.model.build",
    "IBN": "glr.model.layers",
    "FeatureMap": "glr.model.layers",
    "ArcFace": "glr.model.layers",
    "GeM": "glr.model.layers",
    "dynamic_margins": "glr.model.layers",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return __all__
