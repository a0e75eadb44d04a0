"""Real images: per-sample decode and crop in the loader, recipes on an ImageNet-style tree,
dataset defaults, preprocessing recorded truthfully, ``vitlab eval`` on a folder."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, TensorDataset

from vitlab.cli import _train_config, build_parser
from vitlab.cli import main as cli
from vitlab.datasets import EvalTransform, normalize
from vitlab.datasets.pipeline import RandomResizedCropSample, ResizeCenterCropSample
from vitlab.deploy import ViTClassifier
from vitlab.training import build_trainer, load_config
from vitlab.training.checkpoint import latest_checkpoint
from vitlab.tasks.image_classification import build_datasets

ROOT = Path(__file__).resolve().parents[1]
#: A ViT small enough to train a step in well under a second.
TINY_VIT = "model.overrides={patch_size: 8, dim: 32, depth: 1, heads: 2, mlp_dim: 64}"
SIZES = [(23, 31), (40, 17), (64, 48), (18, 18), (33, 57)]
MODES = ["RGB", "L", "RGBA", "P", "CMYK"]


def _image(mode: str, size: tuple[int, int], seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    rgb = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB")
    if mode == "P":
        return rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    return rgb.convert(mode)


def _save(img: Image.Image, path: Path) -> None:
    if img.mode in ("RGBA", "P"):
        img.save(path.with_suffix(".png"))
    else:
        img.save(path.with_suffix(".jpg"), quality=90)


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    """An ImageNet-style tree (train/ and val/, 2 classes) of JPEG/PNG files in mixed sizes and modes."""
    root = tmp_path_factory.mktemp("imagenet")
    k = 0
    for split, per_class in (("train", 5), ("val", 3)):
        for cls in ("n01", "n02"):
            d = root / split / cls
            d.mkdir(parents=True)
            for i in range(per_class):
                _save(_image(MODES[k % 5], SIZES[(k * 3) % 5], k), d / f"img{i}")
                k += 1
    return root


def _args(*argv: str):
    return build_parser().parse_args(["train", *argv])


# ------------------------------------------------------------------ per-sample transforms
def test_eval_sample_transform_resizes_shorter_side_then_center_crops():
    # 8x16 image, size 4, crop_pct 0.5: the shorter side is already floor(4 / 0.5) = 8, so no
    # resampling; the crop is rows 2..5 and columns 6..9.
    x = torch.arange(3 * 8 * 16, dtype=torch.float32).view(3, 8, 16) / (3 * 8 * 16)
    out = ResizeCenterCropSample(4, crop_pct=0.5, interpolation="nearest")(x)
    torch.testing.assert_close(out, x[:, 2:6, 6:10], rtol=0, atol=0)
    # and it is EvalTransform's geometry exactly (what ViTClassifier does with a checkpoint)
    y = torch.rand(3, 37, 23)
    ref = EvalTransform(16, 0.8, (0.0,) * 3, (1.0,) * 3, "bicubic")(y)
    torch.testing.assert_close(ResizeCenterCropSample(16, 0.8, "bicubic")(y).unsqueeze(0), ref, rtol=0, atol=0)


def test_random_resized_crop_boxes_follow_scale_and_ratio():
    g = torch.Generator().manual_seed(0)
    rrc = RandomResizedCropSample(8, scale=(0.25, 0.25), ratio=(1.0, 1.0), generator=g)
    boxes = [rrc.get_params(40, 40) for _ in range(50)]
    assert {(h, w) for _, _, h, w in boxes} == {(20, 20)}  # sqrt(0.25 * 1600) = 20
    tops, lefts = [t for t, *_ in boxes], [l for _, l, *_ in boxes]
    assert min(tops) >= 0 and max(tops) <= 20 and len(set(tops)) > 5 and len(set(lefts)) > 5
    wide = RandomResizedCropSample(8, scale=(0.3, 0.9), ratio=(2.0, 3.0), generator=g)
    for _ in range(50):
        top, left, h, w = wide.get_params(60, 90)
        assert 0.3 * 5400 * 0.85 <= h * w <= 0.9 * 5400 * 1.15 and 1.8 <= w / h <= 3.3
        assert 0 <= top <= 60 - h and 0 <= left <= 90 - w
    # a full-image crop is a plain resize of the whole image
    x = torch.rand(3, 12, 12)
    full = RandomResizedCropSample(6, scale=(1.0, 1.0), ratio=(1.0, 1.0), interpolation="bilinear")(x)
    torch.testing.assert_close(full, ResizeCenterCropSample(6, 1.0, "bilinear")(x), rtol=0, atol=0)


# ------------------------------------------------------------------ folders of real photos
@pytest.mark.parametrize("size", [None, 32], ids=["default-size", "image-size-32"])
def test_cli_trains_on_a_folder_of_mixed_size_and_mode_photos(tree, tmp_path, size):
    extra = [] if size is None else [f"data.image_size={size}"]
    out = tmp_path / "run"
    code = cli(["train", TINY_VIT, *extra, "data.num_workers=2", "augment.cutmix_alpha=0", "--dataset", str(tree),
                "--epochs", "1", "--batch-size", "4", "--output-dir", str(out), "--no-progress"])
    assert code == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["data"]["image_size"] == (size or 224)  # folders default to 224
    assert json.loads((out / "results.json").read_text())["val_n"] == 6


@pytest.mark.parametrize("recipe,model", [
    ("vit_base.yaml", "model.overrides.depth=1 model.overrides.dim=32 model.overrides.heads=2 "
                      "model.overrides.mlp_dim=64 model.overrides.patch_size=8"),
    ("vit_large.yaml", "model.overrides.depth=2 model.overrides.dim=32 model.overrides.heads=2 "
                       "model.overrides.mlp_dim=64 model.overrides.patch_size=8"),
    ("swin_tiny.yaml", "model.overrides.depths=[1,1] model.overrides.heads=[1,2] model.overrides.dim=16 "
                       "model.overrides.window_size=4"),
])
def test_imagenet_recipes_run_on_an_imagenet_tree(tree, tmp_path, recipe, model):
    out = tmp_path / "run"
    code = cli(["train", "--config", str(ROOT / "configs" / recipe), *model.split(), "data.image_size=32",
                "data.num_workers=1", "data.eval_batch_size=8", "--data-dir", str(tree), "--epochs", "1",
                "--batch-size", "4", "--output-dir", str(out), "--no-progress"])
    assert code == 0
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["step"] >= 1
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["data"]["dataset"], cfg["precision"], cfg["recipe"]) == ("imagenet", "bf16", recipe[:-5])


def test_folder_loader_crops_per_sample_in_workers(tree):
    """The training loader of a folder yields equal-sized random crops; the val loader center crops."""
    cfg = load_config(None, [TINY_VIT, f"data.dataset={tree}", "data.image_size=16", "augment.crop_scale=[0.2,0.5]"])
    train, val, test = build_datasets(cfg)
    assert test is None
    loader = DataLoader(train, batch_size=10, num_workers=2)
    torch.manual_seed(0)
    x1, _ = next(iter(loader))
    torch.manual_seed(1)
    x2, _ = next(iter(loader))
    assert x1.shape == (10, 3, 16, 16) and not torch.equal(x1, x2)  # random crops, drawn in the workers
    xv, _ = next(iter(DataLoader(val, batch_size=6)))
    path = val.samples[0][0]
    torch.testing.assert_close(xv[0], ResizeCenterCropSample(16, 0.875, "bicubic")(_decode(path)), rtol=0, atol=0)


def _decode(path: Path) -> torch.Tensor:
    with Image.open(path) as im:
        arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float() / 255.0


# ------------------------------------------------------------------ dataset defaults / composition
def test_dataset_brings_its_size_and_augmentation():
    digits = _train_config(_args())
    assert digits.data.image_size == 8 and digits.augment.affine_p == 0.8 and digits.model.overrides.get("patch_size") == 2
    cifar = _train_config(_args("--dataset", "cifar10"))
    assert (cifar.data.image_size, cifar.augment.affine_p, cifar.augment.hflip, cifar.augment.random_resized_crop) == (
        32, 0.0, 0.5, True)
    folder = _train_config(_args("--dataset", "some/folder"))
    assert (folder.data.image_size, folder.data.crop_pct, folder.data.interpolation) == (224, 0.875, "bicubic")
    # a recipe's `image_size: null` (configs/training.yaml) means the dataset's size
    assert load_config(ROOT / "configs" / "training.yaml", ["data.dataset=some/folder"]).data.image_size == 224
    # the recipe beats the dataset's defaults, dotted overrides beat the recipe, flags beat both
    vit_b = _train_config(_args("--config", str(ROOT / "configs" / "vit_base.yaml"), "--dataset", "cifar10",
                                "data.image_size=64", "optim.lr=1", "--lr", "0.5"))
    assert (vit_b.data.image_size, vit_b.data.crop_pct, vit_b.augment.randaugment, vit_b.optim.lr) == (
        64, 0.9, "rand-m9-mstd0.5-inc1", 0.5)


def test_model_flag_replaces_the_recipe_model_section():
    cfg = _train_config(_args("--model", "pvt_v2_b0", "model.overrides.drop_path=0.2"))
    assert cfg.model.name == "pvt_v2_b0" and cfg.model.overrides == {"drop_path": 0.2}
    cfg = _train_config(_args("--model", "vit_small"))
    assert cfg.model.overrides == {} and cfg.data.image_size == 8  # the data's size, not an upsampled 224


def test_model_that_cannot_take_the_data_size_says_what_to_set(tmp_path, capsys):
    code = cli(["train", "--model", "vit_small", "--epochs", "1", "--output-dir", str(tmp_path / "r"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "8x8 images of digits" in err and "model.overrides" in err and "data.image_size" in err


def test_run_that_needs_hours_on_cpu_warns_before_it_starts(tmp_path, capsys, monkeypatch):
    from vitlab.training import trainer as trainer_mod

    started = []
    monkeypatch.setattr(trainer_mod.Trainer, "fit", lambda self: started.append(True) or {})
    code = cli(["train", "--model", "vit_small", "data.image_size=224", "--device", "cpu",
                "--output-dir", str(tmp_path / "slow"), "--no-progress"])
    out = capsys.readouterr().out
    assert code == 0 and started
    assert "warning: this run needs about" in out and "hours on a CPU" in out
    code = cli(["train", TINY_VIT.replace("patch_size: 8", "patch_size: 2"), "--epochs", "1", "--device", "cpu",
                "--output-dir", str(tmp_path / "fast"), "--no-progress"])
    assert code == 0 and "warning" not in capsys.readouterr().out


# ------------------------------------------------------------------ preprocessing tells the truth
def test_checkpoint_records_the_preprocessing_validation_used(tree, tmp_path):
    cfg = load_config(None, [TINY_VIT, f"data.dataset={tree}", "data.image_size=16", "data.crop_pct=0.7",
                             "data.interpolation=bilinear", "epochs=1", "data.batch_size=5", "progress=false",
                             f"output_dir={tmp_path}", "augment.cutmix_alpha=0"])
    trainer = build_trainer(cfg, log=lambda s: None)
    trainer.fit()
    clf = ViTClassifier.from_pretrained(latest_checkpoint(tmp_path))
    pcfg = clf.model.pretrained_cfg
    assert (pcfg["input_size"], pcfg["crop_pct"], pcfg["interpolation"]) == (16, 0.7, "bilinear")
    val = trainer.val_loader.dataset
    x, _ = next(iter(trainer.val_loader))
    seen_in_validation = normalize(x, trainer.mean, trainer.std)
    paths = [str(p) for p, _ in val.samples[: x.shape[0]]]
    torch.testing.assert_close(clf.preprocess(paths), seen_in_validation, rtol=0, atol=1e-6)
    with torch.no_grad():
        trained = trainer.model.eval()(seen_in_validation).argmax(1)
    assert [r["index"] for r in clf.predict(paths)] == trained.tolist()


def _tiny_loader(mean: float = 0.5) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(16, 3, 16, 16, generator=g) - mean) / 0.25
    return DataLoader(TensorDataset(x, torch.arange(16) % 2), batch_size=8)


def test_vit_trainer_records_given_preprocessing_and_refuses_to_guess(tmp_path):
    from vitlab import ViTConfig, ViTTrainer

    config = ViTConfig(image_size=16, patch_size=8, num_classes=2, dim=32, depth=1, heads=2, mlp_dim=64)
    pre = dict(mean=(0.4, 0.5, 0.6), std=(0.2, 0.25, 0.3), crop_pct=0.95, interpolation="bilinear")
    ViTTrainer(config, output_dir=tmp_path / "known", preprocessing=pre, progress=False).train(_tiny_loader(), epochs=1)
    clf = ViTClassifier.from_pretrained(latest_checkpoint(tmp_path / "known"))
    t = clf.transform
    assert (t.mean, t.std, t.crop_pct, t.interpolation, t.input_size) == (
        (0.4, 0.5, 0.6), (0.2, 0.25, 0.3), 0.95, "bilinear", 16)

    with pytest.warns(UserWarning, match="preprocessing"):
        ViTTrainer(config, output_dir=tmp_path / "unknown", progress=False).train(_tiny_loader(), epochs=1)
    with pytest.raises(ValueError, match="does not record its preprocessing"):
        ViTClassifier.from_pretrained(latest_checkpoint(tmp_path / "unknown"))
    from vitlab.tasks.classify import evaluate_checkpoint

    with pytest.raises(ValueError, match="does not record its preprocessing"):
        evaluate_checkpoint(latest_checkpoint(tmp_path / "unknown"), "synthetic")
    with pytest.raises(ValueError, match="missing interpolation"):
        ViTTrainer(config, preprocessing=dict(mean=(0.5,) * 3, std=(0.5,) * 3, crop_pct=1.0))


# ------------------------------------------------------------------ vitlab eval on a folder
def test_cli_eval_on_a_folder_works_by_default(tree, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli(["train", TINY_VIT, "data.image_size=16", "--dataset", str(tree), "--epochs", "1", "--batch-size", "5",
                "--output-dir", str(out), "--no-progress"]) == 0
    capsys.readouterr()
    ck = latest_checkpoint(out)
    assert cli(["eval", "--checkpoint", str(ck), "--dataset", str(tree), "--output-dir", str(tmp_path / "ev")]) == 0
    text = capsys.readouterr().out
    assert f"{tree} val: top-1" in text and "(n=6)" in text  # no test/ folder: the val split
    results = json.loads((out / "results.json").read_text())
    ev = json.loads((tmp_path / "ev" / f"eval_{tree.name}_val.json").read_text())
    assert ev["top1"] == pytest.approx(results["val_top1"])  # the same preprocessing as in training
