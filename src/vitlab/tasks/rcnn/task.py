"""Instance segmentation as a task of the training engine (``task: instance``): Mask R-CNN.

What it owns:

- **data**: digit scenes (the default; every digit's instance mask) or a COCO-format folder
  (``data.dataset: coco``; polygon, RLE or uncompressed-RLE ``segmentation``), as in the
  detection task (``instance.scenes`` / ``instance.coco``); images are resized to the square
  ``data.image_size`` with their boxes and masks, and padded to a fixed object count;
- **augmentation** on the device: :class:`~vitlab.datasets.augment.dense.DenseAugment`, the
  instance masks carried through it as extra image channels (re-thresholded at 0.5) and the
  boxes recomputed from the moved masks (tight under rotation);
- **model**: :class:`~vitlab.tasks.rcnn.model.MaskRCNN` on ``model.name`` (``model.overrides``
  fit the backbone; ``instance.model`` holds :class:`MaskRCNNConfig`'s head options);
  ``model.pretrained`` or ``instance.pretrain_backbone`` (a digits classifier of the same
  backbone trained first, as the detection recipe does) initialises the backbone;
- **loss**: the RPN's objectness + box terms and the RoI heads' class, box and mask terms;
- **metrics**: COCO box and mask AP (pycocotools) on the evaluated split: ``AP50`` / ``AP``
  (boxes) and ``mask_AP50`` / ``mask_AP`` (masks, primary);
- **plots**: loss / AP curves and ``predictions.png`` (masks and boxes against the ground truth).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from ..base import Batch, Metrics, RunConfig, Task, resize_images
from ..registry import TaskSetup, register_task
from ..detection.coco_eval import COCO_METRICS, evaluate_coco
from ..detection.data import _check_keys, detection_sources
from ..detection.task import DETECTION_BACKBONE_RECIPE, DetectionTrainMetrics, build_dense_augment, pretrained_backbone
from .model import MaskRCNN, MaskRCNNConfig

#: Normalisation of the inputs ([0, 1] -> [-1, 1]), recorded in every checkpoint.
MEAN_STD = 0.5
MASK_METRICS = tuple(f"mask_{k}" for k in COCO_METRICS)
#: ViT options only the detector's backbone has (ViTDet's windowed blocks and relative positions).
VITDET_KEYS = ("window_size", "global_blocks", "rel_pos")

#: ``vitlab train --task instance``: ViTDet's recipe scaled to 64x64 digit scenes. The detection
#: recipe's ViT (patch 8, 4 blocks of width 128, no class token), first trained as a plain digits
#: classifier (``pretrain_backbone``), then with ViTDet's blocks: 4x4-token windows in blocks 0 and 2,
#: global attention in 1 and 3, decomposed relative positions (zero-initialised); the simple feature
#: pyramid's x2 / x1 / x0.5 levels (strides 4, 8, 16 at patch 8, as x4 / x2 / x1 are at ViTDet's
#: patch 16) plus P6, LayerNorm'd convolutions of width 64, 4conv1fc box and 4-conv mask heads of
#: width 32, anchors of 4x the stride, 32 RoIs sampled per image, 10 epochs. Test box / mask AP@.5
#: 0.944 / 0.945 in 18.6 CPU minutes, first step included (benchmarks/README.md).
INSTANCE_RECIPE: dict[str, Any] = {
    "recipe": "instance_digits",
    "task": "instance",
    "model": {"name": "vit_tiny_patch16_224",
              "overrides": {"patch_size": 8, "dim": 128, "depth": 4, "heads": 4, "mlp_dim": 256, "pool": "mean",
                            "class_token": False, "window_size": 4, "global_blocks": [1, 3],
                            "rel_pos": "decomposed"}},
    "data": {"dataset": "digit_scenes", "image_size": 64, "batch_size": 16, "eval_batch_size": 32},
    "optim": {"lr": 5e-4, "weight_decay": 0.05, "warmup_epochs": 1, "min_lr": 1e-6, "clip_grad": 1.0},
    "epochs": 10,
    "seed": 0,
    "instance": {
        "model": {"fpn_dim": 64, "conv_dim": 32, "fc_dim": 256, "pyramid_scales": [2.0, 1.0, 0.5],
                  "anchor_scale": 4.0, "canonical_scale": 32.0, "canonical_level": 3,
                  "rpn_pre_nms_top_n": [600, 300], "rpn_post_nms_top_n": [300, 150], "roi_batch_size": 32,
                  "detections_per_image": 20},
        "scenes": {"num_train": 2000, "num_val": 200, "num_test": 400, "min_digits": 1, "max_digits": 3,
                   "digit_size": [14, 24]},
        "augment": {"scale": [0.7, 1.0], "hflip": 0.0},
        "pretrain_backbone": True,
    },
}


@dataclass
class InstanceSection:
    """The instance task's options (config section ``instance``).

    ``model`` (keys of :class:`MaskRCNNConfig` other than the backbone's and the data's);
    ``scenes`` / ``coco`` / ``augment`` as in the detection section; ``num_plot_images``;
    ``pretrain_backbone`` (train a digits classifier of the backbone first; digit scenes only).
    """

    model: dict[str, Any] = field(default_factory=dict)
    scenes: dict[str, Any] = field(default_factory=dict)
    augment: dict[str, Any] | bool = field(default_factory=dict)
    coco: dict[str, Any] = field(default_factory=dict)
    num_plot_images: int = 6
    pretrain_backbone: bool = False


# --------------------------------------------------------------------------- data
class InstanceSamples(Dataset):
    """Instance datasets (``image``, ``boxes``, ``labels``, ``instance_masks``) as fixed-size samples.

    The image is resized (bilinear, antialiased) to ``size`` x ``size``, boxes scaled alike and
    masks resized bilinearly and thresholded at 0.5; objects are padded to ``max_objects``
    (label ``-1``). A sample: ``image`` (C, S, S), ``boxes`` (M, 4), ``labels`` (M,), ``masks``
    (M, S, S) bool, ``image_id``.
    """

    def __init__(self, dataset: Any, size: int, max_objects: int) -> None:
        self.dataset, self.size, self.max_objects = dataset, int(size), int(max_objects)
        self.classes = list(dataset.classes)
        self.num_classes = len(self.classes)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        s = self.dataset[index]
        if "instance_masks" not in s:
            raise ValueError(f"sample {s.get('image_id', index)} has no instance masks; the instance task needs "
                             "digit scenes or COCO annotations with a segmentation per object")
        image, boxes, labels = s["image"].float(), s["boxes"].float().reshape(-1, 4), s["labels"].long()
        masks = s["instance_masks"].bool()
        h, w = image.shape[-2:]
        n, size = len(labels), self.size
        if n > self.max_objects:
            raise ValueError(f"image {s['image_id']} has {n} objects; at most {self.max_objects} fit (max_objects)")
        if (h, w) != (size, size):
            image = resize_images(image[None], size)[0]  # (C, H, W) -> (C, S, S)
            boxes = boxes * torch.tensor([size / w, size / h] * 2)
            if n:
                masks = F.interpolate(masks[None].float(), size=(size, size), mode="bilinear",
                                      align_corners=False)[0] >= 0.5  # (n, H, W) -> (n, S, S)
        pad_boxes, pad_labels = torch.zeros(self.max_objects, 4), torch.full((self.max_objects,), -1, dtype=torch.int64)
        pad_masks = torch.zeros(self.max_objects, size, size, dtype=torch.bool)
        pad_boxes[:n], pad_labels[:n], pad_masks[:n] = boxes, labels, masks.reshape(n, size, size)
        return {"image": image, "boxes": pad_boxes, "labels": pad_labels, "masks": pad_masks,
                "image_id": int(s["image_id"])}


@dataclass
class InstanceInputs:
    """Normalised images and, in training, the targets and the sampling generator."""

    images: Tensor
    targets: list[dict[str, Tensor]] | None = None
    generator: torch.Generator | None = None


def mask_rle(mask: np.ndarray) -> dict[str, Any]:
    """Compressed COCO RLE of a (H, W) bool mask (pycocotools), JSON-ready (``counts`` as str)."""
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


# --------------------------------------------------------------------------- metrics
class InstanceEvalMetrics(Metrics):
    """COCO box and mask AP (pycocotools) of every detection (masks thresholded at 0.5)."""

    def __init__(self, num_classes: int, keep_images: int = 6) -> None:
        self.num_classes, self.keep_images = num_classes, keep_images
        self.images: list[dict[str, Any]] = []
        self.annotations: list[dict[str, Any]] = []
        self.boxes: list[dict[str, Any]] = []
        self.masks: list[dict[str, Any]] = []
        self.samples: list[dict[str, Any]] = []
        self.n = 0

    def update(self, batch: Batch, outputs: Any) -> None:
        h, w = batch.inputs.images.shape[-2:]
        for k, det in enumerate(outputs):
            image_id = self.n
            self.n += 1
            self.images.append({"id": image_id, "width": int(w), "height": int(h), "file_name": f"{image_id}.png"})
            gt_boxes, gt_labels = batch.extra["boxes"][k].cpu(), batch.extra["labels"][k].cpu()
            gt_masks = batch.extra["masks"][k].cpu().numpy()
            for box, label, mask in zip(gt_boxes.tolist(), gt_labels.tolist(), gt_masks):
                x0, y0, x1, y1 = box
                self.annotations.append({"id": len(self.annotations) + 1, "image_id": image_id,
                                         "category_id": int(label) + 1, "bbox": [x0, y0, x1 - x0, y1 - y0],
                                         "area": float(mask.sum()), "iscrowd": 0, "segmentation": mask_rle(mask)})
            masks = (det["masks"] >= 0.5).cpu().numpy()
            for box, score, label, mask in zip(det["boxes"].cpu().tolist(), det["scores"].cpu().tolist(),
                                               det["labels"].cpu().tolist(), masks):
                x0, y0, x1, y1 = box
                self.boxes.append({"image_id": image_id, "category_id": int(label) + 1,
                                   "bbox": [x0, y0, x1 - x0, y1 - y0], "score": float(score)})
                self.masks.append({"image_id": image_id, "category_id": int(label) + 1, "score": float(score),
                                   "segmentation": mask_rle(mask)})
            if len(self.samples) < self.keep_images:
                self.samples.append({"image": batch.extra["raw"][k].cpu(), "gt_boxes": gt_boxes, "gt_labels": gt_labels,
                                     "gt_masks": torch.from_numpy(gt_masks),
                                     **{key: det[key].cpu() for key in ("boxes", "scores", "labels", "masks")}})

    def compute(self) -> dict[str, Any]:
        if not self.n:
            return {**{k: 0.0 for k in COCO_METRICS + MASK_METRICS}, "n": 0, "samples": []}
        gt = {"images": self.images, "annotations": self.annotations,
              "categories": [{"id": c + 1, "name": str(c)} for c in range(self.num_classes)]}
        box = evaluate_coco(gt, self.boxes)
        mask = evaluate_coco(gt, self.masks, iou_type="segm")
        return {**box, **{f"mask_{k}": v for k, v in mask.items()}, "n": self.n, "samples": self.samples}


# --------------------------------------------------------------------------- the task
@register_task("instance")
class InstanceTask(Task):
    """Instance segmentation with Mask R-CNN (see the module docstring).

    Args:
        num_classes: Object classes.
        labels: Class names.
        augment: A ``DenseAugment`` (training only) or None.
        num_plot_images: Evaluated images drawn in ``predictions.png``.
    """

    primary_metric = "mask_AP50"
    higher_is_better = True
    config_section = "instance"
    config_class = InstanceSection
    default_recipe = INSTANCE_RECIPE
    families = ("MaskRCNN",)

    def __init__(self, num_classes: int, labels: Sequence[str] | None = None, augment: Any = None,
                 num_plot_images: int = 6) -> None:
        self.num_classes = num_classes
        self.labels = list(labels) if labels is not None else [str(i) for i in range(num_classes)]
        self.augment = augment
        self.num_plot_images = num_plot_images
        self.last_terms: dict[str, float] = {}

    def prepare(self, batch: Any, device: torch.device, image_size: int | None,
                generator: torch.Generator | None) -> Batch:
        images = batch["image"].to(device).float()
        keep = batch["labels"].to(device) >= 0  # (B, M): real objects
        boxes = [b[k] for b, k in zip(batch["boxes"].to(device).float(), keep)]
        labels = [lab[k] for lab, k in zip(batch["labels"].to(device), keep)]
        masks = [m[k].float() for m, k in zip(batch["masks"].to(device), keep)]
        if image_size is not None and tuple(images.shape[-2:]) != (image_size, image_size):
            h, w = images.shape[-2:]
            scale = torch.tensor([image_size / w, image_size / h] * 2, device=device)
            boxes = [b * scale for b in boxes]
            images = resize_images(images, image_size)  # (B, C, H, W) -> (B, C, S, S)
            masks = [F.interpolate(m[None], size=(image_size, image_size), mode="bilinear")[0] if len(m) else
                     m.new_zeros(0, image_size, image_size) for m in masks]
        if generator is not None and self.augment is not None:
            images, boxes, labels, masks = self.augment_with_masks(images, boxes, labels, masks, generator)
        masks = [m >= 0.5 for m in masks]
        targets = [{"boxes": b, "labels": lab, "masks": m} for b, lab, m in zip(boxes, labels, masks)]
        x = (images - MEAN_STD) / MEAN_STD
        extra = {"boxes": boxes, "labels": labels, "masks": masks, "raw": images, "image_id": batch["image_id"]}
        inputs = InstanceInputs(x, targets if generator is not None else None, generator)
        return Batch(inputs, targets, int(images.shape[0]), extra)

    def augment_with_masks(self, images: Tensor, boxes: list[Tensor], labels: list[Tensor], masks: list[Tensor],
                           generator: torch.Generator) -> tuple[Tensor, list[Tensor], list[Tensor], list[Tensor]]:
        """One geometric draw for image, boxes and masks: the masks ride along as extra channels."""
        c = images.shape[1]
        m = max(len(x) for x in masks)
        stacked = images.new_zeros(images.shape[0], c + m, *images.shape[-2:])
        stacked[:, :c] = images
        for i, x in enumerate(masks):
            stacked[i, c:c + len(x)] = x
        out = self.augment(stacked, boxes, generator=generator)
        images = out.images[:, :c]
        masks = [out.images[i, c:c + len(x)][k] for i, (x, k) in enumerate(zip(masks, out.keep))]
        labels = [lab[k] for lab, k in zip(labels, out.keep)]
        # the boxes of the moved masks (as ViTDet's recompute_boxes): tight under rotation too;
        # an object whose mask left the image is dropped with its label
        boxes, kept_masks, kept_labels = [], [], []
        for m, lab in zip(masks, labels):
            fg = m >= 0.5
            ok = fg.flatten(1).any(1)
            ys, xs = fg[ok].any(2), fg[ok].any(1)  # (n, H), (n, W): rows / columns with mask pixels
            idx_y = torch.arange(fg.shape[-2], device=m.device).expand_as(ys)
            idx_x = torch.arange(fg.shape[-1], device=m.device).expand_as(xs)
            big = fg.shape[-1] + fg.shape[-2]
            x0 = torch.where(xs, idx_x, big).amin(1)
            x1 = torch.where(xs, idx_x, -1).amax(1) + 1
            y0 = torch.where(ys, idx_y, big).amin(1)
            y1 = torch.where(ys, idx_y, -1).amax(1) + 1
            boxes.append(torch.stack([x0, y0, x1, y1], 1).to(images.dtype))
            kept_masks.append(m[ok])
            kept_labels.append(lab[ok])
        return images, boxes, kept_labels, kept_masks

    def forward(self, model: nn.Module, inputs: Any) -> Any:
        if isinstance(inputs, Tensor):
            return model(inputs)
        if inputs.targets is not None and model.training:
            return model(inputs.images, inputs.targets, inputs.generator)
        with torch.no_grad():
            return model(inputs.images)

    def loss(self, batch: Batch, outputs: Any) -> Tensor:
        self.last_terms = {k: float(v.detach()) for k, v in outputs.items() if k != "loss"}
        return outputs["loss"]

    def train_metrics(self) -> Metrics:
        return DetectionTrainMetrics(self)

    def eval_metrics(self) -> Metrics:
        return InstanceEvalMetrics(self.num_classes, self.num_plot_images)

    def format_metric(self, name: str, value: float) -> str:
        if name in COCO_METRICS or name in MASK_METRICS:
            return f"{name} n/a" if value is None else f"{name} {value:.3f}"
        return super().format_metric(name, value)

    def plots(self, out_dir: Path, history: Sequence[dict[str, Any]], final: dict[str, Any] | None) -> list[Path]:
        from .plots import plot_instance_curves, plot_instances

        files = []
        if history:
            files.append(plot_instance_curves(history, Path(out_dir) / "curves.png"))
        if final and final.get("samples"):
            files.append(plot_instances(final["samples"], self.labels, Path(out_dir) / "predictions.png"))
        return files

    @classmethod
    def prerequisite(cls, cfg: RunConfig, run_dir: Path) -> tuple[Path, dict[str, Any]] | None:
        """With ``instance.pretrain_backbone`` on digit scenes and a plain ViT: the digits classifier of
        the detection recipe's first step, with the run's ``model.name`` / ``model.overrides``, trained
        into ``<run>/backbone`` (unless ``model.pretrained`` names other weights)."""
        folder = Path(run_dir) / "backbone"
        if not cfg.instance.pretrain_backbone or cfg.data.dataset != "digit_scenes":
            return None
        from ...models.registry import get_entry

        if get_entry(cfg.model.name).family != "vit" or cfg.model.pretrained not in (None, str(folder)):
            return None
        recipe = copy.deepcopy(DETECTION_BACKBONE_RECIPE)
        # the classifier is a plain ViT (global attention, no relative positions), as ViTDet starts from
        # a plain pre-trained ViT; the detector's windows and (zero-initialised) tables come on loading
        plain = {k: v for k, v in cfg.model.overrides.items() if k not in VITDET_KEYS}
        recipe["model"] = {"name": cfg.model.name, "overrides": {**copy.deepcopy(plain), "drop_path": 0.0}}
        return folder, recipe

    @classmethod
    def from_config(cls, cfg: RunConfig) -> TaskSetup:
        """Datasets, Mask R-CNN, augmentation of an instance run (sets ``cfg.data.image_size``: 64 on scenes)."""
        s: InstanceSection = cfg.instance
        opts = {"scenes": s.scenes, "coco": s.coco}
        sets, max_objects, record = detection_sources(cfg, opts, load_masks=True, section="instance")
        size = int(cfg.data.image_size)
        wrapped = {k: InstanceSamples(d, size, max(max_objects, 1)) if d is not None else None for k, d in sets.items()}
        train = wrapped["train"]
        channels = int(train[0]["image"].shape[0])
        model = build_mask_rcnn(cfg.model.name, dict(cfg.model.overrides), size, channels, train.num_classes,
                                s.model, cfg.model.pretrained)
        model.pretrained_cfg = {"input_size": [channels, size, size], "mean": [MEAN_STD] * channels,
                                "std": [MEAN_STD] * channels, "task": "instance", "data": record}
        task = cls(train.num_classes, train.classes, build_dense_augment(s.augment, size), int(s.num_plot_images))
        return TaskSetup(task, model, train, wrapped["val"], wrapped["test"])


def build_mask_rcnn(backbone: str, overrides: Mapping[str, Any], size: int, channels: int, num_classes: int,
                    options: Mapping[str, Any], pretrained: str | None = None) -> MaskRCNN:
    """:class:`MaskRCNN` on ``backbone`` with the head options ``options`` (``instance.model``);
    ``pretrained`` (a checkpoint or a run directory) initialises the backbone (classifier dropped,
    position embedding resampled)."""
    fixed = ("backbone", "backbone_overrides", "image_size", "in_channels", "num_classes")
    _check_keys(options, [f.name for f in fields(MaskRCNNConfig) if f.name not in fixed], "instance.model")
    config = MaskRCNNConfig(backbone=backbone, backbone_overrides=dict(overrides), image_size=size,
                            in_channels=channels, num_classes=num_classes, **dict(options))
    built = pretrained_backbone(backbone, overrides, pretrained, size, channels) if pretrained else None
    model = MaskRCNN(config, backbone=built)
    model.model_name = f"mask_rcnn_{backbone}"
    return model


__all__ = ["INSTANCE_RECIPE", "InstanceEvalMetrics", "InstanceInputs", "InstanceSamples", "InstanceSection",
           "InstanceTask", "build_mask_rcnn", "mask_rle"]
