"""Explainability (issue 5): attention maps for every family, rollout, Grad-CAM, occlusion,
saliency, PCA, attention analysis, plots, the ``vitlab explain`` CLI and the example.

The sanity checks (Adebayo et al., 2018) use a tiny ViT trained for a few seconds on the
bundled digits (8x8 images, 2x2 patches): its maps must put more weight on ink than on
blank background, and must change when the weights are re-randomised.
"""

from __future__ import annotations

import json
import math
import runpy
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from vitlab.cli import main as cli_main
from vitlab.components import capture_attention
from vitlab.datasets.transforms import normalize
from vitlab.evaluation import (
    AttentionVisualizer,
    analyze_attention,
    attention_rollout,
    grad_cam,
    gradient_rollout,
    occlusion,
    pca_features,
    plot_attention_analysis,
    rollout,
    saliency,
    spearman_correlation,
)
from vitlab.evaluation.analysis import attention_entropy, head_similarity, mean_attention_distance
from vitlab.evaluation.interpretation import feature_maps
from vitlab.evaluation.layouts import AttentionLayer, Segment, TokenGrid, overlap_matrix
from vitlab.models import build_model, get_entry, list_families, list_models

from conftest import tiny_model

ROOT = Path(__file__).resolve().parents[1]

# One variant per registered family (first by name), plus PVT v2's linear spatial reduction.
FAMILY_VARIANTS = {fam: min(n for n in list_models() if get_entry(n).family == fam) for fam in list_families()}
ATTENTION_VARIANTS = sorted({v for f, v in FAMILY_VARIANTS.items() if f != "convnet"} | {"pvt_v2_b2_li"})


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models: one intra-op thread is fastest (and immune to a busy machine); the digits run is reproducible."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def odd_size(model: nn.Module) -> tuple[int, int]:
    """An input size the model was not configured for (not a multiple of its patches or windows)."""
    h, w = model.config.image_size
    return h + 5, w + 3


def assert_png(path: Path) -> None:
    assert path.is_file() and path.stat().st_size > 0, path
    with Image.open(path) as im:
        assert im.format == "PNG"
        im.verify()
    with Image.open(path) as im:
        im.load()
        assert min(im.size) > 50


# ----------------------------------------------------------------------------- every family
@pytest.mark.parametrize("name", ATTENTION_VARIANTS)
def test_attention_maps_every_family(name, monkeypatch):
    model = tiny_model(name).eval()
    x = torch.randn(2, model.config.in_channels, *odd_size(model))
    sdpa_calls = []
    real_sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda *a, **k: sdpa_calls.append(1) or real_sdpa(*a, **k))
    with torch.no_grad():
        logits = model(x)
    fused = len(sdpa_calls)
    assert fused > 0, "the ordinary forward pass should use the fused SDPA kernel"

    maps = AttentionVisualizer(model).generate_attention_maps(x)
    assert len(sdpa_calls) == fused, "capture must take the explicit path"
    torch.testing.assert_close(maps.logits, logits, atol=1e-5, rtol=1e-4)  # the same function either way
    with torch.no_grad():
        model(x)
    assert len(sdpa_calls) == 2 * fused, "SDPA is back after capture"

    with capture_attention(model) as cap, torch.no_grad():
        model(x)
    informative = [r for r in cap.records if r.info.get("grid", True) is not None]  # CrossViT's later fusion blocks
    assert {m.layer for m in maps} == set(range(1, len(informative) + 1))
    for m in maps:
        assert m.map.shape == (2, *x.shape[-2:])
        assert torch.isfinite(m.map).all() and (m.map >= 0).all() and m.map.amax() > 0
        # Each query's attention: patches (the map) + prefix tokens = 1 (Swin: less what goes to padding).
        total = m.token_map.sum(dim=(-2, -1)) + m.prefix_attention
        if get_entry(name).family == "swin":
            assert ((total > 0.5) & (total <= 1 + 1e-5)).all()
        else:
            torch.testing.assert_close(total, torch.ones_like(total), atol=1e-5, rtol=0)


def test_deit_class_and_distillation_token_maps():
    model = tiny_model("deit_tiny_distilled_patch16_224").eval()
    x = torch.randn(1, 3, 64, 48)
    maps = AttentionVisualizer(model).generate_attention_maps(x, layers=[-1])
    assert [m.query for m in maps] == ["cls", "dist"]
    with capture_attention(model) as cap, torch.no_grad():
        model(x)
    probs = cap.records[-1].probs.mean(1)  # (B, 2 + 12, 2 + 12)
    for row, m in enumerate(maps):
        torch.testing.assert_close(m.token_map[0].flatten(), probs[0, row, 2:])


