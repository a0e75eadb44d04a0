"""Image-caption datasets for CLIP-style training.

Every sample is a dict ``{"image": (C, H, W) float32 in [0, 1], "caption": str, "label": int}``.
``label`` groups samples that describe the same thing (a digit's class, a scene's layout, the
same caption text): the contrastive loss treats every pair within a group as a positive, so
duplicate captions in a batch are never pushed apart.

- :class:`DigitCaptions`: scikit-learn digits with varied templates ("a handwritten 7",
  "the digit seven", ...); the label is the class.
- :class:`SceneCaptions`: two-digit scenes (:class:`~vitlab.datasets.digit_scenes.DigitScenes`)
  with compositional captions from the boxes ("a 3 to the left of a 7" is not
  "a 7 to the left of a 3"); the label is the (relation, first digit, second digit) layout.
  Every scene also carries ``negative_caption``: its caption with the two digits exchanged
  (the mirror layout, the hardest negative of a bag-of-words model; "" when there is none)
  and ``negative_label``, that layout's label (-1 when there is none).
- :class:`CaptionFolder`: a user's folder of images with ``captions.csv`` or
  ``captions.jsonl`` (columns ``image`` and ``caption``).
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from torch import Tensor
from torch.utils.data import Dataset

from .digit_scenes import DigitScenes
from .digits import SPLITS, DigitsDataset
from .transforms import load_image, resize, to_tensor

#: Spelled-out digit names (index = class).
DIGIT_WORDS: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

#: Caption templates of single digits; ``{}`` is the digit, written as a numeral or a word.
DIGIT_TEMPLATES: tuple[str, ...] = (
    "a handwritten {}",
    "the digit {}",
    "a photo of the number {}",
    "an image of a {}",
    "a drawing of a {}",
    "the number {}",
    "a scanned {}",
    "a small picture of the digit {}",
)

#: Relations of two-digit scenes: (name, template of "a before b", template of the converse).
RELATIONS: tuple[tuple[str, str, str], ...] = (
    ("left", "a {a} to the left of a {b}", "a {b} to the right of a {a}"),
    ("above", "a {a} above a {b}", "a {b} below a {a}"),
)


def digit_prompts(templates: Sequence[str] = DIGIT_TEMPLATES) -> list[list[str]]:
    """Zero-shot prompts per digit class: every template with the numeral and with the word.

    Returns:
        10 lists (class 0..9) of ``2 * len(templates)`` captions each.
    """
    return [[t.format(name) for t in templates for name in (str(d), DIGIT_WORDS[d])] for d in range(10)]


class DigitCaptions(Dataset):
    """The scikit-learn digits (:class:`~vitlab.datasets.digits.DigitsDataset` splits) with captions.

    Sample ``i`` is digit ``i % n`` with a caption drawn from ``templates`` and the digit's
    numeral or word by a generator seeded with ``(seed, i)``; with ``captions_per_image > 1``
    every digit appears that many times with (usually) different captions.

    Args:
        split: ``"train"``, ``"val"`` or ``"test"`` (disjoint digits).
        templates: Caption templates (``{}`` = the digit).
        captions_per_image: How many captioned copies of every digit the dataset holds.
        seed: Seed of the caption choice.
        split_seed: Seed of the digit split (as ``DigitsDataset(seed=...)``).
    """

    num_classes = 10

    def __init__(self, split: str = "train", templates: Sequence[str] = DIGIT_TEMPLATES, captions_per_image: int = 1,
                 seed: int = 0, split_seed: int = 0) -> None:
        if not templates or any("{}" not in t for t in templates):
            raise ValueError("every digit caption template must contain '{}' (where the digit goes)")
        if captions_per_image < 1:
            raise ValueError(f"captions_per_image must be >= 1, got {captions_per_image}")
        self.digits = DigitsDataset(split, seed=split_seed)
        self.split, self.templates, self.seed = split, tuple(templates), seed
        self.captions_per_image = captions_per_image
        self.classes = list(DIGIT_WORDS)
        self.mean, self.std = self.digits.mean, self.digits.std

    def __len__(self) -> int:
        return len(self.digits) * self.captions_per_image

    def corpus(self) -> list[str]:
        """Every caption this dataset can produce (to train a tokenizer on)."""
        return [t.format(n) for t in self.templates for d in range(10) for n in (str(d), DIGIT_WORDS[d])]

    def caption(self, index: int) -> str:
        """The caption of sample ``index``."""
        label = self.digits.targets[index % len(self.digits)]
        rng = np.random.default_rng([self.seed, SPLITS.index(self.split), index])
        template = self.templates[int(rng.integers(len(self.templates)))]
        name = str(label) if rng.integers(2) == 0 else DIGIT_WORDS[label]
        return template.format(name)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < len(self):
            raise IndexError(f"sample {index} out of range for {len(self)} samples")
        image, label = self.digits[index % len(self.digits)]
        return {"image": image, "caption": self.caption(index), "label": int(label)}


def scene_caption(boxes: Tensor, labels: Tensor, converse: bool = False) -> tuple[str, int]:
    """The compositional caption of a two-digit scene and its layout group.

    The relation is left/right when the box centres are further apart horizontally than
    vertically, else above/below; the first digit is the left (upper) one. ``converse`` says
    the same layout the other way round ("a 7 to the right of a 3").

    Args:
        boxes: (2, 4) xyxy boxes.
        labels: (2,) digit classes.
        converse: Use the converse template.

    Returns:
        The caption and the group ``relation * 100 + first * 10 + second`` (a one-digit
        scene: "a single 3", group ``200 + digit``).
    """
    if boxes.shape[0] == 1:
        return f"a single {int(labels[0])}", 200 + int(labels[0])
    if boxes.shape[0] != 2:
        raise ValueError(f"a compositional caption needs one or two digits, got {boxes.shape[0]}")
    cx = (boxes[:, 0] + boxes[:, 2]) / 2
    cy = (boxes[:, 1] + boxes[:, 3]) / 2
    rel = 0 if abs(float(cx[1] - cx[0])) >= abs(float(cy[1] - cy[0])) else 1
    key = cx if rel == 0 else cy
    first, second = (0, 1) if float(key[0]) <= float(key[1]) else (1, 0)
    a, b = int(labels[first]), int(labels[second])
    _, forward, backward = RELATIONS[rel]
    return (backward if converse else forward).format(a=a, b=b), rel * 100 + a * 10 + b


class SceneCaptions(Dataset):
    """Two-digit scenes (no overlap) captioned with where the digits are relative to each other.

    The captions are compositional: "a 3 to the left of a 7" and "a 7 to the left of a 3"
    use the same words, so a bag-of-words model cannot tell their images apart. Scenes of a
    split hold only that split's digits (see :class:`~vitlab.datasets.digit_scenes.DigitScenes`).

    Args:
        split: ``"train"``, ``"val"`` or ``"test"``.
        num_scenes: Number of scenes.
        canvas_size: Canvas side in pixels.
        digit_size: Smallest and largest digit side.
        converse: Probability of the converse phrasing ("a 7 to the right of a 3").
        seed: Seed of the scenes and of the phrasing.
    """

    num_classes = 300
    mean: tuple[float, ...] = (0.5,)
    std: tuple[float, ...] = (0.5,)

    def __init__(self, split: str = "train", num_scenes: int = 2000, canvas_size: int = 24,
                 digit_size: tuple[int, int] = (8, 11), converse: float = 0.5, seed: int = 0) -> None:
        if not 0.0 <= converse <= 1.0:
            raise ValueError(f"converse must be a probability in [0, 1], got {converse}")
        self.scenes = DigitScenes(split, num_scenes=num_scenes, canvas_size=canvas_size, min_digits=2, max_digits=2,
                                  digit_size=digit_size, max_overlap=0.0, seed=seed)
        self.split, self.converse, self.seed = split, converse, seed
        self.canvas_size = canvas_size
        self.classes = [str(d) for d in range(10)]

    def __len__(self) -> int:
        return len(self.scenes)

    def corpus(self) -> list[str]:
        """Every caption a scene can get (to train a tokenizer on)."""
        out = [f"a single {a}" for a in range(10)]
        for _, forward, backward in RELATIONS:
            out += [t.format(a=a, b=b) for t in (forward, backward) for a in range(10) for b in range(10)]
        return out

    def __getitem__(self, index: int) -> dict[str, Any]:
        s = self.scenes[index]
        rng = np.random.default_rng([self.seed, 7, SPLITS.index(self.split), index])
        converse = bool(rng.random() < self.converse)
        caption, group = scene_caption(s["boxes"], s["labels"], converse=converse)
        # the same boxes with the digits exchanged: the mirror layout in the same phrasing
        negative, neg_group = scene_caption(s["boxes"], s["labels"].flip(0), converse=converse)
        return {"image": s["image"], "caption": caption, "label": group,
                "negative_caption": negative if neg_group != group else "",
                "negative_label": neg_group if neg_group != group else -1}


#: Column names a caption file must have.
CAPTION_COLUMNS = ("image", "caption")
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def _read_text(file: Path) -> str:
    """The UTF-8 text of ``file`` (a leading byte-order mark dropped).

    Raises:
        ValueError: The file is not UTF-8; the message names the file and the line of the first bad byte.
    """
    data = file.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise ValueError(f"{file} line {line} is not UTF-8 text (byte {data[e.start]:#04x} at offset {e.start}); "
                         f"save the caption file as UTF-8") from None


def _read_caption_rows(file: Path) -> list[tuple[int, str, str]]:
    """(line number, image, caption) of every row of a CSV or JSONL caption file."""
    rows: list[tuple[int, str, str]] = []
    text = _read_text(file)
    if file.suffix.lower() == ".csv":
        with io.StringIO(text, newline="") as f:
            reader = csv.DictReader(f)
            missing = [c for c in CAPTION_COLUMNS if c not in (reader.fieldnames or [])]
            if missing:
                raise ValueError(f"{file} must have the columns 'image' and 'caption'; it lacks {missing} "
                                 f"(found columns: {reader.fieldnames})")
            for line, rec in enumerate(reader, start=2):
                rows.append((line, rec["image"] or "", rec["caption"] or ""))
    else:
        for line, row in enumerate(text.splitlines(), start=1):
            if not row.strip():
                continue
            try:
                rec = json.loads(row)
            except json.JSONDecodeError as e:
                raise ValueError(f"{file} line {line} is not valid JSON: {e.msg}") from None
            if not isinstance(rec, dict) or any(c not in rec for c in CAPTION_COLUMNS):
                keys = sorted(rec) if isinstance(rec, dict) else type(rec).__name__
                raise ValueError(f"{file} line {line} must be an object with the keys 'image' and 'caption'; "
                                 f"found {keys}")
            rows.append((line, str(rec["image"]), str(rec["caption"])))
    return rows


class CaptionFolder(Dataset):
    """A folder of images captioned by ``captions.csv`` or ``captions.jsonl`` (or a given file).

    Each row names an image (a path relative to the folder) and its caption; an image may
    appear on several rows (several captions). Samples with the same caption text share a
    label (positives of each other). Every row is checked when the dataset is built: a
    missing image, an empty caption or a wrong column is one clear error naming the file and
    line. Images are read when a sample is asked for, converted to ``channels`` and resized
    to ``image_size`` (bilinear, antialiased).

    Args:
        root: The folder.
        captions: The caption file; ``root/captions.csv`` or ``root/captions.jsonl`` when None.
        split: ``"train"``, ``"val"`` or ``"all"``: rows are split by a seeded shuffle of the
            distinct images (an image's captions stay together).
        val_fraction: Fraction of images in ``val``.
        image_size: Output side.
        channels: 1 (grey) or 3 (colour).
        seed: Seed of the split.

    Raises:
        FileNotFoundError: No folder, no caption file, or an image a row names is missing.
        ValueError: A wrong column or key, an empty caption, or an empty file.
    """

    mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    std: tuple[float, ...] = (0.5, 0.5, 0.5)

    def __init__(self, root: str | Path, captions: str | Path | None = None, split: str = "all",
                 val_fraction: float = 0.1, image_size: int = 224, channels: int = 3, seed: int = 0) -> None:
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"caption folder not found: {root}")
        if split not in ("train", "val", "all"):
            raise ValueError(f"unknown caption folder split {split!r}; choose train, val or all")
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels}")
        if captions is None:
            found = [root / n for n in ("captions.csv", "captions.jsonl") if (root / n).is_file()]
            if not found:
                raise FileNotFoundError(f"{root} has no captions.csv or captions.jsonl (columns: image, caption)")
            file = found[0]
        else:
            file = Path(captions) if Path(captions).is_absolute() or Path(captions).exists() else root / captions
            if not file.is_file():
                raise FileNotFoundError(f"caption file not found: {file}")
        rows = _read_caption_rows(file)
        if not rows:
            raise ValueError(f"{file} holds no captions")
        items: list[tuple[Path, str]] = []
        for line, image, caption in rows:
            where = f"{file.name} line {line}"
            if not caption.strip():
                raise ValueError(f"{where}: empty caption for image {image!r}")
            if not image.strip():
                raise ValueError(f"{where}: empty image path")
            path = root / image
            if not path.is_file():
                raise FileNotFoundError(f"{where}: image {image!r} not found in {root}")
            if path.suffix.lower() not in _IMAGE_SUFFIXES:
                raise ValueError(f"{where}: {image!r} is not an image file (expected one of {', '.join(_IMAGE_SUFFIXES)})")
            items.append((path, " ".join(caption.split())))
        if split != "all":
            images = sorted({p for p, _ in items})
            order = np.random.default_rng(seed).permutation(len(images))
            n_val = int(round(len(images) * val_fraction))
            val = {images[i] for i in order[:n_val]}
            items = [it for it in items if (it[0] in val) == (split == "val")]
        self.root, self.file, self.split = root, file, split
        self.items = items
        groups: dict[str, int] = {}
        self.labels = [groups.setdefault(c, len(groups)) for _, c in items]
        self.image_size, self.channels = image_size, channels
        self.mean, self.std = self.mean[:channels], self.std[:channels]

    def __len__(self) -> int:
        return len(self.items)

    def corpus(self) -> list[str]:
        """The captions of this split (to train a tokenizer on)."""
        return [c for _, c in self.items]

    def __getitem__(self, index: int) -> dict[str, Any]:
        path, caption = self.items[index]
        x = to_tensor(load_image(path))  # (3, H, W) in [0, 1]
        if self.channels == 1:
            x = x.mean(dim=0, keepdim=True)  # (3, H, W) -> (1, H, W)
        x = resize(x[None], (self.image_size, self.image_size), "bilinear")[0]  # (1, C, H, W) -> (C, S, S)
        return {"image": x.float(), "caption": caption, "label": self.labels[index]}


__all__ = ["CAPTION_COLUMNS", "CaptionFolder", "DIGIT_TEMPLATES", "DIGIT_WORDS", "DigitCaptions", "RELATIONS",
           "SceneCaptions", "digit_prompts", "scene_caption"]
