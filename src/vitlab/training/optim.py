"""Optimizer parameter groups (weight decay, layer-wise lr decay), AdamW, warmup + cosine."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn


def param_groups(
    model: nn.Module,
    weight_decay: float = 0.05,
    layer_decay: float | None = None,
    no_weight_decay: set[str] | None = None,
) -> list[dict[str, Any]]:
    """Split trainable parameters into decay / no-decay groups, optionally per depth.

    Biases, norm weights (every 1-D parameter) and the names in the model's
    ``no_weight_decay()`` (position embeddings, tokens, bias tables) get no weight decay.
    With ``layer_decay`` the groups are also split by depth id, resolved once from the
    model's ``group_matcher()`` (:func:`~vitlab.models.base.resolve_layer_ids`), and carry an
    ``lr_scale`` of ``layer_decay ** (num_layer_ids - 1 - layer_id)``: the head learns at
    the full rate, the patch embedding at the smallest.

    Returns:
        Groups for a torch optimizer; each has ``weight_decay``, ``lr_scale`` and ``names``.
    """
    skip = set(no_weight_decay or ())
    if hasattr(model, "no_weight_decay"):
        skip |= set(model.no_weight_decay())
    use_layers = layer_decay is not None and layer_decay != 1.0
    layer_ids: dict[str, int] = {}
    num_layers = 1
    if use_layers:
        if not callable(getattr(model, "group_matcher", None)):
            raise ValueError(
                f"layer-wise lr decay needs a model with group_matcher() (a vitlab Backbone); {type(model).__name__} has none"
            )
        from ..models.base import resolve_layer_ids

        layer_ids, num_layers = resolve_layer_ids([n for n, _ in model.named_parameters()], model.group_matcher())
    prefix_scales = model.lr_scales() if callable(getattr(model, "lr_scales", None)) else {}
    groups: dict[tuple[int, bool, float], dict[str, Any]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decay = not (p.ndim <= 1 or name in skip or name.endswith(".bias"))
        layer = layer_ids.get(name, 0)
        scale = layer_decay ** (num_layers - 1 - layer) if use_layers else 1.0
        matches = [k for k in prefix_scales if name.startswith(k)]
        factor = float(prefix_scales[max(matches, key=len)]) if matches else 1.0  # the longest prefix decides
        g = groups.setdefault((layer, decay, factor), {"params": [], "names": [], "weight_decay": weight_decay if decay else 0.0,
                                                       "lr_scale": scale * factor})
        g["params"].append(p)
        g["names"].append(name)
    return [groups[k] for k in sorted(groups)]


def build_optimizer(
    model: nn.Module,
    name: str = "adamw",
    lr: float = 1e-3,
    weight_decay: float = 0.05,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    momentum: float = 0.9,
    layer_decay: float | None = None,
) -> torch.optim.Optimizer:
    """AdamW (default) or SGD over :func:`param_groups`; each group's lr is ``lr * lr_scale``."""
    groups = param_groups(model, weight_decay, layer_decay)
    for g in groups:
        g["lr"] = lr * g["lr_scale"]
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=True)
    raise ValueError(f"unknown optimizer {name!r}; choose 'adamw' or 'sgd'")


def warmup_cosine(step: int, total_steps: int, warmup_steps: int, min_ratio: float = 0.0) -> float:
    """lr factor: linear warmup from 0 to 1 over ``warmup_steps``, then cosine to ``min_ratio``.

    ``factor(s) = (s + 1) / warmup`` for ``s < warmup``, else
    ``min_ratio + (1 - min_ratio) * (1 + cos(pi * t)) / 2`` with ``t = (s - warmup) / (total - warmup)``.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    t = min(1.0, (step - warmup_steps) / span)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * t))


class WarmupCosineScheduler:
    """Per-step warmup + cosine schedule over an optimizer's groups (respects ``lr_scale``).

    Its state is the step count, so resuming restores the exact lr.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, base_lr: float, total_steps: int, warmup_steps: int = 0, min_lr: float = 0.0) -> None:
        if total_steps <= 0:
            raise ValueError(f"total_steps must be positive, got {total_steps}")
        if not 0 <= warmup_steps <= total_steps:
            raise ValueError(f"warmup_steps must be in [0, total_steps={total_steps}], got {warmup_steps}")
        self.optimizer = optimizer
        self.base_lr = base_lr
        self.total_steps = total_steps
        self.warmup_steps = warmup_steps
        self.min_ratio = min_lr / base_lr if base_lr > 0 else 0.0
        self.step_count = 0
        self._apply()

    def lr_at(self, step: int) -> float:
        """The base lr (before per-group scaling) at a step."""
        return self.base_lr * warmup_cosine(step, self.total_steps, self.warmup_steps, self.min_ratio)

    def _apply(self) -> None:
        lr = self.lr_at(self.step_count)
        for g in self.optimizer.param_groups:
            g["lr"] = lr * g.get("lr_scale", 1.0)

    def step(self) -> None:
        self.step_count += 1
        self._apply()

    def get_last_lr(self) -> list[float]:
        return [g["lr"] for g in self.optimizer.param_groups]

    def state_dict(self) -> dict[str, Any]:
        return {"step_count": self.step_count, "total_steps": self.total_steps, "warmup_steps": self.warmup_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step_count = int(state["step_count"])
        self._apply()
