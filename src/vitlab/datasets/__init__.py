"""Data: image loading and transforms."""

from .transforms import EvalTransform, center_crop, load_image, normalize, resize, to_tensor

__all__ = ["EvalTransform", "center_crop", "load_image", "normalize", "resize", "to_tensor"]
