"""Losses (vitlab.tasks.losses) against numbers computed by hand with math.log/exp."""

import math

import pytest
import torch
from torch import nn

from vitlab.tasks.losses import DistillationLoss, LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

CLS = [[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]]
DIST = [[2.0, 0.0, 1.0], [0.5, 1.5, -0.5]]
TEACHER = [[0.2, 1.2, 0.1], [3.0, 0.0, 1.0]]  # argmax: 1, 0
LABELS = [1, 2]


def log_softmax(row: list[float]) -> list[float]:
    lse = math.log(sum(math.exp(v) for v in row))
    return [v - lse for v in row]


def ce(rows: list[list[float]], labels: list[int]) -> float:
    return sum(-log_softmax(r)[t] for r, t in zip(rows, labels)) / len(rows)


class FixedTeacher(nn.Module):
    """Returns fixed logits and records how it was called."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(()))
        self.calls: list[tuple[bool, bool]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append((self.training, torch.is_grad_enabled()))
        return torch.tensor(TEACHER) * self.w


def test_soft_target_cross_entropy_by_hand():
    target = [[0.2, 0.3, 0.5], [1.0, 0.0, 0.0]]
    expected = sum(-sum(t * l for t, l in zip(tr, log_softmax(r))) for r, tr in zip(CLS, target)) / 2
    got = SoftTargetCrossEntropy()(torch.tensor(CLS), torch.tensor(target))
    assert float(got) == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="shape"):
        SoftTargetCrossEntropy()(torch.tensor(CLS), torch.tensor([1, 2]))


def test_label_smoothing_cross_entropy_by_hand():
    s, n = 0.1, 3
    off, on = s / n, 1 - s + s / n
    expected = 0.0
    for r, t in zip(CLS, LABELS):
        lp = log_softmax(r)
        expected += -sum((on if k == t else off) * lp[k] for k in range(n))
    expected /= 2
    got = LabelSmoothingCrossEntropy(s)(torch.tensor(CLS), torch.tensor(LABELS))
    assert float(got) == pytest.approx(expected, rel=1e-6)
    assert float(LabelSmoothingCrossEntropy(0.0)(torch.tensor(CLS), torch.tensor(LABELS))) == pytest.approx(
        ce(CLS, LABELS), rel=1e-6)


def test_distillation_hard_by_hand():
    teacher = FixedTeacher()
    loss = DistillationLoss(nn.CrossEntropyLoss(), teacher, "hard", alpha=0.3)
    got = loss(torch.zeros(2, 3, 4, 4), (torch.tensor(CLS), torch.tensor(DIST)), torch.tensor(LABELS))
    base = ce(CLS, LABELS)
    distill = ce(DIST, [1, 0])  # teacher argmax
    assert float(got) == pytest.approx(base * 0.7 + distill * 0.3, rel=1e-6)
    assert float(loss.last_base) == pytest.approx(base, rel=1e-6)
    assert float(loss.last_distill) == pytest.approx(distill, rel=1e-6)


def test_distillation_soft_by_hand():
    tau, alpha = 2.0, 0.5
    teacher = FixedTeacher()
    loss = DistillationLoss(nn.CrossEntropyLoss(), teacher, "soft", alpha=alpha, tau=tau)
    got = loss(torch.zeros(2, 3, 4, 4), (torch.tensor(CLS), torch.tensor(DIST)), torch.tensor(LABELS))
    kl = 0.0
    for s_row, t_row in zip(DIST, TEACHER):
        ls = log_softmax([v / tau for v in s_row])
        lt = log_softmax([v / tau for v in t_row])
        kl += sum(math.exp(b) * (b - a) for a, b in zip(ls, lt))
    distill = kl * tau * tau / 6  # numel of the (2, 3) logits
    assert float(got) == pytest.approx(ce(CLS, LABELS) * (1 - alpha) + distill * alpha, rel=1e-6)


def test_teacher_runs_in_eval_mode_without_grad():
    teacher = FixedTeacher().train()
    loss = DistillationLoss(nn.CrossEntropyLoss(), teacher, "soft")
    loss.train()  # switching the loss module to training must not switch the teacher
    cls = torch.tensor(CLS, requires_grad=True)
    dist = torch.tensor(DIST, requires_grad=True)
    out = loss(torch.zeros(2, 3, 4, 4), (cls, dist), torch.tensor(LABELS))
    out.backward()
    assert teacher.calls == [(False, False)]
    assert teacher.w.grad is None
    assert cls.grad is not None and dist.grad is not None


def test_distillation_none_and_errors():
    loss = DistillationLoss(nn.CrossEntropyLoss())
    assert float(loss(None, torch.tensor(CLS), torch.tensor(LABELS))) == pytest.approx(ce(CLS, LABELS), rel=1e-6)
    # a (cls, dist) pair without distillation: the base loss on the class head only
    assert float(loss(None, (torch.tensor(CLS), torch.tensor(DIST)), torch.tensor(LABELS))) == pytest.approx(
        ce(CLS, LABELS), rel=1e-6)
    with pytest.raises(ValueError, match="needs a teacher"):
        DistillationLoss(nn.CrossEntropyLoss(), None, "hard")
    with pytest.raises(ValueError, match="distillation_type"):
        DistillationLoss(nn.CrossEntropyLoss(), FixedTeacher(), "medium")
    with pytest.raises(ValueError, match="dist_logits"):
        DistillationLoss(nn.CrossEntropyLoss(), FixedTeacher(), "hard")(None, torch.tensor(CLS), torch.tensor(LABELS))


def test_distillation_with_soft_targets():
    target = torch.tensor([[0.1, 0.8, 0.1], [0.0, 0.2, 0.8]])
    loss = DistillationLoss(SoftTargetCrossEntropy(), FixedTeacher(), "hard", alpha=0.5)
    got = loss(torch.zeros(2, 3, 4, 4), (torch.tensor(CLS), torch.tensor(DIST)), target)
    expected = 0.5 * float(SoftTargetCrossEntropy()(torch.tensor(CLS), target)) + 0.5 * ce(DIST, [1, 0])
    assert float(got) == pytest.approx(expected, rel=1e-6)
