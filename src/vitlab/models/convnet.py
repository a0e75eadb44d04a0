"""A small convolutional network, registered as a CNN teacher for DeiT distillation.

DeiT's point is that a convolutional teacher hands its inductive bias to the transformer
student through the distillation token. This is a plain VGG/ResNet-style stack: a stem
convolution, then stages of [3x3 conv, BatchNorm, ReLU] blocks with a residual connection,
each later stage halving the resolution, global average pooling and a linear head.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..components import FeatureLayout, TokenGrid, TokenLayout, square_cell, to_2tuple
from .base import Backbone, GroupMatcher, IntermediateResult, check_config, classifier_head, pretrained_cfg
from .registry import register_family


@dataclass(frozen=True)
class ConvNetConfig:
    """Configuration of :class:`ConvNet`.

    Attributes:
        image_size: Default input size (any size works).
        in_channels: Image channels.
        num_classes: Classifier outputs (0: none).
        widths: Channels per stage.
        depths: Residual blocks per stage.
        dropout: Dropout before the head.
    """

    image_size: int | tuple[int, int] = 224
    in_channels: int = 3
    num_classes: int = 1000
    widths: tuple[int, ...] = (64, 128, 256, 512)
    depths: tuple[int, ...] = (1, 1, 2, 1)
    dropout: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "image_size", to_2tuple(self.image_size))
        object.__setattr__(self, "widths", tuple(self.widths))
        object.__setattr__(self, "depths", tuple(self.depths))
        check_config(self, positive=("widths", "depths", "in_channels", "image_size"), rates=("dropout",), checks=[
            (len(self.widths) == len(self.depths) > 0,
             f"widths {self.widths} and depths {self.depths} must be non-empty and of equal length"),
        ])


def conv_bn(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    """3x3 convolution (no bias) + BatchNorm."""
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout))


class ResidualBlock(nn.Module):
    """``relu(x + bn(conv(relu(bn(conv(x))))))``; the first block of a stage may downsample."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = conv_bn(cin, cout, stride)
        self.conv2 = conv_bn(cout, cout)
        self.act = nn.ReLU(inplace=True)
        self.shortcut = nn.Identity() if stride == 1 and cin == cout else nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.shortcut(x) + self.conv2(self.act(self.conv1(x))))


class ConvNet(Backbone):
    """A residual CNN with the vitlab backbone contract (a teacher for distillation)."""

    family = "convnet"
    config_class = ConvNetConfig

    def __init__(self, config: ConvNetConfig | None = None) -> None:
        super().__init__()
        self.config = c = config or ConvNetConfig()
        self.stem = nn.Sequential(conv_bn(c.in_channels, c.widths[0]), nn.ReLU(inplace=True))
        blocks, info, cin, reduction = [], [], c.widths[0], 1
        for s, (w, d) in enumerate(zip(c.widths, c.depths)):
            stride = 1 if s == 0 else 2
            reduction *= stride
            for j in range(d):
                blocks.append(ResidualBlock(cin, w, stride if j == 0 else 1))
                cin = w
            info.append(dict(num_chs=w, reduction=reduction, module=f"blocks.{len(blocks) - 1}"))
        self.blocks = nn.ModuleList(blocks)
        self.stage_ends = [sum(c.depths[: s + 1]) - 1 for s in range(len(c.depths))]
        self.feature_info = info
        self.num_features = cin
        self.head_drop = nn.Dropout(c.dropout)
        self.head = nn.Linear(cin, c.num_classes) if c.num_classes > 0 else nn.Identity()  # PyTorch's default init
        self.pretrained_cfg = pretrained_cfg(input_size=c.image_size[0])

    def _check(self, x: Tensor) -> None:
        if x.ndim != 4 or x.shape[1] != self.config.in_channels:
            raise ValueError(f"expected images (B, {self.config.in_channels}, H, W), got shape {tuple(x.shape)}")

    def forward_features(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """Images -> the last stage's map (B, C, H / 2^(stages-1), W / 2^(stages-1))."""
        self.reject_mask(mask)
        self._check(x)
        x = self.stem(x)
        for blk in self.blocks:
            x = self.run_checkpointed(blk, x)
        return x

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """Map (B, C, H, W) -> global average -> dropout -> logits (or the pooled features)."""
        x = self.head_drop(x.mean(dim=(2, 3)))  # (B, C, H, W) -> (B, C)
        return x if pre_logits else self.head(x)

    def collect_intermediates(self, x: Tensor, take: list[int], norm: bool, stop_early: bool) -> IntermediateResult:
        """Stage output maps (B, C, H, W), one per selected stage, and the final map (there is no norm)."""
        self._check(x)
        x = self.stem(x)
        maps, ends = [], {self.stage_ends[s] for s in take}
        last = self.stage_ends[take[-1]] if stop_early else len(self.blocks) - 1
        for i in range(last + 1):
            x = self.run_checkpointed(self.blocks[i], x)
            if i in ends:
                maps.append(x)  # the map the next block reads: on the forward path as it is
        return None if stop_early else x, maps

    def group_matcher(self) -> GroupMatcher:
        """Stem: the stem convolution; one group per residual block."""
        return dict(stem=r"^stem", blocks=[(r"^blocks\.(\d+)", None)])

    def token_layout(self, image_size: tuple[int, int]) -> TokenLayout:
        """No attention; feature maps at the end of every stage (3x3 convolutions, padding 1)."""
        h, w = image_size
        features = []
        for s, end in enumerate(self.stage_ends):
            r = self.feature_info[s]["reduction"]
            features.append(FeatureLayout(f"stage {s + 1}", TokenGrid((-(-h // r), -(-w // r)), square_cell(r)),
                                          f"blocks.{end}", prefix=None))
        return TokenLayout((), tuple(features), readout=())

    @classmethod
    def tiny_overrides(cls, config: ConvNetConfig) -> dict:
        n = len(config.widths)
        return dict(widths=tuple(8 * (i + 1) for i in range(n)), depths=(1,) * n, image_size=2 ** n * 4)


register_family(
    "convnet",
    ConvNet,
    ConvNetConfig,
    {
        # 6,591,784 parameters with 1000 classes (counted by hand in tests/test_registry_models.py).
        "cnn_small": (dict(widths=(64, 128, 256, 512), depths=(1, 1, 2, 1)), pretrained_cfg()),
    },
)
