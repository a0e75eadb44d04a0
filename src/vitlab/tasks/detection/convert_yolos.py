"""Load a Hugging Face ``YolosForObjectDetection`` checkpoint (``save_pretrained`` folder) into :class:`YOLOS`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ...errors import CheckpointError
from ...models.vit import ViTConfig
from ...pretrained.convert import convert_hf_vit
from ...pretrained.io import read_weights
from .yolos import YOLOS, YOLOSConfig

# transformers <= 4 saves the mid embeddings under the interpolation module, 5 directly on the encoder
_MID_KEYS = ("vit.encoder.interpolation.mid_position_embeddings", "vit.encoder.mid_position_embeddings")
_HEADS = {"class_labels_classifier": "class_head", "bbox_predictor": "box_head"}


def yolos_config_from_hf(hf: dict[str, Any]) -> YOLOSConfig:
    """A :class:`YOLOSConfig` from the fields of a Hugging Face ``YolosConfig`` (its ``config.json``).

    Raises:
        CheckpointError: The config is not a YOLOS config or uses an option vitlab does not support.
    """
    if hf.get("model_type") != "yolos":
        raise CheckpointError(f"expected a Hugging Face YOLOS config (model_type 'yolos'), got model_type "
                              f"{hf.get('model_type')!r}")
    act = hf.get("hidden_act", "gelu")
    if act != "gelu":
        raise CheckpointError(f"YOLOS checkpoint uses hidden_act {act!r}; only 'gelu' is supported")
    size = hf.get("image_size", [512, 864])
    size = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
    patch = hf.get("patch_size", 16)
    # HF sizes the position-embedding grid as image_size // patch_size (hustvl/yolos-*: 800 x 1333 -> 50 x 83);
    # vitlab's ViT rounds a partial patch up, so hand it the largest whole-patch size inside the HF one
    size = tuple(s // patch * patch for s in size)  # e.g. (800, 1333) -> (800, 1328)
    vit = ViTConfig(
        image_size=size, patch_size=patch, in_channels=hf.get("num_channels", 3), num_classes=0,
        dim=hf["hidden_size"], depth=hf["num_hidden_layers"], heads=hf["num_attention_heads"],
        mlp_dim=hf["intermediate_size"], qkv_bias=hf.get("qkv_bias", True), norm_eps=hf.get("layer_norm_eps", 1e-12),
        dropout=hf.get("hidden_dropout_prob", 0.0), attention_dropout=hf.get("attention_probs_dropout_prob", 0.0),
        pad_input=False,
    )
    num_labels = hf.get("num_labels") or len(hf.get("id2label") or {}) or 2
    return YOLOSConfig(vit=vit, num_classes=num_labels, num_detection_tokens=hf.get("num_detection_tokens", 100),
                       use_mid_position_embeddings=hf.get("use_mid_position_embeddings", True))


def convert_hf_yolos(sd: dict[str, Tensor], model: YOLOS) -> dict[str, Tensor]:
    """HF ``YolosForObjectDetection`` keys -> :class:`YOLOS` keys.

    The encoder goes through the HF ViT converter; the single HF position embedding
    ``[cls, grid, det]`` is split into the ViT's ``[cls, grid]`` and ``det_pos_embed``.

    Raises:
        CheckpointError: ``sd`` is not a YOLOS detection checkpoint.
    """
    if "vit.embeddings.detection_tokens" not in sd:
        raise CheckpointError("not a Hugging Face YOLOS detection checkpoint: 'vit.embeddings.detection_tokens' "
                              "is missing (expected the weights of YolosForObjectDetection)")
    q = model.num_detection_tokens
    rest = dict(sd)
    det = rest.pop("vit.embeddings.detection_tokens")
    mid = None
    for key in _MID_KEYS:
        mid = rest.pop(key, mid)
    heads = {k: rest.pop(k) for k in list(rest) if k.split(".", 1)[0] in _HEADS}
    out = {f"backbone.{k}": v for k, v in convert_hf_vit(rest, model.backbone).items()}
    pos = out.pop("backbone.pos_embed")  # (1, 1 + gh * gw + Q, C)
    out["backbone.pos_embed"], out["det_pos_embed"] = pos[:, :-q], pos[:, -q:]
    out["det_token"] = det
    if mid is not None:
        out["mid_pos_embed"] = mid[:, 0]  # (L, 1, N', C) -> (L, N', C)
    for k, v in heads.items():
        name, _, i, kind = k.split(".")  # e.g. bbox_predictor.layers.2.weight
        out[f"{_HEADS[name]}.{2 * int(i)}.{kind}"] = v  # Linear i sits after i ReLUs
    return out


def load_hf_yolos(folder: str | Path) -> YOLOS:
    """Build a :class:`YOLOS` from a ``save_pretrained`` folder of ``YolosForObjectDetection``.

    Args:
        folder: The folder holding ``config.json`` and the weights (safetensors or ``pytorch_model.bin``).

    Returns:
        The model in eval mode.

    Raises:
        CheckpointError: A missing config, another architecture or weights that do not fit.
    """
    folder = Path(folder)
    ckpt = read_weights(folder)
    if ckpt.hf_config is None:
        raise CheckpointError(f"no Hugging Face config.json in {folder}; expected a YolosForObjectDetection "
                              f"save_pretrained folder")
    model = YOLOS(yolos_config_from_hf(ckpt.hf_config))
    sd = convert_hf_yolos(dict(ckpt.state_dict), model)
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    wrong = sorted(k for k in set(own) & set(sd) if own[k].shape != sd[k].shape)
    if missing or unexpected or wrong:
        parts = [f"{name}: {', '.join(keys[:5])}{' ...' if len(keys) > 5 else ''}"
                 for name, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)) if keys]
        raise CheckpointError(f"the YOLOS checkpoint in {folder} does not fit its config: " + "; ".join(parts))
    with torch.no_grad():
        model.load_state_dict(sd)
    return model.eval()


__all__ = ["convert_hf_yolos", "load_hf_yolos", "yolos_config_from_hf"]
