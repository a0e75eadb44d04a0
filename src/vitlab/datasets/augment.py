"""Batched, seedable data augmentation on float image tensors (B, C, H, W) in [0, 1].

Every transform is an ``nn.Module`` called as ``t(x, generator=None)``: all its random numbers
come from ``generator`` (a ``torch.Generator``; the global RNG when None) and each call draws a
fixed number of them, so the same seed gives the same output on every run. Randomness is per
sample (every image gets its own crop, flip, jitter, ops ...). Plain torch, so the ops run on the
batch's device (CPU or GPU) after collation.

Typical use (what :func:`build_train_augment` returns)::

    aug = Compose([RandomResizedCrop(224), RandomHorizontalFlip(), RandAugment(2, 9),
                   Normalize(mean, std), RandomErasing(0.25)])
    x = aug(batch, generator=torch.Generator(device=batch.device).manual_seed(step))
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .transforms import center_crop, normalize, resize

__all__ = [
    "BatchTransform", "CenterCrop", "ColorJitter", "Compose", "Normalize", "RAND_AUGMENT_OPS", "RandAugment",
    "RandomAffine", "RandomErasing", "RandomHorizontalFlip", "RandomResizedCrop", "RandomVerticalFlip", "Resize",
    "build_eval_transform", "build_train_augment", "parse_rand_augment",
]

Size = int | tuple[int, int]
_GRID_MODES = ("bilinear", "nearest", "bicubic")


# --------------------------------------------------------------------------- random numbers
def _gen_device(generator: torch.Generator | None) -> torch.device:
    return generator.device if generator is not None else torch.device("cpu")


def _rand(shape: Sequence[int], generator: torch.Generator | None, like: Tensor) -> Tensor:
    """Uniform [0, 1) of ``shape`` from ``generator``, on ``like``'s device and dtype."""
    r = torch.rand(tuple(shape), generator=generator, device=_gen_device(generator))
    return r.to(device=like.device, dtype=like.dtype if like.is_floating_point() else torch.float32)


def _uniform(lo: float, hi: float, shape: Sequence[int], generator: torch.Generator | None, like: Tensor) -> Tensor:
    return lo + (hi - lo) * _rand(shape, generator, like)


def _randn(shape: Sequence[int], generator: torch.Generator | None, like: Tensor) -> Tensor:
    r = torch.randn(tuple(shape), generator=generator, device=_gen_device(generator))
    return r.to(device=like.device, dtype=like.dtype)


def _randint(high: int, shape: Sequence[int], generator: torch.Generator | None, device: torch.device) -> Tensor:
    return torch.randint(high, tuple(shape), generator=generator, device=_gen_device(generator)).to(device)


def _pair(size: Size) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    if len(size) != 2:
        raise ValueError(f"size must be an int or (height, width), got {size!r}")
    return int(size[0]), int(size[1])


# --------------------------------------------------------------------------- colour helpers
def _gray(x: Tensor) -> Tensor:
    """Luma (B, 1, H, W) of RGB (ITU-R 601, as PIL); grey images are returned as they are."""
    if x.shape[1] == 3:
        r, g, b = x.unbind(1)
        return (0.299 * r + 0.587 * g + 0.114 * b).unsqueeze(1)  # (B, H, W) -> (B, 1, H, W)
    return x.mean(1, keepdim=True) if x.shape[1] != 1 else x


def _blend(x: Tensor, degenerate: Tensor, factor: Tensor) -> Tensor:
    """PIL ImageEnhance: ``degenerate + factor * (x - degenerate)`` per sample, clipped to [0, 1]."""
    f = factor.view(-1, 1, 1, 1)
    return (degenerate + f * (x - degenerate)).clamp(0.0, 1.0)


def rgb_to_hsv(x: Tensor) -> Tensor:
    """(B, 3, H, W) RGB in [0, 1] -> HSV, every channel in [0, 1]."""
    r, g, b = x.unbind(1)
    maxc, minc = x.amax(1), x.amin(1)
    eqc = maxc == minc
    cr = maxc - minc
    ones = torch.ones_like(maxc)
    s = cr / torch.where(eqc, ones, maxc)
    crd = torch.where(eqc, ones, cr)
    rc, gc, bc = (maxc - r) / crd, (maxc - g) / crd, (maxc - b) / crd
    hr = (maxc == r) * (bc - gc)
    hg = ((maxc == g) & (maxc != r)) * (2.0 + rc - bc)
    hb = ((maxc != g) & (maxc != r)) * (4.0 + gc - rc)
    h = torch.fmod((hr + hg + hb) / 6.0 + 1.0, 1.0)
    return torch.stack((h, s, maxc), dim=1)  # 3 x (B, H, W) -> (B, 3, H, W)


