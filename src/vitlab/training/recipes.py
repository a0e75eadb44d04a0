"""Built-in recipes and per-dataset defaults.

``DIGITS_RECIPE`` is what ``vitlab train`` runs with no arguments (configs/digits.yaml holds
the same values; a test keeps the two equal). ``DATASET_DEFAULTS`` holds what a dataset
brings to any recipe: its training size, evaluation crop and augmentation. Precedence, from
weakest to strongest (see the README, "Training: how a config is composed"):

built-in defaults < dataset defaults < recipe YAML < ``--model`` / ``--dataset`` < dotted
``KEY=VALUE`` overrides < explicit flags (``--epochs``, ``--lr``, ...).
"""

from __future__ import annotations

from typing import Any

from ..tasks.registry import get_task

#: A small ViT on scikit-learn's 8x8 digits: 2x2 patches (16 tokens + class token). The
#: model's input size is the data's (``DATASET_DEFAULTS["digits"]``: 8); the augmentation is
#: the digits dataset's own.
DIGITS_RECIPE: dict[str, Any] = {
    "recipe": "digits",
    "task": "classification",
    "model": {
        "name": "vit_tiny_patch16_224",
        "overrides": {"patch_size": 2, "dim": 128, "depth": 6, "heads": 4, "mlp_dim": 256, "drop_path": 0.1},
    },
    "data": {"dataset": "digits", "batch_size": 64, "eval_batch_size": 512},
    "optim": {"lr": 1e-3, "weight_decay": 0.05, "warmup_epochs": 5, "min_lr": 1e-5, "clip_grad": 1.0},
    "epochs": 120,
    "seed": 0,
    "ema_decay": 0.998,
}

def task_recipe(task: str | None) -> dict[str, Any]:
    """The recipe ``vitlab train --task NAME`` starts from without ``--config``: the task's own
    (its plugin's ``default_recipe``), else :data:`DIGITS_RECIPE`."""
    if not task:
        return DIGITS_RECIPE
    return get_task(task).default_recipe or DIGITS_RECIPE


#: What each kind of dataset brings (``vitlab.datasets.pipeline.dataset_kind``): digits at
#: 8x8 with its geometric augmentation (chosen with benchmarks/digits_sweep.py), CIFAR at
#: 32x32, ImageNet trees and image folders at 224 with timm's crop (0.875, bicubic) and
#: random-resized-crop + flip.
DATASET_DEFAULTS: dict[str, dict[str, Any]] = {
    "digits": {
        "data": {"image_size": 8, "crop_pct": 1.0, "interpolation": "bilinear"},
        "augment": {
            "affine_p": 0.8, "affine_degrees": 12.0, "affine_translate": 0.125, "affine_scale": [0.9, 1.1],
            "affine_shear": 0.15, "cutmix_alpha": 1.0, "mixup_prob": 0.3, "label_smoothing": 0.1,
        },
    },
    "cifar": {
        "data": {"image_size": 32, "crop_pct": 1.0, "interpolation": "bilinear"},
        "augment": {"random_resized_crop": True, "crop_scale": [0.5, 1.0], "hflip": 0.5, "label_smoothing": 0.1},
    },
    "digit_scenes": {  # segmentation: the size is the canvas's (segmentation.canvas_size)
        "data": {"image_size": None, "crop_pct": 1.0, "interpolation": "bilinear"},
    },
    "synthetic": {
        "data": {"image_size": 32, "crop_pct": 1.0, "interpolation": "bilinear"},
    },
    "folder": {
        "data": {"image_size": 224, "crop_pct": 0.875, "interpolation": "bicubic"},
        "augment": {"random_resized_crop": True, "crop_scale": [0.08, 1.0], "hflip": 0.5},
    },
}
