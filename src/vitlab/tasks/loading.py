"""One loader for every vitlab checkpoint: :func:`checkpoint_task` reads which task a checkpoint
is for, :func:`load` asks that task's inference hooks for the model.

A checkpoint's metadata says its task (``meta["task"]``, written by the engine for every task
and by :func:`vitlab.save_checkpoint`); older checkpoints and foreign folders are placed by
their family (``meta["family"]``, or a Hugging Face ``model_type``) through the families the
task plugins declare; anything else (timm files, HF image classifiers) is a classifier.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..pretrained.io import read_weights
from .registry import get_inference, task_for_family


def checkpoint_task(source: str | Path) -> str:
    """The registered task of a checkpoint (file, folder, run directory or its ``checkpoints/epoch-N``).

    Raises:
        FileNotFoundError: No such path.
        ValueError: A file that is not a checkpoint (the reader's message).
    """
    ck = read_weights(source)
    meta: dict[str, Any] = ck.vitlab_config or {}
    if isinstance(meta.get("task"), str):
        return meta["task"]
    family = meta.get("family") or (ck.hf_config or {}).get("model_type")
    return task_for_family(family) or "classification"


def load(source: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """The model of any vitlab checkpoint, in eval mode, built by its task's ``load`` hook.

    The model carries what inference needs: ``pretrained_cfg`` (preprocessing), ``labels``
    and, for CLIP, ``tokenizer``; its task is ``model.vitlab_task``.

    Raises:
        FileNotFoundError: No such path.
        UnknownTaskError: The checkpoint's task is not registered or has no inference hooks.
    """
    task = checkpoint_task(source)
    model = get_inference(task).load(source, device).eval()
    model.vitlab_task = task
    return model


__all__ = ["checkpoint_task", "load"]
