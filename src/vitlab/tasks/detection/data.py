"""Where detection data comes from: digit scenes or COCO-format folders, by split (shared by the
detection and instance segmentation tasks)."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any, Mapping, Sequence

from ...config import suggest
from ..base import RunConfig

SCENE_SPLIT_KEYS = {"train": "num_train", "val": "num_val", "test": "num_test"}


def _check_keys(values: Mapping[str, Any], valid: Sequence[str], where: str) -> None:
    for k in values:
        if k not in valid:
            raise ValueError(f"unknown option {where}.{k}.{suggest(k, list(valid))} Valid keys: {', '.join(valid)}")


def _coco_split(cfg: RunConfig, opts: Mapping[str, Any], split: str, load_masks: bool = False,
                section: str = "detection") -> Any | None:
    from ...datasets.coco import CocoDetection

    coco = dict(opts.get("coco", {}))
    _check_keys(coco, [f"{s}_{k}" for s in ("train", "val", "test") for k in ("annotations", "images")] + ["on_error"],
                f"{section}.coco")
    ann, img = coco.get(f"{split}_annotations"), coco.get(f"{split}_images")
    if ann is None:
        if cfg.data.data_dir is None:
            if split == "train":
                raise ValueError("a COCO-format run needs data.data_dir (ROOT with ROOT/train/annotations.json and "
                                 f"ROOT/train/images/) or {section}.coco.train_annotations / train_images")
            return None
        root = Path(cfg.data.data_dir) / split
        ann, img = root / "annotations.json", root / "images"
        if not ann.is_file():
            if split == "train":
                raise FileNotFoundError(f"COCO annotation file not found: {ann}")
            return None
    return CocoDetection(ann, img if img is not None else Path(ann).parent / "images",
                         on_error=str(coco.get("on_error", "raise")), load_masks=load_masks)


def detection_sources(cfg: RunConfig, opts: Mapping[str, Any], load_masks: bool = False, section: str = "detection"
                      ) -> tuple[dict[str, Any], int, dict[str, Any]]:
    """The split datasets (None where absent), the most objects of an image and the data record;
    sets ``cfg.data.image_size`` when unset. ``load_masks``: COCO folders decode instance masks."""
    name = str(cfg.data.dataset).lower()
    if name in ("digit_scenes", "digits"):
        from ...datasets.digit_scenes import DigitScenes

        scenes = dict(opts.get("scenes", {}))
        valid = [f for f in inspect.signature(DigitScenes).parameters
                 if f not in ("split", "num_scenes", "canvas_size")] + list(SCENE_SPLIT_KEYS.values())
        _check_keys(scenes, valid, f"{section}.scenes")
        counts = {s: int(scenes.pop(k, d)) for (s, k), d in zip(SCENE_SPLIT_KEYS.items(), (2000, 200, 400))}
        if "digit_size" in scenes:
            scenes["digit_size"] = tuple(scenes["digit_size"])
        if cfg.data.image_size is None:
            cfg.data.image_size = 64
        size = int(cfg.data.image_size)
        sets = {s: DigitScenes(s, n, canvas_size=size, **scenes) for s, n in counts.items()}
        max_objects = sets["train"].max_digits
        record = {"dataset": "digit_scenes", "scenes": {**scenes, **{SCENE_SPLIT_KEYS[s]: n for s, n in counts.items()}}}
        if "digit_size" in record["scenes"]:
            record["scenes"]["digit_size"] = list(record["scenes"]["digit_size"])
    elif name == "coco":
        sets = {s: _coco_split(cfg, opts, s, load_masks, section) for s in ("train", "val", "test")}
        if cfg.data.image_size is None:
            first = sets["train"][0]["image"]
            cfg.data.image_size = int(max(first.shape[-2:]))
        size = int(cfg.data.image_size)
        max_objects = max(s.max_objects for s in sets.values() if s is not None)
        record = {"dataset": "coco", "classes": sets["train"].classes}
    else:
        raise ValueError(f"the {section} task reads data.dataset 'digit_scenes' or 'coco' (with data.data_dir), "
                         f"got {cfg.data.dataset!r}")
    return sets, max_objects, record


def scenes_from_record(record: Mapping[str, Any], split: str, size: int) -> Any:
    """The digit scenes of ``split`` that a checkpoint's data record (``pretrained_cfg["data"]``) names.

    Raises:
        ValueError: The record is a COCO folder's (the caller needs the folder itself).
    """
    if record.get("dataset") != "digit_scenes":
        raise ValueError("this checkpoint was trained on a COCO folder: pass --dataset SPLIT_FOLDER "
                         "(annotations.json + images/)")
    from ...datasets.digit_scenes import DigitScenes

    scenes = dict(record.get("scenes", {}))
    counts = {s: int(scenes.pop(k, 0)) for s, k in SCENE_SPLIT_KEYS.items()}
    if "digit_size" in scenes:
        scenes["digit_size"] = tuple(scenes["digit_size"])
    return DigitScenes(split, counts[split] or 400, canvas_size=size, **scenes)


__all__ = ["SCENE_SPLIT_KEYS", "detection_sources", "scenes_from_record"]
