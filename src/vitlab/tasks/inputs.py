"""Checked image input for inference (predict, explain): every accepted input becomes a float
image in [0, 1], and inputs vitlab would otherwise mangle are refused with one clear message.

Rules (documented in the README, "Input handling"):

* Image files: 8-bit images are divided by 255; 16-bit ones (PNG/TIFF modes ``I;16``, ``I``)
  by 65535, not clipped; float (``F``) images must already be in [0, 1]. Images with more
  pixels than PIL's decompression-bomb limit are refused.
* Transparency (RGBA, LA, palette transparency, 2- or 4-channel arrays) is composited on the
  background of the model's training data: **black** when the data is light-on-dark (mean
  intensity below 0.4, e.g. the digits: 0.305), **white** otherwise (photographs: ImageNet's
  mean is 0.449).
* Arrays and tensors: ``uint8`` is 0..255, ``uint16`` 0..65535, other integer types must hold
  0..255, floats must lie in [0, 1] (NaN and infinity refused); bool is 0/1. Arrays are
  (H, W), (H, W, C) or (B, H, W, C); tensors (C, H, W) or (B, C, H, W); C is 1, 2, 3 or 4.
* :func:`input_notes` compares an accepted image with what the model was trained on (size,
  channels, mean intensity and polarity) and returns human-readable notes, never silence.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from ..errors import InputError

#: Data whose mean intensity is below this is light-on-dark: transparency becomes black.
DARK_BACKGROUND_MEAN = 0.4
_FLOAT_TOLERANCE = 1e-3  # float rounding (x / 255 * 255 / 255 ...) may step just outside [0, 1]


def training_stats(pretrained_cfg: dict[str, Any]) -> tuple[float, float]:
    """(mean intensity, pixel std) of the training data, averaged over channels, from the model's
    normalisation (``pretrained_cfg`` ``mean`` / ``std``; 0.5 / 0.5 when absent)."""
    mean = pretrained_cfg.get("mean", (0.5,))
    std = pretrained_cfg.get("std", (0.5,))
    mean = [float(v) for v in (mean if isinstance(mean, (list, tuple)) else [mean])]
    std = [float(v) for v in (std if isinstance(std, (list, tuple)) else [std])]
    return sum(mean) / len(mean), sum(std) / len(std)


def background_for(pretrained_cfg: dict[str, Any]) -> float:
    """The value transparency is composited on: 0.0 (black) for light-on-dark training data, else 1.0."""
    mean, _ = training_stats(pretrained_cfg)
    return 0.0 if mean < DARK_BACKGROUND_MEAN else 1.0


def _composite(x: np.ndarray, background: float) -> np.ndarray:
    """(..., C) float in [0, 1] with alpha last (C = 2 or 4) -> (..., C - 1) composited on ``background``."""
    colour, alpha = x[..., :-1], x[..., -1:]
    return colour * alpha + background * (1.0 - alpha)


def _describe(path: Path, what: str) -> str:
    return f"image {path}: {what}"


def read_image_file(path: str | Path, background: float = 1.0) -> np.ndarray:
    """Read an image file as float32 (H, W, C) in [0, 1], C = 1 (grey) or 3 (colour).

    Args:
        path: The file.
        background: Value (0..1) transparent pixels are composited on.

    Raises:
        FileNotFoundError: No such file.
        InputError: Not an image, a decompression bomb, or float pixels outside [0, 1].
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}" + (" (it is a folder)" if path.is_dir() else ""))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                im.load()
                return _pil_to_array(im, background, path)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise InputError(_describe(path, f"too many pixels, refused as a possible decompression bomb ({e}); "
                                         f"resize it, or raise PIL.Image.MAX_IMAGE_PIXELS if you trust it")) from None
    except InputError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise InputError(_describe(path, f"cannot be read (corrupt or not an image): {e}")) from None


def _pil_to_array(im: Image.Image, background: float, path: Path | None = None) -> np.ndarray:
    """A PIL image -> float32 (H, W, 1 or 3) in [0, 1] (16-bit scaled, transparency composited)."""
    mode = im.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N"):
        arr = np.asarray(im).astype(np.float32) / 65535.0
    elif mode == "I":  # 32-bit integer: how Pillow opens many 16-bit PNG / TIFF files
        raw = np.asarray(im)
        if raw.min() < 0 or raw.max() > 65535:
            raise InputError(f"{'image ' + str(path) if path else 'image'}: 32-bit integer pixels in "
                             f"{raw.min()}..{raw.max()}; expected 16-bit values 0..65535")
        arr = raw.astype(np.float32) / 65535.0
    elif mode == "F":
        arr = np.asarray(im).astype(np.float32)
        _check_float_range(arr, f"image {path}" if path else "image")
    elif mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in im.info) \
            or (mode in ("L", "RGB") and "transparency" in im.info):
        target = "LA" if mode in ("LA", "La") or (mode == "L") else "RGBA"
        arr = _composite(np.asarray(im.convert(target)).astype(np.float32) / 255.0, background)
    elif mode in ("L", "RGB"):
        arr = np.asarray(im).astype(np.float32) / 255.0
    elif mode == "1":
        arr = np.asarray(im.convert("L")).astype(np.float32) / 255.0
    else:  # P without transparency, CMYK, YCbCr, LAB, HSV
        arr = np.asarray(im.convert("RGB")).astype(np.float32) / 255.0
    return arr[:, :, None] if arr.ndim == 2 else arr  # (H, W) -> (H, W, 1)


