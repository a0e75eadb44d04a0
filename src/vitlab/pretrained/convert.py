"""Checkpoint layouts (timm, Hugging Face transformers, vitlab) and their conversion to vitlab keys.

Each family registers a detector-converter pair per foreign layout with :func:`register_converter`.
:func:`load_pretrained` then adapts the converted state dict to the model (position
embedding resampling), re-initialises a classifier of another size with a warning, and
reports missing / unexpected / mis-shaped keys in one clear error.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor, nn

from .hub import download, is_hub_id
from .io import Checkpoint, read_weights

StateDict = dict[str, Tensor]
Converter = Callable[[StateDict, nn.Module], StateDict]

# family -> list of (layout name, detector(sd) -> bool, converter)
_CONVERTERS: dict[str, list[tuple[str, Callable[[StateDict], bool], Converter]]] = {}


def register_converter(family: str, layout: str, detect: Callable[[StateDict], bool], convert: Converter) -> None:
    """Teach vitlab a foreign checkpoint layout for one family."""
    _CONVERTERS.setdefault(family, []).append((layout, detect, convert))


def read_checkpoint(source: str | Path, cache_dir: str | Path | None = None) -> Checkpoint:
    """Read weights from a local file/folder or a hub id (cache first)."""
    if isinstance(source, str) and not Path(source).exists() and is_hub_id(source):
        source = download(source, cache_dir)
    return read_weights(source)


def detect_layout(sd: StateDict, family: str) -> str:
    """``"vitlab"`` or the name of the first registered foreign layout that recognises ``sd``."""
    for layout, detect, _ in _CONVERTERS.get(family, []):
        if detect(sd):
            return layout
    return "vitlab"


def convert_state_dict(sd: StateDict, model: nn.Module, layout: str | None = None) -> tuple[StateDict, str]:
    """Convert ``sd`` into ``model``'s key layout; returns the converted dict and the layout found."""
    family = getattr(model, "family", "")
    layout = layout or detect_layout(sd, family)
    for name, _, convert in _CONVERTERS.get(family, []):
        if name == layout:
            return convert(sd, model), layout
    return dict(sd), layout


def _head_prefixes(model: nn.Module) -> tuple[str, ...]:
    """State-dict prefixes of the model's classifier(s), as the model declares them (``classifier_names``)."""
    return tuple(f"{name}." for name in getattr(model, "classifier_names", ("head",)))


def load_state_dict_checked(model: nn.Module, sd: StateDict, source: str = "checkpoint") -> list[str]:
    """Load a vitlab-layout state dict; heads of another size are re-initialised (warned).

    Returns:
        The head keys that were not loaded.

    Raises:
        ValueError: Listing missing, unexpected and mis-shaped keys when the checkpoint does
            not fit the architecture.
    """
    if hasattr(model, "adapt_state_dict"):
        sd = model.adapt_state_dict(sd)
    own = model.state_dict()
    heads = _head_prefixes(model)

    def _is_head_key(key: str) -> bool:
        return key.startswith(heads)

    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    mismatched = [k for k in sd if k in own and tuple(sd[k].shape) != tuple(own[k].shape)]
    skipped_head = sorted(
        k for k in set(missing + unexpected + mismatched) if _is_head_key(k)
    )
    missing = [k for k in missing if not _is_head_key(k)]
    unexpected = [k for k in unexpected if not _is_head_key(k)]
    mismatched = [k for k in mismatched if not _is_head_key(k)]
    if missing or unexpected or mismatched:
        name = getattr(model, "model_name", None) or type(model).__name__

        def show(keys: list[str]) -> str:
            return ", ".join(keys[:8]) + (f" ... ({len(keys)} in all)" if len(keys) > 8 else "")

        parts = []
        if missing:
            parts.append(f"missing keys: {show(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {show(unexpected)}")
        if mismatched:
            parts.append(
                "shape mismatches: "
                + show([f"{k} {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}" for k in mismatched])
            )
        raise ValueError(
            f"{source} does not fit {name} (is it a checkpoint of another architecture or size?): " + "; ".join(parts)
        )
    if skipped_head:
        ck = [tuple(sd[k].shape) for k in skipped_head if k in sd and k.endswith("weight")]
        warnings.warn(
            f"{source}: classifier head not loaded ({', '.join(skipped_head)}; checkpoint shapes {ck}, "
            f"model has num_classes={getattr(model.config, 'num_classes', '?')}): it is randomly re-initialised",
            stacklevel=3,
        )
        sd = {k: v for k, v in sd.items() if not _is_head_key(k)}
    with torch.no_grad():
        model.load_state_dict(sd, strict=not skipped_head)
    return skipped_head


