"""The task registry: ``vitlab train --task NAME`` and ``task: NAME`` in a recipe pick a task here.

A registered task is a :class:`~vitlab.tasks.base.Task` subclass with a ``from_config(cfg)``
classmethod returning a :class:`TaskSetup` (the task, the model and the datasets of a run).
The built-in tasks register themselves when :mod:`vitlab.tasks` is imported (its ``__init__``
imports them; importing this module imports the package first), so the registry never
imports a task module back.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, TypeVar

from torch import nn

from ..config import suggest
from .base import Task

T = TypeVar("T", bound=type)

_TASKS: dict[str, type] = {}


class UnknownTaskError(ValueError):
    """A task name that is not registered (the message names close matches)."""


@dataclass
class TaskSetup:
    """What a task builds from a training config: itself, the model and the datasets."""

    task: Task
    model: nn.Module
    train_data: Any
    val_data: Any = None
    test_data: Any = None


def register_task(name: str) -> Callable[[T], T]:
    """Class decorator registering a task class under ``name`` (its ``name`` attribute is set too).

    Raises:
        ValueError: ``name`` is taken by another class.
    """

    def deco(cls: T) -> T:
        if name in _TASKS and _TASKS[name] is not cls:
            raise ValueError(f"task {name!r} is already registered ({_TASKS[name].__name__})")
        cls.name = name
        _TASKS[name] = cls
        return cls

    return deco


def list_tasks() -> list[str]:
    """The registered task names, sorted."""
    return sorted(_TASKS)


def get_task(name: str) -> type:
    """The task class registered as ``name``.

    Raises:
        UnknownTaskError: With close matches and the registered names.
    """
    try:
        return _TASKS[name]
    except KeyError:
        raise UnknownTaskError(
            f"unknown task {name!r}.{suggest(name, list(_TASKS))} Registered tasks: {', '.join(sorted(_TASKS))}"
        ) from None


__all__ = ["TaskSetup", "UnknownTaskError", "get_task", "list_tasks", "register_task"]
