"""FSDP2 through torchrun on CPU (gloo): ``distributed.strategy=fsdp`` trains like one process with
the global batch (with accumulation, EMA sharded, a 0-d parameter made 1-D), and its DCP checkpoints
reshard: saved on 2 ranks resume on 1 and saved on 1 resume on 2 with every state bit-exact."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from safetensors import safe_open

from optional import needs
from vitlab.cli import main as cli
from vitlab.pretrained import read_weights
from vitlab.training import load_config
from vitlab.training.convert_dcp import read_dcp_weights

HERE = Path(__file__).parent
COMMON = [
    "data.dataset=synthetic", "progress=false", "ema_decay=0.9", "augment.affine_p=0", "device=cpu",
    "augment.label_smoothing=0", "augment.cutmix_alpha=0", "optim.warmup_epochs=1", "optim.lr=0.05",
    "optim.name=sgd",  # see tests/test_distributed.py: Adam would amplify the key bias's rounding noise
    "model.overrides={image_size: 8, patch_size: 2, dim: 32, depth: 2, heads: 2, mlp_dim: 64, drop_path: 0.0}",
]
FSDP = ["distributed.strategy=fsdp"]


def _run(out: Path, nproc: int, *overrides: str, mode: str = "train") -> None:
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE.parent / "src")}
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        env.pop(k, None)
    worker = [str(HERE / "fsdp_worker.py"), mode, str(out)]
    if nproc == 1:
        cmd = [sys.executable, *worker]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *worker]
    res = subprocess.run(cmd + COMMON + list(overrides), env=env, capture_output=True, text=True, timeout=400)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]


def _read(out: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict]:
    return (load_file(str(out / "weights.safetensors")), load_file(str(out / "optim.safetensors")),
            json.loads((out / "state.json").read_text()))


def test_strategy_is_validated():
    assert load_config(None, []).distributed.strategy == "ddp"
    with pytest.raises(ValueError, match=r"distributed.strategy must be ddp or fsdp, got 'zero3'"):
        load_config(None, ["distributed.strategy=zero3"])
    with pytest.raises(ValueError, match=r"distributed.compile .* needs distributed.strategy=fsdp"):
        load_config(None, ["distributed.compile=true"])


@pytest.fixture(scope="module")
def two_epochs(tmp_path_factory) -> dict[str, Path]:
    """Two epochs of plain single-process training (global batch 32) and of 2-rank FSDP (16 per rank)."""
    root = tmp_path_factory.mktemp("two_epochs")
    _run(root / "single", 1, "epochs=2", "data.batch_size=32")
    _run(root / "fsdp", 2, "epochs=2", "data.batch_size=16", *FSDP)
    return {"single": root / "single", "fsdp": root / "fsdp"}


def test_two_rank_fsdp_equals_one_process_with_the_global_batch(tmp_path, two_epochs):
    # Accumulation (2 micro-batches of 8 per rank), with activation checkpointing on.
    _run(tmp_path / "accum", 2, "epochs=2", "data.batch_size=8", "optim.accumulation_steps=2",
         "model.grad_checkpointing=true", *FSDP)
    ref, _, ref_state = _read(two_epochs["single"])
    for name, folder in (("fsdp", two_epochs["fsdp"]), ("accum", tmp_path / "accum")):
        got, _, state = _read(folder)
        assert state["step"] == ref_state["step"] > 2 and set(got) == set(ref)
        assert any(k.startswith("ema/") for k in got)  # the sharded EMA, gathered
        for k in ref:
            torch.testing.assert_close(got[k], ref[k], atol=2e-5, rtol=1e-4, msg=f"{name}: {k}")
    # The weights (and the 0-d stand-in for CLIP's logit scale) moved: the comparison is not vacuous.
    run = two_epochs["fsdp"] / "run" / "checkpoints"
    meta = json.loads(next(run.glob("epoch-*/meta.json")).read_text())
    assert meta["scalar_params"] == ["temp"] and meta["vitlab"]["family"] == "vit"  # not FSDPViT
    assert abs(float(ref["model/temp"]) - 1.25) > 1e-4


def _assert_same_state(a: Path, b: Path) -> None:
    wa, oa, sa = _read(a)
    wb, ob, sb = _read(b)
    assert set(wa) == set(wb) and set(oa) == set(ob) and oa
    for k in wa:
        assert torch.equal(wa[k], wb[k]), f"weights differ at {k}"
    for k in oa:
        assert torch.equal(oa[k], ob[k]), f"optimizer state differs at {k}"
    for key in ("epoch", "step", "scheduler", "ema_updates", "history", "lr"):
        assert sa[key] == sb[key], key


RESUME = ["epochs=1", "optim.name=adamw", *FSDP]  # AdamW: moments in the state


def _save(out: Path, nproc: int) -> Path:
    """Train one epoch on ``nproc`` ranks with a global batch of 16; returns the worker's folder."""
    _run(out, nproc, *RESUME, f"data.batch_size={16 // nproc}")
    return out


