"""Swin Transformer (v1) checkpoints from timm, Microsoft's original repo and Hugging Face -> vitlab.

vitlab's Swin keeps timm's layout, so a timm checkpoint changes only in two names: the bias
table ``attn.relative_position_bias_table`` is ``attn.relative_position.table`` and the
classifier ``head.fc`` is ``head``. Original Microsoft checkpoints put the patch merging at
the *end* of stages 0..2 (``layers.{i}.downsample``) where timm and vitlab put it at the
start of stages 1..3, name the classifier ``head`` and store the non-persistent
``relative_position_index`` / ``attn_mask`` buffers (dropped here).

Hugging Face ``SwinModel`` / ``SwinForImageClassification`` use ``swin.embeddings``,
``swin.encoder.layers.{i}.blocks.{j}`` with separate query/key/value projections (fused into
vitlab's ``qkv``, q rows first), downsampling at the end of stages 0..2, ``swin.layernorm``
and ``classifier``. Both spellings of the HF block are read: the one saved on disk
(``attention.self.query``, ``attention.output.dense``, ``intermediate.dense``,
``output.dense``) and the in-memory names of transformers 5 (``attention.q_proj``,
``attention.o_proj``, ``attention.relative_position_bias.relative_position_bias_table``,
``mlp.fc1``). All of them concatenate the 2x2 neighbours of a patch merging in the same
order, (0,0), (1,0), (0,1), (1,1), so the merging weights need no permutation.
"""

from __future__ import annotations

import re

import torch
from torch import Tensor, nn

from .convert import register_converter

StateDict = dict[str, Tensor]

_BUFFERS = ("relative_position_index", "attn_mask")


# ------------------------------------------------------------------ timm / original Microsoft
def _detect_timm_swin(sd: StateDict) -> bool:
    """timm or original Microsoft Swin v1 keys (a ``relative_position_bias_table`` in ``layers``)."""
    return "patch_embed.proj.weight" in sd and any(
        re.match(r"^layers\.\d+\.blocks\.\d+\.attn\.relative_position_bias_table$", k) for k in sd
    )


def convert_timm_swin(sd: StateDict, model: nn.Module) -> StateDict:
    """timm (or original Microsoft) Swin keys -> vitlab keys (see the module docstring)."""
    original = "layers.0.downsample.reduction.weight" in sd  # merging at the end of stages
    out: StateDict = {}
    for key, v in sd.items():
        if key.endswith(_BUFFERS):
            continue
        if original:
            key = re.sub(r"^layers\.(\d+)\.downsample\.", lambda m: f"layers.{int(m.group(1)) + 1}.downsample.", key)
        key = key.replace("attn.relative_position_bias_table", "attn.relative_position.table")
        if key.startswith("head.fc."):
            key = "head." + key[len("head.fc."):]
        out[key] = v
    return out


# ------------------------------------------------------------------ Hugging Face transformers
_HF_BLOCK = {
    "layernorm_before": "norm1",
    "layernorm_after": "norm2",
    "attention.output.dense": "attn.proj",
    "attention.o_proj": "attn.proj",
    "intermediate.dense": "mlp.fc1",
    "output.dense": "mlp.fc2",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}
_HF_QKV = {
    "attention.self.query": "q", "attention.self.key": "k", "attention.self.value": "v",
    "attention.q_proj": "q", "attention.k_proj": "k", "attention.v_proj": "v",
}
_HF_TABLES = (
    "attention.self.relative_position_bias_table",
    "attention.relative_position_bias.relative_position_bias_table",
)
_HF_TOP = {
    "embeddings.patch_embeddings.projection": "patch_embed.proj",
    "embeddings.norm": "patch_embed.norm",
    "layernorm": "norm",
}


def _hf_swin_prefix(sd: StateDict) -> str | None:
    for k in sd:
        m = re.match(r"^(.*?)embeddings\.patch_embeddings\.projection\.weight$", k)
        if m and any(key.startswith(f"{m.group(1)}encoder.layers.0.blocks.0.") for key in sd):
            return m.group(1)
    return None


def _detect_hf_swin(sd: StateDict) -> bool:
    """HF SwinModel / SwinForImageClassification (prefix ``swin.`` or none) keys."""
    return _hf_swin_prefix(sd) is not None


def convert_hf_swin(sd: StateDict, model: nn.Module) -> StateDict:
    """HF Swin keys -> vitlab keys; q, k, v are fused into ``qkv`` (q rows first)."""
    prefix = _hf_swin_prefix(sd) or ""
    out: StateDict = {}
    qkv: dict[str, dict[str, Tensor]] = {}  # "layers.{i}.blocks.{j}.attn.qkv.{kind}" -> {"q": .., ...}
    for key, v in sd.items():
        if key.endswith(_BUFFERS):
            continue
        rest = key[len(prefix):] if key.startswith(prefix) else None
        if rest is not None:
            m = re.match(r"^encoder\.layers\.(\d+)\.blocks\.(\d+)\.(.+)$", rest)
            if m:
                block = f"layers.{m.group(1)}.blocks.{m.group(2)}"
                sub = m.group(3)
                if sub in _HF_TABLES:
                    out[f"{block}.attn.relative_position.table"] = v
                    continue
                name, _, kind = sub.rpartition(".")
                if name in _HF_QKV:
                    qkv.setdefault(f"{block}.attn.qkv.{kind}", {})[_HF_QKV[name]] = v
                    continue
                if name in _HF_BLOCK:
                    out[f"{block}.{_HF_BLOCK[name]}.{kind}"] = v
                    continue
            m = re.match(r"^encoder\.layers\.(\d+)\.downsample\.(.+)$", rest)
            if m:  # HF merges at the end of stage i; vitlab at the start of stage i + 1
                out[f"layers.{int(m.group(1)) + 1}.downsample.{m.group(2)}"] = v
                continue
            name, _, kind = rest.rpartition(".")
            if name in _HF_TOP:
                out[f"{_HF_TOP[name]}.{kind}"] = v
                continue
        name, _, kind = key.rpartition(".")
        if name == "classifier":
            out[f"head.{kind}"] = v
            continue
        out[key] = v  # unknown (absolute position embedding, mask token, ...): left for the report
    for key, parts in qkv.items():
        if all(p in parts for p in "qkv"):
            out[key] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)  # 3 x (C, ...) -> (3C, ...)
        else:  # an incomplete set: keep the pieces under telling names so the load error shows them
            for p, t in parts.items():
                out[key.replace(".qkv.", f".{p}.")] = t
    return out


register_converter("swin", "timm", _detect_timm_swin, convert_timm_swin)
register_converter("swin", "hf", _detect_hf_swin, convert_hf_swin)
