"""ResNet v2 CNN stems of the hybrid Vision Transformers (Dosovitskiy et al., 2021, section 3.1).

The hybrid ViTs (R50+ViT-B/16, R26+ViT-S/32, R+ViT-Ti/16 ...) feed the feature map of a
ResNet to the patch embedding. Their ResNet is BiT's (Kolesnikov et al., 2020) as the
official JAX code builds it for the hybrids: every convolution weight-standardised
(:class:`StdConv2dSame`), GroupNorm (32 groups) instead of BatchNorm, TensorFlow "SAME"
padding everywhere (:func:`pad_same`), a 7x7 stride-2 stem convolution, a 3x3 stride-2 max
pool, then stages of *non*-pre-activation bottlenecks (conv -> norm -> ReLU, the residual sum
before the last ReLU), the first stage at stride 1 and every later one at stride 2.

Module names follow timm (``stem.conv``, ``stem.norm``, ``stages.S.blocks.B.conv1`` ...,
``downsample.conv``), so a timm hybrid checkpoint's ``patch_embed.backbone.*`` keys load as
they are. A stem-only CNN (``layers=()``, R+ViT-Ti) is the stem :class:`~torch.nn.Sequential`
itself, as in timm (``backbone.conv``, ``backbone.norm``).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..components import to_2tuple


def same_padding(size: int, kernel: int, stride: int, dilation: int = 1) -> int:
    """Total TensorFlow "SAME" padding along one axis: the output has ``ceil(size / stride)`` positions."""
    return max((math.ceil(size / stride) - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)


def pad_same(x: Tensor, kernel: tuple[int, int], stride: tuple[int, int], dilation: tuple[int, int] = (1, 1),
             value: float = 0.0) -> Tensor:
    """Pad (B, C, H, W) for a "SAME" convolution / pool: half the padding before, the rest (one more) after."""
    ph = same_padding(x.shape[-2], kernel[0], stride[0], dilation[0])
    pw = same_padding(x.shape[-1], kernel[1], stride[1], dilation[1])
    if ph == 0 and pw == 0:
        return x
    return F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2), value=value)


def make_divisible(value: float, divisor: int = 8) -> int:
    """The nearest multiple of ``divisor`` to ``value`` (at least ``divisor``, never 10% below ``value``)."""
    out = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return out + divisor if out < 0.9 * value else out


def bottleneck_width(width: int) -> int:
    """Width of a bottleneck's 1x1 / 3x3 convolutions: a quarter of its output, rounded to a multiple of 8."""
    return make_divisible(width * 0.25)


class StdConv2dSame(nn.Conv2d):
    """Convolution with weight standardisation (Qiao et al., 2019) and TensorFlow "SAME" padding.

    Each output filter is normalised to zero mean and unit variance (biased, over its input
    channels and kernel positions, with ``eps``) before the convolution. The padding is
    computed from the input size on every call (:func:`pad_same`) unless it is symmetric
    (stride 1, odd kernel), where the convolution's own padding does it.

    Args:
        in_channels: Input channels.
        out_channels: Output channels.
        kernel_size: Kernel side.
        stride: Stride.
        bias: Learned bias (the hybrids have none).
        eps: Added to the filter variance (1e-8 in the hybrids).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, bias: bool = False,
                 eps: float = 1e-8) -> None:
        self.dynamic_pad = stride != 1 or kernel_size % 2 == 0
        padding = 0 if self.dynamic_pad else (kernel_size - 1) // 2
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=bias)
        self.eps = eps

    def standardized_weight(self) -> Tensor:
        """The weight with every output filter at zero mean and unit (biased) variance."""
        w = self.weight
        var, mean = torch.var_mean(w, dim=(1, 2, 3), correction=0, keepdim=True)
        return (w - mean) / torch.sqrt(var + self.eps)

    def forward(self, x: Tensor) -> Tensor:
        if self.dynamic_pad:
            x = pad_same(x, self.kernel_size, self.stride, self.dilation)
        return F.conv2d(x, self.standardized_weight(), self.bias, self.stride, self.padding, self.dilation, self.groups)


class MaxPool2dSame(nn.Module):
    """Max pooling with TensorFlow "SAME" padding (padded with -inf, so padding never wins)."""

    def __init__(self, kernel_size: int = 3, stride: int = 2) -> None:
        super().__init__()
        self.kernel_size = to_2tuple(kernel_size)
        self.stride = to_2tuple(stride)

    def forward(self, x: Tensor) -> Tensor:
        x = pad_same(x, self.kernel_size, self.stride, value=-math.inf)
        return F.max_pool2d(x, self.kernel_size, self.stride)


class GroupNormAct(nn.GroupNorm):
    """GroupNorm, then ReLU unless ``act=False`` (timm's ``GroupNormAct``; its parameters are GroupNorm's).

    Args:
        channels: Channels normalised.
        groups: Channel groups (``channels`` must be divisible by it).
        act: Apply ReLU after the norm.
        eps: GroupNorm epsilon.
    """

    def __init__(self, channels: int, groups: int = 32, act: bool = True, eps: float = 1e-5) -> None:
        super().__init__(groups, channels, eps=eps)
        self.act = nn.ReLU(inplace=True) if act else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.act(super().forward(x))


def resnetv2_stem(in_channels: int, width: int = 64, groups: int = 32) -> nn.Sequential:
    """The stem: 7x7 stride-2 weight-standardised convolution, GroupNorm + ReLU, 3x3 stride-2 max pool ("SAME").

    (B, C, H, W) -> (B, width, ceil(H / 4), ceil(W / 4)).
    """
    return nn.Sequential(OrderedDict(
        conv=StdConv2dSame(in_channels, width, 7, stride=2),
        norm=GroupNormAct(width, groups),
        pool=MaxPool2dSame(3, 2),
    ))


class DownsampleConv(nn.Module):
    """The projection shortcut of a stage's first block: 1x1 (strided) convolution and GroupNorm without ReLU."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, groups: int) -> None:
        super().__init__()
        self.conv = StdConv2dSame(in_channels, out_channels, 1, stride=stride)
        self.norm = GroupNormAct(out_channels, groups, act=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.conv(x))


