"""The one learned position-embedding module (``LearnedPosEmbed``): resampling on forward and on
load, timm's flat state-dict keys, strict loading, weight decay and layer decay."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from PIL import Image

from vitlab.components import LearnedPosEmbed
from vitlab.models import list_models
from vitlab.pretrained import load_state_dict_checked
from vitlab.training.optim import param_groups

from conftest import tiny_model

# One model per family with a learned position embedding, and two image sizes whose token
# grids are square (a checkpoint's grid is inferred as square, as timm does).
FAMILIES = {
    "vit_tiny_patch16_224": (32, 48),  # 2x2 -> 3x3
    "deit_tiny_distilled_patch16_224": (32, 48),
    "cait_xxs24_224": (32, 48),
    "crossvit_9_240": (120, 144),  # branch grids 10x10 / 7x7 -> 12x12 / 9x9 (branch 1 sees 224/240 of it)
    "pvt_tiny": (64, 96),  # stage grids 16/8/4/2 -> 24/12/6/3
}

# The state-dict keys outside the blocks, as main's models (plain nn.Parameter embeddings) had them.
TOP_LEVEL_KEYS = {
    "vit_tiny_patch16_224": (32, {"cls_token", "head.bias", "head.weight", "norm.bias", "norm.weight",
                                  "patch_embed.proj.bias", "patch_embed.proj.weight", "pos_embed"}),
    "deit_tiny_distilled_patch16_224": (35, {"cls_token", "dist_token", "head.bias", "head.weight", "head_dist.bias",
                                             "head_dist.weight", "norm.bias", "norm.weight", "patch_embed.proj.bias",
                                             "patch_embed.proj.weight", "pos_embed"}),
    "cait_xxs24_224": (76, {"cls_token", "head.bias", "head.weight", "norm.bias", "norm.weight",
                            "patch_embed.proj.bias", "patch_embed.proj.weight", "pos_embed"}),
    "crossvit_9_240": (128, {"cls_token_0", "cls_token_1", "head.0.bias", "head.0.weight", "head.1.bias",
                             "head.1.weight", "norm.0.bias", "norm.0.weight", "norm.1.bias", "norm.1.weight",
                             "patch_embed.0.proj.bias", "patch_embed.0.proj.weight", "patch_embed.1.proj.bias",
                             "patch_embed.1.proj.weight", "pos_embed_0", "pos_embed_1"}),
    "pvt_tiny": (161, {"cls_token", "head.bias", "head.weight", "norm.bias", "norm.weight",
                       *(f"patch_embed{i}.{m}.{p}" for i in range(1, 5) for m in ("norm", "proj") for p in ("bias", "weight")),
                       "pos_embed1", "pos_embed2", "pos_embed3", "pos_embed4"}),
}
BLOCK_KEY = re.compile(r"^(blocks|blocks_token_only|block\d)\.")


def tiny(name: str, **overrides):
    torch.manual_seed(0)
    return tiny_model(name, num_classes=5, **overrides)


def pos_modules(model: torch.nn.Module) -> dict[str, LearnedPosEmbed]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LearnedPosEmbed)}


def pil_bicubic(grid_rows: torch.Tensor, old: tuple[int, int], new: tuple[int, int]) -> torch.Tensor:
    """(h*w, C) rows on ``old`` -> (h'*w', C) rows on ``new``, each channel resized by PIL (bicubic)."""
    c = grid_rows.shape[-1]
    g = grid_rows.detach().reshape(*old, c).numpy().astype(np.float32)  # (h*w, C) -> (h, w, C)
    out = [np.asarray(Image.fromarray(np.ascontiguousarray(g[..., k]), mode="F").resize((new[1], new[0]), Image.BICUBIC))
           for k in range(c)]
    return torch.from_numpy(np.stack(out, axis=-1)).reshape(new[0] * new[1], c)  # (h', w', C) -> (h'*w', C)


def test_forward_resamples_bicubic_like_pil_and_keeps_the_prefix_rows():
    """2x2 -> 3x3 (and 2x2 -> 3x4): grid rows equal PIL's bicubic resize of each channel (what
    torch's antialiased bicubic, and so timm's resampler, computes); the class row is kept."""
    torch.manual_seed(1)
    pe = LearnedPosEmbed((2, 2), 3, num_prefix_tokens=1)
    pe.init_weights()
    assert pe.weight.shape == (1, 1 + 4, 3) and pe.weight.std() > 0.01
    assert pe() is pe.weight and pe((2, 2)) is pe.weight  # its own grid: the parameter itself
    for new in ((3, 3), (3, 4)):
        out = pe(new)
        assert out.shape == (1, 1 + new[0] * new[1], 3)
        torch.testing.assert_close(out[0, 0], pe.weight[0, 0], atol=0, rtol=0)
        torch.testing.assert_close(out[0, 1:].detach(), pil_bicubic(pe.weight[0, 1:], (2, 2), new), atol=1e-6, rtol=0)
    # gradients reach the stored rows through the resampling
    pe((3, 3)).sum().backward()
    assert pe.weight.grad is not None and pe.weight.grad[0, 1:].abs().sum() > 0


@pytest.mark.parametrize("name", list(FAMILIES))
def test_load_resamples_a_checkpoint_of_another_grid(name):
    """A checkpoint made at another image size loads strictly into every family: each embedding is
    resampled to the model's grid on load (and by adapt_state_dict, for the checked loader)."""
    small_size, big_size = FAMILIES[name]
    small = tiny(name, image_size=small_size)
    sd = small.state_dict()
    for loader in ("load_state_dict", "load_state_dict_checked"):
        big = tiny(name, image_size=big_size)
        before = {n: m.weight.detach().clone() for n, m in pos_modules(big).items()}
        if loader == "load_state_dict":
            big.load_state_dict(sd)
        else:
            load_state_dict_checked(big, sd)
        assert pos_modules(big).keys() == pos_modules(small).keys() and pos_modules(big)
        for n, module in pos_modules(big).items():
            src = pos_modules(small)[n]
            assert module.grid != src.grid, n
            p = module.num_prefix_tokens
            expected = torch.cat([src.weight[:, :p], pil_bicubic(src.weight[0, p:], src.grid, module.grid)[None]], dim=1)
            torch.testing.assert_close(module.weight.detach(), expected.detach(), atol=1e-6, rtol=0, msg=f"{loader} {n}")
            assert not torch.equal(module.weight.detach(), before[n])
        # everything else loaded as it is
        own = big.state_dict()
        for k, v in sd.items():
            if k not in pos_modules(big):
                torch.testing.assert_close(own[k], v, atol=0, rtol=0)


