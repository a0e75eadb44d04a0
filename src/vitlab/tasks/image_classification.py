"""Image classification as a task of the training engine (``task: classification``).

What it owns: the batch preparation (resize to the engine's size, on-device augmentation
ending with the normalisation, Mixup/CutMix), the loss (cross-entropy, label smoothing, soft
targets, DeiT distillation), the metrics (top-1/top-5, loss, confusion matrix; top-1 is
primary) and the plots (curves, confusion matrix). :meth:`ClassificationTask.from_config`
builds a whole run (datasets, model, augmentation, teacher) from a training config.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..datasets.augment import (
    ColorJitter,
    Compose,
    Normalize,
    RandAugment,
    RandomAffine,
    RandomErasing,
    RandomHorizontalFlip,
    RandomResizedCrop,
    parse_rand_augment,
)
from ..datasets.factory import build_dataset
from ..datasets.pipeline import (
    RandomResizedCropSample,
    ResizeCenterCropSample,
    Resized,
    dataset_kind,
    preprocessing_record,
)
from ..datasets.transforms import normalize
from ..pretrained import create_model
from .base import Batch, Metrics, RunConfig, Task, evaluate_task, resize_images
from .losses import DistillationLoss, LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from .metrics import confusion_matrix, topk_correct
from .mixup import Mixup
from .registry import TaskSetup, register_task

Augment = Callable[[Tensor, torch.Generator], Tensor]
Criterion = Callable[[Tensor, Any, Tensor], Tensor]


def _logits(outputs: Any) -> Tensor:
    """The class logits of a model's outputs: a distilled DeiT's (cls, dist) pair is summed."""
    return outputs[0] + outputs[1] if isinstance(outputs, tuple) else outputs


class ClassificationTrainMetrics(Metrics):
    """Training top-1 (%) against the hard labels (not the mixed targets)."""

    def __init__(self) -> None:
        self.correct, self.n = 0, 0

    def update(self, batch: Batch, outputs: Any) -> None:
        labels = batch.extra["labels"]
        self.correct += topk_correct(_logits(outputs).detach().float(), labels, (1,))[1]
        self.n += batch.size

    def compute(self) -> dict[str, Any]:
        return {"top1": 100.0 * self.correct / max(self.n, 1), "n": self.n}


class ClassificationEvalMetrics(Metrics):
    """Cross-entropy, top-1/top-5 accuracy (%) and the confusion matrix (rows: true class)."""

    def __init__(self) -> None:
        self.loss_sum, self.n, self.hits1, self.hits5, self.num_classes = 0.0, 0, 0, 0, 0
        self.preds: list[Tensor] = []
        self.targets: list[Tensor] = []

    def update(self, batch: Batch, outputs: Any) -> None:
        logits = (outputs[0] + outputs[1]) / 2 if isinstance(outputs, tuple) else outputs
        logits = logits.float()
        y = batch.targets
        self.num_classes = logits.shape[1]
        self.loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
        hits = topk_correct(logits, y, (1, 5))
        self.hits1, self.hits5 = self.hits1 + hits[1], self.hits5 + hits[5]
        self.n += y.shape[0]
        self.preds.append(logits.argmax(1).cpu())
        self.targets.append(y.cpu())

    def compute(self) -> dict[str, Any]:
        n = max(self.n, 1)
        cm = confusion_matrix(torch.cat(self.preds), torch.cat(self.targets), self.num_classes) if self.n else None
        return {"loss": self.loss_sum / n, "top1": 100.0 * self.hits1 / n, "top5": 100.0 * self.hits5 / n,
                "n": self.n, "confusion": cm}


@register_task("classification")
class ClassificationTask(Task):
    """Image classification: batches of ([0, 1] images (B, C, H, W), integer labels (B,)).

    Args:
        labels: Class names (for the confusion matrix and checkpoints).
        mean: Normalisation mean applied on the device (None: none, e.g. a loader that
            already normalises).
        std: Normalisation std.
        augment: ``augment(batch, generator) -> batch`` from [0, 1] images to normalised
            ones (training only; it replaces the normalisation above).
        mixup: ``mixup(x, y, generator=g) -> (x, soft_targets)``, training only.
        criterion: ``criterion(inputs, outputs, targets) -> loss``; cross-entropy by default.
        teacher: A distillation teacher (moved to the engine's device with the task).
    """

    primary_metric = "top1"
    higher_is_better = True

    def __init__(self, labels: Sequence[str] | None = None, mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None, augment: Augment | None = None,
                 mixup: Callable[..., tuple[Tensor, Tensor]] | None = None, criterion: Criterion | None = None,
                 teacher: nn.Module | None = None) -> None:
        self.labels = list(labels) if labels is not None else None
        self.mean = tuple(mean) if mean is not None else None
        self.std = tuple(std) if std is not None else None
        self.augment, self.mixup, self.teacher = augment, mixup, teacher
        self.criterion: Criterion = criterion or (lambda inputs, outputs, target: F.cross_entropy(outputs, target))

    def to(self, device: torch.device) -> "ClassificationTask":
        if self.teacher is not None:
            self.teacher.to(device)
        return self

    def prepare(self, batch: Any, device: torch.device, image_size: int | None,
                generator: torch.Generator | None) -> Batch:
        x, y = batch
        x = resize_images(x.to(device, non_blocking=True).float(), image_size)
        if generator is not None and self.augment is not None:
            x = self.augment(x, generator)  # the augmentation ends with the normalisation
            # A fixed-size crop (RandomResizedCrop to data.image_size) would undo progressive resizing.
            x = resize_images(x, image_size)
        elif self.mean is not None and self.std is not None:
            x = normalize(x, self.mean, self.std)
        y = y.to(device)
        target = y
        if generator is not None and self.mixup is not None:
            x, target = self.mixup(x, y, generator=generator)
        return Batch(x, target, int(y.shape[0]), {"labels": y})

    def loss(self, batch: Batch, outputs: Any) -> Tensor:
        return self.criterion(batch.inputs, outputs, batch.targets)

    def train_metrics(self) -> Metrics:
        return ClassificationTrainMetrics()

    def eval_metrics(self) -> Metrics:
        return ClassificationEvalMetrics()

    def format_metric(self, name: str, value: float) -> str:
        if name in ("top1", "top5"):
            return f"top-{name[3:]} {value:.2f}%"
        return super().format_metric(name, value)

    def plots(self, out_dir: Path, history: Sequence[dict[str, Any]], final: dict[str, Any] | None) -> list[Path]:
        from .plots import plot_confusion_matrix, plot_curves

        files = []
        if history:
            files.append(plot_curves(history, Path(out_dir) / "curves.png"))
        cm = final.get("confusion") if final else None
        if cm is not None:
            labels = self.labels or [str(i) for i in range(cm.shape[0])]
            files.append(plot_confusion_matrix(cm, labels, Path(out_dir) / "confusion_matrix.png"))
        return files

    @classmethod
    def from_config(cls, cfg: RunConfig) -> TaskSetup:
        """Datasets, model, augmentation, mixup, teacher and loss of a run from a ``TrainConfig``.

        The model is built for the data's size (``data.image_size``) unless
        ``model.overrides.image_size`` says otherwise. Its ``pretrained_cfg`` (saved in every
        checkpoint) records the preprocessing this run uses: ``input_size``, the dataset's
        ``mean``/``std``, ``crop_pct`` and ``interpolation``. Sets ``cfg.data.image_size``.
        """
        data = cfg.data
        train_set, val_set, test_set = build_datasets(cfg)
        sample, _ = train_set[0]
        channels = sample.shape[0]
        image_size = int(data.image_size or sample.shape[-1])
        model = create_classifier(cfg, train_set.num_classes, channels, image_size)
        model_size = getattr(model.config, "image_size", (image_size, image_size))
        if data.image_size is None and tuple(model_size) != (image_size, image_size):
            image_size = model_size[0]
        cfg.data.image_size = image_size
        mean, std = tuple(train_set.mean), tuple(train_set.std)
        # Checkpoints carry the preprocessing this run evaluates with (predict / eval read it back).
        model.pretrained_cfg = {**model.pretrained_cfg,
                                **preprocessing_record(image_size, mean, std, data.crop_pct, data.interpolation)}
        augment = build_augment(cfg.augment, image_size, mean, std,
                                crop_on_device=dataset_kind(data.dataset) != "folder")
        a = cfg.augment
        mixup = None
        if a.mixup_alpha > 0 or a.cutmix_alpha > 0:
            mixup = Mixup(mixup_alpha=a.mixup_alpha, cutmix_alpha=a.cutmix_alpha, prob=a.mixup_prob,
                          switch_prob=a.mixup_switch_prob, label_smoothing=a.label_smoothing,
                          num_classes=train_set.num_classes)
        teacher = build_teacher(cfg, train_set.num_classes, channels, image_size)
        if hasattr(model, "set_distilled_training"):
            model.set_distilled_training(teacher is not None)
        task = cls(labels=list(train_set.classes), mean=mean, std=std, augment=augment, mixup=mixup,
                   criterion=build_criterion(cfg, teacher), teacher=teacher)
        return TaskSetup(task, model, train_set, val_set, test_set)


@torch.no_grad()
def evaluate_classifier(
    model: nn.Module,
    loader: Any,
    device: torch.device,
    image_size: int | None = None,
    mean: tuple[float, ...] | None = None,
    std: tuple[float, ...] | None = None,
    amp_dtype: torch.dtype | None = None,
) -> dict[str, Any]:
    """Loss, top-1/top-5 accuracy (%), ``n`` and the confusion matrix of ``model`` on a loader
    of ([0, 1] images, labels), resized to ``image_size`` and normalised with ``mean``/``std``."""
    return evaluate_task(model, ClassificationTask(mean=mean, std=std), loader, device, image_size, amp_dtype)


# --------------------------------------------------------------------------- building blocks
def build_augment(aug: Any, image_size: int, mean: Sequence[float], std: Sequence[float],
                  crop_on_device: bool = True) -> Compose:
    """The training augmentation on [0, 1] batches, ending with normalisation (and erasing).

    Args:
        aug: The config's ``augment`` section.
        image_size: The training size (of the random-resized crop).
        mean: Normalisation mean.
        std: Normalisation std.
        crop_on_device: False leaves out the random-resized crop: it then runs per sample in
            the DataLoader workers (image folders, whose images differ in size).
    """
    ops: list[Any] = []
    if aug.random_resized_crop and crop_on_device:
        ops.append(RandomResizedCrop(image_size, tuple(aug.crop_scale), tuple(aug.crop_ratio)))
    if aug.hflip > 0:
        ops.append(RandomHorizontalFlip(aug.hflip))
    if aug.affine_p > 0:
        ops.append(RandomAffine(aug.affine_degrees, aug.affine_translate, tuple(aug.affine_scale), aug.affine_shear,
                                fill=0.0, p=aug.affine_p))
    if aug.randaugment:
        ra: RandAugment = parse_rand_augment(aug.randaugment)
        if aug.randaugment_ops:
            ra = RandAugment(ra.num_ops, ra.magnitude, ra.magnitude_std, ra.max_magnitude, ra.op_prob,
                             ops=aug.randaugment_ops, fill=0.0 if len(mean) == 1 else ra.fill)
        ops.append(ra)
    elif aug.color_jitter > 0:
        ops.append(ColorJitter(aug.color_jitter, aug.color_jitter, aug.color_jitter if len(mean) == 3 else 0.0))
    ops.append(Normalize(mean, std))
    if aug.random_erasing > 0:
        ops.append(RandomErasing(aug.random_erasing))
    return Compose(ops)


def build_criterion(cfg: RunConfig, teacher: nn.Module | None) -> Criterion:
    """Cross-entropy (soft targets under mixup, label smoothing otherwise), wrapped for distillation."""
    a = cfg.augment
    if a.mixup_alpha > 0 or a.cutmix_alpha > 0:
        base: nn.Module = SoftTargetCrossEntropy()
    elif a.label_smoothing > 0:
        base = LabelSmoothingCrossEntropy(a.label_smoothing)
    else:
        base = nn.CrossEntropyLoss()
    d = cfg.distill
    return DistillationLoss(base, teacher, d.type if teacher is not None else "none", d.alpha, d.tau)


def build_teacher(cfg: RunConfig, num_classes: int, in_channels: int, image_size: int | None) -> nn.Module | None:
    """The distillation teacher: a registered model (optionally with weights) or a checkpoint."""
    d = cfg.distill
    if d.type == "none":
        return None
    from ..pretrained import load_model

    if d.teacher:
        extra: dict[str, Any] = {"in_channels": in_channels}
        if image_size is not None:
            extra["image_size"] = image_size
        teacher = create_model(d.teacher, pretrained=d.teacher_checkpoint, num_classes=num_classes, **extra)
    else:
        teacher = load_model(d.teacher_checkpoint)
    if getattr(teacher.config, "num_classes", num_classes) != num_classes:
        raise ValueError(f"the teacher predicts {teacher.config.num_classes} classes; the data has {num_classes}")
    return teacher.eval()


def build_datasets(cfg: RunConfig) -> tuple[Any, Any, Any | None]:
    """Train/val/test datasets yielding [0, 1] images at ``cfg.data.image_size``.

    Image folders and ImageNet trees (images of any size and mode) are decoded and cropped
    per sample in the DataLoader workers: a random-resized crop (``augment.crop_scale``,
    ``augment.crop_ratio``) or, without it, the evaluation transform for training; resize to
    ``image_size / crop_pct`` + center crop for evaluation, both with ``data.interpolation``.
    Fixed-size datasets (digits, CIFAR, synthetic) are resized per sample only when the
    training size or crop differs from their own; their random-resized crop runs batched on
    the device.
    """
    data = cfg.data
    size = data.image_size
    kind = dataset_kind(data.dataset)

    def build(split: str, transform: Callable[[Tensor], Tensor] | None = None) -> Any:
        kw = {"transform": transform} if transform is not None else {}
        return build_dataset(data.dataset, split, data.data_dir, **kw)

    def build_test(transform: Callable[[Tensor], Tensor] | None = None) -> Any | None:
        try:
            return build(split="test", transform=transform)
        except (ValueError, FileNotFoundError):
            return None

    if kind == "folder":
        if size is None:
            raise ValueError(f"data.image_size must be set to train on the image folder {data.dataset}")
        evaluate = ResizeCenterCropSample(size, data.crop_pct, data.interpolation)
        a = cfg.augment
        crop = (RandomResizedCropSample(size, a.crop_scale, a.crop_ratio, data.interpolation)
                if a.random_resized_crop else evaluate)
        return build("train", crop), build("val", evaluate), build_test(evaluate)
    train_set, val_set, test_set = build("train"), build("val"), build_test()
    native = tuple(train_set[0][0].shape[-2:])
    if size is None:
        size = data.image_size = int(native[-1])
    if native != (size, size):
        train_set = Resized(train_set, ResizeCenterCropSample(size, 1.0, data.interpolation))
    if native != (size, size) or data.crop_pct != 1.0:
        evaluate = ResizeCenterCropSample(size, data.crop_pct, data.interpolation)
        val_set = Resized(val_set, evaluate)
        test_set = Resized(test_set, evaluate) if test_set is not None else None
    return train_set, val_set, test_set


def create_classifier(cfg: RunConfig, num_classes: int, channels: int, image_size: int) -> nn.Module:
    """``cfg.model`` built for ``num_classes`` classes of ``channels`` x ``image_size`` images.

    ``model.pretrained`` may also be a run directory of ``vitlab train`` (an MAE pre-training
    run, ``--init-from``): its latest checkpoint's encoder is loaded exactly, the head is fresh.

    Raises:
        ValueError: The model cannot take that size (one line naming what to set).
    """
    from .mae.downstream import is_training_run, load_encoder_weights

    overrides = dict(cfg.model.overrides)
    overrides.setdefault("in_channels", channels)
    overrides.setdefault("image_size", image_size)
    from_run = is_training_run(cfg.model.pretrained)  # a run directory (--init-from): its encoder's weights
    try:
        model = create_model(cfg.model.name, pretrained=None if from_run else cfg.model.pretrained,
                             num_classes=num_classes, **overrides)
    except (ValueError, TypeError) as e:
        if "image_size" in cfg.model.overrides:
            raise
        raise ValueError(
            f"cannot build {cfg.model.name} for the {image_size}x{image_size} images of {cfg.data.dataset}: {e}. "
            f"Set data.image_size=N (the model's own size is slow on CPU) or fit the model to the data with "
            f"model.overrides (e.g. model.overrides.patch_size=2)"
        ) from None
    return load_encoder_weights(model, cfg.model.pretrained) if from_run else model


__all__ = ["ClassificationEvalMetrics", "ClassificationTask", "ClassificationTrainMetrics", "build_augment",
           "build_criterion", "build_datasets", "build_teacher", "create_classifier", "evaluate_classifier"]
