"""COCO ``instances`` format: read a user's annotation JSON plus image folder, and write scenes out in it.

Reading validates every annotation up front: a box outside its image, an empty box, an unknown
category or image id, or a missing image file raises one :class:`AnnotationError` (or, for a
file, :class:`MissingImageError`) that names the annotations file and the annotation id or
image file, unless ``on_error="skip"``, which drops them and counts them in
:attr:`CocoDetection.skipped`. Duplicate image or annotation ids always raise: which entry
is meant cannot be told.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor
from torch.utils.data import Dataset

from ..errors import VitlabError


class AnnotationError(VitlabError, ValueError):
    """A COCO annotation file or annotation vitlab cannot use (names the annotation id or file)."""


class MissingImageError(VitlabError, FileNotFoundError):
    """An image the COCO annotations name is not in the image folder."""


def _rle_encode(mask: np.ndarray) -> dict[str, Any]:
    """Uncompressed COCO RLE of a (H, W) bool mask: run lengths in column-major order, starting with 0s."""
    flat = np.asarray(mask, dtype=bool).flatten(order="F")
    change = np.flatnonzero(np.diff(flat.astype(np.int8))) + 1
    bounds = np.concatenate(([0], change, [flat.size]))
    counts = np.diff(bounds).tolist()
    if flat.size and flat[0]:
        counts = [0] + counts
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": counts}


def _rle_decode(counts: Sequence[int], h: int, w: int) -> np.ndarray:
    """(H, W) bool mask from uncompressed COCO RLE counts (column-major runs, 0s first)."""
    counts = np.asarray(counts, dtype=np.int64)
    if counts.sum() != h * w or (counts < 0).any():
        raise ValueError(f"RLE counts sum to {int(counts.sum())}, expected {h}x{w} = {h * w}")
    values = np.arange(len(counts)) % 2 == 1
    return np.repeat(values, counts).reshape(w, h).T  # column-major runs: (W, H) -> (H, W)


def _image_to_uint8(image: Tensor) -> tuple[np.ndarray, str]:
    x = image.detach().cpu().float()
    if x.dim() != 3 or x.shape[0] not in (1, 3):
        raise ValueError(f"expected a (1, H, W) or (3, H, W) image, got {tuple(x.shape)}")
    arr = (x.clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    if arr.shape[0] == 1:
        return arr[0], "L"
    return arr.transpose(1, 2, 0), "RGB"  # (3, H, W) -> (H, W, 3)


def write_coco(
    samples: Iterable[Mapping[str, Any]],
    out_dir: str | Path,
    class_names: Sequence[str],
    image_folder: str = "images",
    annotation_file: str = "annotations.json",
) -> Path:
    """Write detection samples (e.g. :class:`~vitlab.datasets.digit_scenes.DigitScenes`) as a COCO dataset.

    Images go to ``out_dir/image_folder/{image_id:06d}.png`` (8-bit, gray or RGB), the
    annotations to ``out_dir/annotation_file``: category ``k + 1`` is class ``k``, boxes are
    xywh pixels, and with ``instance_masks`` in the sample, ``segmentation`` is the mask as
    uncompressed RLE and ``area`` its pixel count (else the box area).

    Args:
        samples: Dicts with ``image`` ``(C, H, W)`` in ``[0, 1]``, ``boxes`` ``(n, 4)`` xyxy
            pixels, ``labels`` ``(n,)``, ``image_id`` and optionally ``instance_masks``.
        out_dir: Output folder (created).
        class_names: Name of each class.
        image_folder: Subfolder of the images.
        annotation_file: Name of the JSON.

    Returns:
        The path of the annotation JSON.
    """
    out = Path(out_dir)
    (out / image_folder).mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for sample in samples:
        image_id = int(sample["image_id"])
        pixels, mode = _image_to_uint8(sample["image"])
        file_name = f"{image_id:06d}.png"
        Image.fromarray(pixels, mode=mode).save(out / image_folder / file_name)
        h, w = pixels.shape[:2]
        images.append({"id": image_id, "file_name": file_name, "height": int(h), "width": int(w)})
        masks = sample.get("instance_masks")
        for k, (box, label) in enumerate(zip(sample["boxes"].tolist(), sample["labels"].tolist())):
            x0, y0, x1, y1 = box
            ann: dict[str, Any] = {
                "id": len(annotations) + 1,
                "image_id": image_id,
                "category_id": int(label) + 1,
                "bbox": [x0, y0, x1 - x0, y1 - y0],
                "area": float((x1 - x0) * (y1 - y0)),
                "iscrowd": 0,
            }
            if masks is not None:
                m = masks[k].cpu().numpy().astype(bool)
                ann["segmentation"] = _rle_encode(m)
                ann["area"] = float(m.sum())
            annotations.append(ann)
    categories = [{"id": k + 1, "name": str(name), "supercategory": "none"} for k, name in enumerate(class_names)]
    path = out / annotation_file
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return path


def _reject_duplicates(ids: Sequence[Any], kind: str, path: Path) -> None:
    """Raise an :class:`AnnotationError` naming ``path`` and every ``kind`` id that occurs more than once."""
    seen: set[Any] = set()
    dup: list[Any] = []
    for i in ids:
        if i in seen and i not in dup:
            dup.append(i)
        seen.add(i)
    if dup:
        shown = ", ".join(str(i) for i in dup[:10]) + (f" and {len(dup) - 10} more" if len(dup) > 10 else "")
        raise AnnotationError(f"{path}: duplicate {kind} id{'s' if len(dup) > 1 else ''} {shown}; every {kind} "
                              f"needs its own id")


class CocoDetection(Dataset):
    """A COCO ``instances`` dataset: annotation JSON plus image folder.

    Categories become contiguous labels ``0..K-1`` in ascending category id
    (:attr:`category_ids` maps back). Crowd annotations (``iscrowd: 1``) are not targets.
    A sample is a dict with ``image`` ``(C, H, W)`` float32 in ``[0, 1]`` (1 channel for gray
    images, else RGB), ``boxes`` ``(n, 4)`` float32 xyxy pixels, ``labels`` ``(n,)`` int64,
    ``image_id``, and with ``load_masks`` ``instance_masks`` ``(n, H, W)`` bool (uncompressed
    RLE decoded here; polygons and compressed RLE by pycocotools).

    Args:
        annotation_file: The ``instances`` JSON.
        image_dir: Folder the images' ``file_name`` are relative to.
        on_error: ``"raise"`` (default): a bad annotation or missing image raises an error
            naming it; ``"skip"``: drop them, count them in :attr:`skipped` and warn once.
        box_tolerance: Pixels a box may reach past the image border (it is then clipped).
        load_masks: Also decode instance masks.
    """

    def __init__(
        self,
        annotation_file: str | Path,
        image_dir: str | Path,
        on_error: str = "raise",
        box_tolerance: float = 1.0,
        load_masks: bool = False,
    ) -> None:
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        path = Path(annotation_file)
        if not path.is_file():
            raise FileNotFoundError(f"COCO annotation file not found: {path}")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError as e:
            raise AnnotationError(f"{path} is not UTF-8 text (byte {e.start}: {e.reason}); COCO JSON must be "
                                  f"UTF-8") from None
        except json.JSONDecodeError as e:
            raise AnnotationError(f"{path} is not valid JSON: {e}") from None
        missing = [k for k in ("images", "annotations", "categories") if not isinstance(data, dict) or k not in data]
        if missing:
            raise AnnotationError(f"{path} is not a COCO instances file: no {', '.join(missing)}")
        self.annotation_file = path
        self.image_dir = Path(image_dir)
        self.on_error = on_error
        self.load_masks = load_masks
        self.skipped = {"images": 0, "annotations": 0}
        for key in ("images", "annotations", "categories"):
            if not isinstance(data[key], list):
                raise AnnotationError(f"{path}: {key!r} must be a list, got {type(data[key]).__name__}")
        for key in ("annotations", "categories"):  # image entries are checked one by one below
            bad = next((k for k, e in enumerate(data[key]) if not isinstance(e, dict)), None)
            if bad is not None:
                raise AnnotationError(f"{path}: {key} entry {bad} is not a JSON object: {data[key][bad]!r}")
        self.category_ids: list[int] = sorted(int(c["id"]) for c in data["categories"])
        names = {int(c["id"]): str(c.get("name", c["id"])) for c in data["categories"]}
        self.classes = [names[c] for c in self.category_ids]
        self.num_classes = len(self.category_ids)
        cat_to_label = {c: k for k, c in enumerate(self.category_ids)}

        for k, img in enumerate(data["images"]):
            absent = [key for key in ("id", "file_name", "width", "height") if not isinstance(img, dict) or key not in img]
            if absent:
                raise AnnotationError(f"{path}: image entry {k} has no {', '.join(absent)}")
        _reject_duplicates([img["id"] for img in data["images"]], "image", path)
        _reject_duplicates([ann["id"] for ann in data["annotations"] if "id" in ann], "annotation", path)
        self.images: dict[int, dict[str, Any]] = {}
        for img in data["images"]:
            file = self.image_dir / str(img["file_name"])
            if not file.is_file():
                error = MissingImageError(f"{path}: image {img['file_name']!r} (id {img['id']}) not found in "
                                          f"{self.image_dir}")
                self._bad(error, "images")
                continue
            self.images[int(img["id"])] = img
        known_images = {int(i["id"]) for i in data["images"]}

        targets: dict[int, list[tuple[list[float], int, dict[str, Any]]]] = {i: [] for i in self.images}
        for ann in data["annotations"]:
            aid, image_id = ann.get("id"), ann.get("image_id")
            if image_id not in known_images:
                self._bad(AnnotationError(f"{path}: annotation {aid}: unknown image_id {image_id}"), "annotations")
                continue
            if image_id not in self.images:  # its image is missing and was skipped
                self.skipped["annotations"] += 1
                continue
            if ann.get("category_id") not in cat_to_label:
                self._bad(
                    AnnotationError(
                        f"{path}: annotation {aid}: unknown category_id {ann.get('category_id')} "
                        f"(the file declares {self.category_ids})"
                    ),
                    "annotations",
                )
                continue
            if ann.get("iscrowd", 0):
                continue
            img = self.images[image_id]
            bbox = ann.get("bbox")
            if not (isinstance(bbox, list) and len(bbox) == 4 and all(isinstance(v, (int, float)) for v in bbox)):
                error = AnnotationError(f"{path}: annotation {aid}: bbox must be [x, y, width, height], got {bbox!r}")
                self._bad(error, "annotations")
                continue
            x, y, bw, bh = (float(v) for v in bbox)
            W, H, tol = float(img["width"]), float(img["height"]), box_tolerance
            if bw <= 0 or bh <= 0:
                error = AnnotationError(f"{path}: annotation {aid}: empty box {bbox} (width and height must be > 0)")
                self._bad(error, "annotations")
                continue
            if x < -tol or y < -tol or x + bw > W + tol or y + bh > H + tol:
                self._bad(
                    AnnotationError(
                        f"{path}: annotation {aid}: box {bbox} (x, y, w, h) lies outside its image "
                        f"{img['file_name']!r} of {int(W)}x{int(H)} pixels"
                    ),
                    "annotations",
                )
                continue
            xyxy = [min(max(x, 0.0), W), min(max(y, 0.0), H), min(x + bw, W), min(y + bh, H)]
            targets[image_id].append((xyxy, cat_to_label[ann["category_id"]], ann))
        self._targets = targets
        self.image_ids: list[int] = sorted(self.images)
        if any(self.skipped.values()):
            warnings.warn(
                f"{path.name}: skipped {self.skipped['annotations']} bad annotations and "
                f"{self.skipped['images']} missing images",
                stacklevel=2,
            )

    @property
    def max_objects(self) -> int:
        """The most (non-crowd) objects any image holds (0 for no objects at all)."""
        return max((len(t) for t in self._targets.values()), default=0)

    def _bad(self, error: Exception, kind: str) -> None:
        if self.on_error == "raise":
            raise error
        self.skipped[kind] += 1

    def __len__(self) -> int:
        return len(self.image_ids)

    def __repr__(self) -> str:
        return f"CocoDetection({str(self.annotation_file)!r}, images={len(self)}, classes={self.num_classes})"

    def __getitem__(self, index: int) -> dict[str, Any]:
        image_id = self.image_ids[index]
        info = self.images[image_id]
        file = self.image_dir / str(info["file_name"])
        try:
            with Image.open(file) as im:
                im.load()
                pil = im if im.mode == "L" else im.convert("RGB")
        except (UnidentifiedImageError, OSError) as e:
            raise AnnotationError(f"image {str(file)!r} cannot be read as an image: {e} (listed in "
                                  f"{self.annotation_file})") from None
        if (pil.width, pil.height) != (int(info["width"]), int(info["height"])):
            raise AnnotationError(
                f"image {str(file)!r} is {pil.width}x{pil.height} pixels but its annotation says "
                f"{info['width']}x{info['height']} (in {self.annotation_file})"
            )
        arr = np.asarray(pil, dtype=np.float32) / 255.0
        image = torch.from_numpy(arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1).copy())  # (H, W[, 3]) -> (C, H, W)
        objs = self._targets[image_id]
        sample: dict[str, Any] = {
            "image": image,
            "boxes": torch.tensor([o[0] for o in objs], dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor([o[1] for o in objs], dtype=torch.int64),
            "image_id": image_id,
        }
        if self.load_masks:
            h, w = int(info["height"]), int(info["width"])
            sample["instance_masks"] = self._masks(objs, h, w, self.annotation_file)
        return sample

    @staticmethod
    def _masks(objs: list[tuple[list[float], int, dict[str, Any]]], h: int, w: int, path: Path) -> Tensor:
        masks = np.zeros((len(objs), h, w), dtype=bool)
        for k, (_, _, ann) in enumerate(objs):
            seg = ann.get("segmentation")
            if not seg:
                raise AnnotationError(f"{path}: annotation {ann.get('id')}: no segmentation, but masks were requested")
            if isinstance(seg, dict) and isinstance(seg.get("counts"), list):  # uncompressed RLE
                try:
                    masks[k] = _rle_decode(seg["counts"], h, w)
                except ValueError as e:
                    raise AnnotationError(f"{path}: annotation {ann.get('id')}: bad RLE segmentation: {e}") from None
                continue
            try:
                from pycocotools import mask as mask_utils
            except ImportError:
                raise ImportError(
                    "polygon and compressed-RLE masks need pycocotools: pip install 'vitlab[detection]' (pycocotools)"
                ) from None
            rle = mask_utils.merge(mask_utils.frPyObjects(seg, h, w)) if isinstance(seg, list) else seg  # polygons
            masks[k] = mask_utils.decode(rle).astype(bool)
        return torch.from_numpy(masks)


__all__ = ["AnnotationError", "CocoDetection", "MissingImageError", "write_coco"]
