"""Semantic segmentation as a task of the training engine (``task: segmentation``).

What it owns: batches of ([0, 1] images (B, C, H, W), masks (B, H, W)) prepared on the
device (:class:`~vitlab.datasets.augment.dense.DenseAugment` moving the masks with the
images, drawn from the engine's generator; then the normalisation), the loss
(cross-entropy with an ignore index, optional Dice, weighted auxiliary heads), the
metrics (mIoU primary, per-class IoU, pixel accuracy, loss) and the plots (curves and
overlays of predictions vs ground truth on fixed validation images).

Options live in the config's ``segmentation`` section (:class:`SegmentationSection`);
``model`` names and overrides the backbone. Data: ``data.dataset: digit_scenes`` (also the
plain default ``digits``) draws scenes of scikit-learn digits (background + 10 classes);
any other value is a folder::

    ROOT/classes.txt                one class name per line (line i: label value i)
    ROOT/images/{train,val,test}/   images
    ROOT/masks/{train,val,test}/    single-channel or palette PNG masks of the same names

(``test`` optional; folder names set by ``segmentation.image_dir`` / ``mask_dir``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from ...datasets.transforms import normalize
from ..base import Batch, Metrics, RunConfig, Task, resize_images
from ..registry import TaskSetup, register_task
from .losses import SegmentationLoss
from .metrics import SegmentationMetrics
from .model import HEADS, UPSAMPLES, HeadOptions, SegmentationModel, build_segmenter

#: Mean and std of digit-scene pixels (measured on 300 training scenes of 64x64).
SCENES_MEAN, SCENES_STD = (0.075,), (0.21,)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
SCENE_DATASETS = ("digit_scenes", "digits")

#: What ``vitlab train --task segmentation`` runs without ``--config`` (configs/segmentation.yaml
#: holds the same values; a test keeps the two equal): digit scenes of 64x64 (background + 10
#: digit classes), chosen with benchmarks/segmentation.py.
SEGMENTATION_RECIPE: dict[str, Any] = {
    "recipe": "segmentation",
    "task": "segmentation",
    "model": {"name": "pvt_v2_b0", "overrides": {}},
    "data": {"dataset": "digit_scenes", "batch_size": 32, "eval_batch_size": 64},
    "segmentation": {"head": "mlp", "upsample": "bilinear", "channels": 64, "train_scenes": 2000, "val_scenes": 200,
                     "test_scenes": 500, "canvas_size": 64, "crop_scale": [0.5, 1.0]},
    "optim": {"lr": 1e-3, "weight_decay": 0.05, "warmup_epochs": 1, "min_lr": 1e-5, "clip_grad": 1.0},
    "epochs": 30,
    "seed": 0,
}


@dataclass
class SegmentationSection(HeadOptions):
    """The segmentation task's options (config section ``segmentation``).

    Model: ``head`` (setr_naive | setr_pup | setr_mla | mlp | fpn), ``upsample`` (bilinear |
    attention), ``channels`` (head width), ``indices`` (backbone maps the head reads; empty:
    the head's default), ``aux_indices`` / ``aux_weights`` (a naive auxiliary head per
    backbone map, training only), ``attn_heads``, ``dropout``.
    Loss: ``dice_weight`` (0: cross-entropy only), ``ignore_index``, ``label_smoothing``.
    Augmentation on the device (``augment: false`` switches it off): random resized crop of
    ``crop_scale`` / ``crop_ratio``, flip with probability ``hflip``, affine (``affine_degrees``,
    ``affine_translate``, ``affine_p``).
    Digit scenes: ``train_scenes`` / ``val_scenes`` / ``test_scenes``, ``canvas_size``,
    ``max_digits``, ``digit_size``, ``clutter``.
    Folders: ``image_dir`` / ``mask_dir`` (``{split}`` is replaced by train, val, test),
    ``reduce_zero_label`` (ADE20K).
    Plots: ``overlays`` validation images drawn with their predictions at the end of a run.
    """

    dice_weight: float = 0.0
    ignore_index: int = 255
    label_smoothing: float = 0.0
    augment: bool = True
    crop_scale: tuple[float, float] = (0.5, 1.0)
    crop_ratio: tuple[float, float] = (0.75, 1.3333333333333333)
    hflip: float = 0.0
    affine_degrees: float = 0.0
    affine_translate: float = 0.0
    affine_p: float = 0.5
    train_scenes: int = 2000
    val_scenes: int = 200
    test_scenes: int = 500
    canvas_size: int = 64
    max_digits: int = 4
    digit_size: tuple[int, int] = (12, 28)
    clutter: int = 0
    image_dir: str = "images/{split}"
    mask_dir: str = "masks/{split}"
    reduce_zero_label: bool = False
    overlays: int = 6

    def __post_init__(self) -> None:
        errors = []
        if self.head not in HEADS:
            errors.append(f"segmentation.head must be one of {', '.join(HEADS)}, got {self.head!r}")
        if self.upsample not in UPSAMPLES:
            errors.append(f"segmentation.upsample must be one of {', '.join(UPSAMPLES)}, got {self.upsample!r}")
        if len(self.aux_indices) != len(self.aux_weights):
            errors.append(f"segmentation.aux_weights needs one weight per aux index: got {len(self.aux_weights)} "
                          f"weight(s) for aux_indices {list(self.aux_indices)}")
        if self.dice_weight < 0 or any(w < 0 for w in self.aux_weights):
            errors.append("segmentation.dice_weight and aux_weights must be >= 0")
        if not 0 <= self.ignore_index:
            errors.append(f"segmentation.ignore_index must be >= 0, got {self.ignore_index}")
        if not (0 < self.crop_scale[0] <= self.crop_scale[1] <= 1):
            errors.append(f"segmentation.crop_scale must be a range inside (0, 1], got {list(self.crop_scale)}")
        for name in ("hflip", "affine_p"):
            if not 0 <= getattr(self, name) <= 1:
                errors.append(f"segmentation.{name} must be in [0, 1], got {getattr(self, name)}")
        if min(self.train_scenes, self.val_scenes) < 1 or self.test_scenes < 0:
            errors.append("segmentation.train_scenes and val_scenes must be >= 1, test_scenes >= 0")
        if errors:
            raise ValueError("invalid segmentation config: " + "; ".join(errors))


# --------------------------------------------------------------------------- data
class SceneMasks(Dataset):
    """Digit scenes as (image (1, H, W), semantic mask (H, W)) pairs: 0 background, d + 1 digit d.

    Scenes are drawn once and kept (a scene depends only on its index, so this changes no
    value; it saves redrawing them every epoch).
    """

    classes = ["background"] + [str(d) for d in range(10)]

    def __init__(self, scenes: Any) -> None:
        self.scenes = scenes
        self.num_classes = len(self.classes)
        self._cache: dict[int, tuple[Tensor, Tensor]] = {}

    def __len__(self) -> int:
        return len(self.scenes)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        if index not in self._cache:
            s = self.scenes[index]
            self._cache[index] = (s["image"], s["semantic_mask"].to(torch.uint8))
        x, m = self._cache[index]
        return x, m.long()


class FolderMasks(Dataset):
    """A :class:`~vitlab.datasets.seg_folder.SegmentationFolder` as (image, mask) pairs at one size.

    Images are resized bilinearly (antialiased) and masks by nearest neighbour to
    ``size x size``, so batches stack; the aspect ratio is not kept.
    """

    def __init__(self, folder: Any, size: int) -> None:
        self.folder, self.size = folder, size
        self.classes = list(folder.classes)
        self.num_classes = len(self.classes)

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        s = self.folder[index]
        x, m = s["image"], s["semantic_mask"]
        if tuple(x.shape[-2:]) != (self.size, self.size):
            x = resize_images(x[None], self.size)[0]  # (C, H, W) -> (1, C, H, W) -> (C, size, size)
            # (H, W) -> (1, 1, H, W) -> (size, size)
            m = F.interpolate(m[None, None].float(), size=(self.size, self.size), mode="nearest")[0, 0].long()
        return x, m


def scene_splits(s: SegmentationSection, seed: int = 0) -> tuple[SceneMasks, SceneMasks, SceneMasks | None]:
    """Train/val/test digit-scene datasets of the section's sizes (scenes of disjoint digit splits)."""
    from ...datasets.digit_scenes import DigitScenes

    def make(split: str, n: int) -> SceneMasks:
        return SceneMasks(DigitScenes(split, num_scenes=n, canvas_size=s.canvas_size, max_digits=s.max_digits,
                                      digit_size=tuple(s.digit_size), clutter=s.clutter, seed=seed))

    return (make("train", s.train_scenes), make("val", s.val_scenes),
            make("test", s.test_scenes) if s.test_scenes else None)


