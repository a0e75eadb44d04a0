"""Hugging Face transformers ``VitDetModel`` / ``VitDetBackbone`` checkpoints -> vitlab's ViT.

HF's VitDet ports detectron2's ViTDet backbone: a plain ViT without class token or final norm,
window attention in ``window_block_indices`` and decomposed relative position
(``use_relative_position_embeddings``). In vitlab that is a :class:`~vitlab.models.vit.VisionTransformer`
with ``class_token=False``, ``window_size`` / ``global_blocks`` and ``rel_pos="decomposed"``
(:func:`vit_config_from_vitdet` builds the config). Keys:

=========================================================  ===========================================
HF                                                         vitlab
=========================================================  ===========================================
``embeddings.projection.{weight,bias}``                    ``patch_embed.proj.{weight,bias}``
``embeddings.position_embeddings`` (1, 1 + g*g, C)         ``pos_embed`` (1, g'*g', C): the class row,
                                                           which HF never uses, dropped; resampled to
                                                           the model's grid as HF does on forward
``encoder.layer.N.norm1`` / ``norm2``                      ``blocks.N.norm1`` / ``norm2``
``encoder.layer.N.attention.qkv`` / ``proj``               ``blocks.N.attn.qkv`` / ``proj``
``encoder.layer.N.attention.rel_pos_h`` / ``rel_pos_w``    ``blocks.N.attn.rel_pos.rel_pos_h`` / ``_w``
``encoder.layer.N.mlp.fc1`` / ``fc2``                      ``blocks.N.mlp.fc1`` / ``fc2``
=========================================================  ===========================================

HF stores the absolute position embedding for ``pretrain_image_size`` and resamples it on every
forward (bicubic, ``align_corners=False``, no antialias); the conversion does that resampling once,
to the grid of the model it loads into, so the result equals HF's at that model's ``image_size``.
(At another input size vitlab resamples from its own grid with timm's antialiased bicubic, so it
then no longer matches HF's resampling from the pretrain grid.) HF's residual conv blocks
(``residual_block_indices``) have no vitlab counterpart; their keys are left for the loader's
unexpected-key report.

Importing this module registers the layout ``"hf_vitdet"`` for the ``vit`` family.
"""

from __future__ import annotations

import re
from typing import Any

from torch import Tensor, nn

from ..components import interpolate_pos_embed, to_2tuple
from ..models.vit import ViTConfig
from .convert import register_converter

StateDict = dict[str, Tensor]

__all__ = ["vit_config_from_vitdet", "vitdet_hf_to_vitlab"]

_PREFIX = re.compile(r"^((?:\w+\.)*?)embeddings\.projection\.weight$")
_LAYER = re.compile(r"^encoder\.layer\.(\d+)\.(.+)\.(weight|bias|rel_pos_h|rel_pos_w)$")
_BLOCK = {
    "norm1": "norm1",
    "attention.qkv": "attn.qkv",
    "attention.proj": "attn.proj",
    "norm2": "norm2",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}


def _vitdet_prefix(sd: StateDict) -> str | None:
    """The key prefix before ``embeddings.projection.weight`` (``""``, ``"backbone."`` ...), None if absent."""
    for key in sd:
        m = _PREFIX.match(key)
        if m and f"{m.group(1)}encoder.layer.0.attention.qkv.weight" in sd:
            return m.group(1)
    return None


def _detect_hf_vitdet(sd: StateDict) -> bool:
    return _vitdet_prefix(sd) is not None


