"""Semantic-segmentation heads and the :class:`Segmenter` that joins a backbone to one.

Every head takes a list of feature maps ``[(B, C_i, H_i, W_i), ...]`` and returns class
logits ``(B, K, H', W')`` at its own output stride; it is built from the channels and
strides of those maps, so it does not depend on how a backbone returns them.

* :class:`SetrUpHead`: SETR's *naive* (``SetrUpHead.naive``: 1x1 conv-BN-ReLU, then
  bilinear x4) and *PUP* (``SetrUpHead.pup``: four 3x3 conv-BN-ReLU + x2 stages) heads
  (Zheng et al., 2021; mmsegmentation's ``SETRUPHead``), for plain ViTs. With
  ``upsample="attention"`` each upsampling step is :class:`AttentionUpsample` instead.
* :class:`SetrMlaHead`: SETR-MLA, multi-level aggregation of several block outputs.
* :class:`AllMlpHead`: SegFormer's all-MLP decoder (Xie et al., 2021), for pyramids.
* :class:`FpnHead`: semantic FPN (Kirillov et al., 2019), for pyramids.

:class:`Segmenter` runs the backbone once for the indices its main and auxiliary heads
need, and upsamples the main logits to the input size.
"""

from __future__ import annotations

import inspect
import math
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...components import CrossAttention


def conv_bn_relu(in_ch: int, out_ch: int, kernel_size: int = 3) -> nn.Sequential:
    """Convolution (no bias, 'same' padding) -> BatchNorm -> ReLU: mmseg's ``ConvModule``."""
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, kernel_size, padding=kernel_size // 2, bias=False),
        nn.BatchNorm2d(out_ch),
        nn.ReLU(inplace=True),
    )


def _check_features(features: Sequence[Tensor], channels: Sequence[int], head: str) -> None:
    if len(features) != len(channels):
        raise ValueError(f"{head} was built for {len(channels)} feature map(s) but got {len(features)}")
    for i, (f, c) in enumerate(zip(features, channels)):
        if f.ndim != 4 or f.shape[1] != c:
            raise ValueError(
                f"{head}: feature map {i} should be (B, {c}, H, W) but has shape {tuple(f.shape)}"
            )


