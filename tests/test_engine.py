"""One engine, tasks on top: the task registry, a second task (tests/toy_task.py: regression
with an MLP) trained through the same Trainer with bf16 autocast, accumulation, EMA,
kill-and-resume and 2-rank DDP, TensorBoard event files, and the layering of tasks/ below training/."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import toy_task  # noqa: F401  (registers "toy_regression")
from resume_helpers import kill_after_epoch
from vitlab.cli import main as cli
from vitlab.tasks import ClassificationTask, UnknownTaskError, get_task, list_tasks
from vitlab.training import Trainer, build_trainer, load_config
from vitlab.training.checkpoint import latest_checkpoint

HERE = Path(__file__).parent
SRC = HERE.parent / "src" / "vitlab"
TOY = ["task=toy_regression", "progress=false", "optim.name=sgd", "optim.lr=0.05", "optim.warmup_epochs=1",
       "optim.clip_grad=null", "optim.weight_decay=0.0"]


def toy_trainer(out: Path, *extra: str, epochs: int = 3) -> Trainer:
    cfg = load_config(None, TOY + [f"epochs={epochs}", f"output_dir={out}", *extra])
    return build_trainer(cfg, log=lambda s: None)


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ----------------------------------------------------------------------------- registry
def test_tasks_are_picked_by_name_with_close_matches(tmp_path, capsys):
    assert get_task("classification") is ClassificationTask
    assert {"classification", "toy_regression"} <= set(list_tasks())
    with pytest.raises(UnknownTaskError, match=r"unknown task 'clasification'\. Did you mean 'classification'\?"):
        get_task("clasification")
    with pytest.raises(ValueError, match=r"unknown task 'toy_regresion'.*Did you mean 'toy_regression'"):
        load_config(None, ["task=toy_regresion"])
    # The CLI flag reaches the config: one line, exit 2, before anything is built.
    assert cli(["train", "--task", "clasification", "--epochs", "1", "--no-progress",
                "--output-dir", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Did you mean 'classification'" in err[0]
    # --task trains the task named: the toy's primary metric is what the CLI reports.
    assert cli(["train", "--task", "toy_regression", *TOY[1:], "--epochs", "1", "--output-dir",
                str(tmp_path / "toy")]) == 0
    assert "test mse:" in capsys.readouterr().out
    results = json.loads((tmp_path / "toy" / "results.json").read_text())
    assert results["task"] == "toy_regression" and results["primary_metric"] == "mse"
    assert json.loads((tmp_path / "toy" / "config.json").read_text())["task"] == "toy_regression"


# ----------------------------------------------------------------------- the toy task
def test_toy_task_runs_under_bf16_autocast(tmp_path):
    seen: dict[str, list] = {}
    for precision in ("bf16", "fp32"):
        trainer = toy_trainer(tmp_path / precision, f"precision={precision}", epochs=1)
        trainer.model.fc1.register_forward_hook(
            lambda m, i, out, key=precision: seen.setdefault(key, []).append(out.dtype) if m.training else None)
        trainer.train_epoch()
    # 96 samples in batches of 64: two training forwards.
    assert seen == {"bf16": [torch.bfloat16] * 2, "fp32": [torch.float32] * 2}


def test_toy_task_accumulation_equals_the_large_batch(tmp_path):
    runs = {}
    for name, extra in (("big", ["data.batch_size=32"]), ("accum", ["data.batch_size=8", "optim.accumulation_steps=4"])):
        trainer = toy_trainer(tmp_path / name, *extra, epochs=1)
        trainer.train_epoch()
        runs[name] = (trainer.step, weights(trainer.model))
    assert runs["big"][0] == runs["accum"][0] == 3
    init = weights(toy_trainer(tmp_path / "init", "data.batch_size=32", epochs=1).model)
    for k, v in runs["big"][1].items():
        torch.testing.assert_close(runs["accum"][1][k], v, atol=1e-6, rtol=1e-5, msg=k)
        assert (v - init[k]).abs().max() > 1e-3, k  # and training moved it


RESUME = ["precision=bf16", "optim.accumulation_steps=2", "data.batch_size=16", "ema_decay=0.9",
          "model.overrides={dropout: 0.2, noise: 0.1}"]


def test_toy_task_kill_and_resume_is_bit_exact(tmp_path):
    full = toy_trainer(tmp_path / "full", *RESUME)
    full_results = full.fit()

    cut = toy_trainer(tmp_path / "cut", *RESUME)
    kill_after_epoch(cut, 2)
    assert latest_checkpoint(tmp_path / "cut").name == "epoch-0002"
    resumed = toy_trainer(tmp_path / "cut", *RESUME)
    assert resumed.resume() and resumed.epoch == 2
    assert resumed.task.prepared == 2 * 96  # the task's own state came back
    res = resumed.fit()
    assert len(full.history) == len(resumed.history) == 3
    for a, b in zip(full.history, resumed.history):
        for k in ("train_loss", "train_mse", "val_mse", "val_mae", "ema_val_mse", "lr", "step"):
            assert a[k] == b[k], (k, a[k], b[k])
    for k in ("test_mse", "test_mae", "ema_test_mse", "final_val_mse"):
        assert res[k] == full_results[k], k
    assert resumed.task.prepared == full.task.prepared == 3 * 96
    for k, v in weights(full.model).items():
        assert torch.equal(resumed.model.state_dict()[k], v), k
    for k, v in weights(full.ema.module).items():
        assert torch.equal(resumed.ema.module.state_dict()[k], v), k
    lines = (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in lines] == [1, 2, 3]


def _run_worker(out: Path, nproc: int, batch: int, extra: list[str]) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE.parent / "src")}
    worker = [str(HERE / "engine_worker.py"), str(out)]
    if nproc == 1:
        cmd = [sys.executable, *worker]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *worker]
    res = subprocess.run(cmd + TOY[1:] + extra + [f"data.batch_size={batch}", "device=cpu", "epochs=2"], env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize("precision,tol", [("fp32", 1e-6), ("bf16", 3e-3)])
def test_toy_task_two_rank_ddp_equals_one_process(tmp_path, precision, tol):
    # Global batch 32 per optimizer step in both: 2 ranks x 8 x 2 micro-batches, 1 process x 16 x 2.
    common = [f"precision={precision}", "optim.accumulation_steps=2", "ema_decay=0.9"]
    _run_worker(tmp_path / "ddp", nproc=2, batch=8, extra=common)
    _run_worker(tmp_path / "single", nproc=1, batch=16, extra=common)
    init = load_file(str(tmp_path / "single" / "init0.safetensors"))
    for prefix in ("rank", "ema"):
        r0 = load_file(str(tmp_path / "ddp" / f"{prefix}0.safetensors"))
        r1 = load_file(str(tmp_path / "ddp" / f"{prefix}1.safetensors"))
        single = load_file(str(tmp_path / "single" / f"{prefix}0.safetensors"))
        assert r0.keys() == single.keys() == init.keys()
        for k in r0:
            assert torch.equal(r0[k], r1[k]), f"ranks diverged at {prefix} {k}"
            # fp32: reduction order only (~1e-7 here); bf16 autocast rounds the per-rank and the
            # whole-batch weight gradients differently (~1e-3 here, on weights of size ~1).
            torch.testing.assert_close(r0[k], single[k], atol=tol, rtol=0, msg=f"{prefix} {k}")
            assert (single[k] - init[k]).abs().max() > 50 * tol, f"{prefix} {k} did not train"
    lines = (tmp_path / "ddp" / "run" / "metrics.jsonl").read_text().splitlines()
    ddp_steps = [json.loads(x)["step"] for x in lines]
    single_steps = [json.loads(x)["step"] for x in (tmp_path / "single" / "run" / "metrics.jsonl").read_text().splitlines()]
    assert ddp_steps == single_steps == [3, 6]


# ------------------------------------------------------------------------- TensorBoard
def test_tensorboard_event_files_hold_the_epoch_metrics(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    trainer = toy_trainer(tmp_path, "log.tensorboard=true", epochs=2)
    trainer.fit()
    files = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert len(files) == 1
    scalars: dict[str, dict[int, float]] = {}
    for event in EventFileLoader(str(files[0])).Load():
        for v in event.summary.value:
            scalars.setdefault(v.tag, {})[event.step] = v.tensor.float_val[0] if v.HasField("tensor") else v.simple_value
    for rec in trainer.history:
        for key in ("train_loss", "val_mse", "lr"):
            assert scalars[key][rec["epoch"]] == pytest.approx(rec[key], rel=1e-6), key
    # Off by default: no event files.
    toy_trainer(tmp_path / "off", epochs=1).fit()
    assert not (tmp_path / "off" / "tensorboard").exists()


def test_tensorboard_missing_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as if not installed
    with pytest.raises(ImportError, match=r"pip install tensorboard"):
        toy_trainer(tmp_path, "log.tensorboard=true", epochs=1)
    toy_trainer(tmp_path / "off", epochs=1)  # not asked for: no import, no error


# ---------------------------------------------------------------------------- layering
def _imports(path: Path, top_level_only: bool = False) -> list[str]:
    """The vitlab modules a file imports (relative imports resolved), top level only if asked."""
    package = ["vitlab", *path.relative_to(SRC).parent.parts]
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = []
    for node in nodes:
        if isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            found.append(".".join(base + ([node.module] if node.module else [])))
        elif isinstance(node, ast.Import):
            found += [a.name for a in node.names]
    return found


def test_tasks_do_not_import_the_engine_and_the_engine_not_evaluation():
    for path in sorted((SRC / "tasks").rglob("*.py")):
        bad = [m for m in _imports(path) if m.startswith(("vitlab.training", "vitlab.evaluation"))]
        assert not bad, f"{path.name} imports {bad}: tasks sit below training/ and evaluation/"
    bad = [m for m in _imports(SRC / "training" / "trainer.py", top_level_only=True) if m.startswith("vitlab.evaluation")]
    assert not bad, f"the engine imports {bad} at top level"
