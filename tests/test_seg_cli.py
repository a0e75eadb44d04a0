"""``vitlab train --task segmentation`` (digit scenes without data arguments), ``vitlab eval`` on a
segmentation checkpoint (the per-class IoU table) and ``vitlab predict --task segmentation``
(mask and overlay PNGs; whole / sliding / TTA)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image


from vitlab.cli import main as cli  # noqa: E402
from vitlab.datasets.digit_scenes import DigitScenes  # noqa: E402
from vitlab.datasets.transforms import normalize  # noqa: E402
from vitlab.pretrained import save_checkpoint  # noqa: E402
from vitlab.tasks.segmentation import SegmentationMetrics, predict_sliding, predict_tta  # noqa: E402
from vitlab.tasks.segmentation.model import build_segmenter, load_segmenter  # noqa: E402
from vitlab.tasks.segmentation.task import SceneMasks  # noqa: E402
from vitlab.tasks.segmentation.visualize import voc_palette  # noqa: E402

LABELS = ["background"] + [str(d) for d in range(10)]
SCENES = {"dataset": "digit_scenes", "canvas_size": 32, "max_digits": 3, "digit_size": [10, 16], "clutter": 0,
          "test_scenes": 6, "val_scenes": 4}
MEAN, STD = [0.075], [0.21]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A random-weight segmenter (its argmax varies over the image) saved as a training run would."""
    torch.manual_seed(0)
    model = build_segmenter("vit_tiny_patch16_224", 11, head="setr_naive", in_channels=1, image_size=32,
                            backbone_overrides=dict(patch_size=4, dim=16, depth=2, heads=2, mlp_dim=32), channels=8)
    model.pretrained_cfg = {"input_size": [1, 32, 32], "mean": MEAN, "std": STD, "ignore_index": 255, "data": SCENES}
    # shift the background logit so that about half the pixels of scenes come out as background
    scenes = DigitScenes("val", num_scenes=4, canvas_size=32, digit_size=(10, 16))
    x = normalize(0.2 + 0.8 * torch.stack([scenes[i]["image"] for i in range(4)]), tuple(MEAN), tuple(STD))
    with torch.no_grad():
        logits = model.eval()(x)
        margin = logits[:, 1:].amax(1) - logits[:, 0]
        model.head.classifier.bias[0] += margin.median()
    path = tmp_path_factory.mktemp("seg") / "model.safetensors"
    save_checkpoint(model.eval(), path, labels=LABELS)
    return path