def folder_splits(root: str | Path, s: SegmentationSection, size: int,
                  channels: int = 3) -> tuple[FolderMasks, FolderMasks, FolderMasks | None]:
    """Train/val(/test) datasets from a segmentation folder (see the module docstring).

    Raises:
        InputError: A missing folder, class list or unpaired file (from SegmentationFolder).
    """
    from ...datasets.seg_folder import SegmentationFolder

    root = Path(root)

    def make(split: str) -> FolderMasks:
        return FolderMasks(SegmentationFolder(root, image_dir=s.image_dir.format(split=split),
                                              mask_dir=s.mask_dir.format(split=split), ignore_index=s.ignore_index,
                                              reduce_zero_label=s.reduce_zero_label, channels=channels), size)

    test = None
    if (root / s.image_dir.format(split="test")).is_dir():
        test = make("test")
    return make("train"), make("val"), test


# --------------------------------------------------------------------------- metrics
class SegmentationTrainMetrics(Metrics):
    """Training pixel accuracy on the augmented batches (ignored pixels left out)."""

    def __init__(self, ignore_index: int = 255) -> None:
        self.ignore_index, self.correct, self.pixels, self.n = ignore_index, 0, 0, 0

    def update(self, batch: Batch, outputs: Any) -> None:
        logits = outputs[0] if isinstance(outputs, tuple) else outputs
        valid = batch.targets != self.ignore_index
        self.correct += int(((logits.detach().argmax(1) == batch.targets) & valid).sum())
        self.pixels += int(valid.sum())
        self.n += batch.size

    def compute(self) -> dict[str, Any]:
        return {"pixel_accuracy": self.correct / max(self.pixels, 1), "n": self.n}


