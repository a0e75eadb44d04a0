"""Model families. Importing this package registers every variant."""

from . import deit, vit  # noqa: F401  (registration)
from .base import Backbone
from .deit import DeiTConfig, DistilledVisionTransformer
from .registry import ModelEntry, build_model, create_model, get_entry, list_families, list_models, model_config
from .vit import ViTConfig, VisionTransformer

__all__ = [
    "Backbone", "DeiTConfig", "DistilledVisionTransformer", "ModelEntry", "ViTConfig", "VisionTransformer",
    "build_model", "create_model", "get_entry", "list_families", "list_models", "model_config",
]
