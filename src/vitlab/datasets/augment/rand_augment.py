"""RandAugment: the per-sample ops with timm's magnitude ranges, :class:`RandAugment` and
:func:`parse_rand_augment` (timm-style ``rand-m9-n2-mstd0.5`` strings)."""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import BatchTransform, _rand, _randint, _randn
from .colour import _blend, _gray, equalize
from .geometric import _affine


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