def _check_float_range(arr: np.ndarray | Tensor, what: str) -> None:
    t = torch.as_tensor(arr)
    if not torch.isfinite(t).all():
        raise InputError(f"{what}: contains NaN or infinite values; expected finite floats in [0, 1]")
    if t.numel() == 0:
        raise InputError(f"{what}: is empty")
    lo, hi = float(t.min()), float(t.max())
    if lo < -_FLOAT_TOLERANCE or hi > 1.0 + _FLOAT_TOLERANCE:
        raise InputError(
            f"{what}: float values in [{lo:g}, {hi:g}], expected [0, 1]; scale it first (e.g. x / 16 for "
            f"scikit-learn digits, x / 255 for 8-bit data), or pass a uint8 array for 0..255"
        )


def _scale_numbers(t: Tensor, what: str) -> Tensor:
    """A numeric tensor (any layout) -> float32 in [0, 1] by its dtype's rule, or InputError."""
    if t.dtype == torch.bool:
        return t.float()
    if t.dtype == torch.uint8:
        return t.float() / 255.0
    if t.dtype == getattr(torch, "uint16", None):
        return t.float() / 65535.0
    if t.is_complex():
        raise InputError(f"{what}: complex dtype {t.dtype}; expected uint8, uint16 or float in [0, 1]")
    if t.is_floating_point():
        _check_float_range(t, what)
        return t.float().clamp(0.0, 1.0)
    if t.numel() == 0:
        raise InputError(f"{what}: is empty")
    lo, hi = int(t.min()), int(t.max())
    if lo < 0 or hi > 255:
        raise InputError(
            f"{what}: {t.dtype} values in {lo}..{hi}, expected 0..255 for an integer image; pass a uint16 "
            f"array for 16-bit data (0..65535) or floats in [0, 1]"
        )
    return t.float() / 255.0


def _from_numpy(arr: np.ndarray, what: str) -> Tensor:
    if arr.dtype == np.uint16:  # torch.from_numpy has no uint16 on every version
        arr = arr.astype(np.float32) / 65535.0
    elif arr.dtype.kind not in "biuf" and arr.dtype.kind != "c":
        raise InputError(f"{what}: dtype {arr.dtype} is not numeric; expected uint8, uint16 or float in [0, 1]")
    elif arr.dtype.kind == "u" and arr.dtype.itemsize > 1:
        arr = arr.astype(np.int64)  # uint32 / uint64: torch has no arithmetic on them
    return torch.from_numpy(np.ascontiguousarray(arr))


def to_unit_tensor(image: Any, background: float = 1.0) -> Tensor:
    """Any supported image -> float32 (C, H, W) or (B, C, H, W) in [0, 1], C = 1 or 3.

    Accepts a path, a PIL image, a numpy array (H, W), (H, W, C) or (B, H, W, C), or a tensor
    (C, H, W) / (B, C, H, W), with the value rules of this module. Alpha (C = 2 or 4) is
    composited on ``background``.

    Raises:
        FileNotFoundError: A path that does not exist.
        InputError: Anything else that is not an image this function can take without guessing.
    """
    if isinstance(image, (str, Path)):
        arr = read_image_file(image, background)
        return torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1)  # (H, W, C) -> (C, H, W)
    if isinstance(image, Image.Image):
        arr = _pil_to_array(image, background)
        return torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1)  # (H, W, C) -> (C, H, W)
    if isinstance(image, np.ndarray):
        what = f"array of shape {image.shape}"
        if image.ndim not in (2, 3, 4):
            raise InputError(f"{what}: expected an image array (H, W), (H, W, C) or (B, H, W, C)")
        t = _scale_numbers(_from_numpy(image, what), what)
        if t.ndim == 2:
            t = t[:, :, None]  # (H, W) -> (H, W, 1)
        if t.shape[-1] not in (1, 2, 3, 4):
            first = t.shape[0] if t.ndim == 3 else t.shape[1]
            hint = " (a channels-first (C, H, W) array? use arr.transpose(1, 2, 0))" if first in (1, 3, 4) else ""
            raise InputError(f"{what}: the last axis has {t.shape[-1]} channels, expected 1, 2, 3 or 4 "
                             f"(layout (H, W, C)){hint}")
        t = t.permute(2, 0, 1) if t.ndim == 3 else t.permute(0, 3, 1, 2)  # channels last -> first
    elif isinstance(image, Tensor):
        what = f"tensor of shape {tuple(image.shape)}"
        if image.ndim not in (3, 4):
            raise InputError(f"{what}: expected an image tensor (C, H, W) or (B, C, H, W)")
        t = _scale_numbers(image.detach().cpu(), what)
        if t.shape[-3] not in (1, 2, 3, 4):
            raise InputError(f"{what}: {t.shape[-3]} channels, expected 1, 2, 3 or 4 (layout (C, H, W))")
    else:
        raise InputError(f"unsupported image type {type(image).__name__}: use a path, PIL image, numpy array or tensor")
    if t.shape[-3] in (2, 4):  # alpha last: composite on the background
        t = _composite(t.movedim(-3, -1), background).movedim(-1, -3)  # (.., C, H, W) -> (.., C - 1, H, W)
    return t.contiguous()


