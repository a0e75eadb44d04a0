"""Helpers shared by the typed config dataclasses: building from a dict with clear errors."""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any, TypeVar

T = TypeVar("T")


def suggest(name: str, choices: list[str] | tuple[str, ...] | set[str], n: int = 3) -> str:
    """`` Did you mean 'x'?`` for the closest choices, or an empty string."""
    close = difflib.get_close_matches(name, list(choices), n=n, cutoff=0.5)
    if not close:
        return ""
    return " Did you mean " + " or ".join(repr(c) for c in close) + "?"


def check_keys(cls: type, keys: Any, what: str | None = None) -> None:
    """Raise ValueError naming close matches when ``keys`` has a name ``cls`` has no field for."""
    fields = [f.name for f in dataclasses.fields(cls)]
    for k in keys:
        if k not in fields:
            raise ValueError(
                f"unknown option {k!r} for {what or cls.__name__}.{suggest(k, fields)} "
                f"Valid options: {', '.join(fields)}"
            )


def build_config(cls: type[T], values: dict[str, Any] | None = None, **overrides: Any) -> T:
    """``cls(**values, **overrides)`` with unknown keys reported by name."""
    merged = dict(values or {})
    merged.update(overrides)
    check_keys(cls, merged)
    return cls(**merged)


def config_to_dict(config: Any) -> dict[str, Any]:
    """A JSON-friendly dict of a config dataclass (tuples become lists)."""
    out = {}
    for f in dataclasses.fields(config):
        v = getattr(config, f.name)
        out[f.name] = _as_list(v)
    return out


def _as_list(v: Any) -> Any:
    if dataclasses.is_dataclass(v) and not isinstance(v, type):  # a nested config (YOLOS' ViT, CLIP's text tower)
        return config_to_dict(v)
    return [_as_list(x) for x in v] if isinstance(v, tuple) else v


def config_from_dict(cls: type[T], values: dict[str, Any]) -> T:
    """Inverse of :func:`config_to_dict`; lists become tuples where the field held a pair, and a
    mapping for a field typed as a config dataclass (``YOLOSConfig.vit``) becomes that config."""
    import typing

    hints = typing.get_type_hints(cls)
    out: dict[str, Any] = {}
    for k, v in values.items():
        tp = hints.get(k)
        nested = [a for a in (typing.get_args(tp) or (tp,)) if dataclasses.is_dataclass(a)]
        out[k] = config_from_dict(nested[0], v) if nested and isinstance(v, dict) else _as_tuple(v)
    return build_config(cls, out)


def _as_tuple(v: Any) -> Any:
    return tuple(_as_tuple(x) for x in v) if isinstance(v, list) else v
