"""Mask R-CNN checkpoints and inference: load, segment instances, evaluate (box + mask AP), draw."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from ...models.registry import register_task_model
from ..base import TaskInference, resolve_device
from ..registry import register_inference
from ..detection.coco_eval import COCO_METRICS
from ..detection.data import scenes_from_record
from .model import MaskRCNN, MaskRCNNConfig
from .task import MASK_METRICS, MEAN_STD, InstanceSamples, InstanceTask

register_task_model("MaskRCNN", MaskRCNN, MaskRCNNConfig, "instance")


def load_mask_rcnn(path: str | Path) -> MaskRCNN:
    """A :class:`MaskRCNN` from a vitlab checkpoint (file, folder or a run's ``checkpoints/epoch-N``).

    Raises:
        vitlab.errors.CheckpointError: The checkpoint is not a Mask R-CNN's.
    """
    from ...errors import CheckpointError
    from ...pretrained import load_task_model
    from ...pretrained.io import read_weights

    meta = read_weights(path).vitlab_config or {}
    if meta.get("family") != "MaskRCNN":
        raise CheckpointError(f"{path} is not a Mask R-CNN checkpoint (family {meta.get('family')!r})")
    return load_task_model(path).eval()


@torch.no_grad()
def segment_instances(model: nn.Module, images: Tensor, score_threshold: float = 0.5,
                      image_sizes: Sequence[tuple[int, int]] | None = None) -> list[dict[str, Tensor]]:
    """Instances of [0, 1] images (B, C, S, S) at the model's input size: per image ``boxes`` (xyxy
    pixels of the original image), ``scores``, ``labels`` and boolean ``masks`` (D, H, W) at the
    original size (``image_sizes``, default the input size), scoring >= ``score_threshold``."""
    pcfg = getattr(model, "pretrained_cfg", {}) or {}
    mean = torch.tensor(pcfg.get("mean", [MEAN_STD] * images.shape[1]), device=images.device)[None, :, None, None]
    std = torch.tensor(pcfg.get("std", [MEAN_STD] * images.shape[1]), device=images.device)[None, :, None, None]
    dets = model.eval()((images - mean) / std)
    s = images.shape[-1]
    out = []
    for k, det in enumerate(dets):
        keep = det["scores"] >= score_threshold
        det = {key: v[keep] for key, v in det.items()}
        h, w = image_sizes[k] if image_sizes is not None else (s, s)
        if (h, w) != (s, s):
            det["boxes"] = det["boxes"] * torch.tensor([w / s, h / s] * 2, device=images.device)
            if len(det["masks"]):
                det["masks"] = torch.nn.functional.interpolate(det["masks"][None], size=(h, w), mode="bilinear",
                                                               align_corners=False)[0]
        det["masks"] = det["masks"] >= 0.5
        out.append(det)
    return out


def data_for_checkpoint(model: nn.Module, split: str = "test", dataset: str | None = None) -> InstanceSamples:
    """The split of the data recorded in the checkpoint (or a COCO split folder ``dataset``)."""
    pcfg = model.pretrained_cfg
    size = int(pcfg["input_size"][-1])
    record = pcfg.get("data", {})
    if dataset is not None:
        from ...datasets.coco import CocoDetection

        root = Path(dataset)
        ds = CocoDetection(root / "annotations.json", root / "images", load_masks=True)
        return InstanceSamples(ds, size, max(ds.max_objects, 1))
    ds = scenes_from_record(record, split, size)
    return InstanceSamples(ds, size, ds.max_digits)


def evaluate_mask_rcnn(model: nn.Module, data: InstanceSamples, batch_size: int = 32,
                       device: str | torch.device = "cpu", num_plot_images: int = 0) -> dict[str, Any]:
    """COCO box and mask metrics of a Mask R-CNN on an :class:`InstanceSamples` dataset."""
    from torch.utils.data import DataLoader

    from ..base import evaluate_task

    task = InstanceTask(data.num_classes, data.classes, num_plot_images=num_plot_images)
    model.to(device)
    return evaluate_task(model, task, DataLoader(data, batch_size=batch_size, shuffle=False), torch.device(device))


@register_inference("instance")
class InstanceInference(TaskInference):
    """Mask R-CNN checkpoints: instances (box, class, score, mask RLE) per image, box + mask AP, overlays."""

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> nn.Module:
        return load_mask_rcnn(path).to(device)

    @classmethod
    def predict(cls, model: nn.Module, images: Sequence[Any], score_threshold: float = 0.5,
                **options: Any) -> list[dict[str, Any]]:
        """Per image ``width``, ``height`` and ``instances``: ``label``, ``class``, ``score``, ``box``
        (xyxy in the image's own pixels), ``area`` and ``mask`` (COCO RLE at the image's size)."""
        from PIL import Image

        from ..inputs import to_unit_tensor
        from .task import mask_rle

        pcfg = model.pretrained_cfg
        channels, size = int(pcfg["input_size"][0]), int(pcfg["input_size"][-1])
        device = next(model.parameters()).device
        names = getattr(model, "labels", None)
        records = []
        for image in images:
            x = to_unit_tensor(image, 0.0)
            pil = Image.fromarray((x.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).squeeze(-1).numpy())
            w, h = pil.size
            pil = pil.convert("L" if channels == 1 else "RGB").resize((size, size), Image.BILINEAR)
            t = torch.from_numpy(np.asarray(pil, dtype=np.float32) / 255.0)
            t = t[None] if t.ndim == 2 else t.permute(2, 0, 1)  # (H, W[, C]) -> (C, H, W)
            det = segment_instances(model, t[None].to(device), score_threshold, [(h, w)])[0]
            inst = []
            for box, lab, sc, m in zip(det["boxes"].tolist(), det["labels"].tolist(), det["scores"].tolist(),
                                       det["masks"].cpu().numpy()):
                inst.append({"label": int(lab), "class": names[lab] if names and lab < len(names) else str(lab),
                             "score": float(sc), "box": [float(v) for v in box], "area": int(m.sum()),
                             "mask": mask_rle(m)})
            records.append({"width": int(w), "height": int(h), "instances": inst})
        return records

    @classmethod
    def draw(cls, image: Any, record: dict[str, Any], output_dir: str | Path, stem: str) -> list[Path]:
        """``<stem>_instances.png`` (masks and boxes drawn) and ``<stem>_instances.json``."""
        import json

        from PIL import Image, ImageDraw
        from pycocotools import mask as mask_utils

        from ..inputs import to_unit_tensor

        x = to_unit_tensor(image, 0.0)
        rgb = (x.clamp(0, 1) * 255).round().to(torch.uint8).expand(3, -1, -1) if x.shape[0] == 1 else \
            (x.clamp(0, 1) * 255).round().to(torch.uint8)
        arr = rgb.permute(1, 2, 0).numpy().astype(np.float32)  # (3, H, W) -> (H, W, 3)
        palette = np.array([(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180),
                            (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128)], np.float32)
        for k, inst in enumerate(record["instances"]):
            rle = dict(inst["mask"], counts=inst["mask"]["counts"].encode("ascii"))
            m = mask_utils.decode(rle).astype(bool)
            arr[m] = 0.5 * arr[m] + 0.5 * palette[k % len(palette)]
        out_img = Image.fromarray(arr.round().astype(np.uint8))
        draw = ImageDraw.Draw(out_img)
        for inst in record["instances"]:
            draw.rectangle(inst["box"], outline=(255, 0, 0), width=max(1, round(min(out_img.size) / 100)))
            draw.text((inst["box"][0], max(0, inst["box"][1] - 10)), f"{inst['class']} {inst['score']:.2f}",
                      fill=(255, 0, 0))
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        png, js = out / f"{stem}_instances.png", out / f"{stem}_instances.json"
        out_img.save(png)
        js.write_text(json.dumps(record, indent=2))
        return [png, js]

    @classmethod
    def evaluate(cls, checkpoint: str | Path, dataset: str | None = None, split: str | None = None,
                 output_dir: str | Path | None = None, device: str = "cpu", batch_size: int = 32,
                 **options: Any) -> dict[str, Any]:
        """COCO box and mask metrics on the recorded digit scenes (or a COCO split folder ``dataset``);
        writes ``eval_instance_<split>.json`` and ``predictions_<split>.png``."""
        import json

        from .plots import plot_instances

        model = load_mask_rcnn(checkpoint)
        split = split or "test"
        dataset = None if dataset in (None, "digits", "digit_scenes") else dataset
        data = data_for_checkpoint(model, split, dataset)
        res = evaluate_mask_rcnn(model, data, batch_size, resolve_device(device), num_plot_images=6)
        out = Path(output_dir) if output_dir else Path(checkpoint)
        out = out if out.is_dir() else out.parent
        out.mkdir(parents=True, exist_ok=True)
        record = {k: res[k] for k in COCO_METRICS + MASK_METRICS} | {"n": res["n"]}
        (out / f"eval_instance_{split}.json").write_text(json.dumps(record, indent=2))
        record.update(dataset=dataset or "digit scenes", split=split)
        if res["samples"]:
            labels = getattr(model, "labels", None) or data.classes
            record["predictions_png"] = str(plot_instances(res["samples"], labels, out / f"predictions_{split}.png"))
        return record

    @classmethod
    def report(cls, results: dict[str, Any]) -> str:
        from ..detection.inference import METRIC_NAMES

        lines = [f"COCO box / mask metrics: {results['dataset']} {results['split']} (n={results['n']})",
                 f"  {'':<16} {'box':>7} {'mask':>7}"]
        for k in COCO_METRICS:
            vals = [results[k], results[f"mask_{k}"]]
            lines.append(f"  {METRIC_NAMES[k]:<16} " + " ".join("    n/a" if v is None or v < 0 else f"{v:7.3f}"
                                                               for v in vals))
        if results.get("predictions_png"):
            lines.append(f"predictions: {results['predictions_png']}")
        return "\n".join(lines)

    @classmethod
    def add_predict_arguments(cls, parser: Any) -> None:
        import argparse

        try:  # the detection task declares the same option (one flag, both tasks read it)
            parser.add_argument("--score-threshold", type=float, default=0.5, help="minimum detection score kept")
        except argparse.ArgumentError:
            pass

    @classmethod
    def describe(cls, name: str, record: dict[str, Any]) -> str:
        inst = record["instances"]
        top = ", ".join(f"{d['class']} {d['score']:.2f}" for d in inst[:5])
        return f"{name}: {len(inst)} instances" + (f" ({top}{', ...' if len(inst) > 5 else ''})" if inst else "")


__all__ = ["InstanceInference", "data_for_checkpoint", "evaluate_mask_rcnn", "load_mask_rcnn", "segment_instances"]
