"""The instance segmentation task (``vitlab train --task instance``): data with masks, augmentation
moving masks with boxes, box + mask AP, exact resume, checkpoints, predict / eval / load / pipeline."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from optional import needs
from resume_helpers import kill_after_epoch
from vitlab.cli import build_parser, main
from vitlab.datasets.digit_scenes import DigitScenes
from vitlab.tasks.base import Batch
from vitlab.tasks.rcnn.task import INSTANCE_RECIPE, InstanceEvalMetrics, InstanceSamples, InstanceTask
from vitlab.training.checkpoint import latest_checkpoint
from vitlab.training.config import load_config
from vitlab.training.run import build_trainer

pytestmark = needs("pycocotools.cocoeval", extra="pip install 'vitlab[detection]'")
ROOT = Path(__file__).resolve().parents[1]
TINY = ["model.overrides.dim=32", "model.overrides.depth=2", "model.overrides.global_blocks=[1]", "model.overrides.heads=2", "model.overrides.mlp_dim=64",
        "instance.model.fpn_dim=16", "instance.model.conv_dim=16", "instance.model.fc_dim=32",
        "instance.model.roi_batch_size=32", "instance.model.rpn_batch_size=64", "data.image_size=32",
        "instance.scenes.digit_size=[10,14]", "instance.scenes.num_train=8", "instance.scenes.num_val=4",
        "instance.scenes.num_test=4", "data.batch_size=4", "data.eval_batch_size=4", "progress=false",
        "device=cpu", "instance.num_plot_images=2", "instance.pretrain_backbone=false"]


def tiny_config(*extra: str):
    return load_config(None, TINY + list(extra), base=INSTANCE_RECIPE)


def test_recipe_yaml_is_the_builtin_instance_recipe():
    assert yaml.safe_load((ROOT / "configs" / "instance_digits.yaml").read_text()) == INSTANCE_RECIPE


def test_train_task_instance_without_data_arguments_trains_on_digit_scenes():
    from vitlab.cli import _train_config

    cfg = _train_config(build_parser().parse_args(["train", "--task", "instance"]))
    assert cfg.task == "instance" and cfg.data.dataset == "digit_scenes" and cfg.recipe == "instance_digits"
    assert cfg.instance.pretrain_backbone and cfg.instance.model["fpn_dim"] == 64


def test_unknown_head_option_names_the_valid_ones():
    with pytest.raises(ValueError, match=r"instance\.model\.fpn_width.*fpn_dim"):
        InstanceTask.from_config(tiny_config("instance.model.fpn_width=8"))


def test_samples_carry_resized_masks_and_pad():
    scenes = DigitScenes("train", 3, canvas_size=48, digit_size=(10, 14), max_digits=3)
    data = InstanceSamples(scenes, 32, 4)
    for i in range(3):
        s, raw = data[i], scenes[i]
        n = len(raw["labels"])
        assert s["masks"].shape == (4, 32, 32) and not s["masks"][n:].any() and (s["labels"][n:] == -1).all()
        for k in range(n):  # each resized mask still fills its (scaled) box
            ys, xs = torch.nonzero(s["masks"][k], as_tuple=True)
            got = torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]).float()
            assert torch.allclose(got, s["boxes"][k], atol=1.5), (got, s["boxes"][k])


def test_augmentation_moves_masks_with_their_boxes():
    task = InstanceTask.from_config(tiny_config("instance.augment.scale=[0.5,0.8]", "instance.augment.degrees=10")).task
    scenes = InstanceSamples(DigitScenes("train", 4, canvas_size=32, digit_size=(10, 14)), 32, 4)
    raw = {k: torch.stack([torch.as_tensor(scenes[i][k]) for i in range(4)]) for k in ("image", "boxes", "labels",
                                                                                       "masks", "image_id")}
    plain = task.prepare(raw, torch.device("cpu"), 32, None)
    moved = task.prepare(raw, torch.device("cpu"), 32, torch.Generator().manual_seed(0))
    assert not torch.equal(plain.inputs.images, moved.inputs.images)
    checked = 0
    for t in moved.targets:
        assert len(t["masks"]) == len(t["boxes"]) == len(t["labels"])
        for box, m in zip(t["boxes"], t["masks"]):
            ys, xs = torch.nonzero(m, as_tuple=True)
            if len(xs) < 10:
                continue
            got = torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]).float()
            assert torch.allclose(got, box, atol=2.5), (got, box)
            checked += 1
    assert checked >= 4
    for image, t in zip(moved.extra["raw"], moved.targets):  # the moved masks lie on the moved ink
        ink, union = image[0] > 0.3, t["masks"].any(0)
        assert (ink & union).sum() / (ink | union).sum() > 0.5


def _metrics_batch(shift: int) -> tuple[Batch, list[dict[str, torch.Tensor]]]:
    scenes = InstanceSamples(DigitScenes("test", 2, canvas_size=32, digit_size=(10, 14)), 32, 4)
    masks = [scenes[i]["masks"][scenes[i]["labels"] >= 0] for i in range(2)]
    boxes = [scenes[i]["boxes"][scenes[i]["labels"] >= 0] for i in range(2)]
    labels = [scenes[i]["labels"][scenes[i]["labels"] >= 0] for i in range(2)]
    images = torch.stack([scenes[i]["image"] for i in range(2)])
    batch = Batch(type("I", (), {"images": images})(), None, 2,
                  {"boxes": boxes, "labels": labels, "masks": masks, "raw": images})
    outputs = [{"boxes": b, "labels": lab, "scores": torch.ones(len(b)),
                "masks": torch.roll(m.float(), shifts=shift, dims=-1)} for b, lab, m in zip(boxes, labels, masks)]
    return batch, outputs


def test_mask_ap_is_one_for_the_true_masks_and_drops_for_shifted_ones():
    for shift, expect in ((0, 1.0), (4, None)):
        metrics = InstanceEvalMetrics(10)
        metrics.update(*_metrics_batch(shift))
        res = metrics.compute()
        assert res["AP50"] == pytest.approx(1.0) and res["AP"] == pytest.approx(1.0)  # boxes are the truth
        if expect is not None:
            assert res["mask_AP50"] == pytest.approx(1.0) and res["mask_AP"] == pytest.approx(1.0)
        else:
            assert res["mask_AP"] < 0.5


@pytest.mark.slow
def test_instance_kill_and_resume_is_bit_exact(tmp_path):
    extra = ["epochs=3", "optim.warmup_epochs=1"]
    full = build_trainer(tiny_config(*extra), output_dir=tmp_path / "full", log=lambda s: None)
    full_results = full.fit()
    cut = build_trainer(tiny_config(*extra), output_dir=tmp_path / "cut", log=lambda s: None)
    kill_after_epoch(cut, 2)
    assert latest_checkpoint(tmp_path / "cut").name == "epoch-0002"
    resumed = build_trainer(tiny_config(*extra), output_dir=tmp_path / "cut", log=lambda s: None)
    assert resumed.resume() and resumed.epoch == 2
    res = resumed.fit()
    for a, b in zip(full.history, resumed.history):
        for k in ("train_loss", "train_loss_mask", "train_loss_objectness", "val_mask_AP", "val_AP", "lr"):
            assert a[k] == b[k], (k, a[k], b[k])
    assert res["test_mask_AP50"] == full_results["test_mask_AP50"]
    for k, v in full.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[k], v), k
    assert (tmp_path / "full" / "predictions.png").is_file() and (tmp_path / "full" / "curves.png").is_file()


@pytest.mark.slow
def test_vitlab_train_predict_eval_load_pipeline(tmp_path, capsys):
    import vitlab
    from PIL import Image

    from vitlab.tasks.rcnn.inference import evaluate_mask_rcnn, load_mask_rcnn, data_for_checkpoint

    out = tmp_path / "run"
    assert main(["train", "--task", "instance", *TINY, "--epochs", "2", "--output-dir", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert {"test_mask_AP50", "test_AP50", "test_mask_AP"} <= set(results)
    ck = latest_checkpoint(out)
    model = vitlab.load(ck)
    assert type(model).__name__ == "MaskRCNN" and model.config.num_classes == 10
    ref = load_mask_rcnn(ck)
    data = data_for_checkpoint(ref, "test")
    x = (data[0]["image"][None] - 0.5) / 0.5
    with torch.no_grad():
        a, b = model.eval()(x)[0], ref(x)[0]
    assert torch.equal(a["boxes"], b["boxes"]) and torch.equal(a["masks"], b["masks"])
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(ck), "--device", "cpu"]) == 0
    text = capsys.readouterr().out
    res = evaluate_mask_rcnn(ref, data, 4)
    assert "COCO box / mask metrics" in text and f"(n={len(data)})" in text
    row = next(line.split() for line in text.splitlines() if line.strip().startswith("AP @.50"))
    assert row[2:] == [f"{res['AP50']:.3f}", f"{res['mask_AP50']:.3f}"]
    img = (data[0]["image"][0].numpy() * 255).astype(np.uint8)
    Image.fromarray(img).resize((48, 48)).save(tmp_path / "scene.png")
    assert main(["predict", "--checkpoint", str(ck), str(tmp_path / "scene.png"), "--score-threshold", "0",
                 "--output-dir", str(tmp_path / "pred")]) == 0
    record = json.loads((tmp_path / "pred" / "scene_instances.json").read_text())
    assert (record["width"], record["height"]) == (48, 48)
    for inst in record["instances"]:
        assert inst["mask"]["size"] == [48, 48] and set(inst) >= {"box", "score", "class", "mask", "area"}
    assert (tmp_path / "pred" / "scene_instances.png").is_file()
    pipe = vitlab.pipeline(ck)
    recs = pipe([tmp_path / "scene.png"], score_threshold=0.0)
    assert [i["box"] for i in recs[0]["instances"]] == [i["box"] for i in record["instances"]]


def test_first_step_is_a_plain_vit_classifier_of_the_vitdet_backbone(tmp_path):
    cfg = tiny_config("instance.pretrain_backbone=true", "model.overrides.window_size=2",
                      "model.overrides.global_blocks=[1]", "model.overrides.rel_pos=decomposed")
    folder, recipe = InstanceTask.prerequisite(cfg, tmp_path)
    assert folder == tmp_path / "backbone" and recipe["task"] == "classification"
    over = recipe["model"]["overrides"]
    assert over["dim"] == 32 and over["class_token"] is False
    assert not {"window_size", "global_blocks", "rel_pos"} & set(over)
    # a detector built on weights with no relative-position tables starts them at zero
    setup = InstanceTask.from_config(cfg)
    blk = setup.model.backbone.blocks[0].attn
    assert blk.window_size == (2, 2)


def test_coco_folder_with_polygon_and_rle_masks(tmp_path):
    """A COCO folder (write_coco's uncompressed RLE, plus one object re-annotated as a polygon and one
    as compressed RLE) gives the instance task the same masks as the scenes themselves."""
    from pycocotools import mask as mask_utils

    from vitlab.datasets.coco import write_coco

    scenes = DigitScenes("train", 3, canvas_size=32, digit_size=(10, 14))
    ann_file = write_coco(scenes, tmp_path / "train", DigitScenes.classes)
    data = json.loads(ann_file.read_text())
    first, second = data["annotations"][0], data["annotations"][1]
    x, y, w, h = first["bbox"]
    first["segmentation"] = [[x, y, x + w, y, x + w, y + h, x, y + h]]  # a polygon: the box itself
    rle = mask_utils.frPyObjects(second["segmentation"], *second["segmentation"]["size"])
    second["segmentation"] = {"size": rle["size"], "counts": rle["counts"].decode("ascii")}  # compressed RLE
    ann_file.write_text(json.dumps(data))
    cfg = load_config(None, TINY[:11] + ["data.dataset=coco", f"data.data_dir={tmp_path}", "progress=false",
                                         "instance.pretrain_backbone=false"], base=INSTANCE_RECIPE)
    setup = InstanceTask.from_config(cfg)
    assert setup.val_data is None and len(setup.train_data) == 3
    got = {(i, k): setup.train_data[i]["masks"][k] for i in range(3) for k in range(len(scenes[i]["labels"]))}
    want = InstanceSamples(scenes, 32, setup.train_data.max_objects)
    ids = sorted({a["image_id"] for a in data["annotations"]})
    for (i, k), m in got.items():
        if (i, k) == (ids.index(first["image_id"]), 0):
            box = torch.zeros(32, 32, dtype=torch.bool)
            box[int(y):int(y + h), int(x):int(x + w)] = True
            assert (m == box).float().mean() > 0.97  # the polygon's rasterised box
        else:
            assert torch.equal(m, want[i]["masks"][k]), (i, k)
