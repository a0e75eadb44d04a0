"""Models and inference modes: the mode table, loading a model by name or checkpoint, the
Hugging Face / timm reference implementations, preparing a mode (ONNX included) and the
agreement data."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..deploy.inference import prepare_for_inference


#: Inference modes: name -> (precision for :func:`prepare_for_inference`, compiled).
#: ``onnx`` runs an exported file in onnxruntime.
MODE_SPECS: dict[str, tuple[str, bool]] = {
    "eager": ("fp32", False),
    "bf16": ("bf16", False),
    "bf16-amp": ("bf16-amp", False),
    "fp16": ("fp16", False),
    "compile": ("fp32", True),
    "compile-bf16": ("bf16", True),
    "int8": ("int8", False),
    "onnx": ("fp32", False),
}
MODES = tuple(MODE_SPECS)
DEFAULT_MODES = {"cpu": ("eager", "bf16", "bf16-amp", "compile-bf16", "int8", "onnx"),
                 "cuda": ("eager", "bf16", "fp16", "compile", "compile-bf16")}
#: Training variants: (autocast dtype name or None, gradient checkpointing).
TRAIN_MODES: dict[str, tuple[str | None, bool]] = {
    "train-fp32": (None, False), "train-fp32-ckpt": (None, True),
    "train-bf16": ("bf16", False), "train-bf16-ckpt": ("bf16", True),
}
REFERENCES = ("hf", "hf-eager", "timm")
_PEAK_DTYPE = {"fp32": "fp32", "bf16": "bf16", "bf16-amp": "bf16", "fp16": "fp16", "int8": "int8"}
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "int8": torch.int8}


def _load(model: str | nn.Module, image_size: int | None, label: str | None = None) -> tuple[str, nn.Module]:
    if isinstance(model, nn.Module):
        if label:
            return label, model
        return getattr(model, "model_name", None) or type(model).__name__, model
    from ..models.registry import list_models
    from ..pretrained import create_model

    if model in list_models() and not Path(model).exists():
        return model, create_model(model, **({"image_size": image_size} if image_size else {}))
    if Path(model).exists():
        from ..pretrained import load_model

        loaded = load_model(model)
        return getattr(loaded, "model_name", None) or Path(model).stem, loaded
    create_model(model)  # raises: unknown name, with close matches
    raise AssertionError("unreachable")


class _Logits(nn.Module):
    """A Hugging Face image classifier called like a vitlab model: images -> logits."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return self.model(pixel_values=x).logits


def reference_model(kind: str, model: nn.Module) -> tuple[str, nn.Module]:
    """The same architecture (random weights) from Hugging Face transformers or timm.

    Args:
        kind: ``hf`` (transformers' ViT, SDPA attention), ``hf-eager`` (its explicit
            attention) or ``timm``.
        model: The vitlab model whose architecture to copy (HF: ViT/DeiT without
            distillation token; timm: any registered name).

    Returns:
        (implementation label, module mapping images to logits).

    Raises:
        ValueError: An unknown kind or an architecture the reference library lacks.
        ImportError: transformers / timm missing.
    """
    if kind not in REFERENCES:
        raise ValueError(f"unknown reference {kind!r}; choose one of {', '.join(REFERENCES)}")
    cfg = model.config
    if kind == "timm":
        try:
            import timm
        except ImportError:
            raise ImportError("reference 'timm' needs timm: pip install timm") from None
        name = getattr(model, "model_name", None)
        if not name or name not in timm.list_models():
            raise ValueError(f"timm has no model named {name!r}")
        ref = timm.create_model(name, pretrained=False, num_classes=cfg.num_classes, **timm_arguments(model)).eval()
        try:  # vitlab's ViT / DeiT keys are timm's: the same weights (a trained model: the same predictions)
            ref.load_state_dict(model.state_dict())
        except RuntimeError:
            pass  # another layout: timm's random weights (throughput only)
        return "timm", ref
    if getattr(model, "family", "") not in ("vit", "deit") or getattr(model, "num_distill_tokens", 0) \
            or cfg.pool != "cls" or cfg.image_size[0] != cfg.image_size[1]:
        name = getattr(model, "model_name", None) or type(model).__name__
        raise ValueError(f"Hugging Face's ViT has no counterpart of {name}")
    try:
        from transformers import ViTConfig as HFViTConfig
        from transformers import ViTForImageClassification
    except ImportError:
        raise ImportError("reference 'hf' needs transformers: pip install 'vitlab[dev]'") from None
    impl = "eager" if kind == "hf-eager" else "sdpa"
    hf_cfg = HFViTConfig(hidden_size=cfg.dim, num_hidden_layers=cfg.depth, num_attention_heads=cfg.heads,
                         intermediate_size=cfg.mlp_dim, image_size=cfg.image_size[0], patch_size=cfg.patch_size,
                         num_channels=cfg.in_channels, qkv_bias=cfg.qkv_bias, layer_norm_eps=cfg.norm_eps,
                         num_labels=max(cfg.num_classes, 1), attn_implementation=impl)
    return f"hf ({impl})", _Logits(ViTForImageClassification(hf_cfg)).eval()


