"""A second, minimal task for the engine tests (tests/test_engine.py, tests/engine_worker.py).

Regression of ``y = x @ W + b`` (8 features -> 2 targets) with a two-layer MLP. It owns what
a task owns: its batches (with an on-device augmentation drawn from the engine's generator:
Gaussian input noise), its loss (MSE), its metrics (MSE and MAE, MSE primary, lower is
better) and extra checkpointed state (how many training samples it has prepared). Options
come from ``model.overrides``: ``hidden``, ``dropout``, ``noise``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from vitlab.tasks import Batch, Metrics, Task, TaskSetup, register_task

IN, OUT = 8, 2


@dataclass
class ToyConfig:
    in_features: int = IN
    hidden: int = 16
    out_features: int = OUT
    dropout: float = 0.0


class ToyMLP(nn.Module):
    """Linear -> GELU -> Dropout -> Linear, with a ``config`` like every vitlab model."""

    def __init__(self, config: ToyConfig) -> None:
        super().__init__()
        self.config = config
        self.fc1 = nn.Linear(config.in_features, config.hidden)
        self.drop = nn.Dropout(config.dropout)
        self.fc2 = nn.Linear(config.hidden, config.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.drop(F.gelu(self.fc1(x))))


def toy_data(n: int, seed: int) -> TensorDataset:
    """``n`` samples of the fixed linear map, with a little label noise."""
    g = torch.Generator().manual_seed(1234)
    w, b = torch.randn(IN, OUT, generator=g), torch.randn(OUT, generator=g)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, IN, generator=g)
    y = x @ w + b + 0.1 * torch.randn(n, OUT, generator=g)
    return TensorDataset(x, y)


class MseMae(Metrics):
    def __init__(self) -> None:
        self.se, self.ae, self.n = 0.0, 0.0, 0

    def update(self, batch: Batch, outputs: Any) -> None:
        diff = outputs.detach().float() - batch.targets
        self.se += float(diff.pow(2).sum())
        self.ae += float(diff.abs().sum())
        self.n += batch.size

    def compute(self) -> dict[str, Any]:
        denom = max(self.n, 1) * OUT
        return {"mse": self.se / denom, "mae": self.ae / denom, "n": self.n}


@register_task("toy_regression")
class ToyRegression(Task):
    primary_metric = "mse"
    higher_is_better = False

    def __init__(self, noise: float = 0.0) -> None:
        self.noise = noise
        self.prepared = 0  # extra state: training samples prepared so far

    def prepare(self, batch: Any, device: torch.device, image_size: int | None,
                generator: torch.Generator | None) -> Batch:
        x, y = (t.to(device).float() for t in batch)
        if generator is not None:
            self.prepared += x.shape[0]
            if self.noise:
                x = x + self.noise * torch.randn(x.shape, generator=generator, device=device)
        return Batch(x, y, int(x.shape[0]))

    def loss(self, batch: Batch, outputs: Any) -> torch.Tensor:
        return F.mse_loss(outputs.float(), batch.targets)

    def train_metrics(self) -> Metrics:
        return MseMae()

    def eval_metrics(self) -> Metrics:
        return MseMae()

    def state_dict(self) -> dict[str, Any]:
        return {"prepared": self.prepared}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.prepared = int(state["prepared"])

    @classmethod
    def from_config(cls, cfg: Any) -> TaskSetup:
        o = dict(cfg.model.overrides)
        model = ToyMLP(ToyConfig(hidden=int(o.get("hidden", 16)), dropout=float(o.get("dropout", 0.0))))
        task = cls(noise=float(o.get("noise", 0.0)))
        return TaskSetup(task, model, toy_data(96, seed=1), toy_data(32, seed=2), toy_data(32, seed=3))
