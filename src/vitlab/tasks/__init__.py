"""Tasks built on any backbone through the contract, and the tasks of the training engine.

A training task (:class:`Task`) says what a batch is, the loss, the metrics and the plots;
the engine (:mod:`vitlab.training`) does the rest. Pick one by name with :func:`get_task`
(``vitlab train --task NAME``); add one with :func:`register_task`.

Inference with a trained classifier (:class:`vitlab.ViTClassifier`) lives in :mod:`vitlab.deploy`.
"""

from .base import Batch, Metrics, NoMetrics, Task, evaluate_task
from .clip import CLIPTask  # noqa: F401  (registers "clip")
from .image_classification import ClassificationTask
from .detection.task import DetectionTask
from .mae.task import LinearProbeTask, MAETask
from .segmentation.task import SegmentationTask
from .rcnn.task import InstanceTask
from .registry import (TaskSetup, UnknownTaskError, get_inference, get_task, list_tasks, register_inference,
                       register_task)
from .classify import ClassificationInference  # noqa: F401  (each inference module registers its hooks)
from .clip.inference import CLIPInference  # noqa: F401
from .detection.inference import DetectionInference  # noqa: F401
from .mae.inference import LinearProbeInference, MAEInference  # noqa: F401
from .segmentation.apply import SegmentationInference  # noqa: F401
from .rcnn.inference import InstanceInference  # noqa: F401
from .loading import checkpoint_task, load

__all__ = ["Batch", "ClassificationTask", "DetectionTask", "InstanceTask", "LinearProbeTask", "MAETask", "Metrics", "NoMetrics",
           "SegmentationTask", "Task", "TaskSetup", "UnknownTaskError",
           "checkpoint_task", "evaluate_task", "get_inference", "get_task", "list_tasks", "load", "register_inference",
           "register_task"]