def input_notes(image: Tensor, pretrained_cfg: dict[str, Any], channels: int) -> list[str]:
    """Notes on how far an accepted image (C, H, W) in [0, 1] is from the model's training data.

    Checked: size (upscaled more than 4x), aspect ratio (the centre crop drops most of it),
    channels (colour averaged to grey, or grey repeated to colour), a (nearly) uniform image,
    inverted polarity (``1 - x`` is much closer to the training mean intensity than ``x``) and a
    mean intensity more than two pixel standard deviations from the training data's.

    Returns:
        Human-readable notes; empty when nothing looks off.
    """
    notes: list[str] = []
    c, h, w = image.shape[-3:]
    size = pretrained_cfg.get("input_size", 224)
    size = int(size[-1] if isinstance(size, (list, tuple)) else size)
    if min(h, w) * 4 < size:
        notes.append(f"the image is {w}x{h} pixels, much smaller than the model's {size}x{size} input "
                     f"(upscaled {size / min(h, w):.0f}x)")
    if max(h, w) > 2 * min(h, w):
        notes.append(f"the image is {w}x{h}: the centre crop keeps only its middle {min(h, w) / max(h, w):.0%}")
    if c == 3 and channels == 1 and float((image - image.mean(dim=-3, keepdim=True)).abs().amax()) > 0.05:
        notes.append("a colour image given to a 1-channel (grey) model: its channels are averaged")
    if c == 1 and channels == 3:
        notes.append("a grey image given to a model trained on colour: its channel is repeated")
    m, s = float(image.mean()), float(image.std()) if image.numel() > 1 else 0.0
    mu, sigma = training_stats(pretrained_cfg)
    if s < 0.01:
        notes.append(f"the image is (nearly) uniform (every pixel about {m:.2f}): nothing to classify?")
    elif abs(m - mu) > sigma and abs((1.0 - m) - mu) < abs(m - mu) / 2:
        kind = "light-on-dark" if mu < 0.5 else "dark-on-light"
        notes.append(f"the image looks inverted: mean intensity {m:.2f}, the training data's {mu:.2f} "
                     f"({kind}); invert it (1 - x, PIL.ImageOps.invert) if it is a drawing")
    elif abs(m - mu) > 2 * sigma:
        notes.append(f"mean intensity {m:.2f} is far from the training data's {mu:.2f} (pixel std {sigma:.2f})")
    return notes


def check_finite(logits: Tensor, names: Sequence[str] | None = None) -> None:
    """Raise :class:`~vitlab.errors.NonFiniteOutputError` when any output row holds NaN or infinity."""
    from ..errors import NonFiniteOutputError

    bad = ~torch.isfinite(logits.reshape(logits.shape[0], -1)).all(dim=1)  # (B,) rows with NaN / inf
    if bool(bad.any()):
        idx = [int(i) for i in bad.nonzero().flatten()]
        which = ", ".join(str(names[i]) if names and i < len(names) else f"#{i}" for i in idx[:3])
        raise NonFiniteOutputError(
            f"the model produced NaN/infinite outputs for {len(idx)} of {logits.shape[0]} input(s) ({which}); "
            f"its weights are probably corrupt or diverged: no prediction is reported"
        )


__all__ = ["DARK_BACKGROUND_MEAN", "background_for", "check_finite", "input_notes", "read_image_file",
           "to_unit_tensor", "training_stats"]
