"""Masked image modelling for hierarchical backbones (Xie et al., 2022, "SimMIM").

The encoder keeps the whole grid: hidden patches carry its learned mask token (the backbone
contract's ``forward_features(x, mask)`` of Swin and PVT v2 built with ``mask_token=True``).
A linear head maps each cell of the final feature map to the pixels it covers (the
backbone's total stride squared times the channels), and the loss (L1 as in the paper, or
L2) is taken on the hidden pixels only. The mask is drawn per cell of the final map (the
paper's mask patch of 32 px at stride 32) and handed to the encoder at its patch resolution.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ...models.base import Backbone, check_config
from .masking import RandomMasking
from .model import compose_reconstruction


@dataclass(frozen=True)
class SimMIMConfig:
    """Configuration of :class:`SimMIM` (the encoder brings its own config).

    Attributes:
        mask_ratio: Fraction of the final map's cells hidden, in [0, 1) (0.6 in the paper).
        loss: ``"l1"`` (the paper) or ``"l2"`` on the hidden pixels.
        norm_pix_loss: Regress per-cell normalised pixels (mean 0, variance 1 per cell).
    """

    mask_ratio: float = 0.6
    loss: str = "l1"
    norm_pix_loss: bool = False

    def __post_init__(self) -> None:
        check_config(self, checks=[
            (0.0 <= self.mask_ratio < 1.0, f"mask_ratio must be in [0, 1), got {self.mask_ratio}"),
            (self.loss in ("l1", "l2"), f"loss must be 'l1' or 'l2', got {self.loss!r}"),
        ])


class SimMIM(RandomMasking, nn.Module):
    """SimMIM pre-training of a hierarchical backbone: mask token in, pixels of hidden cells out.

    Uses the encoder only through the contract: ``config.image_size`` / ``in_channels``,
    ``feature_info`` (the first and last strides), ``num_features`` and
    ``forward_features(x, mask)`` returning a map (B, C, H/s, W/s).

    Args:
        encoder: A backbone whose ``forward_features`` takes a patch mask and returns a map.
        config: A :class:`SimMIMConfig`.

    Raises:
        ValueError: An image size that is not a multiple of the total stride, or a stride
            that is not a multiple of the first patch stride.
    """

    def __init__(self, encoder: Backbone, config: SimMIMConfig | None = None) -> None:
        super().__init__()
        self.config = config or SimMIMConfig()
        self.encoder = encoder
        ec = encoder.config
        self.in_channels = int(ec.in_channels)
        self.image_size = tuple(ec.image_size)
        self.patch_stride = int(encoder.feature_info[0]["reduction"])
        self.stride = int(encoder.feature_info[-1]["reduction"])
        if self.stride % self.patch_stride or any(s % self.stride for s in self.image_size):
            raise ValueError(f"SimMIM needs an image size ({self.image_size[0]}x{self.image_size[1]}) that is a "
                             f"multiple of the encoder's total stride {self.stride} (and a stride that is a multiple "
                             f"of its patch stride {self.patch_stride})")
        self.grid = (self.image_size[0] // self.stride, self.image_size[1] // self.stride)
        self.patch_size = self.stride  # one prediction per cell of the final map
        self.head = nn.Linear(encoder.num_features, self.stride * self.stride * self.in_channels)
        nn.init.trunc_normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    def patch_mask(self, mask: Tensor) -> Tensor:
        """Cell mask (B, gh*gw) -> the encoder's patch mask (B, gh*r * gw*r), r = stride / patch stride."""
        r = self.stride // self.patch_stride
        b = mask.shape[0]
        # (B, gh*gw) -> (B, gh, gw) -> (B, gh*r, gw*r) -> (B, gh*r*gw*r)
        m = mask.reshape(b, *self.grid).repeat_interleave(r, dim=1).repeat_interleave(r, dim=2)
        return m.reshape(b, -1)  # (B, gh*r, gw*r) -> (B, gh*r * gw*r)

    @property
    def target_size(self) -> int:
        """Side in pixels of the cells whose pixels are predicted."""
        return self.stride

    def forward(self, images: Tensor, noise: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Mask, encode the whole grid (mask tokens at hidden patches), predict every cell's pixels.

        Args:
            images: (B, C, H, W) at the encoder's ``image_size``.
            noise: Optional (B, cells) masking noise (the same noise gives the same mask).

        Returns:
            ``loss`` (L1 or L2 over the hidden pixels only), ``pred`` (B, cells, s*s*C) and the
            cell ``mask`` (B, cells) bool, True where hidden.
        """
        if tuple(images.shape[-2:]) != self.image_size:
            raise ValueError(f"SimMIM expects {self.image_size[0]}x{self.image_size[1]} images, got "
                             f"{images.shape[-2]}x{images.shape[-1]}")
        mask = self.random_mask(images, noise)
        fmap = self.encoder.forward_features(images, mask=self.patch_mask(mask))
        if fmap.ndim != 4 or tuple(fmap.shape[-2:]) != self.grid:
            raise ValueError(f"{type(self.encoder).__name__}.forward_features must return a (B, C, {self.grid[0]}, "
                             f"{self.grid[1]}) map, got {tuple(fmap.shape)}")
        pred = self.head(fmap.flatten(2).transpose(1, 2))  # (B, C, gh, gw) -> (B, gh*gw, C) -> (B, cells, s*s*C_in)
        diff = pred - self.targets(images)
        err = (diff.abs() if self.config.loss == "l1" else diff.pow(2)).mean(dim=-1)  # (B, cells)
        m = mask.to(err.dtype)
        loss = (err * m).sum() / m.sum().clamp_min(1.0)
        return loss, pred, mask

    def compose(self, images: Tensor, pred: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """(reconstruction, masked input), both (B, C, H, W): hidden cells from ``pred``, visible ones
        from ``images``; the masked input has zeros at hidden cells."""
        return compose_reconstruction(images, pred, mask, self.stride, self.grid, self.in_channels,
                                      self.config.norm_pix_loss)


__all__ = ["SimMIM", "SimMIMConfig"]
