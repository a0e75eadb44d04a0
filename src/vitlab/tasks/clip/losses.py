"""Contrastive losses of CLIP (symmetric softmax) and SigLIP (pairwise sigmoid).

Both accept ``labels``: pairs whose labels are equal (same caption, same class) are all
positives, so duplicate captions in a batch are never pushed apart as negatives.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def positive_mask(image_labels: Tensor | None, text_labels: Tensor | None, n_images: int, n_texts: int,
                  device: torch.device | None = None) -> Tensor:
    """Boolean (B_i, B_t) matrix of positive pairs.

    Args:
        image_labels: (B_i,) group id per image (a caption id or class); None for the diagonal.
        text_labels: (B_t,) group id per text; defaults to ``image_labels``.
        n_images: B_i.
        n_texts: B_t.
        device: Device of the result when both labels are None.

    Returns:
        ``pos[i, j]`` is True when image i and text j belong together.

    Raises:
        ValueError: Without labels, when B_i != B_t; or for labels of the wrong length.
    """
    if image_labels is None and text_labels is None:
        if n_images != n_texts:
            raise ValueError(f"without labels the batch must pair images and texts one to one, got "
                             f"{n_images} images and {n_texts} texts")
        return torch.eye(n_images, dtype=torch.bool, device=device)
    image_labels = text_labels if image_labels is None else image_labels
    text_labels = image_labels if text_labels is None else text_labels
    if image_labels.shape != (n_images,) or text_labels.shape != (n_texts,):
        raise ValueError(f"labels must have shapes ({n_images},) and ({n_texts},), got "
                         f"{tuple(image_labels.shape)} and {tuple(text_labels.shape)}")
    return image_labels[:, None] == text_labels[None, :]


def _soft_ce(logits: Tensor, pos: Tensor) -> Tensor:
    """Cross-entropy of each row against the uniform distribution over its positives."""
    target = pos.float() / pos.sum(dim=1, keepdim=True).clamp(min=1)  # rows sum to 1
    return -(target * logits.log_softmax(dim=1)).sum(dim=1).mean()


def clip_loss(image_emb: Tensor, text_emb: Tensor, scale: Tensor | float, labels: Tensor | None = None,
              text_labels: Tensor | None = None, negative_text_emb: Tensor | None = None,
              negative_text_labels: Tensor | None = None) -> Tensor:
    """CLIP's symmetric contrastive loss with multi-positive targets.

    ``logits = scale * normalize(image_emb) @ normalize(text_emb).T``; the loss is the mean
    of the image->text and text->image cross-entropies, each row's target spread evenly over
    its positives (the diagonal when no labels are given: CLIP's loss exactly).

    Args:
        image_emb: (B_i, D) image embeddings.
        text_emb: (B_t, D) text embeddings.
        scale: Inverse temperature (e.g. :meth:`CLIP.scale`).
        labels: (B_i,) group ids of the images (and of the texts when ``text_labels`` is None).
        text_labels: (B_t,) group ids of the texts.
        negative_text_emb: (B_n, D) further texts that are candidates of the images only, not
            queries (NegCLIP's hard negatives: a scene's caption with its digits exchanged); they
            join the image->text rows as extra columns.
        negative_text_labels: (B_n,) their group ids (a negative text whose group an image has
            is that image's positive); None: negatives of every image.

    Returns:
        Scalar loss.
    """
    img = F.normalize(image_emb, dim=-1)
    txt = F.normalize(text_emb, dim=-1)
    logits = scale * img @ txt.t()  # (B_i, B_t)
    pos = positive_mask(labels, text_labels, img.shape[0], txt.shape[0], img.device)
    i2t, i2t_pos = logits, pos
    if negative_text_emb is not None:
        neg = F.normalize(negative_text_emb, dim=-1)
        if negative_text_labels is not None and labels is not None:
            neg_pos = positive_mask(labels, negative_text_labels, img.shape[0], neg.shape[0], img.device)
        else:
            neg_pos = torch.zeros(img.shape[0], neg.shape[0], dtype=torch.bool, device=img.device)
        i2t = torch.cat([logits, scale * img @ neg.t()], dim=1)  # (B_i, B_t + B_n)
        i2t_pos = torch.cat([pos, neg_pos], dim=1)
    return 0.5 * (_soft_ce(i2t, i2t_pos) + _soft_ce(logits.t(), pos.t()))


def siglip_loss(image_emb: Tensor, text_emb: Tensor, scale: Tensor | float, bias: Tensor | float,
                labels: Tensor | None = None, text_labels: Tensor | None = None) -> Tensor:
    """SigLIP's pairwise sigmoid loss: ``-sum log sigmoid(z_ij (scale x_i.y_j + bias)) / B_i``.

    ``z_ij`` is +1 for positive pairs (see :func:`positive_mask`) and -1 otherwise.

    Args:
        image_emb: (B_i, D) image embeddings.
        text_emb: (B_t, D) text embeddings.
        scale: Inverse temperature.
        bias: Logit bias (SigLIP initialises it at -10).
        labels: (B_i,) group ids of the images (and texts when ``text_labels`` is None).
        text_labels: (B_t,) group ids of the texts.

    Returns:
        Scalar loss.
    """
    img = F.normalize(image_emb, dim=-1)
    txt = F.normalize(text_emb, dim=-1)
    logits = scale * img @ txt.t() + bias  # (B_i, B_t)
    pos = positive_mask(labels, text_labels, img.shape[0], txt.shape[0], img.device)
    z = pos.float() * 2 - 1
    return -F.logsigmoid(z * logits).sum() / img.shape[0]
