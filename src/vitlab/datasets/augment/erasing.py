"""Random erasing (per-sample boxes filled with noise or a constant), after normalisation."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from .base import BatchTransform, _rand, _randn
from .geometric import _sample_boxes


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
