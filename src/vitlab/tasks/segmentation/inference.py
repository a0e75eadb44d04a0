"""Segmentation inference at any size: whole image, sliding window, multi-scale + flip TTA.

Every function takes a model mapping images (B, C, h, w) to logits (B, K, h', w') (any
output stride; logits are resized bilinearly to what was fed) and returns logits
(B, K, H, W) at the input resolution.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

Model = Callable[[Tensor], Tensor]


def _resize(x: Tensor, size: Sequence[int]) -> Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


def _check_images(x: Tensor) -> None:
    if x.ndim != 4:
        raise ValueError(f"expected images (B, C, H, W), got shape {tuple(x.shape)}")


@torch.no_grad()
def predict_whole(model: Model, images: Tensor) -> Tensor:
    """The whole image in one pass: (B, C, H, W) -> logits (B, K, H, W)."""
    _check_images(images)
    return _resize(model(images), images.shape[-2:])


def _starts(length: int, window: int, stride: int) -> list[int]:
    if length <= window:
        return [0]
    starts = list(range(0, length - window, stride)) + [length - window]
    return sorted(set(starts))


@torch.no_grad()
def predict_sliding(model: Model, images: Tensor, window: int | tuple[int, int],
                    stride: int | tuple[int, int]) -> Tensor:
    """Overlapping windows, their logits averaged where they overlap.

    Windows of ``window`` pixels step by ``stride``; the last window of a row or column is
    moved back to end at the border, so every pixel is covered and no window leaves the
    image. A side smaller than the window is fed as it is (one window on that side).

    Args:
        model: Images -> logits.
        images: (B, C, H, W).
        window: Window (h, w) or its side; usually the training size.
        stride: Step (h, w) or its side; ``stride < window`` gives overlap.

    Returns:
        Logits (B, K, H, W).
    """
    _check_images(images)
    wh, ww = (window, window) if isinstance(window, int) else window
    sh, sw = (stride, stride) if isinstance(stride, int) else stride
    if min(wh, ww, sh, sw) <= 0:
        raise ValueError(f"window and stride must be positive, got window={window}, stride={stride}")
    b, _, h, w = images.shape
    total: Tensor | None = None
    count = torch.zeros(1, 1, h, w, device=images.device, dtype=images.dtype)
    for y in _starts(h, wh, sh):
        for x in _starts(w, ww, sw):
            crop = images[:, :, y : y + wh, x : x + ww]
            logits = _resize(model(crop), crop.shape[-2:])
            if total is None:
                total = images.new_zeros(b, logits.shape[1], h, w)
            total[:, :, y : y + crop.shape[-2], x : x + crop.shape[-1]] += logits
            count[:, :, y : y + crop.shape[-2], x : x + crop.shape[-1]] += 1
    assert total is not None
    return total / count


@torch.no_grad()
def predict_tta(model: Model, images: Tensor, scales: Sequence[float] = (1.0,), flip: bool = True,
                window: int | tuple[int, int] | None = None, stride: int | tuple[int, int] | None = None) -> Tensor:
    """Multi-scale and horizontal-flip test-time augmentation.

    For each scale the image is resized (bilinear), predicted (whole image, or sliding
    windows when ``window`` is given), and, with ``flip``, predicted again mirrored left-right
    and mirrored back; the softmax-free logits are resized to the input size and averaged.

    Args:
        model: Images -> logits.
        images: (B, C, H, W).
        scales: Resize factors.
        flip: Add the mirrored pass of every scale.
        window: Sliding-window size (None: whole image).
        stride: Sliding-window step (default: two thirds of the window).

    Returns:
        Logits (B, K, H, W), the mean over the 1-2 x len(scales) passes.
    """
    _check_images(images)
    if not scales:
        raise ValueError("give at least one scale")
    h, w = images.shape[-2:]

    def run(x: Tensor) -> Tensor:
        if window is None:
            return predict_whole(model, x)
        st = stride if stride is not None else (max(1, (window if isinstance(window, int) else min(window)) * 2 // 3))
        return predict_sliding(model, x, window, st)

    out: Tensor | None = None
    n = 0
    for s in scales:
        if s <= 0:
            raise ValueError(f"scales must be positive, got {s}")
        size = (max(1, round(h * s)), max(1, round(w * s)))
        x = _resize(images, size)
        passes = [run(x)]
        if flip:
            passes.append(run(x.flip(-1)).flip(-1))  # mirror back before averaging
        for p in passes:
            p = _resize(p, (h, w))
            out = p if out is None else out + p
            n += 1
    assert out is not None
    return out / n