class SegmentationEvalMetrics(Metrics):
    """mIoU, per-class IoU (``iou_<class>`` scalars and the ``per_class_iou`` list), pixel
    accuracy and the cross-entropy of the evaluation logits (ignored pixels left out).

    Args:
        num_classes: K.
        ignore_index: Label of pixels that do not count.
        labels: Class names (for the ``iou_<class>`` keys; indices without them).
    """

    def __init__(self, num_classes: int, ignore_index: int = 255, labels: Sequence[str] | None = None) -> None:
        self.cm = SegmentationMetrics(num_classes, ignore_index)
        self.labels = list(labels) if labels is not None else [str(i) for i in range(num_classes)]
        self.loss_sum, self.pixels, self.n = 0.0, 0, 0

    def update(self, batch: Batch, outputs: Any) -> None:
        logits = (outputs[0] if isinstance(outputs, tuple) else outputs).float()
        y = batch.targets
        self.cm.update(logits.argmax(1), y)
        valid = int((y != self.cm.ignore_index).sum())
        if valid:
            self.loss_sum += float(F.cross_entropy(logits, y, ignore_index=self.cm.ignore_index, reduction="sum"))
        self.pixels += valid
        self.n += batch.size

    def compute(self) -> dict[str, Any]:
        res = self.cm.compute()
        out: dict[str, Any] = {"mIoU": res["mIoU"], "pixel_accuracy": res["pixel_accuracy"],
                               "loss": self.loss_sum / max(self.pixels, 1), "n": self.n,
                               "per_class_iou": res["per_class_iou"], "confusion": self.cm.confusion.clone()}
        for name, v in zip(self.labels, res["per_class_iou"]):
            out[f"iou_{_key(name)}"] = v
        return out


