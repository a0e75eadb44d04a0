"""Issue 10 (part 2): an exported ONNX file carries its preprocessing and class names in
``metadata_props`` (read back here with onnx itself)."""

from __future__ import annotations

import json

import pytest

import vitlab
from vitlab.cli import main as cli
from vitlab.pretrained import save_checkpoint



def onnx_module():
    """``onnx``, or a skip of the calling test."""
    return pytest.importorskip("onnx")



def test_exported_onnx_has_preprocessing_and_labels(tmp_path, capsys):
    onnx_module()  # the export itself needs onnx
    model = vitlab.create_model("vit_tiny_patch16_224", num_classes=3, in_channels=1, image_size=16, patch_size=4,
                                dim=24, depth=1, heads=3, mlp_dim=48).eval()
    model.pretrained_cfg = {**model.pretrained_cfg, "input_size": 16, "mean": (0.305,), "std": (0.376,),
                            "crop_pct": 1.0, "interpolation": "bilinear"}
    save_checkpoint(model, tmp_path / "ck", labels=["zero", "one", "two"])
    assert cli(["export", "--checkpoint", str(tmp_path / "ck"), "--output", str(tmp_path / "m.onnx"), "--no-check"]) == 0
    props = {p.key: p.value for p in onnx_module().load(str(tmp_path / "m.onnx")).metadata_props}
    assert json.loads(props["labels"]) == ["zero", "one", "two"]
    assert json.loads(props["mean"]) == [0.305] and json.loads(props["std"]) == [0.376]
    assert json.loads(props["input_size"]) == [1, 16, 16]
    assert json.loads(props["crop_pct"]) == 1.0 and json.loads(props["interpolation"]) == "bilinear"
    assert json.loads(props["model_name"]) == "vit_tiny_patch16_224"


def test_imagenet_model_gets_imagenet_labels_and_three_channel_stats(tmp_path):
    onnx_module()  # the export itself needs onnx
    from vitlab.deploy import export_onnx, read_onnx_metadata
    from vitlab.pretrained import imagenet_labels

    model = vitlab.create_model("vit_tiny_patch16_224", image_size=32, patch_size=16, dim=24, depth=1, heads=3,
                                mlp_dim=48).eval()
    export_onnx(model, tmp_path / "m.onnx")
    meta = read_onnx_metadata(tmp_path / "m.onnx")
    assert meta["labels"] == imagenet_labels()
    assert meta["mean"] == list(model.pretrained_cfg["mean"]) and meta["std"] == list(model.pretrained_cfg["std"])
    assert meta["input_size"] == [3, 32, 32]
