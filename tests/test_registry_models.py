"""Tests parametrized over every registered variant: a new variant is tested the day it is added.

Parameter counts are exact timm figures (1000 classes), counted on the meta device. The
numerical tests run each variant shrunk by its family's ``tiny_overrides`` so CI stays fast.
"""

from __future__ import annotations

import pytest
import torch

import vitlab
from vitlab.components import DropPath
from vitlab.models import build_model, get_entry
from vitlab.pretrained import load_model, save_checkpoint

from conftest import tiny_model

# Exact parameter counts of timm's models with 1000 classes (issue 2 / issue 3 tables).
TIMM_PARAM_COUNTS = {
    "vit_tiny_patch16_224": 5_717_416,
    "vit_small_patch16_224": 22_050_664,
    "vit_base_patch16_224": 86_567_656,
    "vit_base_patch32_224": 88_224_232,
    "vit_base_patch16_384": 86_859_496,
    "vit_large_patch16_224": 304_326_632,
    "vit_huge_patch14_224": 632_045_800,
    "vit_base_patch16_reg4_gap_256": 86_615_272,
    "vit_medium_patch16_reg4_gap_256": 38_881_768,
    "vit_betwixt_patch16_reg4_gap_256": 60_398_440,
    "deit_tiny_patch16_224": 5_717_416,
    "deit_small_patch16_224": 22_050_664,
    "deit_base_patch16_224": 86_567_656,
    "deit_tiny_distilled_patch16_224": 5_910_800,
    "deit_small_distilled_patch16_224": 22_436_432,
    "deit_base_distilled_patch16_224": 87_338_192,
    "swin_tiny_patch4_window7_224": 28_288_354,
    "swin_small_patch4_window7_224": 49_606_258,
    "swin_base_patch4_window7_224": 87_768_224,
    "swin_base_patch4_window12_384": 87_903_584,
    "swin_large_patch4_window7_224": 196_532_476,
    "pvt_v2_b0": 3_666_760,
    "pvt_v2_b1": 14_009_000,
    "pvt_v2_b2": 25_362_856,
    "pvt_v2_b2_li": 22_553_512,
    "pvt_v2_b3": 45_238_696,
    "pvt_v2_b4": 62_556_072,
    "pvt_v2_b5": 81_956_008,
    "cait_xxs24_224": 11_956_264,
    "cait_xxs36_224": 17_299_720,
    "cait_xs24_384": 26_670_088,
    "cait_s24_224": 46_916_200,
    "cait_s36_384": 68_366_632,
    "crossvit_tiny_240": 7_014_800,
    "crossvit_9_240": 8_553_296,
    "crossvit_small_240": 26_856_272,
    "crossvit_15_240": 27_528_464,
    "crossvit_18_240": 43_271_408,
    "crossvit_9_dagger_240": 8_776_592,
    "crossvit_base_240": 105_025_232,
    # hybrid ViTs (ResNet v2 stem; timm 1.0.31, num_classes=1000)
    "vit_tiny_r_s16_p8_224": 6_337_704,
    "vit_tiny_r_s16_p8_384": 6_355_944,
    "vit_small_r26_s32_224": 36_431_912,
    "vit_small_r26_s32_384": 36_468_392,
    "vit_base_r26_s32_224": 101_383_976,
    "vit_base_r50_s16_224": 98_659_112,
    "vit_base_r50_s16_384": 98_950_952,
    "vit_large_r50_s32_224": 328_994_856,
    "vit_large_r50_s32_384": 329_092_136,
}

