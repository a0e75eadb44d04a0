"""Feature pyramids for Mask R-CNN, built on the backbone contract only.

- :class:`SimpleFeaturePyramid`: ViTDet's pyramid from a plain ViT's last map (stride ``s``):
  scale 4 (two stride-2 transposed convolutions with LayerNorm + GELU between them, width / 4),
  scale 2 (one transposed convolution, width / 2), scale 1 (the map), scale 1/2 (2x2 max pooling);
  each followed by a LayerNorm'd 1x1 and a LayerNorm'd 3x3 convolution to ``out_channels``.
- :class:`FPN`: the feature pyramid network on a hierarchical backbone's stages (Swin, PVT):
  LayerNorm'd 1x1 lateral convolutions, a top-down path (nearest upsampling + sum) and
  LayerNorm'd 3x3 output convolutions.

Both add P6 as a stride-2 subsampling of the coarsest level (Mask R-CNN's ``LastLevelMaxPool``)
and return ``(maps, strides)``, finest first.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch.nn.functional as F
from torch import Tensor, nn


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of a (B, C, H, W) map (ViTDet's ``LN`` for convolutions)."""

    def forward(self, x: Tensor) -> Tensor:
        # (B, C, H, W) -> (B, H, W, C) -> norm -> (B, C, H, W)
        return F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias,
                            self.eps).permute(0, 3, 1, 2)


