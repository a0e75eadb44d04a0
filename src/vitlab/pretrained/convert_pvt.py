"""PVT checkpoint layouts -> vitlab keys.

PVT v2 (family ``pvt_v2``, vitlab keys = timm's but ``mlp.mid.dwconv`` for ``mlp.dwconv``):

* ``timm``: timm's ``pvt_v2`` (``stages.N.blocks.M.mlp.dwconv``);
* ``official``: whai362/PVT ``classification/pvt_v2.py`` (``patch_embedN``, ``blockN.M``,
  ``normN``, ``mlp.dwconv.dwconv``), which timm's own filter remaps the same way;
* ``hf``: Hugging Face ``PvtV2ForImageClassification`` / ``PvtV2Model`` / ``PvtV2Backbone``
  (``[pvt_v2.]encoder.layers.N.{patch_embedding,blocks.M,layer_norm}``, separate ``key`` /
  ``value`` projections, ``classifier``).

PVT v1 (family ``pvt``): vitlab's keys are the official code's (whai362/PVT
``classification/pvt.py``), so an official checkpoint needs no conversion; ``hf`` converts
Hugging Face ``PvtForImageClassification`` / ``PvtModel``
(``[pvt.]encoder.{patch_embeddings.N,block.N.M,layer_norm}``).

Hugging Face uses ``layer_norm_eps`` (1e-6) for every LayerNorm while the official code and
timm use 1e-5 after the patch embeddings and in the spatial reduction: build the vitlab model
with ``local_norm_eps=1e-6`` to reproduce an HF model's outputs exactly.
"""

from __future__ import annotations

import re

import torch
from torch import Tensor, nn

from .convert import StateDict, register_converter

_KINDS = ("weight", "bias")


def _fuse_kv(parts: dict[str, dict[str, Tensor]], out: StateDict) -> None:
    """Separate key / value projections -> the fused ``kv`` (key rows first, as timm's)."""
    for target, p in parts.items():
        for kind in _KINDS:
            if f"key.{kind}" in p and f"value.{kind}" in p:
                out[f"{target}.kv.{kind}"] = torch.cat([p[f"key.{kind}"], p[f"value.{kind}"]], dim=0)
            else:  # an incomplete pair: keep what there is for the report
                for name in ("key", "value"):
                    if f"{name}.{kind}" in p:
                        out[f"{target}.{name}.{kind}"] = p[f"{name}.{kind}"]


def _head(key: str, v: Tensor, out: StateDict) -> bool:
    m = re.match(r"^classifier\.(weight|bias)$", key)
    if m:
        out[f"head.{m.group(1)}"] = v
    return m is not None


# ------------------------------------------------------------------------------ PVT v2: timm
_TIMM_V2 = re.compile(r"^stages\.\d+\.blocks\.\d+\.mlp\.dwconv\.(weight|bias)$")


def detect_timm_pvt_v2(sd: StateDict) -> bool:
    """timm ``pvt_v2``: ``stages.N.blocks.M.mlp.dwconv`` (vitlab has ``mlp.mid.dwconv``)."""
    return "patch_embed.proj.weight" in sd and any(_TIMM_V2.match(k) for k in sd)


def convert_timm_pvt_v2(sd: StateDict, model: nn.Module) -> StateDict:
    """timm keys are vitlab's except the depth-wise convolution: ``mlp.dwconv`` -> ``mlp.mid.dwconv``."""
    return {(k.replace(".mlp.dwconv.", ".mlp.mid.dwconv.") if _TIMM_V2.match(k) else k): v for k, v in sd.items()}


# -------------------------------------------------------------------------- PVT v2: official
def detect_official_pvt_v2(sd: StateDict) -> bool:
    """whai362/PVT ``pvt_v2.py``: ``patch_embed1`` and ``block1.0.mlp.dwconv.dwconv``."""
    return "patch_embed1.proj.weight" in sd and "block1.0.mlp.dwconv.dwconv.weight" in sd


