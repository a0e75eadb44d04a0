"""``create_model``: a registered model, random or with weights from any supported checkpoint.

It sits in :mod:`vitlab.pretrained`, above :mod:`vitlab.models`, so the registry builds random
models without knowing about checkpoints (the import graph flows one way).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..config import check_keys
from ..models.base import Backbone
from ..models.registry import build_model, get_entry
from .convert import load_pretrained, read_checkpoint

__all__ = ["create_model"]


def create_model(
    name: str,
    pretrained: bool | str | Path | None = None,
    num_classes: int | None = None,
    **overrides: Any,
) -> Backbone:
    """Build a registered model, optionally with weights.

    Args:
        name: A registered variant (see :func:`list_models`).
        pretrained: None/False for random weights; True for the variant's default hub
            weights; or a local file, a local folder, or a Hugging Face Hub id
            (``"org/repo"``). timm, Hugging Face transformers and vitlab checkpoints are
            recognised and converted; the position embedding is resampled to the model's
            grid and a classifier of another size is re-initialised with a warning.
        num_classes: Classifier outputs; the variant's (or a vitlab checkpoint's) otherwise.
        **overrides: Config fields to change (``drop_path=0.1``, ``image_size=384``, ...).

    Raises:
        ValueError: Unknown name or option, or a checkpoint that does not fit the model.
        FileNotFoundError: A missing file, or a hub id that is neither cached nor reachable.
    """
    entry = get_entry(name)
    check_keys(entry.config_class, overrides, what=f"{entry.config_class.__name__} (model {name})")
    if num_classes is not None:
        overrides["num_classes"] = num_classes
    if pretrained is None or pretrained is False:
        return build_model(name, **overrides)
    if pretrained is True:
        source = entry.pretrained_cfg.get("hub_id")
        if not source:
            raise ValueError(f"{name} has no default pretrained weights; pass pretrained=<file, folder or hub id>")
    else:
        source = pretrained
    ckpt = read_checkpoint(source)
    vitlab_cfg = ckpt.vitlab_config
    if vitlab_cfg is not None and "num_classes" not in overrides and "num_classes" in vitlab_cfg.get("config", {}):
        overrides["num_classes"] = vitlab_cfg["config"]["num_classes"]
    model = build_model(name, **overrides)
    load_pretrained(model, ckpt)
    return model

