"""Training checkpoints are atomic: a crash mid-write leaves no half checkpoint, resume takes the last whole one."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

import vitlab.training.checkpoint as ck
from vitlab.training import build_trainer, load_config
from vitlab.training.checkpoint import latest_checkpoint, load_training_checkpoint
from vitlab.training.recipes import DIGITS_RECIPE

TINY = [
    "model.overrides={image_size: 8, patch_size: 2, dim: 16, depth: 1, heads: 2, mlp_dim: 32}",
    "data.batch_size=64", "progress=false", "epochs=3",
]


class Crash(OSError):
    """The simulated kill: raised from inside the writer, nothing after it runs."""


def trainer(run_dir: Path, ema: bool):
    overrides = TINY + [f"output_dir={run_dir}", "ema_decay=0.9" if ema else "ema_decay=null"]
    return build_trainer(load_config(None, overrides, base=DIGITS_RECIPE), log=lambda s: None)


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def crash_on_second_file(monkeypatch, ema: bool) -> list[str]:
    """Make the write of the file after ``model.safetensors`` raise; returns the files written."""
    written: list[str] = []
    save_checkpoint, torch_save = ck.save_checkpoint, ck.torch.save

    def save_weights(model, path, **kwargs):
        if written:  # ema.safetensors: the second file when EMA is on
            raise Crash(f"killed while writing {Path(path).name}")
        written.append(Path(path).name)
        return save_checkpoint(model, path, **kwargs)

    def save_state(obj, path, *args, **kwargs):  # state.pt: the second file without EMA
        raise Crash(f"killed while writing {Path(path).name}")

    monkeypatch.setattr(ck, "save_checkpoint", save_weights)
    monkeypatch.setattr(ck.torch, "save", save_state if not ema else torch_save)
    return written


@pytest.mark.parametrize("ema", [False, True], ids=["model+state", "model+ema+state"])
def test_crash_after_the_model_file_leaves_no_half_checkpoint(tmp_path, monkeypatch, ema):
    run = trainer(tmp_path, ema)
    run.epoch = 1
    run.save()
    epoch1 = weights(run.model)
    ck_dir = tmp_path / "checkpoints"
    whole = sorted(p.name for p in (ck_dir / "epoch-0001").iterdir())
    assert whole == (["ema.safetensors", "model.safetensors", "state.pt"] if ema else ["model.safetensors", "state.pt"])

    with torch.no_grad():  # epoch 2 has other weights, so a resume from it would show
        for p in run.model.parameters():
            p.add_(1.0)
    run.epoch = 2
    written = crash_on_second_file(monkeypatch, ema)
    with pytest.raises(Crash):
        run.save()
    assert written == ["model.safetensors"]  # the crash came after the model file, before the rest
    monkeypatch.undo()

    # Nothing half-written is visible: only the previous checkpoint and the pointer to it.
    assert sorted(p.name for p in ck_dir.iterdir() if not p.name.startswith(".")) == ["epoch-0001", "latest"]
    assert (ck_dir / "latest").read_text().strip() == "epoch-0001"
    assert latest_checkpoint(tmp_path) == ck_dir / "epoch-0001"

    # A new trainer resumes from epoch 1, with epoch 1's weights.
    resumed = trainer(tmp_path, ema)
    assert resumed.resume()
    assert resumed.epoch == 1
    for k, v in weights(resumed.model).items():
        assert torch.equal(v, epoch1[k]), k

    # The next save goes through and replaces the leftovers of the crashed one.
    run.save()
    assert latest_checkpoint(tmp_path) == ck_dir / "epoch-0002"
    assert sorted(p.name for p in ck_dir.iterdir()) == ["epoch-0001", "epoch-0002", "latest"]
    assert load_training_checkpoint(ck_dir / "epoch-0002")["epoch"] == 2


def crash_on_rename_of(monkeypatch, name: str) -> None:
    """Make renaming the finished temporary folder ``name`` into place raise."""
    real_replace = ck.os.replace

    def replace(src, dst):
        if Path(src).name == name:
            raise Crash("killed before the new folder was renamed in")
        return real_replace(src, dst)

    monkeypatch.setattr(ck.os, "replace", replace)


def test_crash_before_the_rename_keeps_the_pointer_on_the_previous_checkpoint(tmp_path, monkeypatch):
    """All files written, killed just before the rename: the pointer is only moved afterwards."""
    run = trainer(tmp_path, ema=False)
    run.epoch = 1
    run.save()
    run.epoch = 2
    crash_on_rename_of(monkeypatch, ".epoch-0002.tmp")
    with pytest.raises(Crash):
        run.save()
    monkeypatch.undo()
    ck_dir = tmp_path / "checkpoints"
    assert (ck_dir / "latest").read_text().strip() == "epoch-0001"
    assert sorted(p.name for p in ck_dir.iterdir() if not p.name.startswith(".")) == ["epoch-0001", "latest"]


def test_crash_while_saving_the_same_epoch_again_resumes_from_a_whole_checkpoint(tmp_path, monkeypatch):
    """Saving epoch 2 a second time replaces the folder; a kill between moving the old one away
    and renaming the new one in leaves the pointer naming a missing folder: resume falls back to
    the old version of that folder, or else the newest whole checkpoint, instead of starting over."""
    run = trainer(tmp_path, ema=False)
    for epoch in (1, 2):
        run.epoch = epoch
        run.save()
    crash_on_rename_of(monkeypatch, ".epoch-0002.tmp")
    with pytest.raises(Crash):
        run.save()
    monkeypatch.undo()
    ck_dir = tmp_path / "checkpoints"
    assert (ck_dir / "latest").read_text().strip() == "epoch-0002" and not (ck_dir / "epoch-0002").exists()
    assert latest_checkpoint(tmp_path) == ck_dir / ".epoch-0002.old"  # the previous save of epoch 2
    resumed = trainer(tmp_path, ema=False)
    assert resumed.resume() and resumed.epoch == 2
    shutil.rmtree(ck_dir / ".epoch-0002.old")  # that gone too: the newest whole one
    assert latest_checkpoint(tmp_path) == ck_dir / "epoch-0001"
    resumed = trainer(tmp_path, ema=False)
    assert resumed.resume() and resumed.epoch == 1
