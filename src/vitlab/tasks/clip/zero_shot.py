"""Zero-shot classification with prompt-template ensembles."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..inputs import background_for, input_notes, to_unit_tensor

if TYPE_CHECKING:
    from .model import CLIP
    from .tokenizer import CLIPTokenizer

#: A few of CLIP's ImageNet prompt templates.
DEFAULT_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "a blurry photo of a {}.",
    "a photo of the large {}.",
    "a photo of the small {}.",
    "itap of a {}.",
)


def zero_shot_weights(text_emb: Tensor) -> Tensor:
    """Per-class text embeddings (K, T, D) (K classes x T templates) -> classifier (D, K).

    Each template embedding is L2-normalised, the T of a class are averaged and the mean is
    normalised again (CLIP's prompt ensembling).
    """
    if text_emb.ndim != 3:
        raise ValueError(f"text embeddings must be (classes, templates, dim), got {tuple(text_emb.shape)}")
    mean = F.normalize(text_emb, dim=-1).mean(dim=1)  # (K, D)
    return F.normalize(mean, dim=-1).t()  # (D, K)


@torch.no_grad()
def zero_shot_classifier(model: CLIP, tokenizer: CLIPTokenizer, classnames: Sequence[str],
                         templates: Sequence[str] = DEFAULT_TEMPLATES) -> Tensor:
    """Build the zero-shot classifier (D, K) of ``classnames`` from ``templates`` (``"{}"`` = class)."""
    if not classnames or not templates:
        raise ValueError("zero-shot classification needs at least one class name and one template")
    return zero_shot_classifier_from_prompts(model, tokenizer, [[t.format(c) for t in templates] for c in classnames])


@torch.no_grad()
def zero_shot_classifier_from_prompts(model: CLIP, tokenizer: CLIPTokenizer, prompts: Sequence[Sequence[str]],
                                      batch_size: int = 256) -> Tensor:
    """The zero-shot classifier (D, K) of K classes given as lists of prompts (the same number each).

    Raises:
        ValueError: No class, an empty prompt list, or classes with different numbers of prompts.
    """
    if not prompts or any(len(p) != len(prompts[0]) for p in prompts) or not prompts[0]:
        raise ValueError("zero-shot classification needs at least one class and the same number (>= 1) of "
                         "prompts for every class")
    texts = [t for p in prompts for t in p]
    device = model.logit_scale.device
    emb = torch.cat([model.encode_text(tokenizer(texts[i : i + batch_size]).to(device))
                     for i in range(0, len(texts), batch_size)])  # (K * T, D)
    return zero_shot_weights(emb.view(len(prompts), len(prompts[0]), -1))  # (K*T, D) -> (K, T, D)


def zero_shot_logits(image_emb: Tensor, weights: Tensor, scale: float | Tensor = 100.0) -> Tensor:
    """Normalised image embeddings (B, D) times the classifier (D, K), scaled -> logits (B, K)."""
    return scale * F.normalize(image_emb, dim=-1) @ weights


def zero_shot_accuracy(image_emb: Tensor, weights: Tensor, targets: Tensor, topk: Sequence[int] = (1, 5)
                       ) -> dict[str, float]:
    """Top-k accuracies (fractions) of the zero-shot classifier; k larger than K counts as K."""
    logits = zero_shot_logits(image_emb, weights)
    k_max = min(max(topk), logits.shape[1])
    top = logits.topk(k_max, dim=1).indices  # (B, k_max)
    hit = top == targets[:, None]
    return {f"top{k}": float(hit[:, : min(k, k_max)].any(dim=1).float().mean()) for k in topk}


def _input_spec(model: "CLIP") -> tuple[int, int, tuple[float, ...], tuple[float, ...]]:
    """The input side, channels, mean and std a CLIP checkpoint records."""
    pcfg = getattr(model, "pretrained_cfg", {}) or {}
    size = model.config.image_overrides.get("image_size", 224)
    size = int(size[-1] if isinstance(size, (list, tuple)) else size)
    channels = int(model.config.image_overrides.get("in_channels", 3))
    mean = tuple(pcfg.get("mean", (0.48145466, 0.4578275, 0.40821073)))[:channels]
    std = tuple(pcfg.get("std", (0.26862954, 0.26130258, 0.27577711)))[:channels]
    return size, channels, mean, std


def zero_shot_notes(model: CLIP, images: Sequence[Any]) -> list[list[str]]:
    """Per image: notes on how far it is from the CLIP checkpoint's training images.

    The check of ``vitlab predict`` and ``vitlab explain``
    (:func:`~vitlab.tasks.inputs.input_notes`: size, channels, a uniform image, inverted polarity,
    mean intensity), against the image tower's input size and channels and the checkpoint's
    normalisation; a zero-shot answer on an image far from the training data is no answer.

    Args:
        model: The CLIP model (its ``pretrained_cfg`` holds the training data's ``mean`` / ``std``).
        images: Paths, PIL images, arrays or tensors (a (B, ...) array or tensor counts as B images).

    Returns:
        One list of note strings per image, empty when nothing looks off.

    Raises:
        FileNotFoundError: A path that does not exist.
        InputError: An input that is not an image.
    """
    size, channels, mean, std = _input_spec(model)
    pcfg = {**(getattr(model, "pretrained_cfg", {}) or {}), "input_size": [channels, size, size],
            "mean": list(mean), "std": list(std)}
    background = background_for(pcfg)
    notes: list[list[str]] = []
    for image in images:
        t = to_unit_tensor(image, background)
        for unit in t.unbind(0) if t.ndim == 4 else [t]:
            notes.append(input_notes(unit, pcfg, channels))
    return notes
