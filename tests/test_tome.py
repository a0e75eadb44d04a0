"""Token merging (ToMe, vitlab.components.tome) on ViT, distilled DeiT and CaiT.

The published ``tome`` package is not installable offline, so the matching is checked against
a loop-based re-implementation written from the paper's description (bipartite split by
alternating index, cosine similarity of the keys, each A token's best B token, the r most
similar edges merged, size-weighted average).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from vitlab.components.tome import (
    apply_tome, bipartite_soft_matching, merge_wavg, parse_r, remove_tome, tome, tome_state, unmerge_tokens,
)
from vitlab.models.cait import CaiT, CaiTConfig
from vitlab.models.deit import DeiTConfig, DistilledVisionTransformer
from vitlab.models.vit import ViTConfig, VisionTransformer

SMALL = dict(image_size=32, patch_size=4, dim=32, depth=3, heads=2, num_classes=5)  # 64 patch tokens


def make(family: str) -> nn.Module:
    torch.manual_seed(0)
    if family == "vit":
        model = VisionTransformer(ViTConfig(mlp_dim=64, **SMALL))
    elif family == "deit":
        model = DistilledVisionTransformer(DeiTConfig(mlp_dim=64, **SMALL))
    else:
        model = CaiT(CaiTConfig(**SMALL))
    return model.eval()


PREFIX = {"vit": 1, "deit": 2, "cait": 0}
FAMILIES = list(PREFIX)


def images(b: int = 2) -> torch.Tensor:
    return torch.randn(b, 3, 32, 32, generator=torch.Generator().manual_seed(1))


# ------------------------------------------------------------------ model level
@pytest.mark.parametrize("family", FAMILIES)
def test_r0_is_bit_identical(family):
    model, x = make(family), images()
    with torch.no_grad():
        ref_logits, ref_feats = model(x), model.forward_features(x)
        with tome(model, 0) as state:
            assert torch.equal(model(x), ref_logits)
            assert torch.equal(model.forward_features(x), ref_feats)
            assert state.size is None
        assert torch.equal(model(x), ref_logits)  # restored after the context


@pytest.mark.parametrize("family", FAMILIES)
def test_token_count_per_block(family):
    model, x = make(family), images()
    apply_tome(model, 5)
    feats = model.forward_features(x)
    n = 64 + PREFIX[family]
    assert tome_state(model).tokens == [n - 5, n - 10, n - 15]
    assert tome_state(model).protected == [PREFIX[family]] * 3
    cls_tokens = 1 if family == "cait" else 0  # CaiT's class token joins after the merged stage
    assert feats.shape == (2, n - 15 + cls_tokens, 32)
    apply_tome(model, [3, 0, 7])
    model.forward_features(x)
    assert tome_state(model).tokens == [n - 3, n - 3, n - 10]
    apply_tome(model, 40)  # more than the tokens allow: each block halves what it may merge
    model(x)
    assert all(t >= PREFIX[family] for t in tome_state(model).tokens)


def test_schedules():
    assert parse_r(4, 3) == [4, 4, 4]
    assert parse_r([1, 2, 3], 3) == [1, 2, 3]
    # ToMe's (r, inflection): linear from r(1 - inflection) to r(1 + inflection), truncated
    assert parse_r((8, -0.5), 4) == [12, 9, 6, 4]
    assert parse_r((8, 0.0), 4) == [8, 8, 8, 8]
    for bad in ([1, 2], -1, "8", (8, "x"), True):
        with pytest.raises(ValueError, match="r"):
            parse_r(bad, 3)


@pytest.mark.parametrize("family", ["vit", "deit"])
def test_prefix_tokens_never_merged(family):
    model, x = make(family), images()
    p = PREFIX[family]
    tokens = {}
    model.blocks[0].register_forward_pre_hook(lambda m, args: tokens.setdefault("in", args[0]))
    with torch.no_grad():
        with tome(model, 12, trace_source=True) as state:
            out_first = model.blocks[0](model.embed(x)[0])
            model(x)
            source = state.source
        plain_first = model.blocks[0](tokens["in"])
    # block 0: the prefix tokens come out first, with the plain block's values (no merge reaches them)
    assert torch.allclose(out_first[:, :p], plain_first[:, :p], atol=1e-6)
    # after every block: prefix row i holds exactly original token i, and no other row holds a prefix token
    eye = torch.eye(p, source.shape[2])
    assert torch.equal(source[:, :p], eye.expand(2, -1, -1))
    assert torch.equal(source[:, p:, :p], torch.zeros_like(source[:, p:, :p]))


@pytest.mark.parametrize("family", ["vit", "cait"])
def test_merge_sits_between_attention_and_mlp(family):
    model, x = make(family), images()
    blk, attn = model.blocks[0], model.blocks[0].attn
    with torch.no_grad():
        tokens = model.embed(x)[0]
        with tome(model, 9):
            got = blk(tokens)
        y = tokens + blk.ls1(attn(blk.norm1(tokens)))
        keys = attn.qkv_heads(blk.norm1(tokens))[1].mean(dim=1)  # (B, heads, N, d) -> (B, N, d)
        merged, _ = merge_wavg(bipartite_soft_matching(keys, 9, PREFIX[family]), y)
        expected = merged + blk.ls2(blk.mlp(blk.norm2(merged)))
    assert torch.allclose(got, expected, atol=1e-6)


def test_merge_math_by_hand():
    # 4 tokens, A = {0, 2}, B = {1, 3}; key 0 ~ key 1 (cos 0.995), key 2 is far from both B keys
    keys = torch.tensor([[[1.0, 0.0], [1.0, 0.1], [0.0, 1.0], [-1.0, 0.0]]])
    x = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [5.0, 6.0], [7.0, 8.0]]])
    size = torch.tensor([[[1.0], [3.0], [1.0], [1.0]]])
    merged, new_size = merge_wavg(bipartite_soft_matching(keys, 1), x, size)
    # [kept A token 2, B token 1 with token 0 merged in, B token 3]
    expected = torch.tensor([[[5.0, 6.0], [(1 * 1 + 3 * 3) / 4, (1 * 2 + 3 * 4) / 4], [7.0, 8.0]]])
    assert torch.allclose(merged, expected)
    assert torch.equal(new_size, torch.tensor([[[1.0], [4.0], [1.0]]]))
    # one protected token in front: the alternation counts it (A = indices 0, 2, 4 of the whole sequence)
    keys5 = torch.cat([torch.tensor([[[0.0, 1.0]]]), keys[:, [1, 0, 3, 2]]], dim=1)  # [cls, k1, k0, k3, k2]
    x5 = torch.cat([torch.tensor([[[9.0, 9.0]]]), x[:, [1, 0, 3, 2]]], dim=1)
    merged5, size5 = merge_wavg(bipartite_soft_matching(keys5, 1, protected=1), x5)
    # A (non-prefix) = tokens at 2 (k0), 4 (k2); B = 1 (k1), 3 (k3): k0 merges into k1, unweighted (sizes 1)
    assert torch.allclose(merged5, torch.tensor([[[9.0, 9.0], [5.0, 6.0], [2.0, 3.0], [7.0, 8.0]]]))
    assert torch.equal(size5.flatten(), torch.tensor([1.0, 1.0, 2.0, 1.0]))


def loop_merge(metric, x, size, r, protected):
    """The paper's bipartite soft matching, one sample and one token at a time."""
    out_x, out_s = [], []
    for bi in range(metric.shape[0]):
        n = metric.shape[1]
        a_set = [i for i in range(protected, n) if i % 2 == 0]
        b_set = [i for i in range(protected, n) if i % 2 == 1]

        def cos(i, j):
            u, v = metric[bi, i], metric[bi, j]
            return float(u @ v / (u.norm() * v.norm()))

        best = {i: max((cos(i, j), j) for j in b_set) for i in a_set}
        merged = sorted(a_set, key=lambda i: -best[i][0])[: min(r, (n - protected) // 2)]
        groups = {j: [j] for j in b_set}
        for i in merged:
            groups[best[i][1]].append(i)
        tokens = [[i] for i in range(protected)] + [[i] for i in a_set if i not in merged] + [groups[j] for j in b_set]
        out_x.append(torch.stack([sum(x[bi, i] * size[bi, i] for i in g) / sum(size[bi, i] for i in g) for g in tokens]))
        out_s.append(torch.stack([sum(size[bi, i] for i in g) for g in tokens]))
    return torch.stack(out_x), torch.stack(out_s)


@pytest.mark.parametrize("protected,n,r", [(0, 10, 3), (1, 11, 4), (2, 12, 5), (1, 9, 10)])
def test_matching_matches_loop_reference(protected, n, r):
    g = torch.Generator().manual_seed(protected * 100 + n)
    metric = torch.randn(3, n, 6, generator=g, dtype=torch.float64)
    x = torch.randn(3, n, 4, generator=g, dtype=torch.float64)
    size = torch.randint(1, 5, (3, n, 1), generator=g).double()
    got_x, got_s = merge_wavg(bipartite_soft_matching(metric, r, protected), x, size)
    ref_x, ref_s = loop_merge(metric, x, size, r, protected)
    assert torch.allclose(got_x, ref_x) and torch.equal(got_s, ref_s)


@pytest.mark.parametrize("family", ["vit", "deit"])
def test_proportional_attention_is_explicit_log_size_bias(family):
    model, x = make(family), images()
    outs = {}
    for i in (0, 1):
        model.blocks[i].register_forward_hook(lambda m, a, o, i=i: outs.__setitem__(i, o))
    with torch.no_grad():
        with tome(model, [6, 0, 0]) as state:
            model(x)
            size = state.size  # sizes after block 0 (blocks 1, 2 merge nothing)
        h0, got = outs[0], outs[1]
        blk, attn = model.blocks[1], model.blocks[1].attn
        q, k, v = attn.qkv_heads(blk.norm1(h0))
        logits = (q * attn.scale) @ k.transpose(-2, -1) + size.log()[:, None, None, :, 0]  # (B, heads, N, N)
        y = h0 + blk.ls1(attn.project(logits.softmax(-1) @ v))
        expected = y + blk.ls2(blk.mlp(blk.norm2(y)))
        assert torch.allclose(got, expected, atol=1e-5)
        assert not torch.allclose(blk(h0), expected, atol=1e-3)  # without the bias it differs
        with tome(model, [6, 0, 0], prop_attn=False):
            model(x)
        assert torch.allclose(outs[1], blk(outs[0]), atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_source_tracking(family):
    model, x = make(family), images()
    for blk in model.blocks:  # every residual branch outputs 0: the stream only ever gets merged
        for lin in (blk.attn.proj, blk.mlp.fc2):
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)
    seen = {}
    model.blocks[0].register_forward_pre_hook(lambda m, a: seen.__setitem__("in", a[0]))
    model.blocks[-1].register_forward_hook(lambda m, a, o: seen.__setitem__("out", o))
    with torch.no_grad(), tome(model, [10, 6, 8], trace_source=True) as state:
        model(x)
        source, size = state.source, state.size
    n_orig = 64 + PREFIX[family]
    assert source.shape == (2, n_orig - 24, n_orig)
    assert torch.equal(source.sum(-1), size[..., 0])  # rows sum to the sizes
    assert torch.equal(source.sum(1), torch.ones(2, n_orig))  # every original token in exactly one merged token
    # merged token = size-weighted (here plain) mean of the original tokens its source row names
    assert torch.allclose(seen["out"], source @ seen["in"] / size, atol=1e-5)
    # scattered back: every patch gets its group's size; summing 1 / size over the patches counts the tokens
    per_patch = unmerge_tokens(size, source)[..., 0]  # (B, N_orig)
    assert torch.allclose((1.0 / per_patch).sum(-1), torch.full((2,), float(source.shape[1])))
    back = unmerge_tokens(seen["out"], source)  # (B, N_orig, C): each patch holds its merged token
    assert torch.allclose(back[0, source[0, 3].bool()], seen["out"][0, 3].expand(int(size[0, 3]), -1))


@pytest.mark.parametrize("family", FAMILIES)
def test_forward_paths_and_gradients(family):
    model, x = make(family), images()
    apply_tome(model, 8)
    with torch.no_grad():
        feats = model.forward_features(x)
        assert torch.allclose(model.forward_head(feats), model(x))
        assert model.forward_head(feats, pre_logits=True).shape == (2, 32)
    model.train()
    out = model(x)
    loss = sum(o.sum() for o in out) if isinstance(out, tuple) else out.sum()
    loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "blocks.0." in n or "patch_embed" in n]
    assert grads and all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)
    remove_tome(model)
    with pytest.raises(ValueError, match="apply_tome"):
        tome_state(model)