def test_train_task_segmentation_without_data_arguments_uses_digit_scenes(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli(["train", "--task", "segmentation", "--epochs", "1", "--no-progress", "--output-dir", str(out),
                "model.name=vit_tiny_patch16_224", "model.overrides={patch_size: 4, dim: 16, depth: 1, heads: 2, mlp_dim: 32}",
                "segmentation.head=setr_naive", "segmentation.train_scenes=8", "segmentation.val_scenes=4",
                "segmentation.test_scenes=4", "segmentation.canvas_size=32", "segmentation.digit_size=[10,16]",
                "segmentation.channels=8", "segmentation.overlays=0", "data.batch_size=8"]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["task"] == "segmentation" and cfg["data"]["dataset"] == "digit_scenes"
    assert cfg["recipe"] == "segmentation" and cfg["data"]["image_size"] == 32
    results = json.loads((out / "results.json").read_text())
    assert f"test mIoU: {results['test_mIoU']:.6g}" in capsys.readouterr().out


def test_eval_prints_the_per_class_iou_table_of_the_test_split(checkpoint, tmp_path, capsys):
    assert cli(["eval", "--checkpoint", str(checkpoint), "--output-dir", str(tmp_path), "--device", "cpu"]) == 0
    text = capsys.readouterr().out
    # reference: the recorded scenes' test split, the model's argmax, a confusion matrix
    model, _ = load_segmenter(checkpoint)
    scenes = SceneMasks(DigitScenes("test", num_scenes=6, canvas_size=32, max_digits=3, digit_size=(10, 16)))
    ref = SegmentationMetrics(11)
    for i in range(len(scenes)):
        x, m = scenes[i]
        ref.update(model(normalize(x[None], tuple(MEAN), tuple(STD))).argmax(1), m[None])
    iou = ref.iou()
    assert "digit_scenes test (n=6)" in text
    for name, v in zip(LABELS, iou.tolist()):
        row = re.search(rf"^{re.escape(name)}\s+(\S+)$", text, re.M)
        assert row, name
        assert row.group(1) == ("absent" if v != v else f"{v:.4f}"), name
    assert re.search(rf"^mIoU\s+{float(iou.nanmean()):.4f}$", text, re.M)
    saved = json.loads((tmp_path / "eval_digit_scenes_test.json").read_text())
    assert saved["mIoU"] == pytest.approx(float(iou.nanmean()), abs=1e-12)


def _scene_png(tmp_path: Path, h: int, w: int) -> tuple[Path, torch.Tensor]:
    scenes = DigitScenes("test", num_scenes=4, canvas_size=(h, w), digit_size=(10, 16))
    x = 0.2 + 0.8 * scenes[1]["image"]  # a grey canvas: an overlay that tints the background shows
    x = (x * 255).round() / 255
    path = tmp_path / "scene.png"
    Image.fromarray((x[0].numpy() * 255).round().astype(np.uint8), mode="L").save(path)
    return path, x[None]


@pytest.mark.parametrize("mode", ["whole", "sliding", "tta"])
def test_predict_writes_the_mask_and_overlay_of_the_chosen_mode(checkpoint, tmp_path, capsys, mode):
    path, x = _scene_png(tmp_path, 40, 72)  # wider than the 32-pixel training window
    out = tmp_path / "pred"
    assert cli(["predict", "--task", "segmentation", "--checkpoint", str(checkpoint), str(path), "--mode", mode,
                "--output-dir", str(out), "--scales", "0.75", "1.0"]) == 0
    assert "scene_mask.png" in capsys.readouterr().out
    model, _ = load_segmenter(checkpoint)
    xn = normalize(x, tuple(MEAN), tuple(STD))
    with torch.no_grad():
        logits = {"whole": lambda: model(xn), "sliding": lambda: predict_sliding(model, xn, 32, 21),
                  "tta": lambda: predict_tta(model, xn, scales=(0.75, 1.0), flip=True)}[mode]()
    expected = logits.argmax(1)[0]
    with Image.open(out / "scene_mask.png") as im:
        assert im.mode == "P" and im.size == (72, 40)
        mask = torch.from_numpy(np.array(im)).long()
    assert torch.equal(mask, expected)
    if mode != "whole":  # the mode matters on this image (else the test could not tell them apart)
        assert not torch.equal(expected, model(xn).argmax(1)[0])
    with Image.open(out / "scene_overlay.png") as im:
        rgb = np.array(im.convert("RGB")).astype(int)
    grey = (x[0, 0].numpy() * 255 + 0.5).astype(int)
    bg = mask.numpy() == 0
    assert bg.any() and (rgb[bg] == grey[bg][:, None]).all()  # background pixels keep the image
    fg = ~bg
    colour = voc_palette()[mask.numpy()[fg]].astype(int)
    assert np.abs(rgb[fg] - (grey[fg][:, None] * 0.5 + colour * 0.5)).max() <= 1  # classes blended at alpha 0.5


def test_predict_segmentation_needs_a_checkpoint(tmp_path, capsys):
    path, _ = _scene_png(tmp_path, 32, 32)
    assert cli(["predict", "--task", "segmentation", "--model", "vit_tiny_patch16_224", str(path)]) == 2
    assert "needs --checkpoint" in capsys.readouterr().err


@pytest.mark.slow
def test_segmentation_example_trains_evaluates_and_draws(tmp_path):
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    res = subprocess.run([sys.executable, str(root / "examples" / "segmentation.py"), "--epochs", "1", "--scenes", "16",
                          "--output-dir", str(tmp_path), "segmentation.val_scenes=8", "segmentation.test_scenes=16",
                          "model.overrides={dims: [16, 32, 32, 32], depths: [1, 1, 1, 1], heads: [1, 1, 2, 2]}"], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "PYTHONPATH": str(root / "src")})
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    results = json.loads((tmp_path / "results.json").read_text())
    # the table printed from the saved checkpoint is the run's own test evaluation
    assert re.search(rf"^mIoU\s+{results['test_mIoU']:.4f}$", res.stdout, re.M)
    for name in ("predictions.png", "scene0_mask.png", "scene0_overlay.png", "overlays.png", "curves.png"):
        assert (tmp_path / name).is_file(), name


@pytest.mark.slow
def test_benchmark_quick_mode_prints_the_table(tmp_path):
    import importlib.util

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("seg_bench", root / "benchmarks" / "segmentation.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "rows.json"
    assert bench.main(["--quick", "--threads", "1", "--only", "vit_setr_mla", "pvt_v2_mlp_attn",
                       "--output-dir", str(tmp_path), "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [r["name"] for r in rows] == ["vit_setr_mla", "pvt_v2_mlp_attn"]
    for r in rows:  # each row is that run's own results.json
        res = json.loads((tmp_path / r["name"] / "results.json").read_text())
        assert r["test_mIoU"] == res["test_mIoU"] and r["epochs"] == res["epochs"] == 1


def test_benchmark_keeps_the_finished_rows_when_a_later_one_fails(tmp_path, monkeypatch):
    import importlib.util

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("seg_bench_rows", root / "benchmarks" / "segmentation.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)

    def fake_run(name, quick, epochs, out_root, extra):
        if name == "swin_fpn":
            raise KeyboardInterrupt  # a long table stopped by hand during its second row
        return {"name": name, "epochs": epochs}

    monkeypatch.setattr(bench, "run_one", fake_run)
    out = tmp_path / "rows.json"
    with pytest.raises(KeyboardInterrupt):
        bench.main(["--threads", "1", "--epochs", "3", "--only", "swin_mlp", "swin_fpn", "--json", str(out)])
    assert json.loads(out.read_text()) == [{"name": "swin_mlp", "epochs": 3}]
