"""What a task is to the training engine: the :class:`Task` protocol.

The engine (:class:`vitlab.training.Trainer`) owns what every task shares: device and
precision, accumulation, clipping, optimizer groups and layer decay, the schedule, EMA, DDP,
progressive resizing (it decides the size; the task applies it), the NaN stop, checkpoints
and exact resume, ``metrics.jsonl``, progress bars, TensorBoard and ``results.json``.

A task owns what differs:

- :meth:`Task.prepare`: a loader batch -> a :class:`Batch` on the device (augmentation on
  the device when a generator is given: training), resized to the engine's size;
- :meth:`Task.forward` and :meth:`Task.loss`;
- :meth:`Task.train_metrics` / :meth:`Task.eval_metrics`: accumulators of its metrics, and
  :attr:`Task.primary_metric` (which one ranks runs);
- :meth:`Task.start_epoch`: anything to switch before a training epoch (a later phase);
- :meth:`Task.after_step`: anything to do to the model after each optimizer step;
- :meth:`Task.state_dict` / :meth:`Task.load_state_dict`: extra state in each checkpoint;
- :meth:`Task.plots`: the figures of a finished run.

Tasks never import :mod:`vitlab.training` (layering: ``tasks <- training``); the engine
finds them through :mod:`vitlab.tasks.registry`.
"""

from __future__ import annotations

import abc

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class Batch:
    """One prepared batch.

    Attributes:
        inputs: What the model is called with (by :meth:`Task.forward`).
        targets: What the loss compares the outputs with.
        size: Number of samples (weights the running training loss).
        extra: Anything else the task's metrics need (e.g. the hard labels under mixup).
    """

    inputs: Any
    targets: Any
    size: int
    extra: dict[str, Any] = field(default_factory=dict)


class Metrics(abc.ABC):
    """An accumulator of a task's metrics over batches.

    ``update`` is called once per batch with the prepared batch and the model's outputs
    (training: the outputs of the training forward; evaluation: of the eval-mode forward);
    ``compute`` returns the metric values. Scalars become ``train_<name>`` / ``val_<name>`` /
    ``test_<name>`` in ``metrics.jsonl`` and ``results.json``; other values (tensors) are
    only handed to :meth:`Task.plots`. ``n`` is the number of samples seen.
    """

    @abc.abstractmethod
    def update(self, batch: Batch, outputs: Any) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    @abc.abstractmethod
    def compute(self) -> dict[str, Any]:  # pragma: no cover - interface
        raise NotImplementedError


class NoMetrics(Metrics):
    """Counts samples only (a task with no training metrics beyond the loss)."""

    def __init__(self) -> None:
        self.n = 0

    def update(self, batch: Batch, outputs: Any) -> None:
        self.n += batch.size

    def compute(self) -> dict[str, Any]:
        return {"n": self.n}


class ModelOptions(Protocol):
    """The ``model`` section a task reads: a registered name, weights, config overrides."""

    name: str
    pretrained: str | None
    overrides: dict[str, Any]
    grad_checkpointing: bool


class DataOptions(Protocol):
    """The ``data`` section a task reads (a task may set ``image_size`` to the size it chose)."""

    dataset: str
    data_dir: str | None
    image_size: int | None
    crop_pct: float
    interpolation: str
    batch_size: int
    eval_batch_size: int
    num_workers: int


class RunConfig(Protocol):
    """What a task reads of a run's configuration. :class:`vitlab.training.TrainConfig` is one
    (typed structurally: tasks never import the engine); a task's own section is the attribute
    of its ``config_section`` name (``cfg.detection``), typed by its ``config_class``."""

    task: str
    model: ModelOptions
    data: DataOptions
    augment: Any  # vitlab.training.config.AugmentSection
    optim: Any  # vitlab.training.config.OptimSection
    distill: Any  # vitlab.training.config.DistillSection
    epochs: int
    seed: int
    device: str
    progress: bool
    output_dir: str | None

    def __getattr__(self, name: str) -> Any:  # pragma: no cover - the task sections
        ...


