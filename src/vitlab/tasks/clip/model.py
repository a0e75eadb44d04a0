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
from .itm import ITMHead, hardest_negatives, image_tokens, mine_hard_negatives
from .losses import positive_mask

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
        itm_depth: Layers of the image-text matching head (:class:`~vitlab.tasks.clip.itm.ITMHead`);
            0 for no head.
        itm_heads: Attention heads of the matching head.
        itm_image_pos: The matching head adds a fixed 2-D sin-cos encoding of each image token's
            place to the tokens it attends to (needed by backbones without absolute positions, Swin).
    """

    image_model: str = "vit_base_patch16_224"
    image_overrides: dict[str, Any] = field(default_factory=dict)
    text: TextConfig = field(default_factory=TextConfig)
    embed_dim: int = 512
    init_logit_scale: float = 1 / 0.07
    max_logit_scale: float = MAX_LOGIT_SCALE
    logit_bias: float | None = None
    itm_depth: int = 0
    itm_heads: int = 2
    itm_image_pos: bool = False

    def __post_init__(self) -> None:
        if self.itm_depth < 0 or self.itm_heads < 1:
            raise ValueError(f"itm_depth must be >= 0 and itm_heads >= 1, got {self.itm_depth} and {self.itm_heads}")
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
        self.itm: ITMHead | None = None
        if c.itm_depth:
            info = getattr(self.visual, "feature_info", None)
            token_dim = int(info[-1]["num_chs"]) if info else self.visual.num_features  # width of forward_features
            self.itm = ITMHead(text_cfg.dim, token_dim, c.itm_depth, c.itm_heads, image_pos=c.itm_image_pos,
                               num_prefix_tokens=int(getattr(self.visual, "num_prefix_tokens", 0)))
        #: Learning-rate factor of the ITM head in the engine's optimizer (see :meth:`lr_scales`).
        self.itm_lr_scale = 1.0

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

    def image_features(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Images (B, C, H, W) -> (projected embeddings (B, embed_dim), image tokens (B, N, C))."""
        feats = self.visual.forward_features(images)
        emb = self.visual_projection(self.visual.forward_head(feats, pre_logits=True))  # (B, F) -> (B, D)
        return emb, image_tokens(feats)

    def text_features(self, ids: Tensor) -> tuple[Tensor, Tensor]:
        """Token ids (B, L) -> (projected embeddings (B, embed_dim), normed text tokens (B, L, dim))."""
        tokens = self.text.forward_features(ids)
        return self.text_projection(self.text.forward_head(tokens, ids)), tokens

    def itm_logits(self, image_tokens: Tensor, text_tokens: Tensor, ids: Tensor) -> Tensor:
        """Match logits (B,) of aligned pairs of image tokens (B, N, C) and text tokens (B, L, dim).

        Raises:
            ValueError: When the model has no matching head (``itm_depth=0``).
        """
        if self.itm is None:
            raise ValueError("this CLIP model has no image-text matching head (built with itm_depth=0)")
        return self.itm(text_tokens, image_tokens, self.text.eos_positions(ids))

    # --------------------------------------------------------- temperature
    def scale(self) -> Tensor:
        """The inverse temperature ``exp(logit_scale)``, capped at ``max_logit_scale``."""
        return self.logit_scale.exp().clamp(max=self.config.max_logit_scale)

    @torch.no_grad()
    def clamp_logit_scale_(self) -> None:
        """Clamp the stored log-scale to ``[0, log(max_logit_scale)]`` (call after each optimizer step)."""
        self.logit_scale.clamp_(0.0, math.log(self.config.max_logit_scale))

    def lr_scales(self) -> dict[str, float]:
        """Learning-rate factors by parameter-name prefix for the engine's optimizer groups:
        ``itm_lr_scale`` for the ITM head (none when it is 1 or there is no head)."""
        return {"itm.": self.itm_lr_scale} if self.itm is not None and self.itm_lr_scale != 1.0 else {}

    def no_weight_decay(self) -> set[str]:
        """Temperature, bias and the towers' embeddings are not decayed."""
        names = {"logit_scale", "logit_bias", "text.pos_embed"}
        if hasattr(self.visual, "no_weight_decay"):
            names |= {f"visual.{n}" for n in self.visual.no_weight_decay()}
        return names

    def forward(self, images: Tensor, ids: Tensor, labels: Tensor | None = None, train_outputs: bool = False,
                negative_ids: Tensor | None = None, has_negative: Tensor | None = None,
                itm_only: bool = False, hard_negatives: int = 4, shifted_negatives: int = 2,
                itm_residual: float = 0.0, itm_negatives: bool = True, negative_emb: bool = False) -> Any:
        """Images (B_i, C, H, W) and token ids (B_t, L) -> logits per image (B_i, B_t) and per text (B_t, B_i).

        With ``train_outputs`` (the training task's call, so that DDP sees one forward) it
        returns a dict instead: ``image_emb`` and ``text_emb`` (normalised), ``scale``,
        ``bias`` (None without one) and, with a matching head, ``itm_logits`` / ``itm_targets``
        of every image with its own text (1), of every image with its hardest in-batch
        negative text and every text with its hardest negative image (0). ``labels`` (B,)
        mark positives (same label) that are never mined as negatives (None: the diagonal).
        ``negative_ids`` (B, L) are given negative captions of the images (a scene's caption
        with its digits exchanged), paired with their images as further ITM negatives (0)
        where ``has_negative`` (B,) bool is set (None: all).

        With ``itm_only`` as well (the frozen-tower ITM phase) it returns
        :meth:`forward_itm`'s dict, with ``hard_negatives``, ``shifted_negatives`` and
        ``itm_residual``.
        """
        if train_outputs and itm_only:
            return self.forward_itm(images, ids, labels, negative_ids, has_negative, hard_negatives, shifted_negatives,
                                    itm_residual)
        if train_outputs:
            return self.forward_train(images, ids, labels, negative_ids, has_negative, itm_negatives, negative_emb)
        img = self.encode_image(images, normalize=True)
        txt = self.encode_text(ids, normalize=True)
        logits = self.scale() * img @ txt.t()
        if self.logit_bias is not None:
            logits = logits + self.logit_bias
        return logits, logits.t()

    def forward_train(self, images: Tensor, ids: Tensor, labels: Tensor | None = None,
                      negative_ids: Tensor | None = None, has_negative: Tensor | None = None,
                      itm_negatives: bool = True, negative_emb: bool = False) -> dict[str, Any]:
        """See :meth:`forward` with ``train_outputs=True``; ``itm_negatives``: pair the given
        negative captions with their images in the ITM loss; ``negative_emb``: also return their
        normalised text embeddings ``negative_emb`` (B, D) with ``negative_keep`` (B,) bool, the
        rows that have one (contrastive hard negatives of their images, NegCLIP's)."""
        b = images.shape[0]
        img_emb, img_tok = self.image_features(images)
        txt_emb, txt_tok = self.text_features(ids)
        img_emb, txt_emb = F.normalize(img_emb, dim=-1), F.normalize(txt_emb, dim=-1)
        out: dict[str, Any] = {"image_emb": img_emb, "text_emb": txt_emb, "scale": self.scale(), "bias": self.logit_bias}
        use_itm = self.itm is not None and itm_negatives
        keep, neg_tok = None, None
        if negative_ids is not None and (use_itm or negative_emb):  # the text tower runs once on them
            keep = has_negative if has_negative is not None else torch.ones(b, dtype=torch.bool, device=ids.device)
            neg_tok = self.text.forward_features(negative_ids)  # (B, L, dim)
        if self.itm is not None:
            pos = positive_mask(labels, None, b, txt_emb.shape[0], img_emb.device)
            neg_t, has_t, neg_i, has_i = mine_hard_negatives(img_emb.detach() @ txt_emb.detach().t(), pos)
            ar = torch.arange(b, device=img_emb.device)
            img_idx = torch.cat([ar, ar[has_t], neg_i[has_i]])  # positives, image->hard text, text->hard image
            txt_idx = torch.cat([ar, neg_t[has_t], ar[has_i]])
            logits = self.itm_logits(img_tok[img_idx], txt_tok[txt_idx], ids[txt_idx])
            if use_itm and keep is not None and neg_tok is not None and bool(keep.any()):
                # (B', N, C) images with their (B', L, dim) negative captions
                logits = torch.cat([logits, self.itm_logits(img_tok[keep], neg_tok[keep], negative_ids[keep])])
            out["itm_logits"] = logits
            out["itm_targets"] = (torch.arange(logits.shape[0], device=img_emb.device) < b).float()
        if negative_emb and neg_tok is not None:  # the given negative captions as contrastive candidates
            proj = self.text_projection(self.text.forward_head(neg_tok, negative_ids))  # (B, D)
            out["negative_emb"] = F.normalize(proj, dim=-1)
            out["negative_keep"] = keep
        return out

    def forward_itm(self, images: Tensor, ids: Tensor, labels: Tensor | None = None,
                    negative_ids: Tensor | None = None, has_negative: Tensor | None = None,
                    hard_negatives: int = 4, shifted_negatives: int = 2, residual: float = 0.0) -> dict[str, Any]:
        """Training outputs of the ITM head alone, on frozen towers (the ITM phase).

        Both towers run without gradients (the optimizer skips their weights, so they stay
        bit-identical); only the matching head learns. The tokens of a batch are computed
        once and paired many times: every image with its own text (target 1), with its
        ``hard_negatives`` most similar non-positive texts and every text with its
        ``hard_negatives`` most similar non-positive images (by the contrastive similarity),
        every image with the texts ``1 .. shifted_negatives`` places further in the batch
        (random pairs, as batches are shuffled; positives skipped), and every image with its
        given negative caption (``negative_ids`` where ``has_negative``: a scene's mirror
        caption). Positives are mined from ``labels`` (None: the diagonal).

        With ``residual`` > 0 each pair's logit is the head's logit plus ``residual`` x the
        contrastive logit (scale x cosine, without gradient): the score of the fused re-ranking
        with ``itm_fusion = residual``, so the head learns what the similarity misses.

        Returns:
            ``itm_logits`` (P,), ``itm_targets`` (P,) (1: match), ``image_emb`` / ``text_emb``
            (normalised, without gradients), ``scale`` and ``bias``.

        Raises:
            ValueError: When the model has no matching head.
        """
        if self.itm is None:
            raise ValueError("the ITM phase needs a CLIP model with an image-text matching head (itm_depth >= 1)")
        with torch.no_grad():
            img_emb, img_tok = self.image_features(images)
            txt_emb, txt_tok = self.text_features(ids)
            img_emb, txt_emb = F.normalize(img_emb, dim=-1), F.normalize(txt_emb, dim=-1)
            b, device = img_emb.shape[0], img_emb.device
            pos = positive_mask(labels, None, b, txt_emb.shape[0], device)  # (B, B)
            ar = torch.arange(b, device=device)
            img_idx, txt_idx = [ar], [ar]
            k = min(int(hard_negatives), b - 1)
            if k > 0:  # each image's k hardest texts and each text's k hardest images
                hard_t, ok_t, hard_i, ok_i = hardest_negatives(img_emb @ txt_emb.t(), pos, k)  # (B, k) each
                rows = ar[:, None].expand(-1, k)  # (B, k)
                img_idx += [rows[ok_t], hard_i[ok_i]]
                txt_idx += [hard_t[ok_t], rows[ok_i]]
            for shift in range(1, min(int(shifted_negatives), b - 1) + 1):
                other = (ar + shift) % b
                ok = ~pos[ar, other]
                img_idx.append(ar[ok])
                txt_idx.append(other[ok])
            img_idx_all, txt_idx_all = torch.cat(img_idx), torch.cat(txt_idx)
            pair_img, pair_txt, pair_ids = img_tok[img_idx_all], txt_tok[txt_idx_all], ids[txt_idx_all]
            pair_cos = (img_emb[img_idx_all] * txt_emb[txt_idx_all]).sum(dim=-1)  # (P,) cosine of every pair
            if negative_ids is not None:
                keep = has_negative if has_negative is not None else torch.ones(b, dtype=torch.bool, device=device)
                neg_ids = negative_ids[keep]  # (B, L) -> (B', L)
                neg_tok = self.text.forward_features(neg_ids)  # (B', L, dim)
                neg_emb = F.normalize(self.text_projection(self.text.forward_head(neg_tok, neg_ids)), dim=-1)
                pair_img = torch.cat([pair_img, img_tok[keep]])
                pair_txt = torch.cat([pair_txt, neg_tok])  # appended after the in-batch pairs
                pair_ids = torch.cat([pair_ids, neg_ids])
                pair_cos = torch.cat([pair_cos, (img_emb[keep] * neg_emb).sum(dim=-1)])
        logits = self.itm_logits(pair_img, pair_txt, pair_ids)
        if residual:
            logits = logits + residual * self.scale().detach() * pair_cos.to(logits.dtype)
        targets = (torch.arange(logits.shape[0], device=logits.device) < b).float()
        return {"itm_logits": logits, "itm_targets": targets, "image_emb": img_emb, "text_emb": txt_emb,
                "scale": self.scale().detach(), "bias": self.logit_bias}
