"""What every vitlab backbone shares: the contract's plumbing, not any architecture."""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor, nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INCEPTION_MEAN = (0.5, 0.5, 0.5)
INCEPTION_STD = (0.5, 0.5, 0.5)


def pretrained_cfg(
    input_size: int = 224,
    mean: tuple[float, ...] = IMAGENET_MEAN,
    std: tuple[float, ...] = IMAGENET_STD,
    crop_pct: float = 0.9,
    interpolation: str = "bicubic",
    hub_id: str | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """Preprocessing and weight-source metadata that travels with a model and its checkpoints."""
    return dict(
        input_size=input_size, mean=tuple(mean), std=tuple(std), crop_pct=crop_pct,
        interpolation=interpolation, hub_id=hub_id, **extra,
    )


def init_linears(module: nn.Module, std: float = 0.02) -> None:
    """timm's default init of every ``nn.Linear`` in ``module``: truncated normal weights, zero biases."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def classifier_head(in_features: int, num_classes: int) -> nn.Module:
    """A fresh linear classifier (initialised like :func:`init_linears`), or Identity for 0 classes."""
    if num_classes < 0:
        raise ValueError(f"num_classes must be >= 0, got {num_classes}")
    if num_classes == 0:
        return nn.Identity()
    head = nn.Linear(in_features, num_classes)
    init_linears(head)
    return head


def resolve_indices(indices: int | Sequence[int] | None, n: int) -> list[int]:
    """Block indices for ``forward_intermediates``: None = all, an int k = the last k, else a list.

    Negative indices count from the end. Raises ValueError on an index out of range.
    """
    if indices is None:
        return list(range(n))
    if isinstance(indices, int):
        if not 0 < indices <= n:
            raise ValueError(f"asked for the last {indices} blocks but the model has {n}")
        return list(range(n - indices, n))
    out = []
    for i in indices:
        j = i + n if i < 0 else i
        if not 0 <= j < n:
            raise ValueError(f"block index {i} is out of range for a model with {n} blocks (valid: {-n}..{n - 1})")
        out.append(j)
    return sorted(set(out))


class Backbone(nn.Module):
    """Base class of every registered model (DESIGN.md section 3).

    Subclasses implement ``forward_features``, ``forward_head``, ``forward_intermediates``,
    ``reset_classifier``, ``layer_id`` and set ``num_features``, ``feature_info``,
    ``num_layer_ids``. This class supplies ``forward``, grad-checkpointing state,
    ``no_weight_decay`` from ``no_weight_decay_names`` and the checkpoint adaptation hook.
    """

    family: str = ""
    #: Parameter names (top level) excluded from weight decay besides norms and biases.
    no_weight_decay_names: tuple[str, ...] = ()

    def __init__(self) -> None:
        super().__init__()
        self.grad_checkpointing = False
        self.pretrained_cfg: dict[str, Any] = pretrained_cfg()
        self.model_name: str | None = None

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))  # type: ignore[attr-defined]

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in the backward pass instead of storing them."""
        self.grad_checkpointing = enable

    def no_weight_decay(self) -> set[str]:
        """Parameter names to exclude from weight decay (tokens, position embeddings, tables)."""
        names = {n for n, _ in self.named_parameters()}
        return {n for n in names if n.split(".")[-1] in self.no_weight_decay_names or n in self.no_weight_decay_names}

    @classmethod
    def tiny_overrides(cls, config: Any) -> dict[str, Any]:
        """Config overrides that shrink a variant for fast tests while keeping its structure."""
        return {}

    def adapt_state_dict(self, state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
        """Make a checkpoint in vitlab's key layout fit this model (e.g. resample position embeddings)."""
        return state_dict

    def num_params(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device
