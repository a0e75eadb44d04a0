"""MAE checkpoints of others: Hugging Face ``ViTMAEForPreTraining`` folders and the original release.

The encoder part goes through vitlab's ViT converters (so it also loads into a plain
classifier with ``create_model(..., pretrained=...)``); the decoder keys are mapped here.
The fixed sin-cos decoder position embedding is not loaded: vitlab recomputes it and
checks that the checkpoint's agrees.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ...models.vit import ViTConfig, VisionTransformer
from ...pretrained import Checkpoint, convert_state_dict, load_state_dict_checked, read_checkpoint
from .model import MAE, MAEConfig

StateDict = dict[str, Tensor]

_HF_LAYER = {
    "layernorm_before": "norm1",
    "attention.output.dense": "attn.proj",
    "layernorm_after": "norm2",
    "intermediate.dense": "mlp.fc1",
    "output.dense": "mlp.fc2",
}
_DECODER_TOP = ("mask_token", "decoder_embed", "decoder_norm", "decoder_pred")


def detect_mae_layout(sd: StateDict) -> str | None:
    """``"hf"`` (ViTMAEForPreTraining), ``"original"`` (facebookresearch/mae) or None (no MAE decoder)."""
    if "decoder.mask_token" in sd or any(k.startswith(("decoder.decoder_layers.", "decoder.decoder_encoder.")) for k in sd):
        return "hf"
    if "mask_token" in sd and any(k.startswith("decoder_blocks.") for k in sd):
        return "original"
    return None


def _hf_decoder(sd: StateDict) -> StateDict:
    """HF ``decoder.*`` keys -> :class:`~vitlab.tasks.mae.decoder.MAEDecoder` keys (q, k, v fused)."""
    out: StateDict = {}
    qkv: dict[tuple[int, str], dict[str, Tensor]] = {}
    for key, v in sd.items():
        if not key.startswith("decoder."):
            continue
        rest = key[len("decoder."):]
        # transformers 4 writes decoder_layers.N, transformers 5 decoder_encoder.layer.N
        m = re.match(r"^(?:decoder_layers|decoder_encoder\.layer)\.(\d+)\.(.+)\.(weight|bias)$", rest)
        if m:
            i, sub, kind = int(m.group(1)), m.group(2), m.group(3)
            if sub.startswith("attention.attention."):
                qkv.setdefault((i, kind), {})[sub.rsplit(".", 1)[-1]] = v
            else:
                out[f"decoder_blocks.{i}.{_HF_LAYER.get(sub, sub)}.{kind}"] = v
            continue
        out[rest] = v
    for (i, kind), parts in qkv.items():
        if set(parts) != {"query", "key", "value"}:
            raise ValueError(f"decoder layer {i} of the checkpoint lacks some of query/key/value {kind}")
        out[f"decoder_blocks.{i}.attn.qkv.{kind}"] = torch.cat([parts["query"], parts["key"], parts["value"]], dim=0)
    return out


def _original_decoder(sd: StateDict) -> StateDict:
    """facebookresearch/mae decoder keys (already vitlab's Block names) -> decoder keys."""
    return {k: v for k, v in sd.items() if k.startswith(("decoder_", "mask_token"))}


def split_mae_state_dict(sd: StateDict, encoder: VisionTransformer) -> tuple[StateDict, StateDict]:
    """An MAE pre-training checkpoint -> (encoder state dict, decoder state dict) in vitlab keys.

    Args:
        sd: The checkpoint's tensors (HF or original layout).
        encoder: The ViT the encoder part will load into (picks the ViT converter).

    Raises:
        ValueError: ``sd`` holds no MAE decoder.
    """
    layout = detect_mae_layout(sd)
    if layout is None:
        raise ValueError("the checkpoint holds no MAE decoder (expected HF ViTMAEForPreTraining or "
                         "facebookresearch/mae keys such as mask_token and decoder_blocks.N)")
    if layout == "hf":
        decoder = _hf_decoder(sd)
        enc = {k: v for k, v in sd.items() if not k.startswith("decoder.")}
    else:
        decoder = _original_decoder(sd)
        enc = {k: v for k, v in sd.items() if k not in decoder}
    encoder_sd, _ = convert_state_dict(enc, encoder)
    return encoder_sd, decoder


def load_mae_weights(mae: MAE, source: str | Path | Checkpoint) -> MAE:
    """Load an HF or original MAE pre-training checkpoint into an existing :class:`MAE`.

    Args:
        mae: A model of the checkpoint's architecture (the original release has no config file).
        source: File, folder, hub id or an already read checkpoint.

    Returns:
        ``mae``.

    Raises:
        ValueError: Keys or shapes that do not fit, or a decoder position embedding that is
            not MAE's fixed 2-D sin-cos one.
    """
    ckpt = source if isinstance(source, Checkpoint) else read_checkpoint(source)
    encoder_sd, decoder_sd = split_mae_state_dict(ckpt.state_dict, mae.encoder)
    pos = decoder_sd.pop("decoder_pos_embed", None)
    own = mae.decoder.decoder_pos_embed
    if pos is not None:
        grid_rows = pos[0, -own.shape[1]:] if pos.ndim == 3 else pos
        if grid_rows.shape != own.shape[1:] or not torch.allclose(grid_rows.float(), own[0].float(), atol=1e-4):
            raise ValueError(f"{ckpt.path}: the decoder position embedding is not the fixed 2-D sin-cos one "
                             f"for a {mae.grid[0]}x{mae.grid[1]} grid of width {own.shape[-1]}")
    load_state_dict_checked(mae.encoder, encoder_sd, source=f"{ckpt.path} (encoder)")
    load_state_dict_checked(mae.decoder, decoder_sd, source=f"{ckpt.path} (decoder)")
    return mae


def mae_configs_from_hf(hf: dict[str, Any]) -> tuple[ViTConfig, MAEConfig]:
    """An HF ``ViTMAEConfig`` (config.json as a dict) -> the encoder's ViTConfig and the MAEConfig.

    The encoder keeps a learned position embedding so it carries the checkpoint's values exactly.

    Raises:
        ValueError: Not a ``vit_mae`` config, or an activation other than GELU.
    """
    if hf.get("model_type") != "vit_mae":
        raise ValueError(f"expected a Hugging Face vit_mae config, got model_type {hf.get('model_type')!r}")
    if hf.get("hidden_act", "gelu") != "gelu":
        raise ValueError(f"vitlab's MAE uses exact GELU, the checkpoint uses {hf['hidden_act']!r}")
    eps = float(hf.get("layer_norm_eps", 1e-12))
    qkv_bias = bool(hf.get("qkv_bias", True))
    encoder = ViTConfig(
        image_size=int(hf.get("image_size", 224)), patch_size=int(hf.get("patch_size", 16)),
        in_channels=int(hf.get("num_channels", 3)), num_classes=0, dim=int(hf.get("hidden_size", 768)),
        depth=int(hf.get("num_hidden_layers", 12)), heads=int(hf.get("num_attention_heads", 12)),
        mlp_dim=int(hf.get("intermediate_size", 3072)), qkv_bias=qkv_bias, norm_eps=eps,
    )
    mae = MAEConfig(
        mask_ratio=float(hf.get("mask_ratio", 0.75)), decoder_dim=int(hf.get("decoder_hidden_size", 512)),
        decoder_depth=int(hf.get("decoder_num_hidden_layers", 8)),
        decoder_heads=int(hf.get("decoder_num_attention_heads", 16)),
        decoder_mlp_dim=int(hf.get("decoder_intermediate_size", 2048)),
        norm_pix_loss=bool(hf.get("norm_pix_loss", False)), qkv_bias=qkv_bias, norm_eps=eps,
    )
    return encoder, mae


def mae_from_hf(source: str | Path, **changes: Any) -> MAE:
    """Build an :class:`MAE` from a Hugging Face ``ViTMAEForPreTraining`` folder (or hub id) and load it.

    Args:
        source: The folder saved with ``save_pretrained`` (config.json + weights) or a hub id.
        **changes: MAEConfig fields to override (``norm_pix_loss=True``, ``mask_ratio=0.6``).

    Raises:
        ValueError: No vit_mae config.json next to the weights, or weights that do not fit it.
    """
    ckpt = read_checkpoint(source)
    if ckpt.hf_config is None:
        raise ValueError(f"{ckpt.path}: no Hugging Face config.json next to the weights; build the MAE yourself "
                         "and call load_mae_weights")
    enc_cfg, mae_cfg = mae_configs_from_hf(ckpt.hf_config)
    if changes:
        mae_cfg = dataclasses.replace(mae_cfg, **changes)
    mae = MAE(VisionTransformer(enc_cfg), mae_cfg)
    return load_mae_weights(mae, ckpt)


__all__ = ["detect_mae_layout", "load_mae_weights", "mae_configs_from_hf", "mae_from_hf", "split_mae_state_dict"]
