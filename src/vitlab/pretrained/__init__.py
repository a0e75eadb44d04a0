"""Pretrained weights: vitlab safetensors checkpoints, timm / Hugging Face conversion, the hub,
and the model factories that use them (:func:`create_model`, :func:`load_model`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..config import config_from_dict
from ..models.base import Backbone
from ..models.registry import build_model, get_entry, list_families, list_models
from .convert import (
    convert_state_dict,
    detect_layout,
    load_pretrained,
    load_state_dict_checked,
    read_checkpoint,
    register_converter,
)
from .factory import create_model
from .hub import download, is_hub_id
from .io import Checkpoint, checkpoint_metadata, read_weights, save_checkpoint
from . import convert_cait  # noqa: F401  (registers converters)
from . import convert_crossvit  # noqa: F401  (registers converters)
from . import convert_swin  # noqa: F401  (registers converters)
from . import convert_pvt  # noqa: F401  (registers converters)
from . import convert_vitdet  # noqa: F401  (registers the HF VitDet converter)

__all__ = [
    "Checkpoint", "checkpoint_metadata", "convert_checkpoint", "create_model", "convert_state_dict", "detect_layout", "download",
    "imagenet_labels", "infer_model_name", "is_hub_id", "load_model", "load_task_model", "model_from_meta", "load_pretrained", "load_state_dict_checked",
    "read_checkpoint", "read_weights", "register_converter", "save_checkpoint",
]


def imagenet_labels() -> list[str]:
    """The 1000 ImageNet-1k class names in the standard class-index order."""
    text = (Path(__file__).parent / "imagenet1k_classes.txt").read_text(encoding="utf-8")
    labels = [line.strip() for line in text.splitlines() if line.strip()]
    if len(labels) != 1000:
        raise RuntimeError(f"imagenet1k_classes.txt holds {len(labels)} names instead of 1000 (damaged install?)")
    return labels


def model_from_meta(meta: dict[str, Any]) -> Backbone:
    """A backbone with random weights from a vitlab metadata block (``model_name`` / ``family``,
    ``config``, ``pretrained_cfg``), e.g. a pre-training checkpoint's ``meta["encoder"]``."""
    return _model_from_vitlab_meta(meta)


def _model_from_vitlab_meta(meta: dict[str, Any]) -> Backbone:
    name, family = meta.get("model_name"), meta.get("family")
    families = list_families()
    if name and name in list_models():
        entry = get_entry(name)
        cfg = config_from_dict(entry.config_class, meta["config"])
        model = entry.model_class(cfg)
        model.model_name = name
    elif family in families:
        model_class, config_class = families[family]
        model = model_class(config_from_dict(config_class, meta["config"]))
        model.model_name = name
    else:
        raise ValueError(f"checkpoint is for model {name!r} / family {family!r}, which this vitlab does not know")
    if meta.get("pretrained_cfg"):
        model.pretrained_cfg = {k: tuple(v) if isinstance(v, list) else v for k, v in meta["pretrained_cfg"].items()}
    return model


def infer_model_name(ckpt: Checkpoint) -> tuple[str, dict[str, Any]]:
    """The registered variant (and config overrides) a timm / HF checkpoint belongs to.

    Uses a Hugging Face ``config.json`` when present, else matches tensor shapes against
    every registered variant (built on the meta device).

    Raises:
        ValueError: No registered variant has that architecture.
    """
    sd = ckpt.state_dict
    hf = ckpt.hf_config
    if hf is not None and hf.get("model_type") in ("vit", "deit"):
        return _from_hf_vit_config(hf, sd)
    for name in list_models():
        with torch.device("meta"):
            model = build_model(name)
        try:
            converted, _ = convert_state_dict(sd, model)
        except Exception:  # noqa: BLE001 - a converter for another family may not apply
            continue
        own = model.state_dict()
        body = {k for k in own if not k.startswith(("head.", "head_dist."))}
        if body <= set(converted) and all(tuple(converted[k].shape) == tuple(own[k].shape) for k in body):
            extra = {k for k in converted if k not in own and not k.startswith(("head.", "head_dist."))}
            if not extra:
                head = converted.get("head.weight")
                return name, ({"num_classes": int(head.shape[0])} if head is not None else {"num_classes": 0})
    raise ValueError(
        f"{ckpt.path}: no registered model has this architecture ({len(sd)} tensors); "
        f"pass the model name (vitlab convert --model NAME)"
    )


