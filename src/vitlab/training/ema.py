"""Exponential moving average of model weights."""

from __future__ import annotations

import copy

import torch
from torch import nn


class ModelEma:
    """Keeps ``ema = decay * ema + (1 - decay) * weights`` after every optimizer step.

    Floating-point parameters and buffers are averaged; other buffers are copied. The
    averaged model is a separate module in eval mode (``.module``), evaluated like the model.

    Args:
        model: The model being trained (unwrapped, not DDP).
        decay: Averaging factor per step, e.g. 0.999.
        warmup: Use ``min(decay, (1 + n) / (10 + n))`` for step n, so early averages are not
            dominated by the random initialisation.
    """

    def __init__(self, model: nn.Module, decay: float = 0.999, warmup: bool = True) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.decay = decay
        self.warmup = warmup
        self.updates = 0

    def current_decay(self) -> float:
        if not self.warmup:
            return self.decay
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        d = self.current_decay()
        self.updates += 1
        src = model.state_dict()
        for name, ema_v in self.module.state_dict().items():
            v = src[name].detach()
            if ema_v.is_floating_point():
                ema_v.mul_(d).add_(v.to(ema_v.dtype), alpha=1.0 - d)
            else:
                ema_v.copy_(v)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor], updates: int) -> None:
        self.module.load_state_dict(state)
        self.updates = updates
