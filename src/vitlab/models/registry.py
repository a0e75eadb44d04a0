"""Model registry: variant name -> (family, config defaults, preprocessing), ``build_model``.

Models with weights come from :func:`vitlab.pretrained.create_model` (one layer up), so the
registry never imports :mod:`vitlab.pretrained`.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import types
import typing
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..config import check_keys, suggest
from ..errors import UnknownModelError

#: timm-style size letters in short names: ``swin_t`` -> ``swin_tiny_...``, ``vit_b`` -> ``vit_base_...``.
SIZE_LETTERS = {"t": "tiny", "ti": "tiny", "s": "small", "m": "medium", "b": "base", "l": "large", "h": "huge"}

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
#: Task model families (DETR, YOLOS, segmenter, CLIP, MAE, SimMIM...): family -> (class, config class, task).
_TASK_MODELS: dict[str, tuple[type, type, str]] = {}


def register_task_model(family: str, model_class: type, config_class: type, task: str) -> None:
    """Register a task's model family beside the backbones: its class, its typed config and the
    task that loads its checkpoints. A class built from its config alone (``model_class(config)``)
    loads generically (:func:`vitlab.pretrained.load_task_model`).

    Raises:
        ValueError: ``family`` is taken by a backbone or by another class.
    """
    if family in _FAMILIES or (family in _TASK_MODELS and _TASK_MODELS[family][0] is not model_class):
        raise ValueError(f"model family {family!r} is already registered")
    _TASK_MODELS[family] = (model_class, config_class, task)


def list_task_models() -> dict[str, tuple[type, type, str]]:
    """Task model family -> (model class, config class, task)."""
    return dict(_TASK_MODELS)


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


def _unknown(name: str) -> UnknownModelError:
    """The error for a name that resolves to nothing: the family's variants, or close matches."""
    family = sorted(n for n in _MODELS if n.startswith(f"{name}_"))
    if family:
        return UnknownModelError(f"{name!r} names several models; choose one of {', '.join(family)}")
    close = suggest(name, list(_MODELS))
    return UnknownModelError(
        f"unknown model {name!r}.{close} Run `vitlab models` or vitlab.list_models() to see the "
        f"{len(_MODELS)} registered names."
    )


def get_entry(name: str) -> ModelEntry:
    """The registry entry of ``name``; :class:`~vitlab.errors.UnknownModelError` (a ValueError)
    naming the family's variants or close matches when unknown."""
    try:
        return _MODELS[name]
    except KeyError:
        raise _unknown(name) from None


def _default_variant(candidates: list[str]) -> str | None:
    """The default among a family / size's variants: the one at 224 pixels (patch 16 preferred,
    then the shortest name, i.e. without ``distilled``), or the only one."""
    if len(candidates) == 1:
        return candidates[0]
    at_224 = [c for c in candidates if c.endswith("_224")]
    if not at_224:
        return None
    patch16 = [c for c in at_224 if c.endswith("patch16_224")] or at_224
    shortest = min(len(c) for c in patch16)
    best = [c for c in patch16 if len(c) == shortest]
    return best[0] if len(best) == 1 else None


def resolve_model_name(name: str) -> str:
    """A registered name from a name or short alias.

    Aliases: a name without its suffix (``vit_base`` -> ``vit_base_patch16_224``, ``swin_tiny`` ->
    ``swin_tiny_patch4_window7_224``) and timm-style size letters (``swin_t``, ``vit_b``, ``deit_s``;
    ``t``/``ti`` tiny, ``s`` small, ``m`` medium, ``b`` base, ``l`` large, ``h`` huge). Among several
    variants the 224-pixel one with patch 16 and no ``distilled`` is the default.

    Raises:
        UnknownModelError: A family name with no single default (``swin``: the error lists its
            variants) or an unknown name (close matches suggested).
    """
    if name in _MODELS:
        return name
    stem, _, last = name.rpartition("_")
    expansions = [name]
    if stem and last in SIZE_LETTERS:
        expansions.append(f"{stem}_{SIZE_LETTERS[last]}")
    for base in expansions:
        if base in _MODELS:
            return base
        candidates = sorted(n for n in _MODELS if n.startswith(f"{base}_"))
        if base != name and not candidates:
            continue
        if candidates and base != name.split("_")[0]:  # a bare family (``swin``) has no default
            chosen = _default_variant(candidates)
            if chosen is not None:
                return chosen
        if candidates:
            break
    raise _unknown(name)


def _fits(value: Any, tp: Any) -> bool:
    """Whether ``value`` fits the annotation ``tp`` (int, float, bool, str, None, tuples, unions, Literal)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, t) for t in typing.get_args(tp))
    if origin is typing.Literal:
        return value in typing.get_args(tp)
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if origin in (tuple, list):
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        if not isinstance(value, (tuple, list)):
            return False
        if len(typing.get_args(tp)) == len(args) and args and len(value) != len(args):
            return False
        return all(_fits(v, args[min(i, len(args) - 1)]) for i, v in enumerate(value)) if args else True
    if isinstance(tp, type):
        return isinstance(value, tp)
    return True  # an annotation this check does not model


def check_values(config_class: type, values: dict[str, Any], what: str) -> None:
    """Raise ValueError (one line, with the expected type) when a value does not fit its field."""
    hints = typing.get_type_hints(config_class)
    fields = {f.name for f in dataclasses.fields(config_class)}
    for key, value in values.items():
        if key in fields and not _fits(value, hints.get(key, Any)):
            tp = hints[key]
            expected = tp.__name__ if isinstance(tp, type) else str(tp).replace("typing.", "")
            raise ValueError(f"{what}: {key}={value!r} does not fit; expected {expected}")


def model_config(name: str, **overrides: Any) -> Any:
    """The config dataclass of a variant with ``overrides`` applied.

    Raises:
        ValueError: An unknown key (close matches named) or a value of the wrong type
            (``dim="abc"``: expected int).
    """
    entry = get_entry(name)
    what = f"{entry.config_class.__name__} (model {name})"
    check_keys(entry.config_class, overrides, what=what)
    check_values(entry.config_class, overrides, what)
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
