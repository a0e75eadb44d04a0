"""Artifact metrics of :mod:`vitlab.evaluation.registers` (Darcet et al., "Vision Transformers Need Registers"):
outlier norms on a constructed case with a known answer, the class token's attention shares by hand, the plot."""

from __future__ import annotations

import math

import pytest
import torch

from vitlab.components import TokenGrid, capture_attention
from vitlab.components.layout import Segment
from vitlab.evaluation.registers import (
    attention_shares, cls_attention_stats, outlier_stats, outlier_threshold, plot_register_comparison,
    register_report, report_table, token_norms,
)
from vitlab.models import VisionTransformer

TINY = dict(image_size=16, patch_size=4, in_channels=1, num_classes=3, dim=16, depth=2, heads=2, mlp_dim=32)


def _model(registers: int, seed: int = 0) -> VisionTransformer:
    torch.manual_seed(seed)
    return VisionTransformer(**TINY, reg_tokens=registers).eval()


def test_outlier_stats_find_the_known_outliers():
    norms = 1 + 0.01 * torch.linspace(-1, 1, 90)  # typical tokens, norm ~1
    norms = torch.cat([norms, torch.full((10,), 10.0)])  # a tenth at ten times the norm
    robust = outlier_stats(norms)
    assert robust["outliers"] == 10 and robust["outlier_share"] == pytest.approx(0.1)
    assert robust["median"] == pytest.approx(1.0, abs=0.01) and robust["max_over_median"] == pytest.approx(10, rel=0.01)
    assert 1.0 < robust["threshold"] < 1.1  # median + 3 * 1.4826 * MAD (MAD ~0.006)
    # mean + 3 std is pulled up by the outliers themselves: it reaches their norm and misses them
    assert outlier_threshold(norms, "std") > 10 and outlier_stats(norms, "std")["outliers"] == 0
    assert outlier_stats(norms, 5.0)["outliers"] == 10 and outlier_stats(norms, 5.0)["threshold"] == 5.0
    with pytest.raises(ValueError, match="threshold must be 'mad', 'std' or a number"):
        outlier_threshold(norms, "iqr")


def test_token_norms_flag_the_one_bright_patch_and_skip_the_registers():
    model = _model(4)
    x = torch.randn(1, 1, 16, 16, generator=torch.Generator().manual_seed(0))  # typical patches: some spread
    x[..., 8:12, 4:8] = 50.0  # patch (row 2, column 1) of the 4x4 grid, index 9: an outlier token
    norms = token_norms(model, x)
    assert norms.patch.shape == (1, 16) and norms.prefix_names == ["cls", "reg0", "reg1", "reg2", "reg3"]
    with torch.no_grad():  # the same norms by hand: the last block's map, before the final norm
        ref = model.forward_intermediates(x, indices=[-1], intermediates_only=True)[0]  # (1, C, 4, 4)
    torch.testing.assert_close(norms.patch, ref.flatten(2).norm(dim=1))
    stats = outlier_stats(norms.patch)
    assert stats["outliers"] == 1 and int(norms.patch.argmax()) == 9 and stats["max_over_median"] > 5
    assert outlier_stats(norms.patch, "std")["outliers"] == 1
    assert norms.prefix.shape == (1, 5) and norms.grid == (4, 4) and norms.label == "block 2"


def test_attention_shares_equal_a_hand_computation():
    grid = TokenGrid((2, 2), (4.0, 4.0))
    segs = (Segment(("cls", 0)), Segment(("reg0", 0)), Segment(("reg1", 0)), Segment(("grid", 0), grid))
    row_h0 = torch.tensor([0.10, 0.20, 0.10, 0.40, 0.10, 0.05, 0.05])
    row_h1 = torch.tensor([0.30, 0.00, 0.10, 0.20, 0.20, 0.10, 0.10])
    probs = torch.full((1, 2, 7, 7), 1 / 7)
    probs[0, 0, 0], probs[0, 1, 0] = row_h0, row_h1
    out = attention_shares(probs, segs, segs, "cls", top_fraction=0.25)
    # head mean: cls 0.2, reg0 0.1, reg1 0.1, patches 0.3 0.15 0.075 0.075
    assert out["to_self"] == pytest.approx(0.2) and out["to_registers"] == pytest.approx(0.2)
    assert out["to_patches"] == pytest.approx(0.6) and out["to_other_prefix"] == pytest.approx(0.0)
    assert out["top_patches"] == 1 and out["top_mass"] == pytest.approx(0.3 / 0.6)
    p = torch.tensor([0.5, 0.25, 0.125, 0.125])
    assert out["entropy"] == pytest.approx(float(-(p * p.log()).sum()))
    assert out["entropy_ratio"] == pytest.approx(out["entropy"] / math.log(4))
    torch.testing.assert_close(out["patch_map"], torch.tensor([[[0.3, 0.15], [0.075, 0.075]]]))
    reg = attention_shares(probs, segs, segs, "reg0")  # a register asking: the class token is "other prefix"
    assert reg["to_self"] == pytest.approx(1 / 7) and reg["to_other_prefix"] == pytest.approx(1 / 7)
    with pytest.raises(ValueError, match="no query token 'dist'"):
        attention_shares(probs, segs, segs, "dist")


def test_cls_attention_to_registers_equals_the_captured_attention():
    model = _model(4)
    x = torch.randn(3, 1, 16, 16)
    with torch.no_grad(), capture_attention(model) as cap:
        model(x)
    probs = cap.records[-1].probs.mean(1)  # (B, 1 + 4 + 16, 1 + 4 + 16), heads averaged
    stats = cls_attention_stats(model, x)
    assert stats["to_registers"] == pytest.approx(float(probs[:, 0, 1:5].sum(-1).mean()), abs=1e-6)
    assert stats["to_patches"] == pytest.approx(float(probs[:, 0, 5:].sum(-1).mean()), abs=1e-6)
    assert stats["to_self"] == pytest.approx(float(probs[:, 0, 0].mean()), abs=1e-6)
    torch.testing.assert_close(stats["patch_map"], probs[:, 0, 5:].reshape(3, 4, 4))
    plain = cls_attention_stats(_model(0), x)
    assert plain["to_registers"] == 0.0 and plain["to_self"] + plain["to_patches"] == pytest.approx(1.0)


def test_comparison_plot_has_labelled_axes_legends_and_a_title(tmp_path):
    x = torch.randn(2, 1, 16, 16)
    reports = [register_report(_model(0), x, name="plain"), register_report(_model(4), x, name="registers")]
    assert reports[1].num_registers == 4 and reports[1].to_dict()["cls_attention"]["to_registers"] > 0
    assert "| plain | 0 |" in report_table(reports)
    fig = plot_register_comparison(reports, images=x)
    assert fig._suptitle is not None and fig._suptitle.get_text()
    shown = [ax for ax in fig.axes if ax.axison and ax.get_label() != "<colorbar>"]
    assert len(shown) == 5  # histogram, bar chart, the image, two attention maps
    for ax in shown:
        assert ax.get_xlabel() and ax.get_ylabel() and ax.get_title(), ax.get_title()
    hist, bars = shown[0], shown[1]
    hist_labels = [t.get_text() for t in hist.get_legend().get_texts()]
    assert any("plain" in t for t in hist_labels) and any("registers threshold" in t for t in hist_labels)
    assert [t.get_text() for t in bars.get_legend().get_texts()] == ["plain", "registers"]
    path = plot_register_comparison(reports, save_to=tmp_path / "cmp.png")
    assert path.is_file() and path.stat().st_size > 1000
