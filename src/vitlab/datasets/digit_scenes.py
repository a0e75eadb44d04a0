"""Digit scenes: canvases holding several real scikit-learn digits, for detection and segmentation.

Every scene is drawn from one split of the 1,797 digits, the same seeded, stratified
train/val/test split :class:`~vitlab.datasets.digits.DigitsDataset` uses; so a test scene
holds only test digits and no digit image is ever both trained on and evaluated on.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from .digits import SPLITS, _load_digits, stratified_split


def render_digit(digit: np.ndarray | Tensor, size: int, ink_threshold: float = 0.1) -> np.ndarray:
    """One 8x8 digit scaled to ``size x size`` pixels, as it is pasted into a scene.

    Bilinear resize (``align_corners=False``, no antialias), values below ``ink_threshold``
    set to 0, the rest rounded to multiples of 1/255 (so a scene saved as 8-bit PNG reads
    back identical). The digit's *ink* is exactly its non-zero pixels.

    Args:
        digit: The digit ``(8, 8)`` in ``[0, 1]``.
        size: Output side in pixels (>= 8).
        ink_threshold: Values below it are background.

    Returns:
        ``(size, size)`` float32 in ``[0, 1]``.
    """
    x = torch.as_tensor(np.asarray(digit, dtype=np.float32)).reshape(1, 1, 8, 8)  # (8, 8) -> (1, 1, 8, 8)
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)[0, 0].numpy()
    x = np.where(x < ink_threshold, 0.0, x)
    return (np.round(np.clip(x, 0.0, 1.0) * 255.0) / 255.0).astype(np.float32)


def _iou_one_to_many(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    lt = np.maximum(box[:2], boxes[:, :2])
    rb = np.minimum(box[2:], boxes[:, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=1)
    area = lambda b: (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])  # noqa: E731
    return inter / (area(box) + area(boxes) - inter)


class DigitScenes(Dataset):
    """Seeded scenes of 1 to N scikit-learn digits on a black canvas, with boxes and masks.

    Scene ``i`` of a split depends only on ``(seed, split, i)`` and the arguments, so it is
    the same on every call, in every process and in any order. A scene holds
    ``randint(min_digits, max_digits)`` digits, each a random digit image of the split, scaled
    to a random side in ``digit_size`` (:func:`render_digit`) and placed at a random position
    where its box overlaps every earlier box by an IoU of at most ``max_overlap`` (a digit that
    finds no such place in ``max_tries`` draws is left out; the first always fits). The
    canvas is the pixel-wise maximum of the digits and, with ``clutter > 0``, of that many
    short random strokes under them (background in every mask).

    A sample is a dict:

    - ``image``: ``(1, H, W)`` float32 in ``[0, 1]`` (multiples of 1/255);
    - ``boxes``: ``(n, 4)`` float32 xyxy pixels, tight around each digit's ink
      (``x1``/``y1`` are one past the last ink column/row);
    - ``labels``: ``(n,)`` int64 digit classes 0..9;
    - ``instance_masks``: ``(n, H, W)`` bool, each digit's whole ink (also where a later
      digit covers it);
    - ``semantic_mask``: ``(H, W)`` int64, 0 for background and ``d + 1`` for digit ``d``;
      where digits overlap, the one with the brighter ink there (the later on ties);
    - ``digit_indices``: ``(n,)`` int64, the source images among the 1,797 digits;
    - ``image_id``: ``i``.

    Args:
        split: ``"train"``, ``"val"`` or ``"test"``: which digits the scenes use.
        num_scenes: Number of scenes.
        canvas_size: Canvas side, or ``(height, width)``.
        min_digits: Fewest digits per scene (>= 1).
        max_digits: Most digits per scene.
        digit_size: ``(smallest, largest)`` side of a pasted digit in pixels.
        max_overlap: Largest IoU between two digits' boxes (0: boxes never overlap).
        clutter: Number of background strokes per scene.
        seed: Seed of the scenes.
        split_seed: Seed of the digit split (as ``DigitsDataset(seed=...)``).
        val_fraction: Fraction of each class in val (as ``DigitsDataset``).
        test_fraction: Fraction of each class in test (as ``DigitsDataset``).
        ink_threshold: See :func:`render_digit`.
        max_tries: Placement draws per digit.
    """

    num_classes = 10
    classes = [str(d) for d in range(10)]

    def __init__(
        self,
        split: str = "train",
        num_scenes: int = 1000,
        canvas_size: int | tuple[int, int] = 64,
        min_digits: int = 1,
        max_digits: int = 4,
        digit_size: tuple[int, int] = (12, 28),
        max_overlap: float = 0.1,
        clutter: int = 0,
        seed: int = 0,
        split_seed: int = 0,
        val_fraction: float = 0.1,
        test_fraction: float = 0.2,
        ink_threshold: float = 0.1,
        max_tries: int = 50,
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"unknown digit scenes split {split!r}; choose one of {', '.join(SPLITS)}")
        h, w = (canvas_size, canvas_size) if isinstance(canvas_size, int) else tuple(canvas_size)
        lo, hi = digit_size
        if not 8 <= lo <= hi <= min(h, w):
            raise ValueError(f"digit_size {tuple(digit_size)} must satisfy 8 <= smallest <= largest <= canvas side {min(h, w)}")
        if not 1 <= min_digits <= max_digits:
            raise ValueError(f"need 1 <= min_digits <= max_digits, got {min_digits} and {max_digits}")
        if not 0.0 <= max_overlap <= 1.0:
            raise ValueError(f"max_overlap must lie in [0, 1], got {max_overlap}")
        if num_scenes < 0 or clutter < 0 or max_tries < 1:
            raise ValueError(
                f"num_scenes and clutter must be >= 0 and max_tries >= 1, got {num_scenes}, {clutter}, {max_tries}"
            )
        images, labels = _load_digits()
        parts = stratified_split(labels, (0.0, val_fraction, test_fraction), split_seed)
        self.split = split
        self.pool: np.ndarray = dict(zip(SPLITS, parts))[split]  # indices into the 1,797 digits
        self._digits = images[:, 0]  # (N, 1, 8, 8) -> (N, 8, 8)
        self._labels = labels
        self.num_scenes = num_scenes
        self.canvas_size = (int(h), int(w))
        self.min_digits, self.max_digits = min_digits, max_digits
        self.digit_size = (int(lo), int(hi))
        self.max_overlap = float(max_overlap)
        self.clutter = clutter
        self.seed = seed
        self.ink_threshold = ink_threshold
        self.max_tries = max_tries

    def __len__(self) -> int:
        return self.num_scenes

    def __repr__(self) -> str:
        return (
            f"DigitScenes(split={self.split!r}, num_scenes={self.num_scenes}, canvas_size={self.canvas_size}, "
            f"digits={self.min_digits}..{self.max_digits}, seed={self.seed})"
        )

    def _clutter(self, rng: np.random.Generator, canvas: np.ndarray) -> None:
        h, w = canvas.shape
        for _ in range(self.clutter):
            y0, x0 = rng.uniform(0, h - 1), rng.uniform(0, w - 1)
            angle, length = rng.uniform(0, np.pi), rng.uniform(3, 8)
            value = np.round(rng.uniform(0.3, 0.6) * 255) / 255
            t = np.linspace(0.0, length, int(np.ceil(length)) * 2 + 1)
            ys = np.clip(np.round(y0 + t * np.sin(angle)), 0, h - 1).astype(int)
            xs = np.clip(np.round(x0 + t * np.cos(angle)), 0, w - 1).astype(int)
            canvas[ys, xs] = np.maximum(canvas[ys, xs], value)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < self.num_scenes:
            raise IndexError(f"scene {index} out of range for {self.num_scenes} scenes")
        rng = np.random.default_rng([self.seed, SPLITS.index(self.split), index])
        h, w = self.canvas_size
        canvas = np.zeros((h, w), dtype=np.float32)
        if self.clutter:
            self._clutter(rng, canvas)
        n = int(rng.integers(self.min_digits, self.max_digits + 1))
        layers: list[np.ndarray] = []  # (H, W) each: one digit on an empty canvas
        boxes: list[np.ndarray] = []
        sources: list[int] = []
        for _ in range(n):
            src = int(self.pool[rng.integers(len(self.pool))])
            size = int(rng.integers(self.digit_size[0], self.digit_size[1] + 1))
            glyph = render_digit(self._digits[src], size, self.ink_threshold)
            rows, cols = np.flatnonzero(glyph.any(1)), np.flatnonzero(glyph.any(0))
            ink = np.array([cols[0], rows[0], cols[-1] + 1, rows[-1] + 1], dtype=np.float32)  # xyxy in the glyph
            for _ in range(self.max_tries):
                y, x = int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1))
                box = ink + np.array([x, y, x, y], dtype=np.float32)
                if not boxes or _iou_one_to_many(box, np.stack(boxes)).max() <= self.max_overlap:
                    layer = np.zeros((h, w), dtype=np.float32)
                    layer[y : y + size, x : x + size] = glyph
                    layers.append(layer)
                    boxes.append(box)
                    sources.append(src)
                    break
        stack = np.stack(layers)  # (n, H, W)
        image = np.maximum(canvas, stack.max(0))
        instance_masks = stack > 0
        # the brightest digit at each pixel, the later one on ties: argmax of the reversed stack
        top = len(layers) - 1 - np.argmax(stack[::-1], axis=0)  # (H, W)
        labels = self._labels[sources].astype(np.int64)
        semantic = np.where(instance_masks.any(0), labels[top] + 1, 0)
        return {
            "image": torch.from_numpy(image)[None],  # (H, W) -> (1, H, W)
            "boxes": torch.from_numpy(np.stack(boxes)),
            "labels": torch.from_numpy(labels),
            "instance_masks": torch.from_numpy(instance_masks),
            "semantic_mask": torch.from_numpy(semantic.astype(np.int64)),
            "digit_indices": torch.tensor(sources, dtype=torch.int64),
            "image_id": index,
        }


__all__ = ["DigitScenes", "render_digit"]
