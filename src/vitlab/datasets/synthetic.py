"""A deterministic, learnable synthetic image dataset for quick tests and benchmarks."""

from __future__ import annotations

import zlib
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset


class SyntheticDataset(Dataset):
    """Class prototypes plus noise: sample ``i`` has label ``i % num_classes``.

    Every class has a smooth random pattern (a 4x4 grid of random colours, bilinearly
    upsampled) drawn from ``seed``; a sample is its class pattern plus Gaussian noise of std
    ``noise``, clipped to [0, 1]. The noise of sample ``i`` is drawn from a generator seeded by
    ``(seed, split, i)``, so the dataset is the same on every run and every worker, and splits
    share the class patterns but not the samples. A small model learns it in a few steps.

    Args:
        num_samples: Length of the dataset.
        num_classes: Number of classes.
        image_size: Side (int) or ``(h, w)``.
        channels: Image channels.
        seed: Seed of the class patterns and of the noise.
        split: Name mixed into the noise seed (``"train"``, ``"val"``, ...).
        noise: Std of the per-pixel noise.
        transform: Optional callable applied to each (C, H, W) tensor.
    """

    def __init__(
        self,
        num_samples: int,
        num_classes: int,
        image_size: int | tuple[int, int],
        channels: int = 3,
        seed: int = 0,
        split: str = "train",
        noise: float = 0.1,
        transform: Callable[[Tensor], Tensor] | None = None,
    ) -> None:
        if num_samples < 1 or num_classes < 1 or channels < 1:
            raise ValueError(
                f"num_samples, num_classes and channels must be >= 1, got {num_samples}, {num_classes}, {channels}"
            )
        h, w = (image_size, image_size) if isinstance(image_size, int) else (int(image_size[0]), int(image_size[1]))
        self.num_samples = num_samples
        self.num_classes = num_classes
        self.image_size = (h, w)
        self.channels = channels
        self.seed = seed
        self.split = split
        self.noise = noise
        self.transform = transform
        g = torch.Generator().manual_seed(seed)
        grid = torch.rand(num_classes, channels, 4, 4, generator=g) * 0.8 + 0.1
        # (K, C, 4, 4) -> (K, C, H, W)
        self.prototypes = F.interpolate(grid, size=(h, w), mode="bilinear", align_corners=False)
        self._noise_seed = (seed * 1_000_003 + zlib.crc32(split.encode())) % (2**62)
        self.classes = [f"class_{i}" for i in range(num_classes)]
        self.targets = [i % num_classes for i in range(num_samples)]
        self.mean: tuple[float, ...] = (0.5,) * channels
        self.std: tuple[float, ...] = (0.25,) * channels

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        if not -self.num_samples <= index < self.num_samples:
            raise IndexError(f"index {index} out of range for {self.num_samples} samples")
        index %= self.num_samples
        y = self.targets[index]
        g = torch.Generator().manual_seed(self._noise_seed + index)
        x = (self.prototypes[y] + self.noise * torch.randn(self.prototypes.shape[1:], generator=g)).clamp_(0.0, 1.0)
        if self.transform is not None:
            x = self.transform(x)
        return x, y

    def __repr__(self) -> str:
        return (f"SyntheticDataset(num_samples={self.num_samples}, num_classes={self.num_classes}, "
                f"image_size={self.image_size}, channels={self.channels}, split={self.split!r})")
