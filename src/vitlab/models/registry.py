"""Model registry: variant name -> (family, config defaults, preprocessing), ``create_model``."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..config import check_keys, suggest

if TYPE_CHECKING:
    from .base import Backbone


@dataclass(frozen=True)
class ModelEntry:
    """A registered variant: its family's classes, its config values and its preprocessing."""

    name: str
    family: str
    model_class: type
    config_class: type
    defaults: dict[str, Any]
    pretrained_cfg: dict[str, Any]


_MODELS: dict[str, ModelEntry] = {}
_FAMILIES: dict[str, tuple[type, type]] = {}


def register_family(
    family: str,
    model_class: type,
    config_class: type,
    variants: dict[str, tuple[dict[str, Any], dict[str, Any]]],
) -> None:
    """Register a family's classes and its named variants ``name -> (config values, pretrained_cfg)``."""
    _FAMILIES[family] = (model_class, config_class)
    for name, (values, pcfg) in variants.items():
        if name in _MODELS:
            raise ValueError(f"model {name!r} is registered twice")
        check_keys(config_class, values, what=f"{config_class.__name__} (variant {name})")
        _MODELS[name] = ModelEntry(name, family, model_class, config_class, dict(values), dict(pcfg))


def list_models(pattern: str = "*") -> list[str]:
    """Registered model names matching a shell-style pattern (``"vit_*"``, ``"*distilled*"``), sorted."""
    return sorted(n for n in _MODELS if fnmatch.fnmatch(n, pattern))


def list_families() -> dict[str, tuple[type, type]]:
    """Family name -> (model class, config class)."""
    return dict(_FAMILIES)


def get_entry(name: str) -> ModelEntry:
    """The registry entry of ``name``; ValueError naming close matches when unknown."""
    try:
        return _MODELS[name]
    except KeyError:
        raise ValueError(
            f"unknown model {name!r}.{suggest(name, list(_MODELS))} "
            f"Run `vitlab models` or vitlab.list_models() to see the {len(_MODELS)} registered names."
        ) from None


def model_config(name: str, **overrides: Any) -> Any:
    """The config dataclass of a variant with ``overrides`` applied (unknown keys raise)."""
    entry = get_entry(name)
    check_keys(entry.config_class, overrides, what=f"{entry.config_class.__name__} (model {name})")
    return entry.config_class(**{**entry.defaults, **overrides})


def build_model(name: str, **overrides: Any) -> Backbone:
    """A randomly initialised registered model."""
    entry = get_entry(name)
    model = entry.model_class(model_config(name, **overrides))
    pcfg = dict(entry.pretrained_cfg)
    image_size = getattr(model.config, "image_size", None)
    if image_size is not None and "image_size" in overrides:
        pcfg["input_size"] = image_size[0] if isinstance(image_size, tuple) else image_size
    model.pretrained_cfg = pcfg
    model.model_name = name
    return model


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
    from ..pretrained import load_pretrained, read_checkpoint

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