@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "swin_tiny_patch4_window7_224", "pvt_v2_b0",
                                  "crossvit_9_240"])
def test_heads_mean_equals_mean_of_all(name):
    model = tiny_model(name).eval()
    x = torch.randn(2, 3, *odd_size(model))
    viz = AttentionVisualizer(model)
    mean = viz.generate_attention_maps(x, heads="mean")
    every = viz.generate_attention_maps(x, heads="all")
    for a, b in zip(mean, every):
        assert b.map.ndim == 4 and b.map.shape[1] > 0
        torch.testing.assert_close(a.map, b.map.mean(dim=1), atol=1e-6, rtol=1e-5)
    biggest = max(every, key=lambda m: m.map.shape[1])
    one = viz.generate_attention_maps(x, layers=[biggest.layer], heads=1)
    torch.testing.assert_close(one.maps[0].map, biggest.map[:, 1])


def test_layer_and_head_errors_name_the_valid_range():
    model = tiny_model("vit_tiny_patch16_224").eval()
    viz = AttentionVisualizer(model)
    x = torch.randn(1, 3, 64, 48)
    with pytest.raises(ValueError, match=r"1\.\.2"):
        viz.generate_attention_maps(x, layers=[12])
    with pytest.raises(ValueError, match=r"1\.\.2"):
        viz.generate_attention_maps(x, layers=[0])
    with pytest.raises(ValueError, match=r"3 heads \(0\.\.2\)"):
        viz.generate_attention_maps(x, heads=9)
    with pytest.raises(ValueError, match="heads must be"):
        viz.generate_attention_maps(x, heads="median")


def test_convnet_has_no_attention_but_other_methods_work():
    model = tiny_model("cnn_small").eval()
    x = torch.randn(2, 3, 37, 45)
    with pytest.raises(ValueError, match="no attention layers"):
        AttentionVisualizer(model).generate_attention_maps(x)
    with pytest.raises(ValueError, match="no attention layers"):
        rollout(model, x)
    for res in (grad_cam(model, x), occlusion(model, x), saliency(model, x)):
        assert res.maps.shape == (2, 37, 45) and torch.isfinite(res.maps).all()
    views = pca_features(model, x, layers=[1, -1])
    assert [v.label for v in views] == ["stage 1", "stage 4"]
    assert views[0].image.shape == (2, 37, 45, 3) and 0 <= views[0].image.min() and views[0].image.max() <= 1
    assert [v.image.shape for v in feature_maps(model, x, layers=2)] == [(2, 37, 45)]


# ----------------------------------------------------------------------------- rollout
def test_rollout_of_identity_attention_is_identity():
    eye = torch.eye(5).expand(2, 3, 5, 5)
    for fusion in ("mean", "max", "min"):
        torch.testing.assert_close(attention_rollout([eye, eye, eye], head_fusion=fusion), torch.eye(5).expand(2, 5, 5))


def test_rollout_equals_hand_computed_product():
    torch.manual_seed(1)
    a1 = torch.rand(1, 2, 4, 4).softmax(-1)
    a2 = torch.rand(1, 2, 4, 4).softmax(-1)
    eye = torch.eye(4)

    def step(fused):
        m = 0.5 * fused + 0.5 * eye
        return m / m.sum(-1, keepdim=True)

    for fusion, fuse in (("mean", lambda a: a.mean(1)), ("max", lambda a: a.amax(1)), ("min", lambda a: a.amin(1))):
        expected = step(fuse(a2)[0]) @ step(fuse(a1)[0])
        torch.testing.assert_close(attention_rollout([a1, a2], head_fusion=fusion)[0], expected)
    # discard_ratio: the lowest half of each fused matrix is zeroed before the residual.
    f1, f2 = a1.mean(1)[0], a2.mean(1)[0]
    keep = lambda f: torch.where(f >= f.flatten().sort().values[8], f, torch.zeros_like(f))  # noqa: E731
    expected = step(keep(f2)) @ step(keep(f1))
    torch.testing.assert_close(attention_rollout([a1, a2], discard_ratio=0.5)[0], expected)


