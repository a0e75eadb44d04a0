"""A segmentation model that rebuilds from its checkpoint: backbone + head chosen by name.

:class:`SegmentationModel` is a :class:`~vitlab.tasks.segmentation.heads.Segmenter` with a
typed :class:`SegmenterConfig` (so the engine's checkpoints record it and
:func:`load_segmenter` rebuilds the same architecture). Heads by name:

* ``setr_naive``: :meth:`SetrUpHead.naive` on the last block (x ``stride`` in one step);
* ``setr_pup``: SETR-PUP, ``log2(stride)`` stages of 3x3 conv-BN-ReLU + x2 upsampling;
* ``setr_mla``: :class:`SetrMlaHead` on four evenly spaced blocks;
* ``mlp``: SegFormer's :class:`AllMlpHead` over every pyramid stage;
* ``fpn``: :class:`FpnHead` over every pyramid stage.

``upsample="attention"`` replaces the naive/PUP heads' bilinear upsampling with
:class:`AttentionUpsample`; for ``mlp`` / ``fpn`` / ``setr_mla`` it adds an attention
upsampler from the head's output stride to full resolution (bilinear keeps the usual
resize). Auxiliary heads (SETR's, on intermediate blocks or stages) are naive heads, run
in training only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from ...config import config_to_dict
from ...errors import CheckpointError
from .heads import AllMlpHead, AttentionUpsample, FpnHead, Segmenter, SetrMlaHead, SetrUpHead, feature_channels_strides

HEADS: tuple[str, ...] = ("setr_naive", "setr_pup", "setr_mla", "mlp", "fpn")
UPSAMPLES: tuple[str, ...] = ("bilinear", "attention")
FAMILY = "segmenter"


@dataclass
class HeadOptions:
    """The head options a segmentation run chooses and its checkpoint records (see
    :class:`SegmenterConfig` for each one); the run's config section extends them."""

    head: str = "setr_naive"
    upsample: str = "bilinear"
    channels: int = 64
    indices: list[int] = field(default_factory=list)
    aux_indices: list[int] = field(default_factory=list)
    aux_weights: list[float] = field(default_factory=list)
    attn_heads: int = 4
    dropout: float = 0.1


@dataclass(kw_only=True)
class SegmenterConfig(HeadOptions):
    """What a :class:`SegmentationModel` is built from (saved in its checkpoints).

    Attributes:
        backbone: Registered backbone name (``vitlab models``).
        backbone_config: The backbone's full config as a dict (``num_classes`` 0).
        head: One of :data:`HEADS`.
        num_classes: Output classes (background included).
        upsample: ``bilinear`` or ``attention``.
        channels: Width of the head.
        indices: Backbone maps the head reads (empty: the head's default).
        aux_indices: One naive auxiliary head per backbone map index.
        aux_weights: Loss weight of each auxiliary head.
        attn_heads: Heads of the attention upsampling.
        dropout: Dropout before the classifiers.
        in_channels: Image channels.
        image_size: Training size (H, W).
    """

    backbone: str
    backbone_config: dict[str, Any]
    num_classes: int = 11
    in_channels: int = 3
    image_size: tuple[int, int] = (64, 64)


def default_indices(head: str, num_maps: int) -> list[int]:
    """The backbone maps a head reads by default: the last (naive, PUP), four evenly spaced
    blocks ending with the last (MLA), every stage (pyramid heads)."""
    if head in ("setr_naive", "setr_pup"):
        return [num_maps - 1]
    if head == "setr_mla":
        n = min(4, num_maps)
        return sorted({round((i + 1) * num_maps / n) - 1 for i in range(n)})
    return list(range(num_maps))


def _log2(stride: float, what: str) -> int:
    n = int(round(math.log2(stride))) if stride >= 1 else -1
    if n < 0 or 2**n != stride:
        raise ValueError(f"{what} needs a backbone stride that is a power of two, got {stride}")
    return n


