"""Mixup/CutMix; it lives in :mod:`vitlab.tasks.mixup` (batch preparation belongs to the classification task)."""

from ..tasks.mixup import Mixup, mixup_target, one_hot_smooth, rand_bbox

__all__ = ["Mixup", "mixup_target", "one_hot_smooth", "rand_bbox"]
