"""Image loading and the evaluation transform (resize, center crop, normalise) on tensors."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch import Tensor

ImageLike = str | Path | Image.Image | np.ndarray | Tensor

#: ``pretrained_cfg["preprocessing"]`` of a model trained on loaders vitlab could not see into.
UNKNOWN = "unknown"

_INTERPOLATION = {"bicubic": "bicubic", "bilinear": "bilinear", "nearest": "nearest", "area": "area"}


def load_image(path: str | Path) -> Image.Image:
    """Open an image file as RGB, with an error that names the file when it can't be read."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    try:
        with Image.open(path) as im:
            im.load()
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ValueError(f"cannot read image {path} (corrupt or not an image): {e}") from None


def to_tensor(image: ImageLike) -> Tensor:
    """Any supported image to a float tensor in [0, 1]: (C, H, W), or (B, C, H, W) for batches.

    Accepts a path, a PIL image, a numpy array (H, W), (H, W, C) or (B, H, W, C) (uint8 in
    0..255 or float in 0..1), or a tensor (C, H, W) / (B, C, H, W) (uint8 or float in 0..1).
    """
    if isinstance(image, (str, Path)):
        image = load_image(image)
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB") if image.mode not in ("RGB", "L") else image)
    if isinstance(image, np.ndarray):
        arr = image
        if arr.ndim == 2:
            arr = arr[:, :, None]
        if arr.ndim not in (3, 4):
            raise ValueError(f"expected an image array (H, W), (H, W, C) or (B, H, W, C), got shape {arr.shape}")
        arr = np.ascontiguousarray(arr) if arr.flags.writeable else np.array(arr)
        t = torch.from_numpy(arr)
        t = t.permute(2, 0, 1) if t.ndim == 3 else t.permute(0, 3, 1, 2)  # HWC -> CHW
        image = t
    if not isinstance(image, Tensor):
        raise TypeError(f"unsupported image type {type(image).__name__}: use a path, PIL image, numpy array or tensor")
    if image.ndim not in (3, 4):
        raise ValueError(f"expected an image tensor (C, H, W) or (B, C, H, W), got shape {tuple(image.shape)}")
    if image.dtype == torch.uint8:
        return image.float() / 255.0
    if not image.is_floating_point():
        raise ValueError(f"expected a uint8 or float image, got dtype {image.dtype}")
    return image.float()


def resize(x: Tensor, size: int | tuple[int, int], interpolation: str = "bicubic") -> Tensor:
    """Resize (B, C, H, W); an int resizes the shorter side to it, keeping the aspect ratio."""
    h, w = x.shape[-2:]
    if isinstance(size, int):
        if h <= w:
            new = (size, max(1, int(round(w * size / h))))
        else:
            new = (max(1, int(round(h * size / w))), size)
    else:
        new = (int(size[0]), int(size[1]))
    if new == (h, w):
        return x
    mode = _INTERPOLATION.get(interpolation)
    if mode is None:
        raise ValueError(f"unknown interpolation {interpolation!r}; choose one of {', '.join(_INTERPOLATION)}")
    kw: dict[str, Any] = {"antialias": True, "align_corners": False} if mode in ("bicubic", "bilinear") else {}
    out = F.interpolate(x, size=new, mode=mode, **kw)
    return out.clamp_(0.0, 1.0) if mode == "bicubic" else out


def center_crop(x: Tensor, size: int | tuple[int, int]) -> Tensor:
    """Crop the centre (B, C, h, w) of (B, C, H, W); pads with zeros if the image is smaller."""
    th, tw = (size, size) if isinstance(size, int) else size
    h, w = x.shape[-2:]
    if h < th or w < tw:
        ph, pw = max(0, th - h), max(0, tw - w)
        x = F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))
        h, w = x.shape[-2:]
    top, left = (h - th) // 2, (w - tw) // 2
    return x[..., top : top + th, left : left + tw]


def normalize(x: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """(x - mean) / std per channel of (B, C, H, W)."""
    m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    if m.shape[1] != x.shape[1]:
        raise ValueError(f"normalisation has {m.shape[1]} channels but the image has {x.shape[1]}")
    return (x - m) / s


class EvalTransform:
    """timm-style evaluation preprocessing: resize to ``size / crop_pct``, center crop, normalise.

    Args:
        input_size: Output side in pixels.
        crop_pct: Fraction of the resized image kept by the crop.
        mean, std: Per-channel normalisation.
        interpolation: Resize mode.
        channels: Channels the model expects; grey images are repeated, RGB images averaged
            to one channel when ``channels == 1``.
    """

    def __init__(
        self,
        input_size: int = 224,
        crop_pct: float = 0.9,
        mean: Sequence[float] = (0.485, 0.456, 0.406),
        std: Sequence[float] = (0.229, 0.224, 0.225),
        interpolation: str = "bicubic",
        channels: int = 3,
    ) -> None:
        if not 0.0 < crop_pct <= 1.0:
            raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}")
        self.input_size = int(input_size)
        self.crop_pct = crop_pct
        self.mean, self.std = tuple(mean), tuple(std)
        self.interpolation = interpolation
        self.channels = channels

    @classmethod
    def from_config(cls, cfg: dict[str, Any], channels: int = 3) -> "EvalTransform":
        """Build from a model's ``pretrained_cfg``.

        Raises:
            ValueError: The config records its preprocessing as unknown (a model trained by
                ``ViTTrainer`` on its own loaders without ``preprocessing=``).
        """
        if cfg.get("preprocessing") == UNKNOWN:
            raise ValueError(
                "this checkpoint does not record its preprocessing (trained by ViTTrainer on its own loaders without "
                "preprocessing=...): pass preprocessing=dict(mean=..., std=..., crop_pct=..., interpolation=...) to "
                "ViTTrainer, or set model.pretrained_cfg's mean, std, crop_pct, interpolation and delete its "
                "'preprocessing' key"
            )
        size = cfg.get("input_size", 224)
        size = size[-1] if isinstance(size, (tuple, list)) else size
        return cls(size, cfg.get("crop_pct", 0.9), cfg.get("mean", (0.5,) * 3), cfg.get("std", (0.5,) * 3),
                   cfg.get("interpolation", "bicubic"), channels)

    def __call__(self, image: ImageLike | Sequence[ImageLike]) -> Tensor:
        """One image or a list/batch -> normalised (B, C, S, S)."""
        if isinstance(image, (list, tuple)):
            return torch.cat([self(im) for im in image])
        x = to_tensor(image)
        if x.ndim == 3:
            x = x.unsqueeze(0)
        c = x.shape[1]
        if c == 1 and self.channels == 3:
            x = x.expand(-1, 3, -1, -1)
        elif c == 3 and self.channels == 1:
            x = x.mean(dim=1, keepdim=True)
        elif c == 4 and self.channels == 3:
            x = x[:, :3]
        elif c != self.channels:
            raise ValueError(f"image has {c} channels; the model expects {self.channels}")
        scale = int(math.floor(self.input_size / self.crop_pct))
        x = center_crop(resize(x, scale, self.interpolation), self.input_size)
        mean = self.mean if len(self.mean) == self.channels else (sum(self.mean) / len(self.mean),) * self.channels
        std = self.std if len(self.std) == self.channels else (sum(self.std) / len(self.std),) * self.channels
        return normalize(x, mean, std)