class AttentionUpsample(nn.Module):
    """Learned upsampling: output-resolution queries cross-attend to the low-resolution tokens.

    Every input pixel has ``scale * scale`` children at the output resolution. A child's query
    is its parent token plus a learned embedding of its sub-pixel position; it attends to the
    parent's ``window x window`` neighbourhood of tokens (each plus a learned embedding of its
    offset from the parent; positions outside the map are masked out). The attention is
    vitlab's one :class:`~vitlab.components.CrossAttention` (so
    :func:`~vitlab.components.capture_attention` records it), followed by a residual with
    the parent token, a LayerNorm and a linear layer. The window keeps the cost linear in the
    number of pixels (``scale^2 * window^2`` weights per input pixel), so the module can sit
    in every stage of a PUP head.

    Args:
        dim: Channels in and out.
        scale: Integer upsampling factor.
        heads: Attention heads.
        window: Odd side of the neighbourhood each child attends to.
    """

    def __init__(self, dim: int, scale: int = 2, heads: int = 4, window: int = 3) -> None:
        super().__init__()
        if scale < 1:
            raise ValueError(f"scale must be >= 1, got {scale}")
        if window < 1 or window % 2 == 0:
            raise ValueError(f"window must be a positive odd number, got {window}")
        self.dim = dim
        self.scale = scale
        self.window = window
        self.subpixel = nn.Parameter(torch.zeros(scale * scale, dim))
        self.offset = nn.Parameter(torch.zeros(window * window, dim))
        nn.init.trunc_normal_(self.subpixel, std=0.02)
        nn.init.trunc_normal_(self.offset, std=0.02)
        self.attn = CrossAttention(dim, heads=heads)
        self.norm = nn.LayerNorm(dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, h, w) -> (B, C, h * scale, w * scale)."""
        b, c, h, w = x.shape
        s, k = self.scale, self.window
        n = h * w
        # neighbourhoods: (B, C * k*k, h*w) -> (B, C, k*k, h*w) -> (B, h*w, k*k, C) -> (B*h*w, k*k, C)
        keys = F.unfold(x, k, padding=k // 2).view(b, c, k * k, n).permute(0, 3, 2, 1).reshape(b * n, k * k, c)
        inside = F.unfold(x.new_ones(1, 1, h, w), k, padding=k // 2)[0].t()  # (1, k*k, h*w) -> (h*w, k*k)
        bias = torch.zeros_like(inside).masked_fill(inside == 0, float("-inf"))
        bias = bias.repeat(b, 1)[:, None, None, :]  # (B*h*w, 1, 1, k*k), batch-major like keys
        parent = x.flatten(2).transpose(1, 2).reshape(b * n, 1, c)  # (B, C, h, w) -> (B*h*w, 1, C)
        queries = parent + self.subpixel  # (B*h*w, s*s, C)
        out = self.attn(queries, keys + self.offset, attn_bias=bias)  # (B*h*w, s*s, C)
        out = self.proj(self.norm(out + parent))
        # (B*h*w, s*s, C) -> (B, h, w, s, s, C) -> (B, C, h, s, w, s) -> (B, C, h*s, w*s)
        out = out.view(b, h, w, s, s, c).permute(0, 5, 1, 3, 2, 4)
        return out.reshape(b, c, h * s, w * s)


def _upsampler(kind: str, channels: int, scale: int, heads: int) -> nn.Module:
    if kind == "bilinear":
        return nn.Upsample(scale_factor=scale, mode="bilinear", align_corners=False)
    if kind == "attention":
        return AttentionUpsample(channels, scale, heads)  # heads must divide channels
    raise ValueError(f"upsample must be 'bilinear' or 'attention', got {kind!r}")


class SetrUpHead(nn.Module):
    """SETR's upsampling head (naive and PUP), as mmsegmentation's ``SETRUPHead``.

    LayerNorm on the input tokens, then ``num_convs`` stages of conv-BN-ReLU followed by a
    x``up_scale`` upsampling, then dropout and a 1x1 classifier.

    Args:
        in_channels: Channels of the one input map.
        in_stride: Stride of the input map (for :attr:`output_stride`).
        num_classes: Output classes.
        channels: Width of the conv stages.
        num_convs: Conv + upsample stages (naive: 1, PUP: 4).
        up_scale: Upsampling factor per stage (naive: 4, PUP: 2).
        kernel_size: Convolution kernel (naive: 1, PUP: 3).
        dropout: Dropout before the classifier.
        upsample: ``"bilinear"`` (the paper) or ``"attention"`` (:class:`AttentionUpsample`).
        attn_heads: Heads of the attention upsampling.
    """

    def __init__(
        self,
        in_channels: int,
        in_stride: int,
        num_classes: int,
        channels: int = 256,
        num_convs: int = 1,
        up_scale: int = 4,
        kernel_size: int = 1,
        dropout: float = 0.1,
        upsample: str = "bilinear",
        attn_heads: int = 4,
    ) -> None:
        super().__init__()
        self.in_channels = [in_channels]
        self.norm = nn.LayerNorm(in_channels, eps=1e-6)
        stages = []
        for i in range(num_convs):
            stages.append(conv_bn_relu(in_channels if i == 0 else channels, channels, kernel_size))
            stages.append(_upsampler(upsample, channels, up_scale, attn_heads))
        self.stages = nn.Sequential(*stages)
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(channels, num_classes, 1)
        self.output_stride = in_stride / up_scale**num_convs

    @classmethod
    def naive(cls, in_channels: int, in_stride: int, num_classes: int, channels: int = 256, **kw: Any) -> "SetrUpHead":
        """SETR-Naive: 1x1 conv-BN-ReLU, x4 bilinear, 1x1 classifier (``kw``: ``dropout``, ``upsample``, ``attn_heads``)."""
        return cls(in_channels, in_stride, num_classes, channels, num_convs=1, up_scale=4, kernel_size=1, **kw)

    @classmethod
    def pup(cls, in_channels: int, in_stride: int, num_classes: int, channels: int = 256, **kw: Any) -> "SetrUpHead":
        """SETR-PUP: four (3x3 conv-BN-ReLU, x2 upsampling) stages, 1x1 classifier (``kw`` as :meth:`naive`)."""
        return cls(in_channels, in_stride, num_classes, channels, num_convs=4, up_scale=2, kernel_size=3, **kw)

    def forward(self, features: Sequence[Tensor]) -> Tensor:
        """``[(B, C, h, w)]`` -> logits (B, K, h * up^n, w * up^n)."""
        _check_features(features, self.in_channels, type(self).__name__)
        x = features[0]
        x = self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)  # LayerNorm over C: (B, C, h, w) <-> (B, h, w, C)
        return self.classifier(self.dropout(self.stages(x)))


class SetrMlaHead(nn.Module):
    """SETR-MLA: multi-level feature aggregation over several block outputs.

    Neck (mmseg ``MLANeck``): per input a LayerNorm and a 1x1 conv to ``mla_channels``;
    top-down aggregation (each level adds the sum of the deeper ones); a 3x3 conv per
    level. Head (``SETRMLAHead``): per level two 3x3 conv-BN-ReLU and a x``up_scale``
    bilinear upsampling; the levels are concatenated and classified by a 1x1 conv.

    Args:
        in_channels: Channels of each input map (all at one stride).
        in_stride: Their common stride.
        num_classes: Output classes.
        mla_channels: Width of the aggregation.
        channels: Width of each level's head.
        up_scale: Upsampling factor of each level.
        dropout: Dropout before the classifier.
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        in_stride: int,
        num_classes: int,
        mla_channels: int = 128,
        channels: int = 64,
        up_scale: int = 4,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.in_channels = list(in_channels)
        self.norms = nn.ModuleList(nn.LayerNorm(c, eps=1e-6) for c in in_channels)
        self.lateral = nn.ModuleList(conv_bn_relu(c, mla_channels, 1) for c in in_channels)
        self.smooth = nn.ModuleList(conv_bn_relu(mla_channels, mla_channels, 3) for _ in in_channels)
        self.level_heads = nn.ModuleList(
            nn.Sequential(conv_bn_relu(mla_channels, channels, 3), conv_bn_relu(channels, channels, 3),
                          nn.Upsample(scale_factor=up_scale, mode="bilinear", align_corners=False))
            for _ in in_channels
        )
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(channels * len(self.in_channels), num_classes, 1)
        self.output_stride = in_stride / up_scale

    def forward(self, features: Sequence[Tensor]) -> Tensor:
        """``[(B, C_i, h, w)] * L`` -> logits (B, K, h * up, w * up)."""
        _check_features(features, self.in_channels, type(self).__name__)
        lat = [
            conv(norm(f.permute(0, 2, 3, 1)).permute(0, 3, 1, 2))  # LayerNorm over C: (B, C, h, w) <-> (B, h, w, C)
            for f, norm, conv in zip(features, self.norms, self.lateral)
        ]
        agg = [lat[-1]]
        for x in reversed(lat[:-1]):  # top-down: deepest level first
            agg.insert(0, x + agg[0])
        outs = [head(smooth(x)) for x, smooth, head in zip(agg, self.smooth, self.level_heads)]
        return self.classifier(self.dropout(torch.cat(outs, dim=1)))


