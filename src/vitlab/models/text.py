"""Causal text transformer (CLIP's text tower) on the shared components.

Token and learned position embeddings, the shared pre-norm :class:`~vitlab.components.Block`
with a causal attention mask passed to the shared attention, a final LayerNorm, the
end-of-text token's feature as the sentence feature and an optional linear projection.
It is not an image backbone, so it has its own small table of named variants
(:data:`TEXT_VARIANTS`) instead of the image-model registry.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Literal

import torch
from torch import Tensor, nn

from ..components import ACT_LAYERS, Block
from ..config import build_config
from .base import check_config


@dataclass(frozen=True)
class TextConfig:
    """Configuration of a :class:`TextTransformer`.

    Attributes:
        vocab_size: Number of token ids.
        context_length: Longest token sequence (size of the position embedding).
        dim: Token width.
        depth: Number of blocks.
        heads: Attention heads.
        mlp_dim: Hidden width of the MLPs.
        embed_dim: Width of the projected sentence embedding; 0 for no projection.
        act: MLP activation, ``"gelu"`` or ``"quick_gelu"`` (OpenAI CLIP).
        norm_eps: LayerNorm epsilon.
        pool: ``"argmax"`` takes the token with the highest id (OpenAI CLIP: end-of-text has
            the largest id); ``"eos"`` takes the first position holding ``eos_token_id``.
        eos_token_id: End-of-text id, used when ``pool="eos"``.
        dropout: Dropout in the MLPs and after attention.
        attention_dropout: Dropout on the attention probabilities.
    """

    vocab_size: int = 49408
    context_length: int = 77
    dim: int = 512
    depth: int = 12
    heads: int = 8
    mlp_dim: int = 2048
    embed_dim: int = 512
    act: Literal["gelu", "quick_gelu"] = "quick_gelu"
    norm_eps: float = 1e-5
    pool: Literal["argmax", "eos"] = "argmax"
    eos_token_id: int = 49407
    dropout: float = 0.0
    attention_dropout: float = 0.0

    def __post_init__(self) -> None:
        check_config(
            self,
            positive=("vocab_size", "context_length", "dim", "depth", "heads", "mlp_dim"),
            rates=("dropout", "attention_dropout"),
            checks=[
                (self.heads <= 0 or self.dim % self.heads == 0, f"dim ({self.dim}) must be divisible by heads ({self.heads})"),
                (self.embed_dim >= 0, f"embed_dim must be >= 0, got {self.embed_dim}"),
                (self.act in ACT_LAYERS, f"act must be one of {sorted(ACT_LAYERS)}, got {self.act!r}"),
                (self.pool in ("argmax", "eos"), f"pool must be 'argmax' or 'eos', got {self.pool!r}"),
            ],
        )


#: Named text-tower sizes (OpenAI CLIP's towers and a tiny one for tests and toy runs).
TEXT_VARIANTS: dict[str, dict] = {
    "clip_text_tiny": dict(dim=64, depth=2, heads=2, mlp_dim=256, embed_dim=64, context_length=32),
    "clip_text_b": dict(dim=512, depth=12, heads=8, mlp_dim=2048, embed_dim=512),
    "clip_text_l": dict(dim=768, depth=12, heads=12, mlp_dim=3072, embed_dim=768),
}


def text_config(name: str, **overrides) -> TextConfig:
    """The :class:`TextConfig` of a named variant in :data:`TEXT_VARIANTS`, with overrides.

    Raises:
        KeyError: For an unknown variant name (the message lists the known ones).
    """
    if name not in TEXT_VARIANTS:
        raise KeyError(f"unknown text encoder {name!r}; known: {', '.join(sorted(TEXT_VARIANTS))}")
    return build_config(TextConfig, TEXT_VARIANTS[name], **overrides)


def causal_mask(n: int, device: torch.device | None = None, dtype: torch.dtype = torch.float32) -> Tensor:
    """Additive mask (1, 1, N, N): 0 on and below the diagonal, -inf above (no look-ahead)."""
    mask = torch.full((n, n), float("-inf"), device=device, dtype=dtype).triu(1)
    return mask[None, None]


class TextTransformer(nn.Module):
    """CLIP-style causal text encoder.

    Args:
        config: A :class:`TextConfig`; keyword arguments override its fields.

    Example:
        >>> enc = TextTransformer(text_config("clip_text_tiny", vocab_size=100))
        >>> enc(torch.tensor([[98, 5, 7, 99, 0]])).shape
        torch.Size([1, 64])
    """

    def __init__(self, config: TextConfig | None = None, **overrides) -> None:
        super().__init__()
        if config is None or overrides:
            config = build_config(TextConfig, vars(config) if config is not None else {}, **overrides)
        self.config = c = config
        self.token_embedding = nn.Embedding(c.vocab_size, c.dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, c.context_length, c.dim))
        norm = partial(nn.LayerNorm, eps=c.norm_eps)
        self.blocks = nn.ModuleList(
            Block(c.dim, c.heads, c.mlp_dim, dropout=c.dropout, attention_dropout=c.attention_dropout,
                  norm_layer=norm, act_layer=ACT_LAYERS[c.act])
            for _ in range(c.depth)
        )
        self.norm = norm(c.dim)
        self.num_features = c.embed_dim or c.dim
        self.proj = nn.Linear(c.dim, c.embed_dim, bias=False) if c.embed_dim else nn.Identity()
        self.init_weights()

    def init_weights(self) -> None:
        """CLIP's scheme: normal(0.02) token and (0.01) position embeddings, normal(0.02) linears."""
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.pos_embed, std=0.01)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def no_weight_decay(self) -> set[str]:
        """Parameters without weight decay: the position embedding."""
        return {"pos_embed"}

    def check_ids(self, ids: Tensor) -> None:
        """Raise one clear ValueError for token ids of the wrong shape, length or range."""
        c = self.config
        if ids.ndim != 2 or ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"token ids must be an integer tensor (B, L), got {ids.dtype} {tuple(ids.shape)}")
        if ids.shape[1] > c.context_length:
            raise ValueError(f"token sequence of length {ids.shape[1]} exceeds the context length {c.context_length}")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= c.vocab_size):
            raise ValueError(f"token ids must lie in [0, {c.vocab_size}), got [{int(ids.min())}, {int(ids.max())}]")

    def forward_features(self, ids: Tensor) -> Tensor:
        """Token ids (B, L) -> normed token features (B, L, dim) under the causal mask."""
        self.check_ids(ids)
        x = self.token_embedding(ids) + self.pos_embed[:, : ids.shape[1]]  # (B, L, dim)
        mask = causal_mask(ids.shape[1], x.device, x.dtype)  # (1, 1, L, L)
        for blk in self.blocks:
            x = blk(x, attn_bias=mask)
        return self.norm(x)

    def eos_positions(self, ids: Tensor) -> Tensor:
        """Index (B,) of the end-of-text token of every sequence (see :attr:`TextConfig.pool`)."""
        if self.config.pool == "argmax":
            return ids.argmax(dim=-1)
        hit = ids == self.config.eos_token_id
        if not bool(hit.any(dim=-1).all()):
            raise ValueError(f"every sequence must contain the end-of-text id {self.config.eos_token_id}")
        return hit.int().argmax(dim=-1)  # first occurrence

    def forward_head(self, x: Tensor, ids: Tensor) -> Tensor:
        """Token features (B, L, dim) -> projected end-of-text features (B, embed_dim)."""
        pooled = x[torch.arange(x.shape[0], device=x.device), self.eos_positions(ids)]  # (B, dim)
        return self.proj(pooled)

    def forward(self, ids: Tensor) -> Tensor:
        """Token ids (B, L) -> sentence embeddings (B, embed_dim), not normalised."""
        return self.forward_head(self.forward_features(ids), ids)