class Bottleneck(nn.Module):
    """Non-pre-activation bottleneck: 1x1, 3x3 (strided), 1x1 convolutions, each followed by
    GroupNorm (+ ReLU but the last); ``relu(shortcut + branch)``.

    Args:
        in_channels: Input channels.
        out_channels: Output channels (the inner width is :func:`bottleneck_width` of it).
        stride: Stride of the 3x3 convolution (and of the shortcut).
        groups: GroupNorm groups.
        downsample: Give the block a projection shortcut (a stage's first block always has one).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, groups: int = 32,
                 downsample: bool = False) -> None:
        super().__init__()
        mid = bottleneck_width(out_channels)
        self.downsample = DownsampleConv(in_channels, out_channels, stride, groups) if downsample else None
        self.conv1 = StdConv2dSame(in_channels, mid, 1)
        self.norm1 = GroupNormAct(mid, groups)
        self.conv2 = StdConv2dSame(mid, mid, 3, stride=stride)
        self.norm2 = GroupNormAct(mid, groups)
        self.conv3 = StdConv2dSame(mid, out_channels, 1)
        self.norm3 = GroupNormAct(out_channels, groups, act=False)
        self.act3 = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        x = self.norm1(self.conv1(x))
        x = self.norm2(self.conv2(x))
        x = self.norm3(self.conv3(x))
        return self.act3(x + shortcut)


class ResNetStage(nn.Module):
    """``depth`` bottlenecks; the first one strides and projects the shortcut."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, depth: int, groups: int) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*(
            Bottleneck(in_channels if i == 0 else out_channels, out_channels, stride if i == 0 else 1, groups,
                       downsample=i == 0)
            for i in range(depth)
        ))

    def forward(self, x: Tensor) -> Tensor:
        return self.blocks(x)


class ResNetV2(nn.Module):
    """The hybrids' ResNet: :func:`resnetv2_stem`, then one :class:`ResNetStage` per entry of ``layers``.

    Args:
        layers: Bottlenecks per stage (R50: (3, 4, 9); R26: (2, 2, 2, 2)); at least one stage.
        widths: Output channels per stage (the first ``len(layers)`` are used).
        in_channels: Image channels.
        stem_width: Stem channels.
        groups: GroupNorm groups.

    Attributes:
        num_features: Channels of the last stage's map.
        stride: Input pixels per position of that map (4, then x2 per stage after the first).

    Forward: (B, C, H, W) -> (B, num_features, ceil(H / stride), ceil(W / stride)).
    """

    def __init__(self, layers: Sequence[int], widths: Sequence[int] = (256, 512, 1024, 2048), in_channels: int = 3,
                 stem_width: int = 64, groups: int = 32) -> None:
        super().__init__()
        if not layers or len(widths) < len(layers):
            raise ValueError(f"ResNetV2 needs at least one stage and a width per stage, got layers {tuple(layers)} "
                             f"and widths {tuple(widths)}")
        self.stem = resnetv2_stem(in_channels, stem_width, groups)
        self.stages = nn.Sequential()
        prev, self.stride = stem_width, 4
        for s, (depth, width) in enumerate(zip(layers, widths)):
            stride = 1 if s == 0 else 2
            self.stages.add_module(str(s), ResNetStage(prev, width, stride, depth, groups))
            prev, self.stride = width, self.stride * stride
        self.num_features = prev
        init_cnn(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.stages(self.stem(x))


def init_cnn(module: nn.Module) -> None:
    """timm's ResNetV2 init: convolutions Kaiming-normal (fan out, ReLU), zero biases; norms weight 1, bias 0."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.GroupNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def resnetv2_backbone(layers: Sequence[int], widths: Sequence[int] = (256, 512, 1024, 2048), in_channels: int = 3,
                      stem_width: int = 64, groups: int = 32) -> tuple[nn.Module, int, int]:
    """A hybrid's CNN as timm builds it: a :class:`ResNetV2`, or with ``layers=()`` the stem alone.

    Returns:
        ``(module, channels, stride)``: the CNN, the channels of its output map and the input
        pixels per output position.
    """
    if not layers:
        stem = resnetv2_stem(in_channels, stem_width, groups)
        init_cnn(stem)
        return stem, stem_width, 4
    net = ResNetV2(layers, widths, in_channels, stem_width, groups)
    return net, net.num_features, net.stride


__all__ = ["Bottleneck", "DownsampleConv", "GroupNormAct", "MaxPool2dSame", "ResNetStage", "ResNetV2",
           "StdConv2dSame", "bottleneck_width", "make_divisible", "pad_same", "resnetv2_backbone", "resnetv2_stem"]