class Task(abc.ABC):
    """The base of every task; see the module docstring for the split of duties.

    Attributes:
        name: The registry name (``classification``, ...).
        primary_metric: The evaluation metric that ranks checkpoints and runs (a key of
            :meth:`eval_metrics`' result).
        higher_is_better: Whether a larger primary metric is better.
        labels: Class names stored with checkpoints (None for tasks without classes).
    """

    name: str = "task"
    primary_metric: str = "loss"
    higher_is_better: bool = False
    labels: list[str] | None = None

    # ------------------------------------------------------------ what the plugin declares
    #: The task's own section of the training config (``segmentation``, ``mae``...), or None.
    config_section: ClassVar[str | None] = None
    #: The dataclass of that section (validated like every other section).
    config_class: ClassVar[type | None] = None
    #: The recipe ``vitlab train --task NAME`` runs without ``--config`` (None: the digits recipe).
    default_recipe: ClassVar[dict[str, Any] | None] = None
    #: Checkpoint families (``meta["family"]``) this task loads, for checkpoints without ``task``.
    families: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def prerequisite(cls, cfg: RunConfig, run_dir: Path) -> tuple[Path, dict[str, Any]] | None:
        """A run the engine trains first, inside ``run_dir``, and hands to this one as
        ``model.pretrained`` (e.g. the detection recipe's backbone classifier): ``(folder, recipe)``
        or None (default). The engine trains ``recipe`` into ``folder`` unless it has finished
        there (a killed first step resumes), then sets ``cfg.model.pretrained = folder``."""
        return None

    def to(self, device: torch.device) -> "Task":
        """Move the task's own modules (a teacher, a loss with buffers) to ``device``."""
        return self

    @abc.abstractmethod
    def prepare(self, batch: Any, device: torch.device, image_size: int | None,
                generator: torch.Generator | None) -> Batch:
        """A loader batch -> a :class:`Batch` on ``device``.

        Args:
            batch: What the DataLoader yielded.
            device: The engine's device.
            image_size: The side the engine wants this epoch (progressive resizing), or None.
            generator: The training RNG (on ``device``) for augmentation; None in evaluation.
        """

    def forward(self, model: nn.Module, inputs: Any) -> Any:
        """The model's outputs for ``inputs`` (run under the engine's autocast)."""
        return model(inputs)

    @abc.abstractmethod
    def loss(self, batch: Batch, outputs: Any) -> Tensor:
        """The scalar training loss (run under the engine's autocast)."""
        raise NotImplementedError

    def train_metrics(self) -> Metrics:
        """A fresh accumulator for the training metrics of one epoch."""
        return NoMetrics()

    @abc.abstractmethod
    def eval_metrics(self) -> Metrics:
        """A fresh accumulator for an evaluation; its result must hold :attr:`primary_metric`."""
        raise NotImplementedError

    def start_epoch(self, epoch: int, epochs: int) -> None:
        """Called by the engine before each training epoch with its 0-based index and the
        run's number of epochs (e.g. to enter a later training phase). Default: nothing."""

    def after_step(self, model: nn.Module) -> None:
        """Called by the engine after every optimizer step, before the EMA update, with the
        unwrapped model (e.g. CLIP clamps its temperature here). Default: nothing."""

    def state_dict(self) -> dict[str, Any]:
        """Extra state saved in every checkpoint (tensors and plain Python values)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output."""

    def format_metric(self, name: str, value: float) -> str:
        """How the engine's progress line shows a metric."""
        return f"{name} {value:.4g}"

    def after_evaluation(self, out_dir: Path, epoch: int, metrics: dict[str, Any]) -> list[Path]:
        """Called by the engine (rank 0) after each validation with :meth:`eval_metrics`' result:
        per-evaluation outputs such as image grids. Returns the files written."""
        return []

    def plots(self, out_dir: Path, history: Sequence[dict[str, Any]], final: dict[str, Any] | None) -> list[Path]:
        """Figures of a run: ``history`` is ``metrics.jsonl``'s records, ``final`` the last
        evaluation's metrics (None without evaluation data). Returns the files written."""
        return []