def test_refusals():
    windowed = VisionTransformer(ViTConfig(class_token=False, pool="mean", window_size=4, mlp_dim=64, **SMALL))
    with pytest.raises(ValueError, match="token grid"):
        apply_tome(windowed, 4)
    model = make("vit")
    model.set_grad_checkpointing(True)
    with pytest.raises(ValueError, match="checkpointing"):
        apply_tome(model, 4)


def full_scale(model: nn.Module) -> nn.Module:
    """LayerScale gammas set to 1 (CaiT starts at 1e-4), so every residual branch shows in the outputs."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".gamma"):
                p.fill_(1.0)
    return model


def repeat_by_size(tokens: torch.Tensor, size: torch.Tensor, b: int) -> torch.Tensor:
    """Sample b's merged tokens (N, C), each repeated as many times as the patches it stands for -> (1, N_orig, C)."""
    return tokens[b].repeat_interleave(size[b, :, 0].long(), dim=0)[None]


@pytest.mark.parametrize("family", FAMILIES)
def test_proportional_attention_is_a_plain_block_on_repeated_tokens(family):
    # a merged token of size s must act like s copies of itself (CaiT: the log-size bias comes after
    # the talking-heads mix of the logits, or the copies would not add up)
    model, x = full_scale(make(family)), images()
    outs = {}
    for i in (0, 1):
        model.blocks[i].register_forward_hook(lambda m, a, o, i=i: outs.__setitem__(i, o))
    with torch.no_grad():
        with tome(model, [9, 0, 0]) as state:
            model(x)
            size = state.size
        h0, got = outs[0], outs[1]  # merged tokens into block 2 (which merges nothing) and out of it
        for b in range(2):
            expected = model.blocks[1](repeat_by_size(h0, size, b))  # the plain block on the unmerged sequence
            assert torch.allclose(repeat_by_size(got, size, b), expected, atol=1e-5)


def test_cait_class_attention_is_plain_class_attention_on_repeated_tokens():
    model, x = full_scale(make("cait")), images()
    seen = {}
    model.blocks[-1].register_forward_hook(lambda m, a, o: seen.__setitem__("tokens", o))
    with torch.no_grad():
        with tome(model, 8) as state:
            feats = model.forward_features(x)  # (B, 1 + N_merged, C), class token first
            size = state.size
        assert feats.shape[1] == 1 + 64 - 24
        for b in range(2):  # the plain class-attention stage over every merged token repeated size times
            expected = model.norm(model.forward_cls(repeat_by_size(seen["tokens"], size, b), None))[:, 0]
            assert torch.allclose(feats[b : b + 1, 0], expected, atol=1e-5)
        with tome(model, 8, prop_attn=False):  # without proportional attention the class token differs
            assert not torch.allclose(model.forward_features(x)[:, 0], feats[:, 0], atol=1e-3)
