"""scikit-learn's handwritten digits (1,797 real 8x8 images) with a fixed, seeded, stratified split.

The default dataset of vitlab: small enough to train a tiny ViT on a laptop CPU in seconds, and
real data rather than noise. The images come with scikit-learn (no download).
"""

from __future__ import annotations

import functools
from typing import Callable, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

SPLITS = ("train", "val", "test")


def stratified_split(
    labels: Sequence[int] | np.ndarray, fractions: Sequence[float], seed: int = 0
) -> list[np.ndarray]:
    """Split indices into disjoint, class-stratified parts.

    Within every class the indices are shuffled with ``numpy.random.default_rng(seed)`` and cut
    into parts of ``round(n_class * fraction)`` for every fraction after the first; the first
    part takes the rest. So the parts cover every index exactly once, keep the class
    proportions (to within one sample per class) and depend only on ``seed``.

    Args:
        labels: Integer class label per sample.
        fractions: Fraction per part; the first part's fraction is implied (the remainder).
        seed: Seed of the shuffle.

    Returns:
        One sorted index array per part.
    """
    labels = np.asarray(labels)
    if any(f < 0 for f in fractions[1:]) or sum(fractions[1:]) >= 1.0:
        raise ValueError(f"split fractions {list(fractions[1:])} must be >= 0 and sum to less than 1")
    rng = np.random.default_rng(seed)
    parts: list[list[np.ndarray]] = [[] for _ in fractions]
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        sizes = [int(round(len(idx) * f)) for f in fractions[1:]]
        start = len(idx) - sum(sizes)
        parts[0].append(idx[:start])
        for k, size in enumerate(sizes, start=1):
            parts[k].append(idx[start : start + size])
            start += size
    return [np.sort(np.concatenate(p)) if p else np.zeros(0, dtype=np.int64) for p in parts]


@functools.lru_cache(maxsize=1)
def _load_digits() -> tuple[np.ndarray, np.ndarray]:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise ImportError(
            "the digits dataset comes with scikit-learn: pip install 'vitlab[digits]' (scikit-learn)"
        ) from None
    d = load_digits()
    images = (d.images.astype(np.float32) / 16.0)[:, None]  # (N, 8, 8) -> (N, 1, 8, 8), 0..16 -> [0, 1]
    return images, d.target.astype(np.int64)


class DigitsDataset(Dataset):
    """The scikit-learn digits: (1, 8, 8) float images in [0, 1] and int labels 0..9.

    The 1,797 images are split per class with :func:`stratified_split`: ``test_fraction`` and
    ``val_fraction`` of every class go to test and val, the rest to train. The three splits are
    disjoint, cover all images and are the same for the same ``seed``.

    ``mean``/``std`` are the pixel statistics of the *train* split of the same seed (one
    channel, about 0.305 / 0.376), also on the val and test splits, so evaluation is normalised
    exactly like training and no statistic leaks from the held-out images.

    Args:
        split: ``"train"``, ``"val"`` or ``"test"``.
        seed: Seed of the split.
        val_fraction: Fraction of each class for validation.
        test_fraction: Fraction of each class for test.
        transform: Optional callable applied to each (1, 8, 8) image tensor.
    """

    def __init__(
        self,
        split: str = "train",
        seed: int = 0,
        val_fraction: float = 0.1,
        test_fraction: float = 0.2,
        transform: Callable[[Tensor], Tensor] | None = None,
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"unknown digits split {split!r}; choose one of {', '.join(SPLITS)}")
        images, labels = _load_digits()
        train_idx, val_idx, test_idx = stratified_split(labels, (0.0, val_fraction, test_fraction), seed)
        idx = {"train": train_idx, "val": val_idx, "test": test_idx}[split]
        self.split = split
        self.seed = seed
        self.indices = idx
        self.images = torch.from_numpy(images[idx])  # (n, 1, 8, 8)
        self.targets: list[int] = labels[idx].tolist()
        self.transform = transform
        self.classes = [str(i) for i in range(10)]
        self.num_classes = 10
        train = images[train_idx]
        self.mean: tuple[float, ...] = (float(train.mean()),)
        self.std: tuple[float, ...] = (float(train.std()),)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        x = self.images[index]
        if self.transform is not None:
            x = self.transform(x)
        return x, self.targets[index]

    def __repr__(self) -> str:
        return f"DigitsDataset(split={self.split!r}, seed={self.seed}, n={len(self)})"
