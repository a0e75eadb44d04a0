"""Gathering CLIP features across ranks with gradients.

The contrastive loss compares every image with every text of the *global* batch. Each rank
gathers all ranks' features (equal batch sizes per rank), computes the same global loss and
back-propagates it; the backward of the gather sums every rank's gradient for this rank's
slice. DDP then averages the parameter gradients over the ranks, so 2 ranks with local batch
B give exactly the gradients of 1 process with batch 2B.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor


def world_size() -> int:
    """Ranks of the default process group (1 when torch.distributed is not initialised)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:  # type: ignore[override]
        ctx.rank, ctx.world, ctx.n = dist.get_rank(), dist.get_world_size(), x.shape[0]
        parts = [torch.empty_like(x) for _ in range(ctx.world)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=0)  # world x (B, ...) -> (world * B, ...)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:  # type: ignore[override]
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)  # every rank's gradient of its own loss, summed
        return grad[ctx.rank * ctx.n : (ctx.rank + 1) * ctx.n]


def gather_with_grad(x: Tensor) -> Tensor:
    """Concatenate ``x`` (B, ...) of every rank in rank order (world * B, ...), differentiably.

    Identity when not distributed. Every rank must pass the same shape.
    """
    if world_size() == 1:
        return x
    return _GatherWithGrad.apply(x)


@torch.no_grad()
def gather_no_grad(x: Tensor) -> Tensor:
    """Concatenate ``x`` (B, ...) of every rank in rank order, without gradients (labels)."""
    if world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


__all__ = ["gather_no_grad", "gather_with_grad", "world_size"]
