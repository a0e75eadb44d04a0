"""The per-sample half of the data pipeline: what runs in DataLoader workers.

Real photos come in every size, so they cannot be stacked into a batch as decoded. Each
sample is therefore brought to the training size in the worker that decodes it, the way
timm's ``transforms_imagenet_train`` / ``transforms_imagenet_eval`` do:

* training: :class:`RandomResizedCropSample` (a random crop of ``scale`` x area with aspect
  ratio in ``ratio``, resized to ``size`` x ``size`` with ``interpolation``);
* evaluation: :class:`ResizeCenterCropSample` (shorter side to ``floor(size / crop_pct)``,
  center crop ``size``), the exact operations of :class:`vitlab.datasets.EvalTransform`, so a
  checkpoint's recorded preprocessing reproduces what validation saw.

The batched augmentation (flips, RandAugment, mixup, normalisation, erasing) then runs on
the device (:mod:`vitlab.datasets.augment`). Datasets whose images all have one size
(digits, CIFAR, synthetic) need no per-sample step: their batches are resized on the
device when the training size differs.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import Tensor
from torch.utils.data import Dataset

from .transforms import center_crop, resize

#: Datasets whose images all share one size (no per-sample resize needed).
FIXED_SIZE_DATASETS: tuple[str, ...] = ("digits", "cifar10", "cifar100", "synthetic")


def dataset_kind(name: str | os.PathLike) -> str:
    """``"digits"``, ``"digit_scenes"``, ``"cifar"``, ``"synthetic"`` or ``"folder"`` (ImageNet trees and image folders).

    ``shards:PATH`` has the kind of its source (its manifest's ``kind``: digits shards are ``"digits"``).
    """
    key = str(name).lower()
    if key.startswith("shards:"):
        from .shards import shard_kind

        return shard_kind(str(name)[len("shards:"):])
    if key in ("digits", "digit_scenes"):
        return key
    if key in ("cifar10", "cifar100"):
        return "cifar"
    if key == "synthetic":
        return "synthetic"
    return "folder"


def dataset_label(name: str | os.PathLike) -> str:
    """A short name for run directories: the dataset name, or an image folder's base name."""
    key = str(name)
    if key.lower().startswith("shards:"):
        base = Path(key[len("shards:"):].rstrip("/\\")).name or "shards"
        return "shards-" + "".join(c if c.isalnum() or c in "-_." else "_" for c in base)
    if dataset_kind(key) != "folder" or key.lower() == "imagenet":
        return key.lower()
    base = Path(key.rstrip("/\\")).name or "folder"
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in base)


