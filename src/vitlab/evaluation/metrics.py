"""Classification metrics; they live in :mod:`vitlab.tasks.metrics` (below the training engine)."""

from ..tasks.metrics import confusion_matrix, topk_correct

__all__ = ["confusion_matrix", "topk_correct"]