@pytest.fixture(scope="module")
def saved_on_two(tmp_path_factory) -> Path:
    return _save(tmp_path_factory.mktemp("fsdp2") / "saved", 2)


@pytest.mark.parametrize("saved, resumed", [(2, 1), (1, 2)])
def test_sharded_checkpoint_resumes_on_another_world_size_bit_exactly(tmp_path, saved_on_two, saved, resumed):
    src = saved_on_two if saved == 2 else _save(tmp_path / "saved", 1)
    ck = src / "run" / "checkpoints"
    assert (ck / "latest").read_text() == "epoch-0001" and not list(ck.glob(".*.tmp"))
    assert sorted(p.name for p in (ck / "epoch-0001").iterdir()) == ["dcp", "meta.json", "state.pt"]
    # The resumed run reads the same run directory on another number of ranks.
    (tmp_path / "resumed").mkdir()
    os.symlink(src / "run", tmp_path / "resumed" / "run")
    _run(tmp_path / "resumed", resumed, *RESUME, f"data.batch_size={16 // resumed}", mode="resume")
    _assert_same_state(src, tmp_path / "resumed")
    # The RNG continues from the one saved with the checkpoint (as the DDP resume does).
    saved_rng = torch.load(ck / "epoch-0001" / "state.pt", weights_only=True)["rng"]["torch"]
    assert _read(tmp_path / "resumed")[2]["rng"] == saved_rng.tolist()


def test_convert_dcp_to_safetensors_and_back_bit_exactly(tmp_path, saved_on_two, capsys):
    folder = saved_on_two / "run" / "checkpoints" / "epoch-0001"
    dumped = _read(saved_on_two)[0]
    for which in ("model", "ema"):
        out = tmp_path / f"{which}.safetensors"
        assert cli(["convert", str(folder), str(out), "--which", which]) == 0
        sd = load_file(str(out))
        assert set(sd) == {k.split("/", 1)[1] for k in dumped if k.startswith(f"{which}/")}
        for k, v in sd.items():
            assert torch.equal(v.reshape(-1), dumped[f"{which}/{k}"]), k
        assert sd["temp"].shape == ()  # the 1-D FSDP parameter is a scalar again
    ck = read_weights(tmp_path / "model.safetensors")  # a vitlab checkpoint, metadata included
    assert ck.vitlab_config["family"] == json.loads((folder / "meta.json").read_text())["vitlab"]["family"]
    # ... and back: safetensors -> DCP folder -> safetensors, every tensor and the header unchanged.
    assert cli(["convert", str(tmp_path / "model.safetensors"), str(tmp_path / "back"), "--to-dcp"]) == 0
    assert json.loads((tmp_path / "back" / "meta.json").read_text())["scalar_params"] == ["temp"]
    assert cli(["convert", str(tmp_path / "back"), str(tmp_path / "again.safetensors")]) == 0
    first, again = load_file(str(tmp_path / "model.safetensors")), load_file(str(tmp_path / "again.safetensors"))
    assert set(first) == set(again) and all(torch.equal(first[k], again[k]) for k in first)
    with safe_open(str(tmp_path / "again.safetensors"), "pt") as a, safe_open(str(tmp_path / "model.safetensors"), "pt") as b:
        assert a.metadata() == b.metadata()
    original, _ = read_dcp_weights(folder)
    converted, _ = read_dcp_weights(tmp_path / "back")
    assert all(torch.equal(original[k], converted[k]) for k in original)
    # An existing destination is refused in one line, not overwritten.
    capsys.readouterr()
    assert cli(["convert", str(tmp_path / "model.safetensors"), str(tmp_path / "back"), "--to-dcp"]) != 0
    assert "already exists" in capsys.readouterr().err


def test_fsdp_run_stopped_and_resumed_continues_exactly(tmp_path, two_epochs):
    opts = ["epochs=2", *FSDP]
    _run(tmp_path / "stopped", 2, *opts, "data.batch_size=16", mode="stop")
    assert (tmp_path / "stopped" / "run" / "checkpoints" / "latest").read_text() == "epoch-0001"
    assert not (tmp_path / "stopped" / "weights.safetensors").exists()  # it stopped after epoch 1
    for nproc in (2, 1):
        out = tmp_path / f"continued{nproc}"
        out.mkdir()
        os.symlink(tmp_path / "stopped" / "run", out / "run")
        _run(out, nproc, *opts, f"data.batch_size={32 // nproc}", mode="continue")
        got, _, state = _read(out)
        ref, _, ref_state = _read(two_epochs["fsdp"])
        assert state["step"] == ref_state["step"] and state["epoch"] == 2
        for k in ref:
            if nproc == 2:  # the same ranks: bit for bit the uninterrupted run
                assert torch.equal(got[k], ref[k]), f"resumed run differs at {k}"
            else:  # one rank with the global batch: the same up to summation order
                torch.testing.assert_close(got[k], ref[k], atol=2e-5, rtol=1e-4, msg=k)
        shutil.rmtree(tmp_path / "stopped" / "run" / "checkpoints" / "epoch-0002", ignore_errors=True)
        (tmp_path / "stopped" / "run" / "checkpoints" / "latest").write_text("epoch-0001")


