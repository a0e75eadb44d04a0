"""Training: the Trainer engine, optimizers, schedulers, losses, mixup, EMA, checkpoints, DDP."""

from .api import ViTTrainer, ViTTransferLearning
from .config import TrainConfig, load_config
from .ema import ModelEma
from .optim import WarmupCosineScheduler, build_optimizer, param_groups, warmup_cosine
from .run import build_trainer, train
from .trainer import Trainer, TrainingDiverged, resolve_device

__all__ = [
    "ModelEma", "TrainConfig",
    "Trainer", "TrainingDiverged", "ViTTrainer", "ViTTransferLearning", "WarmupCosineScheduler", "build_optimizer",
    "build_trainer", "load_config", "resolve_device", "param_groups", "train", "warmup_cosine",
]