def _key(name: str) -> str:
    return re.sub(r"[^0-9A-Za-z_]+", "_", name).strip("_") or "class"


# --------------------------------------------------------------------------- the task
@register_task("segmentation")
class SegmentationTask(Task):
    """Semantic segmentation: batches of ([0, 1] images (B, C, H, W), masks (B, H, W)).

    Args:
        num_classes: K (background included).
        labels: Class names.
        mean: Normalisation mean applied on the device.
        std: Normalisation std.
        augment: A :class:`~vitlab.datasets.augment.dense.DenseAugment` (training only).
        criterion: The loss (default: cross-entropy ignoring ``ignore_index``).
        ignore_index: Mask value of pixels that do not count.
        overlay_data: Fixed (images, masks) drawn with the model's predictions by :meth:`plots`.
        model: The model :meth:`plots` draws the overlays with (the one being trained).
    """

    primary_metric = "mIoU"
    higher_is_better = True
    config_section = "segmentation"
    config_class = SegmentationSection
    default_recipe = SEGMENTATION_RECIPE
    families = ("segmenter",)

    def __init__(self, num_classes: int, labels: Sequence[str] | None = None, mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None, augment: Any | None = None,
                 criterion: SegmentationLoss | None = None, ignore_index: int = 255,
                 overlay_data: tuple[Tensor, Tensor] | None = None, model: nn.Module | None = None) -> None:
        self.num_classes = num_classes
        self.labels = list(labels) if labels is not None else None
        self.mean = tuple(mean) if mean is not None else None
        self.std = tuple(std) if std is not None else None
        self.augment = augment
        self.ignore_index = ignore_index
        self.criterion = criterion or SegmentationLoss(ignore_index)
        self.overlay_data = overlay_data
        self.model = model

    def prepare(self, batch: Any, device: torch.device, image_size: int | None,
                generator: torch.Generator | None) -> Batch:
        x, m = batch
        x = x.to(device, non_blocking=True).float()
        m = m.to(device, non_blocking=True).long()
        if generator is not None and self.augment is not None:
            out = self.augment(x, masks=m, generator=generator)
            x, m = out.images, out.masks
        if image_size is not None and tuple(x.shape[-2:]) != (image_size, image_size):
            # (B, C, H, W) -> (B, C, S, S); masks (B, H, W) -> (B, 1, H, W) -> (B, S, S), nearest
            x = resize_images(x, image_size)
            m = F.interpolate(m[:, None].float(), size=(image_size, image_size), mode="nearest")[:, 0].long()
        if self.mean is not None and self.std is not None:
            x = normalize(x, self.mean, self.std)
        return Batch(x, m, int(x.shape[0]))

    def loss(self, batch: Batch, outputs: Any) -> Tensor:
        if isinstance(outputs, tuple):
            logits, aux = outputs
            return self.criterion(logits.float(), batch.targets, [a.float() for a in aux])
        return self.criterion(outputs.float(), batch.targets)

    def train_metrics(self) -> Metrics:
        return SegmentationTrainMetrics(self.ignore_index)

    def eval_metrics(self) -> Metrics:
        return SegmentationEvalMetrics(self.num_classes, self.ignore_index, self.labels)

    def format_metric(self, name: str, value: float) -> str:
        return f"{name} {value:.4f}"

    @torch.no_grad()
    def predict_overlays(self, model: nn.Module) -> tuple[Tensor, Tensor, Tensor] | None:
        """(images in [0, 1], masks, predictions) of the fixed overlay images, or None without them."""
        if self.overlay_data is None:
            return None
        images, masks = self.overlay_data
        was = model.training
        model.eval()
        try:
            device = next(model.parameters()).device
            x = images.to(device)
            if self.mean is not None and self.std is not None:
                x = normalize(x, self.mean, self.std)
            pred = model(x).argmax(1).cpu()
        finally:
            model.train(was)
        return images, masks, pred

    def plots(self, out_dir: Path, history: Sequence[dict[str, Any]], final: dict[str, Any] | None) -> list[Path]:
        from .visualize import plot_segmentation_curves, save_overlay_grid

        files = []
        if history:
            files.append(plot_segmentation_curves(history, Path(out_dir) / "curves.png"))
        drawn = self.predict_overlays(self.model) if self.model is not None else None
        if drawn is not None:
            images, masks, pred = drawn
            files.append(save_overlay_grid(list(images), list(masks), list(pred), Path(out_dir) / "overlays.png",
                                           self.labels, self.ignore_index))
        return files

    @classmethod
    def from_config(cls, cfg: RunConfig) -> TaskSetup:
        """Datasets, model, augmentation and loss of a run from a ``TrainConfig``.

        ``cfg.model.name`` is the backbone, built with ``cfg.model.overrides`` for the data's
        channels and size (``data.image_size``, default: the canvas / 224 for folders).
        The model's ``pretrained_cfg`` records the normalisation and the data it was trained
        on (``vitlab eval`` rebuilds the digit scenes from it). Sets ``cfg.data.image_size``.
        """
        s: SegmentationSection = cfg.segmentation
        data = cfg.data
        if str(data.dataset).lower() in SCENE_DATASETS:
            # "digits" is the config's default dataset (no data chosen): its 8x8 size is not the scenes'
            given = data.image_size if str(data.dataset).lower() == "digit_scenes" else None
            size = int(given or s.canvas_size)
            train_set, val_set, test_set = scene_splits(s, seed=0)
            mean, std, channels = SCENES_MEAN, SCENES_STD, 1
            source: dict[str, Any] = {"dataset": "digit_scenes", "canvas_size": s.canvas_size,
                                      "max_digits": s.max_digits, "digit_size": list(s.digit_size),
                                      "clutter": s.clutter, "test_scenes": s.test_scenes, "val_scenes": s.val_scenes}
        else:
            size = int(data.image_size or 224)
            channels = int(cfg.model.overrides.get("in_channels", 3))
            train_set, val_set, test_set = folder_splits(data.dataset, s, size, channels)
            mean, std = (IMAGENET_MEAN, IMAGENET_STD) if channels == 3 else ((0.5,), (0.25,))
            source = {"dataset": str(data.dataset)}
        cfg.data.image_size = size
        labels = list(train_set.classes)
        overrides = {k: v for k, v in cfg.model.overrides.items() if k not in ("in_channels", "image_size")}
        model = build_segmenter(cfg.model.name, len(labels), head=s.head, in_channels=channels, image_size=size,
                                backbone_overrides=overrides, upsample=s.upsample, channels=s.channels,
                                indices=list(s.indices), aux_indices=list(s.aux_indices),
                                aux_weights=list(s.aux_weights), attn_heads=s.attn_heads, dropout=s.dropout)
        if cfg.model.pretrained:
            from ...pretrained import load_pretrained, read_checkpoint

            load_pretrained(model.backbone, read_checkpoint(cfg.model.pretrained))
        model.pretrained_cfg = {"input_size": [channels, size, size], "mean": list(mean), "std": list(std),
                                "ignore_index": s.ignore_index, "data": source}
        augment = None
        if s.augment:
            from ...datasets.augment.dense import DenseAugment

            augment = DenseAugment(size, scale=tuple(s.crop_scale), ratio=tuple(s.crop_ratio), hflip=s.hflip,
                                   degrees=s.affine_degrees, translate=(s.affine_translate, s.affine_translate),
                                   affine_p=s.affine_p, fill_label=s.ignore_index)
        criterion = SegmentationLoss(s.ignore_index, s.dice_weight, s.aux_weights, s.label_smoothing)
        overlay = None
        if s.overlays > 0:
            pairs = [val_set[i] for i in range(min(s.overlays, len(val_set)))]
            overlay = (torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs]))
        task = cls(len(labels), labels, mean, std, augment, criterion, s.ignore_index, overlay, model)
        return TaskSetup(task, model, train_set, val_set, test_set)


__all__ = ["FolderMasks", "SceneMasks", "SegmentationEvalMetrics", "SegmentationSection", "SegmentationTask",
           "SegmentationTrainMetrics", "folder_splits", "scene_splits"]
