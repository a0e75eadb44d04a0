"""Use a trained segmentation checkpoint: evaluate it on a split, segment image files.

``vitlab eval`` and ``vitlab predict`` on a segmentation checkpoint call the task's inference
hooks (:class:`SegmentationInference`): :func:`evaluate_segmentation_checkpoint`, :func:`segment`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader

from ...datasets.transforms import normalize
from ..base import TaskInference, evaluate_task
from ..registry import register_inference
from ...models.registry import register_task_model
from .inference import predict_sliding, predict_tta, predict_whole
from .model import FAMILY, SegmentationModel, SegmenterConfig, load_segmenter
from .task import SCENE_DATASETS, SegmentationSection, SegmentationTask, folder_splits, scene_splits

MODES: tuple[str, ...] = ("whole", "sliding", "tta")


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _eval_split(model: SegmentationModel, dataset: str | None, split: str | None,
                labels: Sequence[str]) -> tuple[Any, str, str]:
    """(the split's (image, mask) dataset, its name, the dataset name) as the checkpoint records."""
    pcfg = model.pretrained_cfg
    source = dict(pcfg.get("data") or {})
    name = dataset or source.get("dataset") or "digit_scenes"
    size = int(model.config.image_size[0])
    if str(name).lower() in SCENE_DATASETS:
        s = SegmentationSection(canvas_size=int(source.get("canvas_size", size)),
                                max_digits=int(source.get("max_digits", 4)),
                                digit_size=tuple(source.get("digit_size", (12, 28))),
                                clutter=int(source.get("clutter", 0)),
                                val_scenes=int(source.get("val_scenes", 200)),
                                test_scenes=int(source.get("test_scenes", 500)) or 500, train_scenes=1)
        train, val, test = scene_splits(s)
        name = "digit_scenes"
    else:
        s = SegmentationSection(ignore_index=int(pcfg.get("ignore_index", 255)))
        train, val, test = folder_splits(name, s, size, model.config.in_channels)
    splits = {"train": train, "val": val, "test": test}
    if split is None:
        split = "test" if test is not None else "val"
    if splits.get(split) is None:
        raise ValueError(f"{name} has no {split} split")
    data = splits[split]
    if list(data.classes) != list(labels):
        raise ValueError(f"the checkpoint's classes {list(labels)[:5]}... differ from {name}'s {list(data.classes)[:5]}...")
    return data, split, str(name)


def evaluate_segmentation_checkpoint(checkpoint: str | Path, dataset: str | None = None, split: str | None = None,
                                     output_dir: str | Path | None = None, device: str = "auto",
                                     batch_size: int = 64) -> dict[str, Any]:
    """mIoU, per-class IoU, pixel accuracy and loss of a segmentation checkpoint on a split.

    Args:
        checkpoint: A segmentation checkpoint (file, folder, run directory).
        dataset: ``digit_scenes`` or a segmentation folder; None: the data it was trained on.
        split: ``train``, ``val`` or ``test`` (None: test when there is one, else val).
        output_dir: Where ``eval_<dataset>_<split>.json`` goes (default: the checkpoint's folder).
        device: ``auto``, ``cpu``, ``cuda``...
        batch_size: Evaluation batch size.

    Returns:
        The metrics plus ``split``, ``dataset``, ``labels`` and ``json`` (the file written).
    """
    model, labels = load_segmenter(checkpoint)
    labels = labels or [str(i) for i in range(model.config.num_classes)]
    data, split, name = _eval_split(model, dataset, split, labels)
    pcfg = model.pretrained_cfg
    task = SegmentationTask(model.config.num_classes, labels, pcfg.get("mean"), pcfg.get("std"),
                            ignore_index=int(pcfg.get("ignore_index", 255)))
    dev = _device(device)
    res = evaluate_task(model.to(dev), task, DataLoader(data, batch_size=batch_size, shuffle=False), dev,
                        int(model.config.image_size[0]))
    res.pop("confusion", None)
    out = Path(output_dir) if output_dir else (Path(checkpoint) if Path(checkpoint).is_dir() else Path(checkpoint).parent)
    out.mkdir(parents=True, exist_ok=True)
    file = out / f"eval_{Path(name).name}_{split}.json"
    file.write_text(json.dumps({**res, "labels": labels, "split": split}, indent=2))
    return {**res, "split": split, "dataset": name, "labels": labels, "json": str(file)}


def format_iou_table(res: dict[str, Any]) -> str:
    """The per-class IoU table of :func:`evaluate_segmentation_checkpoint`'s result, then mIoU and pixel accuracy."""
    labels = res["labels"]
    width = max(5, *(len(str(x)) for x in labels))
    lines = [f"{'class':<{width}}  IoU"]
    for name, v in zip(labels, res["per_class_iou"]):
        lines.append(f"{name:<{width}}  {'absent' if v != v else f'{v:.4f}'}")
    lines.append(f"{'mIoU':<{width}}  {res['mIoU']:.4f}")
    lines.append(f"{'pixel accuracy':<{width}}  {res['pixel_accuracy']:.4f}")
    return "\n".join(lines)


def load_for_model(path: str | Path, channels: int) -> Tensor:
    """An image file as a (1, C, H, W) [0, 1] tensor with the model's channels (1: grey, 3: RGB)."""
    from ...datasets.transforms import load_image

    pil = load_image(path)
    if channels == 1:
        pil = pil.convert("L")
    arr = np.asarray(pil, dtype=np.float32) / 255.0
    x = torch.from_numpy(arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1).copy())  # (H, W, C) -> (C, H, W)
    return x[None]


