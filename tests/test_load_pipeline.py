"""One loader and one pipeline: every task's checkpoint comes back through ``vitlab.load`` as the
model that was saved, and ``vitlab.pipeline`` on a file, a PIL image or an array gives that
model's own outputs, preprocessed as the checkpoint records."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import vitlab
from optional import needs
from vitlab.pretrained.io import read_weights, save_checkpoint
from vitlab.tasks import checkpoint_task

needs_detection_extra = needs("scipy", "pycocotools", extra="pip install 'vitlab[detection]'")
needs_clip = needs("tokenizers", "sklearn.datasets", extra="pip install 'vitlab[clip,digits]'")


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def _grey_png(path: Path, h: int, w: int, seed: int = 0) -> np.ndarray:
    arr = (np.random.default_rng(seed).random((h, w)) * 255).astype(np.uint8)
    Image.fromarray(arr).save(path)
    return arr


def test_classifier_round_trip(tmp_path: Path) -> None:
    from vitlab.deploy import ViTClassifier

    torch.manual_seed(0)
    model = vitlab.create_model("vit_tiny_patch16_224", num_classes=3, image_size=16, patch_size=4, dim=16, depth=1,
                                heads=2, mlp_dim=32, in_channels=1)
    model.pretrained_cfg = {"input_size": (1, 16, 16), "mean": (0.5,), "std": (0.25,), "crop_pct": 1.0,
                            "interpolation": "bilinear"}
    save_checkpoint(model, tmp_path / "ck", labels=["a", "b", "c"])
    assert read_weights(tmp_path / "ck").vitlab_config["task"] == "classification"
    loaded = vitlab.load(tmp_path / "ck")
    _same_weights(model, loaded)
    arr = _grey_png(tmp_path / "x.png", 20, 24)
    expected = ViTClassifier(model.eval(), labels=["a", "b", "c"]).predict(str(tmp_path / "x.png"), top_k=2)
    pipe = vitlab.pipeline(tmp_path / "ck", top_k=2)
    for item in (str(tmp_path / "x.png"), Image.fromarray(arr), arr):
        got = pipe(item)
        assert got["class"] == expected["class"] and got["confidence"] == pytest.approx(expected["confidence"], abs=1e-6)
        assert [t["class"] for t in got["top_k"]] == [t["class"] for t in expected["top_k"]]


@needs_detection_extra
def test_detector_round_trip(tmp_path: Path) -> None:
    from test_detection_task import _tiny_checkpoint
    from vitlab.tasks.detection.inference import detect, load_detector

    ck, model, _ = _tiny_checkpoint(tmp_path)
    assert checkpoint_task(ck) == "detection"
    loaded = vitlab.load(ck)
    _same_weights(model, loaded)
    arr = _grey_png(tmp_path / "scene.png", 48, 80)
    got = vitlab.pipeline(ck, score_threshold=0.0, top_k=3)(Image.fromarray(arr))
    pil = Image.fromarray(arr).resize((32, 32), Image.BILINEAR)
    x = torch.from_numpy(np.asarray(pil, dtype=np.float32) / 255.0)[None, None]
    expected = detect(load_detector(ck), x, 0.0, 3, image_sizes=[(48, 80)])[0]
    assert (got["width"], got["height"]) == (80, 48)
    assert torch.tensor([d["box"] for d in got["detections"]]) == pytest.approx(expected["boxes"], abs=1e-4)
    assert [d["score"] for d in got["detections"]] == pytest.approx(expected["scores"].tolist(), abs=1e-6)


def test_segmenter_round_trip(tmp_path: Path) -> None:
    from vitlab.tasks.segmentation.apply import load_for_model, segment
    from vitlab.tasks.segmentation.model import build_segmenter, load_segmenter

    torch.manual_seed(0)
    model = build_segmenter("vit_tiny_patch16_224", 3, head="setr_naive", in_channels=1, image_size=16,
                            backbone_overrides=dict(patch_size=4, dim=16, depth=1, heads=2, mlp_dim=32), channels=8)
    model.pretrained_cfg = {"input_size": [1, 16, 16], "mean": [0.5], "std": [0.25]}
    save_checkpoint(model.eval(), tmp_path / "seg.safetensors", labels=["bg", "x", "y"])
    assert checkpoint_task(tmp_path / "seg.safetensors") == "segmentation"
    loaded = vitlab.load(tmp_path / "seg.safetensors")
    _same_weights(model, loaded)
    _grey_png(tmp_path / "x.png", 16, 16)
    expected = segment(load_segmenter(tmp_path / "seg.safetensors")[0], load_for_model(tmp_path / "x.png", 1)).argmax(1)[0]
    got = vitlab.pipeline(tmp_path / "seg.safetensors")(str(tmp_path / "x.png"))
    assert torch.equal(torch.tensor(got["mask"]), expected)
    assert sum(got["classes"].values()) == pytest.approx(1.0)


@needs_clip
def test_clip_round_trip(tmp_path: Path) -> None:
    from test_clip_task import TINY
    from vitlab.cli import main
    from vitlab.tasks.clip.convert import load_clip_checkpoint
    from vitlab.tasks.clip.inference import load_images, zero_shot_predict

    out = tmp_path / "clip"
    assert main(["train", "--task", "clip", "--epochs", "1", "--no-progress", "--output-dir", str(out), *TINY[3:]]) == 0
    assert checkpoint_task(out) == "clip"
    loaded = vitlab.load(out)
    reference, tokenizer = load_clip_checkpoint(out)
    _same_weights(reference, loaded)
    _grey_png(tmp_path / "x.png", 16, 16)
    labels = ["zero", "one", "two"]
    probs = zero_shot_predict(reference, tokenizer, load_images(reference, [tmp_path / "x.png"]), labels)[0]
    got = vitlab.pipeline(out, labels=labels)(str(tmp_path / "x.png"))
    assert got["class"] == labels[int(probs.argmax())]
    assert got["confidence"] == pytest.approx(float(probs.max()), abs=1e-6)


def test_mae_round_trip(tmp_path: Path) -> None:
    from test_mae_task import TINY_MAE
    from vitlab.cli import main
    from vitlab.tasks.mae.model import MAE
    from vitlab.tasks.mae.task import MAE_DIGITS_RECIPE, MAETask
    from vitlab.training import build_trainer, load_config
    from vitlab.training.checkpoint import latest_checkpoint

    cfg = load_config(None, TINY_MAE + ["epochs=1", f"output_dir={tmp_path / 'mae'}"], base=MAE_DIGITS_RECIPE)
    trainer = build_trainer(cfg, log=lambda s: None)
    trainer.fit()
    ck = latest_checkpoint(tmp_path / "mae")
    assert checkpoint_task(ck) == "mae"
    loaded = vitlab.load(ck)
    assert isinstance(loaded, MAE)
    _same_weights(trainer.model, loaded)
    # the pipeline scores an image as the run's evaluation does: same normalisation, same fixed masks
    arr = _grey_png(tmp_path / "x.png", 8, 8)
    got = vitlab.pipeline(ck)(str(tmp_path / "x.png"))
    task = MAETask.for_model(trainer.model, trainer.task.mean, trainer.task.std)
    task.eval_metrics()
    x = torch.nn.functional.interpolate(torch.from_numpy(arr / 255.0).float()[None, None], size=loaded.image_size,
                                        mode="bilinear", align_corners=False, antialias=True)
    batch = task.prepare(x, torch.device("cpu"), None, None)
    with torch.no_grad():
        loss, _, mask = trainer.model.eval()(*batch.inputs)
    assert got["loss"] == pytest.approx(float(loss), rel=1e-5)
    assert got["mask_ratio"] == pytest.approx(float(mask.float().mean())) == pytest.approx(cfg.mae.mask_ratio, abs=0.02)
    assert main(["predict", "--checkpoint", str(ck), str(tmp_path / "x.png"), "--output-dir", str(tmp_path / "p")]) == 0
    assert Image.open(tmp_path / "p" / "x_reconstruction.png").size[1] > 0
    # a hook the task does not have: one usage error naming it, not a traceback
    assert main(["eval", "--checkpoint", str(ck)]) == 2


def test_an_mae_checkpoint_without_its_encoder_record_says_so(tmp_path: Path) -> None:
    from vitlab.errors import CheckpointError
    from vitlab.tasks.mae.model import MAE, MAEConfig

    encoder = vitlab.create_model("vit_tiny_patch16_224", num_classes=0, image_size=16, patch_size=4, dim=16, depth=1,
                                  heads=2, mlp_dim=32)
    mae = MAE(encoder, MAEConfig(decoder_dim=16, decoder_depth=1, decoder_heads=2))
    save_checkpoint(mae, tmp_path / "old.safetensors")
    from safetensors import safe_open
    from safetensors.torch import save_file
    import json

    with safe_open(tmp_path / "old.safetensors", "pt") as f:
        meta = json.loads(f.metadata()["vitlab"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    meta.pop("encoder")  # as an older vitlab wrote it
    save_file(tensors, tmp_path / "old.safetensors", metadata={"vitlab": json.dumps(meta), "format": "pt"})
    with pytest.raises(CheckpointError, match="records no encoder.*--init-from"):
        vitlab.load(tmp_path / "old.safetensors")


def test_linear_probe_round_trip(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from vitlab.cli import main
    from vitlab.tasks.classify import ImageClassifier
    from vitlab.tasks.mae.model import LinearProbe
    from vitlab.training.checkpoint import latest_checkpoint

    out = tmp_path / "probe"
    assert main(["train", "--task", "linear_probe", "--epochs", "1", "--no-progress", "--output-dir", str(out),
                 "model.overrides={patch_size: 2, dim: 16, depth: 1, heads: 2, mlp_dim: 32}", "mae.probe_pool=mean",
                 "ema_decay=null"]) == 0
    ck = latest_checkpoint(out)
    assert checkpoint_task(ck) == "linear_probe"
    loaded = vitlab.load(ck)
    assert isinstance(loaded, LinearProbe) and loaded.pool == "mean"
    from vitlab.pretrained.io import read_weights

    saved = read_weights(ck).state_dict
    assert loaded.state_dict().keys() == saved.keys()
    assert all(torch.equal(loaded.state_dict()[k], saved[k]) for k in saved)
    arr = _grey_png(tmp_path / "x.png", 8, 8)
    expected = ImageClassifier(loaded).predict(arr)
    got = vitlab.pipeline(ck)(str(tmp_path / "x.png"))
    assert got["class"] == expected["class"] and got["confidence"] == pytest.approx(expected["confidence"], abs=1e-6)
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(ck)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert f"top-1 {results['test_top1']:.2f}%" in capsys.readouterr().out


def test_pipeline_of_a_task_needs_a_model() -> None:
    with pytest.raises(ValueError, match=r"pipeline\('detection'\) needs model="):
        vitlab.pipeline("detection")
