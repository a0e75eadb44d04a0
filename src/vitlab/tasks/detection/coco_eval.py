"""COCO box mAP through the maintained evaluator (pycocotools' ``COCOeval``), not a hand-written AP loop."""

from __future__ import annotations

import contextlib
import copy
import io
import json
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

from .box_ops import box_xyxy_to_xywh

#: Names of ``COCOeval.stats`` for boxes, in its order.
COCO_METRICS = (
    "AP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large",
    "AR1", "AR10", "AR100", "AR_small", "AR_medium", "AR_large",
)


def _pycocotools() -> tuple[Any, Any]:
    try:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    except ImportError:
        raise ImportError(
            "COCO evaluation needs pycocotools: pip install 'vitlab[detection]' (pycocotools)"
        ) from None
    return COCO, COCOeval


def _load_json(source: str | Path | Mapping[str, Any] | Sequence[Any], what: str) -> Any:
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"{what} file not found: {path}")
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{what} file {path} is not valid JSON: {e}") from None
    return copy.deepcopy(source)


def detections_to_coco_results(
    detections: Sequence[Mapping[str, Tensor]],
    image_ids: Sequence[int],
    category_ids: Sequence[int],
) -> list[dict[str, Any]]:
    """COCO result records (``image_id``, ``category_id``, ``bbox`` xywh, ``score``) from detections.

    Args:
        detections: Per image ``boxes`` ``(K, 4)`` xyxy pixels, ``scores`` ``(K,)`` and
            ``labels`` ``(K,)`` contiguous class indices (as from
            :func:`~vitlab.tasks.detection.postprocess.postprocess_detections`).
        image_ids: The COCO image id of each image.
        category_ids: The COCO category id of each contiguous label (``category_ids[label]``).

    Returns:
        One record per detection, the format of a COCO results JSON.
    """
    if len(detections) != len(image_ids):
        raise ValueError(f"got {len(detections)} detections for {len(image_ids)} image ids")
    records: list[dict[str, Any]] = []
    for det, image_id in zip(detections, image_ids):
        xywh = box_xyxy_to_xywh(det["boxes"].detach().float().cpu().reshape(-1, 4)).tolist()
        for box, score, label in zip(xywh, det["scores"].tolist(), det["labels"].tolist()):
            if not 0 <= int(label) < len(category_ids):
                raise ValueError(f"detection label {label} has no category (there are {len(category_ids)})")
            records.append(
                {"image_id": int(image_id), "category_id": int(category_ids[int(label)]), "bbox": box, "score": float(score)}
            )
    return records


def evaluate_coco(
    ground_truth: str | Path | Mapping[str, Any],
    results: str | Path | Sequence[Mapping[str, Any]],
    iou_type: str = "bbox",
) -> dict[str, float | None]:
    """Box (or mask) mAP of COCO results against COCO ground truth, with pycocotools' ``COCOeval``.

    Args:
        ground_truth: A COCO ``instances`` JSON (path or the loaded dict).
        results: A COCO results JSON (path or list of records with ``image_id``,
            ``category_id``, ``bbox`` xywh and ``score``; with ``iou_type="segm"`` a
            ``segmentation`` RLE instead of ``bbox``).
        iou_type: ``"bbox"`` (box AP) or ``"segm"`` (mask AP: the ground truth's annotations
            need ``segmentation`` too).

    Returns:
        ``COCO_METRICS`` -> value: AP@[.5:.95], AP@.5, AP@.75, AP per object size, and the
        recalls; ``None`` (JSON ``null``) where there is nothing to measure (e.g. no large
        objects: pycocotools' ``-1``). With no results at all every value is 0 (or None where
        there is nothing to measure).
    """
    if iou_type not in ("bbox", "segm"):
        raise ValueError(f"iou_type must be 'bbox' or 'segm', got {iou_type!r}")
    COCO, COCOeval = _pycocotools()
    gt_data = _load_json(ground_truth, "COCO ground truth")
    records = _load_json(results, "COCO results")
    if not isinstance(records, list):
        raise ValueError("COCO results must be a list of {image_id, category_id, bbox, score} records")
    gt_data.setdefault("info", {})
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = gt_data
        gt.createIndex()
        known = set(gt.getImgIds())
        unknown = sorted({r["image_id"] for r in records} - known)
        if unknown:
            raise ValueError(f"COCO results name image ids not in the ground truth: {unknown[:5]}")
        if records:
            dt = gt.loadRes(records)
        else:
            dt = COCO()
            dt.dataset = {"images": list(gt_data["images"]), "categories": gt_data["categories"], "annotations": []}
            dt.createIndex()
        ev = COCOeval(gt, dt, iouType=iou_type)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    # pycocotools writes -1 for "no ground-truth object of this kind": not a score, so None
    return {name: None if float(v) == -1.0 else float(v) for name, v in zip(COCO_METRICS, ev.stats)}


class CocoEvaluator:
    """Collects detections batch by batch and computes COCO box mAP at the end.

    Args:
        ground_truth: The COCO ``instances`` JSON (path or dict) of the evaluated images.
        category_ids: COCO category id per contiguous label; default: the ground truth's
            categories sorted by id (the order :class:`~vitlab.datasets.coco.CocoDetection`
            uses).
    """

    def __init__(self, ground_truth: str | Path | Mapping[str, Any], category_ids: Sequence[int] | None = None) -> None:
        self.ground_truth = _load_json(ground_truth, "COCO ground truth")
        if category_ids is None:
            category_ids = sorted(int(c["id"]) for c in self.ground_truth.get("categories", []))
        self.category_ids = list(category_ids)
        self.records: list[dict[str, Any]] = []

    def update(self, detections: Sequence[Mapping[str, Tensor]], image_ids: Sequence[int] | Tensor) -> None:
        """Add the detections of a batch.

        Args:
            detections: Per image ``boxes`` (xyxy pixels), ``scores`` and ``labels``.
            image_ids: The COCO image id of each image.
        """
        ids = image_ids.tolist() if isinstance(image_ids, torch.Tensor) else list(image_ids)
        self.records.extend(detections_to_coco_results(detections, ids, self.category_ids))

    def compute(self) -> dict[str, float | None]:
        """COCO box metrics of everything added so far (see :func:`evaluate_coco`)."""
        return evaluate_coco(self.ground_truth, self.records)

    def reset(self) -> None:
        """Forget the detections added so far."""
        self.records = []


__all__ = ["COCO_METRICS", "CocoEvaluator", "detections_to_coco_results", "evaluate_coco"]
