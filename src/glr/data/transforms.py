"""Image transforms of method.md, fast: decode with JPEG draft mode, augment on uint8.

Training: square resize, horizontal flip (p=0.5), pad + random crop, random erasing (p=1.0,
area 2-20%, aspect 0.3-1/0.3, up to 100 tries) — all on uint8 CHW tensors; the float
normalization (mean (0.485, 0.456, 0.406), std 0.2235) runs once per batch in the model step,
on the device. Random erasing's fill 0 is applied after normalization in the recipe, i.e. the
mean pixel; on uint8 we fill with the mean pixel (124, 116, 104), which normalizes to within
0.006 of 0.
"""

from __future__ import annotations

import functools
import io
import math
import random
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

MEAN = (0.485, 0.456, 0.406)
STD = (0.2235, 0.2235, 0.2235)
MEAN_PIXEL = tuple(round(m * 255) for m in MEAN)


def decode_resized(data: bytes, size: int) -> torch.Tensor:
    """JPEG bytes → uint8 tensor (3, size, size); aspect not kept, as in the recipe.

    Draft mode lets libjpeg decode at 1/2, 1/4 or 1/8 scale when the result still covers
    size × size, which is most of the cost saved on large photos.
    """
    with Image.open(io.BytesIO(data)) as image:
        image.draft("RGB", (size, size))
        image.load()
        if image.mode != "RGB":  # grey or CMYK JPEGs
            image = image.convert("RGB")
        if image.size != (size, size):
            image = image.resize((size, size), Image.Resampling.BILINEAR)
        array = np.array(image)  # writable copy: torch tensors must own writable memory
    return torch.from_numpy(array).permute(2, 0, 1)


def hflip(image: torch.Tensor, rng: random.Random, p: float = 0.5) -> torch.Tensor:
    """Mirror left-right with probability p."""
    return image.flip(-1) if rng.random() < p else image


def pad_random_crop(image: torch.Tensor, pad: int, rng: random.Random) -> torch.Tensor:
    """Pad by `pad` zeros on every side, then crop back to the input size at a random place."""
    if pad <= 0:
        return image
    _, height, width = image.shape
    dy, dx = rng.randint(-pad, pad), rng.randint(-pad, pad)  # crop offset minus pad
    if dy == dx == 0:
        return image
    out = torch.empty_like(image)
    src_y, dst_y = max(0, dy), max(0, -dy)
    src_x, dst_x = max(0, dx), max(0, -dx)
    h, w = height - abs(dy), width - abs(dx)
    out[:, dst_y: dst_y + h, dst_x: dst_x + w] = image[:, src_y: src_y + h, src_x: src_x + w]
    # zero only the uncovered border strips
    out[:, :dst_y].zero_()
    out[:, dst_y + h:].zero_()
    out[:, :, :dst_x].zero_()
    out[:, :, dst_x + w:].zero_()
    return out


def random_erasing(image: torch.Tensor, rng: random.Random, p: float = 1.0,
                   scale: tuple[float, float] = (0.02, 0.2),
                   ratio: tuple[float, float] = (0.3, 1 / 0.3),
                   fill: tuple[int, ...] = MEAN_PIXEL, attempts: int = 100) -> torch.Tensor:
    """Erase one random rectangle in place, with the sampling of the recipe's RandomErasing
    (Zhong et al.'s, as in the re-ID codebases; not torchvision's).

    With probability p (skipped when a uniform draw is >= p), up to `attempts` tries of:
    area = uniform(scale) · H·W, aspect = uniform(ratio) (uniform, not log-uniform),
    h = round(√(area·aspect)) rows, w = round(√(area/aspect)) columns (Python's round, as the
    authors' int(round(·))); the first box with h < H and w < W (strict) is placed at
    top = randint(0, H − h), left = randint(0, W − w) and filled. When no try fits, the image
    is left as it is. The draws come from `rng` in that order: 1 + 2 per try + 2 for the place.
    """
    if rng.uniform(0, 1) >= p:
        return image
    _, height, width = image.shape
    area = height * width
    for _ in range(attempts):
        erase_area = rng.uniform(*scale) * area
        aspect = rng.uniform(*ratio)
        h = round(math.sqrt(erase_area * aspect))
        w = round(math.sqrt(erase_area / aspect))
        if w < width and h < height:
            top, left = rng.randint(0, height - h), rng.randint(0, width - w)
            image[:, top: top + h, left: left + w] = torch.tensor(
                fill, dtype=image.dtype).view(-1, 1, 1)
            return image
    return image


@functools.cache
def _normalize_constants(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(1/(255·std), mean/std) as (1, 3, 1, 1) float32 tensors on `device`, made once per
    device: a tensor built from a list on a GPU is a blocking host-to-device copy, which would
    make the host wait for the previous training step on every batch."""
    with torch.inference_mode(False):  # plain tensors, whether first asked for in extraction
        scale = torch.tensor([1 / (255 * s) for s in STD]).view(1, 3, 1, 1)
        shift = torch.tensor([m / s for m, s in zip(MEAN, STD, strict=True)]).view(1, 3, 1, 1)
        return scale.to(device), shift.to(device)


def normalize(batch: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 (B, 3, H, W) → float32 normalized with the recipe's mean and std, batched.

    (x/255 − mean)/std as x·a − b: one conversion, then two in-place passes (faster on the CPU
    than a fused addcmul with broadcast factors). `out`, a float32 buffer of the same shape,
    saves the allocation (and its page faults) on the CPU.
    """
    scale, shift = _normalize_constants(batch.device)
    if out is None:
        out = batch.float()
    else:
        out.copy_(batch)
    return out.mul_(scale).sub_(shift)


@dataclass(frozen=True)
class TrainTransform:
    """The recipe's training augmentation on JPEG bytes, up to (not including) normalization."""

    size: int
    pad: int
    flip_p: float = 0.5
    erase_p: float = 1.0

    def __call__(self, data: bytes, rng: random.Random) -> torch.Tensor:
        image = decode_resized(data, self.size)
        image = hflip(image, rng, self.flip_p)
        image = pad_random_crop(image, self.pad, rng)
        return random_erasing(image, rng, self.erase_p)


@dataclass(frozen=True)
class EvalTransform:
    """Extraction: square resize only."""

    size: int

    def __call__(self, data: bytes, rng: random.Random | None = None) -> torch.Tensor:
        return decode_resized(data, self.size)
