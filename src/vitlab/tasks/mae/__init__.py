"""Masked image pre-training: MAE (masking, light decoder, model, checkpoint conversion), SimMIM for
hierarchical backbones, the ``mae`` and ``linear_probe`` tasks, and downstream loading from a run."""

from .convert import detect_mae_layout, load_mae_weights, mae_configs_from_hf, mae_from_hf, split_mae_state_dict
from .decoder import MAEDecoder
from .masking import num_visible, random_masking
from .downstream import encoder_from_run, encoder_state_dict, init_from_overrides, load_encoder_weights
from .model import MAE, LinearProbe, MAEConfig, compose_reconstruction, patchify, unpatchify
from .simmim import SimMIM, SimMIMConfig
from .task import LinearProbeTask, MAETask

__all__ = [
    "MAE", "MAEConfig", "MAEDecoder", "LinearProbe", "LinearProbeTask", "MAETask", "SimMIM", "SimMIMConfig",
    "compose_reconstruction", "detect_mae_layout", "encoder_from_run", "encoder_state_dict", "init_from_overrides",
    "load_encoder_weights", "load_mae_weights", "mae_configs_from_hf", "mae_from_hf", "num_visible", "patchify",
    "random_masking", "split_mae_state_dict", "unpatchify",
]
