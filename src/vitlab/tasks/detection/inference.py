"""Detection checkpoints and inference: load a detector, detect, evaluate, draw, JSON records."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, nn

from ..base import TaskInference, resolve_device
from ..registry import register_inference
from ...models.registry import register_task_model
from .coco_eval import COCO_METRICS
from .detr import DETR, DETRConfig
from .postprocess import postprocess_detections
from .data import scenes_from_record
from .task import MEAN_STD, DetectionSamples, DetectionTask
from .yolos import YOLOS, YOLOSConfig


# --------------------------------------------------------------------------- checkpoints
def load_detector(path: str | Path) -> nn.Module:
    """A DETR or YOLOS model from a vitlab checkpoint (file, folder or a run's ``checkpoints/epoch-N``).

    Raises:
        vitlab.errors.CheckpointError: The checkpoint is not a detector's.
    """
    from ...errors import CheckpointError
    from ...models.vit import ViTConfig
    from ...pretrained.io import read_weights

    ck = read_weights(path)
    meta = ck.vitlab_config or {}
    family, c = meta.get("family"), copy.deepcopy(meta.get("config") or {})
    if family == "DETR":
        c["pyramid_scales"] = tuple(c.get("pyramid_scales", (2.0, 1.0, 0.5)))
        model: nn.Module = DETR(DETRConfig(**c))
    elif family == "YOLOS":
        v = c.pop("vit")
        v = {k: tuple(x) if isinstance(x, list) else x for k, x in v.items()}
        model = YOLOS(YOLOSConfig(vit=ViTConfig(**v), **c))
    else:
        raise CheckpointError(f"{path} is not a detection checkpoint (family {family!r}; expected DETR or YOLOS)")
    model.load_state_dict(ck.state_dict)
    model.pretrained_cfg = dict(meta.get("pretrained_cfg") or {})
    model.model_name = meta.get("model_name")
    model.labels = meta.get("labels")
    return model.eval()


# --------------------------------------------------------------------------- inference
@torch.no_grad()
def detect(model: nn.Module, images: Tensor, score_threshold: float = 0.5, top_k: int | None = 100,
           image_sizes: Sequence[tuple[int, int]] | None = None) -> list[dict[str, Tensor]]:
    """Detections of ``model`` on [0, 1] images already at its input size.

    Args:
        model: A DETR or YOLOS (with ``pretrained_cfg``'s ``mean``/``std``, else 0.5).
        images: (B, C, S, S) in [0, 1].
        score_threshold: Minimum score.
        top_k: At most this many detections per image.
        image_sizes: ``(height, width)`` of each original image: boxes are scaled to it
            (default: the input size).

    Returns:
        Per image ``scores``, ``labels`` and ``boxes`` (xyxy pixels of the original image).
    """
    pcfg = getattr(model, "pretrained_cfg", {}) or {}
    mean = torch.tensor(pcfg.get("mean", [MEAN_STD] * images.shape[1]), device=images.device)[None, :, None, None]
    std = torch.tensor(pcfg.get("std", [MEAN_STD] * images.shape[1]), device=images.device)[None, :, None, None]
    out = model((images - mean) / std)
    s = images.shape[-1]
    dets = postprocess_detections(out["logits"], out["boxes"], [(s, s)] * len(images), score_threshold, top_k)
    if image_sizes is not None:
        for det, (h, w) in zip(dets, image_sizes):
            det["boxes"] = det["boxes"] * torch.tensor([w / s, h / s] * 2, device=det["boxes"].device)
    return dets


def evaluate_detector(model: nn.Module, data: Any, batch_size: int = 64, device: str | torch.device = "cpu",
                      num_plot_images: int = 0) -> dict[str, Any]:
    """COCO box metrics of a detector on a :class:`DetectionSamples` dataset (see :class:`DetectionEvalMetrics`)."""
    from torch.utils.data import DataLoader

    from ..base import evaluate_task

    task = DetectionTask(data.num_classes, data.classes, num_plot_images=num_plot_images)
    loader = DataLoader(data, batch_size=batch_size, shuffle=False)
    model.to(device)
    return evaluate_task(model, task, loader, torch.device(device))


def data_for_checkpoint(model: nn.Module, split: str = "test", dataset: str | None = None) -> Any:
    """The split of the data recorded in a detector's checkpoint, as :class:`DetectionSamples`.

    Args:
        model: A detector from :func:`load_detector`.
        split: ``train``, ``val`` or ``test``.
        dataset: A COCO-format split folder (``annotations.json`` + ``images/``) to use instead.
    """
    pcfg = model.pretrained_cfg
    size = int(pcfg["input_size"][-1])
    record = pcfg.get("data", {})
    if dataset is not None:
        from ...datasets.coco import CocoDetection

        root = Path(dataset)
        ds = CocoDetection(root / "annotations.json", root / "images")
        return DetectionSamples(ds, size, max(ds.max_objects, 1))
    ds = scenes_from_record(record, split, size)
    return DetectionSamples(ds, size, ds.max_digits)


def draw_detections(image: Any, detections: Mapping[str, Tensor], labels: Sequence[str] | None = None) -> Any:
    """A copy of a PIL image with the detections' boxes and labels drawn (RGB)."""
    from PIL import ImageDraw

    out = image.convert("RGB")
    draw = ImageDraw.Draw(out)
    for box, lab, sc in zip(detections["boxes"].tolist(), detections["labels"].tolist(), detections["scores"].tolist()):
        draw.rectangle(box, outline=(255, 0, 0), width=max(1, round(min(out.size) / 100)))
        name = labels[lab] if labels is not None and lab < len(labels) else str(lab)
        draw.text((box[0], max(0, box[1] - 10)), f"{name} {sc:.2f}", fill=(255, 0, 0))
    return out


def detections_to_json(detections: Mapping[str, Tensor], labels: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """JSON-ready detections: ``label`` (index), ``class`` (name), ``score``, ``box`` xyxy pixels."""
    out = []
    for box, lab, sc in zip(detections["boxes"].tolist(), detections["labels"].tolist(), detections["scores"].tolist()):
        out.append({"label": int(lab), "class": labels[lab] if labels is not None and lab < len(labels) else str(lab),
                    "score": float(sc), "box": [float(v) for v in box]})
    return out


#: How ``vitlab eval`` names the COCO metrics.
METRIC_NAMES = {"AP": "AP @[.50:.95]", "AP50": "AP @.50", "AP75": "AP @.75", "AP_small": "AP small",
                "AP_medium": "AP medium", "AP_large": "AP large", "AR1": "AR maxDets 1", "AR10": "AR maxDets 10",
                "AR100": "AR maxDets 100", "AR_small": "AR small", "AR_medium": "AR medium", "AR_large": "AR large"}


register_task_model("DETR", DETR, DETRConfig, "detection")
register_task_model("YOLOS", YOLOS, YOLOSConfig, "detection")


@register_inference("detection")
class DetectionInference(TaskInference):
    """DETR / YOLOS checkpoints: boxes per image, the COCO table, images with the boxes drawn."""

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> nn.Module:
        return load_detector(path).to(device)

    @classmethod
    def predict(cls, model: nn.Module, images: Sequence[Any], score_threshold: float = 0.5,
                top_k: int | None = None, **options: Any) -> list[dict[str, Any]]:
        """Per image ``width``, ``height`` and ``detections`` (``label``, ``class``, ``score``,
        ``box`` xyxy in the image's own pixels), scoring >= ``score_threshold``, best ``top_k``."""
        import numpy as np
        from PIL import Image

        from ..inputs import to_unit_tensor

        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k must be at least 1, got {top_k}")
        pcfg = model.pretrained_cfg
        channels, size = int(pcfg["input_size"][0]), int(pcfg["input_size"][-1])
        device = next(model.parameters()).device
        records = []
        for image in images:
            pil = _as_pil(to_unit_tensor(image, 0.0))
            w, h = pil.size
            pil = pil.convert("L" if channels == 1 else "RGB").resize((size, size), Image.BILINEAR)
            x = torch.from_numpy(np.asarray(pil, dtype=np.float32) / 255.0)
            x = x[None] if x.ndim == 2 else x.permute(2, 0, 1)  # (H, W[, C]) -> (C, H, W)
            det = detect(model, x[None].to(device), score_threshold, top_k, image_sizes=[(h, w)])[0]
            records.append({"width": int(w), "height": int(h),
                            "detections": detections_to_json(det, getattr(model, "labels", None))})
        return records

    @classmethod
    def draw(cls, image: Any, record: dict[str, Any], output_dir: str | Path, stem: str) -> list[Path]:
        """``<stem>_detections.png`` (the boxes drawn) and ``<stem>_detections.json``."""
        import json

        from ..inputs import to_unit_tensor

        pil = _as_pil(to_unit_tensor(image, 0.0))
        dets = record["detections"]
        boxes = {"boxes": torch.tensor([d["box"] for d in dets]).reshape(-1, 4),
                 "labels": torch.tensor([d["label"] for d in dets], dtype=torch.long),
                 "scores": torch.tensor([d["score"] for d in dets])}
        names = {d["label"]: d["class"] for d in dets}
        labels = [names.get(i, str(i)) for i in range(max(names, default=-1) + 1)]
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        png, js = out / f"{stem}_detections.png", out / f"{stem}_detections.json"
        draw_detections(pil, boxes, labels).save(png)
        js.write_text(json.dumps(record, indent=2))
        return [png, js]

    @classmethod
    def evaluate(cls, checkpoint: str | Path, dataset: str | None = None, split: str | None = None,
                 output_dir: str | Path | None = None, device: str = "cpu", batch_size: int = 64,
                 **options: Any) -> dict[str, Any]:
        """COCO box metrics on the recorded digit scenes (or a COCO split folder ``dataset``);
        writes ``eval_detection_<split>.json`` and ``predictions_<split>.png``."""
        import json

        from .plots import plot_predictions

        model = load_detector(checkpoint)
        split = split or "test"
        dataset = None if dataset in (None, "digits", "digit_scenes") else dataset
        data = data_for_checkpoint(model, split, dataset)
        res = evaluate_detector(model, data, batch_size, resolve_device(device), num_plot_images=6)
        out = Path(output_dir) if output_dir else Path(checkpoint)
        out = out if out.is_dir() else out.parent
        out.mkdir(parents=True, exist_ok=True)
        record = {k: res[k] for k in COCO_METRICS} | {"n": res["n"]}
        (out / f"eval_detection_{split}.json").write_text(json.dumps(record, indent=2))
        record.update(dataset=dataset or "digit scenes", split=split)
        if res["samples"]:
            labels = getattr(model, "labels", None) or data.classes
            record["predictions_png"] = str(plot_predictions(res["samples"], labels, out / f"predictions_{split}.png"))
        return record

    @classmethod
    def report(cls, results: dict[str, Any]) -> str:
        lines = [f"COCO box metrics: {results['dataset']} {results['split']} (n={results['n']})"]
        for k in COCO_METRICS:
            v = results[k]
            lines.append(f"  {METRIC_NAMES[k]:<16} " + ("    n/a (no objects of that size)" if v is None or v < 0
                                                       else f"{v:7.3f}"))
        if results.get("predictions_png"):
            lines.append(f"predictions: {results['predictions_png']}")
        return "\n".join(lines)

    @classmethod
    def add_predict_arguments(cls, parser: Any) -> None:
        parser.add_argument("--score-threshold", type=float, default=0.5, help="detection: minimum score kept")

    @classmethod
    def describe(cls, name: str, record: dict[str, Any]) -> str:
        dets = record["detections"]
        top = ", ".join(f"{d['class']} {d['score']:.2f}" for d in dets[:5])
        return f"{name}: {len(dets)} detections" + (f" ({top}{', ...' if len(dets) > 5 else ''})" if dets else "")


def _as_pil(x: Tensor) -> Any:
    """A (C, H, W) [0, 1] image as an 8-bit PIL image (grey or RGB)."""
    from PIL import Image

    arr = (x.clamp(0, 1) * 255).round().to(torch.uint8)
    return Image.fromarray((arr[0] if arr.shape[0] == 1 else arr.permute(1, 2, 0)).numpy())  # (C, H, W) -> (H, W, C)


__all__ = ["DetectionInference", "data_for_checkpoint", "detect", "detections_to_json", "draw_detections", "evaluate_detector",
           "load_detector"]