class RandomResizedCropSample:
    """timm's ``RandomResizedCropAndInterpolation`` on one (C, H, W) image in [0, 1].

    A crop of ``scale`` (fraction of the area) and aspect ratio in ``ratio`` (sampled
    log-uniformly) is taken at a random position (10 attempts; then the largest center crop
    with the ratio clamped into ``ratio``) and resized to ``size`` x ``size``.

    Args:
        size: Output side in pixels.
        scale: Range of the crop's area as a fraction of the image's.
        ratio: Range of the crop's aspect ratio (width / height).
        interpolation: ``"bicubic"``, ``"bilinear"``, ``"nearest"`` or ``"area"``.
        generator: Optional RNG; the global torch RNG (seeded per DataLoader worker) otherwise.
    """

    def __init__(self, size: int, scale: Sequence[float] = (0.08, 1.0), ratio: Sequence[float] = (3 / 4, 4 / 3),
                 interpolation: str = "bicubic", generator: torch.Generator | None = None) -> None:
        if not (0 < scale[0] <= scale[1] <= 1):
            raise ValueError(f"scale must satisfy 0 < min <= max <= 1, got {tuple(scale)}")
        if not (0 < ratio[0] <= ratio[1]):
            raise ValueError(f"ratio must satisfy 0 < min <= max, got {tuple(ratio)}")
        self.size = int(size)
        self.scale = (float(scale[0]), float(scale[1]))
        self.ratio = (float(ratio[0]), float(ratio[1]))
        self.interpolation = interpolation
        self.generator = generator

    def _uniform(self, lo: float, hi: float) -> float:
        return lo + (hi - lo) * float(torch.rand((), generator=self.generator))

    def _randint(self, hi: int) -> int:
        """Uniform integer in [0, hi]."""
        return int(torch.randint(0, hi + 1, (), generator=self.generator))

    def get_params(self, height: int, width: int) -> tuple[int, int, int, int]:
        """A crop box ``(top, left, h, w)`` for an image of ``height`` x ``width``."""
        area = height * width
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            target_area = area * self._uniform(*self.scale)
            aspect = math.exp(self._uniform(*log_ratio))
            w = int(round(math.sqrt(target_area * aspect)))
            h = int(round(math.sqrt(target_area / aspect)))
            if 0 < w <= width and 0 < h <= height:
                return self._randint(height - h), self._randint(width - w), h, w
        in_ratio = width / height  # fallback: a center crop with the ratio clamped
        if in_ratio < self.ratio[0]:
            w, h = width, int(round(width / self.ratio[0]))
        elif in_ratio > self.ratio[1]:
            h, w = height, int(round(height * self.ratio[1]))
        else:
            w, h = width, height
        h, w = max(1, min(h, height)), max(1, min(w, width))
        return (height - h) // 2, (width - w) // 2, h, w

    def __call__(self, x: Tensor) -> Tensor:
        """(C, H, W) -> (C, size, size)."""
        top, left, h, w = self.get_params(int(x.shape[-2]), int(x.shape[-1]))
        crop = x[:, top : top + h, left : left + w].unsqueeze(0)  # (C, h, w) -> (1, C, h, w)
        out = resize(crop, (self.size, self.size), self.interpolation)
        return out.squeeze(0).clamp_(0.0, 1.0).contiguous()  # (1, C, S, S) -> (C, S, S)

    def __repr__(self) -> str:
        return (f"RandomResizedCropSample(size={self.size}, scale={self.scale}, ratio={self.ratio}, "
                f"interpolation={self.interpolation!r})")


class ResizeCenterCropSample:
    """Evaluation preprocessing of one (C, H, W) image in [0, 1]: the shorter side resized to
    ``floor(size / crop_pct)``, then a center crop of ``size`` x ``size``.

    The same operations as :class:`vitlab.datasets.EvalTransform` (without the normalisation,
    which runs on the device).

    Args:
        size: Output side in pixels.
        crop_pct: Fraction of the resized image kept by the crop (1.0: resize only).
        interpolation: Resize mode.
    """

    def __init__(self, size: int, crop_pct: float = 0.875, interpolation: str = "bicubic") -> None:
        if not 0.0 < crop_pct <= 1.0:
            raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}")
        self.size = int(size)
        self.crop_pct = float(crop_pct)
        self.interpolation = interpolation

    def __call__(self, x: Tensor) -> Tensor:
        """(C, H, W) -> (C, size, size)."""
        scale = int(math.floor(self.size / self.crop_pct))
        x = x.unsqueeze(0)  # (C, H, W) -> (1, C, H, W)
        x = center_crop(resize(x, scale, self.interpolation), self.size)
        return x.squeeze(0).contiguous()  # (1, C, S, S) -> (C, S, S)

    def __repr__(self) -> str:
        return f"ResizeCenterCropSample(size={self.size}, crop_pct={self.crop_pct}, interpolation={self.interpolation!r})"


def preprocessing_record(image_size: int, mean: Sequence[float], std: Sequence[float], crop_pct: float,
                         interpolation: str) -> dict[str, Any]:
    """The ``pretrained_cfg`` keys a checkpoint carries so that predict/eval repeat its preprocessing."""
    return {"input_size": int(image_size), "mean": tuple(float(m) for m in mean),
            "std": tuple(float(s) for s in std), "crop_pct": float(crop_pct), "interpolation": str(interpolation)}


class Resized(Dataset):
    """A dataset with a per-sample transform applied to its images; keeps its metadata."""

    def __init__(self, dataset: Any, transform: Callable[[Tensor], Tensor]) -> None:
        self.dataset, self.transform = dataset, transform
        for attr in ("classes", "num_classes", "mean", "std", "targets"):
            if hasattr(dataset, attr):
                setattr(self, attr, getattr(dataset, attr))

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        x, y = self.dataset[index]
        return self.transform(x), y
