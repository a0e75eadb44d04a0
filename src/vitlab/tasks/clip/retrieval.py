"""Image-text retrieval metrics: recall at k, mean and median rank, both directions."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _best_ranks(sim: Tensor, pos: Tensor) -> Tensor:
    """1-based rank of the best-ranked positive of each query row. sim, pos: (Q, G)."""
    if not bool(pos.any(dim=1).all()):
        raise ValueError("every query needs at least one matching item in the gallery")
    # rank of item j for query q: 1 + number of items scoring strictly higher; the best-ranked
    # positive is the highest-scoring one, so count the items above the best positive score
    best = sim.float().masked_fill(~pos, float("-inf")).max(dim=1, keepdim=True).values  # (Q, 1)
    return (sim.float() > best).sum(dim=1) + 1


def _summary(ranks: Tensor, ks: tuple[int, ...], prefix: str) -> dict[str, float]:
    out = {f"{prefix}_R@{k}": float((ranks <= k).float().mean()) for k in ks}
    out[f"{prefix}_mean_rank"] = float(ranks.float().mean())
    out[f"{prefix}_median_rank"] = float(ranks.float().median())
    return out


def retrieval_from_similarity(sim: Tensor, pos: Tensor, ks: tuple[int, ...] = (1, 5, 10),
                              directions: tuple[str, ...] = ("i2t", "t2i")) -> dict[str, float]:
    """Recall@k, mean and median rank of an image-text score matrix with any positives.

    Args:
        sim: (N_i, N_t) scores (higher: more alike), e.g. cosine similarities or re-ranked scores.
        pos: (N_i, N_t) bool, the matching pairs (several per row or column allowed).
        ks: The k of Recall@k.
        directions: Which of ``"i2t"`` (queries are images) and ``"t2i"`` to compute.

    Raises:
        ValueError: When shapes differ or a query has no match.
    """
    if sim.shape != pos.shape or sim.ndim != 2:
        raise ValueError(f"similarities and positives must be the same (N_i, N_t) shape, got "
                         f"{tuple(sim.shape)} and {tuple(pos.shape)}")
    out: dict[str, float] = {}
    if "i2t" in directions:
        out.update(_summary(_best_ranks(sim, pos), ks, "i2t"))
    if "t2i" in directions:
        out.update(_summary(_best_ranks(sim.t(), pos.t()), ks, "t2i"))
    return out


def retrieval_metrics(image_emb: Tensor, text_emb: Tensor, text_to_image: Tensor | None = None,
                      ks: tuple[int, ...] = (1, 5, 10)) -> dict[str, float]:
    """Recall@k, mean and median rank for image->text and text->image retrieval.

    Similarities are cosine similarities. For image->text the rank of an image is the rank
    of its best-ranked matching caption (an image may have several); ties count against
    the query (rank = 1 + number of strictly better items). Median of an even count is the
    lower middle value (``torch.median``).

    Args:
        image_emb: (N_i, D) image embeddings.
        text_emb: (N_t, D) text embeddings.
        text_to_image: (N_t,) index of the image each text describes; ``arange(N_i)`` when None.
        ks: The k of Recall@k.

    Returns:
        ``{"i2t_R@1": ..., "i2t_mean_rank": ..., "i2t_median_rank": ..., "t2i_R@1": ...}``.
    """
    n_i, n_t = image_emb.shape[0], text_emb.shape[0]
    if text_to_image is None:
        if n_i != n_t:
            raise ValueError(f"text_to_image is needed when there are {n_i} images and {n_t} texts")
        text_to_image = torch.arange(n_i, device=image_emb.device)
    if text_to_image.shape != (n_t,) or int(text_to_image.min()) < 0 or int(text_to_image.max()) >= n_i:
        raise ValueError(f"text_to_image must hold one image index in [0, {n_i}) per text ({n_t} texts)")
    sim = F.normalize(image_emb, dim=-1) @ F.normalize(text_emb, dim=-1).t()  # (N_i, N_t)
    pos = text_to_image[None, :] == torch.arange(n_i, device=sim.device)[:, None]  # (N_i, N_t)
    return retrieval_from_similarity(sim, pos, ks)