def timm_arguments(model: nn.Module) -> dict[str, Any]:
    """Architecture arguments of ``timm.create_model`` that rebuild a (possibly overridden) ViT / DeiT.

    A registered name built with overrides (e.g. a digits model at 56 px with 4 px patches) is
    another architecture than timm's model of that name; these keyword arguments make timm's
    match it. Other families get none (timm's model of the name as it is).
    """
    cfg = model.config
    if getattr(model, "family", "") not in ("vit", "deit"):
        return {}
    out = {"img_size": tuple(cfg.image_size), "patch_size": cfg.patch_size, "in_chans": cfg.in_channels,
           "embed_dim": cfg.dim, "depth": cfg.depth, "num_heads": cfg.heads, "mlp_ratio": cfg.mlp_dim / cfg.dim,
           "qkv_bias": cfg.qkv_bias}
    if getattr(cfg, "reg_tokens", 0):
        out["reg_tokens"] = cfg.reg_tokens
    return out


def digits_labels(split: str = "test") -> Tensor:
    """True labels of a digits split, in the order of :func:`digits_agreement_data`."""
    from ..datasets.factory import build_dataset

    data = build_dataset("digits", split)
    return torch.tensor([int(data[i][1]) for i in range(len(data))])


def _prepare_mode(mode: str, model: nn.Module, device: torch.device, onnx_dir: Path,
                  threads: int, tome: int | None = None) -> Callable[[Tensor], Tensor]:
    precision, compiled = MODE_SPECS[mode]
    if mode == "onnx":
        if tome is not None:
            raise ValueError("token merging is not exported to ONNX (its merge indices depend on the input)")
        from ..deploy.onnx_export import OnnxRuntimeModel, export_onnx

        if device.type != "cpu":
            raise ValueError("the onnx mode runs onnxruntime on the CPU")
        path = export_onnx(model, onnx_dir / "model.onnx", batch_size=1, dynamic_batch=True)
        return OnnxRuntimeModel(path, threads=threads)
    return prepare_for_inference(model, precision, compile=compiled, device=device, tome=tome)


def digits_agreement_data(model: nn.Module, limit: int | None = None, split: str = "test") -> Tensor:
    """The digits images of a split prepared for ``model``: resized to its input, its channels, its mean/std."""
    from ..datasets.factory import build_dataset
    from ..datasets.transforms import normalize

    data = build_dataset("digits", split)
    x = torch.stack([data[i][0] for i in range(len(data) if limit is None else min(limit, len(data)))])
    cfg = model.config
    size = tuple(cfg.image_size)
    if tuple(x.shape[-2:]) != size:
        # (N, 1, 8, 8) -> (N, 1, H, W), as the trainer resizes
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
    if cfg.in_channels != x.shape[1]:
        x = x.expand(-1, cfg.in_channels, -1, -1)
    pcfg = getattr(model, "pretrained_cfg", {})
    mean, std = tuple(pcfg.get("mean", data.mean)), tuple(pcfg.get("std", data.std))
    if len(mean) != cfg.in_channels:
        mean, std = (sum(mean) / len(mean),) * cfg.in_channels, (sum(std) / len(std),) * cfg.in_channels
    return normalize(x, mean, std).contiguous()


def _batched_logits(fn: Callable[[Tensor], Tensor], data: Tensor, batch_size: int, device: torch.device) -> Tensor:
    """Logits of ``data`` in fixed-size batches (the last one padded), so compiled modes see one shape."""
    out = []
    for i in range(0, data.shape[0], batch_size):
        chunk = data[i : i + batch_size]
        n = chunk.shape[0]
        if n < batch_size:
            chunk = torch.cat([chunk, chunk[-1:].expand(batch_size - n, *chunk.shape[1:])])
        with torch.inference_mode():
            out.append(fn(chunk.to(device)).float().cpu()[:n])
    return torch.cat(out)


def _check_modes(modes: Sequence[str]) -> list[str]:
    out = []
    for m in modes:
        if m not in MODE_SPECS:
            raise ValueError(f"unknown mode {m!r}; choose from {', '.join(MODES)}")
        out.append(m)
    return out
