"""The segmentation task on the engine: batches with masks moved by DenseAugment, heads chosen
by config, aux heads in training only, the loss and eval metrics against explicit formulas,
kill-and-resume bit-exact, checkpoints that rebuild, run-directory overlays, the recipe."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from PIL import Image

from resume_helpers import kill_after_epoch  # noqa: E402
from vitlab.datasets.transforms import normalize  # noqa: E402
from vitlab.pretrained import save_checkpoint  # noqa: E402
from vitlab.tasks import Batch, get_task  # noqa: E402
from vitlab.tasks.segmentation import AllMlpHead, AttentionUpsample, FpnHead, SetrMlaHead, SetrUpHead  # noqa: E402
from vitlab.tasks.segmentation.model import load_segmenter  # noqa: E402
from vitlab.tasks.segmentation.task import (  # noqa: E402
    SEGMENTATION_RECIPE,
    SegmentationEvalMetrics,
    SegmentationTask,
)
from vitlab.training import Trainer, build_trainer, load_config  # noqa: E402
from vitlab.training.checkpoint import latest_checkpoint  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
VIT = ["model.name=vit_tiny_patch16_224", "model.overrides={patch_size: 4, dim: 16, depth: 2, heads: 2, mlp_dim: 32}"]
TINY = ["task=segmentation", "data.dataset=digit_scenes", "progress=false", "data.batch_size=8",
        "data.eval_batch_size=8", "segmentation.train_scenes=16", "segmentation.val_scenes=8",
        "segmentation.test_scenes=8", "segmentation.canvas_size=32", "segmentation.digit_size=[10,16]",
        "segmentation.channels=8", "segmentation.attn_heads=2", "segmentation.overlays=2", "optim.warmup_epochs=1"]


def seg_config(out: Path, *extra: str, epochs: int = 1):
    return load_config(None, TINY + VIT + [f"epochs={epochs}", f"output_dir={out}", *extra])


def seg_trainer(out: Path, *extra: str, epochs: int = 1) -> Trainer:
    return build_trainer(seg_config(out, *extra, epochs=epochs), log=lambda s: None)


# ----------------------------------------------------------------------------- batches
def test_prepare_moves_the_mask_with_the_image_and_normalises_last(tmp_path):
    trainer = seg_trainer(tmp_path / "run", "segmentation.hflip=1.0", "segmentation.crop_scale=[1.0,1.0]",
                          "segmentation.crop_ratio=[1.0,1.0]")
    task = trainer.task
    assert isinstance(task, SegmentationTask) and task.labels == ["background"] + [str(d) for d in range(10)]
    x, m = next(iter(trainer.train_loader))
    assert m.dtype == torch.int64 and int(m.max()) <= 10 and (m > 0).any()
    dev = torch.device("cpu")
    g = lambda s: torch.Generator().manual_seed(s)  # noqa: E731
    b = task.prepare((x, m), dev, 32, g(0))
    # a full-size crop and a certain flip: exactly the mirrored image and mask
    assert torch.equal(b.targets, m.flip(-1))
    torch.testing.assert_close(b.inputs, normalize(x.flip(-1), task.mean, task.std), atol=1e-5, rtol=0)
    # evaluation: no augmentation, only the normalisation
    e = task.prepare((x, m), dev, 32, None)
    assert torch.equal(e.targets, m) and torch.equal(e.inputs, normalize(x, task.mean, task.std))


def test_augmentation_is_drawn_from_the_engines_generator(tmp_path):
    task = seg_trainer(tmp_path / "run", "segmentation.hflip=0.5").task
    x = torch.rand(4, 1, 32, 32)
    m = torch.randint(0, 11, (4, 32, 32))
    dev = torch.device("cpu")
    a = task.prepare((x, m), dev, 32, torch.Generator().manual_seed(1))
    torch.manual_seed(123)  # the global RNG plays no part
    b = task.prepare((x, m), dev, 32, torch.Generator().manual_seed(1))
    c = task.prepare((x, m), dev, 32, torch.Generator().manual_seed(2))
    assert torch.equal(a.inputs, b.inputs) and torch.equal(a.targets, b.targets)
    assert not torch.equal(a.targets, c.targets)
    assert (a.targets == 255).any() or not torch.equal(a.targets, m)  # crops really moved the masks


# ----------------------------------------------------------------------------- heads by config
@pytest.mark.parametrize("head,backbone,cls", [
    ("setr_naive", VIT, SetrUpHead),
    ("setr_pup", VIT, SetrUpHead),
    ("setr_mla", VIT, SetrMlaHead),
    ("mlp", ["model.name=pvt_v2_b0", "model.overrides={dims: [8, 16, 16, 16], heads: [1, 1, 1, 1], depths: [1, 1, 1, 1]}"],
     AllMlpHead),
    ("fpn", ["model.name=swin_tiny_patch4_window7_224",
             "model.overrides={dim: 8, depths: [1, 1, 1, 1], heads: [1, 1, 1, 1], window_size: 4}"], FpnHead),
])
@pytest.mark.parametrize("upsample", ["bilinear", "attention"])
def test_head_and_upsampling_come_from_the_config(tmp_path, head, backbone, cls, upsample):
    cfg = load_config(None, TINY + backbone + ["epochs=1", f"output_dir={tmp_path}", f"segmentation.head={head}",
                                               f"segmentation.upsample={upsample}"])
    setup = get_task("segmentation").from_config(cfg)
    model = setup.model
    heads = [m for m in model.head.modules() if isinstance(m, cls)]
    assert heads, f"{head} built {type(model.head).__name__}"
    ups = [m for m in model.head.modules() if isinstance(m, AttentionUpsample)]
    assert bool(ups) == (upsample == "attention")
    if head == "setr_pup" and upsample == "attention":
        assert len(ups) == 2  # stride 4: two progressive x2 stages
    # logits at the input size, for every class
    x = torch.randn(2, 1, 32, 32)
    assert model.eval()(x).shape == (2, 11, 32, 32)
    if head in ("setr_naive", "setr_pup") or upsample == "attention":
        # the head itself reaches full resolution (no fixed x4 interpolation left to the Segmenter)
        feats = model._features(x, with_aux=False)[0]
        assert model.head(feats).shape[-2:] == (32, 32)


def test_aux_heads_weigh_in_training_and_never_run_in_eval(tmp_path):
    trainer = seg_trainer(tmp_path / "run", "segmentation.aux_indices=[0]", "segmentation.aux_weights=[0.4]")
    model, task = trainer.model, trainer.task
    calls = []
    model.aux_heads[0].register_forward_hook(lambda m, i, o: calls.append(1))
    x, m = next(iter(trainer.train_loader))
    batch = task.prepare((x, m), torch.device("cpu"), 32, None)
    model.train()
    out = task.forward(model, batch.inputs)
    assert isinstance(out, tuple) and len(out[1]) == 1 and calls == [1]
    logits, (aux,) = out
    expected = F.cross_entropy(logits, batch.targets, ignore_index=255) + 0.4 * F.cross_entropy(aux, batch.targets,
                                                                                                ignore_index=255)
    torch.testing.assert_close(task.loss(batch, out), expected)
    model.eval()
    out = task.forward(model, batch.inputs)
    assert isinstance(out, torch.Tensor) and out.shape == (8, 11, 32, 32) and calls == [1]


def test_dice_weight_adds_the_dice_term(tmp_path):
    task = seg_trainer(tmp_path / "run", "segmentation.dice_weight=0.5").task
    logits = torch.randn(2, 11, 6, 6)
    y = torch.randint(0, 11, (2, 6, 6))
    y[0, 0] = 255
    b = Batch(None, y, 2)
    valid = y != 255
    p = logits.softmax(1) * valid[:, None]
    onehot = F.one_hot(torch.where(valid, y, 0), 11).permute(0, 3, 1, 2).float() * valid[:, None]
    dice = (1 - (2 * (p * onehot).sum((0, 2, 3)) + 1) / (p.sum((0, 2, 3)) + onehot.sum((0, 2, 3)) + 1)).mean()
    torch.testing.assert_close(task.loss(b, logits), F.cross_entropy(logits, y, ignore_index=255) + 0.5 * dice)


# ----------------------------------------------------------------------------- metrics
def test_eval_metrics_by_hand_with_ignore_and_absent_class():
    # K = 3; one 2x3 image: target [[0, 0, 1], [1, 255, 0]], prediction [[0, 1, 1], [1, 2, 0]]
    target = torch.tensor([[[0, 0, 1], [1, 255, 0]]])
    pred = torch.tensor([[[0, 1, 1], [1, 2, 0]]])
    logits = F.one_hot(pred, 3).permute(0, 3, 1, 2).float() * 4.0  # (1, H, W, K) -> (1, K, H, W)
    m = SegmentationEvalMetrics(3, 255, ["bg", "a", "b"])
    m.update(Batch(None, target, 1), logits)
    r = m.compute()
    # class 0: TP 2 (two of three), FN 1, FP 0 -> 2/3; class 1: TP 2, FP 1 -> 2/3; class 2 absent: NaN
    assert r["iou_bg"] == pytest.approx(2 / 3) and r["iou_a"] == pytest.approx(2 / 3)
    assert r["iou_b"] != r["iou_b"]
    assert r["mIoU"] == pytest.approx(2 / 3)
    assert r["pixel_accuracy"] == pytest.approx(4 / 5)  # the ignored pixel is not counted
    # the loss averages the five valid pixels: hits cost -log softmax(4, 0, 0)[0], misses -log(e^0 / (e^4 + 2))
    hit, miss = -torch.log_softmax(torch.tensor([4.0, 0, 0]), 0)[0], -torch.log_softmax(torch.tensor([4.0, 0, 0]), 0)[1]
    assert r["loss"] == pytest.approx(float(4 * hit + miss) / 5, rel=1e-6)


# ----------------------------------------------------------------------------- resume
RESUME = ["segmentation.aux_indices=[0]", "segmentation.aux_weights=[0.4]", "segmentation.affine_degrees=10",
          "segmentation.hflip=0.5", "ema_decay=0.9", "optim.accumulation_steps=2", "data.batch_size=4",
          "segmentation.overlays=0"]


@pytest.mark.slow
def test_segmentation_kill_and_resume_is_bit_exact(tmp_path):
    full = seg_trainer(tmp_path / "full", *RESUME, epochs=3)
    full_results = full.fit()

    cut = seg_trainer(tmp_path / "cut", *RESUME, epochs=3)
    kill_after_epoch(cut, 2)
    assert latest_checkpoint(tmp_path / "cut").name == "epoch-0002"
    resumed = seg_trainer(tmp_path / "cut", *RESUME, epochs=3)
    assert resumed.resume() and resumed.epoch == 2
    res = resumed.fit()
    for a, b in zip(full.history, resumed.history):
        for k in ("train_loss", "train_pixel_accuracy", "val_mIoU", "val_loss", "ema_val_mIoU", "lr"):
            assert a[k] == b[k], (k, a[k], b[k])
    for k in ("test_mIoU", "test_pixel_accuracy", "ema_test_mIoU"):
        assert res[k] == full_results[k], k
    for k, v in full.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[k], v), k
    for k, v in full.ema.module.state_dict().items():
        assert torch.equal(resumed.ema.module.state_dict()[k], v), k


# ----------------------------------------------------------------------------- outputs
def test_run_writes_metrics_overlays_and_a_checkpoint_that_rebuilds(tmp_path):
    trainer = seg_trainer(tmp_path / "run", "segmentation.head=setr_pup", "segmentation.aux_indices=[0]",
                          "segmentation.aux_weights=[0.2]")
    results = trainer.fit()
    assert results["primary_metric"] == "mIoU" and 0.0 <= results["test_mIoU"] <= 1.0
    assert {f"test_iou_{c}" for c in ["background"] + [str(d) for d in range(10)]} <= set(results)
    assert (tmp_path / "run" / "overlays.png").is_file()
    # the overlays show the trained model's predictions on the first val images, normalised as in training
    images, masks, pred = trainer.task.predict_overlays(trainer.model)
    val_x = torch.stack([trainer.val_loader.dataset[i][0] for i in range(2)])
    assert torch.equal(images, val_x)
    trainer.model.eval()
    assert torch.equal(pred, trainer.model(normalize(val_x, trainer.task.mean, trainer.task.std)).argmax(1))
    # the checkpoint alone rebuilds the model (aux heads included) with the same logits
    model, labels = load_segmenter(latest_checkpoint(tmp_path / "run"))
    assert labels == trainer.task.labels and len(model.aux_heads) == 1
    assert model.pretrained_cfg["data"]["dataset"] == "digit_scenes"
    x = torch.randn(1, 1, 40, 36)
    torch.testing.assert_close(model(x), trainer.model.eval()(x))


def test_recipe_yaml_equals_the_builtin_recipe():
    loaded = yaml.safe_load((ROOT / "configs" / "segmentation.yaml").read_text())
    assert loaded == json.loads(json.dumps(SEGMENTATION_RECIPE))
    cfg = load_config(ROOT / "configs" / "segmentation.yaml")
    assert cfg.task == "segmentation" and cfg.data.dataset == "digit_scenes"
    folder = load_config(ROOT / "configs" / "segmentation_folder.yaml", ["data.dataset=/some/where"])
    assert folder.task == "segmentation" and folder.segmentation.image_dir == "images/{split}"


def test_a_bad_head_name_is_one_clear_error():
    with pytest.raises(ValueError, match=r"segmentation.head must be one of setr_naive, setr_pup, setr_mla, mlp, fpn"):
        load_config(None, ["task=segmentation", "segmentation.head=unet"])
    with pytest.raises(ValueError, match=r"one weight per aux index"):
        load_config(None, ["task=segmentation", "segmentation.aux_indices=[0, 1]", "segmentation.aux_weights=[0.4]"])


def test_checkpoint_save_load_roundtrip_keeps_logits(tmp_path):
    setup = get_task("segmentation").from_config(seg_config(tmp_path, "segmentation.head=setr_mla",
                                                            "segmentation.upsample=attention"))
    model = setup.model.eval()
    save_checkpoint(model, tmp_path / "m.safetensors", labels=setup.task.labels)
    loaded, labels = load_segmenter(tmp_path / "m.safetensors")
    x = torch.randn(2, 1, 32, 32)
    assert torch.equal(loaded(x), model(x))


def _write_folder(root: Path) -> None:
    """3 classes; train: two 32x32 pairs and one 40x48 pair; val: one 32x32 pair."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    (root / "classes.txt").write_text("sky\nroad\ncar\n")
    for split, sizes in (("train", [(32, 32), (32, 32), (40, 48)]), ("val", [(32, 32)])):
        (root / "images" / split).mkdir(parents=True)
        (root / "masks" / split).mkdir(parents=True)
        for i, (h, w) in enumerate(sizes):
            mask = np.zeros((h, w), np.uint8)
            mask[: h // 2, : w // 2] = 2  # classes 0 and 2 side by side: a bilinear resize would invent 1
            mask[-2:, -2:] = 255
            Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8)).save(root / "images" / split / f"{i}.jpg")
            Image.fromarray(mask, mode="L").save(root / "masks" / split / f"{i}.png")


