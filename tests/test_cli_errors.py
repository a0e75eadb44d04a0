"""Issue 10 (part 2): every error a user can cause ends as one line with a documented exit code
(2 usage/input, 1 the run failed, 130 interrupted); --debug shows the traceback."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import vitlab
from vitlab.cli import main as cli
from vitlab.errors import CheckpointError, UnknownModelError
from vitlab.models import resolve_model_name
from vitlab.pretrained import read_weights, save_checkpoint
from vitlab.training.checkpoint import latest_checkpoint, load_training_checkpoint, save_training_checkpoint

TINY = dict(image_size=32, patch_size=8, dim=24, depth=2, heads=3, mlp_dim=48)


def tiny_vit(num_classes: int = 3) -> torch.nn.Module:
    return vitlab.create_model("vit_tiny_patch16_224", num_classes=num_classes, **TINY).eval()


@pytest.fixture
def ckpt_and_image(tmp_path):
    save_checkpoint(tiny_vit(), tmp_path / "ck", labels=["a", "b", "c"])
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(tmp_path / "x.png")
    return tmp_path / "ck", tmp_path / "x.png"


def one_line_error(capsys, *needles: str) -> str:
    out, err = capsys.readouterr()
    assert err.count("\n") == 1 and err.startswith("vitlab ") and ": error: " in err, err
    assert "Traceback" not in err
    for n in needles:
        assert n in err, (n, err)
    return err


# ------------------------------------------------------------------ devices
def test_unknown_device_is_a_usage_error(ckpt_and_image, capsys):
    ck, img = ckpt_and_image
    assert cli(["predict", "--checkpoint", str(ck), str(img), "--device", "tpu"]) == 2
    one_line_error(capsys, "unknown device 'tpu'", "expected auto, cpu, cuda, cuda:N or mps")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_on_a_cpu_machine_says_so(ckpt_and_image, capsys):
    ck, img = ckpt_and_image
    assert cli(["predict", "--checkpoint", str(ck), str(img), "--device", "cuda"]) == 2
    one_line_error(capsys, "device 'cuda' requested", "--device cpu")
    assert cli(["explain", "--checkpoint", str(ck), "--image", str(img), "--device", "cuda:0"]) == 2
    one_line_error(capsys, "device 'cuda:0' requested")


# ------------------------------------------------------------------ checkpoints given wrongly
def test_image_passed_as_checkpoint(ckpt_and_image, capsys):
    _, img = ckpt_and_image
    with pytest.raises(CheckpointError, match="is not a checkpoint .*an image"):
        read_weights(img)
    assert cli(["predict", "--checkpoint", str(img), str(img)]) == 2
    one_line_error(capsys, "x.png is not a checkpoint")
    for junk in (b"hello", b"epoch-0001"):  # torch.load raises KeyError: 101 and IndexError on these
        Path(img.parent / "junk.pt").write_bytes(junk)
        assert cli(["predict", "--checkpoint", str(img.parent / "junk.pt"), str(img)]) == 2
        one_line_error(capsys, "junk.pt is not a readable PyTorch checkpoint")


def test_latest_pointer_and_run_directory_are_followed(tmp_path, ckpt_and_image, capsys):
    _, img = ckpt_and_image
    model = tiny_vit()
    save_training_checkpoint(tmp_path / "run", 1, model, {"step": 1}, labels=["a", "b", "c"])
    pointer = tmp_path / "run" / "checkpoints" / "latest"
    assert pointer.read_text() == "epoch-0001"
    expected = model.state_dict()
    for source in (pointer, tmp_path / "run"):
        got = read_weights(source).state_dict
        assert all(torch.equal(got[k], expected[k]) for k in expected)
        assert cli(["predict", "--checkpoint", str(source), str(img)]) == 0
        assert capsys.readouterr().out.startswith(f"{img}: ")


# ------------------------------------------------------------------ model names
def test_aliases_and_family_names():
    assert resolve_model_name("swin_t") == "swin_tiny_patch4_window7_224"
    assert resolve_model_name("swin_tiny") == "swin_tiny_patch4_window7_224"
    assert resolve_model_name("vit_b") == "vit_base_patch16_224"
    assert resolve_model_name("deit_s") == "deit_small_patch16_224"  # not the distilled one
    assert resolve_model_name("swin_b") == "swin_base_patch4_window7_224"  # 224 before 384
    with pytest.raises(UnknownModelError) as e:
        resolve_model_name("swin")
    assert all(n in str(e.value) for n in vitlab.list_models("swin_*"))


def test_predict_with_a_mistyped_model_says_unknown_model(ckpt_and_image, capsys):
    _, img = ckpt_and_image
    assert cli(["predict", "--model", "vit_tiny_patch16_22", str(img)]) == 2
    err = one_line_error(capsys, "unknown model 'vit_tiny_patch16_22'", "Did you mean 'vit_tiny_patch16_224'")
    assert "checkpoint not found" not in err
    assert cli(["predict", "--model", "swin", str(img)]) == 2
    one_line_error(capsys, "'swin' names several models", "swin_tiny_patch4_window7_224")
    with pytest.raises(UnknownModelError, match="unknown model"):
        vitlab.ViTClassifier.from_pretrained("vit_tiny_patch16_22")
    # ... while a missing --checkpoint is a missing checkpoint, never a model name
    assert cli(["predict", "--checkpoint", "ck_missing", str(img)]) == 2
    one_line_error(capsys, "checkpoint not found: ck_missing")
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        vitlab.ViTClassifier.from_pretrained("runs/missing/best")


# ------------------------------------------------------------------ config values
def test_config_values_out_of_range_or_of_the_wrong_type(tmp_path, monkeypatch, capsys):
    import vitlab.training.run as run

    def must_not_train(cfg, resume=False, **kwargs):
        raise AssertionError(f"training started with an invalid config: {cfg.augment}")

    monkeypatch.setattr(run, "train", must_not_train)
    out = str(tmp_path / "run")
    assert cli(["train", "augment.hflip=2", "--output-dir", out]) == 2
    one_line_error(capsys, "augment.hflip must be in [0, 1], got 2")
    assert cli(["train", "optim.lr=-0.1", "--output-dir", out]) == 2
    one_line_error(capsys, "optim.lr must be >= 0")
    with pytest.raises(ValueError, match=r"dim='abc' does not fit; expected int"):
        vitlab.create_model("vit_tiny_patch16_224", dim="abc")
    with pytest.raises(ValueError, match=r"drop_path='x' does not fit; expected float"):
        vitlab.create_model("vit_tiny_patch16_224", drop_path="x")


# ------------------------------------------------------------------ interrupts, disk full, output paths
def test_ctrl_c_in_train_prints_how_to_resume(tmp_path, monkeypatch, capsys):
    import vitlab.training.run as run

    def interrupted(cfg, resume=False, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(run, "train", interrupted)
    try:
        code = cli(["train", "--output-dir", str(tmp_path / "r1"), "--epochs", "1"])
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C escaped the CLI as a traceback")
    assert code == 130
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "interrupted; nothing partial was saved" in err
    assert f"resume with: vitlab train --output-dir {tmp_path / 'r1'} --resume" in err


def test_ctrl_c_or_disk_full_while_checkpointing_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    import vitlab.pretrained.io as io
    import vitlab.training.checkpoint as ck

    model = tiny_vit()
    save_training_checkpoint(tmp_path, 1, model, {"step": 1})
    good = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.head.weight.add_(1.0)

    def no_space(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")  # a short file, then the error
        raise OSError(errno.ENOSPC, "No space left on device", filename)

    def short_write(obj, f):  # what torch.save raises on a full disk
        Path(f).write_bytes(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 73728 vs 73680")

    def ctrl_c(obj, f):
        raise KeyboardInterrupt

    cases = [(io, "save_file", no_space, OSError), (ck.torch, "save", short_write, OSError),
             (ck.torch, "save", ctrl_c, KeyboardInterrupt)]
    for module, attr, fake, exc in cases:
        with monkeypatch.context() as m:
            m.setattr(module, attr, fake)
            with pytest.raises(exc) as info:
                save_training_checkpoint(tmp_path, 2, model, {"step": 2})
        if exc is OSError:
            assert info.value.errno == errno.ENOSPC and info.value.filename
        assert latest_checkpoint(tmp_path).name == "epoch-0001"
        leftovers = [p.name for p in (tmp_path / "checkpoints").iterdir()]
        assert sorted(leftovers) == ["epoch-0001", "latest"], leftovers
        state = load_training_checkpoint(latest_checkpoint(tmp_path))
        assert all(torch.equal(state["model"][k], good[k]) for k in good)


def test_disk_full_while_saving_a_checkpoint_keeps_the_old_file(tmp_path, monkeypatch):
    import vitlab.pretrained.io as io

    old = tiny_vit()
    save_checkpoint(old, tmp_path / "ck")

    def no_space(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device", filename)

    monkeypatch.setattr(io, "save_file", no_space)
    with pytest.raises(OSError):
        save_checkpoint(tiny_vit(), tmp_path / "ck")
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["config.json", "model.safetensors"]
    got = read_weights(tmp_path / "ck").state_dict
    assert all(torch.equal(got[k], v) for k, v in old.state_dict().items())


def test_disk_full_in_train_is_one_line_naming_the_path(tmp_path, monkeypatch, capsys):
    import vitlab.pretrained.io as io
    import vitlab.training.run as run

    def train(cfg, resume=False, **kwargs):  # the real checkpoint writer on a full disk
        save_training_checkpoint(cfg.output_dir, 1, tiny_vit(), {"step": 1})

    def no_space(tensors, filename, metadata=None):
        raise OSError(errno.ENOSPC, "No space left on device", filename)

    monkeypatch.setattr(run, "train", train)
    monkeypatch.setattr(io, "save_file", no_space)
    out = tmp_path / "run"
    assert cli(["train", "--output-dir", str(out), "--epochs", "1"]) == 1
    one_line_error(capsys, "no space left on device while writing", str(out / "checkpoints"),
                   f"vitlab train --output-dir {out} --resume")


def test_output_path_under_a_file(tmp_path, ckpt_and_image, capsys):
    ck, img = ckpt_and_image
    (tmp_path / "afile").write_text("x")
    assert cli(["export", "--checkpoint", str(ck), "--output", str(tmp_path / "afile" / "m.onnx"), "--no-check"]) == 2
    one_line_error(capsys, str(tmp_path / "afile"), "not a folder")
    assert cli(["explain", "--checkpoint", str(ck), "--image", str(img), "--method", "saliency",
                "--output-dir", str(tmp_path / "afile" / "out")]) == 2
    one_line_error(capsys, "afile", "not a folder")


def test_permission_denied_names_the_path(tmp_path, ckpt_and_image, capsys):
    if os.geteuid() == 0:
        pytest.skip("root ignores file permissions")
    ck, img = ckpt_and_image
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        assert cli(["explain", "--checkpoint", str(ck), "--image", str(img), "--method", "saliency",
                    "--output-dir", str(locked / "out")]) == 1
        one_line_error(capsys, "permission denied", str(locked))
    finally:
        locked.chmod(0o700)


def test_diverged_training_is_one_line(tmp_path, monkeypatch, capsys):
    import vitlab.training.run as run
    from vitlab.training.trainer import TrainingDiverged

    def diverges(cfg, resume=False, **kwargs):
        raise TrainingDiverged("loss is nan at epoch 3, batch 7: training stopped. lower optim.lr")

    monkeypatch.setattr(run, "train", diverges)
    assert cli(["train", "--output-dir", str(tmp_path), "--epochs", "1"]) == 1
    one_line_error(capsys, "loss is nan at epoch 3")


def test_debug_shows_the_traceback(ckpt_and_image):
    _, img = ckpt_and_image
    with pytest.raises(CheckpointError):
        cli(["predict", "--debug", "--checkpoint", str(img), str(img)])
    with pytest.raises(CheckpointError):
        cli(["--debug", "predict", "--checkpoint", str(img), str(img)])


def test_unexpected_errors_are_one_line_with_a_debug_hint(ckpt_and_image, monkeypatch, capsys):
    import vitlab.tasks.classification as classification

    ck, img = ckpt_and_image

    def broken(self, image, top_k=5):
        raise KeyError(101)

    monkeypatch.setattr(classification.ViTClassifier, "predict", broken)
    assert cli(["predict", "--checkpoint", str(ck), str(img)]) == 1
    one_line_error(capsys, "internal error KeyError: 101", "--debug")


# ------------------------------------------------------------------ file modes
@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o027, 0o640)])
def test_checkpoint_files_respect_the_umask(tmp_path, mask, mode):
    old = os.umask(mask)
    try:
        file = save_checkpoint(tiny_vit(), tmp_path / "ck")
        single = save_checkpoint(tiny_vit(), tmp_path / "one.safetensors")
        run_ck = save_training_checkpoint(tmp_path / "run", 1, tiny_vit(), {"step": 1})
    finally:
        os.umask(old)
    for f in (file, tmp_path / "ck" / "config.json", single, run_ck / "model.safetensors", run_ck / "state.pt"):
        assert stat.S_IMODE(f.stat().st_mode) == mode, (f, oct(f.stat().st_mode))


# ------------------------------------------------------------------ hub: offline fails fast
def test_offline_hub_fails_fast_without_network_retries(tmp_path, monkeypatch):
    import socket

    pytest.importorskip("huggingface_hub")
    import huggingface_hub
    from huggingface_hub import constants

    from vitlab.pretrained import hub

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    probes, network = [], []

    def unreachable(address, timeout=None, *a, **kw):
        probes.append((address, timeout))
        raise OSError(errno.ENETUNREACH, "Network is unreachable")

    def fake_download(repo, name, revision=None, cache_dir=None, local_files_only=False):
        if not local_files_only:
            network.append(name)  # would wait through the hub client's retries
        raise FileNotFoundError(name)

    monkeypatch.setattr(socket, "create_connection", unreachable)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    with pytest.raises(FileNotFoundError, match="not in the local Hugging Face cache .* could not be reached"):
        hub.download("timm/vit_tiny_patch16_224.augreg_in21k_ft_in1k", cache_dir=tmp_path)
    assert network == [] and len(probes) == 1 and probes[0][1] <= 5
