"""Training: the Trainer engine, optimizers, schedulers, losses, mixup, EMA, checkpoints, DDP."""

from .api import ViTTrainer, ViTTransferLearning
from .config import TrainConfig, load_config
from .ema import ModelEma
from .losses import DistillationLoss, LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from .mixup import Mixup
from .optim import WarmupCosineScheduler, build_optimizer, param_groups, warmup_cosine
from .run import build_trainer, train
from .trainer import Trainer, TrainingDiverged, evaluate_model

__all__ = [
    "DistillationLoss", "LabelSmoothingCrossEntropy", "Mixup", "ModelEma", "SoftTargetCrossEntropy", "TrainConfig",
    "Trainer", "TrainingDiverged", "ViTTrainer", "ViTTransferLearning", "WarmupCosineScheduler", "build_optimizer",
    "build_trainer", "evaluate_model", "load_config", "param_groups", "train", "warmup_cosine",
]
