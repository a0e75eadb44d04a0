"""Shared components: numbers checked against hand computations and reference formulas."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from vitlab.components import (
    Attention,
    Block,
    CrossAttention,
    DropPath,
    LayerScale,
    LinearPatchEmbed,
    Mlp,
    PatchEmbed,
    RelativePositionBias,
    WindowAttention,
    capture_attention,
    interpolate_pos_embed,
    relative_position_index,
    resample_relative_position_table,
    shifted_window_mask,
    sincos_2d_pos_embed,
    window_partition,
    window_reverse,
)


def manual_attention(x, attn: Attention, bias=None):
    b, n, c = x.shape
    h = attn.heads
    q, k, v = attn.qkv(x).chunk(3, dim=-1)
    q, k, v = (t.view(b, n, h, c // h).transpose(1, 2) for t in (q, k, v))
    logits = q @ k.transpose(-1, -2) / math.sqrt(c // h)
    if bias is not None:
        logits = logits + bias
    out = (logits.softmax(-1) @ v).transpose(1, 2).reshape(b, n, c)
    return attn.proj(out), logits.softmax(-1)


def test_linear_patch_embed_equals_conv_on_same_weights():
    conv = PatchEmbed(patch_size=4, in_channels=3, dim=10)
    lin = LinearPatchEmbed(patch_size=4, in_channels=3, dim=10)
    lin.load_state_dict(conv.state_dict())  # conv-shaped weight reshaped by the load hook
    x = torch.randn(2, 3, 12, 8)
    (a, ga), (b, gb) = conv(x), lin(x)
    assert ga == gb == (3, 2)
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    # And by hand: token (0, 1) of image 0 is the flattened patch rows 0..3, cols 4..7.
    patch = x[0, :, 0:4, 4:8].reshape(-1)
    torch.testing.assert_close(a[0, 1], lin.proj.weight @ patch + lin.proj.bias, atol=1e-6, rtol=1e-5)


def test_patch_embed_pads_or_raises():
    pe = PatchEmbed(patch_size=4, in_channels=3, dim=8)
    tokens, grid = pe(torch.randn(1, 3, 10, 7))
    assert grid == (3, 2) and tokens.shape == (1, 6, 8)
    strict = PatchEmbed(patch_size=4, in_channels=3, dim=8, pad_input=False)
    with pytest.raises(ValueError, match="not a multiple of the patch size"):
        strict(torch.randn(1, 3, 10, 8))
    with pytest.raises(ValueError, match="expected 3 input channel"):
        pe(torch.randn(1, 1, 8, 8))
    with pytest.raises(ValueError, match="smaller than one patch"):
        pe(torch.randn(1, 3, 2, 8))
    with pytest.raises(ValueError, match="image batch"):
        pe(torch.randn(3, 8, 8))


def test_overlapping_patch_embed_grid():
    pe = PatchEmbed(patch_size=7, stride=4, in_channels=3, dim=8)  # PVT v2 stem
    assert pe.overlapping and pe.padding == (3, 3)
    x = torch.randn(1, 3, 33, 30)
    tokens, grid = pe(x)
    assert grid == pe.grid_size((33, 30)) == ((33 + 6 - 7) // 4 + 1, (30 + 6 - 7) // 4 + 1)
    torch.testing.assert_close(tokens[0, 0], F.conv2d(x, pe.proj.weight, pe.proj.bias, 4, 3)[0, :, 0, 0])
    # The convolution's padding counts towards the minimum size: 3x3 / stride 2 / pad 1 maps 2x2 to 1x1.
    down = PatchEmbed(patch_size=3, stride=2, in_channels=3, dim=4)
    assert down(torch.randn(1, 3, 2, 2))[1] == (1, 1)
    with pytest.raises(ValueError, match="smaller than one patch"):
        PatchEmbed(patch_size=7, stride=4, padding=0, in_channels=3, dim=4)(torch.randn(1, 3, 5, 5))


def test_attention_sdpa_equals_explicit_and_manual():
    attn = Attention(16, heads=4).eval()
    x = torch.randn(2, 5, 16)
    fast = attn(x)
    ref, probs = manual_attention(x, attn)
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-5)
    with capture_attention(attn) as cap:
        slow = attn(x)
    torch.testing.assert_close(slow, ref, atol=1e-5, rtol=1e-5)
    assert len(cap.records) == 1 and cap.records[0].name == ""
    torch.testing.assert_close(cap.maps[0], probs, atol=1e-6, rtol=1e-5)
    bias = torch.randn(1, 4, 5, 5)
    torch.testing.assert_close(attn(x, attn_bias=bias), manual_attention(x, attn, bias)[0], atol=1e-5, rtol=1e-5)


def test_attention_dropout_only_in_training():
    attn = Attention(16, heads=4, attn_drop=0.5)
    x = torch.randn(2, 5, 16)
    attn.eval()
    assert torch.equal(attn(x), attn(x))
    attn.train()
    assert not torch.allclose(attn(x), attn(x))


def test_cross_attention_queries_context():
    ca = CrossAttention(8, heads=2, context_dim=6).eval()
    x, ctx = torch.randn(1, 1, 8), torch.randn(1, 4, 6)
    out = ca(x, ctx)
    q = ca.q(x).view(1, 1, 2, 4).transpose(1, 2)
    k, v = ca.kv(ctx).view(1, 4, 2, 2, 4).permute(2, 0, 3, 1, 4)
    probs = (q @ k.transpose(-1, -2) / 2.0).softmax(-1)
    ref = ca.proj((probs @ v).transpose(1, 2).reshape(1, 1, 8))
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-5)
    # The context matters; a single query over the same context in a batch of two is per-sample.
    assert not torch.allclose(ca(x, torch.randn(1, 4, 6)), out)


def test_window_partition_roundtrip():
    x = torch.randn(2, 8, 12, 3)
    w = window_partition(x, (4, 3))
    assert w.shape == (2 * 2 * 4, 12, 3)
    torch.testing.assert_close(w[1].view(4, 3, 3), x[0, 0:4, 3:6])  # window 1 = row 0, col 1
    torch.testing.assert_close(window_reverse(w, (4, 3), (8, 12)), x)


def test_window_attention_is_local_without_shift():
    wa = WindowAttention(8, heads=2, window_size=2).eval()
    x = torch.randn(1, 16, 8)  # 4x4 grid, four 2x2 windows
    out = wa(x, grid=(4, 4))
    x2 = x.clone()
    x2[0, 15] += 10.0  # token (3, 3): bottom-right window only
    out2 = wa(x2, grid=(4, 4))
    changed = (out2 - out).abs().sum(-1)[0].view(4, 4) > 1e-6
    expected = torch.zeros(4, 4, dtype=torch.bool)
    expected[2:, 2:] = True
    assert torch.equal(changed, expected)


def test_shifted_window_mask_regions():
    mask = shifted_window_mask((4, 4), (2, 2), (1, 1))
    assert mask.shape == (4, 4, 4)
    # Window 0 (top-left) holds tokens of one region only: no masking.
    assert mask[0].eq(0).all()
    # The last window mixes the four corners of the image: tokens only see themselves.
    assert torch.equal(mask[3].eq(0), torch.eye(4, dtype=torch.bool))


def test_relative_position_index_and_bias():
    idx = relative_position_index((2, 2))
    # Offsets (dy, dx) in [-1, 1]^2 -> (dy + 1) * 3 + (dx + 1); token 0 = (0, 0), token 3 = (1, 1).
    assert idx[0, 0] == 4 and idx[0, 3] == 0 and idx[3, 0] == 8
    rpb = RelativePositionBias((2, 2), heads=3)
    bias = rpb()
    assert bias.shape == (3, 4, 4)
    torch.testing.assert_close(bias[:, 0, 3], rpb.table[0])
    # A smaller window uses the central offsets of the table.
    big = RelativePositionBias((3, 3), heads=1)
    small = big((2, 2))
    full = big.table.view(5, 5)
    assert small[0, 0, 3] == full[1, 1]  # offset (-1, -1)


def test_resample_relative_position_table_constant_stays_constant():
    t = torch.full((13 * 13, 2), 0.7)
    r = resample_relative_position_table(t, (12, 12))
    assert r.shape == (23 * 23, 2)
    torch.testing.assert_close(r, torch.full_like(r, 0.7))


def test_sincos_pos_embed_formula():
    pe = sincos_2d_pos_embed(8, (2, 3))
    assert pe.shape == (6, 8)
    # Token 5 = (row 1, col 2). Channels: sin(x w), cos(x w), sin(y w), cos(y w), w in (1, 10000^-1/2).
    x, y, w1 = 2.0, 1.0, 10000 ** -0.5
    expected = [math.sin(x), math.sin(x * w1), math.cos(x), math.cos(x * w1),
                math.sin(y), math.sin(y * w1), math.cos(y), math.cos(y * w1)]
    torch.testing.assert_close(pe[5], torch.tensor(expected))
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_2d_pos_embed(6, (2, 2))


def test_interpolate_pos_embed_keeps_prefix_and_linear_ramps():
    # A grid embedding that is linear in the column index stays linear after resampling.
    cols = torch.arange(4.0).repeat(4).view(1, 16, 1)
    pe = torch.cat([torch.full((1, 1, 1), 5.0), cols], dim=1)
    out = interpolate_pos_embed(pe, (4, 4), num_prefix_tokens=1)
    assert out is pe
    up = interpolate_pos_embed(pe, (4, 8), num_prefix_tokens=1, antialias=False)
    assert up.shape == (1, 33, 1) and up[0, 0, 0] == 5.0
    row = up[0, 1:9, 0]
    assert torch.all(row[1:] >= row[:-1] - 1e-6)  # monotone along columns
    torch.testing.assert_close(up[0, 1:, 0].view(4, 8)[0], up[0, 1:, 0].view(4, 8)[3])  # rows equal
    with pytest.raises(ValueError, match="grid"):
        interpolate_pos_embed(torch.randn(1, 1 + 15, 2), (4, 4))


def test_drop_path_statistics_and_eval_identity():
    dp = DropPath(0.25)
    x = torch.ones(4000, 3)
    dp.eval()
    assert torch.equal(dp(x), x)
    dp.train()
    y = dp(x)
    kept = (y[:, 0] != 0).float().mean().item()
    assert abs(kept - 0.75) < 0.03
    torch.testing.assert_close(y[y != 0], torch.full_like(y[y != 0], 1 / 0.75))
    assert torch.equal(y[:, 0] == 0, y[:, 2] == 0)  # whole samples dropped
    with pytest.raises(ValueError):
        DropPath(1.0)


def test_layer_scale_and_mlp():
    ls = LayerScale(4, init_values=0.1)
    torch.testing.assert_close(ls(torch.ones(2, 4)), torch.full((2, 4), 0.1))
    mlp = Mlp(4, 8)
    x = torch.randn(3, 4)
    torch.testing.assert_close(mlp(x), mlp.fc2(F.gelu(mlp.fc1(x))))


def test_block_is_prenorm_residual():
    blk = Block(8, heads=2, mlp_dim=16, layer_scale=0.5).eval()
    x = torch.randn(2, 3, 8)
    h = x + 0.5 * manual_attention(blk.norm1(x), blk.attn)[0]
    ref = h + 0.5 * blk.mlp(blk.norm2(h))
    torch.testing.assert_close(blk(x), ref, atol=1e-5, rtol=1e-5)
