"""``vitlab.pipeline``: a callable on image files, PIL images or arrays for any task, with the
checkpoint's own preprocessing (as Hugging Face's ``pipeline``).

>>> detect = vitlab.pipeline("runs/detection_digits/vit_tiny_patch16_224-digit_scenes-1")
>>> detect("scene.png")["detections"]
>>> classify = vitlab.pipeline("classification", model="runs/digits/vit_tiny_patch16_224-digits-1")
>>> classify(["a.png", "b.png"], top_k=3)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from ..tasks.loading import checkpoint_task, load
from ..tasks.registry import get_inference, get_task, list_tasks


class Pipeline:
    """A model with its task's inference hooks.

    Args:
        model: A model from :func:`vitlab.load` (``vitlab_task`` set) or any model of ``task``.
        task: The registered task (default: the model's ``vitlab_task``).
        **options: Default options of the task's ``predict`` (``top_k``, ``score_threshold``,
            ``mode``, ``labels``...); a call's own options win.
    """

    def __init__(self, model: nn.Module, task: str | None = None, **options: Any) -> None:
        task = task or getattr(model, "vitlab_task", None)
        if task is None:
            raise ValueError("Pipeline needs the task of a model that vitlab.load did not load: "
                             f"task= one of {', '.join(list_tasks())}")
        self.task = task
        self.hooks = get_inference(task)
        self.model = model.eval()
        self.options = options

    def __call__(self, images: Any, **options: Any) -> dict[str, Any] | list[dict[str, Any]]:
        """One record for one image, a list of records for a list of images."""
        single = not isinstance(images, (list, tuple))
        items: Sequence[Any] = [images] if single else list(images)
        with torch.inference_mode():
            records = self.hooks.predict(self.model, items, **{**self.options, **options})
        return records[0] if single else records

    def draw(self, image: Any, record: dict[str, Any], output_dir: str | Path, stem: str = "image") -> list[Path]:
        """The task's pictures of one record (boxes drawn, mask and overlay...); the files written."""
        return self.hooks.draw(image, record, output_dir, stem)


def pipeline(task_or_checkpoint: str | Path, model: str | Path | nn.Module | None = None,
             device: str | torch.device = "cpu", **options: Any) -> Pipeline:
    """A :class:`Pipeline` for a checkpoint, or for a task with ``model=`` a checkpoint or model.

    Args:
        task_or_checkpoint: A checkpoint (file, folder, run directory) whose task is read from
            it, or a registered task name (then ``model`` is required).
        model: With a task name: a checkpoint path or a model of that task.
        device: Where to run.
        **options: Default ``predict`` options of the task.

    Raises:
        ValueError: A task name without ``model``, or a checkpoint of another task.
        FileNotFoundError: No such checkpoint.
    """
    name = str(task_or_checkpoint)
    if name in list_tasks() and not Path(name).exists():
        get_task(name)
        if model is None:
            raise ValueError(f"pipeline({name!r}) needs model=: a {name} checkpoint (a run directory, a checkpoint "
                             "folder or file) or a loaded model; vitlab downloads no default model")
        if isinstance(model, nn.Module):
            return Pipeline(model.to(device), name, **options)
        found = checkpoint_task(model)
        if found != name:
            raise ValueError(f"{model} is a {found} checkpoint, not a {name} one")
        return Pipeline(load(model, device), name, **options)
    if model is not None:
        raise ValueError(f"pipeline({name!r}, model=...): give a task name with model=, or a checkpoint alone")
    return Pipeline(load(task_or_checkpoint, device), **options)


__all__ = ["Pipeline", "pipeline"]
