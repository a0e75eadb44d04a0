"""DETR (Carion et al., 2020) on any vitlab backbone, with switchable small-data remedies.

The backbone is reached only through the contract (``forward_intermediates`` and
``feature_info``):

- a **plain ViT** (every returnable index has the same stride) gives one map; a ViTDet-style
  simple feature pyramid (Li et al., 2022) turns it into several scales: a transposed
  convolution per factor of 2 up, the map itself, max pooling per factor of 2 down;
- a **hierarchical** backbone (Swin, PVT, the CNN) gives its last ``num_levels`` stages.

Every level is projected to ``dim`` (1x1 convolution + GroupNorm), given DETR's 2-D sine
position encoding plus a learned level embedding, flattened, and the levels are concatenated
into one token sequence: the multi-scale memory. A transformer encoder (the shared
:class:`~vitlab.components.Block`) refines it; a decoder of pre-norm layers built from the
shared :class:`~vitlab.components.Attention` (self), :class:`~vitlab.components.CrossAttention`
and :class:`~vitlab.components.Mlp` turns ``num_queries`` object queries into class logits
(``num_classes`` + no-object, last) and normalised cxcywh boxes after every decoder layer
(the auxiliary outputs that :class:`~vitlab.tasks.detection.DETRLoss` supervises).
Positions enter the keys of the cross-attention by adding the encoding to the memory (keys
and values alike: one fused key/value projection), and the queries by adding the query
position before each attention.

``remedy="dn"`` switches on DN-DETR (Li et al., 2022) on DAB-DETR-style anchor queries (the
form DN-DETR builds on): each matching query is a learned anchor box whose sine embedding,
through an MLP, is its query position; boxes are predicted as offsets of the anchor in
logit space, and each layer's boxes are the next layer's anchors (detached). In training, ``dn_groups`` noised copies of the ground truth (labels flipped
with ``dn_label_noise``, boxes shifted and scaled by up to ``dn_box_noise``) enter the
decoder as extra queries that must reconstruct their original object; an attention mask
keeps the matching queries from seeing them and the groups from seeing each other
(:func:`~vitlab.tasks.detection.denoising.build_denoising_queries`). ``remedy="none"`` is
the original DETR: learned query positions, zero content, boxes as a sigmoid of the head.

``remedy="two_stage"`` is Deformable DETR's two-stage query selection (Zhu et al., 2021), in
DINO's mixed form (Zhang et al., 2023): every memory token predicts a class and a box (an
offset, in logit space, of a fixed anchor centred on its cell and ``proposal_cells`` cells
wide); these proposals get their own set loss, and the ``num_queries`` with the highest object
score (1 - p(no-object)) become, detached, the decoder's anchor boxes, with learned content.
``remedy="dn_two_stage"`` adds DN-DETR's denoising queries to it.

``spatial_prior=True`` (with any remedy that has anchors) is SMCA's spatially modulated
co-attention (Gao et al., 2021): every decoder cross-attention gets a log-Gaussian bias around
the query's reference box (:func:`spatial_prior_bias`, a learned width per layer and head), so
a query reads the memory near its box from the first step instead of learning where to look.

``backbone_lr_scale`` trains the backbone at that fraction of the learning rate (DETR: 0.1),
through :meth:`DETR.lr_scales`.

``query_groups=K > 1`` adds Group DETR (Chen et al., 2023), with either remedy: in training
the decoder holds ``K`` independent groups of ``num_queries`` matching queries (their own
learned positions / anchors), a self-attention mask keeps each group from seeing the others,
and every group is matched one-to-one to the ground truth on its own, so each object
supervises ``K`` queries per step (one-to-many assignment) at a decoder-only cost. At
inference only the first group runs: the same network and cost as ``K = 1``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, nn

from ...components import Attention, Block, CrossAttention, Mlp
from .denoising import DenoisingQueries, build_denoising_queries
from .yolos import MLPHead

REMEDIES = ("none", "dn", "two_stage", "dn_two_stage")


def group_attention_mask(groups: int, per_group: int, device: torch.device | None = None) -> Tensor:
    """Group DETR's self-attention mask over ``groups`` blocks of ``per_group`` queries.

    Returns:
        (groups * per_group, groups * per_group) bool, True = blocked: a query sees only the
        queries of its own group.
    """
    g = torch.arange(groups * per_group, device=device) // per_group  # (n,) group of each query
    return g[:, None] != g[None, :]


def sine_position_encoding_2d(height: int, width: int, dim: int, temperature: float = 10000.0,
                              device: torch.device | None = None) -> Tensor:
    """DETR's 2-D sine position encoding (``PositionEmbeddingSine``, normalised, scale 2*pi).

    Row ``y`` (1-based) and column ``x`` are normalised to ``(0, 2*pi]`` (``y / H * 2*pi``);
    each gets ``dim / 2`` channels ``pos / T^(2 * (i // 2) / (dim / 2))`` with sine on even
    ``i`` and cosine on odd ``i`` (interleaved); the ``y`` channels come first.

    Args:
        height: Rows of the map.
        width: Columns of the map.
        dim: Channels (divisible by 4).
        temperature: ``T``.
        device: Where to build it.

    Returns:
        ``(height * width, dim)`` in raster order.
    """
    if dim % 4 != 0:
        raise ValueError(f"the 2-D sine position encoding needs dim divisible by 4, got {dim}")
    npf = dim // 2
    scale = 2 * math.pi
    y = torch.arange(1, height + 1, dtype=torch.float32, device=device) / (height + 1e-6) * scale
    x = torch.arange(1, width + 1, dtype=torch.float32, device=device) / (width + 1e-6) * scale
    dim_t = temperature ** (2 * (torch.arange(npf, dtype=torch.float32, device=device) // 2) / npf)
    px = x[:, None] / dim_t  # (W, npf)
    py = y[:, None] / dim_t  # (H, npf)
    # interleave sin (even channels) and cos (odd channels): (n, npf/2, 2) -> (n, npf)
    px = torch.stack((px[:, 0::2].sin(), px[:, 1::2].cos()), dim=2).flatten(1)
    py = torch.stack((py[:, 0::2].sin(), py[:, 1::2].cos()), dim=2).flatten(1)
    pos = torch.cat((py[:, None, :].expand(height, width, npf), px[None, :, :].expand(height, width, npf)), dim=-1)
    return pos.reshape(height * width, dim)  # (H, W, dim) -> (H*W, dim)


def box_sine_embedding(boxes: Tensor, dim: int, temperature: float = 10000.0) -> Tensor:
    """Sine embedding of normalised boxes (DAB-DETR): ``dim / 4`` channels per coordinate.

    Args:
        boxes: ``(..., 4)`` in ``[0, 1]`` (cxcywh).
        dim: Output channels (divisible by 8).

    Returns:
        ``(..., dim)``.
    """
    if dim % 8 != 0:
        raise ValueError(f"the box sine embedding needs dim divisible by 8, got {dim}")
    per = dim // 4
    dim_t = temperature ** (2 * (torch.arange(per, dtype=torch.float32, device=boxes.device) // 2) / per)
    pos = boxes.float()[..., None] * (2 * math.pi) / dim_t  # (..., 4, per)
    pos = torch.stack((pos[..., 0::2].sin(), pos[..., 1::2].cos()), dim=-1).flatten(-2)  # (..., 4, per)
    return pos.flatten(-2)  # (..., 4, per) -> (..., 4 * per)


def inverse_sigmoid(x: Tensor, eps: float = 1e-5) -> Tensor:
    """``log(x / (1 - x))`` with ``x`` clamped to ``[eps, 1 - eps]``."""
    x = x.clamp(eps, 1 - eps)
    return torch.log(x / (1 - x))


class SimpleFeaturePyramid(nn.Module):
    """ViTDet's simple feature pyramid on one map: one output per scale factor.

    A factor ``2^k > 1`` is ``k`` stride-2 transposed convolutions (GELU between them), 1 the
    map itself, ``2^-k`` a ``2^k`` max pooling.

    Args:
        channels: Channels of the input map (kept).
        scales: Scale factors, each a power of 2 (e.g. ``(2.0, 1.0, 0.5)``).
    """

    def __init__(self, channels: int, scales: Sequence[float]) -> None:
        super().__init__()
        self.scales = tuple(float(s) for s in scales)
        ops = []
        for s in self.scales:
            k = math.log2(s)
            if s <= 0 or abs(k - round(k)) > 1e-6:
                raise ValueError(f"pyramid scales must be powers of 2, got {s}")
            k = int(round(k))
            if k > 0:
                layers: list[nn.Module] = []
                for i in range(k):
                    layers.append(nn.ConvTranspose2d(channels, channels, 2, stride=2))
                    if i < k - 1:
                        layers.append(nn.GELU())
                ops.append(nn.Sequential(*layers))
            elif k == 0:
                ops.append(nn.Identity())
            else:
                ops.append(nn.MaxPool2d(2 ** -k))
        self.ops = nn.ModuleList(ops)

    def forward(self, x: Tensor) -> list[Tensor]:
        """(B, C, h, w) -> one (B, C, h * s, w * s) map per scale ``s``."""
        return [op(x) for op in self.ops]


class DecoderLayer(nn.Module):
    """Pre-norm DETR decoder layer: self-attention, cross-attention on the memory, MLP.

    Args:
        dim: Query width.
        heads: Attention heads.
        mlp_dim: Hidden width of the MLP.
        dropout: Dropout after each sub-layer and in the attention (training only).
    """

    def __init__(self, dim: int, heads: int, mlp_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.self_attn = Attention(dim, heads, attn_drop=dropout, proj_drop=dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.cross_attn = CrossAttention(dim, heads, attn_drop=dropout, proj_drop=dropout)
        self.norm3 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, mlp_dim, drop=dropout)

    def forward(self, tgt: Tensor, query_pos: Tensor, memory: Tensor, self_bias: Tensor | None = None,
                cross_bias: Tensor | None = None) -> Tensor:
        """Queries (B, Q, C) with their positions (B, Q, C) attend to the memory (B, N, C)
        (positions already added); ``self_bias`` (Q, Q) masks the self-attention,
        ``cross_bias`` (B, heads, Q, N) is added to the cross-attention logits."""
        tgt = tgt + self.self_attn(self.norm1(tgt) + query_pos, attn_bias=self_bias)
        tgt = tgt + self.cross_attn(self.norm2(tgt) + query_pos, context=memory, attn_bias=cross_bias)
        return tgt + self.mlp(self.norm3(tgt))


def spatial_prior_bias(ref: Tensor, centres: Tensor, beta: Tensor) -> Tensor:
    """SMCA's spatially modulated co-attention (Gao et al., 2021) as a log-Gaussian bias.

    ``bias[b, h, q, n] = -((x_n - cx_q)^2 / w_q^2 + (y_n - cy_q)^2 / h_q^2) / beta_h``: a memory
    token one box width from the query's reference centre is down-weighted by ``exp(-1 / beta_h)``.

    Args:
        ref: Reference boxes (B, Q, 4), normalised cxcywh.
        centres: Memory token centres (N, 2), normalised xy.
        beta: Per-head widths (heads,), positive.

    Returns:
        (B, heads, Q, N).
    """
    wh = ref[..., 2:].clamp(min=1e-3)  # (B, Q, 2)
    d = (centres[None, None] - ref[..., None, :2]) / wh[..., None, :]  # (B, Q, N, 2)
    dist = d.pow(2).sum(-1)  # (B, Q, N)
    return -dist[:, None] / beta[None, :, None, None]  # (B, 1, Q, N) / (1, heads, 1, 1)


@dataclass(frozen=True)
class DETRConfig:
    """Configuration of :class:`DETR`.

    Attributes:
        backbone: A registered model name (``vitlab models``).
        backbone_overrides: Keyword overrides of the backbone (``patch_size``, ``dim``, ...).
        image_size: Input side in pixels.
        in_channels: Input channels.
        num_classes: Object classes (no-object excluded).
        num_queries: Object queries (predictions per image).
        dim: Width of the encoder-decoder.
        heads: Attention heads.
        mlp_dim: Hidden width of the encoder and decoder MLPs.
        enc_layers: Encoder blocks on the memory (0: none).
        dec_layers: Decoder layers (each gives an output).
        dropout: Dropout in the encoder-decoder.
        pyramid_scales: Plain ViTs: the scale factors of the simple feature pyramid.
        num_levels: Hierarchical backbones: how many of the last stages to use.
        remedy: ``"none"`` (DETR), ``"dn"`` (DN-DETR denoising on anchor queries),
            ``"two_stage"`` (anchors from the encoder's top-scoring proposals) or
            ``"dn_two_stage"`` (both).
        dn_groups: Denoising groups (copies of the ground truth) per image.
        dn_label_noise: Probability of flipping a denoising query's label.
        dn_box_noise: Box noise scale (``lambda`` of DN-DETR).
        pos_temperature: Temperature of the memory's 2-D sine encoding (DETR: 10000).
        anchor_temperature: Temperature of the anchor boxes' sine embedding (DAB-DETR: 10000);
            small maps and boxes get more varying channels from a lower one (e.g. 20).
        query_groups: Group DETR: groups of matching queries in training (1: off); only the
            first group is used at inference.
        proposal_cells: Two-stage: side of each memory token's fixed anchor, in cells of its level.
        backbone_lr_scale: Learning-rate factor of the backbone's parameters (DETR: 0.1).
        spatial_prior: SMCA's Gaussian cross-attention bias around each query's reference box
            (needs a remedy with anchors).
    """

    backbone: str = "vit_tiny_patch16_224"
    backbone_overrides: dict[str, Any] = field(default_factory=dict)
    image_size: int = 64
    in_channels: int = 1
    num_classes: int = 10
    num_queries: int = 16
    dim: int = 128
    heads: int = 4
    mlp_dim: int = 256
    enc_layers: int = 1
    dec_layers: int = 3
    dropout: float = 0.0
    pyramid_scales: tuple[float, ...] = (2.0, 1.0, 0.5)
    num_levels: int = 3
    remedy: str = "dn"
    dn_groups: int = 5
    dn_label_noise: float = 0.2
    dn_box_noise: float = 0.4
    pos_temperature: float = 10000.0
    anchor_temperature: float = 10000.0
    query_groups: int = 1
    proposal_cells: float = 2.0
    backbone_lr_scale: float = 1.0
    spatial_prior: bool = False

    @property
    def anchored(self) -> bool:
        """Queries are anchor boxes (every remedy; plain DETR has learned positions)."""
        return self.remedy != "none"

    @property
    def denoising(self) -> bool:
        """DN-DETR's denoising queries are on."""
        return self.remedy in ("dn", "dn_two_stage")

    @property
    def two_stage(self) -> bool:
        """The anchors are the top-scoring encoder proposals (two-stage query selection)."""
        return self.remedy in ("two_stage", "dn_two_stage")

    def __post_init__(self) -> None:
        problems = []
        if self.remedy not in REMEDIES:
            problems.append(f"remedy must be one of {', '.join(REMEDIES)}, got {self.remedy!r}")
        for name in ("num_classes", "num_queries", "dim", "heads", "mlp_dim", "dec_layers", "num_levels",
                     "image_size", "in_channels", "query_groups"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.enc_layers < 0 or self.dn_groups < 0:
            problems.append("enc_layers and dn_groups must be >= 0")
        if self.dim % 8 != 0 or self.dim % self.heads != 0:
            problems.append(f"dim must be divisible by 8 and by heads, got dim={self.dim}, heads={self.heads}")
        if not self.pyramid_scales:
            problems.append("pyramid_scales must name at least one scale")
        if not 0 <= self.dn_label_noise <= 1 or self.dn_box_noise < 0:
            problems.append("dn_label_noise must lie in [0, 1] and dn_box_noise be >= 0")
        if self.proposal_cells <= 0 or self.backbone_lr_scale < 0:
            problems.append(f"proposal_cells must be > 0 and backbone_lr_scale >= 0, got {self.proposal_cells} "
                            f"and {self.backbone_lr_scale}")
        if self.spatial_prior and not self.anchored:
            problems.append("spatial_prior needs reference boxes: a remedy with anchor queries (dn, two_stage, "
                            "dn_two_stage), not remedy='none'")
        if problems:
            raise ValueError("invalid DETR config: " + "; ".join(problems))


class DETR(nn.Module):
    """DETR on a vitlab backbone (see the module docstring).

    Args:
        config: A :class:`DETRConfig`.
        backbone: A built backbone to use instead of ``config.backbone`` (it must follow
            the contract and take ``config.image_size`` inputs).

    Example:
        >>> cfg = DETRConfig(backbone_overrides=dict(patch_size=8, dim=32, depth=1, heads=2, mlp_dim=64),
        ...                  image_size=32, dim=32, heads=2, mlp_dim=64, num_queries=5)
        >>> out = DETR(cfg).eval()(torch.rand(1, 1, 32, 32))
        >>> out["logits"].shape, out["boxes"].shape, len(out["aux"])
        (torch.Size([1, 5, 11]), torch.Size([1, 5, 4]), 2)
    """

    family = "DETR"

    def __init__(self, config: DETRConfig | None = None, backbone: nn.Module | None = None) -> None:
        super().__init__()
        self.config = c = config if config is not None else DETRConfig()
        if backbone is None:
            from ...pretrained import create_model

            backbone = create_model(c.backbone, num_classes=0, in_channels=c.in_channels, image_size=c.image_size,
                                    **dict(c.backbone_overrides))
        self.backbone = backbone
        info = backbone.feature_info
        strides = {int(i["reduction"]) for i in info}
        self.plain = len(strides) == 1
        if self.plain:
            self.indices = [len(info) - 1]
            self.pyramid: SimpleFeaturePyramid | None = SimpleFeaturePyramid(int(info[-1]["num_chs"]), c.pyramid_scales)
            in_chs = [int(info[-1]["num_chs"])] * len(c.pyramid_scales)
        else:
            n = min(c.num_levels, len(info))
            self.indices = list(range(len(info) - n, len(info)))
            self.pyramid = None
            in_chs = [int(info[i]["num_chs"]) for i in self.indices]
        self.num_levels = len(in_chs)
        groups = math.gcd(32, c.dim)
        self.input_proj = nn.ModuleList(
            nn.Sequential(nn.Conv2d(ch, c.dim, 1), nn.GroupNorm(groups, c.dim)) for ch in in_chs
        )
        self.level_embed = nn.Parameter(torch.zeros(self.num_levels, c.dim))
        self.encoder = nn.ModuleList(
            Block(c.dim, c.heads, c.mlp_dim, dropout=c.dropout, attention_dropout=c.dropout) for _ in range(c.enc_layers)
        )
        self.enc_norm = nn.LayerNorm(c.dim) if c.enc_layers else nn.Identity()
        self.decoder = nn.ModuleList(DecoderLayer(c.dim, c.heads, c.mlp_dim, c.dropout) for _ in range(c.dec_layers))
        self.dec_norm = nn.LayerNorm(c.dim)
        self.class_head = nn.Linear(c.dim, c.num_classes + 1)
        self.box_head = MLPHead(c.dim, c.dim, 4)
        nq = c.num_queries * c.query_groups  # Group DETR: group k holds queries k * Q ... (k + 1) * Q - 1
        self.query_pos: nn.Parameter | None = None
        if c.anchored:
            # DAB-style anchors (logit space) and the embedding of a box into a query position
            if not c.two_stage:  # learned anchors; two-stage takes them from the encoder's proposals
                self.anchors = nn.Parameter(inverse_sigmoid(torch.rand(nq, 4) * torch.tensor([1, 1, 0.5, 0.5])
                                                            + torch.tensor([0, 0, 0.05, 0.05])))
            self.query_content = nn.Parameter(torch.zeros(nq, c.dim))
            self.box_pos = MLPHead(c.dim, c.dim, c.dim, num_layers=2)
            if c.denoising:
                self.label_embed = nn.Embedding(c.num_classes + 1, c.dim)  # the last row is unused (DN-DETR's indicator)
        else:
            self.query_pos = nn.Parameter(torch.randn(nq, c.dim))
        if c.spatial_prior:  # per layer and head: the Gaussian's width in box sizes (log), 1/4 to 4 across heads
            widths = torch.logspace(-2, 2, c.heads, base=2.0) if c.heads > 1 else torch.ones(1)
            self.spatial_log_beta = nn.Parameter(widths.log()[None].repeat(c.dec_layers, 1))
        if c.two_stage:  # a class and box prediction per memory token (Deformable DETR's two-stage head)
            self.enc_output = nn.Sequential(nn.Linear(c.dim, c.dim), nn.LayerNorm(c.dim))
            self.enc_class_head = nn.Linear(c.dim, c.num_classes + 1)
            self.enc_box_head = MLPHead(c.dim, c.dim, 4)
        nn.init.normal_(self.level_embed)
        prior = 0.01  # the focal-loss prior: start with low object scores
        for cls_head, box_head in self._heads():
            nn.init.zeros_(box_head[-1].weight)
            nn.init.zeros_(box_head[-1].bias)
            nn.init.constant_(cls_head.bias, 0.0)
            cls_head.bias.data[-1] = math.log((1 - prior) / prior) * 0.5

    def _heads(self) -> list[tuple[nn.Linear, nn.Module]]:
        """(class head, box head) of the decoder and, with two-stage, of the encoder proposals."""
        heads = [(self.class_head, self.box_head)]
        if self.config.two_stage:
            heads.append((self.enc_class_head, self.enc_box_head))
        return heads

    # ---------------------------------------------------------------- parts
    def no_weight_decay(self) -> set[str]:
        """Embeddings, anchors and the backbone's own: no weight decay."""
        names = {f"backbone.{n}" for n in getattr(self.backbone, "no_weight_decay", lambda: set())()}
        names |= {"level_embed"} | ({"spatial_log_beta"} if self.config.spatial_prior else set())
        if self.config.anchored:
            names |= {"query_content"} | (set() if self.config.two_stage else {"anchors"})
        else:
            names |= {"query_pos"}
        return names

    def lr_scales(self) -> dict[str, float]:
        """Learning-rate factors by parameter-name prefix: the backbone's ``backbone_lr_scale``
        (DETR trains its backbone at a tenth of the head's rate)."""
        return {"backbone.": self.config.backbone_lr_scale}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Activation checkpointing in the backbone."""
        self.backbone.set_grad_checkpointing(enable)

    def feature_levels(self, x: Tensor) -> list[Tensor]:
        """The maps the head uses: the pyramid of a plain ViT or the last stages, each (B, C_l, h_l, w_l)."""
        maps = self.backbone.forward_intermediates(x, indices=self.indices, norm=True, intermediates_only=True)
        if self.pyramid is not None:
            maps = self.pyramid(maps[-1])
        return maps

    def memory(self, x: Tensor) -> tuple[Tensor, list[tuple[int, int]]]:
        """Encoded multi-scale memory (B, sum h_l * w_l, dim), position encodings added, and the level grids."""
        tokens, grids = [], []
        for lvl, (fmap, proj) in enumerate(zip(self.feature_levels(x), self.input_proj)):
            fmap = proj(fmap)  # (B, dim, h, w)
            h, w = fmap.shape[-2:]
            pos = sine_position_encoding_2d(h, w, self.config.dim, self.config.pos_temperature, device=fmap.device)
            pos = pos + self.level_embed[lvl]
            tokens.append(fmap.flatten(2).transpose(1, 2) + pos.to(fmap.dtype))  # (B, dim, h, w) -> (B, h*w, dim)
            grids.append((int(h), int(w)))
        mem = torch.cat(tokens, dim=1)  # (B, N, dim)
        for blk in self.encoder:
            mem = blk(mem)
        return self.enc_norm(mem), grids

    def proposal_anchors(self, grids: Sequence[tuple[int, int]], device: torch.device | None = None) -> Tensor:
        """The fixed box of every memory token (two-stage): centred on its cell, ``proposal_cells``
        cells of its level wide and high; (sum h_l * w_l, 4) normalised cxcywh, memory order."""
        boxes = []
        for h, w in grids:
            ys, xs = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
            cx, cy = (xs.flatten() + 0.5) / w, (ys.flatten() + 0.5) / h  # (h*w,) raster order
            side = torch.tensor([self.config.proposal_cells / w, self.config.proposal_cells / h], device=device)
            boxes.append(torch.cat([torch.stack([cx, cy], dim=-1), side.clamp(max=1.0).expand(h * w, 2)], dim=-1))
        return torch.cat(boxes)

    def proposals(self, memory: Tensor, anchors: Tensor) -> dict[str, Tensor]:
        """Two-stage: class logits (B, N, C+1) and boxes (B, N, 4) of every memory token, its
        box an offset (logit space) of the token's fixed anchor (``anchors`` (N, 4), from
        :meth:`proposal_anchors`)."""
        h = self.enc_output(memory)
        boxes = (self.enc_box_head(h) + inverse_sigmoid(anchors)).sigmoid()
        return {"logits": self.enc_class_head(h), "boxes": boxes}

    def select_anchors(self, proposals: Mapping[str, Tensor]) -> Tensor:
        """The boxes (detached) of the ``num_queries`` proposals with the highest object score
        (1 - p(no-object)): the decoder's anchors, (B, Q, 4)."""
        object_score = -proposals["logits"].float().softmax(-1)[..., -1]  # (B, N): higher = more object
        k = min(self.config.num_queries, object_score.shape[1])
        idx = object_score.topk(k, dim=1).indices  # (B, k)
        return proposals["boxes"].detach().gather(1, idx[..., None].expand(-1, -1, 4))

    def _queries(self, b: int, dn: DenoisingQueries | None, groups: int = 1,
                 anchors: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
        """Content (B, D+G*Q, C), position (B, D+G*Q, C), reference boxes (B, D+G*Q, 4) or None,
        self-attention bias (D+G*Q, D+G*Q) or None, for ``groups`` (G) Group DETR groups;
        ``anchors`` (B, Q, 4): the selected proposals (two-stage), shared by the groups."""
        c = self.config
        n = c.num_queries * groups
        group_bias = None
        if groups > 1:
            group_bias = torch.zeros(n, n).masked_fill(group_attention_mask(groups, c.num_queries), float("-inf"))
        if self.query_pos is not None:
            pos = self.query_pos[None, :n].expand(b, -1, -1)
            return torch.zeros_like(pos), pos, None, group_bias.to(pos.device) if group_bias is not None else None
        if anchors is not None:
            ref = anchors.repeat(1, groups, 1)  # (B, Q, 4) -> (B, G*Q, 4)
            n = ref.shape[1]
        else:
            ref = self.anchors[:n].sigmoid()[None].expand(b, -1, -1)  # (B, G*Q, 4)
        content = self.query_content[None, :n].expand(b, -1, -1)
        bias = group_bias.to(ref.device) if group_bias is not None else None
        if dn is not None:
            content = torch.cat([self.label_embed(dn.labels), content], dim=1)  # (B, D + G*Q, C)
            ref = torch.cat([dn.boxes, ref], dim=1)
            bias = dn.attn_bias
            if group_bias is not None:  # the matching groups do not see each other either
                d = dn.num_queries
                bias = bias.clone()
                bias[d:, d:] = group_bias.to(bias.device)
        pos = self.box_pos(box_sine_embedding(ref, c.dim, c.anchor_temperature))
        return content, pos, ref, bias

    def decode(self, memory: Tensor, tgt: Tensor, pos: Tensor, ref: Tensor | None,
               bias: Tensor | None, centres: Tensor | None = None) -> tuple[list[Tensor], list[Tensor]]:
        """Run the decoder; per layer the class logits (B, Q', C+1) and boxes (B, Q', 4).

        Args:
            memory: Encoded memory (B, N, dim).
            tgt: Query content (B, Q', dim).
            pos: Query positions (B, Q', dim).
            ref: Reference boxes (B, Q', 4) of anchor queries, or None (plain DETR).
            bias: Self-attention bias (Q', Q') or None.
            centres: Memory token centres (N, 2): with ``spatial_prior``, the cross-attention of
                every layer is modulated around each query's reference box.
        """
        c = self.config
        layers_logits, layers_boxes = [], []
        for i, layer in enumerate(self.decoder):
            cross = None
            if c.spatial_prior and ref is not None and centres is not None:
                cross = spatial_prior_bias(ref, centres, self.spatial_log_beta[i].exp()).to(memory.dtype)
            tgt = layer(tgt, pos, memory, bias, cross)
            h = self.dec_norm(tgt)
            delta = self.box_head(h)
            boxes = (delta + inverse_sigmoid(ref)).sigmoid() if ref is not None else delta.sigmoid()
            layers_logits.append(self.class_head(h))
            layers_boxes.append(boxes)
            if ref is not None:  # anchors are refined layer by layer (DAB-DETR), without gradient through them
                ref = boxes.detach()
                pos = self.box_pos(box_sine_embedding(ref, c.dim, c.anchor_temperature))
        return layers_logits, layers_boxes

    def forward(self, x: Tensor, targets: Sequence[Mapping[str, Tensor]] | None = None) -> dict[str, Any]:
        """Detect.

        Args:
            x: Images (B, C, H, W).
            targets: Training with denoising (``dn``, ``dn_two_stage``) only: per image ``labels`` (T_i,) and
                ``boxes`` (T_i, 4) normalised cxcywh, from which the denoising queries are made.

        Returns:
            ``logits`` (B, Q, num_classes + 1) and ``boxes`` (B, Q, 4) of the last decoder layer
            (``pred_boxes`` is the same tensor), ``aux``: the same for every earlier layer,
            first to last, and ``dn``: None, or the denoising outputs (a dict with per-layer
            ``logits`` and ``boxes`` (L, B, D, ...) and the :class:`DenoisingQueries`);
            ``enc``: None, or (two-stage) the proposals' ``logits`` (B, N, C+1) and ``boxes``
            (B, N, 4), one per memory token; ``groups``: the extra Group DETR groups' layers.
        """
        c = self.config
        mem, grids = self.memory(x)
        b = x.shape[0]
        dn = None
        groups = c.query_groups if self.training else 1
        if targets is not None and self.training and c.denoising and c.dn_groups > 0:
            dn = build_denoising_queries(targets, c.num_classes, c.num_queries * groups, c.dn_groups,
                                         c.dn_label_noise, c.dn_box_noise, device=x.device)
        cells = self.proposal_anchors(grids, x.device) if c.two_stage or c.spatial_prior else None  # (N, 4)
        enc = self.proposals(mem, cells) if c.two_stage else None
        anchors = self.select_anchors(enc) if enc is not None else None
        centres = cells[:, :2] if c.spatial_prior else None  # the memory tokens' centres
        layers_logits, layers_boxes = self.decode(mem, *self._queries(b, dn, groups, anchors), centres=centres)
        d = dn.num_queries if dn is not None else 0
        q = c.num_queries
        # per Group DETR group k, per layer: the (B, Q, ...) slice of that group's queries
        per_group = [[{"logits": lg[:, d + k * q: d + (k + 1) * q], "boxes": bx[:, d + k * q: d + (k + 1) * q]}
                      for lg, bx in zip(layers_logits, layers_boxes)] for k in range(groups)]
        outs = per_group[0]
        result: dict[str, Any] = {"logits": outs[-1]["logits"], "boxes": outs[-1]["boxes"],
                                  "pred_boxes": outs[-1]["boxes"], "aux": outs[:-1], "dn": None,
                                  "groups": per_group[1:], "enc": enc}
        if dn is not None:
            result["dn"] = {"logits": torch.stack([lg[:, :d] for lg in layers_logits]),  # (L, B, D, C+1)
                            "boxes": torch.stack([bx[:, :d] for bx in layers_boxes]),  # (L, B, D, 4)
                            "queries": dn}
        return result


__all__ = ["DETR", "DETRConfig", "DecoderLayer", "REMEDIES", "SimpleFeaturePyramid", "box_sine_embedding",
           "spatial_prior_bias",
           "group_attention_mask", "inverse_sigmoid", "sine_position_encoding_2d"]
