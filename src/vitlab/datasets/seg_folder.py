"""Semantic-segmentation folders users bring: images + single-channel or palette PNG masks.

Layout (VOC / ADE20K style; the folder names are arguments)::

    root/
      classes.txt            one class name per line; line i is label value i
      images/<name>.jpg      any Pillow-readable image (.jpg, .png, ...)
      masks/<name>.png       same <name>; mode "L" (grey values are labels) or "P"
                             (palette indices are labels, as VOC's SegmentationClass)

A mask value equal to ``ignore_index`` (255, VOC's border) marks pixels that do not count.
With ``reduce_zero_label`` (ADE20K's annotations, where 0 is "other"), 0 becomes
``ignore_index`` and every other value v becomes v - 1.

Every problem is one :class:`~vitlab.errors.InputError` naming the file: an image without
a mask or a mask without an image (at construction), a mask whose size differs from its
image, a label value outside the class list, an RGB mask (at loading, or for all files at
once with :meth:`SegmentationFolder.verify`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from ..errors import InputError
from .folder import IMG_EXTENSIONS
from .transforms import load_image

MASK_MODES = ("L", "P", "I", "I;16")
Transform = Callable[[Tensor, Tensor], "tuple[Tensor, Tensor]"]


def read_class_list(path: str | Path) -> list[str]:
    """Class names from a text file, one per line (blank lines and ``#`` comments skipped)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"class list not found: {path} (one class name per line; line i is label value i)")
    names = [ln.strip() for ln in path.read_text().splitlines()]
    names = [n for n in names if n and not n.startswith("#")]
    if not names:
        raise InputError(f"class list {path} names no class")
    return names


class SegmentationFolder(Dataset):
    """Image/mask pairs from a folder (see the module docstring for the layout).

    Each item is a dict: ``image`` (C, H, W) float32 in [0, 1], ``semantic_mask`` (H, W)
    int64 with values in [0, K) or ``ignore_index``, ``image_path``, ``mask_path``.

    Args:
        root: The dataset folder.
        classes: Class names, or None to read ``root/classes.txt``.
        image_dir: Images sub-folder (e.g. ``images/training`` for ADE20K).
        mask_dir: Masks sub-folder (e.g. ``annotations/training``, ``SegmentationClass``).
        ignore_index: Label value of pixels that do not count.
        reduce_zero_label: ADE20K convention: 0 -> ignore, v -> v - 1.
        channels: Image channels to decode (3: RGB, 1: grey).
        transform: Optional joint ``(image, mask) -> (image, mask)`` callable.

    Raises:
        InputError: A missing folder, class list, image or mask (naming them).
    """

    def __init__(
        self,
        root: str | Path,
        classes: Sequence[str] | None = None,
        image_dir: str = "images",
        mask_dir: str = "masks",
        ignore_index: int = 255,
        reduce_zero_label: bool = False,
        channels: int = 3,
        transform: Transform | None = None,
    ) -> None:
        self.root = Path(root)
        self.image_root = self.root / image_dir
        self.mask_root = self.root / mask_dir
        for d, what in ((self.image_root, "image"), (self.mask_root, "mask")):
            if not d.is_dir():
                raise InputError(f"{what} folder not found: {d}")
        self.classes = list(classes) if classes is not None else read_class_list(self.root / "classes.txt")
        if channels not in (1, 3):
            raise InputError(f"channels must be 1 or 3, got {channels}")
        self.ignore_index = ignore_index
        self.reduce_zero_label = reduce_zero_label
        self.channels = channels
        self.transform = transform
        images = {p.relative_to(self.image_root).with_suffix("").as_posix(): p
                  for p in sorted(self.image_root.rglob("*")) if p.suffix.lower() in IMG_EXTENSIONS and p.is_file()}
        masks = {p.relative_to(self.mask_root).with_suffix("").as_posix(): p
                 for p in sorted(self.mask_root.rglob("*.png")) if p.is_file()}
        no_mask = sorted(set(images) - set(masks))
        no_image = sorted(set(masks) - set(images))
        if no_mask or no_image:
            parts = []
            if no_mask:
                parts.append(f"{len(no_mask)} image(s) without a mask in {self.mask_root} "
                             f"(e.g. {images[no_mask[0]].name} needs {no_mask[0]}.png)")
            if no_image:
                parts.append(f"{len(no_image)} mask(s) without an image in {self.image_root} "
                             f"(e.g. {masks[no_image[0]].name})")
            raise InputError("unpaired files: " + "; ".join(parts))
        if not images:
            raise InputError(f"no images in {self.image_root} (extensions: {', '.join(IMG_EXTENSIONS)})")
        self.samples = [(images[k], masks[k]) for k in sorted(images)]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.samples)

    def __repr__(self) -> str:
        return f"SegmentationFolder({self.root}, {len(self)} pairs, {self.num_classes} classes)"

    def load_mask(self, path: Path, expected_size: tuple[int, int] | None = None) -> Tensor:
        """A mask file -> (H, W) int64 labels, checked against the class list.

        Args:
            path: The PNG mask.
            expected_size: The image's (width, height), checked when given.
        """
        try:
            with Image.open(path) as im:
                im.load()
                mode, size = im.mode, im.size
                arr = np.array(im)
        except (OSError, SyntaxError, ValueError) as e:
            raise InputError(f"cannot read mask {path} (corrupt or not an image): {e}") from None
        if mode not in MASK_MODES:
            raise InputError(
                f"mask {path} is a {mode} image; masks must be single-channel (mode L) or palette (mode P) PNGs "
                "whose pixel values are class indices"
            )
        if expected_size is not None and size != expected_size:
            raise InputError(
                f"mask {path} is {size[0]}x{size[1]} but its image is {expected_size[0]}x{expected_size[1]} (width x height)"
            )
        labels = torch.from_numpy(arr.astype(np.int64))
        if self.reduce_zero_label:
            labels = torch.where(labels == 0, self.ignore_index, labels - 1)
            labels = torch.where(labels == self.ignore_index - 1, self.ignore_index, labels)
        bad = (labels != self.ignore_index) & ((labels < 0) | (labels >= self.num_classes))
        if bad.any():
            values = sorted(set(labels[bad].unique().tolist()))
            raise InputError(
                f"mask {path} has label value(s) {values[:5]} outside the {self.num_classes} classes "
                f"(0..{self.num_classes - 1}) and not the ignore index {self.ignore_index}"
            )
        return labels

    def __getitem__(self, index: int) -> dict[str, Any]:
        image_path, mask_path = self.samples[index]
        pil = load_image(image_path)
        mask = self.load_mask(mask_path, expected_size=pil.size)
        if self.channels == 1:
            pil = pil.convert("L")
        arr = np.asarray(pil, dtype=np.float32) / 255.0
        image = torch.from_numpy(arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1).copy())  # (H, W, C) -> (C, H, W)
        if self.transform is not None:
            image, mask = self.transform(image, mask)
        return {"image": image, "semantic_mask": mask, "image_path": str(image_path), "mask_path": str(mask_path)}

    def verify(self) -> None:
        """Check every pair (readable, same size, known labels); raise on the first problem."""
        for image_path, mask_path in self.samples:
            with Image.open(image_path) as im:
                size = im.size
            self.load_mask(mask_path, expected_size=size)
