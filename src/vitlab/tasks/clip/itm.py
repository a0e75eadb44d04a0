"""Image-text matching (ITM): a cross-modal head that re-ranks contrastive retrieval.

The text tokens (the text tower's normed token features) cross-attend to the image tokens
(the image backbone's tokens before pooling; optionally with a fixed 2-D sine-cosine encoding
of where each token sits, for backbones whose tokens carry no absolute position, such as Swin)
with the shared :class:`~vitlab.components.attention.CrossAttention`, then run a causal self-attention block;
the end-of-text token's feature gives one match logit. It is trained with hard negatives
mined from the contrastive similarities of the batch (the most similar non-positive text of
every image and image of every text), and used to re-rank the top-k of retrieval.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...components import ACT_LAYERS, Block
from ...components.attention import CrossAttention
from ...components.embeddings import sincos_2d_pos_embed
from ...models.text import causal_mask


class ITMHead(nn.Module):
    """Match logit of (image tokens, text tokens) pairs.

    Each of ``depth`` layers: text tokens cross-attend to the image tokens (pre-norm block
    with the shared CrossAttention and MLP), then a causal self-attention block.

    Args:
        text_dim: Width of the text tokens (the head's width).
        image_dim: Width of the image tokens (projected to ``text_dim``).
        depth: Number of cross + self layers.
        heads: Attention heads.
        mlp_ratio: MLP hidden width / ``text_dim``.
        act: MLP activation name.
        image_pos: Add a fixed 2-D sine-cosine position encoding (:func:`sincos_2d_pos_embed`)
            to the projected image tokens, so that a text token can ask *where* something is
            even when the backbone's tokens hold no absolute position (Swin's relative bias);
            the tokens must form a square grid after ``num_prefix_tokens`` (which get none).
        num_prefix_tokens: Image tokens before the grid (a ViT's class token).
    """

    def __init__(self, text_dim: int, image_dim: int, depth: int = 1, heads: int = 4, mlp_ratio: float = 4.0,
                 act: str = "gelu", image_pos: bool = False, num_prefix_tokens: int = 0) -> None:
        super().__init__()
        if depth < 1:
            raise ValueError(f"the ITM head needs depth >= 1, got {depth}")
        if image_pos and text_dim % 4:
            raise ValueError(f"the ITM head's image position encoding needs a width divisible by 4, got {text_dim}")
        self.image_pos, self.num_prefix_tokens = image_pos, num_prefix_tokens
        mlp = int(text_dim * mlp_ratio)
        self.image_proj = nn.Linear(image_dim, text_dim)
        self.image_norm = nn.LayerNorm(text_dim)
        self.cross = nn.ModuleList(
            Block(text_dim, heads, mlp, act_layer=ACT_LAYERS[act], attn=CrossAttention(text_dim, heads))
            for _ in range(depth)
        )
        self.self_blocks = nn.ModuleList(Block(text_dim, heads, mlp, act_layer=ACT_LAYERS[act]) for _ in range(depth))
        self.norm = nn.LayerNorm(text_dim)
        self.head = nn.Linear(text_dim, 1)

    def forward(self, text_tokens: Tensor, image_tokens: Tensor, eos: Tensor) -> Tensor:
        """Match logits (B,) of text tokens (B, L, Ct), image tokens (B, N, Ci) and end-of-text positions (B,)."""
        if text_tokens.shape[0] != image_tokens.shape[0]:
            raise ValueError(f"the ITM head pairs texts and images one to one, got {text_tokens.shape[0]} texts "
                             f"and {image_tokens.shape[0]} images")
        context = self.image_norm(self.image_proj(image_tokens))  # (B, N, Ci) -> (B, N, Ct)
        if self.image_pos:
            context = context + self.position_encoding(context.shape[1]).to(context)[None]
        mask = causal_mask(text_tokens.shape[1], text_tokens.device, text_tokens.dtype)  # (1, 1, L, L)
        x = text_tokens
        for cross, blk in zip(self.cross, self.self_blocks):
            x = cross(x, context=context)
            x = blk(x, attn_bias=mask)
        pooled = self.norm(x[torch.arange(x.shape[0], device=x.device), eos])  # (B, Ct)
        return self.head(pooled).squeeze(-1)  # (B, 1) -> (B,)

    def position_encoding(self, num_tokens: int) -> Tensor:
        """(N, width) fixed encoding of N image tokens: zeros for the prefix tokens, then the
        2-D sin-cos encoding of a square grid."""
        n = num_tokens - self.num_prefix_tokens
        side = math.isqrt(max(n, 0))
        if n <= 0 or side * side != n:
            raise ValueError(f"the ITM head's image position encoding needs the image tokens to form a square grid "
                             f"after {self.num_prefix_tokens} prefix token(s), got {num_tokens} tokens")
        width = self.image_proj.out_features
        return torch.cat([torch.zeros(self.num_prefix_tokens, width), sincos_2d_pos_embed(width, (side, side))])


def image_tokens(features: Tensor) -> Tensor:
    """A backbone's ``forward_features`` output as tokens: (B, N, C) stays, (B, C, H, W) -> (B, H*W, C)."""
    if not isinstance(features, Tensor):
        raise ValueError("the ITM head needs an image backbone whose forward_features returns one tensor of tokens "
                         f"or a map, got {type(features).__name__}")
    if features.ndim == 4:
        return features.flatten(2).transpose(1, 2)  # (B, C, H, W) -> (B, C, H*W) -> (B, H*W, C)
    if features.ndim != 3:
        raise ValueError(f"image features must be tokens (B, N, C) or a map (B, C, H, W), got {tuple(features.shape)}")
    return features


@torch.no_grad()
def hardest_negatives(sim: Tensor, pos: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The ``k`` hardest in-batch negatives of a contrastive similarity matrix, positives excluded.

    Args:
        sim: (B_i, B_t) image-text similarities.
        pos: (B_i, B_t) bool, the positive pairs.
        k: Negatives per image and per text (at most ``min(B_i, B_t)``).

    Returns:
        ``(neg_text, ok_text, neg_image, ok_image)``: for every image the indices of its ``k``
        most similar non-positive texts, most similar first (B_i, k), and whether each exists
        (B_i, k) bool (a row with fewer than ``k`` non-positives); the same for every text
        (B_t, k).
    """
    masked = sim.float().masked_fill(pos, float("-inf"))  # positives are never mined
    neg_text = masked.topk(k, dim=1).indices  # (B_i, k)
    neg_image = masked.t().topk(k, dim=1).indices  # (B_t, k)
    ok_text = torch.isfinite(masked.gather(1, neg_text))
    ok_image = torch.isfinite(masked.t().gather(1, neg_image))
    return neg_text, ok_text, neg_image, ok_image


def mine_hard_negatives(sim: Tensor, pos: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The hardest in-batch negative of every image and every text (:func:`hardest_negatives`
    with ``k = 1``): ``(neg_text (B_i,), has_neg_text (B_i,) bool, neg_image (B_t,), has_neg_image (B_t,))``."""
    neg_text, ok_text, neg_image, ok_image = hardest_negatives(sim, pos, 1)
    return neg_text[:, 0], ok_text[:, 0], neg_image[:, 0], ok_image[:, 0]


def itm_loss(logits: Tensor, targets: Tensor, balanced: bool = False) -> Tensor:
    """Binary cross-entropy of match logits (P,) against 1 (match) / 0 (no match) targets (P,).

    Args:
        logits: (P,) match logits.
        targets: (P,) 1 for a match, 0 for none.
        balanced: Average the positives' and the negatives' mean losses (each half the
            weight, however many negatives there are) instead of all pairs alike.
    """
    logits, targets = logits.float(), targets.float()
    if not balanced:
        return F.binary_cross_entropy_with_logits(logits, targets)
    per_pair = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")  # (P,)
    is_pos = targets > 0.5
    parts = [per_pair[m].mean() for m in (is_pos, ~is_pos) if bool(m.any())]
    return torch.stack(parts).mean()


@torch.no_grad()
def rerank_top_k(sim: Tensor, k: int, score: Callable[[Tensor, Tensor], Tensor], fusion: float = 0.0) -> Tensor:
    """Re-rank the top-k gallery items of every query by an ITM score (optionally fused with the similarity).

    Args:
        sim: (Q, G) query-gallery similarities (e.g. text -> image).
        k: How many top items of every query are re-ranked (the rest keep their order below them).
        score: ``score(query_index (P,), gallery_index (P,)) -> (P,)`` match logits of pairs.
        fusion: Weight of the similarity added to the ITM logit of each re-ranked pair
            (0: the ITM logit alone; the contrastive logit scale x cosine for a sum of logits).

    Returns:
        A (Q, G) score matrix: the top-k items of each query ordered by ``ITM logit + fusion
        x similarity`` and placed above every other item, whose similarity is unchanged.
    """
    k = min(k, sim.shape[1])
    top = sim.topk(k, dim=1).indices  # (Q, k)
    q = torch.arange(sim.shape[0], device=sim.device)[:, None].expand_as(top)
    # (Q, k) -> (Q * k,) pairs; their logits (Q * k,) -> (Q, k)
    logits = score(q.reshape(-1), top.reshape(-1)).view(top.shape).float().to(sim.device)
    out = sim.float().clone()
    if fusion:
        logits = logits + fusion * out.gather(1, top)  # (Q, k) ITM + weighted similarity
    # above every similarity: shift the ITM logits so that the lowest re-ranked one beats the best rest
    offset = out.max() - logits.min() + 1.0
    out.scatter_(1, top, logits + offset)
    return out


__all__ = ["ITMHead", "hardest_negatives", "image_tokens", "itm_loss", "mine_hard_negatives", "rerank_top_k"]
