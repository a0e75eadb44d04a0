"""The original plan's high-level APIs: :class:`ViTTrainer` and :class:`ViTTransferLearning`."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import Any

from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..datasets.factory import build_dataset
from ..datasets.pipeline import ResizeCenterCropSample, dataset_kind, preprocessing_record
from ..datasets.transforms import UNKNOWN
from ..models.vit import ViTConfig, VisionTransformer
from .config import TrainConfig
from ..datasets.pipeline import Resized
from .trainer import Trainer


class ViTTrainer:
    """Train a model from a config with your own data loaders.

    Args:
        config: A :class:`ViTConfig` (a :class:`VisionTransformer` is built from it) or a model.
        train_config: Optimiser/schedule/precision settings; defaults to :class:`TrainConfig`.
        output_dir: Run directory (metrics.jsonl, checkpoints, results.json, plots).
        preprocessing: What your loaders do to an image before the model sees it, so that
            checkpoints (and :class:`vitlab.ViTClassifier`, ``vitlab predict`` / ``eval``)
            repeat it: ``dict(mean=..., std=..., crop_pct=..., interpolation=...,
            image_size=...)`` (``image_size`` defaults to the model's). vitlab cannot see
            inside a user's loader, so without it the checkpoints record the preprocessing
            as ``"unknown"`` (with a warning) and ``ViTClassifier`` refuses them until it is set.
        **overrides: Top-level :class:`TrainConfig` fields (``device``, ``precision``, ``ema_decay``...).

    Example:
        >>> trainer = ViTTrainer(ViTConfig(image_size=32, patch_size=4, num_classes=10, dim=192, depth=6, heads=3, mlp_dim=384))
        >>> trainer.train(train_loader=train_loader, val_loader=val_loader, epochs=10, learning_rate=1e-3)

    The loaders yield ``(images, labels)`` already preprocessed for the model (vitlab applies
    no normalisation or augmentation to user loaders).
    """

    def __init__(self, config: ViTConfig | nn.Module, train_config: TrainConfig | None = None,
                 output_dir: str | Path = "runs/vit_trainer", preprocessing: dict[str, Any] | None = None,
                 **overrides: Any) -> None:
        self.model = VisionTransformer(config) if isinstance(config, ViTConfig) else config
        self.preprocessing = _check_preprocessing(preprocessing, self.model) if preprocessing is not None else None
        self.train_config = copy.deepcopy(train_config) if train_config is not None else TrainConfig()
        for k, v in overrides.items():
            if not hasattr(self.train_config, k):
                raise ValueError(f"unknown training option {k!r}")
            setattr(self.train_config, k, v)
        self.train_config.output_dir = str(output_dir)
        self.history: list[dict[str, Any]] = []

    def train(self, train_loader: DataLoader, val_loader: DataLoader | None = None, epochs: int | None = None,
              learning_rate: float | None = None, test_loader: DataLoader | None = None) -> dict[str, Any]:
        """Train for ``epochs`` with peak ``learning_rate``; returns the final results."""
        cfg = copy.deepcopy(self.train_config)
        if epochs is not None:
            cfg.epochs = epochs
        if learning_rate is not None:
            cfg.optim.lr = learning_rate
        cfg.optim.warmup_epochs = min(cfg.optim.warmup_epochs, max(0.0, cfg.epochs / 5))
        cfg.__post_init__()
        if self.preprocessing is not None:
            self.model.pretrained_cfg = {k: v for k, v in self.model.pretrained_cfg.items() if k != "preprocessing"}
            self.model.pretrained_cfg.update(self.preprocessing)
        else:
            warnings.warn(
                "ViTTrainer: preprocessing=dict(mean=..., std=..., crop_pct=..., interpolation=...) was not given, so "
                "the checkpoints record the preprocessing as unknown and ViTClassifier will refuse them",
                stacklevel=2,
            )
            self.model.pretrained_cfg = {**self.model.pretrained_cfg, "preprocessing": UNKNOWN}
        trainer = Trainer(self.model, cfg, train_loader, val_loader, test_loader)
        results = trainer.fit()
        self.history = trainer.history
        return results


def _check_preprocessing(pre: dict[str, Any], model: nn.Module) -> dict[str, Any]:
    """A ``preprocessing`` dict as ``pretrained_cfg`` keys; one error naming what is missing or unknown."""
    required = ("mean", "std", "crop_pct", "interpolation")
    allowed = (*required, "image_size")
    unknown = sorted(set(pre) - set(allowed))
    missing = [k for k in required if k not in pre]
    if unknown or missing:
        raise ValueError(
            "preprocessing must give " + ", ".join(required) + " (and optionally image_size)"
            + (f"; missing {', '.join(missing)}" if missing else "") + (f"; unknown {', '.join(unknown)}" if unknown else "")
        )
    size = pre.get("image_size")
    if size is None:
        size = getattr(model.config, "image_size", (224, 224))
    size = int(size[-1] if isinstance(size, (tuple, list)) else size)
    return preprocessing_record(size, pre["mean"], pre["std"], pre["crop_pct"], pre["interpolation"])


class ViTTransferLearning:
    """Fine-tune a pretrained model on a new dataset.

    Args:
        pretrained_model: A registered name (its default pretrained weights, from the local
            hub cache or the network) or a checkpoint file/folder (vitlab, timm or HF).
        num_classes: Classes of the new task; the classifier is replaced.
        freeze_backbone: Train only the classifier (a linear probe) at first.
        device: ``auto``, ``cpu`` or ``cuda``.
    """

    def __init__(self, pretrained_model: str | Path | nn.Module, num_classes: int, freeze_backbone: bool = True,
                 device: str = "auto") -> None:
        from ..models.registry import list_models
        from ..pretrained import create_model
        from ..pretrained import load_model

        if isinstance(pretrained_model, nn.Module):
            model = pretrained_model
        elif str(pretrained_model) in list_models() and not Path(str(pretrained_model)).exists():
            model = create_model(str(pretrained_model), pretrained=True)
        else:
            model = load_model(pretrained_model)
        model.reset_classifier(num_classes)
        self.model = model
        self.num_classes = num_classes
        self.device = device
        self.history: list[dict[str, Any]] = []
        self.set_backbone_trainable(not freeze_backbone)

    def head_parameter_names(self) -> list[str]:
        """Parameters ``forward_head`` uses (pooling norm, pre-logits, classifiers): trained even with a frozen backbone."""
        return self.model.head_parameter_names()

    def set_backbone_trainable(self, trainable: bool) -> None:
        head = set(self.head_parameter_names())
        for n, p in self.model.named_parameters():
            p.requires_grad_(trainable or n in head)

    def fine_tune(
        self,
        dataset: Dataset | str,
        epochs: int = 10,
        learning_rate: float = 1e-4,
        val_dataset: Dataset | None = None,
        test_dataset: Dataset | None = None,
        batch_size: int = 32,
        unfreeze_epochs: int = 0,
        layer_decay: float = 0.75,
        output_dir: str | Path = "runs/transfer",
        **overrides: Any,
    ) -> dict[str, Any]:
        """Train the head (and, for ``unfreeze_epochs`` more, everything with layer-wise lr decay).

        Args:
            dataset: A vitlab-style dataset ((image in [0, 1], label) with ``mean``/``std``) or
                a dataset name (``"digits"``, ``"cifar10"``, a folder path): its train/val/test
                splits are used.
            epochs: Epochs with the backbone as set at construction.
            learning_rate: Peak lr.
            unfreeze_epochs: Further epochs with the whole model trainable, the lr decayed by
                ``layer_decay`` per block from the head down.
            **overrides: Top-level :class:`TrainConfig` fields.

        Images are preprocessed as the model's ``pretrained_cfg`` says (resize to
        ``input_size / crop_pct``, center crop, interpolation, per sample; then the model's own
        mean/std), so the fine-tuned checkpoint records the preprocessing it was trained with.
        """
        pcfg = self.model.pretrained_cfg
        if pcfg.get("preprocessing") == UNKNOWN:
            raise ValueError("this model's preprocessing is unknown (trained by ViTTrainer on its own loaders without "
                             "preprocessing=...): set model.pretrained_cfg mean/std/crop_pct/interpolation first")
        size = pcfg.get("input_size", self.model.config.image_size[0])
        size = int(size[-1] if isinstance(size, (tuple, list)) else size)
        per_sample = ResizeCenterCropSample(size, float(pcfg.get("crop_pct", 1.0)), str(pcfg.get("interpolation", "bilinear")))
        if isinstance(dataset, str) and dataset_kind(dataset) == "folder":
            name = dataset
            dataset = build_dataset(name, "train", transform=per_sample)
            val_dataset = val_dataset or build_dataset(name, "val", transform=per_sample)
            test_dataset = test_dataset or _optional_split(name, per_sample)
        else:
            if isinstance(dataset, str):
                name = dataset
                dataset = build_dataset(name, "train")
                val_dataset = val_dataset or build_dataset(name, "val")
                test_dataset = test_dataset or build_dataset(name, "test")
            dataset, val_dataset, test_dataset = (None if d is None else Resized(d, per_sample)
                                                  for d in (dataset, val_dataset, test_dataset))
        n = getattr(dataset, "num_classes", self.num_classes)
        if n != self.num_classes:
            raise ValueError(f"the dataset has {n} classes; this transfer model was built for {self.num_classes}")
        channels = self.model.config.in_channels
        mean, std = tuple(pcfg["mean"])[:channels], tuple(pcfg["std"])[:channels]
        results: dict[str, Any] = {}
        for phase, n_epochs, decay in (("head", epochs, None), ("full", unfreeze_epochs, layer_decay)):
            if n_epochs <= 0:
                continue
            if phase == "full":
                self.set_backbone_trainable(True)
            cfg = TrainConfig(epochs=n_epochs, device=self.device, output_dir=str(Path(output_dir) / phase))
            cfg.data.batch_size = batch_size
            cfg.data.image_size = size
            cfg.optim.lr = learning_rate
            cfg.optim.layer_decay = decay
            cfg.optim.warmup_epochs = min(1.0, n_epochs / 5)
            for k, v in overrides.items():
                if not hasattr(cfg, k):
                    raise ValueError(f"unknown training option {k!r}")
                setattr(cfg, k, v)
            trainer = Trainer(self.model, cfg, _Gray(dataset, channels), _Gray(val_dataset, channels),
                              _Gray(test_dataset, channels), mean=mean, std=std,
                              labels=list(getattr(dataset, "classes", [])) or None)
            results = trainer.fit()
            self.history += [{**h, "phase": phase} for h in trainer.history]
        return results


def _optional_split(name: str, transform: Any) -> Dataset | None:
    try:
        return build_dataset(name, "test", transform=transform)
    except (ValueError, FileNotFoundError):
        return None


class _Gray(Dataset):
    """Adapt 1-channel data to a 3-channel model (repeat) and back (mean)."""

    def __new__(cls, data: Dataset | None, channels: int):
        if data is None:
            return None
        sample, _ = data[0]
        if sample.shape[0] == channels:
            return data
        return super().__new__(cls)

    def __init__(self, data: Dataset, channels: int) -> None:
        self.data, self.channels = data, channels

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int):
        x, y = self.data[i]
        if x.shape[0] == 1 and self.channels == 3:
            x = x.expand(3, -1, -1)
        elif x.shape[0] == 3 and self.channels == 1:
            x = x.mean(0, keepdim=True)
        return x, y
