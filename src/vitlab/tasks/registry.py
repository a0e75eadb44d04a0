"""The task registry: ``vitlab train --task NAME`` and ``task: NAME`` in a recipe pick a task here.

A registered task is a plugin: a :class:`~vitlab.tasks.base.Task` subclass declaring, in one
place (see :class:`~vitlab.tasks.base.Task`'s plugin attributes):

- its typed config section (``config_section`` / ``config_class``): the engine's
  :class:`~vitlab.training.TrainConfig` takes every registered section from here, so
  :mod:`vitlab.training` imports no task;
- its built-in recipe (``default_recipe``, what ``vitlab train --task NAME`` runs);
- the checkpoint families it loads (``families``; its model classes sit in the model
  registry, :func:`vitlab.models.registry.register_task_model`);
- ``from_config(cfg)``, returning a :class:`TaskSetup` (the task, the model and the datasets);
- its inference hooks: a :class:`~vitlab.tasks.base.TaskInference` subclass registered with
  :func:`register_inference` (``load``, ``predict``, ``evaluate``, ``draw``, ``report``), which
  :func:`vitlab.load`, :func:`vitlab.pipeline`, ``vitlab predict`` and ``vitlab eval`` call.

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
_INFERENCE: dict[str, type] = {}


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


def _registrar(table: dict[str, type], name: str, attribute: str, what: str) -> Callable[[T], T]:
    """A class decorator putting the class into ``table`` under ``name`` and setting its ``attribute``."""

    def deco(cls: T) -> T:
        if name in table and table[name] is not cls:
            raise ValueError(f"{what} {name!r} is already registered ({table[name].__name__})")
        setattr(cls, attribute, name)
        table[name] = cls
        return cls

    return deco


def register_task(name: str) -> Callable[[T], T]:
    """Class decorator registering a task class under ``name`` (its ``name`` attribute is set too).

    Raises:
        ValueError: ``name`` is taken by another class.
    """
    return _registrar(_TASKS, name, "name", "task")


def register_inference(name: str) -> Callable[[T], T]:
    """Class decorator registering a task's inference hooks (a
    :class:`~vitlab.tasks.base.TaskInference` subclass) under the task's ``name`` (set as its
    ``task`` attribute).

    Raises:
        ValueError: ``name`` has other inference hooks.
    """
    return _registrar(_INFERENCE, name, "task", "inference of task")


def get_inference(name: str) -> type:
    """The inference hooks of task ``name``.

    Raises:
        UnknownTaskError: No such task, or a task without inference (the message says which).
    """
    get_task(name)
    try:
        return _INFERENCE[name]
    except KeyError:
        raise UnknownTaskError(f"task {name!r} has no inference hooks: its checkpoints cannot be loaded or run "
                               f"(tasks with inference: {', '.join(sorted(_INFERENCE))})") from None


def list_inference() -> dict[str, type]:
    """Task name -> its inference hooks, for every task that has them."""
    return dict(sorted(_INFERENCE.items()))


def config_sections() -> dict[str, type]:
    """Config section name -> its dataclass, for every registered task that declares one.

    Raises:
        ValueError: Two tasks declare one section name with different classes.
    """
    out: dict[str, type] = {}
    for cls in _TASKS.values():
        key, section = getattr(cls, "config_section", None), getattr(cls, "config_class", None)
        if key is None or section is None:
            continue
        if key in out and out[key] is not section:
            raise ValueError(f"config section {key!r} is declared by two tasks with different classes")
        out[key] = section
    return out


def task_for_family(family: str | None) -> str | None:
    """The task whose checkpoints hold models of ``family`` (None when no task claims it)."""
    for name in sorted(_TASKS):
        if family in getattr(_TASKS[name], "families", ()):
            return name
    return None


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


__all__ = ["TaskSetup", "UnknownTaskError", "config_sections", "get_inference", "list_inference", "get_task", "list_tasks",
           "register_inference", "register_task", "task_for_family"]
