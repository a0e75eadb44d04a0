"""The common ground of the batched transforms: :class:`BatchTransform`, :class:`Compose`,
:class:`Normalize`, and the seeded random-number helpers every transform draws from."""

from __future__ import annotations

import abc

from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from ..transforms import normalize


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

# --------------------------------------------------------------------------- transforms
class BatchTransform(nn.Module, metaclass=abc.ABCMeta):
    """Base class: ``t(x, generator=None)`` on a float batch (B, C, H, W) (a single (C, H, W) also works)."""

    def __call__(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:  # type: ignore[override]
        if not isinstance(x, Tensor) or not x.is_floating_point() or x.ndim not in (3, 4):
            got = f"{x.dtype} tensor of shape {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"{type(self).__name__} expects a float image batch (B, C, H, W), got a {got}")
        single = x.ndim == 3
        out = super().__call__(x.unsqueeze(0) if single else x, generator=generator)
        return out.squeeze(0) if single else out

    @abc.abstractmethod
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
