"""Evaluate a checkpoint on a dataset: top-1/top-5, loss and a confusion matrix."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch.utils.data import DataLoader

from ..datasets.factory import build_dataset
from ..pretrained import load_model
from .trainer import evaluate_model, resolve_device


def evaluate_checkpoint(
    checkpoint: str | Path,
    dataset: str = "digits",
    split: str = "test",
    data_dir: str | None = None,
    output_dir: str | Path | None = None,
    device: str = "auto",
    batch_size: int = 256,
) -> dict[str, Any]:
    """Metrics of a checkpoint on a dataset split, normalised as the checkpoint says.

    Writes ``eval_<dataset>_<split>.json`` and a confusion matrix PNG into ``output_dir``
    (default: the checkpoint's folder).
    """
    model = load_model(checkpoint)
    data = build_dataset(dataset, split, data_dir)
    n_model = model.config.num_classes
    if n_model != data.num_classes:
        raise ValueError(f"the checkpoint predicts {n_model} classes but {dataset} has {data.num_classes}")
    pcfg = model.pretrained_cfg
    size = pcfg.get("input_size")
    size = int(size[-1] if isinstance(size, (list, tuple)) else size) if size else None
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
    return res
