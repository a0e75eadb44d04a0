"""Load a Hugging Face ``SegformerForSemanticSegmentation`` folder into vitlab.

SegFormer's Mix Transformer (MiT) encoder is PVT v2: the same overlapping patch
embeddings (7x7 stride 4, then 3x3 stride 2, padding ``k // 2``, each with a LayerNorm),
spatial-reduction attention (strided conv + LayerNorm on keys/values), the Mix-FFN
(fc1, 3x3 depth-wise conv, GELU, fc2) and a LayerNorm after every stage. The differences:

* every LayerNorm of SegFormer uses PyTorch's default epsilon 1e-5 (its config's
  ``layer_norm_eps`` is not used by the encoder), so the vitlab model is built with
  ``norm_eps = local_norm_eps = 1e-5``;
* separate query/key/value projections: key and value are concatenated into vitlab's fused
  ``kv`` (key rows first);
* the decode head maps one to one onto :class:`~vitlab.tasks.segmentation.heads.AllMlpHead`
  (``linear_c`` / ``linear_projections``, ``linear_fuse``, ``batch_norm``, ``classifier``).

What vitlab's PVT v2 cannot express, and is refused with a message: patch sizes other than
(7, 3, 3, 3) or strides other than (4, 2, 2, 2), an activation other than exact GELU, and
a number of ``hidden_sizes`` / ``depths`` / ``sr_ratios`` entries differing from
``num_encoder_blocks``.

Both key layouts are read: transformers >= 5 (``segformer.stages.N.{patch_embeddings,
blocks.M.{layernorm_before,attention.{q,k,v,o}_proj,...},layer_norm}``,
``decode_head.linear_projections``) and the layout of the released checkpoints
(``segformer.encoder.{patch_embeddings.N,block.N.M.{layer_norm_1,attention.self.{query,key,
value,sr,layer_norm},attention.output.dense,...},layer_norm.N}``, ``decode_head.linear_c``).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ...errors import CheckpointError
from ...models.pvt import PvtV2Config, PyramidVisionTransformerV2
from ...pretrained.io import read_weights
from .heads import AllMlpHead, Segmenter

_BLOCK_NAMES = {
    # transformers >= 5
    "layernorm_before": "norm1",
    "layernorm_after": "norm2",
    "attention.q_proj": "attn.q",
    "attention.o_proj": "attn.proj",
    "attention.sequence_reduction.sequence_reduction": "attn.sr",
    "attention.sequence_reduction.layer_norm": "attn.norm",
    # released checkpoints (transformers < 5)
    "layer_norm_1": "norm1",
    "layer_norm_2": "norm2",
    "attention.self.query": "attn.q",
    "attention.output.dense": "attn.proj",
    "attention.self.sr": "attn.sr",
    "attention.self.layer_norm": "attn.norm",
    # both
    "mlp.dense1": "mlp.fc1",
    "mlp.fc1": "mlp.fc1",
    "mlp.dwconv.dwconv": "mlp.mid.dwconv",
    "mlp.dense2": "mlp.fc2",
    "mlp.fc2": "mlp.fc2",
}
_KEY_VALUE = {"attention.k_proj": "key", "attention.v_proj": "value", "attention.self.key": "key",
              "attention.self.value": "value"}


def segformer_pvt_config(hf: dict[str, Any]) -> PvtV2Config:
    """The :class:`PvtV2Config` of a SegFormer ``config.json`` (encoder only, no classifier).

    Raises:
        CheckpointError: When the encoder differs in a way PVT v2 cannot express.
    """
    n = int(hf.get("num_encoder_blocks", 4))
    problems = []
    if list(hf.get("patch_sizes", [7, 3, 3, 3])) != [7] + [3] * (n - 1):
        problems.append(f"patch_sizes {hf.get('patch_sizes')} (PVT v2 has 7 then 3)")
    if list(hf.get("strides", [4, 2, 2, 2])) != [4] + [2] * (n - 1):
        problems.append(f"strides {hf.get('strides')} (PVT v2 has 4 then 2)")
    if hf.get("hidden_act", "gelu") != "gelu":
        problems.append(f"hidden_act {hf.get('hidden_act')!r} (PVT v2's Mix-FFN uses exact GELU)")
    for key in ("hidden_sizes", "depths", "sr_ratios", "num_attention_heads", "mlp_ratios"):
        if len(hf.get(key, [])) != n:
            problems.append(f"{key} has {len(hf.get(key, []))} entries for {n} encoder blocks")
    if problems:
        raise CheckpointError("this SegFormer encoder cannot be expressed by vitlab's PVT v2: " + "; ".join(problems))
    return PvtV2Config(
        in_channels=int(hf.get("num_channels", 3)), num_classes=0, dims=tuple(hf["hidden_sizes"]),
        depths=tuple(hf["depths"]), heads=tuple(hf["num_attention_heads"]), mlp_ratios=tuple(hf["mlp_ratios"]),
        sr_ratios=tuple(hf["sr_ratios"]), qkv_bias=True, norm_eps=1e-5, local_norm_eps=1e-5,
        image_size=512,
    )


_NEW_PATCH = re.compile(r"^segformer\.stages\.(\d+)\.patch_embeddings\.(proj|layer_norm)\.(weight|bias)$")
_OLD_PATCH = re.compile(r"^segformer\.encoder\.patch_embeddings\.(\d+)\.(proj|layer_norm)\.(weight|bias)$")
_NEW_NORM = re.compile(r"^segformer\.stages\.(\d+)\.layer_norm\.(weight|bias)$")
_OLD_NORM = re.compile(r"^segformer\.encoder\.layer_norm\.(\d+)\.(weight|bias)$")
_NEW_BLOCK = re.compile(r"^segformer\.stages\.(\d+)\.blocks\.(\d+)\.(.+)\.(weight|bias)$")
_OLD_BLOCK = re.compile(r"^segformer\.encoder\.block\.(\d+)\.(\d+)\.(.+)\.(weight|bias)$")


def _rename(key: str) -> str | tuple[str, str] | None:
    """One SegFormer encoder key -> its vitlab key, ``(attn module, "key.weight")`` etc. for a
    half of the fused kv projection, or None when unknown."""
    m = _NEW_PATCH.match(key) or _OLD_PATCH.match(key)
    if m:
        s, part, kind = int(m.group(1)), "proj" if m.group(2) == "proj" else "norm", m.group(3)
        return f"patch_embed.{part}.{kind}" if s == 0 else f"stages.{s}.downsample.{part}.{kind}"
    m = _NEW_NORM.match(key) or _OLD_NORM.match(key)
    if m:
        return f"stages.{m.group(1)}.norm.{m.group(2)}"
    m = _NEW_BLOCK.match(key) or _OLD_BLOCK.match(key)
    if m is None:
        return None
    base, inner, kind = f"stages.{m.group(1)}.blocks.{m.group(2)}", m.group(3), m.group(4)
    if inner in _KEY_VALUE:
        return f"{base}.attn", f"{_KEY_VALUE[inner]}.{kind}"
    if inner in _BLOCK_NAMES:
        return f"{base}.{_BLOCK_NAMES[inner]}.{kind}"
    return None


def convert_segformer_state_dict(sd: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Split a SegFormer state dict into vitlab backbone and :class:`AllMlpHead` state dicts.

    Raises:
        CheckpointError: On a key that is neither encoder nor decode head.
    """
    backbone: dict[str, Tensor] = {}
    head: dict[str, Tensor] = {}
    kv: dict[str, dict[str, Tensor]] = {}
    unknown = []
    for k, v in sd.items():
        h = re.match(r"^decode_head\.(?:linear_c|linear_projections)\.(\d+)\.proj\.(weight|bias)$", k)
        if h:
            head[f"linear_c.{h.group(1)}.proj.{h.group(2)}"] = v
            continue
        if k.startswith("decode_head."):
            head[k[len("decode_head."):]] = v
            continue
        new = _rename(k)
        if new is None:
            unknown.append(k)
        elif isinstance(new, tuple):
            kv.setdefault(new[0], {})[new[1]] = v
        else:
            backbone[new] = v
    if unknown:
        raise CheckpointError(
            f"not a SegFormer semantic-segmentation checkpoint: {len(unknown)} unknown key(s), e.g. {unknown[0]!r}"
        )
    for attn, parts in kv.items():
        for kind in ("weight", "bias"):
            if f"key.{kind}" not in parts or f"value.{kind}" not in parts:
                raise CheckpointError(f"SegFormer checkpoint lacks the key or value {kind} of {attn}")
            backbone[f"{attn}.kv.{kind}"] = torch.cat([parts[f"key.{kind}"], parts[f"value.{kind}"]], dim=0)
    return backbone, head