def load_pretrained(model: nn.Module, source: Checkpoint | str | Path, layout: str | None = None) -> nn.Module:
    """Load weights (any supported layout, local or hub) into ``model``; returns ``model``."""
    ckpt = source if isinstance(source, Checkpoint) else read_checkpoint(source)
    sd, _ = convert_state_dict(ckpt.state_dict, model, layout)
    load_state_dict_checked(model, sd, source=str(ckpt.path))
    if ckpt.vitlab_config and ckpt.vitlab_config.get("labels"):
        model.labels = list(ckpt.vitlab_config["labels"])
    return model


# ------------------------------------------------------------------ ViT / DeiT layouts
def _hf_vit_prefix(sd: StateDict) -> str | None:
    for k in sd:
        m = re.match(r"^(.*?)embeddings\.patch_embeddings\.projection\.weight$", k)
        if m:
            return m.group(1)
    return None


def _detect_hf_vit(sd: StateDict) -> bool:
    return _hf_vit_prefix(sd) is not None


_HF_BLOCK = {
    "layernorm_before": "norm1",
    "attention.output.dense": "attn.proj",
    "layernorm_after": "norm2",
    "intermediate.dense": "mlp.fc1",
    "output.dense": "mlp.fc2",
}
_HF_TOP = {
    "embeddings.cls_token": "cls_token",
    "embeddings.distillation_token": "dist_token",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
    "pooler.dense.weight": "pre_logits.fc.weight",
    "pooler.dense.bias": "pre_logits.fc.bias",
}
_HF_HEADS = {"classifier": "head", "cls_classifier": "head", "distillation_classifier": "head_dist"}


# MAE pre-training checkpoints (HF ViTMAEForPreTraining, facebookresearch/mae) carry a decoder and a
# mask token that a classifier does not use (vitlab.tasks.mae loads them); the encoder loads as a ViT.
_MAE_DECODER_KEY = re.compile(r"^(decoder\.|decoder_(embed|pos_embed|blocks|norm|pred)\b|mask_token$)")


def without_mae_decoder(sd: StateDict) -> StateDict:
    """``sd`` without the decoder and mask token of an MAE pre-training checkpoint (else unchanged)."""
    if "decoder.mask_token" not in sd and "mask_token" not in sd:
        return sd
    return {k: v for k, v in sd.items() if not _MAE_DECODER_KEY.match(k)}


def convert_hf_vit(sd: StateDict, model: nn.Module) -> StateDict:
    """HF ``ViTModel`` / ``ViTForImageClassification`` / ``DeiT*`` keys -> vitlab (timm) keys.

    q, k and v projections are fused into one qkv projection. A pooler is kept only when
    the model has a pre-logits layer. Of a ``ViTMAEForPreTraining`` checkpoint the encoder loads.
    """
    sd = without_mae_decoder(sd)
    prefix = _hf_vit_prefix(sd) or ""
    out: StateDict = {}
    qkv: dict[int, dict[str, Tensor]] = {}
    for key, v in sd.items():
        if key.startswith(prefix):
            rest = key[len(prefix):]
            m = re.match(r"^encoder\.layer\.(\d+)\.(.+)\.(weight|bias)$", rest)
            if m:
                i, sub, kind = int(m.group(1)), m.group(2), m.group(3)
                if sub.startswith("attention.attention."):
                    qkv.setdefault(i, {})[sub.rsplit(".", 1)[-1] + "." + kind] = v
                    continue
                if sub in _HF_BLOCK:
                    out[f"blocks.{i}.{_HF_BLOCK[sub]}.{kind}"] = v
                    continue
            elif rest in _HF_TOP:
                out[_HF_TOP[rest]] = v
                continue
        head, _, kind = key.rpartition(".")
        if head in _HF_HEADS:
            out[f"{_HF_HEADS[head]}.{kind}"] = v
            continue
        out[key] = v  # unknown: left for the unexpected-key report
    for i, parts in qkv.items():
        for kind in ("weight", "bias"):
            names = [f"{p}.{kind}" for p in ("query", "key", "value")]
            if all(n in parts for n in names):
                out[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat([parts[n] for n in names], dim=0)
    if not isinstance(getattr(model, "pre_logits", None), nn.Sequential):
        out.pop("pre_logits.fc.weight", None)
        out.pop("pre_logits.fc.bias", None)
    return out


def _detect_timm_vit(sd: StateDict) -> bool:
    return "patch_embed.proj.weight" in sd and any(k.startswith("blocks.0.attn.qkv") for k in sd)


def convert_timm_vit(sd: StateDict, model: nn.Module) -> StateDict:
    """timm ViT keys are vitlab's; only the older ``pre_logits.fc`` / ``head.fc`` spellings differ.

    An original MAE pre-training checkpoint (timm keys plus a decoder) loads its encoder.
    """
    out = dict(without_mae_decoder(sd))
    for kind in ("weight", "bias"):
        if f"head.fc.{kind}" in out:
            out[f"head.{kind}"] = out.pop(f"head.fc.{kind}")
    return out


for _family in ("vit", "deit"):
    register_converter(_family, "hf", _detect_hf_vit, convert_hf_vit)
    register_converter(_family, "timm", _detect_timm_vit, convert_timm_vit)
