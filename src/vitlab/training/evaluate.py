"""Evaluate a checkpoint on a dataset: top-1/top-5, loss and a confusion matrix."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch.utils.data import DataLoader

from ..datasets.factory import build_dataset
from ..datasets.pipeline import ResizeCenterCropSample, dataset_kind
from ..datasets.transforms import EvalTransform
from ..pretrained import load_model
from .trainer import evaluate_model, resolve_device


def evaluate_checkpoint(
    checkpoint: str | Path,
    dataset: str = "digits",
    split: str | None = None,
    data_dir: str | None = None,
    output_dir: str | Path | None = None,
    device: str = "auto",
    batch_size: int = 256,
) -> dict[str, Any]:
    """Metrics of a checkpoint on a dataset split, preprocessed as the checkpoint records.

    Images are resized to ``floor(input_size / crop_pct)`` and center-cropped with the
    checkpoint's interpolation, per sample (so image folders of any size work), then
    normalised with its mean/std. ``split`` None takes ``test`` when the dataset has one,
    else ``val``. Writes ``eval_<dataset>_<split>.json`` and a confusion matrix PNG into
    ``output_dir`` (default: the checkpoint's folder); the split used is ``res["split"]``.
    """
    model = load_model(checkpoint)
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
    res = evaluate_model(model.to(dev), loader, dev, size, tuple(pcfg.get("mean", data.mean)), tuple(pcfg.get("std", data.std)))
    out = Path(output_dir) if output_dir else (Path(checkpoint) if Path(checkpoint).is_dir() else Path(checkpoint).parent)
    out.mkdir(parents=True, exist_ok=True)
    cm = res.pop("confusion")
    stem = f"eval_{Path(str(dataset)).name}_{split}"
    (out / f"{stem}.json").write_text(json.dumps({**res, "confusion_matrix": cm.tolist()}, indent=2))
    try:
        from ..evaluation.plots import plot_confusion_matrix

        res["confusion_matrix_png"] = str(plot_confusion_matrix(cm, list(data.classes), out / f"{stem}_confusion.png"))
    except ImportError:
        pass
    res["confusion"] = cm
    res["split"] = split
    return res


def _build_transformed(dataset: str, split: str, data_dir: str | None, kw: dict[str, Any]) -> Any:
    """A dataset split with the per-sample eval transform (folders take it; fixed-size ones are wrapped)."""
    from .run import _Resized

    if dataset_kind(dataset) == "folder":
        return build_dataset(dataset, split, data_dir, **kw)
    data = build_dataset(dataset, split, data_dir)
    return _Resized(data, kw["transform"]) if kw else data
