"""Geometry: affine sampling and crop-resize helpers, :class:`Resize`, :class:`CenterCrop`,
:class:`RandomResizedCrop`, the flips and :class:`RandomAffine`."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ..transforms import center_crop, resize
from .base import BatchTransform, Size, _GRID_MODES, _pair, _rand, _uniform


# --------------------------------------------------------------------------- geometry helpers
def _affine(x: Tensor, matrix: Tensor, shift: Tensor, fill: float, mode: str = "bilinear",
            out_size: tuple[int, int] | None = None) -> Tensor:
    """Sample ``x`` at ``matrix @ p + shift`` for every output pixel ``p`` (pixel units, centre origin).

    Args:
        x: (B, C, H, W).
        matrix: (B, 2, 2) output -> input map in pixel units, (x, y) order.
        shift: (B, 2) input offset in pixels, (x, y) order.
        fill: Value of pixels that come from outside the image.
    """
    b, c, h, w = x.shape
    oh, ow = out_size or (h, w)
    # pixel units -> grid_sample's normalised [-1, 1] coordinates (align_corners=False)
    d_out = torch.tensor([ow / 2.0, oh / 2.0], device=x.device, dtype=x.dtype)
    d_in = torch.tensor([w / 2.0, h / 2.0], device=x.device, dtype=x.dtype)
    theta = torch.cat([matrix * d_out.view(1, 1, 2) / d_in.view(1, 2, 1), (shift / d_in).unsqueeze(2)], dim=2)
    grid = F.affine_grid(theta, [b, c, oh, ow], align_corners=False)  # (B, oh, ow, 2)
    ones = torch.ones(b, 1, h, w, device=x.device, dtype=x.dtype)
    out = F.grid_sample(torch.cat([x, ones], 1), grid, mode=mode, padding_mode="zeros", align_corners=False)
    img, inside = out[:, :c], out[:, c:].clamp(0.0, 1.0)  # (B, C+1, oh, ow) -> image, coverage
    return img + (1.0 - inside) * fill


def _crop_resize(x: Tensor, top: Tensor, left: Tensor, h: Tensor, w: Tensor, size: tuple[int, int],
                 mode: str) -> Tensor:
    """Per-sample crop boxes (float pixels) resampled to ``size`` in one ``grid_sample``."""
    b, _, H, W = x.shape
    theta = torch.zeros(b, 2, 3, device=x.device, dtype=x.dtype)
    theta[:, 0, 0] = w / W
    theta[:, 1, 1] = h / H
    theta[:, 0, 2] = (2.0 * left + w) / W - 1.0
    theta[:, 1, 2] = (2.0 * top + h) / H - 1.0
    grid = F.affine_grid(theta, [b, x.shape[1], *size], align_corners=False)  # (B, h, w, 2)
    return F.grid_sample(x, grid, mode=mode, padding_mode="border", align_corners=False)


def _sample_boxes(shape: tuple[int, int], n: int, scale: tuple[float, float], ratio: tuple[float, float],
                  generator: torch.Generator | None, like: Tensor, attempts: int = 10) -> tuple[Tensor, Tensor, Tensor]:
    """(h, w, found) of boxes with area fraction in ``scale`` and aspect w/h in ``ratio`` (first of ``attempts``)."""
    H, W = shape
    area = H * W * _uniform(scale[0], scale[1], (n, attempts), generator, like)
    aspect = torch.exp(_uniform(math.log(ratio[0]), math.log(ratio[1]), (n, attempts), generator, like))
    w = torch.sqrt(area * aspect)
    h = torch.sqrt(area / aspect)
    ok = (w <= W) & (h <= H) & (w > 0) & (h > 0)
    first = ok.to(torch.uint8).argmax(1, keepdim=True)  # first valid attempt (0 when none)
    return h.gather(1, first).squeeze(1), w.gather(1, first).squeeze(1), ok.any(1)


class Resize(BatchTransform):
    """Resize to ``size``: an int sets the shorter side (aspect kept), a pair sets (h, w).

    Bicubic output is clipped to [0, 1], so use it before :class:`Normalize`.
    """

    def __init__(self, size: Size, interpolation: str = "bilinear") -> None:
        super().__init__()
        self.size, self.interpolation = size, interpolation

    def forward(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        return resize(x, self.size, self.interpolation)

    def extra_repr(self) -> str:
        return f"size={self.size}, interpolation={self.interpolation!r}"


class CenterCrop(BatchTransform):
    """Crop the central ``size`` (padding with zeros when the image is smaller)."""

    def __init__(self, size: Size) -> None:
        super().__init__()
        self.size = _pair(size)

    def forward(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        return center_crop(x, self.size)

    def extra_repr(self) -> str:
        return f"size={self.size}"


class RandomResizedCrop(BatchTransform):
    """Inception-style crop: a per-sample box with area fraction in ``scale`` and aspect in ``ratio``, resized to ``size``.

    Boxes are drawn as in torchvision (10 attempts, then a centre crop of the clamped aspect),
    with sub-pixel positions, and all crops are resampled in one ``grid_sample`` (no
    anti-aliasing: for strong down-scaling resize the images closer to ``size`` first).

    Args:
        size: Output size.
        scale: Range of the box area as a fraction of the image.
        ratio: Range of the box aspect ratio (w / h), sampled log-uniformly.
        interpolation: ``"bilinear"``, ``"nearest"`` or ``"bicubic"``.
    """

    def __init__(self, size: Size, scale: tuple[float, float] = (0.08, 1.0),
                 ratio: tuple[float, float] = (3 / 4, 4 / 3), interpolation: str = "bilinear") -> None:
        super().__init__()
        if not (0 < scale[0] <= scale[1] <= 1.0):
            raise ValueError(f"scale must satisfy 0 < min <= max <= 1, got {scale}")
        if not (0 < ratio[0] <= ratio[1]):
            raise ValueError(f"ratio must satisfy 0 < min <= max, got {ratio}")
        if interpolation not in _GRID_MODES:
            raise ValueError(f"interpolation must be one of {', '.join(_GRID_MODES)}, got {interpolation!r}")
        self.size, self.scale, self.ratio, self.interpolation = _pair(size), tuple(scale), tuple(ratio), interpolation

    def forward(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        B, _, H, W = x.shape
        h, w, found = _sample_boxes((H, W), B, self.scale, self.ratio, generator, x)
        # fallback (no attempt fitted): the whole image, aspect clamped into ``ratio``
        in_ratio = W / H
        fw, fh = float(W), float(H)
        if in_ratio < self.ratio[0]:
            fh = W / self.ratio[0]
        elif in_ratio > self.ratio[1]:
            fw = H * self.ratio[1]
        h = torch.where(found, h, torch.full_like(h, fh))
        w = torch.where(found, w, torch.full_like(w, fw))
        u = _rand((B, 2), generator, x)
        top = torch.where(found, u[:, 0] * (H - h), (H - h) / 2)
        left = torch.where(found, u[:, 1] * (W - w), (W - w) / 2)
        return _crop_resize(x, top, left, h, w, self.size, self.interpolation)

    def extra_repr(self) -> str:
        return f"size={self.size}, scale={self.scale}, ratio={tuple(round(r, 4) for r in self.ratio)}"


class _RandomFlip(BatchTransform):
    dim = -1

    def __init__(self, p: float = 0.5) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        flip = (_rand((x.shape[0],), generator, x) < self.p).view(-1, 1, 1, 1)
        return torch.where(flip, x.flip(self.dim), x)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class RandomHorizontalFlip(_RandomFlip):
    """Mirror each sample left-right with probability ``p``."""

    dim = -1


class RandomVerticalFlip(_RandomFlip):
    """Flip each sample upside down with probability ``p``."""

    dim = -2


class RandomAffine(BatchTransform):
    """Random rotation, translation and scaling per sample, about the image centre.

    Args:
        degrees: Rotation drawn from ``[-degrees, degrees]``.
        translate: Largest shift as a fraction of width and height (float, or (fx, fy)).
        scale: Range of the zoom factor (> 1 enlarges).
        shear: Largest x-shear factor, drawn from ``[-shear, shear]``.
        fill: Value of pixels moved in from outside.
        p: Probability a sample is transformed.
        interpolation: ``"bilinear"`` or ``"nearest"``.
    """

    def __init__(self, degrees: float = 0.0, translate: float | tuple[float, float] = 0.0,
                 scale: tuple[float, float] = (1.0, 1.0), shear: float = 0.0, fill: float = 0.0, p: float = 1.0,
                 interpolation: str = "bilinear") -> None:
        super().__init__()
        tx, ty = (translate, translate) if isinstance(translate, (int, float)) else translate
        if degrees < 0 or tx < 0 or ty < 0 or shear < 0 or not 0 < scale[0] <= scale[1]:
            raise ValueError("degrees, translate and shear must be >= 0 and scale a range 0 < min <= max")
        self.degrees, self.translate, self.scale = float(degrees), (float(tx), float(ty)), tuple(scale)
        self.shear, self.fill, self.p, self.interpolation = float(shear), float(fill), p, interpolation

    def forward(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        B, _, H, W = x.shape
        r = _rand((6, B), generator, x)
        on = r[5] < self.p
        angle = torch.deg2rad(self.degrees * (2 * r[0] - 1)) * on
        zoom = torch.where(on, self.scale[0] + (self.scale[1] - self.scale[0]) * r[1], torch.ones_like(r[1]))
        shear = self.shear * (2 * r[4] - 1) * on
        cos, sin = torch.cos(angle), torch.sin(angle)
        # output -> input: rotate by -angle, shear, shrink by the zoom
        m = torch.stack([torch.stack([cos, -sin + shear * cos], -1), torch.stack([sin, cos + shear * sin], -1)], -2)
        m = m / zoom.view(-1, 1, 1)  # (B, 2, 2)
        shift = torch.stack([self.translate[0] * W * (2 * r[2] - 1), self.translate[1] * H * (2 * r[3] - 1)], -1)
        return _affine(x, m, shift * on.view(-1, 1), self.fill, self.interpolation)

    def extra_repr(self) -> str:
        return f"degrees={self.degrees}, translate={self.translate}, scale={self.scale}, shear={self.shear}"