class AllMlpHead(nn.Module):
    """SegFormer's all-MLP decoder over pyramid stages.

    Each stage map goes through a linear layer to ``decoder_dim`` (``linear_c.i.proj``), is
    bilinearly resized to the first map's size, the maps are concatenated deepest first,
    fused by a 1x1 conv without bias (``linear_fuse``), BatchNorm (``batch_norm``), ReLU,
    dropout and a 1x1 classifier (``classifier``). Key names follow Hugging Face's decode
    head so converted checkpoints map one to one.

    Args:
        in_channels: Channels of each stage map.
        in_strides: Strides of each stage map (the first is the output stride).
        num_classes: Output classes.
        decoder_dim: Common width.
        dropout: Dropout before the classifier.
    """

    def __init__(self, in_channels: Sequence[int], in_strides: Sequence[int], num_classes: int,
                 decoder_dim: int = 256, dropout: float = 0.1) -> None:
        super().__init__()
        self.in_channels = list(in_channels)
        self.linear_c = nn.ModuleList(_Proj(c, decoder_dim) for c in in_channels)
        self.linear_fuse = nn.Conv2d(decoder_dim * len(self.in_channels), decoder_dim, 1, bias=False)
        self.batch_norm = nn.BatchNorm2d(decoder_dim)
        self.act = nn.ReLU()
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Conv2d(decoder_dim, num_classes, 1)
        self.output_stride = in_strides[0]

    def forward(self, features: Sequence[Tensor]) -> Tensor:
        """``[(B, C_i, H_i, W_i)]`` -> logits (B, K, H_0, W_0)."""
        _check_features(features, self.in_channels, type(self).__name__)
        size = features[0].shape[-2:]
        outs = []
        for f, lin in zip(features, self.linear_c):
            b, _, h, w = f.shape
            y = lin.proj(f.flatten(2).transpose(1, 2))  # (B, C, h, w) -> (B, h*w, C) -> (B, h*w, D)
            y = y.transpose(1, 2).reshape(b, -1, h, w)  # (B, h*w, D) -> (B, D, h, w)
            outs.append(F.interpolate(y, size=size, mode="bilinear", align_corners=False))
        x = self.act(self.batch_norm(self.linear_fuse(torch.cat(outs[::-1], dim=1))))
        return self.classifier(self.dropout(x))