class TaskInference:
    """The inference hooks of a task plugin: what :func:`vitlab.load`, :func:`vitlab.pipeline`,
    ``vitlab predict`` and ``vitlab eval`` call for a checkpoint of that task.

    Register a subclass with :func:`vitlab.tasks.registry.register_inference` under the task's
    name (the training class is registered with ``register_task``; both usually sit in the
    task's package, the toy task of the tests keeps both in one file).
    """

    #: The task's registry name (set by ``register_inference``).
    task: str = "task"
    #: Record keys ``vitlab predict --json`` leaves out (bulky values drawn into files instead).
    json_exclude: tuple[str, ...] = ()

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> nn.Module:
        """The model of a checkpoint of this task (eval mode, ``pretrained_cfg`` and ``labels`` set).

        Default: a model registered with :func:`vitlab.models.registry.register_task_model`,
        rebuilt from its typed config (:func:`vitlab.pretrained.load_task_model`)."""
        from ..pretrained import load_task_model

        return load_task_model(path).to(device)

    @classmethod
    def predict(cls, model: nn.Module, images: Sequence[Any], **options: Any) -> list[dict[str, Any]]:
        """One JSON-ready record per image (paths, PIL images or arrays), preprocessed as the
        checkpoint records; a ``notes`` list says when an image is far from the training data."""
        raise ValueError(f"task {cls.task!r} has no predict: its checkpoints cannot be run on images")

    @classmethod
    def evaluate(cls, checkpoint: str | Path, dataset: str | None = None, split: str | None = None,
                 output_dir: str | Path | None = None, device: str = "cpu", batch_size: int = 64,
                 **options: Any) -> dict[str, Any]:
        """The task's metrics of a checkpoint on ``dataset`` (None: the data it was trained on)."""
        raise ValueError(f"task {cls.task!r} has no evaluate: vitlab eval does not apply to its checkpoints")

    @classmethod
    def draw(cls, image: Any, record: dict[str, Any], output_dir: str | Path, stem: str) -> list[Path]:
        """Files showing one :meth:`predict` record on its image (default: none)."""
        return []

    @classmethod
    def report(cls, results: dict[str, Any]) -> str:
        """The lines ``vitlab eval`` prints for :meth:`evaluate`'s results."""
        return "\n".join(f"{k}: {v:.6g}" if isinstance(v, float) else f"{k}: {v}" for k, v in results.items()
                         if isinstance(v, (int, float, str)))

    @classmethod
    def add_predict_arguments(cls, parser: Any) -> None:
        """Options this task's :meth:`predict` takes on ``vitlab predict`` (an argparse parser;
        an option reaches ``predict`` when its ``dest`` names a ``predict`` parameter)."""

    @classmethod
    def add_commands(cls, sub: Any) -> None:
        """Commands of this task's own (argparse subparsers), e.g. CLIP's ``vitlab zero-shot``."""

    @classmethod
    def describe(cls, name: str, record: dict[str, Any]) -> str:
        """The line ``vitlab predict`` prints for one :meth:`predict` record of image ``name``."""
        return f"{name}: " + ", ".join(f"{k} {v}" for k, v in record.items() if k not in ("notes", "image"))


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available; use --device cpu")
    return dev


def resize_images(x: Tensor, size: int | None) -> Tensor:
    """Bilinear (antialiased) resize of a batch to ``size`` x ``size`` (no-op when it has that size)."""
    if size is None or tuple(x.shape[-2:]) == (size, size):
        return x
    # (B, C, H, W) -> (B, C, size, size)
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """``torch.autocast`` for ``dtype``; a no-op context for None (fp32)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


@torch.no_grad()
def evaluate_task(model: nn.Module, task: Task, loader: Any, device: torch.device, image_size: int | None = None,
                  amp_dtype: torch.dtype | None = None) -> dict[str, Any]:
    """The task's evaluation metrics of ``model`` (in eval mode) over ``loader``.

    Args:
        model: The model (unwrapped from DDP).
        task: Prepares the batches and accumulates the metrics.
        loader: Any iterable of loader batches.
        device: Where to run.
        image_size: The evaluation size handed to :meth:`Task.prepare`.
        amp_dtype: Autocast dtype (None: fp32).
    """
    was = model.training
    model.eval()
    metrics = task.eval_metrics()
    try:
        for raw in loader:
            batch = task.prepare(raw, device, image_size, None)
            with autocast(device, amp_dtype):
                outputs = task.forward(model, batch.inputs)
            metrics.update(batch, outputs)
    finally:
        model.train(was)
    return metrics.compute()


__all__ = ["Batch", "DataOptions", "Metrics", "ModelOptions", "NoMetrics", "RunConfig", "Task", "TaskInference", "autocast", "evaluate_task", "resize_images", "resolve_device"]
