"""Patch masks in ``forward_features(x, mask)``: dropped tokens (MAE) and mask tokens (SimMIM).

The backbone contract's ``mask`` is (B, N) booleans over the patch grid of the first patch
embedding, True where a patch is hidden. Plain ViT families drop the hidden tokens
(:func:`drop_masked_tokens`, the encoder then runs on the visible ones only); hierarchical
families keep the grid and replace the hidden patch embeddings by a learned mask token
(:func:`fill_masked_tokens`).
"""

from __future__ import annotations

import torch
from torch import Tensor


def check_patch_mask(mask: Tensor, batch: int, num_patches: int) -> None:
    """Raise one clear ValueError unless ``mask`` is a (batch, num_patches) boolean tensor."""
    if mask.dtype != torch.bool or tuple(mask.shape) != (batch, num_patches):
        raise ValueError(f"mask must be a boolean tensor of shape (B, N) = ({batch}, {num_patches}) over the patch "
                         f"grid, got {mask.dtype} {tuple(mask.shape)}")


def drop_masked_tokens(x: Tensor, mask: Tensor) -> Tensor:
    """Keep the patch tokens (B, N, C) whose ``mask`` (B, N) entry is False -> (B, N_keep, C), in raster order.

    Raises:
        ValueError: A mask of another shape or dtype, or rows hiding different numbers of patches.
    """
    b, n, c = x.shape
    check_patch_mask(mask, b, n)
    keep = (~mask).sum(dim=1)
    if (keep != keep[0]).any():
        raise ValueError(f"every image must hide the same number of patches, got {(n - keep).tolist()}")
    return x[~mask].reshape(b, int(keep[0]), c)  # (B * N_keep, C) -> (B, N_keep, C)


def fill_masked_tokens(x: Tensor, mask: Tensor, mask_token: Tensor) -> Tensor:
    """Replace the patch tokens (B, N, C) where ``mask`` (B, N) is True by ``mask_token`` (1, 1, C) (SimMIM).

    Raises:
        ValueError: A mask of another shape or dtype.
    """
    b, n, c = x.shape
    check_patch_mask(mask, b, n)
    w = mask.unsqueeze(-1).to(x.dtype)  # (B, N) -> (B, N, 1)
    return x * (1.0 - w) + mask_token.to(x.dtype).expand(b, n, c) * w


__all__ = ["check_patch_mask", "drop_masked_tokens", "fill_masked_tokens"]