class _FullResolution(nn.Module):
    """A head followed by an :class:`AttentionUpsample` from its output stride to stride 1.

    The head's logits are projected to ``channels`` features by a 1x1 conv before the
    upsampling and classified again after it.
    """

    def __init__(self, head: nn.Module, num_classes: int, channels: int, stride: int, attn_heads: int) -> None:
        super().__init__()
        self.head = head
        self.expand = nn.Conv2d(num_classes, channels, 1)
        self.up = AttentionUpsample(channels, scale=stride, heads=attn_heads) if stride > 1 else nn.Identity()
        self.classifier = nn.Conv2d(channels, num_classes, 1)
        self.output_stride = 1

    def forward(self, features: Sequence[Tensor]) -> Tensor:
        """``[(B, C_i, H_i, W_i)]`` -> logits (B, K, H_0 * stride, W_0 * stride)."""
        return self.classifier(self.up(self.expand(self.head(features))))


def build_head(config: SegmenterConfig, backbone: nn.Module) -> tuple[nn.Module, list[int]]:
    """The decode head of ``config`` for ``backbone`` and the map indices it reads.

    Raises:
        ValueError: An unknown head or upsampling, or a head that does not fit the backbone.
    """
    if config.head not in HEADS:
        raise ValueError(f"unknown segmentation head {config.head!r}; choose one of {', '.join(HEADS)}")
    if config.upsample not in UPSAMPLES:
        raise ValueError(f"unknown upsampling {config.upsample!r}; choose one of {', '.join(UPSAMPLES)}")
    n = len(backbone.feature_info)
    indices = list(config.indices) or default_indices(config.head, n)
    chans, strides = feature_channels_strides(backbone, indices)
    k, c, attn = config.num_classes, config.channels, config.upsample == "attention"
    if config.head in ("setr_naive", "setr_pup"):
        if len(indices) != 1:
            raise ValueError(f"{config.head} reads one backbone map, got indices {indices}")
        steps = _log2(strides[0], config.head)
        if config.head == "setr_naive":
            head: nn.Module = SetrUpHead(chans[0], strides[0], k, c, num_convs=1, up_scale=strides[0], kernel_size=1,
                                         dropout=config.dropout, upsample=config.upsample, attn_heads=config.attn_heads)
        else:
            head = SetrUpHead(chans[0], strides[0], k, c, num_convs=max(steps, 1), up_scale=2 if steps else 1,
                              kernel_size=3, dropout=config.dropout, upsample=config.upsample,
                              attn_heads=config.attn_heads)
        return head, indices
    if config.head == "setr_mla":
        if len(set(strides)) != 1:
            raise ValueError(f"setr_mla needs maps of one stride (a plain ViT), got strides {strides}; "
                             "use the mlp or fpn head on a pyramid backbone")
        _log2(strides[0], "setr_mla")
        # bilinear: each level upsampled by the stride inside the head (the paper's x4 at stride 16
        # leaves a last x4 to the Segmenter); attention: the levels stay at the stride, one
        # attention upsampler follows.
        head = SetrMlaHead(chans, strides[0], k, mla_channels=c, channels=max(c // 2, 1),
                           up_scale=1 if attn else int(strides[0]), dropout=config.dropout)
        stride = strides[0]
    elif config.head == "mlp":
        head = AllMlpHead(chans, strides, k, decoder_dim=c, dropout=config.dropout)
        stride = strides[0]
    else:
        head = FpnHead(chans, strides, k, fpn_dim=c, channels=c, groups=min(32, c), dropout=config.dropout)
        stride = strides[0]
    if attn:
        _log2(stride, f"{config.head} with attention upsampling")
        head = _FullResolution(head, k, c, int(stride), config.attn_heads)
    return head, indices


class SegmentationModel(Segmenter):
    """A :class:`Segmenter` built from a :class:`SegmenterConfig`, saved and loaded like any vitlab model.

    ``forward`` returns logits (B, K, H, W) at the input size; in training mode with
    auxiliary heads it returns ``(logits, [aux logits, ...])`` so the auxiliary losses
    flow through the same (DDP-wrapped) call. In eval mode the auxiliary heads never run.

    Args:
        config: The architecture.
        backbone: A ready backbone (None: built from ``config.backbone_config``).
    """

    family = FAMILY

    def __init__(self, config: SegmenterConfig, backbone: nn.Module | None = None) -> None:
        if len(config.aux_indices) != len(config.aux_weights):
            raise ValueError(f"give one aux weight per aux index: got aux_indices {list(config.aux_indices)} "
                             f"and aux_weights {list(config.aux_weights)}")
        if backbone is None:
            backbone = _build_backbone(config.backbone, config.backbone_config)
        head, indices = build_head(config, backbone)
        aux = []
        for i in config.aux_indices:
            (ch,), (st,) = feature_channels_strides(backbone, [i])
            aux.append(SetrUpHead(ch, st, config.num_classes, config.channels, num_convs=1, up_scale=1,
                                  kernel_size=1, dropout=config.dropout))
        super().__init__(backbone, head, indices, aux, [[i] for i in config.aux_indices], config.aux_weights)
        self.config = config
        self.model_name = f"segmenter_{config.head}_{config.backbone}"
        self.pretrained_cfg: dict[str, Any] = {}

    def forward(self, x: Tensor) -> Tensor | tuple[Tensor, list[Tensor]]:  # type: ignore[override]
        """Images (B, C, H, W) -> logits (B, K, H, W); ``(logits, aux)`` in training with aux heads."""
        if self.training and len(self.aux_heads):
            return self.forward_with_aux(x)
        main, _ = self._features(x, with_aux=False)
        return F.interpolate(self.head(main), size=x.shape[-2:], mode="bilinear", align_corners=False)


def _build_backbone(name: str, values: dict[str, Any]) -> nn.Module:
    from ...config import config_from_dict
    from ...models import get_entry

    entry = get_entry(name)
    return entry.model_class(config_from_dict(entry.config_class, values))


def build_segmenter(backbone: str, num_classes: int, head: str = "setr_naive", in_channels: int = 3,
                    image_size: int = 64, backbone_overrides: dict[str, Any] | None = None,
                    **options: Any) -> SegmentationModel:
    """A :class:`SegmentationModel` from a registered backbone name and overrides.

    Args:
        backbone: Registered backbone name.
        num_classes: Output classes (background included).
        head: One of :data:`HEADS`.
        in_channels: Image channels.
        image_size: Training side.
        backbone_overrides: Backbone config overrides (``patch_size``, ``dim``, ``depth``...).
        **options: Other :class:`SegmenterConfig` fields (``upsample``, ``channels``, ``aux_indices``...).
    """
    from ...models import build_model

    overrides = {**(backbone_overrides or {}), "num_classes": 0, "in_channels": in_channels,
                 "image_size": image_size}
    net = build_model(backbone, **overrides)
    cfg = SegmenterConfig(backbone=backbone, backbone_config=config_to_dict(net.config), head=head,
                          num_classes=num_classes, in_channels=in_channels, image_size=(image_size, image_size),
                          **options)
    return SegmentationModel(cfg, net)


def load_segmenter(path: str | Path) -> tuple[SegmentationModel, list[str] | None]:
    """A :class:`SegmentationModel` and its class names from a vitlab checkpoint (eval mode).

    Args:
        path: A ``.safetensors`` file, a checkpoint folder, a run directory or its ``checkpoints/latest``.

    Raises:
        FileNotFoundError: No such path.
        CheckpointError: Not a segmentation checkpoint, or weights that do not fit its config.
    """
    from ...pretrained.io import read_weights

    ckpt = read_weights(path)
    meta = ckpt.vitlab_config
    if not meta or meta.get("family") != FAMILY:
        what = f"a {meta.get('family')!r} model" if meta else "not a vitlab checkpoint"
        raise CheckpointError(f"{path} is {what}, not a segmentation model; train one with vitlab train --task segmentation")
    values = dict(meta["config"])
    values["image_size"] = tuple(values.get("image_size", (64, 64)))
    config = SegmenterConfig(**values)
    model = SegmentationModel(config)
    missing, unexpected = model.load_state_dict(ckpt.state_dict, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"the weights in {path} do not fit its segmenter config: missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]}")
    model.pretrained_cfg = {k: tuple(v) if isinstance(v, list) else v for k, v in (meta.get("pretrained_cfg") or {}).items()}
    labels = meta.get("labels")
    return model.eval(), (list(labels) if labels is not None else None)


__all__ = ["FAMILY", "HEADS", "UPSAMPLES", "SegmentationModel", "SegmenterConfig", "build_head", "build_segmenter",
           "default_indices", "load_segmenter"]
