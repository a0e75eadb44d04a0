"""vitlab: Vision Transformers in PyTorch."""

from .components import capture_attention
from .deploy import ViTClassifier
from .deploy.pipeline import Pipeline, pipeline
from .evaluation.visualization import AttentionVisualizer
from .models import DeiTConfig, ViTConfig, VisionTransformer, list_models
from .pretrained import create_model, load_model, save_checkpoint
from .tasks.loading import load
from .training import TrainConfig, ViTTrainer, ViTTransferLearning

__version__ = "0.1.0"

__all__ = [
    "DeiTConfig", "TrainConfig", "ViTClassifier", "ViTTrainer", "ViTTransferLearning", "ViTConfig", "VisionTransformer", "capture_attention", "create_model",
    "list_models", "load_model", "save_checkpoint", "__version__",
]
__all__ += ["AttentionVisualizer", "Pipeline", "load", "pipeline"]
