"""Image classification inference: :class:`ViTClassifier` (a model, its preprocessing and labels)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from ..tasks.classify import ImageClassifier
from .inference import prepare_for_inference


class ViTClassifier(ImageClassifier):
    """A model with its preprocessing and class names, ready to classify images.

    Args:
        model: Any vitlab classifier.
        labels: Class names; defaults to the checkpoint's, ImageNet-1k's for 1000 classes,
            or ``class_<i>``.
        device: Where to run.
        precision: ``fp32``, ``bf16`` (bfloat16 weights and activations), ``bf16-amp``,
            ``fp16`` (autocast, GPU) or ``int8`` (dynamic quantization of the linear layers, CPU);
            see :func:`vitlab.deploy.prepare_for_inference`.
        compile: Run through ``torch.compile`` (the first call compiles).
        tome: Token merging (ToMe) on the runner: ``r`` token pairs merged per block (an int, one
            int per block or ``(r, inflection)``; :func:`vitlab.components.tome.apply_tome`).

    Inputs are checked (see :mod:`vitlab.tasks.inputs`): 16-bit images are scaled, not clipped;
    transparency is composited on the training data's background (black for light-on-dark
    data such as the digits, white otherwise); arrays outside their dtype's range or floats
    outside [0, 1] are refused; NaN / infinite outputs raise instead of printing a confidence.

    Example:
        >>> clf = ViTClassifier.from_pretrained("runs/digits/best")
        >>> clf.predict("seven.png")["class"]
    """

    def __init__(self, model: nn.Module, labels: Sequence[str] | None = None, device: str | torch.device = "cpu",
                 precision: str = "fp32", compile: bool = False, tome: Any = None) -> None:
        super().__init__(model, labels, device)
        self.runner = prepare_for_inference(self.model, precision, compile=compile, device=self.device, tome=tome)

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, device: str | torch.device = "cpu", **kwargs: Any) -> "ViTClassifier":
        """Load from a vitlab/timm/HF checkpoint (file, folder or hub id) or a registered name.

        A registered model name or alias (``swin_t``) loads that model's default hub weights
        (cache first).

        Raises:
            UnknownModelError: Neither an existing path, a hub id nor a model name (with suggestions).
            FileNotFoundError: Weights that are neither cached nor reachable.
        """
        from ..models.registry import resolve_model_name
        from ..pretrained import create_model, is_hub_id, load_model

        src = str(name_or_path)
        looks_like_path = isinstance(name_or_path, Path) or "/" in src or "\\" in src or Path(src).suffix != ""
        if Path(src).exists() or is_hub_id(src) or looks_like_path:
            model = load_model(name_or_path)  # FileNotFoundError names a missing path
        else:
            model = create_model(resolve_model_name(src), pretrained=True)
        return cls(model, device=device, **kwargs)
