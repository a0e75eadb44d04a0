"""Built-in recipes. ``DIGITS_RECIPE`` is what ``vitlab train`` runs with no arguments
(configs/digits.yaml holds the same values; a test keeps the two equal)."""

from __future__ import annotations

from typing import Any

#: A small ViT on scikit-learn's 8x8 digits: 2x2 patches (16 tokens + class token).
DIGITS_RECIPE: dict[str, Any] = {
    "model": {
        "name": "vit_tiny_patch16_224",
        "overrides": {"image_size": 8, "patch_size": 2, "dim": 128, "depth": 6, "heads": 4, "mlp_dim": 256,
                      "drop_path": 0.1},
    },
    "data": {"dataset": "digits", "batch_size": 64, "eval_batch_size": 512},
    "augment": {
        "affine_p": 0.8, "affine_degrees": 12.0, "affine_translate": 0.125, "affine_scale": [0.9, 1.1],
        "affine_shear": 0.15,
        "cutmix_alpha": 1.0, "mixup_prob": 0.3,
        "label_smoothing": 0.1,
    },
    "optim": {"lr": 1e-3, "weight_decay": 0.05, "warmup_epochs": 5, "min_lr": 1e-5, "clip_grad": 1.0},
    "epochs": 120,
    "seed": 0,
    "ema_decay": 0.998,
    "output_dir": "runs/digits",
}
