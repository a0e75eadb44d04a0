"""timm (and original facebookresearch/deit) CaiT checkpoints -> vitlab's CaiT layout.

Differences: timm's LayerScale vectors ``gamma_1`` / ``gamma_2`` are vitlab's ``ls1.gamma`` /
``ls2.gamma``; timm's class attention has separate ``attn.k`` / ``attn.v`` linears where
vitlab's :class:`~vitlab.components.CrossAttention` has one fused ``attn.kv`` (k rows first).
Original DeiT-repo files wrap keys in ``module.`` (DataParallel), which is stripped. CaiT is
not in Hugging Face transformers, so there is no HF layout.
"""

from __future__ import annotations

import re

import torch
from torch import Tensor, nn

from .convert import register_converter

StateDict = dict[str, Tensor]

_TIMM_ONLY = re.compile(r"^(module\.)?blocks(_token_only)?\.\d+\.(gamma_[12]|attn\.[kv]\.(weight|bias))$")


def _detect_timm_cait(sd: StateDict) -> bool:
    """A CaiT checkpoint (class-attention blocks present) in timm's key spelling."""
    has_ca = any(re.match(r"^(module\.)?blocks_token_only\.\d+\.", k) for k in sd)
    return has_ca and any(_TIMM_ONLY.match(k) for k in sd)


_GAMMA = re.compile(r"^(blocks(?:_token_only)?\.\d+)\.gamma_([12])$")
_CA_KV = re.compile(r"^(blocks_token_only\.\d+\.attn)\.([kv])\.(weight|bias)$")


def convert_timm_cait(sd: StateDict, model: nn.Module) -> StateDict:
    """Rename LayerScale gammas and fuse class attention's k and v into ``kv`` (k first)."""
    out: StateDict = {}
    kv: dict[str, dict[str, Tensor]] = {}  # "blocks_token_only.{j}.attn.kv.{kind}" -> {"k": .., "v": ..}
    for key, v in sd.items():
        key = _GAMMA.sub(r"\1.ls\2.gamma", key.removeprefix("module."))
        pair = _CA_KV.match(key)
        if pair is None:
            out[key] = v  # same name in both layouts, or left for the unexpected-key report
        else:
            kv.setdefault(f"{pair.group(1)}.kv.{pair.group(3)}", {})[pair.group(2)] = v
    for key, parts in kv.items():
        if "k" in parts and "v" in parts:
            out[key] = torch.cat([parts["k"], parts["v"]], dim=0)  # (C, ...) + (C, ...) -> (2C, ...)
        else:  # half a pair: keep it under its timm name so the load error names it
            for which, t in parts.items():
                out[key.replace(".kv.", f".{which}.")] = t
    return out


register_converter("cait", "timm", _detect_timm_cait, convert_timm_cait)
