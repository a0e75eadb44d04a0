"""Explainability against independent references: PCA against an explicit eigendecomposition on
data whose principal axes are known, gradient rollout against hand values (negative
attention x gradient entries dropped, not flipped), and attention capture that records exactly
one map of the right shape per attention module, for every registered family.
"""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from vitlab.components import capture_attention
from vitlab.components.attention import AttentionBase
from vitlab.evaluation import attention_rollout, gradient_rollout, gradient_weighted_attention, pca_features
from vitlab.models import get_entry, list_families, list_models

from conftest import tiny_model

FAMILY_VARIANTS = {fam: min(n for n in list_models() if get_entry(n).family == fam) for fam in list_families()}


def hadamard(n: int) -> torch.Tensor:
    """Sylvester's Hadamard matrix (n a power of 2): columns 1.. have zero mean and are orthogonal."""
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def same_up_to_sign(channel: torch.Tensor, expected: torch.Tensor) -> bool:
    """A min-max scaled component equals the expected one or its flip (1 - x): PCA's sign is arbitrary."""
    return torch.allclose(channel, expected, atol=1e-5) or torch.allclose(channel, 1 - expected, atol=1e-5)


# ----------------------------------------------------------------------------- PCA
def test_pca_finds_known_principal_axes(monkeypatch):
    """8 tokens x 4 channels: mean + H[:, 1:4] diag(3, 2, 1) R with R orthogonal -> components are H's columns."""
    model = tiny_model("vit_tiny_patch16_224").eval()  # patch 16
    h, w, c = 2, 4, 4
    v = torch.tensor([1.0, 2.0, 3.0, 4.0])
    rot = torch.eye(4) - 2 * torch.outer(v, v) / (v @ v)  # a Householder reflection: orthogonal
    scales = torch.tensor([3.0, 2.0, 1.0])
    had = hadamard(8)[:, 1:4]  # (8, 3), entries +-1
    tokens = torch.tensor([5.0, -1.0, 2.0, 0.5]) + (had * scales) @ rot[:3]  # (8, 4)
    feats = tokens.view(1, h, w, c).permute(0, 3, 1, 2)  # (tokens in row-major grid order) -> (1, C, h, w)
    monkeypatch.setattr(model, "forward_intermediates", lambda x, indices, **kw: [feats for _ in indices])
    (view,) = pca_features(model, torch.zeros(1, 3, 16 * h, 16 * w), layers=[1])
    rgb = view.token_image.reshape(-1, 3)  # (1, h, w, 3) -> (8, 3)
    for k in range(3):
        expected = (had[:, k] + 1) / 2  # the component is +-scale: min-max scaled to 0 / 1
        assert same_up_to_sign(rgb[:, k], expected), (k, rgb[:, k], expected)
    # Share of variance: 9 / 14, 4 / 14, 1 / 14 (the fourth direction carries none).
    assert view.explained_variance == pytest.approx([9 / 14, 4 / 14, 1 / 14], abs=1e-6)


def test_pca_matches_an_eigendecomposition_of_real_features():
    torch.manual_seed(3)
    model = tiny_model("vit_tiny_patch16_224").eval()
    x = torch.randn(2, 3, 80, 64)  # two images: one fit over both
    for view in pca_features(model, x, layers=[1, 2]):
        f = view.features.double()  # (B, C, h, w)
        b, c, h, w = f.shape
        tokens = f.permute(0, 2, 3, 1).reshape(-1, c)
        centred = tokens - tokens.mean(0)
        evals, evecs = torch.linalg.eigh(centred.T @ centred)  # ascending
        top = evecs[:, -3:].flip(1)  # (C, 3), largest first
        proj = centred @ top
        expected = (proj - proj.amin(0)) / (proj.amax(0) - proj.amin(0))
        got = view.token_image.reshape(-1, 3).double()
        for k in range(3):
            assert same_up_to_sign(got[:, k], expected[:, k]), (view.label, k)
        torch.testing.assert_close(torch.tensor(view.explained_variance, dtype=torch.float64),
                                   evals.flip(0)[:3] / evals.sum(), atol=1e-5, rtol=1e-4)


