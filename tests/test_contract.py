"""The backbone contract (DESIGN.md section 3), member by member, for every registered model.

Each test is parametrized over the whole registry, each variant shrunk by its family's
``tiny_overrides``, so a new variant is held to the contract the day it is registered.
"""

from __future__ import annotations

import inspect
import math

import pytest
import torch
from torch import nn

import vitlab.models.base as base_module
from vitlab.components import AttentionBase, LearnedPosEmbed, capture_attention
from vitlab.models import Backbone, BackboneConfig, list_models, model_config
from vitlab.models.base import resolve_layer_ids

from conftest import tiny_model

NAMES = list_models()


def tiny(name: str, **overrides) -> Backbone:
    torch.manual_seed(0)
    return tiny_model(name, num_classes=5, **overrides).eval()


def image_size(model: Backbone) -> tuple[int, int]:
    return tuple(model.config.image_size)


def images(model: Backbone, size: tuple[int, int] | None = None, batch: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randn(batch, model.config.in_channels, *(size or image_size(model)), generator=g)


def test_backbone_is_abstract():
    with pytest.raises(TypeError, match="abstract"):
        Backbone()

    class NoLayout(Backbone):  # every member but token_layout
        def forward_features(self, x, mask=None): return x
        def forward_head(self, x, pre_logits=False): return x
        def collect_intermediates(self, x, take, norm, stop_early): return x, []
        def group_matcher(self): return {}

    with pytest.raises(TypeError, match="token_layout"):
        NoLayout()


@pytest.mark.parametrize("name", NAMES)
def test_config_protocol_and_base_class(name):
    model = tiny(name)
    assert isinstance(model, Backbone)
    assert isinstance(model.config, BackboneConfig)
    c = model.config
    assert len(c.image_size) == 2 and all(isinstance(s, int) and s > 0 for s in c.image_size)
    assert isinstance(c.in_channels, int) and c.num_classes == 5
    assert model_config(name).num_classes == 1000  # the variant's own value, untouched by the override


@pytest.mark.parametrize("name", NAMES)
@torch.no_grad()
def test_forward_is_head_of_features_and_mask_signature(name):
    model = tiny(name)
    params = inspect.signature(model.forward_features).parameters
    assert list(params)[:2] == ["x", "mask"] and params["mask"].default is None
    assert "pre_logits" in inspect.signature(model.forward_head).parameters
    x = images(model)
    feats = model.forward_features(x)
    assert torch.is_tensor(feats) and feats.ndim in (3, 4)
    torch.testing.assert_close(model.forward_features(x, mask=None), feats, atol=0, rtol=0)
    out = model(x)
    assert out.shape == (2, 5)
    torch.testing.assert_close(model.forward_head(feats), out, atol=0, rtol=0)


@pytest.mark.parametrize("name", NAMES)
@torch.no_grad()
def test_pre_logits_and_classifier(name):
    """``forward_head(pre_logits=True)`` is (B, num_features), before the classifier, and
    ``get_classifier()`` is the classifier: moving its biases by d moves every logit by d."""
    model = tiny(name)
    x = images(model)
    feats = model.forward_features(x)
    pre = model.forward_head(feats, pre_logits=True)
    assert pre.shape == (2, model.num_features)
    out = model.forward_head(feats)
    head = model.get_classifier()
    linears = [m for m in head.modules() if isinstance(m, nn.Linear)]
    assert linears and all(m.out_features == 5 for m in linears)
    own = {id(p) for p in model.parameters()}
    assert all(id(p) in own for p in head.parameters())
    for m in linears:
        m.bias += 0.5
    torch.testing.assert_close(model.forward_head(feats), out + 0.5, atol=1e-5, rtol=0)
    torch.testing.assert_close(model.forward_head(feats, pre_logits=True), pre, atol=0, rtol=0)
    assert set(model.head_parameter_names()) >= {n for n, p in model.named_parameters() if id(p) in
                                                 {id(q) for q in head.parameters()}}


@pytest.mark.parametrize("name", NAMES)
def test_reset_classifier(name):
    model = tiny(name)
    x = images(model)
    with torch.no_grad():
        pre = model.forward_head(model.forward_features(x), pre_logits=True)
    model.reset_classifier(7)
    assert model.config.num_classes == 7
    head = model.get_classifier()
    assert all(m.out_features == 7 for m in head.modules() if isinstance(m, nn.Linear))
    own = {id(p) for p in model.parameters()}
    assert all(id(p) in own for p in head.parameters())
    with torch.no_grad():
        assert model(x).shape == (2, 7)
    model.reset_classifier(0)
    with torch.no_grad():
        torch.testing.assert_close(model(x), pre, atol=1e-6, rtol=0)  # no head: the pre-logit features
    with pytest.raises(ValueError, match="num_classes"):
        model.reset_classifier(-1)


def test_head_parameters_include_pooling_norm_and_pre_logits():
    """Transfer learning trains what forward_head uses: fc_norm, pre_logits and the head."""
    model = tiny("vit_tiny_patch16_224", pool="mean", class_token=False, representation_size=8)
    names = set(model.head_parameter_names())
    assert {"fc_norm.weight", "pre_logits.fc.weight", "pre_logits.fc.bias", "head.weight"} <= names
    assert not any(n.startswith(("blocks.", "norm.", "patch_embed.")) for n in names)


@pytest.mark.parametrize("name", NAMES)
@torch.no_grad()
def test_forward_intermediates_and_feature_info(name):
    model = tiny(name)
    x = images(model)
    h, w = image_size(model)
    final, maps = model.forward_intermediates(x)
    torch.testing.assert_close(final, model.forward_features(x), atol=1e-6, rtol=0)
    assert len(maps) == len(model.feature_info) > 0
    for fmap, info in zip(maps, model.feature_info):
        r = info["reduction"]
        assert fmap.shape == (2, info["num_chs"], math.ceil(h / r), math.ceil(w / r)), info
    n = len(maps)
    only = model.forward_intermediates(x, intermediates_only=True)
    for a, b in zip(only, maps):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    picked = model.forward_intermediates(x, indices=[0, -1], intermediates_only=True)
    torch.testing.assert_close(picked[0], maps[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(picked[1], maps[n - 1], atol=1e-6, rtol=0)
    last = model.forward_intermediates(x, indices=1, intermediates_only=True)
    assert len(last) == 1
    torch.testing.assert_close(last[0], maps[-1], atol=1e-6, rtol=0)
    # one pixel more each way: every map gains a row and a column of (padded) tokens where the stride says so
    plus = model.forward_intermediates(images(model, (h + 1, w + 1)), intermediates_only=True)
    for fmap, info in zip(plus, model.feature_info):
        r = info["reduction"]
        assert fmap.shape[-2:] == (math.ceil((h + 1) / r), math.ceil((w + 1) / r)), info
    _, nlc = model.forward_intermediates(x, indices=[0], output_fmt="NLC")
    torch.testing.assert_close(nlc[0], maps[0].flatten(2).transpose(1, 2), atol=0, rtol=0)
    with pytest.raises(ValueError, match="out of range"):
        model.forward_intermediates(x, indices=[n])


@pytest.mark.parametrize("name", NAMES)
def test_grad_checkpointing(name, monkeypatch):
    model = tiny(name).train()
    for m in model.modules():  # deterministic training forward (no dropout / drop path)
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    calls = []
    real = base_module.checkpoint_seq

    def counting(fn, *args, **kwargs):
        calls.append(fn)
        return real(fn, *args, **kwargs)

    monkeypatch.setattr(base_module, "checkpoint_seq", counting)
    x = images(model)

    def grads() -> dict[str, torch.Tensor]:
        model.zero_grad()
        out = model(x)  # a distilled DeiT in training: (class-token logits, distillation logits)
        sum(o.pow(2).sum() for o in (out if isinstance(out, tuple) else (out,))).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain = grads()
    assert calls == []
    model.set_grad_checkpointing(True)
    checkpointed = grads()
    assert len(calls) >= len(model.feature_info)  # at least one checkpointed block per feature index
    assert plain.keys() == checkpointed.keys()
    for k in plain:
        torch.testing.assert_close(checkpointed[k], plain[k], atol=1e-5, rtol=1e-4)
    calls.clear()
    with torch.no_grad():
        model.eval()(x)
    assert calls == []  # eval: never checkpointed


@pytest.mark.parametrize("name", NAMES)
def test_no_weight_decay(name):
    model = tiny(name)
    names = {n for n, _ in model.named_parameters()}
    skip = model.no_weight_decay()
    assert skip <= names
    tokens = {n for n in names if any(k in part for part in n.split(".")
                                      for k in ("pos_embed", "cls_token", "dist_token", "table"))}
    assert tokens <= skip
    pos = {f"{m}.weight" for m, module in model.named_modules() if isinstance(module, LearnedPosEmbed)}
    assert not any(n.endswith(".weight") and p.ndim > 1 for n, p in model.named_parameters() if n in skip - pos)


@pytest.mark.parametrize("name", NAMES)
def test_group_matcher_layer_ids_follow_depth(name):
    """Layer ids from group_matcher: 0 for the stem, the last for the classifier, contiguous,
    and never decreasing in the order the modules run."""
    model = tiny(name)
    ids = model.layer_ids()
    n = model.num_layer_ids
    assert ids == resolve_layer_ids([k for k, _ in model.named_parameters()], model.group_matcher())[0]
    assert set(ids.values()) == set(range(n)) and n >= 3
    head = {id(p) for p in model.get_classifier().parameters()}
    assert all(ids[k] == n - 1 for k, p in model.named_parameters() if id(p) in head)
    # order in which each parameter's module first runs
    order: list[str] = []
    hooks = []
    for mname, m in model.named_modules():
        direct = [f"{mname}.{p}" if mname else p for p, _ in m.named_parameters(recurse=False)]
        if direct and mname:
            hooks.append(m.register_forward_pre_hook(lambda mod, args, d=direct: order.extend(k for k in d if k not in order)))
    with torch.no_grad():
        model(images(model))
    for h in hooks:
        h.remove()
    seq = [ids[k] for k in order]
    assert seq == sorted(seq), [(k, ids[k]) for k in order]
    assert seq[0] == 0
    # the matcher's groups are data: the stem regex alone gives id 0
    stem = model.group_matcher()["stem"]
    import re
    assert all(ids[k] == 0 for k in ids if re.match(stem, k))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("grow", [(0, 0), (16, 8)])
def test_token_layout_matches_the_tokens(name, grow):
    """token_layout at an input size: every attention call's query/key counts, windows and
    shifts, and every feature map's grid and prefix tokens, against what the model computes."""
    model = tiny(name)
    size = tuple(s + g for s, g in zip(image_size(model), grow))
    x = images(model, size, batch=1)
    layout = model.token_layout(size)
    has_attention = any(isinstance(m, AttentionBase) for m in model.modules())
    assert bool(layout.attention) == has_attention
    seen: dict[str, torch.Tensor] = {}
    hooks = [model.get_submodule(f.module).register_forward_hook(
        lambda mod, args, out, key=f.module: seen.setdefault(key, out)) for f in layout.features]
    with torch.no_grad():
        if has_attention:
            with capture_attention(model) as cap:
                model(x)
            records = {r.name: r for r in cap.records}
        else:
            model(x)
            records = {}
        maps = model.forward_intermediates(x, intermediates_only=True)
    for h in hooks:
        h.remove()
    assert {a.module for a in layout.attention} == set(records)
    for a in layout.attention:
        r = records[a.module]
        if a.kind == "window":
            assert (tuple(r.info["window"]), tuple(r.info["shift"])) == (a.window, a.shift)
            assert a.num_queries == a.num_keys == math.prod(r.info["grid"])
            assert r.probs.shape[-1] == math.prod(a.window)
        else:
            assert r.probs.shape[-2:] == (a.num_queries, a.num_keys), a.label
    keys = {s.key for a in layout.attention for s in (*a.queries, *a.keys)}
    assert set(layout.readout) <= keys or not layout.attention
    assert len(layout.features) == len(maps)
    for f, fmap in zip(layout.features, maps):
        assert fmap.shape[-2:] == f.grid.shape, f.label
        out = seen[f.module]
        if f.prefix is None:
            assert out.shape[-2:] == f.grid.shape
        else:
            assert out.shape[1] == f.prefix + f.grid.size, f.label
        cell = size[0] / f.grid.shape[0], size[1] / f.grid.shape[1]
        assert all(c <= fc + 1e-6 and fc < c + fc for c, fc in zip(cell, f.grid.cell))  # the grid covers the image


def test_class_token_readout_layout_is_blind_in_the_last_block():
    layout = tiny("vit_tiny_patch16_224").token_layout((64, 48))
    assert [f.reaches_head for f in layout.features] == [True, False]
    assert layout.readout == (("cls", 0),) and layout.default_queries == ("cls",)
    mean = tiny("vit_tiny_patch16_224", pool="mean").token_layout((64, 48))
    assert all(f.reaches_head for f in mean.features) and mean.readout == (("grid", 0),)


@torch.no_grad()
def test_vit_mask_drops_hidden_patches():
    """A plain ViT drops masked patches (MAE): hidden pixels no longer matter, visible ones do."""
    model = tiny("vit_tiny_patch16_224")
    x = images(model)
    grid = model.patch_embed.grid_size(image_size(model))
    n = grid[0] * grid[1]
    mask = torch.zeros(2, n, dtype=torch.bool)
    mask[0, [0, 5]] = True
    mask[1, [3, n - 1]] = True
    out = model.forward_features(x, mask=mask)
    assert out.shape == (2, 1 + n - 2, model.num_features)
    torch.testing.assert_close(model.forward_features(x, mask=torch.zeros_like(mask)), model.forward_features(x))
    p = model.config.patch_size
    y = x.clone()
    y[0, :, :p, :p] += 5.0  # patch 0 of image 0: hidden
    torch.testing.assert_close(model.forward_features(y, mask=mask), out, atol=0, rtol=0)
    y[0, :, :p, p : 2 * p] += 5.0  # patch 1 of image 0: visible
    assert not torch.allclose(model.forward_features(y, mask=mask)[0], out[0])
    with pytest.raises(ValueError, match="same number"):
        model.forward_features(x, mask=torch.tensor([[True] + [False] * (n - 1), [False] * n]))


@pytest.mark.parametrize("name", ["pvt_tiny", "crossvit_9_240", "cnn_small"])
def test_mask_not_yet_supported_is_one_clear_error(name):
    model = tiny(name)
    with pytest.raises(ValueError, match=r"cannot be pre-trained by masked image modelling: MAE needs a plain ViT family \(.*vit.*\), SimMIM .*swin"):
        model.forward_features(images(model), mask=torch.zeros(2, 4, dtype=torch.bool))


@pytest.mark.parametrize("name", ["swin_tiny_patch4_window7_224", "pvt_tiny", "cait_xxs24_224"])
def test_layer_decay_groups_use_the_resolved_ids(name):
    from vitlab.training.optim import param_groups

    model = tiny(name)
    ids, n = model.layer_ids(), model.num_layer_ids
    groups = param_groups(model, weight_decay=0.1, layer_decay=0.5)
    scale = {k: g["lr_scale"] for g in groups for k in g["names"]}
    assert scale.keys() == ids.keys()
    assert all(scale[k] == 0.5 ** (n - 1 - ids[k]) for k in ids)
    assert len({g["lr_scale"] for g in groups}) == n


def test_transfer_learning_trains_what_forward_head_uses():
    from vitlab.training.api import ViTTransferLearning

    model = tiny("vit_tiny_patch16_224", pool="mean", class_token=False, representation_size=8)
    tl = ViTTransferLearning(model, num_classes=3, freeze_backbone=True)
    trainable = {n for n, p in tl.model.named_parameters() if p.requires_grad}
    assert trainable == set(model.head_parameter_names())
    assert {"pre_logits.fc.weight", "fc_norm.weight", "head.weight"} <= trainable


def test_default_gradcam_layers_follow_the_layout_streams():
    """Grad-CAM's default layers come from the token layout: the deepest map reaching the head
    on every stream (both CrossViT branches' last stage; one block for a ViT)."""
    from vitlab.evaluation.interpretation import default_cam_layers, feature_points

    cross = tiny("crossvit_9_240")
    depth = len(cross.blocks)
    assert default_cam_layers(cross, feature_points(cross, image_size(cross))) == [depth, 2 * depth]
    vit = tiny("vit_tiny_patch16_224")
    assert default_cam_layers(vit, feature_points(vit, image_size(vit))) == [1]  # block 2's patches never reach the head


@pytest.mark.parametrize("name", NAMES)
def test_config_validation_names_every_problem(name):
    """One validation helper for every family: a bad value raises one ValueError naming the
    config class and every problem at once."""
    cls = type(model_config(name)).__name__
    with pytest.raises(ValueError, match=rf"^invalid {cls}: .*num_classes must be >= 0, got -1.*in_channels must be "
                                         r"positive, got 0|^invalid " + cls + r": .*in_channels must be positive, got 0.*"
                                         r"num_classes must be >= 0, got -1"):
        model_config(name, num_classes=-1, in_channels=0)


@pytest.mark.parametrize("name", NAMES)
def test_intermediate_maps_are_on_the_forward_path(name):
    """``forward_intermediates`` keeps every map on the forward path: ``forward_head(final)`` is the
    plain forward bit for bit, and its gradient with respect to every map that reaches the head
    exists and is non-zero (what Grad-CAM and dense tasks differentiate through)."""
    model = tiny(name)
    x = images(model)
    plain_features = model.forward_features(x)  # grad enabled in both (SDPA may pick another kernel without)
    plain_logits = model.forward_head(plain_features)
    final, maps = model.forward_intermediates(x)
    logits = model.forward_head(final)
    torch.testing.assert_close(final, plain_features, atol=0, rtol=0)
    torch.testing.assert_close(logits, plain_logits, atol=0, rtol=0)
    features = model.token_layout(image_size(model)).features
    reach = [i for i, f in enumerate(features) if f.reaches_head]
    assert reach
    grads = torch.autograd.grad(logits.sum(), [maps[i] for i in reach], allow_unused=True)
    for i, g in zip(reach, grads):
        assert g is not None, f"{features[i].label}: the logits do not depend on the returned map"
        assert g.abs().sum() > 0, features[i].label
