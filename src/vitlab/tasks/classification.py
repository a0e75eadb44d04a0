"""Image classification inference: :class:`ViTClassifier`."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from ..datasets.transforms import EvalTransform, ImageLike
from ..deploy.inference import prepare_for_inference


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

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, device: str | torch.device = "cpu", **kwargs: Any) -> "ViTClassifier":
        """Load from a vitlab/timm/HF checkpoint (file, folder or hub id) or a registered name.

        A registered model name loads that model's default hub weights (cache first).
        """
        from ..models.registry import create_model, list_models
        from ..pretrained import load_model

        src = str(name_or_path)
        if src in list_models() and not Path(src).exists():
            model = create_model(src, pretrained=True)
        else:
            model = load_model(name_or_path)
        return cls(model, device=device, **kwargs)

    def preprocess(self, image: ImageLike | Sequence[ImageLike]) -> Tensor:
        """Images -> the normalised batch the model expects (B, C, S, S)."""
        return self.transform(image).to(self.device)

    @torch.inference_mode()
    def predict_proba(self, image: ImageLike | Sequence[ImageLike]) -> Tensor:
        """Class probabilities (B, num_classes)."""
        return self.runner(self.preprocess(image)).softmax(dim=-1)

    def predict(self, image: ImageLike | Sequence[ImageLike], top_k: int = 5) -> dict[str, Any] | list[dict[str, Any]]:
        """Classify one image (a dict) or a batch/list (a list of dicts).

        Each result: ``{"class": label, "index": i, "confidence": p, "top_k": [{"class", "index",
        "confidence"}, ...]}``.
        """
        probs = self.predict_proba(image)
        k = max(1, min(top_k, probs.shape[1]))
        values, indices = probs.topk(k, dim=1)
        results = []
        for vals, idx in zip(values.tolist(), indices.tolist()):
            top = [{"class": self.labels[i], "index": i, "confidence": p} for p, i in zip(vals, idx)]
            results.append({**top[0], "top_k": top})
        return results if _is_batch(image) else results[0]
