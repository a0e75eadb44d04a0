"""Hybrid patch embedding: a CNN's feature map projected to tokens (ViT paper, section 3.1).

:class:`HybridEmbed` is a :class:`~vitlab.components.PatchEmbed` whose input is the output map of
any CNN instead of the image: the CNN runs on the whole image, then the patch projection
(a convolution with kernel = stride = ``patch_size``, 1 in the R50 hybrids) turns its map into
tokens. Parameter names are timm's (``backbone.*``, ``proj.*``).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from .embeddings import PatchEmbed, to_2tuple


class HybridEmbed(PatchEmbed):
    """Image -> CNN feature map -> patch tokens.

    Args:
        backbone: Any module mapping (B, in_channels, H, W) to (B, feature_channels, H', W') with
            ``H' = ceil(H / feature_stride)`` ("SAME" padding, as the hybrids' ResNets have), or
            to a list / tuple of maps whose last one is that map.
        feature_channels: Channels of the backbone's map.
        feature_stride: Input pixels per position of the backbone's map.
        patch_size: Kernel and stride of the projection on that map.
        in_channels: Image channels.
        dim: Token width.
        bias: Bias in the projection.
        pad_input: Pad a backbone map that is not a multiple of ``patch_size`` on the right /
            bottom (with zeros, as timm's ``dynamic_img_pad``); when False such an image raises.

    Attributes:
        stride: Input pixels per token: ``feature_stride * patch_size`` (what a token grid's
            cell and ``feature_info``'s reduction are).

    Forward returns ``(tokens, grid)``: tokens (B, h * w, dim) with ``h = ceil(H / stride)``
    and the grid (h, w).
    """

    def __init__(
        self,
        backbone: nn.Module,
        feature_channels: int,
        feature_stride: int | tuple[int, int],
        patch_size: int | tuple[int, int] = 1,
        in_channels: int = 3,
        dim: int = 768,
        bias: bool = True,
        pad_input: bool = True,
    ) -> None:
        super().__init__(patch_size, feature_channels, dim, bias=bias, pad_input=pad_input)
        self.backbone = backbone
        self.image_channels = in_channels
        self.feature_stride = to_2tuple(feature_stride)
        self.stride = (self.feature_stride[0] * self.patch_size[0], self.feature_stride[1] * self.patch_size[1])

    def grid_size(self, image_size: tuple[int, int]) -> tuple[int, int]:
        """Token grid for an image size: ``ceil(size / stride)`` per axis."""
        return -(-int(image_size[0]) // self.stride[0]), -(-int(image_size[1]) // self.stride[1])

    def check_input(self, x: Tensor) -> Tensor:
        """Validate an image batch (B, in_channels, H, W); without ``pad_input`` H, W must be stride multiples."""
        if x.ndim != 4:
            raise ValueError(f"expected an image batch of shape (B, {self.image_channels}, H, W), got shape {tuple(x.shape)}")
        b, c, h, w = x.shape
        if c != self.image_channels:
            raise ValueError(
                f"expected {self.image_channels} input channel(s), got {c} (input shape {tuple(x.shape)}); "
                f"build the model with in_channels={c} or convert the images"
            )
        sh, sw = self.stride
        if not self.pad_input and (h % sh or w % sw):
            raise ValueError(
                f"image size {h}x{w} is not a multiple of the hybrid's token stride {sh}x{sw}; resize to e.g. "
                f"{h + (-h) % sh}x{w + (-w) % sw} or build the model with pad_input=True"
            )
        return x

    def feature_map(self, x: Tensor) -> Tensor:
        """Validated images (B, C, H, W) -> the backbone's last map (B, feature_channels, H', W')."""
        fmap = self.backbone(x)
        if isinstance(fmap, (list, tuple)):
            fmap = fmap[-1]
        if fmap.ndim != 4 or fmap.shape[1] != self.in_channels:
            raise ValueError(f"the hybrid's CNN must return a (B, {self.in_channels}, H', W') map, got shape "
                             f"{tuple(fmap.shape)}")
        return fmap

    def embed(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> backbone map -> padded to a patch multiple -> (B, dim, h, w)."""
        fmap = self.feature_map(x)
        ph, pw = self.patch_size
        rh, rw = (-fmap.shape[-2]) % ph, (-fmap.shape[-1]) % pw
        if rh or rw:
            fmap = F.pad(fmap, (0, rw, 0, rh))  # right / bottom, like the image padding of PatchEmbed
        return self.proj(fmap)


__all__ = ["HybridEmbed"]