class _Proj(nn.Module):
    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(in_dim, out_dim)


class FpnHead(nn.Module):
    """Semantic FPN (Panoptic FPN's semantic branch) over pyramid stages.

    FPN neck: 1x1 lateral convs, top-down addition (nearest upsampling to the finer size),
    3x3 output convs. Semantic branch: each level is brought to the finest stride by
    ``log2(stride / finest)`` stages of 3x3 conv-GroupNorm-ReLU + x2 bilinear upsampling
    (one conv without upsampling for the finest level), the levels are summed and a 1x1
    conv classifies.

    Args:
        in_channels: Channels of each stage map (finest first).
        in_strides: Strides of each stage map; powers of two apart.
        num_classes: Output classes.
        fpn_dim: Width of the FPN.
        channels: Width of the semantic branch.
        groups: GroupNorm groups (reduced to their gcd with ``channels``).
        dropout: Dropout before the classifier.
    """

    def __init__(self, in_channels: Sequence[int], in_strides: Sequence[int], num_classes: int,
                 fpn_dim: int = 256, channels: int = 128, groups: int = 32, dropout: float = 0.1) -> None:
        super().__init__()
        self.in_channels = list(in_channels)
        base = in_strides[0]
        self.lateral = nn.ModuleList(nn.Conv2d(c, fpn_dim, 1) for c in in_channels)
        self.output = nn.ModuleList(nn.Conv2d(fpn_dim, fpn_dim, 3, padding=1) for _ in in_channels)
        groups = math.gcd(groups, channels)
        self.scale_heads = nn.ModuleList()
        for s in in_strides:
            n_up = int(round(math.log2(s / base)))
            if 2**n_up * base != s:
                raise ValueError(f"FpnHead needs strides that are powers of two apart, got {list(in_strides)}")
            layers: list[nn.Module] = []
            for k in range(max(n_up, 1)):
                layers += [nn.Conv2d(fpn_dim if k == 0 else channels, channels, 3, padding=1, bias=False),
                           nn.GroupNorm(groups, channels), nn.ReLU(inplace=True)]
                if n_up:
                    layers.append(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False))
            self.scale_heads.append(nn.Sequential(*layers))
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(channels, num_classes, 1)
        self.output_stride = base

    def forward(self, features: Sequence[Tensor]) -> Tensor:
        """``[(B, C_i, H_i, W_i)]`` -> logits (B, K, H_0, W_0)."""
        _check_features(features, self.in_channels, type(self).__name__)
        lat = [conv(f) for f, conv in zip(features, self.lateral)]
        for i in range(len(lat) - 2, -1, -1):
            lat[i] = lat[i] + F.interpolate(lat[i + 1], size=lat[i].shape[-2:], mode="nearest")
        size = lat[0].shape[-2:]
        out = 0
        for x, conv, head in zip(lat, self.output, self.scale_heads):
            y = head(conv(x))
            # odd sizes: x2 steps can overshoot the finest map by a pixel; align to it
            out = out + (y if y.shape[-2:] == size else F.interpolate(y, size=size, mode="bilinear", align_corners=False))
        return self.classifier(self.dropout(out))