@torch.no_grad()
def segment(model: SegmentationModel, images: Tensor, mode: str = "whole", scales: Sequence[float] = (0.75, 1.0, 1.25),
            flip: bool = True, stride: int | None = None) -> Tensor:
    """Logits (B, K, H, W) of [0, 1] images (B, C, H, W), normalised as the model records.

    Args:
        model: A segmentation model (put in eval mode here).
        images: [0, 1] images of any size.
        mode: ``whole`` (one pass), ``sliding`` (windows of the training size, overlapping by a
            third unless ``stride``), ``tta`` (``scales`` x optional horizontal ``flip``).
        scales: TTA scales.
        flip: TTA flip.
        stride: Sliding-window step.
    """
    if mode not in MODES:
        raise ValueError(f"unknown inference mode {mode!r}; choose one of {', '.join(MODES)}")
    model.eval()
    pcfg = model.pretrained_cfg
    x = images
    if pcfg.get("mean") is not None and pcfg.get("std") is not None:
        x = normalize(x, tuple(pcfg["mean"]), tuple(pcfg["std"]))
    if mode == "whole":
        return predict_whole(model, x)
    window = int(model.config.image_size[0])
    if mode == "sliding":
        return predict_sliding(model, x, window, stride or max(1, window * 2 // 3))
    return predict_tta(model, x, scales=scales, flip=flip)


register_task_model(FAMILY, SegmentationModel, SegmenterConfig, "segmentation")


@register_inference("segmentation")
class SegmentationInference(TaskInference):
    """Segmentation checkpoints: a class map per image, the IoU table, mask and overlay PNGs."""

    json_exclude = ("mask",)

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> torch.nn.Module:
        model, labels = load_segmenter(path)
        model.labels = labels or [str(i) for i in range(model.config.num_classes)]
        return model.to(device)

    @classmethod
    def predict(cls, model: torch.nn.Module, images: Sequence[Any], mode: str = "whole",
                scales: Sequence[float] = (0.75, 1.0, 1.25), flip: bool = True, **options: Any) -> list[dict[str, Any]]:
        """Per image ``mask`` (the class id of every pixel, a (H, W) list of lists) and ``classes``
        (pixel fraction of each class present); ``mode`` as :func:`segment`."""
        from ..inputs import to_unit_tensor

        labels = list(getattr(model, "labels", None) or [str(i) for i in range(model.config.num_classes)])
        device = next(model.parameters()).device
        records = []
        for image in images:
            x = to_unit_tensor(image, 0.0)
            channels = model.config.in_channels
            if x.shape[0] != channels:  # grey <-> colour, as the files are read
                x = x.mean(0, keepdim=True) if channels == 1 else x.expand(channels, *x.shape[1:])
            pred = segment(model, x[None].to(device), mode, scales, flip).argmax(1)[0].cpu()
            counts = torch.bincount(pred.flatten(), minlength=len(labels)).double() / pred.numel()
            records.append({"mask": pred.tolist(),
                            "classes": {labels[i]: float(c) for i, c in enumerate(counts) if c > 0}})
        return records

    @classmethod
    def draw(cls, image: Any, record: dict[str, Any], output_dir: str | Path, stem: str,
             alpha: float = 0.5) -> list[Path]:
        """``<stem>_mask.png`` (palette PNG of class ids) and ``<stem>_overlay.png``."""
        from PIL import Image

        from ..inputs import to_unit_tensor
        from .visualize import overlay, save_mask_png

        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        pred = torch.tensor(record["mask"])
        mask_file = save_mask_png(pred, out / f"{stem}_mask.png")
        overlay_file = out / f"{stem}_overlay.png"
        Image.fromarray(overlay(to_unit_tensor(image, 0.0), pred, alpha)).save(overlay_file)
        return [mask_file, overlay_file]

    @classmethod
    def evaluate(cls, checkpoint: str | Path, dataset: str | None = None, split: str | None = None,
                 output_dir: str | Path | None = None, device: str = "cpu", batch_size: int = 64,
                 **options: Any) -> dict[str, Any]:
        dataset = None if dataset in (None, "digits") else dataset  # default: the data it was trained on
        return evaluate_segmentation_checkpoint(checkpoint, dataset, split=split, output_dir=output_dir,
                                                device=device, batch_size=batch_size)

    @classmethod
    def report(cls, results: dict[str, Any]) -> str:
        return (f"{results['dataset']} {results['split']} (n={results['n']})\n{format_iou_table(results)}\n"
                f"wrote {results['json']}")

    @classmethod
    def add_predict_arguments(cls, parser: Any) -> None:
        parser.add_argument("--mode", default="whole", choices=list(MODES),
                            help="segmentation: whole image, sliding windows of the training size, or multi-scale + "
                                 "flip TTA")
        parser.add_argument("--scales", type=float, nargs="+", default=[0.75, 1.0, 1.25],
                            help="segmentation TTA scales")
        parser.add_argument("--no-flip", dest="flip", action="store_false",
                            help="segmentation TTA without the mirrored pass")

    @classmethod
    def describe(cls, name: str, record: dict[str, Any]) -> str:
        top = ", ".join(f"{k} {v:.1%}" for k, v in sorted(record["classes"].items(), key=lambda kv: -kv[1])[:5])
        return f"{name}: {top}"


__all__ = ["MODES", "SegmentationInference", "evaluate_segmentation_checkpoint", "format_iou_table", "load_for_model",
           "segment"]