# ----------------------------------------------------------------------------- gradient rollout
def test_gradient_weighting_drops_negative_entries_by_hand():
    a = torch.tensor([[0.25, 0.75], [0.6, 0.4]]).view(1, 1, 2, 2)
    g = torch.tensor([[2.0, 1.0], [-3.0, 1.0]]).view(1, 1, 2, 2)  # a * g = [[.5, .75], [-1.8, .4]]
    weighted = gradient_weighted_attention(a, g)
    torch.testing.assert_close(weighted[0, 0], torch.tensor([[0.5, 0.75], [0.0, 0.4]]))
    # One layer of rollout on it: rows of 0.5 W + 0.5 I = [[.75, .375], [0, .7]], normalised.
    torch.testing.assert_close(attention_rollout([weighted])[0], torch.tensor([[2 / 3, 1 / 3], [0.0, 1.0]]))
    # (abs() would keep the -1.8 as 1.8: second row [0.5625, 0.4375].)
    assert torch.equal(gradient_weighted_attention(a, None), torch.zeros_like(a))


def test_gradient_rollout_equals_the_definition_on_a_vit():
    """relu(A * dS/dA) averaged over heads, rolled out with the residual, read at the class token."""
    torch.manual_seed(4)
    model = tiny_model("vit_tiny_patch16_224").eval()
    x = torch.randn(2, 3, 69, 51)  # a 5 x 4 grid
    target = torch.tensor([3, 7])
    res = gradient_rollout(model, x, target=target)
    # the reference: its own autograd, its own products
    with capture_attention(model, detach=False) as cap:
        logits = model(x)
    probs = [r.probs for r in cap.records]
    grads = torch.autograd.grad(logits.gather(1, target[:, None]).sum(), probs)
    n = probs[0].shape[-1]
    eye = torch.eye(n)

    def rollout_of(weights):
        rows = eye.expand(2, n, n)
        for wl in weights:
            m = 0.5 * wl.mean(1) + 0.5 * eye  # (B, N, N)
            rows = (m / m.sum(-1, keepdim=True)) @ rows
        return rows[:, 0, 1:].reshape(2, 5, 4)  # class token's row over the patches

    products = [(p * g).detach() for p, g in zip(probs, grads)]
    assert all((pg < 0).any() for pg in products), "the case must have negative attention x gradient entries"
    expected = rollout_of([pg.clamp(min=0) for pg in products])
    torch.testing.assert_close(res.token_maps["grid"], expected, atol=1e-6, rtol=1e-5)
    with_abs = rollout_of([pg.abs() for pg in products])
    assert (with_abs - expected).abs().max() > 1e-3, "abs() and relu must differ on this case"
    assert torch.equal(res.targets, target)


# ----------------------------------------------------------------------------- attention capture
@pytest.mark.parametrize("family", sorted(FAMILY_VARIANTS))
def test_attention_capture_one_record_per_attention_module(family, monkeypatch):
    model = tiny_model(FAMILY_VARIANTS[family]).eval()
    size = model.config.image_size
    h, w = size if isinstance(size, (tuple, list)) else (size, size)
    x = torch.randn(2, model.config.in_channels, h, w)
    modules = {n: m for n, m in model.named_modules() if isinstance(m, AttentionBase)}
    if family == "convnet":
        assert not modules
        with pytest.raises(ValueError, match="no vitlab attention"):
            with capture_attention(model):
                pass
        return
    assert modules, f"{family}: no attention module found"
    # What each module computes: (q, k) shapes of its calls, seen from outside the capture code.
    seen: dict[str, list[tuple[torch.Size, torch.Size]]] = {n: [] for n in modules}
    for name, m in modules.items():
        def spy(q, k, v, *args, _name=name, _real=m.attend, **kwargs):
            seen[_name].append((q.shape, k.shape))
            return _real(q, k, v, *args, **kwargs)
        monkeypatch.setattr(m, "attend", spy, raising=False)
    with torch.no_grad(), capture_attention(model) as cap:
        model(x)
    counts = Counter(r.name for r in cap.records)
    assert counts == Counter({n: 1 for n in modules}), f"{family}: records per module {dict(counts)}"
    for r in cap.records:
        ((q, k),) = seen[r.name]
        assert r.probs.shape == (q[0], modules[r.name].heads, q[2], k[2]), (r.name, tuple(r.probs.shape))
        assert q[0] % 2 == 0  # the batch (times the windows for window attention)
        torch.testing.assert_close(r.probs.sum(-1), torch.ones(r.probs.shape[:-1]), atol=1e-5, rtol=0)
    assert math.prod(cap.records[0].probs.shape) > 0
