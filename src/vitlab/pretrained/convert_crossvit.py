"""timm (and original IBM CrossViT) checkpoints -> vitlab's CrossViT layout.

vitlab keeps timm's names everywhere but inside the fusion of each multi-scale stage:

* timm's fusion of branch ``b`` is a single ``CrossAttentionBlock`` when the stage's fusion
  depth is 0 (``blocks.S.fusion.B.norm1``) and an ``nn.Sequential`` of them otherwise
  (``blocks.S.fusion.B.J.norm1``); vitlab always holds a list (``blocks.S.fusion.B.J``).
* timm's cross-attention has three linears ``wq`` / ``wk`` / ``wv``; vitlab's
  :class:`~vitlab.components.CrossAttention` has ``q`` and a fused ``kv`` (k rows first).

The original IBM release kept the tokens in parameter lists (``cls_token.0``,
``pos_embed.1``); those are renamed to timm's ``cls_token_0`` / ``pos_embed_1`` as timm's
own loader does. CrossViT is not in Hugging Face transformers, so there is no HF layout.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import Tensor, nn

from .convert import register_converter

StateDict = dict[str, Tensor]

# blocks.S.fusion.B[.J].(norm1|attn.wq|attn.wk|attn.wv|attn.proj).(weight|bias)
_FUSION = re.compile(r"^(blocks\.\d+\.fusion\.\d+)\.(?:(\d+)\.)?(norm1|attn\.w[qkv]|attn\.proj)\.(weight|bias)$")
_TOKEN_LIST = re.compile(r"^(cls_token|pos_embed)\.(\d+)$")


def _detect_timm_crossvit(sd: StateDict) -> bool:
    """A CrossViT checkpoint whose fusion attention uses timm's separate ``wq``/``wk``/``wv``."""
    if not any(k.startswith("patch_embed.1.") for k in sd):
        return False
    return any((m := _FUSION.match(k)) is not None and m.group(3) == "attn.wq" for k in sd)


def convert_timm_crossvit(sd: StateDict, model: nn.Module | None = None) -> StateDict:
    """Rename fusion blocks into vitlab's list layout and fuse ``wk``/``wv`` into ``kv``.

    Args:
        sd: timm (or original IBM) CrossViT state dict.
        model: The target model (unused: the layout alone decides the names).

    Returns:
        The state dict in vitlab's key layout. A ``wk`` without its ``wv`` (or the reverse)
        keeps its timm name, so the loader's report names it.
    """
    out: StateDict = {}
    halves: dict[str, dict[str, Tensor]] = {}  # vitlab "...attn.kv.<kind>" -> {"wk": t, "wv": t}
    for key, value in sd.items():
        token = _TOKEN_LIST.match(key)
        if token:
            out[f"{token.group(1)}_{token.group(2)}"] = value
            continue
        m = _FUSION.match(key)
        if m is None:
            out[key] = value
            continue
        fusion, index, part, kind = m.group(1), m.group(2) or "0", m.group(3), m.group(4)
        block = f"{fusion}.{index}"
        if part in ("attn.wk", "attn.wv"):
            halves.setdefault(f"{block}.attn.kv.{kind}", {})[part[-2:]] = value
        elif part == "attn.wq":
            out[f"{block}.attn.q.{kind}"] = value
        else:
            out[f"{block}.{part}.{kind}"] = value
    for kv_key, parts in halves.items():
        if set(parts) == {"wk", "wv"}:
            out[kv_key] = torch.cat([parts["wk"], parts["wv"]], dim=0)  # (C, ...) twice -> (2C, ...)
            continue
        for name, t in parts.items():
            out[kv_key.replace(".kv.", f".{name}.")] = t
    return out


def config_from_timm_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """:class:`~vitlab.models.crossvit.CrossViTConfig` values from timm ``CrossVit`` kwargs.

    Covers the architecture arguments (``img_size``, ``img_scale``, ``patch_size``,
    ``embed_dim``, ``depth``, ``num_heads``, ``mlp_ratio``, ``multi_conv``, ``qkv_bias``,
    ``in_chans``, ``num_classes``); raises ValueError on one vitlab does not model
    (``crop_scale=True``, ``global_pool`` other than token/avg).
    """
    names = dict(img_size="image_size", img_scale="img_scale", patch_size="patch_size", in_chans="in_channels",
                 num_classes="num_classes", embed_dim="dim", num_heads="heads", mlp_ratio="mlp_ratio",
                 multi_conv="multi_conv", qkv_bias="qkv_bias", drop_path_rate="drop_path", attn_drop_rate="attention_dropout",
                 drop_rate="head_dropout")
    values: dict[str, Any] = {}
    for key, value in kwargs.items():
        if key == "depth":
            values["depth"] = tuple(tuple(int(v) for v in stage) for stage in value)
        elif key == "global_pool":
            if value not in ("token", "avg"):
                raise ValueError(f"timm global_pool={value!r} has no vitlab equivalent (use 'token' or 'avg')")
            values["pool"] = "cls" if value == "token" else "mean"
        elif key == "crop_scale":
            if value:
                raise ValueError("timm crop_scale=True (crop instead of resize per branch) is not supported by vitlab")
        elif key in names:
            values[names[key]] = tuple(value) if isinstance(value, list) else value
        else:
            raise ValueError(f"timm CrossVit argument {key!r} has no vitlab CrossViTConfig equivalent")
    return values


register_converter("crossvit", "timm", _detect_timm_crossvit, convert_timm_crossvit)
