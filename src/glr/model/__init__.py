"""The retrieval model: timm backbones (IBN-a, last stride 1), GeM, BN neck and ArcFace."""

from glr.model.backbones import (
    BACKBONES,
    BackboneSpec,
    convert_ibn_a,
    create_backbone,
    load_backbone_weights,
    map_ibn_net_keys,
    set_last_stride_1,
)
from glr.model.build import (
    RetrievalNet,
    build_model,
    count_parameters,
    load_phase_weights,
    model_from_config,
    param_groups,
)
from glr.model.layers import IBN, ArcFace, GeM

__all__ = [
    "BACKBONES",
    "IBN",
    "ArcFace",
    "BackboneSpec",
    "GeM",
    "RetrievalNet",
    "build_model",
    "convert_ibn_a",
    "count_parameters",
    "create_backbone",
    "load_backbone_weights",
    "load_phase_weights",
    "map_ibn_net_keys",
    "model_from_config",
    "param_groups",
    "set_last_stride_1",
]
