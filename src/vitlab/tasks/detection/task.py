"""Object detection as a task of the training engine (``task: detection``).

What it owns:

- **data**: digit scenes (``data.dataset: digit_scenes``, the default; train/val/test
  scenes from the disjoint digit splits) or a COCO-format folder (``data.dataset: coco``
  with ``data.data_dir: ROOT`` holding ``ROOT/{train,val,test}/annotations.json`` and
  ``ROOT/{split}/images/``, the layout :func:`~vitlab.datasets.coco.write_coco` writes; or
  explicit files in ``detection.coco``). Every image is resized to the square
  ``data.image_size`` (boxes scaled with it) and its objects padded to a fixed count, so the
  engine's default collate batches them; :meth:`DetectionTask.prepare` unpads (variable
  box counts per image);
- **augmentation** on the device: :class:`~vitlab.datasets.augment.dense.DenseAugment`
  (crop / flip / affine moving the boxes), drawn from the engine's generator;
- **model**: DETR on ``model.name`` (any registered backbone, ``model.overrides`` fitting
  it; ``model.pretrained``, e.g. a classifier run, initialises the backbone) or YOLOS on a
  ViT (``detection.detector``);
- **loss**: :class:`~vitlab.tasks.detection.DETRLoss` on every decoder layer, plus DN-DETR's
  reconstruction losses when denoising is on, plus one more ``DETRLoss`` (matched on its
  own) per extra Group DETR query group (``detection.detr.query_groups``) and, with two-stage
  query selection, one on the encoder's per-token proposals;
- **metrics**: COCO box mAP from pycocotools on the evaluated split; ``AP50`` (AP at IoU
  0.5) is primary, ``AP`` (AP@[.5:.95]) and the rest are logged;
- **plots**: loss / AP curves and ``predictions.png`` (predictions vs ground truth on the
  first evaluated images, always the same ones).

Options (``detection``; unknown keys are an error naming the valid ones):
``detector`` (``detr`` | ``yolos``), ``detr`` (keys of :class:`DETRConfig`), ``num_queries``,
``scenes`` (keyword arguments of :class:`~vitlab.datasets.digit_scenes.DigitScenes` plus
``num_train`` / ``num_val`` / ``num_test``), ``augment`` (keyword arguments of
``DenseAugment``, or ``false``), ``loss`` (``eos_coef``, ``weight_ce``, ``weight_bbox``,
``weight_giou``, ``cost_class``, ``cost_bbox``, ``cost_giou``, ``aux_loss``), ``coco``
(``{split}_annotations`` / ``{split}_images`` paths, ``on_error``), ``num_plot_images``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from ..base import Batch, Metrics, RunConfig, Task, resize_images
from ..registry import TaskSetup, register_task
from .box_ops import normalize_boxes
from .coco_eval import COCO_METRICS, evaluate_coco
from .data import _check_keys, detection_sources
from .denoising import denoising_losses
from .detr import DETR, DETRConfig
from .losses import DETRLoss, _num_boxes
from .postprocess import postprocess_detections
from .yolos import YOLOS, YOLOSConfig
from .plots import plot_detection_curves, plot_predictions

#: ``vitlab train --task detection`` without ``--config``: DETR on a small ViT (patch 8, mean
#: pooling, no class token) over 64x64 digit scenes of 1 to 3 digits, with two-stage query
#: selection and SMCA's spatial prior, the backbone at a tenth of the learning rate, no-object
#: weight 0.5 (configs/detection_digits.yaml holds the same), and the backbone started from a
#: digits classifier of the same backbone that the run trains first (``pretrain_backbone``:
#: :data:`DETECTION_BACKBONE_RECIPE`): the measured configuration in one command; see
#: benchmarks/README.md.
DETECTION_RECIPE: dict[str, Any] = {
    "recipe": "detection_digits",
    "task": "detection",
    "model": {"name": "vit_tiny_patch16_224",
              "overrides": {"patch_size": 8, "dim": 128, "depth": 4, "heads": 4, "mlp_dim": 256, "pool": "mean",
                            "class_token": False}},
    "data": {"dataset": "digit_scenes", "image_size": 64, "batch_size": 32, "eval_batch_size": 64},
    "optim": {"lr": 1e-3, "weight_decay": 0.05, "warmup_epochs": 2, "min_lr": 1e-5, "clip_grad": 0.1},
    "epochs": 40,
    "seed": 0,
    "detection": {
        "detector": "detr",
        "num_queries": 10,
        "detr": {"remedy": "two_stage", "spatial_prior": True, "backbone_lr_scale": 0.1, "dim": 128, "heads": 4,
                 "mlp_dim": 256, "enc_layers": 1, "dec_layers": 3, "pyramid_scales": [1.0, 0.5],
                 "pos_temperature": 20.0, "anchor_temperature": 20.0},
        "loss": {"eos_coef": 0.5},
        "scenes": {"num_train": 2000, "num_val": 200, "num_test": 400, "min_digits": 1, "max_digits": 3,
                   "digit_size": [14, 24]},
        "augment": {"scale": [0.7, 1.0], "hflip": 0.0},
        "pretrain_backbone": True,
    },
}

#: Step 1 of the detection recipe (configs/detection_backbone_digits.yaml holds the same): a digits
#: classifier of the detector's backbone at the scenes' digit scale (8x8 digits upsampled to
#: 24x24), mean pooling and no class token, so that every patch token learns to tell digits apart;
#: 100% test top-1 in about 50 s of one CPU thread. ``vitlab train --task detection`` trains it
#: into ``<run>/backbone`` first (``detection.pretrain_backbone``) with the run's own backbone
#: (``model.name`` / ``model.overrides``) and starts DETR's backbone from it.
DETECTION_BACKBONE_RECIPE: dict[str, Any] = {
    "recipe": "digits",
    "task": "classification",
    "model": {"name": "vit_tiny_patch16_224",
              "overrides": {"patch_size": 8, "dim": 128, "depth": 4, "heads": 4, "mlp_dim": 256, "pool": "mean",
                            "class_token": False, "drop_path": 0.0}},
    "data": {"dataset": "digits", "image_size": 24, "batch_size": 64, "eval_batch_size": 512},
    "optim": {"lr": 0.001, "weight_decay": 0.05, "warmup_epochs": 5, "min_lr": 1.0e-05, "clip_grad": 1.0},
    "epochs": 30,
    "seed": 0,
    "ema_decay": 0.998,
}

DETECTORS = ("detr", "yolos")
LOSS_KEYS = ("eos_coef", "weight_ce", "weight_bbox", "weight_giou", "cost_class", "cost_bbox", "cost_giou", "aux_loss")
#: Normalisation of detection inputs ([0, 1] -> [-1, 1]), recorded in every checkpoint.
MEAN_STD = 0.5


@dataclass
class DetectionSection:
    """The detection task's options (config section ``detection``); the nested mappings are
    validated by the task, naming their valid keys.

    ``detector`` (``detr`` | ``yolos``); ``num_queries`` (None: the detector's default);
    ``detr`` (keys of :class:`DETRConfig`); ``scenes`` (keyword arguments of
    :class:`~vitlab.datasets.digit_scenes.DigitScenes` plus ``num_train`` / ``num_val`` /
    ``num_test``); ``augment`` (keyword arguments of ``DenseAugment``, or ``false``); ``loss``
    (:data:`LOSS_KEYS`); ``coco`` (``{split}_annotations`` / ``{split}_images``, ``on_error``);
    ``num_plot_images`` (test images drawn in ``predictions.png``).
    """

    detector: str = "detr"
    num_queries: int | None = None
    detr: dict[str, Any] = field(default_factory=dict)
    scenes: dict[str, Any] = field(default_factory=dict)
    augment: dict[str, Any] | bool = field(default_factory=dict)
    loss: dict[str, Any] = field(default_factory=dict)
    coco: dict[str, Any] = field(default_factory=dict)
    num_plot_images: int = 6
    pretrain_backbone: bool = False

    def __post_init__(self) -> None:
        if self.detector not in DETECTORS:
            raise ValueError(f"detection.detector must be one of {', '.join(DETECTORS)}, got {self.detector!r}")

    def options(self) -> dict[str, Any]:
        """The options as the builders read them (unset ones left out)."""
        return {f.name: getattr(self, f.name) for f in fields(self)
                if getattr(self, f.name) is not None and f.name != "pretrain_backbone"}


# --------------------------------------------------------------------------- data
class DetectionSamples(Dataset):
    """A detection dataset (dicts with ``image``, ``boxes`` xyxy pixels, ``labels``,
    ``image_id``) as fixed-size samples the default collate can batch.

    Each image is resized (bilinear, antialiased) to ``size`` x ``size`` with its boxes
    scaled alike; boxes and labels are padded to ``max_objects`` (label ``-1`` marks padding).
    A sample is ``{"image": (C, size, size), "boxes": (M, 4), "labels": (M,), "image_id": int,
    "orig_size": (2,) = (H, W)}``.

    Args:
        dataset: The source dataset.
        size: The square side of the model's input.
        max_objects: Padding length; at least the most objects of any image.
    """

    def __init__(self, dataset: Any, size: int, max_objects: int) -> None:
        self.dataset, self.size, self.max_objects = dataset, int(size), int(max_objects)
        self.classes = list(dataset.classes)
        self.num_classes = len(self.classes)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        s = self.dataset[index]
        image, boxes, labels = s["image"], s["boxes"].float().reshape(-1, 4), s["labels"].long()
        h, w = image.shape[-2:]
        if (h, w) != (self.size, self.size):
            image = resize_images(image[None], self.size)[0]  # (C, H, W) -> (1, C, H, W) -> (C, size, size)
            boxes = boxes * torch.tensor([self.size / w, self.size / h] * 2)
        n = len(labels)
        if n > self.max_objects:
            raise ValueError(f"image {s['image_id']} has {n} objects; at most {self.max_objects} fit (max_objects)")
        pad_boxes = torch.zeros(self.max_objects, 4)
        pad_labels = torch.full((self.max_objects,), -1, dtype=torch.int64)
        pad_boxes[:n], pad_labels[:n] = boxes, labels
        return {"image": image.float(), "boxes": pad_boxes, "labels": pad_labels, "image_id": int(s["image_id"]),
                "orig_size": torch.tensor([h, w])}


def unpad_targets(boxes: Tensor, labels: Tensor) -> tuple[list[Tensor], list[Tensor]]:
    """Padded (B, M, 4) boxes and (B, M) labels (-1 = padding) -> per image (n_i, 4) and (n_i,)."""
    keep = labels >= 0
    return [b[k] for b, k in zip(boxes, keep)], [lab[k] for lab, k in zip(labels, keep)]


def collate_detection(samples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Batch detection samples with any number of objects each (padded to the batch's most).

    Args:
        samples: Dicts with ``image`` (C, H, W) (all the same size), ``boxes`` (n_i, 4),
            ``labels`` (n_i,) and ``image_id``.

    Returns:
        ``image`` (B, C, H, W), ``boxes`` (B, M, 4), ``labels`` (B, M) with ``-1`` on padding,
        ``image_id`` (B,) and ``orig_size`` (B, 2).
    """
    m = max([len(s["labels"]) for s in samples] + [1])
    boxes = torch.zeros(len(samples), m, 4)
    labels = torch.full((len(samples), m), -1, dtype=torch.int64)
    for i, s in enumerate(samples):
        valid = s["labels"] >= 0
        n = int(valid.sum())
        boxes[i, :n], labels[i, :n] = s["boxes"].reshape(-1, 4)[valid], s["labels"][valid]
    images = torch.stack([s["image"] for s in samples])
    sizes = torch.stack([torch.as_tensor(s.get("orig_size", images.shape[-2:])) for s in samples])
    return {"image": images, "boxes": boxes, "labels": labels,
            "image_id": torch.tensor([int(s["image_id"]) for s in samples]), "orig_size": sizes}


@dataclass
class DetectionInputs:
    """What :meth:`DetectionTask.forward` calls the model with: normalised images and, in
    training, the targets (DN-DETR builds its denoising queries from them)."""

    images: Tensor
    targets: list[dict[str, Tensor]] | None


# --------------------------------------------------------------------------- metrics
class DetectionEvalMetrics(Metrics):
    """COCO box mAP (pycocotools) over the evaluated images, in input-image pixels.

    Every query becomes a scored detection (no threshold: AP integrates over scores); the
    ground truth is the (unaugmented) targets. ``samples`` holds the first ``keep_images``
    images with their predictions and ground truth for :meth:`DetectionTask.plots`.
    """

    def __init__(self, num_classes: int, keep_images: int = 6) -> None:
        self.num_classes, self.keep_images = num_classes, keep_images
        self.images: list[dict[str, Any]] = []
        self.annotations: list[dict[str, Any]] = []
        self.records: list[dict[str, Any]] = []
        self.samples: list[dict[str, Any]] = []
        self.n = 0

    def update(self, batch: Batch, outputs: Any) -> None:
        images = batch.inputs.images
        h, w = images.shape[-2:]
        dets = postprocess_detections(outputs["logits"].detach(), outputs["boxes"].detach(), [(h, w)] * len(images))
        for k, det in enumerate(dets):
            image_id = self.n
            self.n += 1
            self.images.append({"id": image_id, "width": int(w), "height": int(h), "file_name": f"{image_id}.png"})
            gt_boxes, gt_labels = batch.extra["boxes"][k].cpu(), batch.extra["labels"][k].cpu()
            for box, label in zip(gt_boxes.tolist(), gt_labels.tolist()):
                x0, y0, x1, y1 = box
                self.annotations.append({"id": len(self.annotations) + 1, "image_id": image_id,
                                         "category_id": int(label) + 1, "bbox": [x0, y0, x1 - x0, y1 - y0],
                                         "area": (x1 - x0) * (y1 - y0), "iscrowd": 0})
            for box, score, label in zip(det["boxes"].cpu().tolist(), det["scores"].cpu().tolist(),
                                         det["labels"].cpu().tolist()):
                x0, y0, x1, y1 = box
                self.records.append({"image_id": image_id, "category_id": int(label) + 1,
                                     "bbox": [x0, y0, x1 - x0, y1 - y0], "score": float(score)})
            if len(self.samples) < self.keep_images:
                self.samples.append({"image": batch.extra["raw"][k].cpu(), "gt_boxes": gt_boxes, "gt_labels": gt_labels,
                                     "boxes": det["boxes"].cpu(), "scores": det["scores"].cpu(),
                                     "labels": det["labels"].cpu()})

    def compute(self) -> dict[str, Any]:
        if not self.n:
            return {**{k: 0.0 for k in COCO_METRICS}, "n": 0, "samples": []}
        gt = {"images": self.images, "annotations": self.annotations,
              "categories": [{"id": c + 1, "name": str(c)} for c in range(self.num_classes)]}
        return {**evaluate_coco(gt, self.records), "n": self.n, "samples": self.samples}


class DetectionTrainMetrics(Metrics):
    """Mean of each loss term over the epoch's batches (``loss_ce``, ``loss_bbox``, ...)."""

    def __init__(self, task: "DetectionTask") -> None:
        self.task, self.sums, self.n = task, {}, 0

    def update(self, batch: Batch, outputs: Any) -> None:
        for k, v in self.task.last_terms.items():
            self.sums[k] = self.sums.get(k, 0.0) + v * batch.size
        self.n += batch.size

    def compute(self) -> dict[str, Any]:
        return {**{k: v / max(self.n, 1) for k, v in self.sums.items()}, "n": self.n}


# --------------------------------------------------------------------------- the task
@register_task("detection")
class DetectionTask(Task):
    """Object detection with DETR or YOLOS (see the module docstring).

    Args:
        num_classes: Object classes.
        labels: Class names.
        augment: A :class:`~vitlab.datasets.augment.dense.DenseAugment` (training only) or None.
        criterion: The :class:`DETRLoss` (its weights also weight the denoising losses).
        num_plot_images: Evaluated images drawn in ``predictions.png``.
    """

    primary_metric = "AP50"
    higher_is_better = True
    config_section = "detection"
    config_class = DetectionSection
    default_recipe = DETECTION_RECIPE
    families = ("DETR", "YOLOS")

    def __init__(self, num_classes: int, labels: Sequence[str] | None = None, augment: Any = None,
                 criterion: DETRLoss | None = None, num_plot_images: int = 6) -> None:
        self.num_classes = num_classes
        self.labels = list(labels) if labels is not None else [str(i) for i in range(num_classes)]
        self.augment = augment
        self.criterion = criterion or DETRLoss(num_classes)
        self.num_plot_images = num_plot_images
        self.last_terms: dict[str, float] = {}

    def to(self, device: torch.device) -> "DetectionTask":
        self.criterion.to(device)
        return self

    def prepare(self, batch: Any, device: torch.device, image_size: int | None,
                generator: torch.Generator | None) -> Batch:
        images = batch["image"].to(device).float()
        boxes, labels = unpad_targets(batch["boxes"].to(device).float(), batch["labels"].to(device))
        if image_size is not None and tuple(images.shape[-2:]) != (image_size, image_size):
            h, w = images.shape[-2:]
            scale = torch.tensor([image_size / w, image_size / h] * 2, device=device)
            boxes = [b * scale for b in boxes]
            images = resize_images(images, image_size)  # (B, C, H, W) -> (B, C, size, size)
        if generator is not None and self.augment is not None:
            out = self.augment(images, boxes, generator=generator)
            images, boxes = out.images, out.boxes
            labels = [lab[k] for lab, k in zip(labels, out.keep)]
        h, w = images.shape[-2:]
        targets = [{"labels": lab, "boxes": normalize_boxes(b, (h, w))} for lab, b in zip(labels, boxes)]
        x = (images - MEAN_STD) / MEAN_STD
        extra = {"boxes": boxes, "labels": labels, "raw": images, "image_id": batch["image_id"]}
        return Batch(DetectionInputs(x, targets if generator is not None else None), targets, int(images.shape[0]),
                     extra)

    def forward(self, model: nn.Module, inputs: Any) -> Any:
        if isinstance(inputs, Tensor):
            return model(inputs)
        core = getattr(model, "module", model)
        if inputs.targets is not None and isinstance(core, DETR):
            return model(inputs.images, inputs.targets)
        return model(inputs.images)

    def loss(self, batch: Batch, outputs: Any) -> Tensor:
        layers = list(outputs.get("aux", [])) + [{"logits": outputs["logits"], "boxes": outputs["boxes"]}]
        terms = self.criterion(layers, batch.targets)
        total = terms["loss"]
        for group in outputs.get("groups") or []:  # Group DETR: every extra group is matched on its own
            total = total + self.criterion(group, batch.targets)["loss"]
        if outputs.get("enc") is not None:  # two-stage: the encoder's proposals, matched on their own
            enc = self.criterion([outputs["enc"]], batch.targets)
            terms.update({f"enc_{k}": v for k, v in enc.items() if k != "loss"})
            total = total + enc["loss"]
        dn = outputs.get("dn")
        if dn is not None:
            num_boxes = _num_boxes(batch.targets, outputs["logits"].device)
            n_layers = dn["logits"].shape[0]
            use = range(n_layers) if self.criterion.aux_loss else [n_layers - 1]
            for k in use:
                for name, value in denoising_losses(dn["logits"][k], dn["boxes"][k], dn["queries"], num_boxes).items():
                    if k == n_layers - 1:
                        terms[f"dn_{name}"] = value
                    total = total + self.criterion.weights[name] * value
        # the last layer's terms (the auxiliary ones end in _<layer>)
        self.last_terms = {k: float(v.detach()) for k, v in terms.items()
                           if k in ("loss_ce", "loss_bbox", "loss_giou") or k.startswith(("dn_", "enc_"))}
        return total

    def train_metrics(self) -> Metrics:
        return DetectionTrainMetrics(self)

    def eval_metrics(self) -> Metrics:
        return DetectionEvalMetrics(self.num_classes, self.num_plot_images)

    def format_metric(self, name: str, value: float) -> str:
        if name in COCO_METRICS:
            return f"{name} n/a" if value is None else f"{name} {value:.3f}"
        return super().format_metric(name, value)

    def plots(self, out_dir: Path, history: Sequence[dict[str, Any]], final: dict[str, Any] | None) -> list[Path]:
        files = []
        if history:
            files.append(plot_detection_curves(history, Path(out_dir) / "curves.png"))
        if final and final.get("samples"):
            files.append(plot_predictions(final["samples"], self.labels, Path(out_dir) / "predictions.png"))
        return files

    @classmethod
    def prerequisite(cls, cfg: RunConfig, run_dir: Path) -> tuple[Path, dict[str, Any]] | None:
        """With ``detection.pretrain_backbone`` on digit scenes (the recipe) and a plain ViT backbone:
        the backbone classifier (:data:`DETECTION_BACKBONE_RECIPE` with the run's ``model.name`` /
        ``model.overrides``) in ``<run>/backbone``, unless ``model.pretrained`` names other weights."""
        folder = Path(run_dir) / "backbone"
        s: DetectionSection = cfg.detection
        if not s.pretrain_backbone or s.detector != "detr" or cfg.data.dataset != "digit_scenes":
            return None
        from ...models.registry import get_entry

        if get_entry(cfg.model.name).family != "vit":  # the measured step is a plain ViT's; others start as they are
            return None
        if cfg.model.pretrained not in (None, str(folder)):
            return None
        recipe = copy.deepcopy(DETECTION_BACKBONE_RECIPE)
        recipe["model"] = {"name": cfg.model.name, "overrides": {**copy.deepcopy(cfg.model.overrides), "drop_path": 0.0}}
        return folder, recipe

    @classmethod
    def from_config(cls, cfg: RunConfig) -> TaskSetup:
        """Datasets, model, augmentation and loss of a detection run from a ``TrainConfig``.

        Sets ``cfg.data.image_size`` (64 for digit scenes when unset). The model's
        ``pretrained_cfg`` records the input size, normalisation and the data it was trained
        on (``vitlab eval`` reads it back).
        """
        opts = cfg.detection.options()
        detector = opts["detector"]
        train_set, val_set, test_set, data_record = build_detection_datasets(cfg, opts)
        size = int(cfg.data.image_size)
        channels = int(train_set[0]["image"].shape[0])
        num_classes = train_set.num_classes
        model = build_detector(cfg.model.name, dict(cfg.model.overrides), detector, size, channels, num_classes,
                               opts, pretrained=cfg.model.pretrained)
        model.pretrained_cfg = {"input_size": [channels, size, size], "mean": [MEAN_STD] * channels,
                                "std": [MEAN_STD] * channels, "task": "detection", "data": data_record}
        augment = build_dense_augment(opts.get("augment", {}), size)
        task = cls(num_classes, train_set.classes, augment, build_criterion(num_classes, opts.get("loss", {})),
                   int(opts.get("num_plot_images", 6)))
        return TaskSetup(task, model, train_set, val_set, test_set)


# --------------------------------------------------------------------------- builders
def build_criterion(num_classes: int, options: Mapping[str, Any]) -> DETRLoss:
    """:class:`DETRLoss` from ``detection.loss`` (DETR's defaults: costs 1/5/2, weights 1/5/2, eos 0.1)."""
    from .matcher import HungarianMatcher

    _check_keys(options, LOSS_KEYS, "detection.loss")
    o = {k: options[k] for k in options}
    matcher = HungarianMatcher(float(o.pop("cost_class", 1.0)), float(o.pop("cost_bbox", 5.0)),
                               float(o.pop("cost_giou", 2.0)))
    return DETRLoss(num_classes, matcher=matcher, **o)


def build_dense_augment(options: Mapping[str, Any] | bool, size: int) -> Any:
    """``DenseAugment(size, **options)``, or None for ``false``."""
    if options is False or options is None:
        return None
    from ...datasets.augment.dense import DenseAugment

    o = dict(options) if isinstance(options, Mapping) else {}
    for k in ("scale", "ratio", "translate"):
        if k in o:
            o[k] = tuple(o[k])
    return DenseAugment(size, **o)


def pretrained_backbone(backbone: str, overrides: Mapping[str, Any], pretrained: str | Path, size: int,
                        channels: int) -> nn.Module:
    """``backbone`` without a classifier, initialised from ``pretrained`` (a checkpoint, or a ``vitlab
    train`` run directory: its latest checkpoint), the position embedding resampled to ``size``."""
    from ...pretrained import create_model
    from ..mae.downstream import run_checkpoint

    weights = run_checkpoint(pretrained) or pretrained  # a run directory -> its latest checkpoint
    return create_model(backbone, pretrained=str(weights), num_classes=0, in_channels=channels, image_size=size,
                        **dict(overrides))


def build_detector(backbone: str, overrides: Mapping[str, Any], detector: str, size: int, channels: int,
                   num_classes: int, options: Mapping[str, Any], pretrained: str | None = None) -> nn.Module:
    """DETR on ``backbone`` (any registered model) or YOLOS on a ViT built like ``backbone``.

    Args:
        backbone: A registered model name.
        overrides: Config overrides of the backbone.
        detector: ``detr`` or ``yolos``.
        size: Input side in pixels.
        channels: Input channels.
        num_classes: Object classes.
        options: The ``detection`` section.
        pretrained: DETR only: the backbone's initial weights (``model.pretrained``): a
            checkpoint file or folder that :func:`~vitlab.pretrained.create_model` reads, or a
            ``vitlab train`` run directory (its latest checkpoint), e.g. a digits classifier;
            the classifier is dropped and the position embedding resampled to this input size.

    Raises:
        ValueError: Unknown DETR options, YOLOS on a backbone that is not a plain ViT, or
            ``pretrained`` with YOLOS.
    """
    num_queries = int(options.get("num_queries", 10))
    if pretrained is not None and detector != "detr":
        raise ValueError("model.pretrained initialises DETR's backbone only; YOLOS starts from random weights "
                         "(drop model.pretrained or use detection.detector=detr)")
    if detector == "detr":
        detr = dict(options.get("detr", {}))
        valid = [f.name for f in fields(DETRConfig) if f.name not in
                 ("backbone", "backbone_overrides", "image_size", "in_channels", "num_classes", "num_queries")]
        _check_keys(detr, valid, "detection.detr")
        if "pyramid_scales" in detr:
            detr["pyramid_scales"] = tuple(float(s) for s in detr["pyramid_scales"])
        config = DETRConfig(backbone=backbone, backbone_overrides=dict(overrides), image_size=size,
                            in_channels=channels, num_classes=num_classes, num_queries=num_queries, **detr)
        built = pretrained_backbone(backbone, overrides, pretrained, size, channels) if pretrained else None
        model: nn.Module = DETR(config, backbone=built)
        model.model_name = f"detr_{backbone}"
        return model
    from ...models.vit import ViTConfig
    from ...pretrained import create_model

    vit = create_model(backbone, num_classes=0, in_channels=channels, image_size=size, **dict(overrides))
    if not isinstance(vit.config, ViTConfig):
        raise ValueError(f"YOLOS needs a plain ViT backbone; {backbone} is a {type(vit).__name__}")
    from dataclasses import replace

    vcfg = replace(vit.config, num_classes=0, pool="cls", class_token=True, pad_input=False)  # YOLOS reads its class token
    model = YOLOS(YOLOSConfig(vit=vcfg, num_classes=num_classes, num_detection_tokens=num_queries,
                              use_mid_position_embeddings=False))
    model.model_name = f"yolos_{backbone}"
    return model


def build_detection_datasets(cfg: RunConfig, opts: Mapping[str, Any]) -> tuple[Any, Any, Any, dict[str, Any]]:
    """Train / val / test :class:`DetectionSamples` and a record of the data (for checkpoints).

    ``data.dataset``: ``digit_scenes`` (also ``digits``) or ``coco``.
    """
    sets, max_objects, record = detection_sources(cfg, opts)
    size = int(cfg.data.image_size)
    wrapped = {s: DetectionSamples(d, size, max(max_objects, 1)) if d is not None else None for s, d in sets.items()}
    return wrapped["train"], wrapped["val"], wrapped["test"], record


__all__ = ["DETECTION_BACKBONE_RECIPE", "DETECTION_RECIPE", "DetectionEvalMetrics", "DetectionSection", "DetectionInputs", "DetectionSamples", "DetectionTask",
           "build_criterion", "build_dense_augment", "build_detection_datasets", "build_detector",
           "collate_detection", "detection_sources", "pretrained_backbone", "unpad_targets"]