# Counts whose reference is not timm (the family's test module says where they come from).
OTHER_PARAM_COUNTS: dict[str, int] = {
    # vitlab's CNN teacher, counted by hand: 3x3 convs without bias + BatchNorm (2 per channel),
    # 1x1 projection shortcuts where the shape changes, and the 512 -> 1000 head.
    "cnn_small": (3 * 64 * 9 + 128)
    + 2 * (64 * 64 * 9 + 128)
    + (64 * 128 * 9 + 256) + (128 * 128 * 9 + 256) + (64 * 128 + 256)
    + (128 * 256 * 9 + 512) + (256 * 256 * 9 + 512) + (128 * 256 + 512) + 2 * (256 * 256 * 9 + 512)
    + (256 * 512 * 9 + 1024) + (512 * 512 * 9 + 1024) + (256 * 512 + 1024)
    + 512 * 1000 + 1000,
    # PVT v1 (timm has none): exact counts of the official architecture (whai362/PVT
    # classification/pvt.py, pvt_tiny..pvt_large, 224x224, 1000 classes), counted by building the
    # official code; they round to the paper's Table 2 (13.2M / 24.5M / 44.2M / 61.4M), which
    # tests/test_pvt.py::test_pvt_v1_counts_match_the_paper checks.
    "pvt_tiny": 13_229_288,
    "pvt_small": 24_485_864,
    "pvt_medium": 44_208_104,
    "pvt_large": 61_369_320,
}

ALL = vitlab.list_models()


def logits_of(out):
    """A distilled model in training mode returns (cls, dist) logits; reduce to one tensor."""
    return sum(out) if isinstance(out, tuple) else out


def image_for(model, batch=2, size=None):
    cfg = model.config
    h, w = size or cfg.image_size
    return torch.randn(batch, cfg.in_channels, h, w)


def test_registry_is_populated():
    assert {"vit_base_patch16_224", "deit_tiny_distilled_patch16_224"} <= set(ALL)
    assert vitlab.list_models("vit_*") and all(n.startswith("vit_") for n in vitlab.list_models("vit_*"))


def test_every_variant_has_a_reference_count():
    missing = [n for n in ALL if n not in TIMM_PARAM_COUNTS and n not in OTHER_PARAM_COUNTS]
    assert not missing, f"variants without a reference parameter count: {missing}"


@pytest.mark.parametrize("name", ALL)
def test_exact_parameter_count(name):
    with torch.device("meta"):
        model = build_model(name)
    expected = TIMM_PARAM_COUNTS.get(name, OTHER_PARAM_COUNTS.get(name))
    assert model.num_params() == expected


@pytest.mark.parametrize("name", ALL)
def test_forward_is_finite_and_eval_deterministic(name):
    model = tiny_model(name, num_classes=7).eval()
    x = image_for(model)
    out = model(x)
    assert out.shape == (2, 7)
    assert torch.isfinite(out).all()
    assert torch.equal(out, model(x))  # eval mode: no dropout / drop-path randomness
    # forward == forward_head(forward_features)
    torch.testing.assert_close(model.forward_head(model.forward_features(x)), out)
    # Samples are independent: the first image alone gives the same logits.
    torch.testing.assert_close(model(x[:1]), out[:1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ALL)
def test_backward_reaches_every_parameter(name):
    model = tiny_model(name, num_classes=5).train()
    out = logits_of(model(image_for(model)))
    (out.square().mean()).backward()
    dead = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.abs().sum() > 0)]
    assert not dead, f"parameters without gradient: {dead}"


