"""Assemble a training run from a :class:`TrainConfig`: data, model, augmentation, loss, trainer."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

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
from ..models.registry import create_model
from .config import AugmentSection, TrainConfig
from .losses import DistillationLoss, LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from .mixup import Mixup
from .trainer import Trainer


def build_augment(aug: AugmentSection, image_size: int, mean, std) -> Compose:
    """The training augmentation on [0, 1] batches, ending with normalisation (and erasing)."""
    ops: list[Any] = []
    if aug.random_resized_crop:
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


def build_criterion(cfg: TrainConfig, teacher: nn.Module | None) -> Callable[..., torch.Tensor]:
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


def build_teacher(cfg: TrainConfig, num_classes: int, in_channels: int, image_size: int | None) -> nn.Module | None:
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


def build_trainer(cfg: TrainConfig, output_dir: str | Path | None = None, log: Callable[[str], None] = print) -> Trainer:
    """Datasets, model, augmentation and loss from a config, as a ready :class:`Trainer`."""
    torch.manual_seed(cfg.seed)  # the model's initialisation is part of the run's reproducibility
    data = cfg.data
    train_set = build_dataset(data.dataset, "train", data.data_dir)
    val_set = build_dataset(data.dataset, "val", data.data_dir)
    try:
        test_set = build_dataset(data.dataset, "test", data.data_dir)
    except (ValueError, FileNotFoundError):
        test_set = None
    sample, _ = train_set[0]
    channels = sample.shape[0]
    image_size = data.image_size or int(sample.shape[-1])
    overrides = dict(cfg.model.overrides)
    overrides.setdefault("in_channels", channels)
    model = create_model(cfg.model.name, pretrained=cfg.model.pretrained, num_classes=train_set.num_classes, **overrides)
    model_size = getattr(model.config, "image_size", (image_size, image_size))
    if data.image_size is None and tuple(model_size) != (image_size, image_size):
        image_size = model_size[0]
    cfg.data.image_size = image_size
    mean, std = tuple(train_set.mean), tuple(train_set.std)
    # Checkpoints carry the preprocessing this run trains with (predict / eval read it back).
    model.pretrained_cfg = {**model.pretrained_cfg, "input_size": image_size, "mean": mean, "std": std,
                            "crop_pct": 1.0, "interpolation": "bilinear"}
    augment = build_augment(cfg.augment, image_size, mean, std)
    a = cfg.augment
    mixup = None
    if a.mixup_alpha > 0 or a.cutmix_alpha > 0:
        mixup = Mixup(mixup_alpha=a.mixup_alpha, cutmix_alpha=a.cutmix_alpha, prob=a.mixup_prob,
                      switch_prob=a.mixup_switch_prob, label_smoothing=a.label_smoothing,
                      num_classes=train_set.num_classes)
    teacher = build_teacher(cfg, train_set.num_classes, channels, image_size)
    if hasattr(model, "set_distilled_training"):
        model.set_distilled_training(teacher is not None)
    trainer = Trainer(model, cfg, train_set, val_set, test_set, labels=list(train_set.classes), mean=mean, std=std,
                      augment=augment, mixup=mixup, criterion=build_criterion(cfg, teacher),
                      output_dir=output_dir, log=log)
    if teacher is not None:
        teacher.to(trainer.device)
    return trainer


def train(cfg: TrainConfig, resume: bool = False, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run a whole training job; returns ``results.json``'s content."""
    trainer = build_trainer(cfg, log=log)
    if resume and not trainer.resume():
        log(f"no checkpoint in {trainer.out}; starting from scratch")
    return trainer.fit()