@pytest.mark.slow
def test_folder_recipe_reads_classes_and_masks(tmp_path):
    _write_folder(tmp_path / "data")
    cfg = load_config(ROOT / "configs" / "segmentation_folder.yaml",
                      [f"data.dataset={tmp_path / 'data'}", "data.image_size=32", "data.batch_size=2", "epochs=1",
                       f"output_dir={tmp_path / 'run'}", "progress=false", "segmentation.channels=8",
                       "model.overrides={dims: [8, 16, 16, 16], heads: [1, 1, 1, 1], depths: [1, 1, 1, 1]}"])
    setup = get_task("segmentation").from_config(cfg)
    assert setup.task.labels == ["sky", "road", "car"] and setup.model.config.num_classes == 3
    assert setup.model.config.in_channels == 3 and setup.test_data is None
    with Image.open(tmp_path / "data" / "masks" / "train" / "0.png") as im:
        stored = torch.from_numpy(np.array(im)).long()
    x, m = setup.train_data[0]
    assert x.shape == (3, 32, 32) and torch.equal(m, stored)  # same size: untouched
    x, m = setup.train_data[2]  # 40x48 -> 32x32: nearest for the mask
    assert x.shape == (3, 32, 32) and m.shape == (32, 32)
    assert set(m.unique().tolist()) == {0, 2, 255}
    res = Trainer(setup.model, cfg, setup.train_data, setup.val_data, task=setup.task, log=lambda s: None).fit()
    assert 0.0 <= res["val_mIoU"] <= 1.0 and {"val_iou_sky", "val_iou_road", "val_iou_car"} <= set(res)
