"""Sparse attention patterns (vitlab.components.sparse_attention): FlexAttention vs dense mask vs by hand.

The reference is a masked softmax written out here, with the mask built by Python loops over the
(row, column) positions of the tokens, so it shares no code with the module's ``mask_mod``.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from optional import needs
from vitlab.components import sparse_attention as sa
from vitlab.components.attention import capture_attention
from vitlab.components.layers import Block
from vitlab.components.sparse_attention import (
    apply_sparse_attention, dense_mask, mask_mod, remove_sparse_attention, sparse_attention, sparse_attention_state,
)
from vitlab.models.cait import CaiT, CaiTConfig
from vitlab.models.deit import DeiTConfig, DistilledVisionTransformer
from vitlab.models.vit import ViTConfig, VisionTransformer

SMALL = dict(image_size=(24, 32), patch_size=4, dim=32, depth=2, heads=2, num_classes=5)  # 6x8 patch grid
GRID = (6, 8)
PREFIX = {"vit": 1, "deit": 2, "gap": 0}
pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
needs_flex = needs("torch.nn.attention.flex_attention", extra="torch >= 2.5 (FlexAttention)")


def make(family: str) -> nn.Module:
    torch.manual_seed(0)
    if family == "deit":
        return DistilledVisionTransformer(DeiTConfig(mlp_dim=64, **SMALL)).eval()
    extra = dict(class_token=False, pool="mean") if family == "gap" else {}
    return VisionTransformer(ViTConfig(mlp_dim=64, **SMALL, **extra)).eval()


def images(b: int = 2, size: tuple[int, int] = (24, 32)) -> torch.Tensor:
    return torch.randn(b, 3, *size, generator=torch.Generator().manual_seed(1))


def loop_mask(pattern: str, window: int, grid: tuple[int, int], prefix: int) -> torch.Tensor:
    """(N, N) mask from the patterns' definitions, one token pair at a time."""
    pos = [None] * prefix + [(r, c) for r in range(grid[0]) for c in range(grid[1])]
    n = len(pos)
    m = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):
        for j in range(n):
            if pos[i] is None or pos[j] is None:
                m[i, j] = True
            elif pattern == "local":
                m[i, j] = abs(pos[i][0] - pos[j][0]) <= window // 2 and abs(pos[i][1] - pos[j][1]) <= window // 2
            else:
                m[i, j] = pos[i][0] // window == pos[j][0] // window and pos[i][1] // window == pos[j][1] // window
    return m


