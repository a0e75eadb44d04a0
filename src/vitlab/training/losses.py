"""Classification losses; they live in :mod:`vitlab.tasks.losses` (the classification task owns its loss)."""

from ..tasks.losses import DISTILLATION_TYPES, DistillationLoss, LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

__all__ = ["DISTILLATION_TYPES", "DistillationLoss", "LabelSmoothingCrossEntropy", "SoftTargetCrossEntropy"]
