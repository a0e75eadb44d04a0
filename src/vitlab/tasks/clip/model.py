"""The CLIP model: an image backbone and a text tower projected into one embedding space."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...models.base import Backbone
from ...models.registry import build_model
from ...models.text import TextConfig, TextTransformer

#: CLIP caps the logit scale (inverse temperature) at 100.
MAX_LOGIT_SCALE = 100.0


@dataclass(frozen=True)
class CLIPConfig:
    """Configuration of a :class:`CLIP` model.

    Attributes:
        image_model: Registered image model name (any backbone of the registry).
        image_overrides: Config overrides of the image model (``num_classes`` is forced to 0).
        text: The text tower; its ``embed_dim`` is ignored (the projection is ``embed_dim``).
        embed_dim: Width of the joint embedding space.
        init_logit_scale: Initial inverse temperature (stored as its log); CLIP: 1/0.07.
        max_logit_scale: Cap of the inverse temperature; CLIP: 100.
        logit_bias: Initial value of a learnable logit bias (SigLIP: -10); None for none.
    """

    image_model: str = "vit_base_patch16_224"
    image_overrides: dict[str, Any] = field(default_factory=dict)
    text: TextConfig = field(default_factory=TextConfig)
    embed_dim: int = 512
    init_logit_scale: float = 1 / 0.07
    max_logit_scale: float = MAX_LOGIT_SCALE
    logit_bias: float | None = None

    def __post_init__(self) -> None:
        if self.embed_dim <= 0:
            raise ValueError(f"embed_dim must be positive, got {self.embed_dim}")
        if not 0 < self.init_logit_scale <= self.max_logit_scale:
            raise ValueError(f"init_logit_scale must lie in (0, max_logit_scale={self.max_logit_scale}], "
                             f"got {self.init_logit_scale}")


class CLIP(nn.Module):
    """Image backbone + text transformer + linear projections + learnable temperature.

    The image tower is used only through the backbone contract
    (``forward_features`` -> ``forward_head(pre_logits=True)``, ``num_features``).

    Args:
        config: A :class:`CLIPConfig`.
        image_tower: An already-built backbone to use instead of ``config.image_model``.
    """

    def __init__(self, config: CLIPConfig, image_tower: Backbone | None = None) -> None:
        super().__init__()
        self.config = c = config
        if image_tower is None:
            image_tower = build_model(c.image_model, **{**c.image_overrides, "num_classes": 0})
        self.visual = image_tower
        text_cfg = TextConfig(**{**vars(c.text), "embed_dim": 0})
        self.text = TextTransformer(text_cfg)
        self.visual_projection = nn.Linear(self.visual.num_features, c.embed_dim, bias=False)
        self.text_projection = nn.Linear(text_cfg.dim, c.embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(c.init_logit_scale)))
        self.logit_bias = nn.Parameter(torch.tensor(float(c.logit_bias))) if c.logit_bias is not None else None
        nn.init.normal_(self.visual_projection.weight, std=self.visual.num_features**-0.5)
        nn.init.normal_(self.text_projection.weight, std=text_cfg.dim**-0.5)

    # ------------------------------------------------------------ encoders
    def encode_image(self, images: Tensor, normalize: bool = False) -> Tensor:
        """Images (B, C, H, W) -> image embeddings (B, embed_dim)."""
        feats = self.visual.forward_head(self.visual.forward_features(images), pre_logits=True)  # (B, F)
        x = self.visual_projection(feats)
        return F.normalize(x, dim=-1) if normalize else x

    def encode_text(self, ids: Tensor, normalize: bool = False) -> Tensor:
        """Token ids (B, L) -> text embeddings (B, embed_dim)."""
        x = self.text_projection(self.text(ids))
        return F.normalize(x, dim=-1) if normalize else x

    # --------------------------------------------------------- temperature
    def scale(self) -> Tensor:
        """The inverse temperature ``exp(logit_scale)``, capped at ``max_logit_scale``."""
        return self.logit_scale.exp().clamp(max=self.config.max_logit_scale)

    @torch.no_grad()
    def clamp_logit_scale_(self) -> None:
        """Clamp the stored log-scale to ``[0, log(max_logit_scale)]`` (call after each optimizer step)."""
        self.logit_scale.clamp_(0.0, math.log(self.config.max_logit_scale))

    def no_weight_decay(self) -> set[str]:
        """Temperature, bias and the towers' embeddings are not decayed."""
        names = {"logit_scale", "logit_bias", "text.pos_embed"}
        if hasattr(self.visual, "no_weight_decay"):
            names |= {f"visual.{n}" for n in self.visual.no_weight_decay()}
        return names

    def forward(self, images: Tensor, ids: Tensor) -> tuple[Tensor, Tensor]:
        """Images (B_i, C, H, W) and token ids (B_t, L) -> logits per image (B_i, B_t) and per text (B_t, B_i)."""
        img = self.encode_image(images, normalize=True)
        txt = self.encode_text(ids, normalize=True)
        logits = self.scale() * img @ txt.t()
        if self.logit_bias is not None:
            logits = logits + self.logit_bias
        return logits, logits.t()