def vitdet_hf_to_vitlab(state_dict: StateDict, grid: int | tuple[int, int] | None = None) -> StateDict:
    """Rename an HF ``VitDetModel`` / ``VitDetBackbone`` state dict to vitlab's ViT keys (table above).

    Args:
        state_dict: The HF weights (an optional prefix before ``embeddings.`` is stripped).
        grid: The token grid (h, w) of the model that will load the weights (its
            ``grid_size``); the position embedding is resampled to it the way HF does on forward.
            None keeps the checkpoint's grid (vitlab's loader then resamples it with its own rule).

    Returns:
        A new state dict; keys it does not know are kept as they are, for the loader's report.

    Raises:
        ValueError: ``state_dict`` is not a VitDet checkpoint.
    """
    prefix = _vitdet_prefix(state_dict)
    if prefix is None:
        raise ValueError("not a Hugging Face VitDet checkpoint: expected the keys 'embeddings.projection.weight' and "
                         "'encoder.layer.0.attention.qkv.weight'")
    out: StateDict = {}
    for key, value in state_dict.items():
        rest = key[len(prefix):] if key.startswith(prefix) else None
        m = _LAYER.match(rest) if rest is not None else None
        if rest == "embeddings.position_embeddings":
            pos = value[:, 1:]  # (1, 1 + g*g, C) -> (1, g*g, C): the class position HF keeps but never adds
            if grid is not None:
                pos = interpolate_pos_embed(pos, to_2tuple(grid), num_prefix_tokens=0, mode="bicubic", antialias=False)
            out["pos_embed"] = pos
        elif rest is not None and rest.startswith("embeddings.projection."):
            out["patch_embed.proj." + rest.rsplit(".", 1)[1]] = value
        elif m and m.group(2) == "attention" and m.group(3).startswith("rel_pos_"):
            out[f"blocks.{m.group(1)}.attn.rel_pos.{m.group(3)}"] = value
        elif m and m.group(2) in _BLOCK:
            out[f"blocks.{m.group(1)}.{_BLOCK[m.group(2)]}.{m.group(3)}"] = value
        else:
            out[key] = value  # residual blocks, other heads: left for the unexpected-key report
    return out


def vit_config_from_vitdet(hf_config: Any, **overrides: Any) -> ViTConfig:
    """The :class:`ViTConfig` of an HF ``VitDetConfig`` (an object or its ``config.json`` dict).

    ``image_size`` is HF's ``image_size`` (the grid of the global blocks' relative position tables);
    HF's ``pretrain_image_size`` only sizes its stored position embedding, which the conversion
    resamples. The result has no class token and no classifier (``pool="mean"``, ``num_classes=0``).
    Dropout is left at 0 (HF drops only inside the MLP); ``drop_path_rate`` maps to ``drop_path``.

    Raises:
        ValueError: Residual conv blocks or an activation other than GELU (no vitlab counterpart).
    """
    get = hf_config.get if isinstance(hf_config, dict) else lambda k, d=None: getattr(hf_config, k, d)
    if get("residual_block_indices"):
        raise ValueError(f"VitDet residual conv blocks (residual_block_indices={get('residual_block_indices')}) "
                         "have no vitlab counterpart")
    if get("hidden_act", "gelu") != "gelu":
        raise ValueError(f"VitDet hidden_act must be 'gelu' for vitlab's ViT, got {get('hidden_act')!r}")
    depth = int(get("num_hidden_layers", 12))
    window_blocks = set(get("window_block_indices") or ())
    window = int(get("window_size", 0) or 0) if window_blocks else 0
    dim = int(get("hidden_size", 768))
    values: dict[str, Any] = dict(
        image_size=to_2tuple(get("image_size", 224)), patch_size=int(get("patch_size", 16)),
        in_channels=int(get("num_channels", 3)), num_classes=0, dim=dim, depth=depth,
        heads=int(get("num_attention_heads", 12)), mlp_dim=int(dim * get("mlp_ratio", 4)),
        qkv_bias=bool(get("qkv_bias", True)), drop_path=float(get("drop_path_rate", 0.0)),
        norm_eps=float(get("layer_norm_eps", 1e-6)), pool="mean", class_token=False,
        pos_embed="learned" if get("use_absolute_position_embeddings", True) else "none",
        window_size=window, global_blocks=tuple(i for i in range(depth) if i not in window_blocks) if window else (),
        rel_pos="decomposed" if get("use_relative_position_embeddings", False) else "none",
    )
    values.update(overrides)
    return ViTConfig(**values)


def _convert(sd: StateDict, model: nn.Module) -> StateDict:
    return vitdet_hf_to_vitlab(sd, grid=getattr(model, "grid_size", None))


register_converter("vit", "hf_vitdet", _detect_hf_vitdet, _convert)
