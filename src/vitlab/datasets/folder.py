"""Image folders: ``root/<class>/<image>`` trees, decoded with Pillow, corrupt files reported by path."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from .transforms import center_crop, load_image, resize

IMG_EXTENSIONS: tuple[str, ...] = (
    ".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm",
)
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
ON_ERROR = ("skip", "raise")
CHECKS = ("verify", "load", "none")
VAL_DIR_NAMES = ("val", "validation", "valid")


def _image_error(path: Path, check: str) -> str | None:
    """Why ``path`` can't be decoded, or None when it looks fine."""
    try:
        with Image.open(path) as im:
            if check == "load":
                im.load()
            else:
                im.verify()  # header and checksums, without decoding the pixels
    except Exception as e:  # noqa: BLE001 - Pillow raises many types for corrupt files
        return f"{type(e).__name__}: {e}"
    return None


class ImageFolderDataset(Dataset):
    """Images in ``root/<class_name>/<file>`` (classes sorted by name) as (C, H, W) tensors in [0, 1].

    Every file is checked when the dataset is built (``check``), so the count of bad files is
    exact and ``__getitem__`` does not meet them later. A corrupt or unreadable image:

    * ``on_error="raise"``: raises a ``ValueError`` naming the file;
    * ``on_error="skip"``: warns once with its path, leaves it out and records it in ``.skipped``.

    Images are decoded with Pillow (:func:`vitlab.datasets.transforms.load_image`), converted to
    ``channels`` (1: grey, 3: RGB) and, when ``image_size`` is given, resized: an int resizes the
    shorter side and center-crops a square, a pair ``(h, w)`` resizes to exactly that. Without
    ``image_size`` the original size is kept and only equal-sized images can be batched.

    Args:
        root: Folder holding one sub-folder per class.
        transform: Optional callable applied to each (C, H, W) tensor after the resize.
        on_error: ``"skip"`` or ``"raise"`` for corrupt images.
        extensions: File name endings (case-insensitive) treated as images.
        image_size: Output size (see above) or None.
        channels: 1 or 3.
        classes: Class names to use instead of the sub-folder names (e.g. the train split's,
            so a val split with a missing class keeps the same label indices).
        mean, std: Normalisation statistics the trainer should use; default ImageNet's for
            3 channels and 0.5/0.5 for 1 channel.
        check: ``"verify"`` (Pillow header + checksums, fast), ``"load"`` (decode every image,
            exact but slow) or ``"none"`` (no scan; a bad file is then met in ``__getitem__``,
            where "skip" warns and returns the next good sample).
        interpolation: Resize interpolation.
    """

    def __init__(
        self,
        root: str | Path,
        transform: Callable[[Tensor], Tensor] | None = None,
        on_error: str = "skip",
        extensions: Sequence[str] = IMG_EXTENSIONS,
        image_size: int | tuple[int, int] | None = None,
        channels: int = 3,
        classes: Sequence[str] | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        check: str = "verify",
        interpolation: str = "bicubic",
    ) -> None:
        if on_error not in ON_ERROR:
            raise ValueError(f"on_error must be one of {', '.join(ON_ERROR)}, got {on_error!r}")
        if check not in CHECKS:
            raise ValueError(f"check must be one of {', '.join(CHECKS)}, got {check!r}")
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 (grey) or 3 (RGB), got {channels}")
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder not found: {self.root} (expected {self.root}/<class>/<image>)")
        self.transform = transform
        self.on_error = on_error
        self.extensions = tuple(e.lower() if e.startswith(".") else "." + e.lower() for e in extensions)
        self.image_size = image_size
        self.channels = channels
        self.interpolation = interpolation
        found = sorted(d.name for d in os.scandir(self.root) if d.is_dir() and not d.name.startswith("."))
        if classes is None:
            classes = found
        else:
            unknown = sorted(set(found) - set(classes))
            if unknown:
                raise ValueError(f"{self.root} has class folders {unknown} that are not among the given classes")
        self.classes = list(classes)
        self.num_classes = len(self.classes)
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        if mean is None:
            mean = IMAGENET_MEAN if channels == 3 else (0.5,)
        if std is None:
            std = IMAGENET_STD if channels == 3 else (0.5,)
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)

        self.skipped: list[Path] = []
        self.samples: list[tuple[Path, int]] = []
        for cls in self.classes:
            cdir = self.root / cls
            if not cdir.is_dir():
                continue
            for dirpath, dirnames, filenames in os.walk(cdir, followlinks=True):
                dirnames.sort()
                for fname in sorted(filenames):
                    if not fname.lower().endswith(self.extensions):
                        continue
                    path = Path(dirpath) / fname
                    if check != "none":
                        err = _image_error(path, check)
                        if err is not None:
                            self._bad(path, err)
                            continue
                    self.samples.append((path, self.class_to_idx[cls]))
        if not self.samples:
            what = f" ({len(self.skipped)} unreadable)" if self.skipped else ""
            raise FileNotFoundError(
                f"no images found in {self.root}{what}: expected {self.root}/<class>/<image> with one of "
                f"{', '.join(self.extensions)}"
            )
        self.targets = [t for _, t in self.samples]

    def _bad(self, path: Path, err: str) -> None:
        msg = f"cannot read image {path} (corrupt or not an image): {err}"
        if self.on_error == "raise":
            raise ValueError(msg)
        if path not in self.skipped:
            self.skipped.append(path)
            warnings.warn(f"skipping {msg}", stacklevel=3)

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, path: str | Path) -> Tensor:
        """Decode one file to a (C, H, W) float tensor in [0, 1] at the dataset's size."""
        image = load_image(path)
        if self.channels == 1:
            image = image.convert("L")
        arr = np.asarray(image, dtype=np.uint8)
        if arr.ndim == 2:
            arr = arr[:, :, None]
        x = torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)  # (H, W, C) -> (C, H, W)
        if self.image_size is not None:
            x = x.unsqueeze(0)  # (C, H, W) -> (1, C, H, W)
            if isinstance(self.image_size, int):
                x = center_crop(resize(x, self.image_size, self.interpolation), self.image_size)
            else:
                x = resize(x, tuple(self.image_size), self.interpolation)
            x = x.squeeze(0).clamp_(0.0, 1.0).contiguous()
        return x

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        for attempt in range(len(self.samples)):
            path, target = self.samples[(index + attempt) % len(self.samples)]
            try:
                x = self.load(path)
            except ValueError as e:  # only reachable when a file escaped the scan (check="none"/"verify")
                self._bad(path, str(e))
                continue
            if self.transform is not None:
                x = self.transform(x)
            return x, target
        raise ValueError(f"no readable image left in {self.root}")

    def __repr__(self) -> str:
        return (f"ImageFolderDataset(root={str(self.root)!r}, n={len(self)}, classes={self.num_classes}, "
                f"skipped={len(self.skipped)})")


