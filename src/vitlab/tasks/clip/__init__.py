"""CLIP: contrastive image-text models on any vitlab backbone (model, losses, tokenizer,
zero-shot classification, retrieval metrics, Hugging Face checkpoint conversion)."""

from .losses import clip_loss, positive_mask, siglip_loss
from .model import CLIP, CLIPConfig
from .retrieval import retrieval_from_similarity, retrieval_metrics
from .task import CLIP_DIGITS_RECIPE, CLIPTask
from .zero_shot import zero_shot_accuracy, zero_shot_classifier, zero_shot_weights

__all__ = [
    "CLIP", "CLIPConfig", "CLIPTask", "CLIP_DIGITS_RECIPE", "retrieval_from_similarity", "clip_loss", "positive_mask", "siglip_loss", "retrieval_metrics",
    "zero_shot_accuracy", "zero_shot_classifier", "zero_shot_weights",
]