def backbone_intermediates(backbone: nn.Module, x: Tensor, indices: Sequence[int]) -> list[Tensor]:
    """The backbone's maps (B, C_i, H_i, W_i) at ``indices`` through ``forward_intermediates``.

    Passes ``output_fmt="NCHW", intermediates_only=True`` where the backbone's signature
    accepts them, and takes the intermediates when it returns ``(final, intermediates)``.
    """
    fn = getattr(backbone, "forward_intermediates", None)
    if fn is None:
        raise TypeError(f"{type(backbone).__name__} has no forward_intermediates; it cannot serve as a segmentation backbone")
    params = inspect.signature(fn).parameters
    kwargs = {}
    if "output_fmt" in params:
        kwargs["output_fmt"] = "NCHW"
    if "intermediates_only" in params:
        kwargs["intermediates_only"] = True
    out = fn(x, indices=list(indices), **kwargs)
    if isinstance(out, tuple):
        out = out[-1]
    return list(out)


def feature_channels_strides(backbone: nn.Module, indices: Sequence[int]) -> tuple[list[int], list[int]]:
    """Channels and strides of the backbone's returnable maps at ``indices`` (from ``feature_info``)."""
    info = backbone.feature_info
    n = len(info)
    idx = [i + n if i < 0 else i for i in indices]
    for i, j in zip(indices, idx):
        if not 0 <= j < n:
            raise ValueError(f"feature index {i} is out of range for a backbone with {n} returnable maps")
    return [info[j]["num_chs"] for j in idx], [info[j]["reduction"] for j in idx]


class Segmenter(nn.Module):
    """A backbone, a decode head and optional auxiliary heads; logits at the input size.

    Args:
        backbone: Any vitlab backbone (it must implement ``forward_intermediates``).
        head: A head taking the maps at ``indices``.
        indices: Backbone indices for the head (negative: from the end).
        aux_heads: Auxiliary heads, each reading the maps at its own indices.
        aux_indices: One index list per auxiliary head.
        aux_weights: Loss weight of each auxiliary head.

    In training mode :meth:`forward_with_aux` also returns each auxiliary head's logits (at
    the input size); in eval mode the auxiliary heads are not run at all.
    """

    def __init__(
        self,
        backbone: nn.Module,
        head: nn.Module,
        indices: Sequence[int],
        aux_heads: Sequence[nn.Module] = (),
        aux_indices: Sequence[Sequence[int]] = (),
        aux_weights: Sequence[float] = (),
    ) -> None:
        super().__init__()
        if not (len(aux_heads) == len(aux_indices) == len(aux_weights)):
            raise ValueError(
                f"give one index list and one weight per auxiliary head: got {len(aux_heads)} heads, "
                f"{len(aux_indices)} index lists and {len(aux_weights)} weights"
            )
        self.backbone = backbone
        self.head = head
        n = len(backbone.feature_info)
        norm = lambda ids: [i + n if i < 0 else i for i in ids]  # noqa: E731
        self.indices = norm(indices)
        self.aux_heads = nn.ModuleList(aux_heads)
        self.aux_indices = [norm(ids) for ids in aux_indices]
        self.aux_weights = [float(w) for w in aux_weights]

    def _features(self, x: Tensor, with_aux: bool) -> tuple[list[Tensor], list[list[Tensor]]]:
        need = set(self.indices)
        if with_aux:
            for ids in self.aux_indices:
                need |= set(ids)
        order = sorted(need)
        maps = dict(zip(order, backbone_intermediates(self.backbone, x, order)))
        aux = [[maps[i] for i in ids] for ids in self.aux_indices] if with_aux else []
        return [maps[i] for i in self.indices], aux

    def forward_with_aux(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        """Images (B, C, H, W) -> (logits (B, K, H, W), auxiliary logits, empty in eval mode)."""
        with_aux = self.training and len(self.aux_heads) > 0
        main, aux = self._features(x, with_aux)
        size = x.shape[-2:]
        up = lambda y: F.interpolate(y, size=size, mode="bilinear", align_corners=False)  # noqa: E731
        aux_logits = [up(h(f)) for h, f in zip(self.aux_heads, aux)] if with_aux else []
        return up(self.head(main)), aux_logits

    def forward(self, x: Tensor) -> Tensor:
        """Images (B, C, H, W) -> logits (B, K, H, W); auxiliary heads are never run here."""
        main, _ = self._features(x, with_aux=False)
        return F.interpolate(self.head(main), size=x.shape[-2:], mode="bilinear", align_corners=False)
