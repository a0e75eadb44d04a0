"""EViT attentive token keeping (vitlab.components.evit) on ViT, distilled DeiT and CaiT's SA stage.

The ranking is checked against a brute-force reference computed, one sample and one token at a
time, from the probabilities that ``capture_attention`` records on the explicit (matmul +
softmax) path; the fused token against the attention-weighted mean of the dropped tokens.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from vitlab.components.attention import capture_attention
from vitlab.components.evit import (
    apply_evit, default_locations, evit, evit_state, keep_tokens, kept_count, remove_evit,
)
from vitlab.components.layers import Block
from vitlab.models.cait import CaiT, CaiTConfig
from vitlab.models.deit import DeiTConfig, DistilledVisionTransformer
from vitlab.models.vit import ViTConfig, VisionTransformer

SMALL = dict(image_size=32, patch_size=4, dim=32, depth=3, heads=2, num_classes=5)  # 64 patch tokens
PREFIX = {"vit": 1, "deit": 2, "cait": 0}
METRIC = {"vit": "cls", "deit": "cls", "cait": "mean"}  # CaiT's SA stage has no class token
FAMILIES = list(PREFIX)


def make(family: str, **overrides) -> nn.Module:
    torch.manual_seed(0)
    if family == "vit":
        model = VisionTransformer(ViTConfig(mlp_dim=64, **{**SMALL, **overrides}))
    elif family == "deit":
        model = DistilledVisionTransformer(DeiTConfig(mlp_dim=64, **SMALL))
    else:
        model = CaiT(CaiTConfig(**SMALL))
    return model.eval()


def images(b: int = 2) -> torch.Tensor:
    return torch.randn(b, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def test_counts_and_locations():
    assert default_locations(12) == [3, 6, 9]  # EViT's DeiT-S blocks 4, 7, 10
    assert default_locations(3) == [0, 1, 2]
    assert kept_count(0.7, 196) == 138 and kept_count(0.7, 10) == 7 and kept_count(0.5, 33) == 17
    assert kept_count(1.0, 64) == 64


@pytest.mark.parametrize("family", FAMILIES)
def test_keep_rate_one_is_bit_identical(family):
    model, x = make(family), images()
    with torch.no_grad():
        ref_logits, ref_feats = model(x), model.forward_features(x)
        with evit(model, 1.0, metric=METRIC[family]) as state:
            assert torch.equal(model(x), ref_logits)
            assert torch.equal(model.forward_features(x), ref_feats)
            assert state.kept == [] and state.tokens == [64 + PREFIX[family]] * 3
        assert torch.equal(model(x), ref_logits)  # restored after the context


@pytest.mark.parametrize("family", FAMILIES)
def test_token_count_per_block(family):
    model, x = make(family), images()
    p = PREFIX[family]
    with torch.no_grad(), evit(model, 0.5, metric=METRIC[family]) as state:
        feats = model.forward_features(x)
        # 64 -> keep 32 + fused; 33 -> keep ceil(16.5) = 17 + fused; 18 -> 9 + fused
        assert state.tokens == [p + 33, p + 18, p + 10]
        assert state.protected == [p] * 3 and [k.shape for k in state.kept] == [(2, 32), (2, 17), (2, 9)]
    assert feats.shape == (2, p + 10 + (family == "cait"), 32)  # CaiT's class token joins after the SA stage
    with torch.no_grad(), evit(model, [0.5, 0.25], locations=[2, 0], fuse=False, metric=METRIC[family]) as state:
        model(x)
        assert state.locations == [0, 2]
        assert state.tokens == [p + 32, p + 32, p + 8]  # block 0 keeps 0.5, block 2 keeps 0.25 of 32


def brute_force_kept(probs: torch.Tensor, prefix: int, keep: int, metric: str) -> torch.Tensor:
    """Kept indices per sample from (B, heads, N, N) probabilities, with Python loops and sorted()."""
    b, h, n, _ = probs.shape
    out = []
    for bi in range(b):
        scores = []
        for j in range(prefix, n):
            if metric == "cls":
                s = sum(float(probs[bi, hi, 0, j]) for hi in range(h)) / h
            else:
                s = sum(float(probs[bi, hi, i, j]) for hi in range(h) for i in range(n)) / (h * n)
            scores.append((s, j - prefix))
        best = sorted(scores, key=lambda t: (-t[0], t[1]))[:keep]
        out.append(sorted(j for _, j in best))
    return torch.tensor(out)


@pytest.mark.parametrize("family", FAMILIES)
def test_kept_indices_match_brute_force_on_eager_probabilities(family):
    model, x = make(family), images()
    metric, p = METRIC[family], PREFIX[family]
    with torch.no_grad(), evit(model, 0.6, metric=metric) as state:
        model(x)
        fused_kept = [k.clone() for k in state.kept]  # SDPA path (talking heads: explicit anyway)
        with capture_attention(model) as cap:
            model(x)
        sa = [r for r in cap.records if r.name.startswith("blocks.")]  # CaiT: skip class attention
        assert len(sa) == 3
        for i, rec in enumerate(sa):
            n = rec.probs.shape[-1] - p
            ref = brute_force_kept(rec.probs, p, kept_count(0.6, n), metric)
            assert torch.equal(state.kept[i], ref), f"block {i}"
            assert torch.equal(fused_kept[i], ref), f"block {i} (without capture)"


@pytest.mark.parametrize("family", FAMILIES)
def test_fused_token_is_attention_weighted_mean(family):
    model, x = make(family), images()
    metric, p = METRIC[family], PREFIX[family]
    seen = {}
    blk = model.blocks[1]
    blk.register_forward_pre_hook(lambda m, a: seen.__setitem__("in", a[0]))
    blk.register_forward_hook(lambda m, a, o: seen.__setitem__("out", o))
    with torch.no_grad(), evit(model, 0.5, locations=[1], metric=metric) as state:
        with capture_attention(model) as cap:
            model(x)
        h = seen["in"]
        probs = [r for r in cap.records if r.name == "blocks.1.attn"][0].probs  # (B, heads, N, N)
        y = h + blk.ls1(blk.attn(blk.norm1(h)))  # attention half of the plain block
        scores = probs[:, :, 0, p:].mean(1) if metric == "cls" else probs[..., p:].mean((1, 2))  # (B, 64)
        kept = state.kept[0]
        expected = []
        for bi in range(2):
            dropped = [j for j in range(64) if j not in set(kept[bi].tolist())]
            w = scores[bi, dropped]
            fused = (w[:, None] * y[bi, p:][dropped]).sum(0) / w.sum()
            expected.append(torch.cat([y[bi, :p], y[bi, p:][kept[bi]], fused[None]]))
        z = torch.stack(expected)  # (B, p + 32 + 1, C)
        z = z + blk.ls2(blk.mlp(blk.norm2(z)))
    assert seen["out"].shape == (2, p + 33, 32)
    assert torch.allclose(seen["out"], z, atol=1e-5)
    assert not torch.allclose(seen["out"][:, -1], z[:, p], atol=1e-3)  # the fused token is no kept token


def test_keep_tokens_by_hand():
    x = torch.tensor([[[9.0, 9.0], [1.0, 0.0], [2.0, 0.0], [3.0, 0.0], [4.0, 0.0]]])  # 1 prefix + 4 tokens
    scores = torch.tensor([[0.1, 0.4, 0.2, 0.3]])
    out, kept = keep_tokens(x, scores, 2, prefix=1)
    # keep tokens 1 and 3 (scores 0.4, 0.3) in their order; fuse 0 and 2: (0.1 * 1 + 0.2 * 3) / 0.3
    assert kept.tolist() == [[1, 3]]
    assert torch.allclose(out, torch.tensor([[[9.0, 9.0], [2.0, 0.0], [4.0, 0.0], [0.7 / 0.3, 0.0]]]))
    out, _ = keep_tokens(x, scores, 2, prefix=1, fuse=False)
    assert out.shape == (1, 3, 2)
    with pytest.raises(ValueError, match="keep"):
        keep_tokens(x, scores, 5, prefix=1)


@pytest.mark.parametrize("family", ["vit", "deit"])
def test_prefix_tokens_always_kept(family):
    model, x = make(family), images()
    p = PREFIX[family]
    seen = {}
    model.blocks[0].register_forward_pre_hook(lambda m, a: seen.setdefault("in", a[0]))
    with torch.no_grad():
        with evit(model, 0.3) as state:
            out = model.blocks[0](model.embed(x)[0])
        plain = model.blocks[0](seen["in"])
    assert state.protected == [p] * 3
    assert torch.allclose(out[:, :p], plain[:, :p], atol=1e-6)  # per-token MLP: prefix outputs unchanged
    assert out.shape[1] == p + math.ceil(0.3 * 64) + 1


@pytest.mark.parametrize("family", FAMILIES)
def test_forward_paths_gradients_and_remove(family):
    model, x = make(family), images()
    with torch.no_grad():
        ref, ref_feats = model(x), model.forward_features(x)
    apply_evit(model, 0.5, metric=METRIC[family])
    with torch.no_grad():
        feats = model.forward_features(x)
        assert torch.allclose(model.forward_head(feats), model(x))
        assert feats.shape[1] == ref_feats.shape[1] - 54  # 64 patches -> 9 kept + 1 fused
        assert not torch.equal(model(x), ref)  # pruning changes the logits
    model.train()
    out = model(x)
    loss = sum(o.sum() for o in out) if isinstance(out, tuple) else out.sum()
    loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "blocks.0." in n or "blocks.2." in n or "patch_embed" in n]
    assert grads and all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)
    model.eval()
    remove_evit(model)
    assert all("forward" not in m.__dict__ for m in model.modules() if isinstance(m, Block))
    with torch.no_grad():
        assert torch.equal(model(x), ref)
    with pytest.raises(ValueError, match="apply_evit"):
        evit_state(model)


def test_mean_pooled_vit_needs_mean_metric():
    model, x = make("vit", class_token=False, pool="mean"), images()
    with pytest.raises(ValueError, match="metric='mean'"):
        apply_evit(model, 0.5)
    with torch.no_grad(), evit(model, 0.5, metric="mean") as state:
        assert model(x).shape == (2, 5)
        assert state.tokens == [33, 18, 10]


def test_refusals():
    windowed = VisionTransformer(ViTConfig(class_token=False, pool="mean", window_size=4, mlp_dim=64, **SMALL))
    with pytest.raises(ValueError, match="token grid"):
        apply_evit(windowed, 0.5, metric="mean")
    with pytest.raises(ValueError, match="metric='mean'"):
        apply_evit(make("cait"), 0.5)  # no class token in the SA stage
    bare = nn.Sequential(Block(32, 2, 64))
    with pytest.raises(ValueError, match="token_layout"):
        apply_evit(bare, 0.5)
    model = make("vit")
    for bad in (0.0, 1.5, [0.5, 0.5], "0.5", True):
        with pytest.raises(ValueError, match="keep_rate"):
            apply_evit(model, bad)
    for bad in ([3], [0, 0], []):
        with pytest.raises(ValueError, match="locations"):
            apply_evit(model, 0.5, locations=bad)
    with pytest.raises(ValueError, match="metric"):
        apply_evit(model, 0.5, metric="max")
    model.set_grad_checkpointing(True)
    with pytest.raises(ValueError, match="checkpointing"):
        apply_evit(model, 0.5)


def test_evit_and_token_merging_refuse_each_other():
    from vitlab.components.tome import apply_tome, remove_tome, tome_state

    model = make("vit")
    apply_tome(model, 2)
    with pytest.raises(ValueError, match="remove_tome"):
        apply_evit(model, 0.5)
    assert tome_state(model).r  # token merging is still in place
    remove_tome(model)
    apply_evit(model, 0.5)
    with pytest.raises(ValueError, match="remove_evit"):
        apply_tome(model, 2)
    assert "_tome_state" not in model.__dict__
