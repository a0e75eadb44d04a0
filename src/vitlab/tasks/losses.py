"""Classification losses: soft-target and label-smoothing cross-entropy, DeiT distillation."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

DISTILLATION_TYPES = ("none", "soft", "hard")


class SoftTargetCrossEntropy(nn.Module):
    """Cross-entropy with probability targets: ``mean_b sum_n -t[b, n] * log_softmax(x)[b, n]``.

    For Mixup/CutMix targets (B, N) whose rows sum to 1.
    """

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        if target.shape != logits.shape:
            raise ValueError(f"soft targets must match the logits' shape {tuple(logits.shape)}, got {tuple(target.shape)}")
        return torch.sum(-target * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()


class LabelSmoothingCrossEntropy(nn.Module):
    """Cross-entropy with integer targets smoothed to ``1 - s + s/N`` on the label and ``s/N`` elsewhere.

    Equals ``(1 - s) * NLL + s * mean_n(-log_softmax)``, the same targets :class:`Mixup` builds.

    Args:
        smoothing: ``s`` in [0, 1).
    """

    def __init__(self, smoothing: float = 0.1) -> None:
        super().__init__()
        if not 0.0 <= smoothing < 1.0:
            raise ValueError(f"smoothing must be in [0, 1), got {smoothing}")
        self.smoothing = smoothing

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        logprobs = F.log_softmax(logits.float(), dim=-1)
        nll = -logprobs.gather(-1, target.long().unsqueeze(-1)).squeeze(-1)
        smooth = -logprobs.mean(dim=-1)
        return ((1.0 - self.smoothing) * nll + self.smoothing * smooth).mean()

    def extra_repr(self) -> str:
        return f"smoothing={self.smoothing}"


class DistillationLoss(nn.Module):
    """DeiT's loss (Touvron et al. 2021): the base loss on the class head plus distillation on the dist head.

    Called as ``loss(inputs, outputs, labels)``. ``outputs`` is the logits tensor or a
    ``(cls_logits, dist_logits)`` pair (a distilled DeiT in training mode). With a teacher
    ``t = teacher(inputs)`` (run in eval mode under ``torch.no_grad``):

    * ``"soft"``: ``KL(log_softmax(dist / tau) || log_softmax(t / tau))`` summed, times
      ``tau**2 / dist.numel()``;
    * ``"hard"``: ``cross_entropy(dist, t.argmax(1))``;

    and ``loss = base * (1 - alpha) + distill * alpha``. With ``"none"`` it is the base loss on
    the class logits. After a call, ``last_base`` and ``last_distill`` hold the two detached parts.

    Args:
        base_criterion: Loss on ``(cls_logits, labels)`` (labels hard or soft).
        teacher: The teacher model; required unless ``distillation_type="none"``.
        distillation_type: ``"none"``, ``"soft"`` or ``"hard"``.
        alpha: Weight of the distillation term.
        tau: Temperature of the soft distillation.
    """

    def __init__(self, base_criterion: nn.Module, teacher: nn.Module | None = None,
                 distillation_type: str = "none", alpha: float = 0.5, tau: float = 1.0) -> None:
        super().__init__()
        if distillation_type not in DISTILLATION_TYPES:
            raise ValueError(f"distillation_type must be one of {', '.join(DISTILLATION_TYPES)}, got {distillation_type!r}")
        if distillation_type != "none" and teacher is None:
            raise ValueError(f"distillation_type={distillation_type!r} needs a teacher model")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        if tau <= 0:
            raise ValueError(f"tau must be > 0, got {tau}")
        self.base_criterion = base_criterion
        self.teacher = teacher.eval() if teacher is not None else None
        self.distillation_type, self.alpha, self.tau = distillation_type, float(alpha), float(tau)
        self.last_base: Tensor | None = None
        self.last_distill: Tensor | None = None

    def train(self, mode: bool = True) -> "DistillationLoss":
        """Switch the loss module's mode, keeping the teacher in eval mode."""
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    def forward(self, inputs: Tensor, outputs: Tensor | tuple[Tensor, Tensor], labels: Tensor) -> Tensor:
        dist_logits = None
        if not isinstance(outputs, Tensor):
            outputs, dist_logits = outputs
        base = self.base_criterion(outputs, labels)
        self.last_base, self.last_distill = base.detach(), None
        if self.distillation_type == "none":
            return base
        if dist_logits is None:
            raise ValueError(
                "distillation needs the model to return (cls_logits, dist_logits): use a distilled model "
                "(e.g. deit_*_distilled_*) in training mode"
            )
        assert self.teacher is not None
        if self.teacher.training:
            self.teacher.eval()
        with torch.no_grad():
            teacher_out = self.teacher(inputs)
            if not isinstance(teacher_out, Tensor):
                teacher_out = teacher_out[0]
            teacher_out = teacher_out.float()
        if teacher_out.shape != dist_logits.shape:
            raise ValueError(
                f"teacher logits {tuple(teacher_out.shape)} don't match the student's {tuple(dist_logits.shape)}: "
                "teacher and student need the same classes"
            )
        if self.distillation_type == "soft":
            t = self.tau
            distill = F.kl_div(
                F.log_softmax(dist_logits.float() / t, dim=1), F.log_softmax(teacher_out / t, dim=1),
                reduction="sum", log_target=True,
            ) * (t * t) / dist_logits.numel()
        else:
            distill = F.cross_entropy(dist_logits.float(), teacher_out.argmax(dim=1))
        self.last_distill = distill.detach()
        return base * (1.0 - self.alpha) + distill * self.alpha

    def extra_repr(self) -> str:
        return f"distillation_type={self.distillation_type!r}, alpha={self.alpha}, tau={self.tau}"


__all__ = ["DISTILLATION_TYPES", "DistillationLoss", "LabelSmoothingCrossEntropy", "SoftTargetCrossEntropy"]
