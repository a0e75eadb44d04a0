"""Masked autoencoder pre-training (MAE): masking, the light decoder, the model, checkpoint conversion."""

from .convert import detect_mae_layout, load_mae_weights, mae_configs_from_hf, mae_from_hf, split_mae_state_dict
from .decoder import MAEDecoder
from .masking import num_visible, random_masking
from .model import MAE, LinearProbe, MAEConfig, patchify, unpatchify

__all__ = [
    "MAE", "MAEConfig", "MAEDecoder", "LinearProbe", "detect_mae_layout", "load_mae_weights", "mae_configs_from_hf",
    "mae_from_hf", "num_visible", "patchify", "random_masking", "split_mae_state_dict", "unpatchify",
]
