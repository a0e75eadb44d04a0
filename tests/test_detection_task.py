"""The detection task on the engine: recipe and CLI defaults, batching with variable box
counts, on-device augmentation from the engine's generator, COCO metrics, exact resume,
COCO-format folders, and `vitlab predict/eval` on a detection checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from optional import needs
from resume_helpers import kill_after_epoch  # noqa: E402
from vitlab.cli import build_parser, main  # noqa: E402
from vitlab.datasets.digit_scenes import DigitScenes  # noqa: E402
from vitlab.tasks.base import Batch  # noqa: E402
from vitlab.tasks.detection import evaluate_coco, normalize_boxes, postprocess_detections  # noqa: E402
from vitlab.tasks.detection.task import (  # noqa: E402
    DETECTION_RECIPE,
    DetectionEvalMetrics,
    DetectionInputs,
    DetectionTask,
    build_dense_augment,
    collate_detection,
    unpad_targets,
)
from vitlab.tasks.detection.inference import load_detector  # noqa: E402
from vitlab.training.checkpoint import latest_checkpoint  # noqa: E402
from vitlab.training.config import config_to_dict, load_config  # noqa: E402
from vitlab.training.run import build_trainer  # noqa: E402
from vitlab.pretrained.io import save_checkpoint  # noqa: E402


#: Matching (scipy) and COCO evaluation (pycocotools): the `detection` extra. The tests without
#: it (batching, recipe, CLI defaults) run anyway.
needs_detection_extra = needs("scipy.optimize", "pycocotools.cocoeval", extra="pip install 'vitlab[detection]'")


ROOT = Path(__file__).resolve().parents[1]
TINY = ["model.overrides.dim=32", "model.overrides.depth=1", "model.overrides.heads=2", "model.overrides.mlp_dim=64",
        "detection.detr.dim=32", "detection.detr.heads=2", "detection.detr.mlp_dim=64",
        "detection.detr.dec_layers=2", "detection.num_queries=4", "data.image_size=32",
        "detection.scenes.digit_size=[10,14]", "detection.scenes.num_train=16", "detection.scenes.num_val=8",
        "detection.scenes.num_test=6", "data.batch_size=8", "data.eval_batch_size=8", "progress=false",
        "device=cpu", "detection.num_plot_images=2"]


def tiny_config(*extra: str):
    return load_config(None, TINY + list(extra), base=DETECTION_RECIPE)


def test_recipe_yaml_is_the_builtin_detection_recipe():
    from vitlab.tasks.detection.task import DETECTION_BACKBONE_RECIPE

    assert yaml.safe_load((ROOT / "configs" / "detection_digits.yaml").read_text()) == DETECTION_RECIPE
    assert yaml.safe_load((ROOT / "configs" / "detection_backbone_digits.yaml").read_text()) == DETECTION_BACKBONE_RECIPE
    assert DETECTION_RECIPE["detection"]["pretrain_backbone"] is True  # the measured configuration in one command


def test_train_task_detection_without_data_arguments_trains_on_digit_scenes():
    from vitlab.cli import _train_config

    cfg = _train_config(build_parser().parse_args(["train", "--task", "detection"]))
    assert cfg.task == "detection" and cfg.data.dataset == "digit_scenes" and cfg.recipe == "detection_digits"
    assert cfg.detection.detr["remedy"] == "two_stage" and cfg.detection.detr["spatial_prior"]  # measured best


@needs_detection_extra
def test_unknown_option_names_the_valid_ones():
    with pytest.raises(ValueError, match="detection.detr.remdy.*remedy"):
        DetectionTask.from_config(tiny_config("detection.detr.remdy=none"))


@needs_detection_extra
def test_yolos_by_config():
    setup = DetectionTask.from_config(tiny_config("detection.detector=yolos"))
    from vitlab.tasks.detection.yolos import YOLOS

    assert isinstance(setup.model, YOLOS) and setup.model.num_detection_tokens == 4


@needs_detection_extra
@pytest.mark.parametrize("detector", ["detr", "yolos"])
def test_detector_checkpoint_round_trip(tmp_path, detector):
    setup = DetectionTask.from_config(tiny_config(f"detection.detector={detector}"))
    model = setup.model.eval()
    save_checkpoint(model, tmp_path / "ck", labels=setup.task.labels)
    loaded = load_detector(tmp_path / "ck")
    assert type(loaded) is type(model) and loaded.labels == setup.task.labels
    assert loaded.pretrained_cfg["input_size"] == [1, 32, 32]
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        a, b = model(x), loaded(x)
    assert torch.equal(a["logits"], b["logits"]) and torch.equal(a["boxes"], b["boxes"])


def test_collate_pads_variable_box_counts_and_prepare_unpads():
    samples = [
        {"image": torch.rand(1, 8, 8), "boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long),
         "image_id": 3},
        {"image": torch.rand(1, 8, 8), "boxes": torch.tensor([[0., 0, 4, 4], [2, 2, 8, 6]]), "labels": torch.tensor([1, 7]),
         "image_id": 5},
        {"image": torch.rand(1, 8, 8), "boxes": torch.tensor([[1., 1, 3, 5]]), "labels": torch.tensor([2]), "image_id": 9},
    ]
    batch = collate_detection(samples)
    assert batch["boxes"].shape == (3, 2, 4) and batch["labels"].tolist() == [[-1, -1], [1, 7], [2, -1]]
    boxes, labels = unpad_targets(batch["boxes"], batch["labels"])
    for s, b, lab in zip(samples, boxes, labels):
        assert torch.equal(b, s["boxes"]) and torch.equal(lab, s["labels"])
    task = DetectionTask(10)
    prepared = task.prepare(batch, torch.device("cpu"), None, None)
    assert [len(t["labels"]) for t in prepared.targets] == [0, 2, 1]
    assert torch.allclose(prepared.targets[1]["boxes"], torch.tensor([[0.25, 0.25, 0.5, 0.5], [0.625, 0.5, 0.75, 0.5]]))
    assert torch.allclose(prepared.inputs.images, (batch["image"] - 0.5) / 0.5)


@needs_detection_extra
def test_augmentation_is_drawn_from_the_engine_generator_and_drops_labels_with_boxes():
    scenes = DigitScenes("train", 8, canvas_size=32, digit_size=(10, 14), max_digits=3)
    from vitlab.tasks.detection.task import DetectionSamples

    data = DetectionSamples(scenes, 32, 3)
    batch = collate_detection([data[i] for i in range(8)])
    task = DetectionTask(10, augment=build_dense_augment({"scale": [0.1, 0.3], "hflip": 0.5}, 32))
    a = task.prepare(batch, torch.device("cpu"), None, torch.Generator().manual_seed(7))
    torch.manual_seed(123)  # the global RNG does not matter
    b = task.prepare(batch, torch.device("cpu"), None, torch.Generator().manual_seed(7))
    c = task.prepare(batch, torch.device("cpu"), None, torch.Generator().manual_seed(8))
    assert torch.equal(a.inputs.images, b.inputs.images) and not torch.equal(a.inputs.images, c.inputs.images)
    kept = sum(len(t["labels"]) for t in a.targets)
    assert kept < int((batch["labels"] >= 0).sum())  # small crops drop boxes ...
    for t, boxes in zip(a.targets, a.extra["boxes"]):  # ... and their labels with them
        assert len(t["labels"]) == len(boxes) == len(t["boxes"])
        assert torch.allclose(t["boxes"], normalize_boxes(boxes, (32, 32)))


def _perfect_outputs(boxes: list[torch.Tensor], labels: list[torch.Tensor], size: int, q: int = 5, c: int = 10):
    logits = torch.full((len(boxes), q, c + 1), -10.0)
    logits[..., -1] = 10.0
    pred = torch.full((len(boxes), q, 4), 0.5)
    for i, (b, lab) in enumerate(zip(boxes, labels)):
        n = len(lab)
        logits[i, :n, -1] = -10.0
        logits[i, torch.arange(n), lab] = 10.0
        pred[i, :n] = normalize_boxes(b, (size, size))
    return {"logits": logits, "boxes": pred}


def _eval_batch(boxes, labels, size=32):
    images = torch.rand(len(boxes), 1, size, size)
    return Batch(DetectionInputs(images, None), None, len(boxes),
                 {"boxes": boxes, "labels": labels, "raw": images, "image_id": torch.arange(len(boxes))})


@needs_detection_extra
def test_coco_metrics_perfect_predictions_give_ap_one_and_shifted_ones_match_cocoeval():
    boxes = [torch.tensor([[2.0, 3, 12, 15], [16, 16, 30, 28]]), torch.tensor([[5.0, 5, 20, 25]])]
    labels = [torch.tensor([3, 7]), torch.tensor([0])]
    m = DetectionEvalMetrics(10)
    m.update(_eval_batch(boxes, labels), _perfect_outputs(boxes, labels, 32))
    res = m.compute()
    assert res["AP"] == pytest.approx(1.0) and res["AP50"] == pytest.approx(1.0) and res["n"] == 2
    shifted = [b + torch.tensor([3.0, 0, 3, 0]) for b in boxes]
    m = DetectionEvalMetrics(10)
    out = _perfect_outputs(shifted, labels, 32)
    m.update(_eval_batch(boxes, labels), out)
    res = m.compute()
    # the same detections and ground truth written as COCO JSON by hand, through pycocotools
    gt = {"images": [{"id": i, "width": 32, "height": 32} for i in range(2)],
          "categories": [{"id": k + 1, "name": str(k)} for k in range(10)],
          "annotations": [{"id": len(sum(([0] * len(x) for x in boxes[:i]), [])) + j + 1, "image_id": i,
                           "category_id": int(lab) + 1, "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]],
                           "area": (b[2] - b[0]) * (b[3] - b[1]), "iscrowd": 0}
                          for i in range(2) for j, (b, lab) in enumerate(zip(boxes[i].tolist(), labels[i].tolist()))]}
    dets = postprocess_detections(out["logits"], out["boxes"], [(32, 32)] * 2)
    results = [{"image_id": i, "category_id": int(lab) + 1, "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]],
                "score": float(s)} for i, d in enumerate(dets)
               for b, lab, s in zip(d["boxes"].tolist(), d["labels"].tolist(), d["scores"].tolist())]
    expected = evaluate_coco(gt, results)
    assert 0 < res["AP"] < 1
    for k in ("AP", "AP50", "AP75", "AR100"):
        assert res[k] == pytest.approx(expected[k]), k


@needs_detection_extra
@pytest.mark.slow
def test_detection_kill_and_resume_is_bit_exact(tmp_path):
    # DN on: its noise is drawn in training too, the harder case for an exact resume
    extra = ["epochs=3", "optim.warmup_epochs=1", "detection.augment.hflip=0.5", "detection.detr.remedy=dn"]
    full = build_trainer(tiny_config(*extra), output_dir=tmp_path / "full", log=lambda s: None)
    full_results = full.fit()

    cut = build_trainer(tiny_config(*extra), output_dir=tmp_path / "cut", log=lambda s: None)
    kill_after_epoch(cut, 2)
    assert latest_checkpoint(tmp_path / "cut").name == "epoch-0002"
    resumed = build_trainer(tiny_config(*extra), output_dir=tmp_path / "cut", log=lambda s: None)
    assert resumed.resume() and resumed.epoch == 2
    res = resumed.fit()
    for a, b in zip(full.history, resumed.history):
        for k in ("train_loss", "train_loss_ce", "train_dn_loss_bbox", "val_AP", "val_AP50", "lr", "step"):
            assert a[k] == b[k], (k, a[k], b[k])
    for k in ("test_AP", "test_AP50"):
        assert res[k] == full_results[k], k
    for k, v in full.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[k], v), k
    # the run directory holds the predictions-vs-ground-truth figure and the curves
    assert (tmp_path / "full" / "predictions.png").is_file() and (tmp_path / "full" / "curves.png").is_file()


@needs_detection_extra
def test_coco_folder_run_reads_what_write_coco_wrote(tmp_path):
    from vitlab.datasets.coco import write_coco

    for split in ("train", "val"):
        write_coco(DigitScenes(split, 4, canvas_size=48, digit_size=(10, 14)), tmp_path / split, DigitScenes.classes)
    cfg = load_config(ROOT / "configs" / "detection_coco.yaml",
                      TINY[:8] + ["data.image_size=32", "model.overrides.patch_size=8"], flags={"data.data_dir": str(tmp_path)})
    setup = DetectionTask.from_config(cfg)
    assert setup.test_data is None and len(setup.train_data) == 4
    sample, scene = setup.train_data[1], DigitScenes("train", 4, canvas_size=48, digit_size=(10, 14))[1]
    n = len(scene["labels"])
    assert torch.equal(sample["labels"][:n], scene["labels"]) and (sample["labels"][n:] == -1).all()
    assert torch.allclose(sample["boxes"][:n], scene["boxes"] * 32 / 48)  # resized to the model's 32x32
    assert sample["orig_size"].tolist() == [48, 48]


def _tiny_checkpoint(tmp_path: Path) -> tuple[Path, torch.nn.Module, DigitScenes]:
    setup = DetectionTask.from_config(tiny_config())
    with torch.no_grad():  # a detector that is confident somewhere
        setup.model.class_head.bias.add_(torch.linspace(3, -3, 11))
    path = save_checkpoint(setup.model, tmp_path / "ck", labels=setup.task.labels).parent
    return path, setup.model.eval(), setup.test_data


@needs_detection_extra
def test_predict_detection_writes_png_and_json_in_original_pixels(tmp_path):
    from PIL import Image

    ck, model, _ = _tiny_checkpoint(tmp_path)
    rng = np.random.default_rng(0)
    Image.fromarray((rng.random((48, 80)) * 255).astype(np.uint8)).save(tmp_path / "img.png")
    assert main(["predict", "--task", "detection", "--checkpoint", str(ck), str(tmp_path / "img.png"),
                 "--score-threshold", "0", "--top-k", "3", "--output-dir", str(tmp_path / "out")]) == 0
    record = json.loads((tmp_path / "out" / "img_detections.json").read_text())
    assert (record["width"], record["height"]) == (80, 48) and len(record["detections"]) == 3
    # the model's normalised boxes scaled straight to the 80x48 original
    pil = Image.open(tmp_path / "img.png").convert("L").resize((32, 32), Image.BILINEAR)
    x = torch.from_numpy(np.asarray(pil, dtype=np.float32) / 255.0)[None, None]
    with torch.no_grad():
        out = load_detector(ck)((x - 0.5) / 0.5)
    expected = postprocess_detections(out["logits"], out["boxes"], [(48, 80)], top_k=3)[0]
    got = torch.tensor([d["box"] for d in record["detections"]])
    assert torch.allclose(got, expected["boxes"], atol=1e-3)
    assert [d["label"] for d in record["detections"]] == expected["labels"].tolist()
    drawn = np.asarray(Image.open(tmp_path / "out" / "img_detections.png").convert("RGB"))
    assert drawn.shape == (48, 80, 3) and ((drawn[..., 0] == 255) & (drawn[..., 1] == 0)).any()  # red boxes


@needs_detection_extra
def test_eval_detection_checkpoint_prints_the_coco_table(tmp_path, capsys):
    from vitlab.tasks.detection.inference import evaluate_detector

    ck, model, test_data = _tiny_checkpoint(tmp_path)
    assert main(["eval", "--checkpoint", str(ck), "--device", "cpu"]) == 0
    text = capsys.readouterr().out
    res = evaluate_detector(load_detector(ck), test_data, 8)
    assert f"AP @.50            {res['AP50']:.3f}" in text and f"AP @[.50:.95]      {res['AP']:.3f}" in text
    assert f"(n={len(test_data)})" in text


@pytest.mark.slow
def test_detection_example_runs(tmp_path):
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    res = subprocess.run([sys.executable, str(ROOT / "examples" / "detection.py"), "--epochs", "1", "--num-train", "16",
                          "--num-val", "8", "--num-test", "8", "--backbone-epochs", "1", "--output-dir", str(tmp_path)],
                         capture_output=True, text=True, env=env,
                         timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert "reloaded checkpoint: test AP50" in res.stdout and "(n=8)" in res.stdout
    assert "backbone classifier: test top-1" in res.stdout  # step 1 ran and step 2 started from it
    assert (tmp_path / "example_detections.png").is_file() and (tmp_path / "predictions.png").is_file()


@needs_detection_extra
@pytest.mark.slow
def test_vitlab_train_task_detection_end_to_end(tmp_path, capsys, monkeypatch):
    from vitlab.pretrained import load_model
    from vitlab.tasks.detection.task import DETECTION_BACKBONE_RECIPE
    from vitlab.training.run import resume_config

    monkeypatch.setitem(DETECTION_BACKBONE_RECIPE, "epochs", 1)  # the recipe's classifier step, cut short
    out = tmp_path / "run"
    assert main(["train", "--task", "detection", *TINY, "--epochs", "1", "--output-dir", str(out)]) == 0
    assert "test AP50:" in capsys.readouterr().out
    # step 1: the digits classifier of the run's own backbone at the digits' 24-pixel scale
    backbone = out / "backbone"
    step = json.loads((backbone / "config.json").read_text())
    assert step["task"] == "classification" and step["data"]["dataset"] == "digits" and step["data"]["image_size"] == 24
    assert step["model"]["overrides"]["dim"] == 32 and step["model"]["overrides"]["pool"] == "mean"
    # composed as `vitlab train --config configs/detection_backbone_digits.yaml` is: the digits' augmentation too
    by_hand = load_config(ROOT / "configs" / "detection_backbone_digits.yaml")
    assert step["augment"] == json.loads(json.dumps(config_to_dict(by_hand)["augment"]))
    assert step["augment"]["affine_p"] > 0 and step["augment"]["cutmix_alpha"] > 0
    assert "test_top1" in json.loads((backbone / "results.json").read_text())
    # step 2 starts DETR's backbone from it (blocks copied; head dropped, position embedding resampled)
    cfg = resume_config(out)
    assert cfg.model.pretrained == str(backbone)
    detr = DetectionTask.from_config(cfg).model.state_dict()
    classifier = load_model(backbone).state_dict()
    copied = [k for k in classifier if k.startswith("blocks.")]
    assert copied and all(torch.equal(detr[f"backbone.{k}"], classifier[k]) for k in copied)
    # no first step when switched off or when model.pretrained names other weights
    assert DetectionTask.prerequisite(tiny_config("detection.pretrain_backbone=false"), out) is None
    assert DetectionTask.prerequisite(tiny_config(f"model.pretrained={backbone}"), tmp_path / "other") is None
    assert DetectionTask.prerequisite(tiny_config("model.name=pvt_v2_b0", "model.overrides={}"), out) is None
    results = json.loads((out / "results.json").read_text())
    assert results["task"] == "detection" and results["primary_metric"] == "AP50" and results["test_n"] == 6
    assert (out / "predictions.png").is_file()
    assert main(["eval", "--checkpoint", str(latest_checkpoint(out)), "--device", "cpu"]) == 0
    assert "AP @.50" in capsys.readouterr().out


@needs_detection_extra
def test_group_detr_loss_matches_every_group_on_its_own():
    from vitlab.tasks.detection.losses import DETRLoss

    task = DetectionTask(10, criterion=DETRLoss(10))
    torch.manual_seed(0)
    targets = [{"labels": torch.tensor([1, 4]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.6, 0.7, 0.3, 0.2]])},
               {"labels": torch.tensor([2]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.4]])}]

    def layers():  # two decoder layers of 4 queries
        return [{"logits": torch.randn(2, 4, 11), "boxes": torch.rand(2, 4, 4) * 0.5 + 0.25} for _ in range(2)]

    g1, g2, g3 = layers(), layers(), layers()
    outputs = {"logits": g1[-1]["logits"], "boxes": g1[-1]["boxes"], "aux": g1[:-1], "dn": None, "groups": [g2, g3]}
    batch = Batch(None, targets, 2, {})
    total = task.loss(batch, outputs)
    # each group matched one-to-one by itself (a fresh loss on that group alone), the group losses summed
    expected = sum(float(DETRLoss(10)(g, targets)["loss"]) for g in (g1, g2, g3))
    assert float(total) == pytest.approx(expected, rel=1e-6)
    # and the groups' matchings differ from one matching applied to all (the point of matching each alone)
    assert float(total) != pytest.approx(3 * float(DETRLoss(10)(g1, targets)["loss"]), rel=1e-3)


def test_two_stage_loss_adds_the_proposals_matched_on_their_own():
    from vitlab.tasks.detection.losses import DETRLoss

    task = DetectionTask(10, criterion=DETRLoss(10))
    torch.manual_seed(0)
    targets = [{"labels": torch.tensor([1, 4]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.6, 0.7, 0.3, 0.2]])},
               {"labels": torch.tensor([2]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.4]])}]
    dec = [{"logits": torch.randn(2, 4, 11), "boxes": torch.rand(2, 4, 4) * 0.5 + 0.25} for _ in range(2)]
    enc = {"logits": torch.randn(2, 20, 11), "boxes": torch.rand(2, 20, 4) * 0.5 + 0.25}  # one per memory token
    outputs = {"logits": dec[-1]["logits"], "boxes": dec[-1]["boxes"], "aux": dec[:-1], "dn": None, "groups": [],
               "enc": enc}
    total = task.loss(Batch(None, targets, 2, {}), outputs)
    expected = float(DETRLoss(10)(dec, targets)["loss"]) + float(DETRLoss(10)([enc], targets)["loss"])
    assert float(total) == pytest.approx(expected, rel=1e-6)
    assert task.last_terms["enc_loss_giou"] == pytest.approx(float(DETRLoss(10)([enc], targets)["loss_giou"]))


@needs_detection_extra
def test_detr_backbone_starts_from_a_classifier_run_with_resampled_position_embedding(tmp_path):
    from vitlab.components.embeddings import interpolate_pos_embed
    from vitlab.pretrained import create_model

    # a "digits classifier" at 16x16 (2x2 patches of 8), saved as a run's latest checkpoint folder
    torch.manual_seed(1)
    clf = create_model("vit_tiny_patch16_224", num_classes=10, in_channels=1, image_size=16, patch_size=8, dim=32,
                       depth=1, heads=2, mlp_dim=64, pool="mean", class_token=False)  # the recipe's backbone
    run = tmp_path / "clf"
    (run / "checkpoints" / "epoch-3").mkdir(parents=True)
    save_checkpoint(clf, run / "checkpoints" / "epoch-3")
    (run / "checkpoints" / "latest").write_text("epoch-3")  # the engine's pointer file
    setup = build_trainer(tiny_config(f"model.pretrained={run}"), output_dir=tmp_path / "det").model
    bb = setup.backbone
    src = clf.state_dict()
    for k, v in bb.state_dict().items():
        if k == "pos_embed":  # 2x2 grid -> the detector's 4x4 (32 px): resampled, not copied
            assert src[k].shape[1] == 4  # no class token row
            ref = interpolate_pos_embed(src[k], (4, 4), num_prefix_tokens=0)
            torch.testing.assert_close(v, ref)
        else:
            torch.testing.assert_close(v, src[k], msg=k)
    with pytest.raises(ValueError, match="DETR's backbone only"):
        build_trainer(tiny_config(f"model.pretrained={run}", "detection.detector=yolos"), output_dir=tmp_path / "y")
