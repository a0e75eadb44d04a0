"""Segmentation inference: whole image, sliding window, multi-scale + flip TTA."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import tiny_model
from vitlab.tasks.segmentation import AllMlpHead, Segmenter, feature_channels_strides
from vitlab.tasks.segmentation.inference import predict_sliding, predict_tta, predict_whole

K = 3


def _pointwise() -> nn.Module:
    """Per-pixel (1x1 conv): translation- and flip-equivariant."""
    torch.manual_seed(0)
    return nn.Conv2d(3, K, 1).eval()


class _Ramp(nn.Module):
    """Adds a left-to-right ramp to the logits: not flip-equivariant."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ramp = torch.linspace(0, 1, x.shape[-1])
        return x[:, :K] + ramp


class _WindowMean(nn.Module):
    """Every pixel gets the mean of its window: the output depends on the window."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :1].mean(dim=(2, 3), keepdim=True).expand(-1, 1, *x.shape[-2:])


def _segmenter() -> Segmenter:
    backbone = tiny_model("pvt_v2_b0", num_classes=0)
    ch, st = feature_channels_strides(backbone, [0, 1, 2, 3])
    return Segmenter(backbone, AllMlpHead(ch, st, K, decoder_dim=8), [0, 1, 2, 3]).eval()


def test_sliding_equals_whole_when_the_image_fits_one_window() -> None:
    model = _segmenter()
    x = torch.randn(2, 3, 50, 38)
    whole = predict_whole(model, x)
    assert whole.shape == (2, K, 50, 38)
    torch.testing.assert_close(predict_sliding(model, x, window=(64, 48), stride=(32, 32)), whole)
    torch.testing.assert_close(predict_sliding(model, x, window=(50, 38), stride=10), whole)


def test_sliding_stitches_windows_in_place() -> None:
    """A per-pixel model gives the same logits however the image is cut."""
    model = _pointwise()
    x = torch.randn(1, 3, 37, 29)
    with torch.no_grad():
        ref = model(x)
    torch.testing.assert_close(predict_sliding(model, x, window=16, stride=11), ref)
    torch.testing.assert_close(predict_sliding(model, x, window=(20, 8), stride=(7, 5)), ref)


def test_sliding_averages_overlaps() -> None:
    """Width 10, window 6, stride 4 -> windows at 0 and 4; columns 4-5 are covered twice."""
    x = torch.zeros(1, 3, 1, 10)
    x[0, 0, 0] = torch.arange(10.0)
    out = predict_sliding(_WindowMean(), x, window=(1, 6), stride=(1, 4))
    left, right = sum(range(6)) / 6, sum(range(4, 10)) / 6
    expected = torch.tensor([left] * 4 + [(left + right) / 2] * 2 + [right] * 4)
    torch.testing.assert_close(out[0, 0, 0], expected)


def test_flip_tta_of_a_flip_equivariant_model_equals_plain() -> None:
    model = _pointwise()
    x = torch.randn(2, 3, 21, 17)
    plain = predict_whole(model, x)
    torch.testing.assert_close(predict_tta(model, x, scales=(1.0,), flip=True), plain)
    torch.testing.assert_close(predict_tta(model, x, scales=(1.0,), flip=True, window=12, stride=7), plain)


def test_flip_tta_of_a_non_equivariant_model_is_the_mirrored_average() -> None:
    model = _Ramp()
    x = torch.randn(1, 3, 5, 7)
    plain = predict_whole(model, x)
    tta = predict_tta(model, x, scales=(1.0,), flip=True)
    assert not torch.allclose(tta, plain)
    # mirrored pass, mirrored back: x + flip(ramp); averaged with x + ramp -> x + 0.5 everywhere
    torch.testing.assert_close(tta, x[:, :K] + 0.5)


def test_multiscale_tta_is_the_mean_over_scales_at_input_size() -> None:
    model = _Ramp()
    x = torch.randn(1, 3, 12, 16)
    out = predict_tta(model, x, scales=(0.5, 1.5), flip=False)
    assert out.shape == (1, K, 12, 16)
    passes = []
    for s, size in ((0.5, (6, 8)), (1.5, (18, 24))):
        xs = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        y = xs[:, :K] + torch.linspace(0, 1, size[1])
        passes.append(F.interpolate(y, size=(12, 16), mode="bilinear", align_corners=False))
    torch.testing.assert_close(out, (passes[0] + passes[1]) / 2)


def test_stride_4_model_logits_come_back_at_input_size() -> None:
    model = _segmenter()
    x = torch.randn(1, 3, 70, 90)
    out = predict_sliding(model, x, window=(64, 48), stride=(40, 30))
    assert out.shape == (1, K, 70, 90)
    with pytest.raises(ValueError, match="window and stride must be positive"):
        predict_sliding(model, x, window=0, stride=4)
    with pytest.raises(ValueError, match=r"expected images \(B, C, H, W\)"):
        predict_whole(model, x[0])
