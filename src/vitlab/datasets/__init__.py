"""Data: image loading and transforms."""

from .transforms import EvalTransform, center_crop, load_image, normalize, resize, to_tensor
from .augment import (
    CenterCrop, ColorJitter, Compose, Normalize, RandAugment, RandomAffine, RandomErasing, RandomHorizontalFlip,
    RandomResizedCrop, RandomVerticalFlip, Resize, build_eval_transform, build_train_augment,
)
from .cifar import CIFARDataset
from .digits import DigitsDataset
from .factory import DATASET_NAMES, build_dataset
from .folder import ImageFolderDataset, image_folder_splits, imagenet_folder
from .synthetic import SyntheticDataset

__all__ = ["EvalTransform", "center_crop", "load_image", "normalize", "resize", "to_tensor"]
__all__ += [
    "CIFARDataset", "CenterCrop", "ColorJitter", "Compose", "DATASET_NAMES", "DigitsDataset", "ImageFolderDataset",
    "Normalize", "RandAugment", "RandomAffine", "RandomErasing", "RandomHorizontalFlip", "RandomResizedCrop",
    "RandomVerticalFlip", "Resize", "SyntheticDataset", "build_dataset", "build_eval_transform",
    "build_train_augment", "image_folder_splits", "imagenet_folder",
]