def load_segformer(path: str | Path) -> Segmenter:
    """A :class:`Segmenter` (PVT v2 + :class:`AllMlpHead`) from a ``save_pretrained`` folder.

    Its ``head`` gives the same logits as the Hugging Face model (at stride 4); the
    Segmenter's forward resizes them bilinearly to the input size. Returned in eval mode.

    Args:
        path: A folder holding ``config.json`` and ``model.safetensors`` (or ``pytorch_model.bin``).

    Raises:
        FileNotFoundError: No such folder or no weights in it.
        CheckpointError: Not a SegFormer semantic-segmentation checkpoint, or an encoder
            PVT v2 cannot express.
    """
    folder = Path(path)
    cfg_file = folder / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"no config.json in {folder}: expected a Hugging Face save_pretrained folder")
    hf = json.loads(cfg_file.read_text())
    if hf.get("model_type") != "segformer":
        raise CheckpointError(f"{folder} holds a {hf.get('model_type')!r} model, not a SegFormer (model_type 'segformer')")
    config = segformer_pvt_config(hf)
    ckpt = read_weights(folder)
    backbone_sd, head_sd = convert_segformer_state_dict(ckpt.state_dict)
    if not head_sd:
        raise CheckpointError(f"{folder} has no decode_head weights: save a SegformerForSemanticSegmentation")
    num_labels = head_sd["classifier.weight"].shape[0]
    backbone = PyramidVisionTransformerV2(config)
    head = AllMlpHead(config.dims, [4 * 2**i for i in range(config.num_stages)], num_labels,
                      decoder_dim=int(hf.get("decoder_hidden_size", 256)),
                      dropout=float(hf.get("classifier_dropout_prob", 0.1)))
    for module, sd, what in ((backbone, backbone_sd, "encoder"), (head, head_sd, "decode head")):
        try:
            missing, unexpected = module.load_state_dict(sd, strict=False)
        except RuntimeError as e:  # shape mismatches
            detail = next((ln.strip() for ln in str(e).splitlines() if "size mismatch" in ln), str(e).splitlines()[0])
            raise CheckpointError(f"the SegFormer {what} does not fit its config.json: {detail}") from None
        if missing or unexpected:
            raise CheckpointError(
                f"the SegFormer {what} does not fit vitlab's layout: missing {missing[:3]}, unexpected {unexpected[:3]}"
            )
    model = Segmenter(backbone, head, indices=list(range(config.num_stages)))
    return model.eval()
