"""Detection checkpoints and inference: load a detector, detect, evaluate, draw, JSON records."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, nn

from .detr import DETR, DETRConfig
from .postprocess import postprocess_detections
from .task import MEAN_STD, SCENE_SPLIT_KEYS, DetectionSamples, DetectionTask
from .yolos import YOLOS, YOLOSConfig


# --------------------------------------------------------------------------- checkpoints
def is_detection_checkpoint(path: str | Path) -> bool:
    """True when ``path`` holds a DETR or YOLOS checkpoint written by vitlab."""
    from ...pretrained.io import read_weights

    try:
        meta = read_weights(path).vitlab_config or {}
    except Exception:  # noqa: BLE001 - not readable: not ours to judge here
        return False
    return meta.get("family") in ("DETR", "YOLOS")


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
    if record.get("dataset") != "digit_scenes":
        raise ValueError("this checkpoint was trained on a COCO folder: pass --dataset SPLIT_FOLDER "
                         "(annotations.json + images/)")
    from ...datasets.digit_scenes import DigitScenes

    scenes = dict(record.get("scenes", {}))
    counts = {s: int(scenes.pop(k, 0)) for s, k in SCENE_SPLIT_KEYS.items()}
    if "digit_size" in scenes:
        scenes["digit_size"] = tuple(scenes["digit_size"])
    ds = DigitScenes(split, counts[split] or 400, canvas_size=size, **scenes)
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


__all__ = ["data_for_checkpoint", "detect", "detections_to_json", "draw_detections", "evaluate_detector",
           "is_detection_checkpoint", "load_detector"]
