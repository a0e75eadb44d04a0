"""MAE / SimMIM as a task of the engine, its run directory, and downstream use (issue 12).

Every run here is tiny (16 px digits, 4 px patches, one block of width 16, a few dozen images),
built the way ``build_trainer`` builds it but on a subset of the digits so each epoch is a few
steps.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from torch.utils.data import Subset

from resume_helpers import kill_after_epoch
from vitlab.cli import _train_config, build_parser
from vitlab.tasks import get_task
from vitlab.tasks.mae import MAE, LinearProbe, SimMIM, encoder_from_run, init_from_overrides
from vitlab.tasks.mae.model import patchify
from vitlab.tasks.mae.task import GRID_IMAGES
from vitlab.training import Trainer, load_config
from vitlab.training.checkpoint import latest_checkpoint, load_training_checkpoint
from vitlab.tasks.mae.task import MAE_DIGITS_RECIPE
from vitlab.training.recipes import DIGITS_RECIPE

ROOT = Path(__file__).resolve().parents[1]
TINY_MAE = [
    "model.overrides={patch_size: 4, dim: 16, depth: 1, heads: 2, mlp_dim: 32}", "data.image_size=16",
    "data.batch_size=32", "data.eval_batch_size=32", "progress=false", "optim.warmup_epochs=1",
    "mae.decoder_dim=8", "mae.decoder_depth=1", "mae.decoder_heads=2",
]
TINY_SWIN = [
    "model.name=swin_tiny_patch4_window7_224", "data.image_size=16", "data.batch_size=32", "progress=false",
    "model.overrides={patch_size: 2, dim: 8, depths: [1, 1], heads: [1, 2], window_size: 4}", "mae.mask_ratio=0.5",
]


def mae_cfg(out: Path, *extra: str, epochs: int = 3):
    return load_config(None, TINY_MAE + [f"epochs={epochs}", f"output_dir={out}", *extra], base=MAE_DIGITS_RECIPE)


def small_trainer(cfg, n_train: int = 96, n_val: int = 32) -> Trainer:
    """``build_trainer`` on the first images of each split (same seeding)."""
    torch.manual_seed(cfg.seed)
    setup = get_task(cfg.task).from_config(cfg)
    return Trainer(setup.model, cfg, Subset(setup.train_data, range(n_train)), Subset(setup.val_data, range(n_val)),
                   task=setup.task, log=lambda s: None)


@pytest.fixture(scope="module")
def mae_run(tmp_path_factory):
    """A finished 2-epoch tiny MAE run directory."""
    out = tmp_path_factory.mktemp("mae") / "run"
    trainer = small_trainer(mae_cfg(out, epochs=2), n_train=64)
    trainer.fit()
    return out


# ------------------------------------------------------------------ the task
def test_mae_resume_after_kill_is_bit_exact(tmp_path):
    full = small_trainer(mae_cfg(tmp_path / "full"))
    full_results = full.fit()

    cut = small_trainer(mae_cfg(tmp_path / "cut"))
    kill_after_epoch(cut, 2)
    resumed = small_trainer(mae_cfg(tmp_path / "cut"))
    assert resumed.resume() and resumed.epoch == 2
    res = resumed.fit()
    assert len(full.history) == len(resumed.history) == 3
    for a, b in zip(full.history, resumed.history):
        for k in ("train_loss", "val_loss", "lr", "step"):
            assert a[k] == b[k], (k, a[k], b[k])
    assert res["val_loss"] == full_results["val_loss"]
    for k, v in full.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[k], v), k


def test_training_noise_comes_from_the_engine_generator(tmp_path):
    trainer = small_trainer(mae_cfg(tmp_path / "r", "augment.affine_p=0.0"), n_train=8)
    task, cpu = trainer.task, torch.device("cpu")
    raw = next(iter(trainer.train_loader))
    before = torch.get_rng_state()
    a = task.prepare(raw, cpu, 16, torch.Generator().manual_seed(5))
    b = task.prepare(raw, cpu, 16, torch.Generator().manual_seed(5))
    c = task.prepare(raw, cpu, 16, torch.Generator().manual_seed(6))
    assert torch.equal(torch.get_rng_state(), before), "the global RNG must not be used"
    assert torch.equal(a.inputs[1], b.inputs[1]) and not torch.equal(a.inputs[1], c.inputs[1])
    assert a.inputs[1].shape == (raw[0].shape[0], 16)  # one noise value per 4x4 patch of a 16x16 image
    # evaluation: the same masks at every evaluation
    e1 = trainer.evaluate(trainer.val_loader)
    e2 = trainer.evaluate(trainer.val_loader)
    assert e1["loss"] == e2["loss"] and torch.equal(e1["reconstructions"], e2["reconstructions"])


def test_mae_config_values_reach_the_model(tmp_path):
    cfg = mae_cfg(tmp_path / "r", "mae.mask_ratio=0.5", "mae.decoder_dim=12", "mae.decoder_depth=3",
                  "mae.decoder_heads=3", "mae.norm_pix_loss=true")
    model = get_task("mae").from_config(cfg).model
    assert isinstance(model, MAE)
    assert model.config.norm_pix_loss and model.decoder.decoder_embed.out_features == 12
    assert len(model.decoder.decoder_blocks) == 3 and model.decoder.decoder_blocks[0].attn.heads == 3
    mask = model.random_mask(torch.zeros(2, 1, 16, 16))
    assert mask.sum(dim=1).tolist() == [8, 8]
    assert cfg.model.overrides["in_channels"] == 1  # recorded for the run's config.json (downstream)


def test_hierarchical_backbone_gets_simmim_with_mask_at_patch_resolution(tmp_path):
    cfg = load_config(None, TINY_SWIN + [f"output_dir={tmp_path}", "epochs=1"], base=MAE_DIGITS_RECIPE)
    torch.manual_seed(0)
    model = get_task("mae").from_config(cfg).model
    assert isinstance(model, SimMIM) and model.encoder.mask_token is not None
    assert (model.stride, model.grid, model.num_patches) == (4, (4, 4), 16)  # 16 px / total stride 4
    g = torch.Generator().manual_seed(1)
    x, noise = torch.randn(2, 1, 16, 16, generator=g), torch.rand(2, 16, generator=g)
    seen = []
    hook = model.encoder.layers[0].blocks[0].register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    loss, pred, mask = model(x, noise)
    hook.remove()
    assert mask.sum(dim=1).tolist() == [8, 8]
    embedded, _ = model.encoder.patch_embed(x)  # (2, 8*8, C): 2x2 patches
    token = model.encoder.mask_token[0, 0]
    for b in range(2):
        for r in range(8):
            for c in range(8):
                cell_hidden = bool(mask[b, (r // 2) * 4 + c // 2])  # each 4x4 cell covers 2x2 patches
                want = token if cell_hidden else embedded[b, r * 8 + c]
                assert torch.equal(seen[0][b, r * 8 + c], want), (b, r, c)
    # L1 on the hidden cells' pixels only, by hand
    target = patchify(x, 4)  # (2, 16, 16) pixels per cell
    per_cell = (pred - target).abs().mean(dim=-1)
    expected = per_cell[mask].mean()
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-7)
    loss.backward()
    dead = [k for k, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
    assert not dead, dead


def test_simmim_l2_option(tmp_path):
    cfg = load_config(None, TINY_SWIN + [f"output_dir={tmp_path}", "epochs=1", "mae.simmim_loss=l2"],
                      base=MAE_DIGITS_RECIPE)
    model = get_task("mae").from_config(cfg).model
    x, noise = torch.randn(2, 1, 16, 16), torch.rand(2, 16)
    loss, pred, mask = model(x, noise)
    torch.testing.assert_close(loss, (pred - patchify(x, 4)).pow(2).mean(dim=-1)[mask].mean())


def test_mae_over_cait_drops_tokens_and_trains_every_parameter(tmp_path):
    cfg = mae_cfg(tmp_path / "r", "model.name=cait_xxs24_224",
                  "model.overrides={patch_size: 4, dim: 16, depth: 1, heads: 2, depth_token_only: 1}")
    torch.manual_seed(0)
    model = get_task("mae").from_config(cfg).model
    assert isinstance(model, MAE)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    loss, _, mask = model(torch.randn(2, 1, 16, 16), torch.rand(2, 16))
    loss.backward()
    dead = [k for k, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
    assert not dead, dead


# ------------------------------------------------------------------ the run directory
def test_run_directory_has_a_reconstruction_grid_per_evaluation_and_loss_curves(mae_run):
    files = sorted(p.name for p in (mae_run / "reconstructions").iterdir())
    assert files == ["epoch-0001.png", "epoch-0002.png"]
    assert (mae_run / "loss_curves.png").is_file()
    # the grid: original / masked input (grey at hidden patches) / reconstruction, 4x upscaled
    img = np.asarray(Image.open(mae_run / "reconstructions" / "epoch-0002.png"))
    scale, pad, side = 4, 2, 16
    grid_width = scale * (GRID_IMAGES * (side + pad) + pad)
    margin = img.shape[1] - grid_width  # the row labels' white margin, left of the grid
    assert img.shape[0] == scale * (3 * (side + pad) + pad) and margin > 0
    for row in range(3):  # each row has its label's dark text in the margin
        band = img[scale * (pad + row * (side + pad)):scale * (pad + row * (side + pad) + side), :margin]
        assert (band < 128).any()
    cell = lambda row, i: img[scale * (pad + row * (side + pad)):scale * (pad + row * (side + pad) + side):scale,  # noqa: E731
                              margin + scale * (pad + i * (side + pad)):margin + scale * (pad + i * (side + pad) + side):scale]
    cfg = mae_cfg(mae_run)
    val = get_task("mae").from_config(cfg).val_data
    for i in range(GRID_IMAGES):
        original = np.round(val[i][0][0].clamp(0, 1).numpy() * 255).astype(np.uint8)
        assert np.abs(cell(0, i).astype(int) - original).max() <= 1
        masked, recon = cell(1, i), cell(2, i)
        hidden = (masked == 128) & (original != 128)
        assert 0 < hidden.sum() < side * side
        visible = masked != 128
        assert np.abs(recon[visible].astype(int) - original[visible]).max() <= 1  # visible copied
        assert np.array_equal(masked[visible], cell(0, i)[visible])


# ------------------------------------------------------------------ downstream
def _classification_cfg(run: Path, out: Path, *extra: str, task: str = "classification"):
    return load_config(None, init_from_overrides(run) + [f"task={task}", f"output_dir={out}", "epochs=1",
                                                         "progress=false", *extra], base=DIGITS_RECIPE)


def test_init_from_loads_the_run_encoder_bit_exact(mae_run, tmp_path):
    cfg = _classification_cfg(mae_run, tmp_path / "ft", "optim.layer_decay=0.75")
    assert (cfg.model.name, cfg.model.pretrained, cfg.data.image_size) == ("vit_tiny_patch16_224", str(mae_run), 16)
    trainer = small_trainer(cfg, n_train=32)
    run_sd = load_training_checkpoint(latest_checkpoint(mae_run))["model"]
    encoder = {k[len("encoder."):]: v for k, v in run_sd.items() if k.startswith("encoder.")}
    model_sd = trainer.model.state_dict()
    loaded = [k for k in model_sd if not k.startswith("head.")]
    assert sorted(loaded) == sorted(encoder)
    for k in loaded:
        assert torch.equal(model_sd[k], encoder[k]), k
    assert model_sd["head.weight"].shape == (10, 16)
    api = encoder_from_run(mae_run, num_classes=10).state_dict()  # the Python API: the same weights
    assert api.keys() == model_sd.keys() and all(torch.equal(api[k], encoder[k]) for k in loaded)
    scales = sorted({g["lr_scale"] for g in trainer.optimizer.param_groups})
    assert len(scales) == 3 and scales[-1] == 1.0 and scales[0] == pytest.approx(0.75**2)  # stem, block, norm/head


def test_linear_probe_task_freezes_the_encoder(mae_run, tmp_path):
    cfg = _classification_cfg(mae_run, tmp_path / "probe", task="linear_probe")
    trainer = small_trainer(cfg, n_train=64)
    probe = trainer.model
    assert isinstance(probe, LinearProbe) and not probe.norm.affine
    run_sd = load_training_checkpoint(latest_checkpoint(mae_run))["model"]
    before = {k: v.clone() for k, v in probe.encoder.state_dict().items()}
    for k, v in before.items():
        if not k.startswith("head."):
            assert torch.equal(v, run_sd[f"encoder.{k}"]), k
    head_before = probe.head.weight.clone()
    trainer.train_epoch()
    for k, v in probe.encoder.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert not torch.equal(probe.head.weight, head_before)
    assert not probe.encoder.training and probe.training
    trained = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert trained == {id(probe.head.weight), id(probe.head.bias)}


def test_linear_probe_task_reads_mae_probe_pool(mae_run, tmp_path):
    cfg = _classification_cfg(mae_run, tmp_path / "probe", "mae.probe_pool=mean", task="linear_probe")
    probe = get_task(cfg.task).from_config(cfg).model
    x = torch.rand(4, 1, 16, 16)
    tokens = probe.encoder.forward_features(x)  # (B, 1 + N, C)
    torch.testing.assert_close(probe.features(x), tokens[:, 1:].mean(1))
    with pytest.raises(ValueError, match="mae.probe_pool must be head or mean, got 'cls'"):
        _classification_cfg(mae_run, tmp_path / "bad", "mae.probe_pool=cls", task="linear_probe")


def test_overwrite_removes_an_mae_run_outputs(tmp_path):
    from vitlab.training.run import prepare_output_dir

    run = tmp_path / "run"
    (run / "reconstructions").mkdir(parents=True)
    (run / "reconstructions" / "epoch-0009.png").write_bytes(b"old")
    (run / "loss_curves.png").write_bytes(b"old")
    (run / "config.json").write_text("{}")
    prepare_output_dir(mae_cfg(run), overwrite=True)
    assert not (run / "reconstructions").exists() and not (run / "loss_curves.png").exists()


def test_init_from_errors_speak_to_the_user(tmp_path):
    with pytest.raises(FileNotFoundError, match="no training checkpoint"):
        init_from_overrides(tmp_path)


# ------------------------------------------------------------------ CLI and recipe
def test_cli_task_mae_defaults_to_the_mae_digits_recipe(mae_run):
    cfg = _train_config(build_parser().parse_args(["train", "--task", "mae"]))
    assert (cfg.task, cfg.recipe, cfg.data.image_size, cfg.model.overrides["patch_size"]) == ("mae", "mae_digits", 32, 4)
    assert cfg.mae.mask_ratio == 0.75
    assert yaml.safe_load((ROOT / "configs" / "mae_digits.yaml").read_text()) == MAE_DIGITS_RECIPE
    plain = _train_config(build_parser().parse_args(["train"]))
    assert plain.task == "classification" and plain.recipe == "digits"
    ft = _train_config(build_parser().parse_args(["train", "--init-from", str(mae_run), "--task", "linear_probe",
                                                  "data.image_size=16"]))
    assert (ft.task, ft.model.pretrained, ft.model.overrides["dim"]) == ("linear_probe", str(mae_run), 16)
    stored = json.loads((mae_run / "config.json").read_text())
    assert ft.model.overrides == stored["model"]["overrides"]


@pytest.mark.slow
def test_mae_example_runs_and_prints_the_table(tmp_path):
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    res = subprocess.run([sys.executable, str(ROOT / "examples" / "mae_pretraining.py"), "--pretrain-epochs", "1",
                          "--probe-epochs", "1", "--finetune-epochs", "1", "--output-dir", str(tmp_path),
                          "--model-overrides", "{patch_size: 4, dim: 16, depth: 1, heads: 2, mlp_dim: 32}"],
                         capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    import re

    assert "| linear probe (baseline: random init) |" in res.stdout
    labels = int(re.search(r"\| fine-tune on (\d+) labels", res.stdout).group(1))
    assert 120 <= labels <= 135  # 10% of each class of the 1259 training digits
    assert len(list((tmp_path / "mae" / "reconstructions").glob("epoch-*.png"))) == 1
    assert (tmp_path / "finetune" / "results.json").is_file() and (tmp_path / "scratch" / "results.json").is_file()


def test_init_from_a_run_of_another_architecture_is_one_clear_error(mae_run, tmp_path):
    cfg = _classification_cfg(mae_run, tmp_path / "ft", "model.overrides.dim=32")
    with pytest.raises(ValueError, match=r"^the encoder of .* does not fit VisionTransformer.*other shapes") as e:
        get_task("classification").from_config(cfg)
    assert "data.image_size" not in str(e.value)  # not mistaken for a size problem