@pytest.mark.parametrize("name", list(TOP_LEVEL_KEYS))
def test_state_dict_keys_are_unchanged(name):
    """timm's flat keys (``pos_embed``, ``pos_embed_0``, ``pos_embed1``): main's key list per family."""
    count, top = TOP_LEVEL_KEYS[name]
    keys = list(tiny(name).state_dict())
    assert len(keys) == count
    assert {k for k in keys if not BLOCK_KEY.match(k)} == top


@pytest.mark.parametrize("name", list_models())
def test_every_position_embedding_saves_under_its_module_name(name):
    model = tiny(name)
    sd = model.state_dict()
    params = {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()}
    pos = pos_modules(model)
    expected = {n for n in params if n.removesuffix(".weight") not in pos} | set(pos)
    persistent = set(sd)
    assert persistent <= expected and set(pos) <= persistent
    assert not any(re.search(r"pos_embed\w*\.weight$", k) for k in sd)
    fresh = tiny(name)
    with torch.no_grad():
        for m in pos_modules(fresh).values():
            m.weight.zero_()
    fresh.load_state_dict(sd)  # strict round trip
    for n, m in pos_modules(fresh).items():
        torch.testing.assert_close(m.weight, pos[n].weight, atol=0, rtol=0)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_strict_load_reports_a_missing_position_embedding(name):
    model = tiny(name)
    key = sorted(pos_modules(model))[-1]
    sd = model.state_dict()
    del sd[key]
    with pytest.raises(RuntimeError, match=rf'Missing key\(s\) in state_dict: "{key}"'):
        model.load_state_dict(sd)
    result = model.load_state_dict(sd, strict=False)
    assert result.missing_keys == [key] and result.unexpected_keys == []
    with pytest.raises(ValueError, match=rf"missing keys: {key}"):
        load_state_dict_checked(model, sd)
    # a stray key under the module's name is unexpected, not silently taken
    sd = {**model.state_dict(), f"{key}.bogus": torch.zeros(1)}
    with pytest.raises(RuntimeError, match=rf'Unexpected key\(s\) in state_dict: "{key}.bogus"'):
        model.load_state_dict(sd)
    # a checkpoint of another width is a size mismatch naming the key
    sd = {**model.state_dict(), key: torch.zeros(1, 4, 3)}
    with pytest.raises(RuntimeError, match=rf"size mismatch for {key}"):
        model.load_state_dict(sd)


def test_load_with_assign_on_a_meta_model():
    src = tiny("vit_tiny_patch16_224")
    with torch.device("meta"):
        model = tiny("vit_tiny_patch16_224")
    model.load_state_dict(src.state_dict(), assign=True)
    assert model.pos_embed.weight.device.type == "cpu" and isinstance(model.pos_embed.weight, torch.nn.Parameter)
    torch.testing.assert_close(model.pos_embed.weight, src.pos_embed.weight, atol=0, rtol=0)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_weight_decay_and_layer_decay_of_position_embeddings(name):
    """No weight decay on any position embedding; with layer decay the first one sits in group 0 (the stem)."""
    model = tiny(name)
    pos = {f"{n}.weight" for n in pos_modules(model)}
    assert pos and pos <= model.no_weight_decay()
    decay = {n: g["weight_decay"] for g in param_groups(model, weight_decay=0.1) for n in g["names"]}
    assert all(decay[n] == 0.0 for n in pos)
    assert any(v == 0.1 for v in decay.values())
    ids = model.layer_ids()
    first = min(pos)  # pos_embed, pos_embed1, pos_embed_0
    assert ids[first] == 0
    groups = param_groups(model, weight_decay=0.1, layer_decay=0.5)
    scale = {n: g["lr_scale"] for g in groups for n in g["names"]}
    assert scale[first] == min(scale.values()) == 0.5 ** (model.num_layer_ids - 1)