def test_model_rollout_matches_the_definition_for_vit():
    model = tiny_model("vit_tiny_patch16_224").eval()
    x = torch.randn(2, 3, 69, 51)
    with capture_attention(model) as cap, torch.no_grad():
        model(x)
    joint = attention_rollout([r.probs for r in cap.records])  # (B, 1 + 20, 1 + 20)
    res = rollout(model, x)
    torch.testing.assert_close(res.token_maps["grid"], joint[:, 0, 1:].reshape(2, 5, 4))
    assert res.maps.shape == (2, 69, 51)


@pytest.mark.parametrize("name", ["swin_tiny_patch4_window7_224", "pvt_v2_b0", "pvt_v2_b2_li"])
def test_multistage_rollout_conserves_attribution(name):
    """Without prefix tokens, rollout through stages, merges and reduced keys keeps rows summing to 1."""
    model = tiny_model(name).eval()
    x = torch.randn(2, 3, *model.config.image_size)
    res = rollout(model, x, head_fusion="max", discard_ratio=0.2)
    total = res.token_maps["grid"].sum(dim=(-2, -1))
    torch.testing.assert_close(total, torch.ones_like(total), atol=1e-4, rtol=0)
    grad = gradient_rollout(model, x)
    assert torch.isfinite(grad.maps).all() and grad.maps.shape == (2, *x.shape[-2:])


def test_overlap_matrix_carries_area():
    fine, coarse = TokenGrid((4, 4), (2.0, 2.0)), TokenGrid((2, 2), (4.0, 4.0))
    m = overlap_matrix(coarse, fine)  # a coarse token is the 4 fine tokens it covers, a quarter each
    assert m.shape == (4, 16)
    quarter = torch.tensor([[.25, .25, 0, 0], [.25, .25, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]])
    torch.testing.assert_close(m[0].view(4, 4), quarter)
    assert overlap_matrix(fine, coarse).sum(1).eq(1).all()