@pytest.mark.parametrize("name", ALL)
def test_other_input_size(name):
    model = tiny_model(name, num_classes=3).eval()
    h, w = model.config.image_size
    for size in [(h + h // 2, w), (h // 2 + 3, w + 5)]:
        out = model(image_for(model, 1, size))
        assert out.shape == (1, 3) and torch.isfinite(out).all(), size


@pytest.mark.parametrize("name", ALL)
def test_forward_intermediates(name):
    model = tiny_model(name).eval()
    x = image_for(model)
    maps = model.forward_intermediates(x, intermediates_only=True)
    assert len(maps) == len(model.feature_info)
    h, w = model.config.image_size
    for fmap, info in zip(maps, model.feature_info):
        assert fmap.ndim == 4 and fmap.shape[0] == 2
        assert fmap.shape[1] == info["num_chs"]
        red = info["reduction"]
        assert fmap.shape[2:] == (-(-h // red), -(-w // red)), (fmap.shape, info)
        assert torch.isfinite(fmap).all()
    last = model.forward_intermediates(x, indices=1, intermediates_only=True)
    assert len(last) == 1
    torch.testing.assert_close(last[0], maps[-1])


@pytest.mark.parametrize("name", ALL)
def test_save_load_identical_logits(name, tmp_path):
    model = tiny_model(name, num_classes=4).eval()
    x = image_for(model)
    save_checkpoint(model, tmp_path / "ckpt")
    loaded = load_model(tmp_path / "ckpt").eval()
    assert type(loaded) is type(model)
    assert torch.equal(loaded(x), model(x))
    file = save_checkpoint(model, tmp_path / "single.safetensors")
    assert torch.equal(load_model(file).eval()(x), model(x))


@pytest.mark.parametrize("name", ALL)
def test_contract_members(name):
    model = tiny_model(name, num_classes=6)
    params = dict(model.named_parameters())
    nwd = model.no_weight_decay()
    assert nwd <= set(params)
    ids = {n: model.layer_id(n) for n in params}
    assert min(ids.values()) == 0 and max(ids.values()) == model.num_layer_ids - 1
    assert model.num_features > 0
    model.reset_classifier(9)
    assert model.eval()(image_for(model, 1)).shape == (1, 9)
    model.reset_classifier(0)
    feats = model.eval()(image_for(model, 1))
    assert feats.shape == (1, model.num_features)
    assert get_entry(name).model_class is type(model)


@pytest.mark.parametrize("name", ALL)
def test_grad_checkpointing_same_gradients(name):
    torch.manual_seed(1)
    model = tiny_model(name, num_classes=3).train()
    x = image_for(model)

    def grads():
        model.zero_grad()
        logits_of(model(x)).sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    plain = grads()
    model.set_grad_checkpointing(True)
    ckpt = grads()
    for n in plain:
        torch.testing.assert_close(ckpt[n], plain[n], atol=1e-5, rtol=1e-4, msg=n)


@pytest.mark.parametrize("name", ALL)
def test_attention_capture_every_block(name):
    if get_entry(name).family == "convnet":
        pytest.skip("the CNN teacher has no attention")
    model = tiny_model(name).eval()
    x = image_for(model, 1)
    ref = model(x)
    with vitlab.capture_attention(model) as cap:
        out = model(x)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)  # explicit path == SDPA path
    assert len(cap.records) >= 1
    for r in cap.records:
        assert torch.isfinite(r.probs).all()
        torch.testing.assert_close(r.probs.sum(-1), torch.ones_like(r.probs.sum(-1)), atol=1e-5, rtol=0)
    # Outside the context nothing is recorded and SDPA is used again.
    model(x)
    assert all(m._capture is None for m in model.modules() if hasattr(m, "_capture"))


# ------------------------------------------------- gradient checkpointing and stochastic depth
def residual_blocks(model):
    """The model's residual blocks in depth order (the units that are checkpointed and get a
    stochastic-depth rate): transformer blocks carry ``drop_path1``/``drop_path``, the CNN's are
    its ``ResidualBlock`` modules."""
    from vitlab.models.convnet import ResidualBlock

    return [
        (n, m) for n, m in model.named_modules()
        if hasattr(m, "drop_path1") or isinstance(getattr(m, "drop_path", None), torch.nn.Module)
        or isinstance(m, ResidualBlock)
    ]


def drop_rate(module) -> float:
    return float(getattr(module, "drop_prob", 0.0))  # nn.Identity stands for rate 0


@pytest.mark.parametrize("name", ALL)
def test_grad_checkpointing_wraps_every_block(name, monkeypatch):
    """set_grad_checkpointing(True) sends each block through torch.utils.checkpoint once per
    training forward; False, eval mode and no_grad never do."""
    import functools

    import torch.utils.checkpoint as tuc

    calls = []
    real = tuc.checkpoint

    def counting(fn, *args, **kwargs):
        calls.append(fn.func if isinstance(fn, functools.partial) else fn)
        return real(fn, *args, **kwargs)

    monkeypatch.setattr(tuc, "checkpoint", counting)
    model = tiny_model(name, num_classes=3).train()
    blocks = residual_blocks(model)
    assert blocks, "no residual blocks found"
    x = image_for(model)
    logits_of(model(x)).sum().backward()
    assert calls == []
    model.set_grad_checkpointing(True)
    logits_of(model(x)).sum().backward()
    assert len(calls) == len(blocks)
    assert {id(f) for f in calls} == {id(m) for _, m in blocks}  # each block once, nothing else
    calls.clear()
    with torch.no_grad():
        model(x)
    model.eval()
    model(x)
    assert calls == []
    model.train()
    model.set_grad_checkpointing(False)
    logits_of(model(x)).sum().backward()
    assert calls == []


def expected_drop_rates(model, family: str, rate: float) -> list[float]:
    """Stochastic-depth rate of each residual block (in ``residual_blocks`` order), by the
    family's rule: linear from 0 to ``rate`` over all blocks (timm's ``linspace(0, rate, depth)``),
    except CaiT (one rate for the self-attention blocks, ``drop_path_token_only`` for the
    class-attention ones) and CrossViT (linear over the stages' ``max(branch depths) + fusion``
    slots; branch block i takes slot i, the fusion blocks the stage's last slot)."""
    c = model.config
    if family == "cait":
        return [rate] * c.depth + [c.drop_path_token_only] * c.depth_token_only
    if family == "crossvit":
        lengths = [max(d[:2]) + d[2] for d in c.depth]
        total = sum(lengths)
        slots = [rate * k / (total - 1) for k in range(total)]
        out, start = [], 0
        for d, n in zip(c.depth, lengths):
            for b in range(2):
                out += slots[start : start + d[b]]
            out += [slots[start + n - 1]] * 2 * max(d[2], 1)  # fusion blocks of both branches
            start += n
        return out
    n = len(residual_blocks(model))
    return [rate * k / (n - 1) for k in range(n)]


@pytest.mark.parametrize("name", ALL)
def test_drop_path_rates_follow_the_schedule(name):
    family = get_entry(name).family
    if family == "convnet":
        model = tiny_model(name)
        assert not any(isinstance(m, DropPath) for m in model.modules())
        pytest.skip("the CNN teacher has no stochastic depth")
    extra = {}
    cfg_fields = get_entry(name).config_class.__dataclass_fields__
    if "depth" in cfg_fields and family != "crossvit":
        extra["depth"] = 4  # enough blocks to see the ramp (0, 0.1, 0.2, 0.3)
    if "drop_path_token_only" in cfg_fields:
        extra["drop_path_token_only"] = 0.2
    model = tiny_model(name, drop_path=0.3, **extra)
    blocks = residual_blocks(model)
    got = []
    for n, m in blocks:
        if hasattr(m, "drop_path1"):
            assert drop_rate(m.drop_path1) == drop_rate(m.drop_path2), n  # both residual branches
            got.append(drop_rate(m.drop_path1))
        else:
            got.append(drop_rate(m.drop_path))
    want = expected_drop_rates(model, family, 0.3)
    assert got == pytest.approx(want, abs=1e-6), list(zip([n for n, _ in blocks], got))
    assert max(got) == pytest.approx(0.3, abs=1e-6)
    # Rate 0 everywhere gives no DropPath module at all.
    plain = tiny_model(name, **{k: (0.0 if k == "drop_path_token_only" else v) for k, v in extra.items()})
    assert not any(isinstance(m, DropPath) for m in plain.modules())