def reference_attention(attn, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Masked softmax attention written out: logits, -inf where masked, softmax, values, projection."""
    q, k, v = attn.qkv_heads(x)  # (B, heads, N, d)
    logits = (q @ k.transpose(-2, -1)) * attn.head_dim**-0.5
    logits = logits.masked_fill(~mask, float("-inf"))
    return attn.proj(attn.merge_heads(logits.softmax(-1) @ v))


def tokens_in(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model.embed(x)[0]


# ------------------------------------------------------------------ masks
def test_mask_entries():
    local = dense_mask(mask_mod("local", 3, (4, 4), prefix=1), 17)  # token 1 + 4r + c is patch (r, c)
    t = lambda r, c: 1 + 4 * r + c  # noqa: E731
    assert local[t(1, 1), t(0, 0)] and local[t(1, 1), t(2, 2)] and local[t(1, 1), t(1, 1)]
    assert not local[t(1, 1), t(3, 3)] and not local[t(1, 1), t(1, 3)] and not local[t(0, 3), t(1, 0)]  # no wrap
    assert local[0].all() and local[:, 0].all()  # the class token attends and is attended everywhere
    assert local.sum() == 33 + 10 * 10  # prefix row and column; per axis 10 index pairs within 1 of each other
    block = dense_mask(mask_mod("block", 2, (4, 4), prefix=1), 17)
    assert block[t(0, 0), t(1, 1)] and block[t(2, 2), t(3, 3)] and block[t(2, 3), t(3, 2)]
    assert not block[t(0, 0), t(0, 2)] and not block[t(1, 1), t(2, 1)]
    assert block[1:, 1:].sum() == 16 * 4  # four 2x2 blocks: every patch meets 4 patches
    for pattern, window in (("local", 3), ("local", 5), ("block", 3), ("block", 4)):
        for prefix in (0, 2):
            got = dense_mask(mask_mod(pattern, window, GRID, prefix), prefix + 48)
            assert torch.equal(got, loop_mask(pattern, window, GRID, prefix)), (pattern, window, prefix)


@needs_flex
def test_block_mask_is_the_dense_mask():
    from torch.nn.attention.flex_attention import create_mask
    mod = mask_mod("local", 5, GRID, 1)
    assert torch.equal(create_mask(mod, None, None, 49, 49, device="cpu")[0, 0], loop_mask("local", 5, GRID, 1))
    with sparse_attention(make("vit"), "block", 3) as state:
        bm = state.block_mask(torch.device("cpu"))
        assert bm.shape[-2:] == (49, 49) and torch.equal(state.dense_mask(), loop_mask("block", 3, GRID, 1))


# ------------------------------------------------------------------ attention outputs
CASES = [("vit", "local", 3), ("vit", "block", 4), ("deit", "local", 5), ("gap", "block", 3), ("deit", "block", 2)]


@pytest.mark.parametrize("family,pattern,window", CASES)
def test_dense_path_equals_masked_softmax_reference(family, pattern, window):
    model, x = make(family), images()
    attn, blk = model.blocks[0].attn, model.blocks[0]
    with torch.no_grad():
        h = blk.norm1(tokens_in(model, x))
        ref = reference_attention(attn, h, loop_mask(pattern, window, GRID, PREFIX[family]))
        with sparse_attention(model, pattern, window, backend="dense") as state:
            got = attn(h)
            assert state.path == "dense" and state.fallback is None
        assert torch.allclose(got, ref, atol=1e-5)
        assert not torch.allclose(attn(h), ref, atol=1e-3)  # the plain attention differs


@needs_flex
@pytest.mark.parametrize("family,pattern,window", CASES)
def test_flex_path_equals_dense_path_and_reference(family, pattern, window):
    model, x = make(family), images()
    attn, blk = model.blocks[0].attn, model.blocks[0]
    with torch.no_grad():
        h = blk.norm1(tokens_in(model, x))
        ref = reference_attention(attn, h, loop_mask(pattern, window, GRID, PREFIX[family]))
        with sparse_attention(model, pattern, window, backend="flex") as state:
            got = attn(h)
            assert state.path == "flex" and state.fallback is None
            logits = model(x)
        with sparse_attention(model, pattern, window, backend="dense") as state:
            dense_logits = model(x)
            assert state.path == "dense"
    assert torch.allclose(got, ref, atol=1e-5)
    assert torch.allclose(logits, dense_logits, atol=1e-5)


@needs_flex
def test_compiled_flex_path():
    model, x = make("vit"), images()
    with torch.no_grad():
        with sparse_attention(model, "local", 3, backend="dense"):
            dense = model(x)
        with sparse_attention(model, "local", 3, compile=True) as state:
            got = model(x)
            assert state.path == "flex_compiled"
    assert torch.allclose(got, dense, atol=1e-5)


@pytest.mark.parametrize("backend", ["dense", pytest.param("flex", marks=needs_flex)])
@pytest.mark.parametrize("family", ["vit", "deit"])
def test_window_covering_the_grid_is_the_plain_model(family, backend):
    model, x = make(family), images()
    with torch.no_grad():
        ref = model(x)
        for pattern, window in (("local", 2 * max(GRID) - 1), ("block", max(GRID))):
            with sparse_attention(model, pattern, window, backend=backend) as state:
                assert state.dense_mask().all()
                assert torch.allclose(model(x), ref, atol=1e-5)
            with sparse_attention(model, pattern, 3, backend=backend):
                assert not torch.allclose(model(x), ref, atol=1e-4)  # a small window changes the logits
        assert torch.equal(model(x), ref)  # restored


def test_capture_records_the_masked_probabilities():
    model, x = make("vit"), images()
    with torch.no_grad(), sparse_attention(model, "local", 3) as state, capture_attention(model) as cap:
        model(x)
        assert state.path == "explicit"
    mask = loop_mask("local", 3, GRID, 1)
    for probs in cap.maps:  # (B, heads, N, N)
        assert torch.equal(probs[..., ~mask], torch.zeros_like(probs[..., ~mask]))
        assert torch.allclose(probs.sum(-1), torch.ones(probs.shape[:-1]))


def test_fallbacks_are_reported(monkeypatch):
    model, x = make("vit"), images()
    with torch.no_grad():
        with sparse_attention(model, "local", 3, backend="dense") as state:
            want = model(x)
        bias = torch.zeros(1, 1, 1, 49)
        with sparse_attention(model, "local", 3) as state:
            model.blocks[0].attn(tokens_in(model, x), attn_bias=bias)
            assert state.path == "dense" and "attn_bias" in state.fallback
        monkeypatch.setattr(sa, "flex_available", lambda: False)  # a torch without FlexAttention
        with sparse_attention(model, "local", 3) as state:
            assert torch.allclose(model(x), want, atol=1e-6)
            assert state.path == "dense" and "no torch.nn.attention.flex_attention" in state.fallback
    monkeypatch.undo()
    for blk in model.blocks:
        blk.attn.attn_drop = 0.5
    model.train()
    with sparse_attention(model, "local", 3) as state:
        model(x).sum().backward()
        assert state.path == "dense" and ("dropout" in state.fallback or not sa.flex_available())
    grads = [p.grad for n, p in model.named_parameters() if "blocks.0." in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


@needs_flex
def test_gradients_on_cpu_take_the_dense_path():
    x = images()
    grads = {}
    for backend in ("flex", "dense"):
        model = make("vit").train()
        with sparse_attention(model, "block", 3, backend=backend) as state:
            model(x).sum().backward()
            assert state.path == "dense"  # torch's flex attention has no CPU backward
            assert backend == "dense" or "backward" in state.fallback
        grads[backend] = model.blocks[0].attn.qkv.weight.grad
    assert grads["flex"].abs().sum() > 0 and torch.equal(grads["flex"], grads["dense"])
    with torch.no_grad(), sparse_attention(model, "block", 3) as state:
        model(x)
        assert state.path == "flex"  # training mode without dropout or gradient: flex


def test_other_input_size_and_remove():
    model = make("vit")
    x = images(size=(16, 16))  # a 4x4 grid
    with pytest.raises(ValueError, match="image_size"):
        with sparse_attention(model, "local", 3):
            model(x)
    with torch.no_grad(), sparse_attention(model, "local", 3, backend="dense", image_size=16) as state:
        assert state.grid == (4, 4) and model(x).shape == (2, 5)
    apply_sparse_attention(model, "block", 2, locations=[1])
    assert sparse_attention_state(model).blocks == ["blocks.1.attn"]
    assert "forward" in model.blocks[1].attn.__dict__ and "forward" not in model.blocks[0].attn.__dict__
    remove_sparse_attention(model)
    assert all("forward" not in m.attn.__dict__ for m in model.blocks)
    with pytest.raises(ValueError, match="apply_sparse_attention"):
        sparse_attention_state(model)


def test_errors():
    model = make("vit")
    for bad in (0, -3, 4, 2.5, True, "7"):
        with pytest.raises(ValueError, match="window"):
            apply_sparse_attention(model, "local", bad)
    with pytest.raises(ValueError, match="window"):
        apply_sparse_attention(model, "block", 0)
    with pytest.raises(ValueError, match="pattern"):
        apply_sparse_attention(model, "strided", 3)
    with pytest.raises(ValueError, match="backend"):
        apply_sparse_attention(model, "local", 3, backend="triton")
    with pytest.raises(ValueError, match="locations"):
        apply_sparse_attention(model, "local", 3, locations=[5])
    with pytest.raises(ValueError, match="token_layout"):
        apply_sparse_attention(nn.Sequential(Block(32, 2, 64)), "local", 3)  # no grid known
    windowed = VisionTransformer(ViTConfig(class_token=False, pool="mean", window_size=2, mlp_dim=64, **SMALL))
    with pytest.raises(ValueError, match="WindowAttention"):
        apply_sparse_attention(windowed, "local", 3)
    cait = CaiT(CaiTConfig(image_size=32, patch_size=4, dim=32, depth=2, heads=2, num_classes=5))
    with pytest.raises(ValueError, match="TalkingHeadsAttention"):
        apply_sparse_attention(cait, "local", 3)
    assert "forward" not in model.blocks[0].attn.__dict__  # nothing left patched by a refusal
