"""Batched, seedable data augmentation on float image tensors (B, C, H, W) in [0, 1].

Every transform is an ``nn.Module`` called as ``t(x, generator=None)``: all its random numbers
come from ``generator`` (a ``torch.Generator``; the global RNG when None) and each call draws a
fixed number of them, so the same seed gives the same output on every run. Randomness is per
sample (every image gets its own crop, flip, jitter, ops ...). Plain torch, so the ops run on the
batch's device (CPU or GPU) after collation.

Modules: :mod:`.base` (``BatchTransform``, ``Compose``, ``Normalize``, seeded random numbers),
:mod:`.geometric`, :mod:`.colour`, :mod:`.rand_augment`, :mod:`.erasing` and :mod:`.recipes`
(:func:`build_train_augment`, :func:`build_eval_transform`).

Typical use (what :func:`build_train_augment` returns)::

    aug = Compose([RandomResizedCrop(224), RandomHorizontalFlip(), RandAugment(2, 9),
                   Normalize(mean, std), RandomErasing(0.25)])
    x = aug(batch, generator=torch.Generator(device=batch.device).manual_seed(step))
"""

from .base import BatchTransform, Compose, Normalize
from .colour import ColorJitter, equalize, hsv_to_rgb, rgb_to_hsv
from .erasing import RandomErasing
from .geometric import CenterCrop, RandomAffine, RandomHorizontalFlip, RandomResizedCrop, RandomVerticalFlip, Resize
from .rand_augment import RAND_AUGMENT_OPS, RandAugment, parse_rand_augment
from .recipes import IMAGENET_MEAN, IMAGENET_STD, build_eval_transform, build_train_augment

__all__ = [
    "BatchTransform", "CenterCrop", "ColorJitter", "Compose", "IMAGENET_MEAN", "IMAGENET_STD", "Normalize",
    "RAND_AUGMENT_OPS", "RandAugment", "RandomAffine", "RandomErasing", "RandomHorizontalFlip", "RandomResizedCrop",
    "RandomVerticalFlip", "Resize", "build_eval_transform", "build_train_augment", "equalize", "hsv_to_rgb",
    "parse_rand_augment", "rgb_to_hsv",
]
