"""Recipes: the training augmentation and the evaluation transform built from a config."""

from __future__ import annotations

import math
from typing import Sequence

from .base import BatchTransform, Compose, Normalize, Size, _pair
from .colour import ColorJitter
from .erasing import RandomErasing
from .geometric import (
    CenterCrop, RandomAffine, RandomHorizontalFlip, RandomResizedCrop, RandomVerticalFlip, Resize,
)
from .rand_augment import RandAugment, parse_rand_augment


# --------------------------------------------------------------------------- recipes
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def build_train_augment(
    image_size: Size,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    *,
    random_resized_crop: bool = True,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    hflip: float = 0.5,
    vflip: float = 0.0,
    rotate: float = 0.0,
    translate: float = 0.0,
    affine_scale: tuple[float, float] = (1.0, 1.0),
    color_jitter: float | Sequence[float] | None = 0.4,
    auto_augment: str | RandAugment | None = None,
    re_prob: float = 0.0,
    re_value: str | float = "random",
    normalize: bool = True,
    interpolation: str = "bilinear",
) -> Compose:
    """The timm/DeiT training pipeline on batches.

    ``RandomResizedCrop(image_size, scale, ratio)`` (or a plain resize) -> flips ->
    ``RandomAffine(rotate, translate, affine_scale)`` when any is set -> ``RandAugment`` when
    ``auto_augment`` is given, else ``ColorJitter(color_jitter)`` (as in timm, colour jitter is
    skipped under RandAugment) -> ``Normalize(mean, std)`` -> ``RandomErasing(re_prob)``.

    With ``normalize=False`` the pipeline stays on [0, 1] images (for a trainer that normalises
    afterwards with the same ``mean``/``std``) and random erasing draws noise that becomes
    ``N(0, 1)`` after that normalisation, so both orders give the same result.

    Recipes: DeiT: ``auto_augment="rand-m9-mstd0.5-inc1", re_prob=0.25``. Digits (8x8):
    ``random_resized_crop=False, hflip=0, rotate=10, translate=0.1, color_jitter=0`` (a mirrored
    2 is no 2, and a 0.08 crop of 8x8 pixels is noise).

    Args:
        image_size: Output size.
        mean, std: Normalisation (the dataset's ``mean``/``std``).
        random_resized_crop: Crop with ``scale``/``ratio``; False resizes to ``image_size``.
        scale, ratio: :class:`RandomResizedCrop` ranges.
        hflip, vflip: Flip probabilities.
        rotate, translate, affine_scale: :class:`RandomAffine` degrees, shift fraction, zoom range.
        color_jitter: Brightness = contrast = saturation strength (float), or 3/4 values
            (brightness, contrast, saturation[, hue]); 0/None: off.
        auto_augment: A timm RandAugment string (see :func:`parse_rand_augment`) or instance.
        re_prob: Random-erasing probability (0: off).
        re_value: Random-erasing fill.
        normalize: Include the ``Normalize`` step.
        interpolation: Crop resampling.
    """
    ops: list[BatchTransform] = []
    if random_resized_crop:
        ops.append(RandomResizedCrop(image_size, scale, ratio, interpolation))
    else:
        ops.append(Resize(_pair(image_size), interpolation))
    if hflip > 0:
        ops.append(RandomHorizontalFlip(hflip))
    if vflip > 0:
        ops.append(RandomVerticalFlip(vflip))
    if rotate > 0 or translate > 0 or tuple(affine_scale) != (1.0, 1.0):
        ops.append(RandomAffine(rotate, translate, affine_scale))
    if auto_augment:
        ops.append(parse_rand_augment(auto_augment) if isinstance(auto_augment, str) else auto_augment)
    elif color_jitter:
        cj = (float(color_jitter),) * 3 if isinstance(color_jitter, (int, float)) else tuple(color_jitter)
        if len(cj) not in (3, 4):
            raise ValueError(f"color_jitter needs 1, 3 or 4 values, got {color_jitter!r}")
        ops.append(ColorJitter(*cj))
    if normalize:
        ops.append(Normalize(mean, std))
    if re_prob > 0:
        ops.append(RandomErasing(re_prob, value=re_value, mean=None if normalize else mean,
                                 std=None if normalize else std))
    return Compose(ops)


def build_eval_transform(image_size: Size, mean: Sequence[float] = IMAGENET_MEAN,
                         std: Sequence[float] = IMAGENET_STD, crop_pct: float = 1.0,
                         interpolation: str = "bilinear") -> Compose:
    """Deterministic evaluation: resize to ``image_size / crop_pct`` (shorter side), center crop, normalise.

    ``crop_pct=1.0`` (default) keeps the whole (square) image; timm's ImageNet evaluation
    uses 0.875 - 0.9.
    """
    if not 0.0 < crop_pct <= 1.0:
        raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}")
    h, w = _pair(image_size)
    scaled: Size = int(math.floor(h / crop_pct)) if isinstance(image_size, int) else (
        int(math.floor(h / crop_pct)), int(math.floor(w / crop_pct)))
    return Compose([Resize(scaled, interpolation), CenterCrop((h, w)), Normalize(mean, std)])
