"""Colour: grey / blend / HSV helpers, :class:`ColorJitter` and :func:`equalize`."""

from __future__ import annotations

import torch
from torch import Tensor

from .base import BatchTransform, _rand


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
