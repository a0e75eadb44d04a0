"""Checkpoint I/O, conversion, hub cache, errors, the inference API and the CLI."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import vitlab
from vitlab.cli import main as cli
from vitlab.datasets import EvalTransform
from vitlab.pretrained import imagenet_labels, load_model, read_weights, save_checkpoint

from conftest import tiny_model

TINY = dict(image_size=32, patch_size=8, dim=24, depth=2, heads=3, mlp_dim=48)


def tiny_vit(num_classes=4, **kw):
    return vitlab.create_model("vit_tiny_patch16_224", num_classes=num_classes, **{**TINY, **kw}).eval()


# ---------------------------------------------------------------- registry errors
def test_unknown_model_name_suggests_close_matches():
    with pytest.raises(ValueError, match="Did you mean 'vit_base_patch16_224'"):
        vitlab.create_model("vit_bsae_patch16_224")


def test_unknown_override_suggests_close_matches():
    with pytest.raises(ValueError, match="unknown option 'dept'.*Did you mean 'depth'"):
        vitlab.create_model("vit_tiny_patch16_224", dept=3)


def test_bad_config_values_are_explained():
    with pytest.raises(ValueError, match="divisible by heads"):
        vitlab.ViTConfig(dim=100, heads=3)
    with pytest.raises(ValueError, match="pool='cls' needs class_token=True"):
        vitlab.ViTConfig(class_token=False)
    with pytest.raises(ValueError, match="drop_path must be in"):
        vitlab.ViTConfig(drop_path=1.5)


def test_wrong_channels_and_too_small_images():
    model = tiny_vit()
    with pytest.raises(ValueError, match="expected 3 input channel"):
        model(torch.randn(1, 1, 32, 32))
    with pytest.raises(ValueError, match="smaller than one patch"):
        model(torch.randn(1, 3, 4, 32))
    strict = tiny_vit(pad_input=False)
    with pytest.raises(ValueError, match="not a multiple of the patch size"):
        strict(torch.randn(1, 3, 30, 32))
    assert model(torch.randn(1, 3, 30, 37)).shape == (1, 4)  # padded


# ------------------------------------------------------------ checkpoint files
def test_checkpoint_of_another_architecture_lists_keys(tmp_path):
    save_checkpoint(tiny_vit(depth=3), tmp_path / "deeper")
    with pytest.raises(ValueError, match=r"does not fit .*unexpected keys: blocks\.2\."):
        vitlab.create_model("vit_tiny_patch16_224", pretrained=tmp_path / "deeper", **TINY)
    save_checkpoint(tiny_vit(dim=30, heads=3, mlp_dim=48), tmp_path / "wider")
    with pytest.raises(ValueError, match=r"shape mismatches: blocks\.0\.attn\.proj\.bias \(30,\) vs model \(24,\)"):
        vitlab.create_model("vit_tiny_patch16_224", pretrained=tmp_path / "wider", **TINY)
    save_checkpoint(tiny_model("deit_tiny_distilled_patch16_224", **TINY), tmp_path / "deit")
    with pytest.raises(ValueError, match="unexpected keys: dist_token"):
        vitlab.create_model("vit_tiny_patch16_224", pretrained=tmp_path / "deit", **TINY)


def test_truncated_and_missing_files(tmp_path):
    file = save_checkpoint(tiny_vit(), tmp_path / "m.safetensors")
    data = file.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_model(tmp_path / "cut.safetensors")
    torch.save(tiny_vit().state_dict(), tmp_path / "m.pth")
    (tmp_path / "cut.pth").write_bytes((tmp_path / "m.pth").read_bytes()[:1000])
    with pytest.raises(ValueError, match="not a readable PyTorch checkpoint"):
        read_weights(tmp_path / "cut.pth")
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_model(tmp_path / "nope.safetensors")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no weights file"):
        read_weights(tmp_path / "empty")


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_pickle_with_code_is_refused(tmp_path):
    torch.save({"pos_embed": torch.zeros(1), "evil": _Evil()}, tmp_path / "evil.pth")
    with pytest.raises(ValueError, match="only unpickles plain"):
        read_weights(tmp_path / "evil.pth")


def test_pth_and_bin_checkpoints_load(tmp_path):
    model = tiny_vit()
    torch.save({"model": model.state_dict(), "epoch": 3}, tmp_path / "train.pth")
    torch.save({f"module.{k}": v for k, v in model.state_dict().items()}, tmp_path / "ddp.bin")
    x = torch.randn(1, 3, 32, 32)
    for f in ("train.pth", "ddp.bin"):
        loaded = vitlab.create_model("vit_tiny_patch16_224", pretrained=tmp_path / f, num_classes=4, **TINY).eval()
        assert torch.equal(loaded(x), model(x)), f


def test_head_of_other_size_is_reinitialised_with_warning(tmp_path):
    model = tiny_vit(num_classes=4)
    save_checkpoint(model, tmp_path / "ck")
    with pytest.warns(UserWarning, match="classifier head not loaded"):
        other = vitlab.create_model("vit_tiny_patch16_224", pretrained=tmp_path / "ck", num_classes=9, **TINY)
    assert other.head.out_features == 9
    assert torch.equal(other.blocks[1].mlp.fc2.weight, model.blocks[1].mlp.fc2.weight)
    # Without num_classes a vitlab checkpoint keeps its own head size.
    same = vitlab.create_model("vit_tiny_patch16_224", pretrained=tmp_path / "ck", **TINY)
    assert torch.equal(same.head.weight, model.head.weight)


def test_checkpoint_keeps_config_and_labels(tmp_path):
    model = tiny_vit(num_classes=3, drop_path=0.1)
    save_checkpoint(model, tmp_path / "ck", labels=["cat", "dog", "owl"])
    meta = json.loads((tmp_path / "ck" / "config.json").read_text())["vitlab"]
    assert meta["config"]["drop_path"] == 0.1 and meta["labels"] == ["cat", "dog", "owl"]
    loaded = load_model(tmp_path / "ck")
    assert loaded.config == model.config and loaded.labels == ["cat", "dog", "owl"]


# ------------------------------------------------------------------------ hub
def _fake_hub_cache(cache: Path, repo: str, files: dict[str, bytes]) -> None:
    """The huggingface_hub cache layout: models--org--name/{refs/main, snapshots/<rev>/...}."""
    root = cache / ("models--" + repo.replace("/", "--"))
    rev = "0123456789abcdef0123456789abcdef01234567"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(rev)
    snap = root / "snapshots" / rev
    snap.mkdir(parents=True)
    for name, data in files.items():
        (snap / name).write_bytes(data)


def test_hub_id_from_local_cache_offline(tmp_path, monkeypatch):
    pytest.importorskip("huggingface_hub")
    from huggingface_hub import constants

    model = tiny_vit()
    file = save_checkpoint(model, tmp_path / "w.safetensors")
    cache = tmp_path / "cache"
    _fake_hub_cache(cache, "someone/tiny-vit", {"model.safetensors": file.read_bytes()})
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    loaded = vitlab.create_model("vit_tiny_patch16_224", pretrained="someone/tiny-vit", **TINY).eval()
    x = torch.randn(1, 3, 32, 32)
    assert torch.equal(loaded(x), model(x))
    with pytest.raises(FileNotFoundError, match="not in the local Hugging Face cache.*offline"):
        vitlab.create_model("vit_tiny_patch16_224", pretrained="someone/not-cached", **TINY)
    with pytest.raises(FileNotFoundError, match="not in the local Hugging Face cache"):
        vitlab.create_model("vit_tiny_patch16_224", pretrained=True)  # timm/... default id, not cached


def test_pretrained_true_without_default_weights():
    with pytest.raises(ValueError, match="no default pretrained weights"):
        vitlab.create_model("vit_huge_patch14_224", pretrained=True)


# ------------------------------------------------------------------ inference
def test_imagenet_labels_ship_with_the_package():
    labels = imagenet_labels()
    assert len(labels) == 1000
    assert labels[0].startswith("tench") and labels[207] == "golden retriever"


def test_classifier_predict_inputs_agree(tmp_path):
    model = tiny_vit(num_classes=3)
    save_checkpoint(model, tmp_path / "ck", labels=["a", "b", "c"])
    clf = vitlab.ViTClassifier.from_pretrained(tmp_path / "ck")
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, size=(40, 50, 3), dtype=np.uint8)
    Image.fromarray(arr).save(tmp_path / "img.png")
    by_path = clf.predict(tmp_path / "img.png", top_k=3)
    by_pil = clf.predict(Image.fromarray(arr))
    by_np = clf.predict(arr)
    by_tensor = clf.predict(torch.from_numpy(arr).permute(2, 0, 1))
    for r in (by_pil, by_np, by_tensor):
        assert r["index"] == by_path["index"]
        assert r["confidence"] == pytest.approx(by_path["confidence"], abs=1e-6)
    assert by_path["class"] == ["a", "b", "c"][by_path["index"]]
    assert [t["index"] for t in by_path["top_k"]][0] == by_path["index"] and len(by_path["top_k"]) == 3
    assert sum(t["confidence"] for t in by_path["top_k"]) == pytest.approx(1.0, abs=1e-5)
    # The preprocessing is the checkpoint's: resize to 32/0.9 = 35, crop 32, mean/std 0.5.
    x = torch.from_numpy(arr).permute(2, 0, 1).float().div(255).unsqueeze(0)
    x = torch.nn.functional.interpolate(x, size=(35, 44), mode="bicubic", antialias=True).clamp(0, 1)
    x = (x[..., 1:33, 6:38] - 0.5) / 0.5
    probs = model(x).softmax(-1)[0]
    assert by_path["confidence"] == pytest.approx(probs.max().item(), abs=1e-4)
    batch = clf.predict([arr, arr[::-1].copy()])
    assert isinstance(batch, list) and len(batch) == 2 and batch[0]["index"] == by_path["index"]


def test_eval_transform_grey_and_errors():
    t = EvalTransform(32, crop_pct=1.0, mean=(0.5,) * 3, std=(0.5,) * 3)
    grey = np.full((20, 20), 255, dtype=np.uint8)
    out = t(grey)
    assert out.shape == (1, 3, 32, 32) and torch.allclose(out, torch.ones_like(out))
    with pytest.raises(TypeError, match="unsupported image type"):
        t(42)
    with pytest.raises(ValueError, match="not an image"):
        (Path("/tmp") / "vitlab_bad.png").write_bytes(b"not a png")
        t("/tmp/vitlab_bad.png")


# ------------------------------------------------------------------------ CLI
def test_cli_models_table(capsys):
    assert cli(["models", "vit_base_patch16_224"]) == 0
    out = capsys.readouterr().out
    assert "86,567,656" in out and "224x224" in out
    assert "35.1" in out  # GFLOPs with attention counted (17.56 GMACs)
    # Every family can be counted (CaiT passes its class token straight into a block).
    assert cli(["models", "cait_xxs24_224"]) == 0
    assert "11,956,264" in capsys.readouterr().out
    assert cli(["models", "no_such_*"]) == 1


def test_cli_convert_and_predict(tmp_path, capsys):
    from safetensors.torch import save_file

    model = tiny_vit(num_classes=1000)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "timm.safetensors"))
    # A timm file with a non-registered size needs the model name; convert infers nothing wrong.
    assert cli(["convert", str(tmp_path / "timm.safetensors"), str(tmp_path / "out")]) == 2
    assert "no registered model has this architecture" in capsys.readouterr().err
    Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8)).save(tmp_path / "x.png")
    tiny_ckpt = tmp_path / "tiny_ck"
    save_checkpoint(model, tiny_ckpt)
    assert cli(["predict", "--checkpoint", str(tiny_ckpt), str(tmp_path / "x.png"), "--json", "--top-k", "2"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res[0]["class"] in imagenet_labels() and len(res[0]["top_k"]) == 2
    assert cli(["predict", "--model", "vit_tiny_patch16_224", str(tmp_path / "x.png")]) == 2
    assert "not in the local Hugging Face cache" in capsys.readouterr().err


def test_cli_convert_registered_architecture(tmp_path, capsys):
    """A real-size timm checkpoint converts with the architecture inferred from its shapes."""
    from safetensors.torch import save_file

    with torch.device("meta"):
        shapes = vitlab.create_model("deit_tiny_distilled_patch16_224").state_dict()
    sd = {k: torch.randn(v.shape) * 0.02 for k, v in shapes.items()}
    save_file(sd, str(tmp_path / "deit.safetensors"))
    assert cli(["convert", str(tmp_path / "deit.safetensors"), str(tmp_path / "conv.safetensors")]) == 0
    model = load_model(tmp_path / "conv.safetensors")
    assert model.model_name == "deit_tiny_distilled_patch16_224"
    assert torch.equal(model.dist_token, sd["dist_token"])