def hsv_to_rgb(x: Tensor) -> Tensor:
    """(B, 3, H, W) HSV in [0, 1] -> RGB in [0, 1]."""
    h, s, v = x.unbind(1)
    i = torch.floor(h * 6.0)
    f = h * 6.0 - i
    i = i.to(torch.int64) % 6
    p = (v * (1.0 - s)).clamp(0.0, 1.0)
    q = (v * (1.0 - s * f)).clamp(0.0, 1.0)
    t = (v * (1.0 - s * (1.0 - f))).clamp(0.0, 1.0)
    mask = (i.unsqueeze(1) == torch.arange(6, device=x.device).view(1, -1, 1, 1)).to(x.dtype)  # (B, 6, H, W)
    a1 = torch.stack((v, q, p, p, t, v), dim=1)
    a2 = torch.stack((t, v, v, q, p, p), dim=1)
    a3 = torch.stack((p, p, t, v, v, q), dim=1)
    a = torch.stack((a1, a2, a3), dim=1)  # (B, 3, 6, H, W)
    return (mask.unsqueeze(1) * a).sum(2)  # (B, 3, 6, H, W) -> (B, 3, H, W)


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


# --------------------------------------------------------------------------- transforms
class BatchTransform(nn.Module):
    """Base class: ``t(x, generator=None)`` on a float batch (B, C, H, W) (a single (C, H, W) also works)."""

    def __call__(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:  # type: ignore[override]
        if not isinstance(x, Tensor) or not x.is_floating_point() or x.ndim not in (3, 4):
            got = f"{x.dtype} tensor of shape {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"{type(self).__name__} expects a float image batch (B, C, H, W), got a {got}")
        single = x.ndim == 3
        out = super().__call__(x.unsqueeze(0) if single else x, generator=generator)
        return out.squeeze(0) if single else out

    def forward(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        raise NotImplementedError


class Compose(BatchTransform):
    """Apply transforms in order; :class:`BatchTransform` s get the generator, other callables just ``x``."""

    def __init__(self, transforms: Sequence[Callable[..., Tensor]]) -> None:
        super().__init__()
        self.transforms = list(transforms)
        for i, t in enumerate(self.transforms):
            if isinstance(t, nn.Module):
                self.add_module(str(i), t)

    def forward(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        for t in self.transforms:
            x = t(x, generator=generator) if isinstance(t, BatchTransform) else t(x)
        return x

    def extra_repr(self) -> str:
        return "" if all(isinstance(t, nn.Module) for t in self.transforms) else repr(self.transforms)


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


def _jitter_range(value: float | tuple[float, float], name: str, center: float = 1.0) -> tuple[float, float]:
    if isinstance(value, (tuple, list)):
        lo, hi = float(value[0]), float(value[1])
    else:
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
        lo, hi = center - value, center + value
    return (max(0.0, lo), hi) if center == 1.0 else (lo, hi)


class ColorJitter(BatchTransform):
    """Random brightness, contrast, saturation and hue per sample (in that order).

    A float ``v`` draws the factor from ``[max(0, 1 - v), 1 + v]`` (hue: a shift in
    ``[-v, v]``, ``v <= 0.5``); a pair gives the range. Saturation and hue apply to RGB only
    and leave grey images unchanged.

    Args:
        brightness, contrast, saturation, hue: Strengths.
        p: Probability that a sample is jittered at all.
    """

    def __init__(self, brightness: float | tuple[float, float] = 0.0, contrast: float | tuple[float, float] = 0.0,
                 saturation: float | tuple[float, float] = 0.0, hue: float | tuple[float, float] = 0.0,
                 p: float = 1.0) -> None:
        super().__init__()
        self.brightness = _jitter_range(brightness, "brightness")
        self.contrast = _jitter_range(contrast, "contrast")
        self.saturation = _jitter_range(saturation, "saturation")
        self.hue = _jitter_range(hue, "hue", center=0.0)
        if not (-0.5 <= self.hue[0] <= self.hue[1] <= 0.5):
            raise ValueError(f"hue must be within [-0.5, 0.5], got {hue}")
        self.p = p

    def forward(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        B = x.shape[0]
        r = _rand((5, B), generator, x)
        on = r[4] < self.p

        def factor(rng: tuple[float, float], u: Tensor, neutral: float) -> Tensor:
            return torch.where(on, rng[0] + (rng[1] - rng[0]) * u, torch.full_like(u, neutral))

        b, c, s = factor(self.brightness, r[0], 1.0), factor(self.contrast, r[1], 1.0), factor(self.saturation, r[2], 1.0)
        hue = factor(self.hue, r[3], 0.0)
        if self.brightness != (1.0, 1.0):
            x = _blend(x, torch.zeros_like(x), b)
        if self.contrast != (1.0, 1.0):
            x = _blend(x, _gray(x).mean((1, 2, 3), keepdim=True), c)
        if x.shape[1] == 3 and self.saturation != (1.0, 1.0):
            x = _blend(x, _gray(x), s)
        if x.shape[1] == 3 and self.hue != (0.0, 0.0):
            hsv = rgb_to_hsv(x)
            h = torch.remainder(hsv[:, 0] + hue.view(-1, 1, 1), 1.0)
            x = hsv_to_rgb(torch.stack((h, hsv[:, 1], hsv[:, 2]), dim=1))
        return x

    def extra_repr(self) -> str:
        return f"brightness={self.brightness}, contrast={self.contrast}, saturation={self.saturation}, hue={self.hue}"


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


# --------------------------------------------------------------------------- RandAugment ops
# Each op: (x (n, C, H, W), level (n,) in [0, 1], sign (n,) of +-1, fill, interpolation) -> x.
# Magnitude ranges follow timm's "increasing" RandAugment: level 1 is the strongest.
def _op_identity(x: Tensor, v: Tensor, s: Tensor, fill: float, mode: str) -> Tensor:
    return x


def _op_auto_contrast(x: Tensor, v: Tensor, s: Tensor, fill: float, mode: str) -> Tensor:
    lo, hi = x.amin((2, 3), keepdim=True), x.amax((2, 3), keepdim=True)
    flat = hi <= lo
    scale = torch.where(flat, torch.ones_like(hi), 1.0 / (hi - lo).clamp_min(1e-12))
    return ((x - torch.where(flat, torch.zeros_like(lo), lo)) * scale).clamp(0.0, 1.0)


def equalize(x: Tensor) -> Tensor:
    """Histogram equalisation per image and channel on 256 levels (as PIL / torchvision)."""
    n, c, h, w = x.shape
    q = (x.clamp(0.0, 1.0) * 255.0).round().long().view(n * c, h * w)  # (n, C, H, W) -> (n*C, H*W)
    hist = torch.zeros(n * c, 256, device=x.device, dtype=torch.float32)
    hist.scatter_add_(1, q, torch.ones_like(q, dtype=torch.float32))
    levels = torch.arange(256, device=x.device)
    last = hist.gather(1, ((hist > 0) * levels).amax(1, keepdim=True))  # count of the highest used level
    step = torch.div(hist.sum(1, keepdim=True) - last, 255, rounding_mode="floor")
    lut = torch.div(hist.cumsum(1) + torch.div(step, 2, rounding_mode="floor"), step.clamp_min(1), rounding_mode="floor")
    lut = torch.cat([torch.zeros_like(lut[:, :1]), lut[:, :-1]], 1).clamp(0, 255)
    out = torch.where(step > 0, lut.gather(1, q), q.float())
    return (out / 255.0).view(n, c, h, w).to(x.dtype)  # (n*C, H*W) -> (n, C, H, W)


def _op_equalize(x: Tensor, v: Tensor, s: Tensor, fill: float, mode: str) -> Tensor:
    return equalize(x)


def _op_rotate(x: Tensor, v: Tensor, s: Tensor, fill: float, mode: str) -> Tensor:
    a = torch.deg2rad(30.0 * v * s)
    cos, sin = torch.cos(a), torch.sin(a)
    m = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)  # (n, 2, 2)
    return _affine(x, m, torch.zeros_like(m[:, 0]), fill, mode)


def _op_shear(axis: int) -> Callable[..., Tensor]:
    def op(x: Tensor, v: Tensor, s: Tensor, fill: float, mode: str) -> Tensor:
        m = torch.eye(2, device=x.device, dtype=x.dtype).repeat(x.shape[0], 1, 1)
        m[:, axis, 1 - axis] = 0.3 * v * s
        return _affine(x, m, torch.zeros_like(m[:, 0]), fill, mode)

    return op


def _op_translate(axis: int) -> Callable[..., Tensor]:
    def op(x: Tensor, v: Tensor, s: Tensor, fill: float, mode: str) -> Tensor:
        m = torch.eye(2, device=x.device, dtype=x.dtype).repeat(x.shape[0], 1, 1)
        shift = torch.zeros_like(m[:, 0])
        shift[:, axis] = 0.45 * v * s * x.shape[-1 - axis]  # up to 45% of the width / height
        return _affine(x, m, shift, fill, mode)

    return op


def _op_solarize(x: Tensor, v: Tensor, s: Tensor, fill: float, mode: str) -> Tensor:
    threshold = (256.0 * (1.0 - v)).view(-1, 1, 1, 1)  # PIL: invert pixels >= threshold (256: none)
    return torch.where((x * 255.0).round() >= threshold, 1.0 - x, x)


def _op_posterize(x: Tensor, v: Tensor, s: Tensor, fill: float, mode: str) -> Tensor:
    drop = 2.0 ** torch.floor(4.0 * v).clamp(0, 4).view(-1, 1, 1, 1)  # keep 8 .. 4 bits
    q = torch.floor(x.clamp(0.0, 1.0) * 255.0)
    return torch.floor(q / drop) * drop / 255.0


def _enhance(x: Tensor, v: Tensor, s: Tensor) -> Tensor:
    return 1.0 + 0.9 * v * s  # factor in [0.1, 1.9]


def _op_brightness(x: Tensor, v: Tensor, s: Tensor, fill: float, mode: str) -> Tensor:
    return _blend(x, torch.zeros_like(x), _enhance(x, v, s))


def _op_color(x: Tensor, v: Tensor, s: Tensor, fill: float, mode: str) -> Tensor:
    return _blend(x, _gray(x), _enhance(x, v, s)) if x.shape[1] == 3 else x


def _op_contrast(x: Tensor, v: Tensor, s: Tensor, fill: float, mode: str) -> Tensor:
    return _blend(x, _gray(x).mean((1, 2, 3), keepdim=True), _enhance(x, v, s))


def _op_sharpness(x: Tensor, v: Tensor, s: Tensor, fill: float, mode: str) -> Tensor:
    c = x.shape[1]
    k = torch.tensor([[1.0, 1.0, 1.0], [1.0, 5.0, 1.0], [1.0, 1.0, 1.0]], device=x.device, dtype=x.dtype) / 13.0
    smooth = F.conv2d(x, k.expand(c, 1, 3, 3), groups=c)  # (n, C, H, W) -> (n, C, H-2, W-2)
    degenerate = x.clone()
    degenerate[..., 1:-1, 1:-1] = smooth  # PIL keeps the border pixels
    return _blend(x, degenerate, _enhance(x, v, s))


_RA_OPS: dict[str, Callable[..., Tensor]] = {
    "identity": _op_identity,
    "auto_contrast": _op_auto_contrast,
    "equalize": _op_equalize,
    "rotate": _op_rotate,
    "solarize": _op_solarize,
    "color": _op_color,
    "posterize": _op_posterize,
    "contrast": _op_contrast,
    "brightness": _op_brightness,
    "sharpness": _op_sharpness,
    "shear_x": _op_shear(0),
    "shear_y": _op_shear(1),
    "translate_x": _op_translate(0),
    "translate_y": _op_translate(1),
}
RAND_AUGMENT_OPS: tuple[str, ...] = tuple(_RA_OPS)


class RandAugment(BatchTransform):
    """RandAugment (Cubuk et al. 2019) with timm's conventions, per sample.

    Every sample gets ``num_ops`` ops drawn uniformly from ``ops``; each is applied with
    probability ``op_prob`` at magnitude ``N(magnitude, magnitude_std)`` clipped to
    ``[0, max_magnitude]`` (``magnitude_std=inf``: uniform in ``[0, magnitude]``) and a random
    sign for signed ops. At full magnitude: rotate 30 deg, shear 0.3, translate 45%, enhance
    factors 1 +- 0.9, solarize threshold 0, posterize 4 bits. ``"rand-m9-mstd0.5"`` in timm is
    ``RandAugment(2, 9, magnitude_std=0.5)`` (the DeiT recipe).

    Args:
        num_ops: Ops per sample.
        magnitude: Mean magnitude, 0 .. ``max_magnitude``.
        magnitude_std: Std of the per-sample magnitude noise.
        max_magnitude: The magnitude that means "full strength".
        op_prob: Probability each drawn op is applied (timm: 0.5; torchvision: 1.0).
        ops: Subset of :data:`RAND_AUGMENT_OPS` (default: all).
        fill: Value of pixels moved in from outside by geometric ops (0.5: mid grey).
        interpolation: ``"bilinear"`` or ``"nearest"`` for geometric ops.
    """

    def __init__(self, num_ops: int = 2, magnitude: float = 9.0, magnitude_std: float = 0.5,
                 max_magnitude: float = 10.0, op_prob: float = 0.5, ops: Sequence[str] | None = None,
                 fill: float = 0.5, interpolation: str = "bilinear") -> None:
        super().__init__()
        ops = tuple(ops) if ops is not None else RAND_AUGMENT_OPS
        unknown = [o for o in ops if o not in _RA_OPS]
        if unknown or not ops:
            raise ValueError(f"unknown RandAugment op(s) {unknown}; choose from {', '.join(RAND_AUGMENT_OPS)}")
        if not 0 <= magnitude <= max_magnitude:
            raise ValueError(f"magnitude must be in [0, {max_magnitude}], got {magnitude}")
        if interpolation not in ("bilinear", "nearest"):
            raise ValueError(f"interpolation must be 'bilinear' or 'nearest', got {interpolation!r}")
        self.num_ops, self.magnitude, self.magnitude_std = int(num_ops), float(magnitude), float(magnitude_std)
        self.max_magnitude, self.op_prob, self.ops = float(max_magnitude), float(op_prob), ops
        self.fill, self.interpolation = float(fill), interpolation

    def forward(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        B, n = x.shape[0], self.num_ops
        choice = _randint(len(self.ops), (n, B), generator, x.device)
        r = _rand((3, n, B), generator, x)
        noise = _randn((n, B), generator, x)
        applied, signs = r[0] < self.op_prob, torch.where(r[1] < 0.5, -1.0, 1.0).to(x.dtype)
        if math.isinf(self.magnitude_std):
            mag = self.magnitude * r[2]
        else:
            mag = self.magnitude + self.magnitude_std * noise
        level = mag.clamp(0.0, self.max_magnitude) / self.max_magnitude
        for k in range(n):
            out = x.clone()
            for j, name in enumerate(self.ops):
                idx = ((choice[k] == j) & applied[k]).nonzero().squeeze(1)
                if idx.numel() == 0 or name == "identity":
                    continue
                out[idx] = _RA_OPS[name](x[idx], level[k, idx], signs[k, idx], self.fill, self.interpolation)
            x = out
        return x

    def extra_repr(self) -> str:
        return (f"num_ops={self.num_ops}, magnitude={self.magnitude}, magnitude_std={self.magnitude_std}, "
                f"op_prob={self.op_prob}, ops={len(self.ops)}")


def parse_rand_augment(spec: str) -> RandAugment:
    """A timm-style string (``"rand-m9-mstd0.5-inc1"``, ``"rand-n2-m7-p1.0"``) to a :class:`RandAugment`.

    Keys: ``m`` magnitude, ``n`` ops per sample, ``mstd`` magnitude std, ``mmax`` max
    magnitude, ``p`` op probability; ``inc`` is accepted (the ops here always grow with the
    magnitude). Without ``mstd`` the magnitude is fixed, as in timm.
    """
    parts = spec.split("-")
    if parts[0] not in ("rand", "randaugment"):
        raise ValueError(f"unknown auto-augment {spec!r}; expected 'rand-m<magnitude>[-n<ops>][-mstd<std>]...'")
    kw: dict[str, Any] = {"magnitude_std": 0.0}
    keys = {"mstd": "magnitude_std", "mmax": "max_magnitude", "m": "magnitude", "n": "num_ops", "p": "op_prob",
            "inc": None}
    for part in parts[1:]:
        for key, arg in keys.items():
            if part.startswith(key):
                try:
                    value = float(part[len(key):])
                except ValueError:
                    raise ValueError(f"bad value in {part!r} of auto-augment {spec!r}") from None
                if arg is not None:
                    kw[arg] = int(value) if arg == "num_ops" else value
                break
        else:
            raise ValueError(f"unknown part {part!r} of auto-augment {spec!r}; known: m, n, mstd, mmax, p, inc")
    return RandAugment(**kw)


class RandomErasing(BatchTransform):
    """Erase a random box per sample with probability ``p`` (Zhong et al. 2017, timm's defaults).

    ``value="random"`` fills the box with per-pixel noise that is standard normal *after*
    normalisation (timm's ``mode="pixel"``): plain ``N(0, 1)`` when the transform runs after
    :class:`Normalize` (``mean``/``std`` None), or ``mean + std * N(0, 1)`` when it runs on [0, 1]
    images that are normalised later with ``mean``/``std``. A number or per-channel sequence
    fills with that value.

    Args:
        p: Probability a sample is erased.
        scale: Range of the box area as a fraction of the image.
        ratio: Range of the box aspect (h / w), sampled log-uniformly.
        value: ``"random"``, a float, or one float per channel.
        attempts: Tries to fit a box before leaving the sample as it is.
        mean, std: The normalisation applied after this transform, if any (see above).
    """

    def __init__(self, p: float = 0.5, scale: tuple[float, float] = (0.02, 1 / 3),
                 ratio: tuple[float, float] = (0.3, 3.3), value: str | float | Sequence[float] = "random",
                 attempts: int = 10, mean: Sequence[float] | None = None, std: Sequence[float] | None = None) -> None:
        super().__init__()
        if isinstance(value, str) and value != "random":
            raise ValueError(f"value must be 'random', a number or one number per channel, got {value!r}")
        if (mean is None) != (std is None):
            raise ValueError("give both mean and std, or neither")
        self.p, self.scale, self.ratio, self.value, self.attempts = p, tuple(scale), tuple(ratio), value, attempts
        self.mean = tuple(float(m) for m in mean) if mean is not None else None
        self.std = tuple(float(s) for s in std) if std is not None else None

    def forward(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        B, C, H, W = x.shape
        on = _rand((B,), generator, x) < self.p
        # _sample_boxes returns aspect w/h; erasing's ratio is h/w, the inverse range
        w, h, found = _sample_boxes((W, H), B, self.scale, self.ratio, generator, x, self.attempts)
        h, w = h.round().clamp(1, H), w.round().clamp(1, W)
        found = found & (h < H) & (w < W)
        u = _rand((B, 2), generator, x)
        top = torch.floor(u[:, 0] * (H - h + 1)).view(-1, 1, 1, 1)
        left = torch.floor(u[:, 1] * (W - w + 1)).view(-1, 1, 1, 1)
        rows = torch.arange(H, device=x.device, dtype=x.dtype).view(1, 1, -1, 1)
        cols = torch.arange(W, device=x.device, dtype=x.dtype).view(1, 1, 1, -1)
        inside = ((rows >= top) & (rows < top + h.view(-1, 1, 1, 1))
                  & (cols >= left) & (cols < left + w.view(-1, 1, 1, 1)))  # (B, 1, H, W)
        mask = inside & (on & found).view(-1, 1, 1, 1)
        if isinstance(self.value, str):
            fill = _randn(x.shape, generator, x)
            if self.mean is not None and self.std is not None:
                m = torch.as_tensor(self.mean, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
                sd = torch.as_tensor(self.std, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
                fill = m + sd * fill  # N(0, 1) once normalised with (mean, std)
        else:
            fill = torch.as_tensor(self.value, device=x.device, dtype=x.dtype).reshape(1, -1, 1, 1).expand_as(x)
        return torch.where(mask, fill, x)

    def extra_repr(self) -> str:
        return f"p={self.p}, scale={self.scale}, ratio={self.ratio}, value={self.value!r}"


class Normalize(BatchTransform):
    """``(x - mean) / std`` per channel; one-value statistics apply to every channel."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        if len(self.mean) != len(self.std) or any(s <= 0 for s in self.std):
            raise ValueError(f"mean and std need the same length and std > 0, got {self.mean} and {self.std}")

    def forward(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        c = x.shape[1]
        mean, std = self.mean, self.std
        if len(mean) == 1 and c > 1:
            mean, std = mean * c, std * c
        return normalize(x, mean, std)

    def extra_repr(self) -> str:
        return f"mean={self.mean}, std={self.std}"


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
