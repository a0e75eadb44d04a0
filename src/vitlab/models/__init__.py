"""Model families. Importing this package registers every variant.

:func:`build_model` makes a randomly initialised model; :func:`vitlab.create_model` (in
:mod:`vitlab.pretrained`) also loads weights.
"""

from . import convnet, deit, vit  # noqa: F401  (registration)
from . import cait  # noqa: F401  (registration)
from . import crossvit  # noqa: F401  (registration)
from . import swin  # noqa: F401  (registration)
from . import pvt, pvt_v2  # noqa: F401  (registration)
from . import vit_hybrid  # noqa: F401  (registration)
from .pvt import PvtConfig, PyramidVisionTransformer
from .pvt_v2 import PvtV2Config, PyramidVisionTransformerV2
from .pyramid import SpatialReductionAttention
from .swin import PatchMerging, SwinConfig, SwinTransformer
from .crossvit import CrossViT, CrossViTConfig
from .cait import CaiT, CaiTConfig
from .base import Backbone, BackboneConfig
from .convnet import ConvNet, ConvNetConfig
from .deit import DeiTConfig, DistilledVisionTransformer
from .registry import (ModelEntry, build_model, get_entry, list_families, list_models, list_task_models,
                       model_config, register_task_model, resolve_model_name)
from .vit import ViTConfig, VisionTransformer

__all__ = [
    "Backbone", "BackboneConfig", "ConvNet", "ConvNetConfig", "DeiTConfig", "DistilledVisionTransformer", "ModelEntry", "ViTConfig", "VisionTransformer",
    "list_task_models", "register_task_model", "build_model", "get_entry", "list_families", "list_models", "model_config", "resolve_model_name",
]
__all__ += ["CaiT", "CaiTConfig"]
__all__ += ["CrossViT", "CrossViTConfig"]
__all__ += ["PatchMerging", "SwinConfig", "SwinTransformer"]
__all__ += ["PvtConfig", "PvtV2Config", "PyramidVisionTransformer", "PyramidVisionTransformerV2", "SpatialReductionAttention"]