def convert_official_pvt_v2(sd: StateDict, model: nn.Module) -> StateDict:
    """``patch_embed1`` -> ``patch_embed``, ``patch_embedN`` -> ``stages.N-1.downsample``,
    ``blockN.M`` -> ``stages.N-1.blocks.M``, ``normN`` -> ``stages.N-1.norm``,
    ``mlp.dwconv.dwconv`` -> ``mlp.mid.dwconv``."""
    out: StateDict = {}
    for key, v in sd.items():
        k = key
        m = re.match(r"^patch_embed(\d+)\.(.+)$", k)
        if m:
            s = int(m.group(1)) - 1
            k = f"patch_embed.{m.group(2)}" if s == 0 else f"stages.{s}.downsample.{m.group(2)}"
        k = re.sub(r"^block(\d+)\.(\d+)\.", lambda g: f"stages.{int(g.group(1)) - 1}.blocks.{g.group(2)}.", k)
        k = re.sub(r"^norm(\d+)\.", lambda g: f"stages.{int(g.group(1)) - 1}.norm.", k)
        k = k.replace(".mlp.dwconv.dwconv.", ".mlp.mid.dwconv.")
        out[k] = v
    return out


# ------------------------------------------------------------------------------ PVT v2: HF
_HF_V2_PATCH = re.compile(r"^(.*?)encoder\.layers\.0\.patch_embedding\.proj\.weight$")
_HF_V2_BLOCK = {
    "layer_norm_1": "norm1",
    "layer_norm_2": "norm2",
    "attention.query": "attn.q",
    "attention.proj": "attn.proj",
    "attention.spatial_reduction": "attn.sr",
    "attention.layer_norm": "attn.norm",
    "mlp.dense1": "mlp.fc1",
    "mlp.dwconv.dwconv": "mlp.mid.dwconv",
    "mlp.dense2": "mlp.fc2",
}


def _hf_prefix(sd: StateDict, pattern: re.Pattern, allowed: tuple[str, ...], marker: str) -> str | None:
    """The model prefix (``""``, ``"pvt_v2."``, ...) of an HF state dict: the part of a key before
    ``pattern`` matches, in ``allowed``, with ``prefix + marker`` also present; None if none."""
    for k in sd:
        m = pattern.match(k)
        if m and m.group(1) in allowed and m.group(1) + marker in sd:
            return m.group(1)
    return None


def _hf_v2_prefix(sd: StateDict) -> str | None:
    return _hf_prefix(sd, _HF_V2_PATCH, ("", "pvt_v2."), "encoder.layers.0.blocks.0.mlp.dwconv.dwconv.weight")


def detect_hf_pvt_v2(sd: StateDict) -> bool:
    """HF ``PvtV2*``: ``[pvt_v2.]encoder.layers.0.patch_embedding.proj`` and conv-MLP blocks."""
    return _hf_v2_prefix(sd) is not None


def _rename_hf_v2(rest: str) -> str | tuple[str, str] | None:
    """One HF PvtV2 key (prefix stripped) -> its vitlab key, ``(attn module, "key.weight")``
    for a half of the fused kv projection, or None when unknown."""
    m = re.match(r"^encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$", rest)
    if not m:
        return None
    s, sub, kind = int(m.group(1)), m.group(2), m.group(3)
    if sub in ("patch_embedding.proj", "patch_embedding.layer_norm"):
        owner = "patch_embed" if s == 0 else f"stages.{s}.downsample"
        return f"{owner}.{'proj' if sub.endswith('proj') else 'norm'}.{kind}"
    if sub == "layer_norm":
        return f"stages.{s}.norm.{kind}"
    b = re.match(r"^blocks\.(\d+)\.(.+)$", sub)
    if not b:
        return None
    base, inner = f"stages.{s}.blocks.{b.group(1)}", b.group(2)
    if inner in ("attention.key", "attention.value"):
        return f"{base}.attn", f"{inner.rsplit('.', 1)[1]}.{kind}"
    return f"{base}.{_HF_V2_BLOCK[inner]}.{kind}" if inner in _HF_V2_BLOCK else None


