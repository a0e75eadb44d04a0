"""Checkpoints: Hugging Face ``CLIPModel`` folders -> vitlab :class:`CLIP`; vitlab CLIP save/load.

A Hugging Face CLIP folder (``config.json`` + ``model.safetensors`` or ``pytorch_model.bin``)
becomes a vitlab model with a ViT image tower (``pre_norm``, no patch bias, class-token
pooling), the causal text tower, both projections and the logit scale, giving the same
embeddings and logits.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ...errors import CheckpointError
from ...models.text import TextConfig
from .model import CLIP, CLIPConfig
from .tokenizer import CLIPTokenizer

WEIGHTS_FILE = "model.safetensors"


def _load_state(folder: Path) -> dict[str, Tensor]:
    """The weights of a folder: safetensors first, else a weights-only torch pickle."""
    st = folder / "model.safetensors"
    if st.is_file():
        from safetensors.torch import load_file

        return load_file(str(st))
    pt = folder / "pytorch_model.bin"
    if pt.is_file():
        return torch.load(pt, map_location="cpu", weights_only=True)
    raise CheckpointError(f"{folder} holds no weights: expected model.safetensors or pytorch_model.bin")


def clip_config_from_hf(hf: dict[str, Any]) -> CLIPConfig:
    """A Hugging Face ``CLIPModel`` config dict -> :class:`CLIPConfig` (ViT image tower).

    Raises:
        CheckpointError: When the dict is not a CLIP config.
    """
    if "text_config" not in hf or "vision_config" not in hf:
        raise CheckpointError(f"not a Hugging Face CLIPModel config (model_type {hf.get('model_type')!r}): "
                              "expected text_config and vision_config")
    t, v = hf["text_config"], hf["vision_config"]
    eps_t, eps_v = t.get("layer_norm_eps", 1e-5), v.get("layer_norm_eps", 1e-5)
    eos = t.get("eos_token_id", 2)
    text = TextConfig(
        vocab_size=t.get("vocab_size", 49408), context_length=t.get("max_position_embeddings", 77),
        dim=t.get("hidden_size", 512), depth=t.get("num_hidden_layers", 12), heads=t.get("num_attention_heads", 8),
        mlp_dim=t.get("intermediate_size", 2048), embed_dim=0, act=t.get("hidden_act", "quick_gelu"), norm_eps=eps_t,
        # Hugging Face's rule: eos_token_id == 2 is the legacy config, pooled at the largest id.
        pool="argmax" if eos == 2 else "eos", eos_token_id=eos if eos is not None else 49407,
    )
    image = dict(
        image_size=v.get("image_size", 224), patch_size=v.get("patch_size", 32), in_channels=v.get("num_channels", 3),
        dim=v.get("hidden_size", 768), depth=v.get("num_hidden_layers", 12), heads=v.get("num_attention_heads", 12),
        mlp_dim=v.get("intermediate_size", 3072), act=v.get("hidden_act", "quick_gelu"), norm_eps=eps_v,
        pre_norm=True, patch_bias=False, pool="cls", class_token=True, pad_input=False,
    )
    scale = float(torch.tensor(hf.get("logit_scale_init_value", 2.6592)).exp())
    return CLIPConfig(image_model="vit_base_patch16_224", image_overrides=image, text=text,
                      embed_dim=hf.get("projection_dim", 512), init_logit_scale=min(scale, 100.0))


def _blocks(sd: dict[str, Tensor], src: str, dst: str, depth: int) -> dict[str, Tensor]:
    out = {}
    for i in range(depth):
        s, d = f"{src}.encoder.layers.{i}", f"{dst}.blocks.{i}"
        for a, b in (("layer_norm1", "norm1"), ("layer_norm2", "norm2"), ("mlp.fc1", "mlp.fc1"),
                     ("mlp.fc2", "mlp.fc2"), ("self_attn.out_proj", "attn.proj")):
            for p in ("weight", "bias"):
                out[f"{d}.{b}.{p}"] = sd[f"{s}.{a}.{p}"]
        for p in ("weight", "bias"):
            # three (C, C) / (C,) projections -> the fused qkv (3C, C) / (3C,)
            out[f"{d}.attn.qkv.{p}"] = torch.cat([sd[f"{s}.self_attn.{n}_proj.{p}"] for n in "qkv"], dim=0)
    return out


def convert_hf_state_dict(sd: dict[str, Tensor], config: CLIPConfig) -> dict[str, Tensor]:
    """Rename a Hugging Face ``CLIPModel`` state dict to vitlab's :class:`CLIP` keys.

    Raises:
        CheckpointError: When a tensor the conversion needs is missing.
    """
    try:
        dim = sd["vision_model.embeddings.class_embedding"].shape[0]
        out = {
            "visual.cls_token": sd["vision_model.embeddings.class_embedding"].view(1, 1, dim),  # (C,) -> (1, 1, C)
            "visual.pos_embed": sd["vision_model.embeddings.position_embedding.weight"].unsqueeze(0),  # (N, C) -> (1, N, C)
            "visual.patch_embed.proj.weight": sd["vision_model.embeddings.patch_embedding.weight"],
            "text.token_embedding.weight": sd["text_model.embeddings.token_embedding.weight"],
            "text.pos_embed": sd["text_model.embeddings.position_embedding.weight"].unsqueeze(0),  # (L, C) -> (1, L, C)
            "visual_projection.weight": sd["visual_projection.weight"],
            "text_projection.weight": sd["text_projection.weight"],
            "logit_scale": sd["logit_scale"].reshape(()),
        }
        for p in ("weight", "bias"):
            out[f"visual.norm_pre.{p}"] = sd[f"vision_model.pre_layrnorm.{p}"]
            out[f"visual.norm.{p}"] = sd[f"vision_model.post_layernorm.{p}"]
            out[f"text.norm.{p}"] = sd[f"text_model.final_layer_norm.{p}"]
        out.update(_blocks(sd, "vision_model", "visual", int(config.image_overrides["depth"])))
        out.update(_blocks(sd, "text_model", "text", config.text.depth))
    except KeyError as e:
        raise CheckpointError(f"not a Hugging Face CLIPModel checkpoint: tensor {e.args[0]!r} is missing") from None
    return out


def load_hf_clip(folder: str | Path, with_tokenizer: bool = True) -> tuple[CLIP, CLIPTokenizer | None]:
    """Load a Hugging Face ``CLIPModel`` folder (``save_pretrained``) as a vitlab :class:`CLIP`.

    Args:
        folder: The folder with ``config.json`` and the weights (and optionally a tokenizer).
        with_tokenizer: Also load the folder's tokenizer when it has one.

    Returns:
        The model in eval mode and the tokenizer (None when absent or not asked for).

    Raises:
        CheckpointError: Missing files, another architecture, or shapes that do not fit.
    """
    folder = Path(folder)
    cfg_file = folder / "config.json"
    if not cfg_file.is_file():
        raise CheckpointError(f"{folder} is not a Hugging Face model folder: config.json is missing")
    config = clip_config_from_hf(json.loads(cfg_file.read_text()))
    model = CLIP(config)
    _load_into(model, convert_hf_state_dict(_load_state(folder), config), folder)
    tokenizer = None
    if with_tokenizer and ((folder / "tokenizer.json").is_file() or (folder / "vocab.json").is_file()):
        tokenizer = CLIPTokenizer.from_pretrained(folder, context_length=config.text.context_length)
    return model.eval(), tokenizer


def _load_into(model: CLIP, state: dict[str, Tensor], source: Path) -> None:
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = [k for k in own if k in state and own[k].shape != state[k].shape]
    if missing or unexpected or wrong:
        raise CheckpointError(f"{source} does not fit this CLIP model: missing {missing[:3]}, unexpected "
                              f"{unexpected[:3]}, wrong shape {wrong[:3]}")
    model.load_state_dict(state)


def save_clip(model: CLIP, folder: str | Path, tokenizer: CLIPTokenizer | None = None) -> Path:
    """Save a vitlab CLIP as every vitlab checkpoint is saved (``model.safetensors`` + ``config.json``:
    family, task, typed config, preprocessing), the tokenizer inside ``pretrained_cfg`` when given.

    Returns:
        The weights file written.
    """
    from ...pretrained.io import save_checkpoint

    original = getattr(model, "pretrained_cfg", None)
    pcfg = dict(original or {})
    if tokenizer is not None:
        pcfg["tokenizer"] = tokenizer.to_dict()
    model.pretrained_cfg = pcfg
    try:
        return save_checkpoint(model, Path(folder), task="clip")
    finally:
        if original is None:
            del model.pretrained_cfg
        else:
            model.pretrained_cfg = original


def load_clip(folder: str | Path) -> tuple[CLIP, CLIPTokenizer | None]:
    """Load what :func:`save_clip` wrote: the model (eval mode) and its tokenizer if saved.

    Raises:
        CheckpointError: When the folder holds no vitlab CLIP checkpoint or it does not fit.
    """
    folder = Path(folder)
    if not (folder / WEIGHTS_FILE).is_file():
        raise CheckpointError(f"{folder} holds no vitlab CLIP checkpoint: {WEIGHTS_FILE} is missing")
    return load_clip_checkpoint(folder)


def load_clip_checkpoint(path: str | Path) -> tuple[CLIP, CLIPTokenizer | None]:
    """Load any CLIP checkpoint: a Hugging Face ``CLIPModel`` folder, or the one vitlab layout that
    :func:`save_clip` and ``vitlab train --task clip`` write (a run directory, its
    ``checkpoints/epoch-N`` folder, a :func:`save_clip` folder or a ``model.safetensors``), whose
    tokenizer travels in the weights' metadata.

    Returns:
        The model in eval mode (``pretrained_cfg`` restored: preprocessing, prompts) and its
        tokenizer (None when the checkpoint has none).

    Raises:
        FileNotFoundError: No such file or folder.
        CheckpointError: The checkpoint is not a CLIP model.
    """
    from ...pretrained.io import read_weights

    path = Path(path)
    if path.is_dir() and "text_config" in _json_or_empty(path / "config.json"):
        return load_hf_clip(path)
    ck = read_weights(path)
    meta = ck.vitlab_config or {}
    if meta.get("family") != CLIP.__name__:
        what = f"a {meta.get('family')} checkpoint" if meta.get("family") else "not a vitlab checkpoint"
        raise CheckpointError(f"{path} is {what}, not a CLIP model (train one with: vitlab train --task clip)")
    cfg = dict(meta["config"])
    cfg["text"] = TextConfig(**cfg["text"])
    model = CLIP(CLIPConfig(**cfg))
    _load_into(model, ck.state_dict, ck.path)
    pcfg = dict(meta.get("pretrained_cfg") or {})
    model.pretrained_cfg = pcfg
    tokenizer = None
    if pcfg.get("tokenizer"):
        tokenizer = CLIPTokenizer.from_dict(pcfg["tokenizer"])
    elif (ck.path.parent / "tokenizer.json").is_file():
        tokenizer = CLIPTokenizer.from_pretrained(ck.path.parent)
    return model.eval(), tokenizer


def _json_or_empty(file: Path) -> dict[str, Any]:
    try:
        return json.loads(file.read_text()) if file.is_file() else {}
    except (OSError, ValueError):
        return {}
