"""YOLOS (Fang et al., 2021): a plain ViT with detection tokens appended to the patch tokens.

There is no decoder: ``num_detection_tokens`` learned tokens ride through the ViT's blocks
next to the class and patch tokens, and two 3-layer MLPs read classes (``num_classes`` + 1,
the last being no-object) and boxes (normalised cxcywh, sigmoid) off their final states.
The outputs feed :class:`~vitlab.tasks.detection.DETRLoss` and
:func:`~vitlab.tasks.detection.postprocess_detections` directly.

The token order follows Hugging Face's ``YolosForObjectDetection``: ``[cls, patches, det]``.
The patch part of every position embedding is resampled bicubically (no antialiasing, like
HF) to the input's patch grid; with ``use_mid_position_embeddings`` a further position
embedding is added after every block but the last.

Register tokens (Darcet et al., 2024): a backbone with ``reg_tokens=R`` puts its registers after
the class token, ``[cls, reg0 .. reg{R-1}, patches, det]``, and the heads read the detection
tokens only. The registers follow the backbone's ``no_embed_class``: by default (as in timm's
register models) neither the class token nor the registers get a position row, in the first
embedding or the mid-layer ones, which then cover ``[patches, det]``; with
``no_embed_class=False`` every prefix token has a row in both.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ...components import interpolate_pos_embed
from ...models.vit import ViTConfig, VisionTransformer


@dataclass(frozen=True)
class YOLOSConfig:
    """Configuration of :class:`YOLOS`.

    Attributes:
        vit: The backbone's :class:`~vitlab.models.vit.ViTConfig`; its ``num_classes`` is
            ignored (the backbone has no classifier), ``pool`` must be ``"cls"``; ``reg_tokens``
            adds register tokens after the class token (no head reads them).
        num_classes: Object classes, no-object excluded (the class head has one more output).
        num_detection_tokens: Detection tokens, i.e. predictions per image.
        use_mid_position_embeddings: Add a learned position embedding after every block but the last.
    """

    vit: ViTConfig = field(default_factory=lambda: ViTConfig(image_size=(512, 864), norm_eps=1e-12, pad_input=False))
    num_classes: int = 91
    num_detection_tokens: int = 100
    use_mid_position_embeddings: bool = True

    def __post_init__(self) -> None:
        problems = []
        if self.num_classes < 1:
            problems.append(f"num_classes must be >= 1, got {self.num_classes}")
        if self.num_detection_tokens < 1:
            problems.append(f"num_detection_tokens must be >= 1, got {self.num_detection_tokens}")
        if not self.vit.class_token or self.vit.pos_embed != "learned":
            problems.append("YOLOS needs a ViT with a class token and a learned position embedding")
        if problems:
            raise ValueError("; ".join(problems))


class MLPHead(nn.Sequential):
    """DETR's prediction MLP: ``num_layers`` linears with ReLU between them (none after the last)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int = 3) -> None:
        dims = [in_dim] + [hidden_dim] * (num_layers - 1)
        layers: list[nn.Module] = []
        for i, d in enumerate(dims):
            layers.append(nn.Linear(d, hidden_dim if i < num_layers - 1 else out_dim))
            if i < num_layers - 1:
                layers.append(nn.ReLU())
        super().__init__(*layers)


