"""Image classification inference: :class:`ViTClassifier`."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from ..datasets.transforms import EvalTransform, ImageLike
from ..deploy.inference import prepare_for_inference
from .inputs import background_for, check_finite, input_notes, to_unit_tensor


def _is_batch(image: Any) -> bool:
    if isinstance(image, (list, tuple)):
        return True
    if isinstance(image, Tensor):
        return image.ndim == 4
    if hasattr(image, "ndim") and not isinstance(image, (str, Path)):
        return image.ndim == 4
    return False


class ViTClassifier:
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

    Inputs are checked (see :mod:`vitlab.tasks.inputs`): 16-bit images are scaled, not clipped;
    transparency is composited on the training data's background (black for light-on-dark
    data such as the digits, white otherwise); arrays outside their dtype's range or floats
    outside [0, 1] are refused; NaN / infinite outputs raise instead of printing a confidence.

    Example:
        >>> clf = ViTClassifier.from_pretrained("runs/digits/best")
        >>> clf.predict("seven.png")["class"]
    """

    def __init__(self, model: nn.Module, labels: Sequence[str] | None = None, device: str | torch.device = "cpu",
                 precision: str = "fp32", compile: bool = False) -> None:
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.runner = prepare_for_inference(self.model, precision, compile=compile, device=self.device)
        n = model.config.num_classes
        if labels is None:
            labels = getattr(model, "labels", None)
        if labels is None and n == 1000:
            from ..pretrained import imagenet_labels

            labels = imagenet_labels()
        if labels is None:
            labels = [f"class_{i}" for i in range(n)]
        if len(labels) != n:
            raise ValueError(f"got {len(labels)} labels for a model with {n} classes")
        self.labels = list(labels)
        self.transform = EvalTransform.from_config(model.pretrained_cfg, channels=model.config.in_channels)
        #: Value transparent pixels are composited on (0: black, 1: white).
        self.background = background_for(model.pretrained_cfg)

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, device: str | torch.device = "cpu", **kwargs: Any) -> "ViTClassifier":
        """Load from a vitlab/timm/HF checkpoint (file, folder or hub id) or a registered name.

        A registered model name or alias (``swin_t``) loads that model's default hub weights
        (cache first).

        Raises:
            UnknownModelError: Neither an existing path, a hub id nor a model name (with suggestions).
            FileNotFoundError: Weights that are neither cached nor reachable.
        """
        from ..models.registry import create_model, resolve_model_name
        from ..pretrained import is_hub_id, load_model

        src = str(name_or_path)
        looks_like_path = isinstance(name_or_path, Path) or "/" in src or "\\" in src or Path(src).suffix != ""
        if Path(src).exists() or is_hub_id(src) or looks_like_path:
            model = load_model(name_or_path)  # FileNotFoundError names a missing path
        else:
            model = create_model(resolve_model_name(src), pretrained=True)
        return cls(model, device=device, **kwargs)

    def _unit_images(self, image: ImageLike | Sequence[ImageLike]) -> list[Tensor]:
        """Checked images, each float (C, H, W) in [0, 1] (a batch is split into its images)."""
        items = list(image) if isinstance(image, (list, tuple)) else [image]
        out: list[Tensor] = []
        for item in items:
            t = to_unit_tensor(item, self.background)
            out.extend(t.unbind(0) if t.ndim == 4 else [t])
        return out

    def preprocess(self, image: ImageLike | Sequence[ImageLike]) -> Tensor:
        """Images -> the normalised batch the model expects (B, C, S, S)."""
        return torch.cat([self.transform(t) for t in self._unit_images(image)]).to(self.device)

    def notes(self, image: ImageLike | Sequence[ImageLike]) -> list[list[str]]:
        """Per image: notes on how far it is from the training data (size, channels, polarity)."""
        channels = self.model.config.in_channels
        return [input_notes(t, self.model.pretrained_cfg, channels) for t in self._unit_images(image)]

    @torch.inference_mode()
    def predict_proba(self, image: ImageLike | Sequence[ImageLike]) -> Tensor:
        """Class probabilities (B, num_classes).

        Raises:
            NonFiniteOutputError: The model's outputs hold NaN or infinity.
        """
        logits = self.runner(self.preprocess(image))
        check_finite(logits)
        return logits.softmax(dim=-1)

    def predict(self, image: ImageLike | Sequence[ImageLike], top_k: int = 5) -> dict[str, Any] | list[dict[str, Any]]:
        """Classify one image (a dict) or a batch/list (a list of dicts).

        Each result: ``{"class": label, "index": i, "confidence": p, "top_k": [{"class", "index",
        "confidence"}, ...], "notes": [...]}``; ``notes`` says when the image is far from the
        training data (size, channels, inverted polarity, mean intensity), else it is empty.

        Raises:
            InputError: An image vitlab cannot take (see the class docstring).
            NonFiniteOutputError: The model's outputs hold NaN or infinity.
        """
        units = self._unit_images(image)
        with torch.inference_mode():
            logits = self.runner(torch.cat([self.transform(t) for t in units]).to(self.device))
        names = [str(p) for p in image] if isinstance(image, (list, tuple)) else [str(image)] \
            if isinstance(image, (str, Path)) else None
        check_finite(logits, names)
        probs = logits.softmax(dim=-1)
        channels = self.model.config.in_channels
        k = max(1, min(top_k, probs.shape[1]))
        values, indices = probs.topk(k, dim=1)
        results = []
        for unit, vals, idx in zip(units, values.tolist(), indices.tolist()):
            top = [{"class": self.labels[i], "index": i, "confidence": p} for p, i in zip(vals, idx)]
            results.append({**top[0], "top_k": top, "notes": input_notes(unit, self.model.pretrained_cfg, channels)})
        return results if _is_batch(image) else results[0]