# ----------------------------------------------------------------------------- Swin and PVT
def test_swin_token_map_is_zero_outside_its_shifted_window():
    model = tiny_model("swin_tiny_patch4_window7_224").eval()  # patch 4, window 4, shift 2 in odd blocks
    x = torch.randn(2, 3, 60, 76)  # stage-1 grid 15 x 19, padded to 16 x 20
    h, w, hp, wp, ws, sh = 15, 19, 16, 20, 4, 2
    ti, tj = 14, 18  # bottom-right token: its shifted window wraps around and holds padding
    viz = AttentionVisualizer(model, interpolation="nearest")
    (m,) = viz.generate_attention_maps(x, layers=[2], heads="all", query=(ti * 4 + 1.0, tj * 4 + 1.0))
    assert "shifted" in m.label and m.token_map.shape == (2, 1, h, w)

    def window(i, j):  # independent of vitlab: roll by -shift, then cut windows
        return (i - sh) % hp // ws, (j - sh) % wp // ws

    members = torch.zeros(h, w, dtype=torch.bool)
    for i in range(h):
        for j in range(w):
            members[i, j] = window(i, j) == window(ti, tj)
    assert members.sum() < 16  # the window is cut by padding
    assert (m.token_map[:, :, ~members] == 0).all()
    # Inside the window the values are the block's own window attention (slot by slot) ...
    with capture_attention(model) as cap, torch.no_grad():
        model(x)
    raw = cap.records[1].probs  # (B * nW, heads, 16, 16)
    n_wins = (hp // ws) * (wp // ws)
    wr, wc = window(ti, tj)
    slot = lambda i, j: ((i - sh) % hp % ws) * ws + (j - sh) % wp % ws  # noqa: E731
    for b in range(2):
        for i, j in members.nonzero().tolist():
            expect = raw[b * n_wins + wr * (wp // ws) + wc, 0, slot(ti, tj), slot(i, j)]
            torch.testing.assert_close(m.token_map[b, 0, i, j], expect)
    # ... and tokens that only met through the wrap-around are masked apart (rows 0-1, columns 0-1).
    assert m.token_map[:, :, :2, :].max() < 1e-6 and m.token_map[:, :, :, :2].max() < 1e-6
    # In image space nothing lands outside the window's patches.
    pixels = members.repeat_interleave(4, 0).repeat_interleave(4, 1)[:60, :76]
    assert (m.map[:, :, ~pixels] == 0).all() and (m.map[:, :, pixels].sum() > 0)


@pytest.mark.parametrize("name, key_grid, cell", [("pvt_v2_b0", (3, 2), (32.0, 32.0)),
                                                  ("pvt_v2_b2_li", (7, 7), (96 / 7, 80 / 7))])
def test_pvt_keys_on_the_reduced_grid(name, key_grid, cell):
    model = tiny_model(name).eval()
    x = torch.randn(2, 3, 96, 80)  # stage-1 grid 24 x 20: sr 8 -> 3 x 2 keys, linear SRA -> 7 x 7
    viz = AttentionVisualizer(model, interpolation="nearest")
    (m,) = viz.generate_attention_maps(x, layers=[1], heads="all", query="mean")
    with capture_attention(model) as cap, torch.no_grad():
        model(x)
    probs = cap.records[0].probs  # (B, heads, 480, keys)
    assert m.grid.shape == key_grid and m.grid.cell == pytest.approx(cell)
    torch.testing.assert_close(m.token_map, probs.mean(dim=2).reshape(2, -1, *key_grid))
    # A pixel takes the value of the reduced key whose cell covers it.
    y, xx = 70, 41
    torch.testing.assert_close(m.map[:, :, y, xx], m.token_map[:, :, int(y // cell[0]), int(xx // cell[1])])


def test_crossvit_maps_for_each_branch_and_the_fusion():
    model = tiny_model("crossvit_9_240").eval()  # patches 12 and 16; branch 1 sees the image at 224/240
    x = torch.randn(1, 3, 125, 99)
    maps = AttentionVisualizer(model).generate_attention_maps(x)
    labels = [m.label for m in maps]
    assert any("branch 0 block" in s for s in labels) and any("branch 1 block" in s for s in labels)
    fusion = [m for m in maps if "fusion: branch 0" in m.label][0]
    branch1 = [m for m in maps if "branch 1 block" in m.label][0]
    assert fusion.grid == branch1.grid  # branch 0's class token reads branch 1's tokens
    rh, rw = int(125 * 224 / 240), int(99 * 224 / 240)
    assert branch1.grid.shape == (math.ceil(rh / 16), math.ceil(rw / 16))
    assert branch1.grid.cell == pytest.approx((16 * 125 / rh, 16 * 99 / rw))
    for m in maps:
        assert m.map.shape == (1, 125, 99) and torch.isfinite(m.map).all()


def test_cait_class_attention_stage():
    model = tiny_model("cait_xxs24_224").eval()
    maps = AttentionVisualizer(model).generate_attention_maps(torch.randn(1, 3, 64, 48))
    assert [m.query for m in maps] == ["mean", "mean", "cls", "cls"]
    assert "class-attention" in maps.maps[-1].label
    with pytest.raises(ValueError, match="no 'cls' query"):
        AttentionVisualizer(model).generate_attention_maps(torch.randn(1, 3, 64, 48), layers=[1], query="cls")


# ----------------------------------------------------------------------------- Grad-CAM and perturbation
def test_gradcam_on_the_real_token_grid_matches_a_hand_computation():
    model = tiny_model("vit_tiny_patch16_224").eval()  # 2 blocks, class-token pooling
    x = torch.randn(2, 3, 69, 51)  # a 5 x 4 grid, not 14 x 14
    res = grad_cam(model, x, target=3)
    cam = res.token_maps["block 1"]
    assert cam.shape == (2, 5, 4) and res.maps.shape == (2, 69, 51)
    tokens, grid = model.embed(x)
    feats = model.blocks[0](tokens).detach().requires_grad_(True)
    score = model.forward_head(model.norm(model.blocks[1](feats)))[:, 3].sum()
    (grads,) = torch.autograd.grad(score, feats)
    to_map = lambda t: t[:, 1:].transpose(1, 2).reshape(2, -1, 5, 4)  # noqa: E731  (class token excluded)
    expected = ((to_map(grads).mean(dim=(2, 3), keepdim=True) * to_map(feats)).sum(1)).clamp(min=0)
    torch.testing.assert_close(cam, expected.detach())
    with pytest.raises(ValueError, match="never reach the classifier"):
        grad_cam(model, x, layer=2)


@pytest.mark.parametrize("name", ["swin_tiny_patch4_window7_224", "crossvit_9_240", "pvt_tiny"])
def test_gradcam_on_stage_outputs(name):
    model = tiny_model(name).eval()
    x = torch.randn(1, 3, *odd_size(model))
    res = grad_cam(model, x)
    assert res.maps.shape == (1, *x.shape[-2:]) and torch.isfinite(res.maps).all() and res.maps.amax() > 0
    if name.startswith("swin"):
        assert res.info["labels"] == ["stage 4"]
        assert grad_cam(model, x, layer=1).token_maps["stage 1"].shape[-2:] == (18, 17)  # the real 69 x 67 / 4 grid


class LinearClassifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(2 * 6 * 6, 3)

    def forward(self, x):
        return self.fc(x.flatten(1))


def test_occlusion_is_the_score_drop_and_batching_does_not_matter():
    torch.manual_seed(2)
    model = LinearClassifier()
    x = torch.randn(2, 2, 6, 6)
    res = occlusion(model, x, target=1, patch_size=2, baseline=0.0, batch_size=4)
    contrib = (model.fc.weight[1].view(2, 6, 6) * x).sum(1)  # (B, 6, 6): what each pixel adds to class 1
    expected = contrib.view(2, 3, 2, 3, 2).sum(dim=(2, 4))  # per 2 x 2 patch
    torch.testing.assert_close(res.token_maps["occlusion"], expected.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(res.maps, expected.repeat_interleave(2, 1).repeat_interleave(2, 2).detach(),
                               atol=1e-5, rtol=1e-5)
    one = occlusion(model, x, target=1, patch_size=2, batch_size=1)
    torch.testing.assert_close(one.maps, res.maps)
    overlapping = occlusion(model, x, target=1, patch_size=2, stride=1)  # pixel = mean drop of its masks
    torch.testing.assert_close(overlapping.maps[0, 0, 0], expected[0, 0, 0].detach(), atol=1e-5, rtol=1e-5)


def test_saliency_is_the_input_gradient():
    model = LinearClassifier()
    x = torch.randn(2, 2, 6, 6)
    res = saliency(model, x, target=2)
    expected = model.fc.weight[2].view(2, 6, 6).abs().amax(0)
    torch.testing.assert_close(res.maps, expected.expand(2, 6, 6).detach())
    with pytest.raises(ValueError, match="out of range"):
        saliency(model, x, target=7)


def test_spearman_with_ties():
    a = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert spearman_correlation(a, a * 10) == pytest.approx(1.0)
    assert spearman_correlation(a, -a) == pytest.approx(-1.0)
    # ties share their average rank: ranks (1.5, 1.5, 3, 4) against (1, 2, 3, 4)
    b = torch.tensor([0.0, 0.0, 5.0, 9.0])
    r1, r2 = torch.tensor([1.5, 1.5, 3, 4]), torch.tensor([1.0, 2, 3, 4])
    r1, r2 = r1 - r1.mean(), r2 - r2.mean()
    assert spearman_correlation(b, a) == pytest.approx(float(r1 @ r2 / (r1.norm() * r2.norm())))
    assert math.isnan(spearman_correlation(torch.ones(4), a))


# ----------------------------------------------------------------------------- analysis
def _layer(probs: torch.Tensor) -> AttentionLayer:
    seg = Segment(("grid", 0), TokenGrid((2, 2), (4.0, 4.0)))
    return AttentionLayer(1, "x", "block 1", "self", (seg,), (seg,), probs)


def test_mean_attention_distance_and_entropy_by_hand():
    eye = torch.eye(4)
    right = torch.tensor([[0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1], [0, 0, 1, 0]], dtype=torch.float)  # 4 px away
    uniform = torch.full((4, 4), 0.25)
    blend = 0.4 * eye + 0.6 * uniform
    probs = torch.stack([eye, right, uniform, blend])[None]  # (1, 4 heads, 4, 4)
    pos = TokenGrid((2, 2), (4.0, 4.0)).centers()
    dist = mean_attention_distance(probs, pos, pos)
    spread = (0 + 4 + 4 + 4 * math.sqrt(2)) / 4  # mean distance from a token to all four
    torch.testing.assert_close(dist, torch.tensor([0.0, 4.0, spread, 0.6 * spread]))
    blend_entropy = -(0.55 * math.log(0.55) + 3 * 0.15 * math.log(0.15))
    torch.testing.assert_close(attention_entropy(probs), torch.tensor([0.0, 0.0, math.log(4), blend_entropy]))
    stats = analyze_attention([_layer(probs)])
    layer = stats["layers"][0]
    # distance relative to uniform attention: 0 -> local, 0.6 -> mixed, >= 0.85 -> global
    assert layer["roles"] == ["local", "global", "global", "mixed"]
    assert layer["normalized_entropy"][:3] == pytest.approx([0.0, 0.0, 1.0])
    assert head_similarity(torch.stack([eye, eye])[None]) == pytest.approx(1.0)
    json.dumps(stats)  # JSON-ready


def test_analysis_of_a_real_model():
    model = tiny_model("swin_tiny_patch4_window7_224").eval()
    stats = AttentionVisualizer(model).analyze(torch.randn(1, 3, 64, 64))
    assert len(stats["layers"]) == 8
    # Window attention cannot reach further than the window's diagonal (4 tokens of 4 px at stage 1).
    first = stats["layers"][0]
    assert max(first["mean_distance_px"]) < 4 * 4 * math.sqrt(2)
    assert all(len(s["entropy"]) == s["heads"] for s in stats["layers"])


# ----------------------------------------------------------------------------- digits sanity checks
@pytest.fixture(scope="module")
def digits(tmp_path_factory, _one_thread):
    """A tiny ViT (2x2 patches on 8x8 digits) trained for a few seconds, its re-randomised twin,
    96 test images with ink / blank-background masks, a checkpoint and a PNG of one digit."""
    from vitlab import save_checkpoint
    from vitlab.datasets import DigitsDataset

    torch.manual_seed(0)
    train, test = DigitsDataset("train"), DigitsDataset("test")
    x_train, y_train = normalize(train.images, train.mean, train.std), torch.tensor(train.targets)
    model = build_model("vit_tiny_patch16_224", image_size=8, patch_size=2, in_channels=1, num_classes=10,
                        dim=32, depth=2, heads=2, mlp_dim=64)
    epochs, batch = 30, 128
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=5e-3, pct_start=0.15,
                                                total_steps=epochs * math.ceil(len(x_train) / batch))
    gen = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(epochs):  # about 3 s on one thread (see _one_thread)
        for idx in torch.randperm(len(x_train), generator=gen).split(batch):
            loss = F.cross_entropy(model(x_train[idx]), y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    images = test.images[:96]  # (96, 1, 8, 8) in [0, 1], ink high
    x = normalize(images, train.mean, train.std)
    with torch.no_grad():
        predicted = model(normalize(test.images, train.mean, train.std)).argmax(1)
    accuracy = (predicted == torch.tensor(test.targets)).float().mean()
    torch.manual_seed(100)
    randomised = type(model)(model.config).eval()
    out = tmp_path_factory.mktemp("digits")
    model.pretrained_cfg = {**model.pretrained_cfg, "input_size": 8, "mean": train.mean, "std": train.std,
                            "crop_pct": 1.0, "interpolation": "bilinear"}
    ckpt = save_checkpoint(model, out / "ckpt", labels=list(train.classes))
    png = out / "digit.png"
    Image.fromarray((images[0, 0] * 255).round().byte().numpy(), mode="L").save(png)
    return SimpleNamespace(model=model, randomised=randomised, x=x, accuracy=float(accuracy),
                           ink=images[:, 0] > 0.3, blank=F.max_pool2d(images, 3, 1, 1)[:, 0] < 0.05,
                           checkpoint=ckpt, png=png, label=test.targets[0])


SANITY = {
    "rollout": lambda m, x: rollout(m, x),
    "gradcam": lambda m, x: grad_cam(m, x),
    "occlusion": lambda m, x: occlusion(m, x),
    "grad-rollout": lambda m, x: gradient_rollout(m, x),
}


def ink_ratio(maps: torch.Tensor, ink: torch.Tensor, blank: torch.Tensor) -> float:
    """Mass per ink pixel over mass per blank-background pixel; each map's positive part scaled to total 1."""
    mass = maps.clamp(min=0)
    mass = mass / mass.flatten(1).sum(1).clamp(min=1e-12).view(-1, 1, 1)
    return float(mass[ink].mean() / mass[blank].mean())


@pytest.mark.parametrize("method", ["rollout", "gradcam", "occlusion"])
def test_sanity_maps_follow_ink_and_change_with_random_weights(digits, method):
    assert digits.accuracy > 0.8
    trained = SANITY[method](digits.model, digits.x).maps  # (96, 8, 8)
    random = SANITY[method](digits.randomised, digits.x).maps
    # More mass on ink than on blank background.
    ratio = ink_ratio(trained, digits.ink, digits.blank)
    assert ratio > 1.0, f"{method}: ink / background = {ratio:.2f}"
    # Re-randomising the weights changes the maps: rank correlation well below 1.
    rhos = [spearman_correlation(a, b) for a, b in zip(trained, random)]
    rhos = [r for r in rhos if not math.isnan(r)]
    assert len(rhos) > 80 and sum(rhos) / len(rhos) < 0.5, f"{method}: mean Spearman {sum(rhos) / len(rhos):.2f}"


def test_gradient_rollout_is_class_specific(digits):
    a = gradient_rollout(digits.model, digits.x[:8], target=0).maps
    b = gradient_rollout(digits.model, digits.x[:8], target=1).maps
    assert not torch.allclose(a, b)
    assert ink_ratio(SANITY["grad-rollout"](digits.model, digits.x).maps, digits.ink, digits.blank) > 1.0


# ----------------------------------------------------------------------------- plots, CLI, example
def test_plots_are_valid_pngs(tmp_path):
    model = tiny_model("vit_tiny_patch16_224").eval()
    viz = AttentionVisualizer(model)
    x = torch.randn(1, 3, 64, 48)
    viz.plot_attention_maps(viz.generate_attention_maps(x, layers=[1, 2]), save_to=tmp_path / "mean.png")
    viz.plot_attention_maps(viz.generate_attention_maps(x, heads="all"), save_to=tmp_path / "heads.png")
    plot_attention_analysis(viz.analyze(x), save_to=tmp_path / "analysis.png")
    for name in ("mean.png", "heads.png", "analysis.png"):
        assert_png(tmp_path / name)
    import matplotlib

    assert matplotlib.get_backend().lower() == "agg"


def test_cli_explain_writes_pngs_and_json(digits, tmp_path, capsys):
    with torch.no_grad():
        predicted = int(digits.model(digits.x[:1]).argmax())
    for method in ("attention", "rollout", "gradcam", "occlusion", "distance"):
        out = tmp_path / method
        rc = cli_main(["explain", "--checkpoint", str(digits.checkpoint), "--image", str(digits.png),
                       "--method", method, "--target", "3", "--output-dir", str(out)])
        assert rc == 0, capsys.readouterr().err
        stem = method.replace("-", "_")
        assert_png(out / f"{stem}.png")
        record = json.loads((out / f"{stem}.json").read_text())
        assert record["prediction"][0]["index"] == predicted and record["target"] == 3
        if method == "attention":
            assert [layer["layer"] for layer in record["layers"]] == [1, 2]
            for layer in record["layers"]:  # attention to the 4 x 4 patches + to the class token = 1
                assert sum(map(sum, layer["token_map"])) + layer["prefix_attention"] == pytest.approx(1, abs=1e-4)
        if method == "occlusion":
            assert record["patch_size"] == 2 and len(record["score_drop"]) == 4
        if method == "distance":
            assert len(record["layers"]) == 2 and len(record["layers"][0]["mean_distance_px"]) == 2
    rc = cli_main(["explain", "--checkpoint", str(digits.checkpoint), "--image", str(digits.png),
                   "--layers", "7", "--output-dir", str(tmp_path / "bad")])
    assert rc == 2 and "1..2" in capsys.readouterr().err


def test_attention_analysis_example(digits, tmp_path, monkeypatch, capsys):
    out = tmp_path / "example"
    monkeypatch.setattr(sys, "argv", ["attention_analysis.py", "--model_path", str(digits.checkpoint),
                                      "--image_path", str(digits.png), "--output_dir", str(out)])
    runpy.run_path(str(ROOT / "examples" / "attention_analysis.py"), run_name="__main__")
    printed = capsys.readouterr().out
    assert "predicted" in printed and "mean attention distance" in printed
    for name in ("attention", "rollout", "grad_rollout", "gradcam", "occlusion", "saliency", "pca", "distance",
                 "sheet"):
        assert_png(out / f"{name}.png")
    record = json.loads((out / "explain.json").read_text())
    assert set(record["methods"]) == {"attention", "rollout", "grad-rollout", "gradcam", "occlusion", "saliency",
                                      "pca", "distance"}