class YOLOS(nn.Module):
    """YOLOS detector on vitlab's :class:`~vitlab.models.vit.VisionTransformer`.

    The backbone's patch embedding, class token, blocks and final norm are used as they are;
    YOLOS adds the detection tokens, their position embeddings, the optional mid-layer
    position embeddings and the two heads.

    Args:
        config: A :class:`YOLOSConfig`.

    Example:
        >>> vit = ViTConfig(image_size=32, patch_size=8, dim=32, depth=2, heads=2, mlp_dim=64, pad_input=False)
        >>> out = YOLOS(YOLOSConfig(vit=vit, num_classes=3, num_detection_tokens=5))(torch.randn(1, 3, 32, 32))
        >>> out["logits"].shape, out["pred_boxes"].shape
        (torch.Size([1, 5, 4]), torch.Size([1, 5, 4]))
    """

    def __init__(self, config: YOLOSConfig | None = None) -> None:
        super().__init__()
        self.config = c = config if config is not None else YOLOSConfig()
        self.backbone = VisionTransformer(c.vit, num_classes=0, pool="cls")
        dim, q = c.vit.dim, c.num_detection_tokens
        self.num_detection_tokens = q
        self.det_token = nn.Parameter(torch.zeros(1, q, dim))
        self.det_pos_embed = nn.Parameter(torch.zeros(1, q, dim))
        gh, gw = self.backbone.grid_size
        if c.use_mid_position_embeddings and c.vit.depth > 1:
            # one (prefix rows + grid + det) embedding per block but the last; prefix rows as the backbone's
            self.mid_pos_embed = nn.Parameter(torch.zeros(c.vit.depth - 1, self.backbone.num_pos_prefix + gh * gw + q,
                                                          dim))
        else:
            self.mid_pos_embed = None
        self.class_head = MLPHead(dim, dim, c.num_classes + 1)
        self.box_head = MLPHead(dim, dim, 4)
        for p in (self.det_token, self.det_pos_embed) + ((self.mid_pos_embed,) if self.mid_pos_embed is not None else ()):
            nn.init.trunc_normal_(p, std=0.02)

    def no_weight_decay(self) -> set[str]:
        """Tokens and position embeddings: no weight decay."""
        names = {f"backbone.{n}" for n in self.backbone.no_weight_decay()}
        return names | {"det_token", "det_pos_embed"} | ({"mid_pos_embed"} if self.mid_pos_embed is not None else set())

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in the backward pass instead of storing them."""
        self.backbone.set_grad_checkpointing(enable)

    def _resample(self, pos: Tensor, grid: tuple[int, int]) -> Tensor:
        """(L, p + gh * gw + Q, C) position embeddings -> (L, P + gh' * gw' + Q, C) for ``grid``.

        ``p`` is the backbone's prefix rows (``num_pos_prefix``: the class row, the register rows
        with ``no_embed_class=False``; none with ``no_embed_class``), ``P`` its prefix tokens: the
        tokens without a row get zeros. The prefix and detection rows are kept; the grid rows are
        resampled bicubically without antialiasing (Hugging Face's YOLOS interpolation).
        """
        q, vit = self.num_detection_tokens, self.backbone
        p = vit.num_pos_prefix
        out = [interpolate_pos_embed(e[None, :-q], grid, p, old_grid=vit.grid_size, antialias=False)
               for e in pos]  # each (1, p + gh' * gw', C)
        head = torch.cat(out, dim=0)  # (L, p + gh' * gw', C)
        unembedded = pos.new_zeros(pos.shape[0], vit.num_prefix_tokens - p, pos.shape[2])  # (L, P - p, C)
        return torch.cat([unembedded, head, pos[:, -q:]], dim=1)  # (L, P + gh' * gw' + Q, C)

    def forward_tokens(self, x: Tensor) -> Tensor:
        """Image (B, C, H, W) -> normed final tokens (B, P + N + Q, C), ordered [cls, registers, patches, det]."""
        vit = self.backbone
        patches, grid = vit.patch_embed(x)  # (B, N, C)
        b = patches.shape[0]
        first = torch.cat([vit.pos_embed.weight, self.det_pos_embed], dim=1)[0:1]  # (1, p + gh * gw + Q, C)
        pos = self._resample(first, grid)  # (1, P + N + Q, C)
        tokens = torch.cat([*vit.prefix_tokens(b), patches, self.det_token.expand(b, -1, -1)], dim=1)
        x = vit.norm_pre(vit.pos_drop(tokens + pos))  # (B, P + N + Q, C)
        mid = self._resample(self.mid_pos_embed, grid) if self.mid_pos_embed is not None else None
        for i, blk in enumerate(vit.blocks):
            x = vit.run_checkpointed(blk, x)
            if mid is not None and i < len(mid):
                x = x + mid[i]
        return vit.norm(x)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """Detect.

        Args:
            x: Images (B, C, H, W); H and W multiples of the patch size.

        Returns:
            ``logits`` (B, Q, num_classes + 1) and ``pred_boxes`` (B, Q, 4) in normalised
            cxcywh; ``boxes`` is the same tensor as ``pred_boxes`` (the key DETRLoss reads).
        """
        det = self.forward_tokens(x)[:, -self.num_detection_tokens:]  # (B, Q, C); class and registers skipped
        boxes = self.box_head(det).sigmoid()
        return {"logits": self.class_head(det), "pred_boxes": boxes, "boxes": boxes}


__all__ = ["MLPHead", "YOLOS", "YOLOSConfig"]