def _convert_hf(sd: StateDict, prefix: str, rename) -> StateDict:
    """Rename the keys under ``prefix`` with ``rename``, the classifier to ``head``, and fuse
    the separate key / value projections; unknown keys are kept for the unexpected-key report."""
    out: StateDict = {}
    kv: dict[str, dict[str, Tensor]] = {}
    for key, v in sd.items():
        new = rename(key[len(prefix):]) if key.startswith(prefix) else None
        if isinstance(new, tuple):
            kv.setdefault(new[0], {})[new[1]] = v
        elif new is not None:
            out[new] = v
        elif not _head(key, v, out):
            out[key] = v
    _fuse_kv(kv, out)
    return out


def convert_hf_pvt_v2(sd: StateDict, model: nn.Module) -> StateDict:
    """HF PvtV2 keys -> vitlab keys; ``key`` and ``value`` projections are fused into ``kv``."""
    return _convert_hf(sd, _hf_v2_prefix(sd) or "", _rename_hf_v2)


# ------------------------------------------------------------------------------ PVT v1: HF
_HF_V1_PATCH = re.compile(r"^(.*?)encoder\.patch_embeddings\.0\.projection\.weight$")
_HF_V1_BLOCK = {
    "layer_norm_1": "norm1",
    "layer_norm_2": "norm2",
    "attention.self.query": "attn.q",
    "attention.self.sequence_reduction": "attn.sr",
    "attention.self.layer_norm": "attn.norm",
    "attention.output.dense": "attn.proj",
    "mlp.dense1": "mlp.fc1",
    "mlp.dense2": "mlp.fc2",
}


def detect_hf_pvt(sd: StateDict) -> bool:
    """HF ``Pvt*`` (v1): ``[pvt.]encoder.patch_embeddings.0.projection`` and ``encoder.block.0.0``."""
    return _hf_v1_prefix(sd) is not None


def _hf_v1_prefix(sd: StateDict) -> str | None:
    return _hf_prefix(sd, _HF_V1_PATCH, ("", "pvt."), "encoder.block.0.0.attention.self.query.weight")


def _rename_hf_v1(rest: str) -> str | tuple[str, str] | None:
    """One HF Pvt key (prefix stripped) -> its official-layout key (see :func:`_rename_hf_v2`)."""
    m = re.match(r"^encoder\.patch_embeddings\.(\d+)\.(.+)$", rest)
    if m:
        s, sub = int(m.group(1)) + 1, m.group(2)
        if sub in ("position_embeddings", "cls_token"):
            return f"pos_embed{s}" if sub == "position_embeddings" else "cls_token"
        p = re.match(r"^(projection|layer_norm)\.(weight|bias)$", sub)
        return f"patch_embed{s}.{'proj' if p.group(1) == 'projection' else 'norm'}.{p.group(2)}" if p else None
    m = re.match(r"^encoder\.block\.(\d+)\.(\d+)\.(.+)\.(weight|bias)$", rest)
    if m:
        base, inner, kind = f"block{int(m.group(1)) + 1}.{m.group(2)}", m.group(3), m.group(4)
        if inner in ("attention.self.key", "attention.self.value"):
            return f"{base}.attn", f"{inner.rsplit('.', 1)[1]}.{kind}"
        return f"{base}.{_HF_V1_BLOCK[inner]}.{kind}" if inner in _HF_V1_BLOCK else None
    m = re.match(r"^encoder\.layer_norm\.(weight|bias)$", rest)
    return f"norm.{m.group(1)}" if m else None


def convert_hf_pvt(sd: StateDict, model: nn.Module) -> StateDict:
    """HF Pvt keys -> the official PVT v1 keys vitlab uses; ``key``/``value`` fused into ``kv``."""
    return _convert_hf(sd, _hf_v1_prefix(sd) or "", _rename_hf_v1)


register_converter("pvt_v2", "timm", detect_timm_pvt_v2, convert_timm_pvt_v2)
register_converter("pvt_v2", "official", detect_official_pvt_v2, convert_official_pvt_v2)
register_converter("pvt_v2", "hf", detect_hf_pvt_v2, convert_hf_pvt_v2)
register_converter("pvt", "hf", detect_hf_pvt, convert_hf_pvt)