def _split_dir(root: Path, split: str) -> Path | None:
    names = VAL_DIR_NAMES if split == "val" else (split,)
    for name in names:
        if (root / name).is_dir():
            return root / name
    return None


def image_folder_splits(root: str | Path, **kwargs) -> tuple[ImageFolderDataset, ImageFolderDataset]:
    """The ``(train, val)`` datasets of ``root/train/<class>/...`` and ``root/val/<class>/...``.

    The val folder may also be called ``validation`` or ``valid``. The val split uses the train
    split's class list, so label indices agree.

    Args:
        root: Folder with ``train/`` and ``val/`` sub-folders.
        **kwargs: Passed to both :class:`ImageFolderDataset` (``image_size``, ``channels``, ...).

    Raises:
        FileNotFoundError: ``root`` or one of its splits is missing, or holds no images.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")
    train_dir, val_dir = _split_dir(root, "train"), _split_dir(root, "val")
    missing = [n for n, d in (("train", train_dir), ("val", val_dir)) if d is None]
    if missing:
        raise FileNotFoundError(
            f"{root} has no {' and no '.join(m + '/' for m in missing)} folder: expected "
            f"{root}/train/<class>/<image> and {root}/val/<class>/<image>"
        )
    train = ImageFolderDataset(train_dir, **kwargs)
    val = ImageFolderDataset(val_dir, **{**kwargs, "classes": kwargs.get("classes") or train.classes})
    return train, val


def imagenet_folder(root: str | Path, split: str = "train", **kwargs) -> ImageFolderDataset:
    """An ImageNet-style tree (``root/train/<wnid>/*.JPEG``, ``root/val/<wnid>/*.JPEG``) with ImageNet mean/std.

    Args:
        root: The folder holding ``train/`` and ``val/``.
        split: ``"train"`` or ``"val"`` (``"test"`` reads ``test/`` when present, else ``val/``).
        **kwargs: Passed to :class:`ImageFolderDataset`; for the 1.28M-image train split
            ``check="none"`` skips the up-front scan.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"ImageNet folder not found: {root} (expected {root}/train and {root}/val)")
    folder = _split_dir(root, split) or (_split_dir(root, "val") if split == "test" else None)
    if folder is None:
        raise FileNotFoundError(f"ImageNet folder {root} has no {split}/ sub-folder")
    if kwargs.get("channels", 3) == 3:
        kwargs.setdefault("mean", IMAGENET_MEAN)
        kwargs.setdefault("std", IMAGENET_STD)
    if split != "train" and "classes" not in kwargs and _split_dir(root, "train") is not None:
        kwargs["classes"] = sorted(d.name for d in os.scandir(root / "train") if d.is_dir() and not d.name.startswith("."))
    return ImageFolderDataset(folder, **kwargs)