def conv_norm(in_channels: int, out_channels: int, kernel: int, norm: bool = True, act: bool = False) -> nn.Sequential:
    """Conv (no bias under a norm) -> LayerNorm2d -> optional ReLU."""
    layers: list[nn.Module] = [nn.Conv2d(in_channels, out_channels, kernel, padding=kernel // 2, bias=not norm)]
    if norm:
        layers.append(LayerNorm2d(out_channels, eps=1e-6))
    if act:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class SimpleFeaturePyramid(nn.Module):
    """ViTDet's simple feature pyramid on one map (see the module docstring).

    Args:
        in_channels: Channels of the backbone's last map.
        in_stride: Its stride in pixels (the patch size).
        out_channels: Channels of every pyramid level.
        scales: Scale factors, powers of 2 from 4 to 1/2 (ViTDet: ``(4, 2, 1, 0.5)``).
        norm: LayerNorm after the convolutions (ViTDet: on).
    """

    def __init__(self, in_channels: int, in_stride: int, out_channels: int = 256,
                 scales: Sequence[float] = (4.0, 2.0, 1.0, 0.5), norm: bool = True) -> None:
        super().__init__()
        self.scales = tuple(float(s) for s in scales)
        if list(self.scales) != sorted(self.scales, reverse=True):
            raise ValueError(f"pyramid scales must be in decreasing order (finest first), got {list(self.scales)}")
        self.stages = nn.ModuleList()
        strides = []
        for s in self.scales:
            if s == 4.0:
                width = in_channels // 4
                up: nn.Module = nn.Sequential(
                    nn.ConvTranspose2d(in_channels, in_channels // 2, 2, stride=2), LayerNorm2d(in_channels // 2, eps=1e-6),
                    nn.GELU(), nn.ConvTranspose2d(in_channels // 2, width, 2, stride=2))
            elif s == 2.0:
                width, up = in_channels // 2, nn.ConvTranspose2d(in_channels, in_channels // 2, 2, stride=2)
            elif s == 1.0:
                width, up = in_channels, nn.Identity()
            elif s == 0.5:
                width, up = in_channels, nn.MaxPool2d(2)
            else:
                raise ValueError(f"simple feature pyramid scales are 4, 2, 1 or 0.5, got {s}")
            self.stages.append(nn.Sequential(up, conv_norm(width, out_channels, 1, norm),
                                             conv_norm(out_channels, out_channels, 3, norm)))
            strides.append(in_stride / s)
        self.strides = tuple(strides) + (strides[-1] * 2,)

    def forward(self, x: Tensor) -> list[Tensor]:
        """Map (B, C, h, w) -> levels, finest first, plus P6."""
        maps = [stage(x) for stage in self.stages]
        return maps + [F.max_pool2d(maps[-1], 1, stride=2)]


class FPN(nn.Module):
    """The feature pyramid network on several backbone maps (see the module docstring).

    Args:
        in_channels: Channels of each input map, finest first.
        in_strides: Their strides.
        out_channels: Channels of every level.
        norm: LayerNorm after the convolutions.
    """

    def __init__(self, in_channels: Sequence[int], in_strides: Sequence[float], out_channels: int = 256,
                 norm: bool = True) -> None:
        super().__init__()
        self.lateral = nn.ModuleList(conv_norm(c, out_channels, 1, norm) for c in in_channels)
        self.output = nn.ModuleList(conv_norm(out_channels, out_channels, 3, norm) for _ in in_channels)
        self.strides = tuple(float(s) for s in in_strides) + (float(in_strides[-1]) * 2,)

    def forward(self, maps: Sequence[Tensor]) -> list[Tensor]:
        """Maps, finest first -> levels, finest first, plus P6."""
        lat = [conv(m) for conv, m in zip(self.lateral, maps)]
        out = [self.output[-1](lat[-1])]
        top = lat[-1]
        for k in range(len(lat) - 2, -1, -1):
            top = lat[k] + F.interpolate(top, size=lat[k].shape[-2:], mode="nearest")
            out.insert(0, self.output[k](top))
        return out + [F.max_pool2d(out[-1], 1, stride=2)]


class BackbonePyramid(nn.Module):
    """A backbone and its pyramid: images -> ``out_channels`` levels, finest first.

    A backbone whose ``feature_info`` has one stride (plain ViT) gets the
    :class:`SimpleFeaturePyramid` on its last map; a hierarchical one (Swin, PVT) the
    :class:`FPN` on the stages of stride 4 to 32 (at most its last four).

    Args:
        backbone: Any vitlab backbone (the contract's ``feature_info`` and ``forward_intermediates``).
        out_channels: Channels of every level.
        scales: Plain backbones: the simple pyramid's scale factors.
        norm: LayerNorm in the pyramid's convolutions.
    """

    def __init__(self, backbone: nn.Module, out_channels: int = 256, scales: Sequence[float] = (4.0, 2.0, 1.0, 0.5),
                 norm: bool = True) -> None:
        super().__init__()
        self.backbone = backbone
        info = list(backbone.feature_info)
        strides = [int(i["reduction"]) for i in info]
        self.plain = len(set(strides)) == 1
        if self.plain:
            self.indices = [len(info) - 1]
            self.pyramid: nn.Module = SimpleFeaturePyramid(int(info[-1]["num_chs"]), strides[-1], out_channels, scales, norm)
        else:
            # the last map of each distinct stride, at most four
            last = {s: i for i, s in enumerate(strides)}
            self.indices = sorted(last.values())[-4:]
            self.pyramid = FPN([int(info[i]["num_chs"]) for i in self.indices], [strides[i] for i in self.indices],
                               out_channels, norm)
        self.strides: tuple[float, ...] = self.pyramid.strides
        self.out_channels = out_channels

    def forward(self, x: Tensor) -> list[Tensor]:
        maps = self.backbone.forward_intermediates(x, indices=self.indices, intermediates_only=True)
        return self.pyramid(maps[-1]) if self.plain else self.pyramid(maps)

    def level_bounds(self) -> tuple[int, int]:
        """log2 of the finest and coarsest pooled levels' strides (P6 is for proposals only)."""
        return int(round(math.log2(self.strides[0]))), int(round(math.log2(self.strides[-2])))


__all__ = ["BackbonePyramid", "FPN", "LayerNorm2d", "SimpleFeaturePyramid", "conv_norm"]
