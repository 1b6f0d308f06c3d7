"""One loader for training and extraction: webdataset pipelines, transforms, mixing."""

from glr.data.loader import ExtractStream, TrainStream, mix, share, stream_seed
from glr.data.transforms import (
    EvalTransform,
    TrainTransform,
    decode_resized,
    hflip,
    normalize,
    pad_random_crop,
    random_erasing,
)

__all__ = [
    "EvalTransform",
    "ExtractStream",
    "TrainStream",
    "TrainTransform",
    "decode_resized",
    "hflip",
    "mix",
    "normalize",
    "pad_random_crop",
    "random_erasing",
    "share",
    "stream_seed",
]
