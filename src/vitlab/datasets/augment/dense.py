"""Geometric augmentation that moves boxes and masks with the image (detection, segmentation).

Built on :class:`kornia.augmentation.AugmentationSequential`, which carries boxes and masks
through the same sampled transforms as the image. vitlab adds what a training engine needs
around it:

- **Seeded from the engine's generator.** kornia draws from the global RNG; each call here
  draws one seed from the given ``torch.Generator`` and runs kornia inside
  :func:`torch.random.fork_rng` seeded with it, so the same generator state gives the same
  augmentation (exact resume) and the global RNG is left untouched.
- **Continuous box coordinates.** Boxes are COCO-style continuous pixel coordinates
  (width = x2 - x1); kornia's ``xyxy`` has inclusive corners, so they are shifted on the
  way in and out (a flip maps x to W - x exactly).
- **Variable box counts.** Boxes come as one ``(n_i, 4)`` tensor per image (xyxy, pixels);
  they are padded for kornia, clipped to the output image afterwards, and a box whose visible
  area falls below ``min_box_area`` (or whose visible part is less than ``min_visible`` of its
  transformed area) is dropped; ``keep`` says which, so the caller drops the labels too.
- **Semantic masks** ``(B, H, W)`` of class ids move with nearest resampling; pixels that the
  transform brings in from outside the image get ``fill_label`` (the ignore index), not
  class 0.

Needs ``kornia`` (a dependency of vitlab).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor


@dataclass
class DenseSample:
    """An augmented batch.

    Attributes:
        images: (B, C, size, size).
        boxes: One (m_i, 4) xyxy tensor in output pixels per image (boxes that survived).
        keep: One (n_i,) bool tensor per image: which input boxes survived (index labels with it).
        masks: (B, size, size) long class ids, or None.
    """

    images: Tensor
    boxes: list[Tensor] | None
    keep: list[Tensor] | None
    masks: Tensor | None


class DenseAugment:
    """Random resized crop (scale jitter), horizontal flip and affine on images + boxes + masks.

    Args:
        size: Output side in pixels (square).
        scale: Crop area range of the random resized crop, as a fraction of the image.
        ratio: Crop aspect-ratio range.
        hflip: Probability of a horizontal flip.
        degrees: Rotation range of the affine (0 switches the affine off).
        translate: Fractional translation range of the affine.
        affine_p: Probability of applying the affine.
        min_box_area: Boxes whose clipped area (pixels^2) is below this are dropped.
        min_visible: Boxes keeping less than this fraction of their (unclipped) area are dropped.
        fill_label: Mask value for pixels brought in from outside the image.
    """

    def __init__(self, size: int, scale: tuple[float, float] = (0.5, 1.0), ratio: tuple[float, float] = (0.75, 4 / 3),
                 hflip: float = 0.5, degrees: float = 0.0, translate: tuple[float, float] = (0.0, 0.0),
                 affine_p: float = 0.5, min_box_area: float = 4.0, min_visible: float = 0.3,
                 fill_label: int = 255) -> None:
        try:
            import kornia.augmentation as K
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError("box- and mask-aware augmentation needs kornia (a vitlab dependency): pip install kornia") from e
        if size < 1:
            raise ValueError(f"size must be a positive number of pixels, got {size}")
        if not (0 < scale[0] <= scale[1] <= 1):
            raise ValueError(f"scale must be a range inside (0, 1], got {scale}")
        self.size, self.min_box_area, self.min_visible, self.fill_label = size, min_box_area, min_visible, fill_label
        ops = [K.RandomResizedCrop((size, size), scale=scale, ratio=ratio, p=1.0),
               K.RandomHorizontalFlip(p=hflip)]
        if degrees > 0 or any(t > 0 for t in translate):
            ops.append(K.RandomAffine(degrees=degrees, translate=translate, p=affine_p))
        self.ops = ops
        self._K = K

    def _pipeline(self, keys: list[str]):
        return self._K.AugmentationSequential(*self.ops, data_keys=keys)

    def __call__(self, images: Tensor, boxes: Sequence[Tensor] | None = None, masks: Tensor | None = None,
                 generator: torch.Generator | None = None) -> DenseSample:
        """Augment a batch.

        Args:
            images: (B, C, H, W) float.
            boxes: Per image an (n_i, 4) xyxy box tensor in input pixels, or None.
            masks: (B, H, W) integer class ids, or None.
            generator: Source of randomness (the global RNG when None).

        Raises:
            ValueError: Inputs whose shapes do not fit together.
        """
        if images.ndim != 4:
            raise ValueError(f"images must be (B, C, H, W), got shape {tuple(images.shape)}")
        b, _, h, w = images.shape
        if boxes is not None and len(boxes) != b:
            raise ValueError(f"expected one box tensor per image ({b}), got {len(boxes)}")
        if masks is not None and tuple(masks.shape) != (b, h, w):
            raise ValueError(f"masks must be (B, H, W) = {(b, h, w)}, got {tuple(masks.shape)}")
        keys, args = ["input"], [images]
        n_max = 0
        if boxes is not None:
            n_max = max([len(t) for t in boxes] + [1])
            padded = images.new_tensor([0.0, 0.0, 1.0, 1.0]).repeat(b, n_max, 1)  # (B, N, 4) xyxy; unit boxes pad
            for i, t in enumerate(boxes):
                if t.ndim != 2 or t.shape[-1] != 4:
                    raise ValueError(f"boxes of image {i} must be (n, 4) xyxy, got shape {tuple(t.shape)}")
                padded[i, : len(t)] = t.to(padded)
            # kornia's xyxy has inclusive corners (width = x2 - x1 + 1); ours are continuous (COCO)
            padded[..., 2:] = torch.maximum(padded[..., 2:] - 1, padded[..., :2])  # (kornia refuses width < 1)
            keys.append("bbox_xyxy")
            args.append(padded)
        if masks is not None:
            # (B, H, W) ids -> (B, 2, H, W) float: ids and a validity plane (1 inside the image)
            keys.append("mask")
            args.append(torch.stack([masks.to(images.dtype), torch.ones_like(masks, dtype=images.dtype)], 1))
        seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device if generator else None))
        devices = [images.device] if images.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            out = self._pipeline(keys)(*args)
        out = list(out) if isinstance(out, (list, tuple)) else [out]
        result = DenseSample(out[0], None, None, None)
        k = 1
        if boxes is not None:
            moved = out[k].reshape(b, n_max, 4).clone()
            moved[..., 2:] += 1  # back from kornia's inclusive corners
            k += 1
            result.boxes, result.keep = [], []
            for i, t in enumerate(boxes):
                bx = moved[i, : len(t)]
                area = (bx[:, 2] - bx[:, 0]).clamp(min=0) * (bx[:, 3] - bx[:, 1]).clamp(min=0)
                clipped = torch.stack([bx[:, 0].clamp(0, self.size), bx[:, 1].clamp(0, self.size),
                                       bx[:, 2].clamp(0, self.size), bx[:, 3].clamp(0, self.size)], 1)
                c_area = (clipped[:, 2] - clipped[:, 0]) * (clipped[:, 3] - clipped[:, 1])
                keep = (c_area >= self.min_box_area) & (c_area >= self.min_visible * area.clamp(min=1e-6))
                result.boxes.append(clipped[keep])
                result.keep.append(keep)
        if masks is not None:
            m = out[k]
            ids = m[:, 0].round().long()  # (B, size, size)
            ids[m[:, 1] < 0.5] = self.fill_label
            result.masks = ids
        return result


__all__ = ["DenseAugment", "DenseSample"]