def _from_hf_vit_config(hf: dict[str, Any], sd: dict[str, torch.Tensor]) -> tuple[str, dict[str, Any]]:
    distilled = any(k.endswith("distillation_token") for k in sd)
    image = int(hf.get("image_size", 224))
    values = dict(
        image_size=image, patch_size=int(hf.get("patch_size", 16)), in_channels=int(hf.get("num_channels", 3)),
        dim=int(hf["hidden_size"]), depth=int(hf["num_hidden_layers"]), heads=int(hf["num_attention_heads"]),
        mlp_dim=int(hf["intermediate_size"]), qkv_bias=bool(hf.get("qkv_bias", True)),
        norm_eps=float(hf.get("layer_norm_eps", 1e-12)),
    )
    labels = hf.get("id2label")
    head = next((v for k, v in sd.items() if k.endswith(("classifier.weight", "cls_classifier.weight"))), None)
    values["num_classes"] = int(head.shape[0]) if head is not None else (len(labels) if labels else 0)
    base = "deit_tiny_distilled_patch16_224" if distilled else "vit_base_patch16_224"
    for name in list_models("deit_*distilled*" if distilled else "vit_*"):
        d = get_entry(name).defaults
        if all(d.get(k, v) == v for k, v in values.items() if k in ("dim", "depth", "heads", "mlp_dim", "patch_size")):
            base = name
            break
    return base, values


def load_task_model(source: str | Path) -> torch.nn.Module:
    """A task model (registered with :func:`vitlab.models.registry.register_task_model`) from a
    vitlab checkpoint: ``model_class(config)`` with the saved typed config, the weights loaded
    strictly, ``pretrained_cfg`` and ``labels`` restored; eval mode.

    Raises:
        CheckpointError: Not a vitlab checkpoint of a registered task model, or weights that do
            not fit its config (the missing and unexpected keys named).
    """
    from ..errors import CheckpointError
    from ..models.registry import list_task_models

    ck = read_weights(source)
    meta = ck.vitlab_config or {}
    entry = list_task_models().get(meta.get("family"))
    if entry is None:
        raise CheckpointError(f"{source} is not a checkpoint of a registered task model (family "
                              f"{meta.get('family')!r}; registered: {', '.join(sorted(list_task_models()))})")
    model_class, config_class, _task = entry
    model = model_class(config_from_dict(config_class, meta.get("config") or {}))
    missing, unexpected = model.load_state_dict(ck.state_dict, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"the weights in {source} do not fit its {meta.get('family')} config: missing "
                              f"{sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}")
    model.pretrained_cfg = {k: tuple(v) if isinstance(v, list) else v for k, v in (meta.get("pretrained_cfg") or {}).items()}
    model.labels = meta.get("labels")
    model.model_name = meta.get("model_name")
    return model.eval()


def load_model(source: str | Path) -> Backbone:
    """Build a model from a checkpoint alone: vitlab checkpoints, HF folders, or timm files.

    A vitlab checkpoint rebuilds exactly the saved architecture; for foreign checkpoints the
    architecture is inferred (see :func:`infer_model_name`).
    """
    ckpt = read_checkpoint(source)
    if ckpt.vitlab_config is not None:
        model = _model_from_vitlab_meta(ckpt.vitlab_config)
    else:
        name, overrides = infer_model_name(ckpt)
        model = build_model(name, **overrides)
    load_pretrained(model, ckpt)
    return model


def convert_checkpoint(src: str | Path, dst: str | Path, model_name: str | None = None, **overrides: Any) -> Path:
    """Write a vitlab safetensors checkpoint from a timm / HF (or vitlab) checkpoint.

    Args:
        src: File, folder or hub id.
        dst: ``*.safetensors`` file or a folder.
        model_name: The registered variant; inferred from the checkpoint when None.
        **overrides: Config overrides (e.g. ``num_classes``).
    """
    ckpt = read_checkpoint(src)
    if model_name is None:
        if ckpt.vitlab_config is not None:
            model = _model_from_vitlab_meta(ckpt.vitlab_config)
            load_pretrained(model, ckpt)
            return save_checkpoint(model, dst, labels=getattr(model, "labels", None))
        model_name, inferred = infer_model_name(ckpt)
        overrides = {**inferred, **overrides}
    model = build_model(model_name, **overrides)
    load_pretrained(model, ckpt)
    labels = getattr(model, "labels", None)
    if labels is None and ckpt.hf_config and ckpt.hf_config.get("id2label"):
        id2label = ckpt.hf_config["id2label"]
        labels = [id2label.get(str(i), str(i)) for i in range(len(id2label))]
    return save_checkpoint(model, dst, labels=labels)
