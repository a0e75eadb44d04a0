"""The training engine: schedule, parameter groups, EMA, accumulation, resume, NaN stop, CLI, configs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from resume_helpers import kill_after_epoch
import vitlab
from vitlab.cli import main as cli
from vitlab.training import (
    ModelEma,
    Trainer,
    TrainingDiverged,
    WarmupCosineScheduler,
    build_trainer,
    load_config,
    param_groups,
)
from vitlab.training.checkpoint import latest_checkpoint, load_training_checkpoint
from vitlab.training.recipes import DIGITS_RECIPE

ROOT = Path(__file__).resolve().parents[1]
TINY_DIGITS = [
    "model.overrides={image_size: 8, patch_size: 2, dim: 32, depth: 2, heads: 2, mlp_dim: 64}",
    "data.batch_size=64", "progress=false", "optim.warmup_epochs=1",
]


def tiny_cfg(tmp_path, *extra, epochs=2):
    return load_config(None, TINY_DIGITS + [f"epochs={epochs}", f"output_dir={tmp_path}", *extra], base=DIGITS_RECIPE)


def test_scheduler_follows_warmup_cosine_formula():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([{"params": [p], "lr_scale": 0.5}], lr=1.0)
    sched = WarmupCosineScheduler(opt, base_lr=0.1, total_steps=20, warmup_steps=4, min_lr=0.01)
    lrs = []
    for _ in range(20):
        lrs.append(opt.param_groups[0]["lr"])
        sched.step()
    for s, lr in enumerate(lrs):
        if s < 4:
            expected = 0.1 * (s + 1) / 4
        else:
            t = (s - 4) / 16
            expected = 0.01 + (0.1 - 0.01) * 0.5 * (1 + math.cos(math.pi * t))
        assert lr == pytest.approx(0.5 * expected, rel=1e-9), s
    assert lrs[3] == pytest.approx(0.05) and lrs[4] == pytest.approx(0.05)
    state = sched.state_dict()
    sched2 = WarmupCosineScheduler(opt, base_lr=0.1, total_steps=20, warmup_steps=4, min_lr=0.01)
    sched2.load_state_dict(state)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.5 * sched.lr_at(20))


def test_weight_decay_groups_and_layer_decay():
    model = vitlab.create_model("vit_tiny_patch16_224", image_size=8, patch_size=2, dim=16, depth=2, heads=2, mlp_dim=32)
    groups = param_groups(model, weight_decay=0.05)
    decay = {n for g in groups if g["weight_decay"] > 0 for n in g["names"]}
    no_decay = {n for g in groups if g["weight_decay"] == 0 for n in g["names"]}
    assert {"pos_embed.weight", "cls_token", "blocks.0.norm1.weight", "blocks.0.attn.qkv.bias", "head.bias", "norm.weight"} <= no_decay
    assert {"blocks.0.attn.qkv.weight", "blocks.1.mlp.fc2.weight", "head.weight", "patch_embed.proj.weight"} <= decay
    assert decay.isdisjoint(no_decay) and len(decay | no_decay) == len(list(model.parameters()))
    layered = param_groups(model, weight_decay=0.05, layer_decay=0.5)
    scale = {n: g["lr_scale"] for g in layered for n in g["names"]}
    # 4 layer ids: embeddings 0, blocks 1-2, head 3 -> scales 0.5^3, 0.5^2, 0.5, 1
    assert scale["patch_embed.proj.weight"] == 0.125 and scale["blocks.0.attn.qkv.weight"] == 0.25
    assert scale["blocks.1.attn.qkv.weight"] == 0.5 and scale["head.weight"] == 1.0


def test_model_lr_scales_by_longest_prefix_and_times_layer_decay():
    class Two(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
            self.b = torch.nn.Linear(2, 2)

        def lr_scales(self):
            return {"a.": 0.5, "a.1.": 0.1}

    groups = param_groups(Two(), weight_decay=0.05)
    scale = {n: g["lr_scale"] for g in groups for n in g["names"]}
    assert scale == {"a.0.weight": 0.5, "a.0.bias": 0.5, "a.1.weight": 0.1, "a.1.bias": 0.1, "b.weight": 1.0,
                     "b.bias": 1.0}
    for g in groups:  # a group holds one scale
        assert {scale[n] for n in g["names"]} == {g["lr_scale"]}


def test_ema_update_formula():
    model = torch.nn.Linear(2, 1)
    ema = ModelEma(model, decay=0.9, warmup=False)
    w0 = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model)
    torch.testing.assert_close(ema.module.weight, 0.9 * w0 + 0.1 * (w0 + 1.0))
    warm = ModelEma(model, decay=0.999)
    assert warm.current_decay() == pytest.approx(1 / 10)


def test_gradient_accumulation_equals_large_batch(tmp_path):
    torch.manual_seed(0)
    base = ["optim.clip_grad=null", "ema_decay=null", "augment.affine_p=0", "augment.label_smoothing=0",
            "augment.cutmix_alpha=0",
            "model.overrides.drop_path=0", "data.dataset=synthetic"]
    runs = {}
    for name, extra in (("big", ["data.batch_size=32"]), ("accum", ["data.batch_size=16", "optim.accumulation_steps=2"])):
        cfg = load_config(None, TINY_DIGITS + base + extra + ["epochs=1", f"output_dir={tmp_path / name}"], base=DIGITS_RECIPE)
        trainer = build_trainer(cfg, log=lambda s: None)
        trainer.train_epoch()
        runs[name] = (trainer.step, {k: v.clone() for k, v in trainer.model.state_dict().items()})
    assert runs["big"][0] == runs["accum"][0]
    for k, v in runs["big"][1].items():
        torch.testing.assert_close(runs["accum"][1][k], v, atol=2e-5, rtol=1e-4, msg=k)


def test_training_on_digits_learns(tmp_path):
    cfg = tiny_cfg(tmp_path, "optim.lr=3e-3", "ema_decay=null", "augment.affine_p=0", "augment.cutmix_alpha=0",
                   "data.batch_size=16", epochs=8)
    results = build_trainer(cfg, log=lambda s: None).fit()
    assert results["split"] == "test" and results["test_n"] == 359
    assert results["test_top1"] > 50.0  # chance is 10%; seeds 0-2 give 70-81% here
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == list(range(1, 9))
    assert lines[-1]["train_loss"] < lines[0]["train_loss"]
    assert {"lr", "throughput", "epoch_time", "val_top1", "val_top5"} <= set(lines[0])
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["test_top1"] == pytest.approx(results["test_top1"])
    assert json.loads((tmp_path / "config.json").read_text())["epochs"] == 8


def test_resume_after_kill_equals_uninterrupted(tmp_path):
    common = ["ema_decay=0.9", "model.overrides.drop_path=0.1"]  # EMA and stochastic depth use RNG + state
    full = build_trainer(tiny_cfg(tmp_path / "full", *common, epochs=3), log=lambda s: None)
    full_results = full.fit()

    first = build_trainer(tiny_cfg(tmp_path / "cut", *common, epochs=3), log=lambda s: None)
    kill_after_epoch(first, 2)
    assert latest_checkpoint(tmp_path / "cut").name == "epoch-0002"
    resumed = build_trainer(tiny_cfg(tmp_path / "cut", *common, epochs=3), log=lambda s: None)
    assert resumed.resume()
    res = resumed.fit()
    for a, b in zip(full.history, resumed.history):
        for k in ("train_loss", "val_loss", "val_top1", "ema_val_top1", "lr", "step"):
            assert a[k] == b[k], (k, a[k], b[k])
    assert res["test_top1"] == full_results["test_top1"]
    for k, v in full.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[k], v), k


def test_kill_during_checkpoint_write_keeps_previous(tmp_path, monkeypatch):
    trainer = build_trainer(tiny_cfg(tmp_path, epochs=2), log=lambda s: None)
    trainer.train_epoch()
    trainer.epoch = 1
    trainer.save()
    import vitlab.training.checkpoint as ck

    def crash(*a, **k):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(ck.torch, "save", crash)
    trainer.epoch = 2
    with pytest.raises(OSError):
        trainer.save()
    folder = latest_checkpoint(tmp_path)
    assert folder.name == "epoch-0001"
    assert load_training_checkpoint(folder)["epoch"] == 1


def test_nan_loss_stops_with_clear_message(tmp_path):
    trainer = build_trainer(tiny_cfg(tmp_path, epochs=3), log=lambda s: None)
    calls = {"n": 0}
    base = trainer.criterion

    def criterion(x, out, y):
        calls["n"] += 1
        loss = base(x, out, y)
        return loss * float("nan") if calls["n"] > 25 else loss  # epoch 1 has 20 batches

    trainer.criterion = criterion
    with pytest.raises(TrainingDiverged, match=r"loss is nan at epoch 2.*last good checkpoint is .*epoch-0001"):
        trainer.fit()
    assert latest_checkpoint(tmp_path).name == "epoch-0001"


def test_progressive_resizing_schedule_and_run(tmp_path):
    cfg = tiny_cfg(tmp_path, "data.progressive_sizes=[4, 8]", "data.progressive_epochs=[0, 1]", "data.image_size=8", epochs=2)
    trainer = build_trainer(cfg, log=lambda s: None)
    assert [trainer.image_size_at(e) for e in range(3)] == [4, 8, 8]
    trainer.fit()
    assert [h["image_size"] for h in trainer.history] == [4, 8]


# ---------------------------------------------------------------- configs and CLI
def test_bad_config_key_and_value_are_explained():
    with pytest.raises(ValueError, match=r"unknown config key 'optim.lrr'.*Did you mean 'lr'"):
        load_config(None, ["optim.lrr=1"])
    with pytest.raises(ValueError, match=r"epochs must be an integer"):
        load_config(None, ["epochs=ten"])
    with pytest.raises(ValueError, match=r"precision must be fp32, bf16 or fp16"):
        load_config(None, ["precision=fp8"])


def test_yaml_recipes_load_and_digits_matches_builtin():
    names = {p.name for p in (ROOT / "configs").glob("*.yaml")}
    assert {"vit_base.yaml", "vit_large.yaml", "swin_tiny.yaml", "training.yaml", "digits.yaml"} <= names
    for p in (ROOT / "configs").glob("*.yaml"):
        load_config(p)
    assert yaml.safe_load((ROOT / "configs" / "digits.yaml").read_text()) == DIGITS_RECIPE


def test_cli_train_eval_and_plan_spelling(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", *TINY_DIGITS, "--epochs", "1", "--output-dir", str(out), "--seed", "3"]
    assert cli(args) == 0
    text = capsys.readouterr().out
    assert "test accuracy: top-1" in text
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["seed"] == 3 and cfg["epochs"] == 1
    ck = latest_checkpoint(out)
    assert cli(["eval", "--checkpoint", str(ck), "--dataset", "digits", "--output-dir", str(tmp_path / "ev")]) == 0
    assert "top-1" in capsys.readouterr().out
    assert (tmp_path / "ev" / "eval_digits_test.json").is_file()
    # --resume on a finished run trains nothing more and reports the same accuracy.
    assert cli([*args, "--resume"]) == 0
    assert "resumed from" in capsys.readouterr().out
    # The original plan's spelling parses to the same config.
    from vitlab.cli import _train_config, build_parser

    plan = build_parser().parse_args(["train", "--model", "vit_base", "--dataset", "imagenet", "--epochs", "100",
                                      "--batch_size", "256", "--learning_rate", "1e-3"])
    c = _train_config(plan)
    assert (c.model.name, c.data.dataset, c.epochs, c.data.batch_size, c.optim.lr) == (
        "vit_base_patch16_224", "imagenet", 100, 256, 1e-3)
    assert cli(["train", "optim.lrr=1"]) == 2
    assert "unknown config key 'optim.lrr'" in capsys.readouterr().err
