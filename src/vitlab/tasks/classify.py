"""Image classification inference: :class:`ImageClassifier` (a model, its preprocessing and
labels), :func:`evaluate_checkpoint` (top-1/top-5, loss and a confusion matrix of a checkpoint
on a dataset) and the classification plugin's inference hooks."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from ..datasets.factory import build_dataset
from ..datasets.pipeline import ResizeCenterCropSample, dataset_kind
from ..datasets.transforms import EvalTransform, ImageLike
from ..pretrained import load_model
from .base import TaskInference, resolve_device
from ..datasets.pipeline import Resized
from .image_classification import evaluate_classifier
from .inputs import background_for, check_finite, input_notes, to_unit_tensor
from .registry import register_inference


def evaluate_checkpoint(
    checkpoint: str | Path,
    dataset: str = "digits",
    split: str | None = None,
    data_dir: str | None = None,
    output_dir: str | Path | None = None,
    device: str = "auto",
    batch_size: int = 256,
    model: nn.Module | None = None,
) -> dict[str, Any]:
    """Metrics of a checkpoint on a dataset split, preprocessed as the checkpoint records.

    Images are resized to ``floor(input_size / crop_pct)`` and center-cropped with the
    checkpoint's interpolation, per sample (so image folders of any size work), then
    normalised with its mean/std. ``split`` None takes ``test`` when the dataset has one,
    else ``val``. Writes ``eval_<dataset>_<split>.json`` and a confusion matrix PNG into
    ``output_dir`` (default: the checkpoint's folder); the split used is ``res["split"]``.
    """
    model = model if model is not None else load_model(checkpoint)  # model: the checkpoint already loaded
    pcfg = model.pretrained_cfg
    EvalTransform.from_config(pcfg)  # refuses a checkpoint whose preprocessing is unknown
    size = pcfg.get("input_size")
    size = int(size[-1] if isinstance(size, (list, tuple)) else size) if size else None
    kw: dict[str, Any] = {}
    if size is not None:
        kw["transform"] = ResizeCenterCropSample(size, float(pcfg.get("crop_pct", 1.0)),
                                                 str(pcfg.get("interpolation", "bilinear")))
    if split is None:
        try:
            data, split = _build_transformed(dataset, "test", data_dir, kw), "test"
        except (ValueError, FileNotFoundError):
            data, split = _build_transformed(dataset, "val", data_dir, kw), "val"
    else:
        data = _build_transformed(dataset, split, data_dir, kw)
    n_model = model.config.num_classes
    if n_model != data.num_classes:
        raise ValueError(f"the checkpoint predicts {n_model} classes but {dataset} has {data.num_classes}")
    dev = resolve_device(device)
    loader = DataLoader(data, batch_size=batch_size, shuffle=False)
    res = evaluate_classifier(model.to(dev), loader, dev, size, tuple(pcfg.get("mean", data.mean)), tuple(pcfg.get("std", data.std)))
    out = Path(output_dir) if output_dir else (Path(checkpoint) if Path(checkpoint).is_dir() else Path(checkpoint).parent)
    out.mkdir(parents=True, exist_ok=True)
    cm = res.pop("confusion")
    stem = f"eval_{Path(str(dataset)).name}_{split}"
    (out / f"{stem}.json").write_text(json.dumps({**res, "confusion_matrix": cm.tolist()}, indent=2))
    try:
        from .plots import plot_confusion_matrix

        res["confusion_matrix_png"] = str(plot_confusion_matrix(cm, list(data.classes), out / f"{stem}_confusion.png"))
    except ImportError:
        pass
    res["confusion"] = cm
    res["split"] = split
    return res


def _build_transformed(dataset: str, split: str, data_dir: str | None, kw: dict[str, Any]) -> Any:
    """A dataset split with the per-sample eval transform (folders take it; fixed-size ones are wrapped)."""
    if dataset_kind(dataset) == "folder":
        return build_dataset(dataset, split, data_dir, **kw)
    data = build_dataset(dataset, split, data_dir)
    return Resized(data, kw["transform"]) if kw else data


def is_batch(image: Any) -> bool:
    """Whether ``image`` is several images (a list / tuple, or a 4-D tensor or array)."""
    if isinstance(image, (list, tuple)):
        return True
    if isinstance(image, Tensor):
        return image.ndim == 4
    if hasattr(image, "ndim") and not isinstance(image, (str, Path)):
        return image.ndim == 4
    return False


class ImageClassifier:
    """A classifier with its checkpoint's preprocessing and class names (what predict needs).

    Args:
        model: Any vitlab classifier (``config.num_classes``, ``config.in_channels``,
            ``pretrained_cfg``).
        labels: Class names; default the checkpoint's, ImageNet-1k's for 1000 classes, or
            ``class_<i>``.
        device: Where to run.
        runner: What is called on the normalised batch (default: the model; see
            :class:`vitlab.ViTClassifier` for bf16 / int8 / compiled runners).

    Inputs are checked (see :mod:`vitlab.tasks.inputs`): 16-bit images are scaled, not clipped;
    transparency is composited on the training data's background; arrays outside their
    dtype's range or floats outside [0, 1] are refused; NaN / infinite outputs raise.
    """

    def __init__(self, model: nn.Module, labels: Sequence[str] | None = None, device: str | torch.device = "cpu",
                 runner: Callable[[Tensor], Tensor] | None = None) -> None:
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.runner = runner or self.model
        n = model.config.num_classes
        if labels is None:
            labels = getattr(model, "labels", None)
        if labels is None and n == 1000:
            from ..pretrained import imagenet_labels

            labels = imagenet_labels()
        if labels is None:
            labels = [f"class_{i}" for i in range(n)]
        if len(labels) != n:
            raise ValueError(f"got {len(labels)} labels for a model with {n} classes")
        self.labels = list(labels)
        self.transform = EvalTransform.from_config(model.pretrained_cfg, channels=model.config.in_channels)
        #: Value transparent pixels are composited on (0: black, 1: white).
        self.background = background_for(model.pretrained_cfg)

    def _unit_images(self, image: ImageLike | Sequence[ImageLike]) -> list[Tensor]:
        """Checked images, each float (C, H, W) in [0, 1] (a batch is split into its images)."""
        items = list(image) if isinstance(image, (list, tuple)) else [image]
        out: list[Tensor] = []
        for item in items:
            t = to_unit_tensor(item, self.background)
            out.extend(t.unbind(0) if t.ndim == 4 else [t])
        return out

    def preprocess(self, image: ImageLike | Sequence[ImageLike]) -> Tensor:
        """Images -> the normalised batch the model expects (B, C, S, S)."""
        return torch.cat([self.transform(t) for t in self._unit_images(image)]).to(self.device)

    def notes(self, image: ImageLike | Sequence[ImageLike]) -> list[list[str]]:
        """Per image: notes on how far it is from the training data (size, channels, polarity)."""
        channels = self.model.config.in_channels
        return [input_notes(t, self.model.pretrained_cfg, channels) for t in self._unit_images(image)]

    @torch.inference_mode()
    def predict_proba(self, image: ImageLike | Sequence[ImageLike]) -> Tensor:
        """Class probabilities (B, num_classes).

        Raises:
            NonFiniteOutputError: The model's outputs hold NaN or infinity.
        """
        logits = self.runner(self.preprocess(image))
        check_finite(logits)
        return logits.softmax(dim=-1)

    def predict(self, image: ImageLike | Sequence[ImageLike], top_k: int = 5) -> dict[str, Any] | list[dict[str, Any]]:
        """Classify one image (a dict) or a batch/list (a list of dicts).

        Each result: ``{"class": label, "index": i, "confidence": p, "top_k": [{"class", "index",
        "confidence"}, ...], "notes": [...]}``; ``notes`` says when the image is far from the
        training data (size, channels, inverted polarity, mean intensity), else it is empty.

        Raises:
            InputError: An image vitlab cannot take (see the class docstring).
            NonFiniteOutputError: The model's outputs hold NaN or infinity.
        """
        units = self._unit_images(image)
        with torch.inference_mode():
            logits = self.runner(torch.cat([self.transform(t) for t in units]).to(self.device))
        names = [str(p) for p in image] if isinstance(image, (list, tuple)) else [str(image)] \
            if isinstance(image, (str, Path)) else None
        check_finite(logits, names)
        probs = logits.softmax(dim=-1)
        channels = self.model.config.in_channels
        k = max(1, min(top_k, probs.shape[1]))
        values, indices = probs.topk(k, dim=1)
        results = []
        for unit, vals, idx in zip(units, values.tolist(), indices.tolist()):
            top = [{"class": self.labels[i], "index": i, "confidence": p} for p, i in zip(vals, idx)]
            results.append({**top[0], "top_k": top, "notes": input_notes(unit, self.model.pretrained_cfg, channels)})
        return results if is_batch(image) else results[0]


@register_inference("classification")
class ClassificationInference(TaskInference):
    """Classification checkpoints: any backbone (vitlab, timm or Hugging Face weights)."""

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> nn.Module:
        return load_model(path).to(device).eval()

    @classmethod
    def predict(cls, model: nn.Module, images: Sequence[Any], top_k: int = 5, **options: Any) -> list[dict[str, Any]]:
        """``class``, ``index``, ``confidence``, ``top_k`` and ``notes`` per image (see :class:`ImageClassifier`)."""
        if top_k < 1:
            raise ValueError(f"top_k must be at least 1, got {top_k}")
        device = next(model.parameters()).device
        out = ImageClassifier(model, device=device, **options).predict(list(images), top_k=top_k)
        return out if isinstance(out, list) else [out]

    @classmethod
    def evaluate(cls, checkpoint: str | Path, dataset: str | None = None, split: str | None = None,
                 output_dir: str | Path | None = None, device: str = "cpu", batch_size: int = 256,
                 **options: Any) -> dict[str, Any]:
        res = evaluate_checkpoint(checkpoint, dataset or "digits", split=split, output_dir=output_dir, device=device,
                                  batch_size=batch_size, **options)
        res["dataset"] = dataset or "digits"
        return res

    @classmethod
    def report(cls, results: dict[str, Any]) -> str:
        line = (f"{results['dataset']} {results['split']}: top-1 {results['top1']:.2f}%  top-5 {results['top5']:.2f}%  "
                f"loss {results['loss']:.4f}  (n={results['n']})")
        if results.get("confusion_matrix_png"):
            line += f"\nconfusion matrix: {results['confusion_matrix_png']}"
        return line

    @classmethod
    def describe(cls, name: str, record: dict[str, Any]) -> str:
        lines = [f"{name}: {record['class']} ({record['confidence']:.1%})"]
        lines += [f"    {t['class']} ({t['confidence']:.1%})" for t in record["top_k"][1:]]
        return "\n".join(lines)


__all__ = ["ClassificationInference", "ImageClassifier", "evaluate_checkpoint", "is_batch"]
