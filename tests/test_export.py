"""ONNX export: every family exports, runs in onnxruntime and matches PyTorch."""

from __future__ import annotations

import sys

import pytest
import torch

from vitlab.cli import main
from vitlab.deploy import OnnxRuntimeModel, check_onnx, export_model, export_onnx
from vitlab.pretrained import save_checkpoint

from conftest import tiny_model


# One variant per family; the test models keep each family's structure at a small size
# (tiny_overrides): window shifts and masks, spatial reduction, class attention, two branches.
FAMILY_VARIANTS = [
    "vit_tiny_patch16_224",
    "deit_tiny_patch16_224",
    "deit_tiny_distilled_patch16_224",
    "swin_tiny_patch4_window7_224",
    "pvt_v2_b0",
    "pvt_tiny",
    "cait_xxs24_224",
    "crossvit_9_240",
]


@pytest.mark.parametrize("name", FAMILY_VARIANTS)
def test_onnx_export_matches_pytorch(name, tmp_path):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    model = tiny_model(name).eval()
    res = export_model(model, tmp_path / f"{name}.onnx", dynamic_batch=True)
    assert res.path.exists() and res.format == "onnx"
    assert res.max_abs_diff is not None and res.max_abs_diff < 1e-4, res.max_abs_diff


def test_dynamic_batch_accepts_other_batch_sizes(tmp_path):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    model = tiny_model("vit_tiny_patch16_224").eval()
    path = export_onnx(model, tmp_path / "m.onnx", batch_size=2, dynamic_batch=True)
    run = OnnxRuntimeModel(path)
    h, w = model.config.image_size
    for b in (1, 5):
        x = torch.randn(b, 3, h, w)
        with torch.no_grad():
            torch.testing.assert_close(run(x), model(x), atol=1e-4, rtol=1e-4)


def test_fixed_batch_export_checks_at_its_batch(tmp_path):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    model = tiny_model("swin_tiny_patch4_window7_224").eval()
    path = export_onnx(model, tmp_path / "m.onnx", batch_size=3)
    assert check_onnx(model, path, batch_size=3) < 1e-4


def test_unknown_format_and_missing_onnxruntime(tmp_path, monkeypatch):
    model = tiny_model("vit_tiny_patch16_224")
    with pytest.raises(ValueError, match="onnx"):
        export_model(model, tmp_path / "m.tflite", format="tflite")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(ImportError, match=r"vitlab\[onnx\]"):
        OnnxRuntimeModel(tmp_path / "m.onnx")


def test_cli_export_prints_the_difference(tmp_path, capsys):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    model = tiny_model("deit_tiny_patch16_224", num_classes=7)
    ckpt = save_checkpoint(model, tmp_path / "ckpt")
    out = tmp_path / "deit.onnx"
    assert main(["export", "--checkpoint", str(ckpt), "--format", "onnx", "--output", str(out), "--dynamic-batch"]) == 0
    text = capsys.readouterr().out
    assert out.exists() and "max abs logit difference" in text
    diff = float(text.rsplit("difference", 1)[1].split()[0])
    assert diff < 1e-4