def test_blocks_compiled_before_sharding_train_like_eager(tmp_path, two_epochs):
    _run(tmp_path / "compiled", 1, "epochs=2", "data.batch_size=32", "distributed.compile=true",
         "model.grad_checkpointing=true", *FSDP)
    got, _, state = _read(tmp_path / "compiled")
    ref, _, _ = _read(two_epochs["single"])
    assert state["compiled_graphs"] > 0
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], atol=1e-4, rtol=1e-3, msg=k)


CLIP = ["--task", "clip", "--epochs", "2", "--no-progress", "device=cpu", "augment.affine_p=0.0", "ema_decay=0.9",
        "model.overrides={patch_size: 4, dim: 16, depth: 1, heads: 2, mlp_dim: 32}",
        "clip={embed_dim: 16, text_overrides: {dim: 16, depth: 1, heads: 2, mlp_dim: 32}, captions_per_image: 1, "
        "vocab_size: 64}"]


@needs("tokenizers", "sklearn.datasets", extra="pip install 'vitlab[clip,digits]'")
def test_clip_trains_under_fsdp_like_ddp_and_converts_to_a_loadable_file(tmp_path):
    """CLIP calls its towers and temperature outside ``forward`` (registered FSDP forward methods)
    and has a 0-d logit scale; evaluation, plots, the DCP checkpoint and its conversion all work."""
    import vitlab

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE.parent / "src")}
    for name, extra in (("ddp", []), ("fsdp", FSDP)):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "vitlab.cli",
               "train", *CLIP, "--output-dir", str(tmp_path / name), *extra]
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert (tmp_path / "fsdp" / "similarity_matrix.png").is_file()  # the task's plot, from rank 0
    assert cli(["convert", str(tmp_path / "fsdp" / "checkpoints" / "epoch-0002"), str(tmp_path / "clip.safetensors")]) == 0
    got = load_file(str(tmp_path / "clip.safetensors"))
    ref = load_file(str(tmp_path / "ddp" / "checkpoints" / "epoch-0002" / "model.safetensors"))
    assert set(got) == set(ref) and got["logit_scale"].shape == ()
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], atol=2e-5, rtol=1e-4, msg=k)
    assert type(vitlab.load(str(tmp_path / "clip.safetensors"))).__name__ == "CLIP"


@pytest.fixture
def own_group():
    """The engine joins a 1-rank group of its own in this process: none is left behind for later
    tests (a forked worker would inherit it and fail to join its own)."""
    yield
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def test_a_failed_sharded_save_leaves_the_previous_checkpoint(tmp_path, monkeypatch, own_group):
    """In one process (a 1-rank group of its own): a save that fails half-way (disk full inside DCP)
    leaves the previous checkpoint, the ``latest`` pointer and no temporary folder; resuming reads it."""
    import torch.distributed.checkpoint as dcp

    import toy_task  # noqa: F401  (registers "toy_regression")
    from vitlab.training import build_trainer
    from vitlab.training.fsdp import full_model_state

    toy = ["task=toy_regression", "progress=false", "optim.name=adamw", "epochs=2", "ema_decay=0.9",
           f"output_dir={tmp_path}", *FSDP]
    trainer = build_trainer(load_config(None, toy), log=lambda s: None)
    trainer.train_epoch()
    trainer.epoch = 1
    trainer.save()
    saved = full_model_state(trainer.model)
    trainer.train_epoch()
    trainer.epoch = 2

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(dcp, "save", disk_full)
    with pytest.raises(OSError, match="No space left"):
        trainer.save()
    monkeypatch.undo()
    ck = tmp_path / "checkpoints"
    assert (ck / "latest").read_text() == "epoch-0001"
    assert sorted(p.name for p in ck.iterdir()) == ["epoch-0001", "latest"]
    again = build_trainer(load_config(None, toy), log=lambda s: None)
    assert again.resume() and again.epoch == 1
    resumed = full_model_state(again.model)
    assert all(torch.equal(saved[k], resumed[k]) for k in saved)
    assert not all(torch.equal(saved[k], v) for k, v in full_model_state(trainer.model).items())


def test_loading_a_sharded_checkpoint_says_to_convert_it(saved_on_two):
    from vitlab.errors import CheckpointError

    for path in (saved_on_two / "run", saved_on_two / "run" / "checkpoints" / "epoch-0001"):
        with pytest.raises(CheckpointError, match=r"sharded .*vitlab convert .*epoch-0001 model\.safetensors"):
            read_weights(path)
