"""Tasks built on any backbone through the contract."""

from .classification import ViTClassifier

__all__ = ["ViTClassifier"]
