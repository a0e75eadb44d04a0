"""Run directories never lose a result; ``--resume`` continues the run with its own config."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vitlab.cli import main as cli
from vitlab.training.checkpoint import latest_checkpoint

#: A tiny digits ViT (one epoch takes about a second).
TINY = ["model.overrides={patch_size: 2, dim: 32, depth: 1, heads: 2, mlp_dim: 64}", "optim.warmup_epochs=1",
        "data.batch_size=256", "ema_decay=null",
        "--no-progress"]


def _snapshot(run: Path) -> dict[str, str]:
    """The run's result files and checkpoint names, to check nothing was touched."""
    files = {f: (run / f).read_text() for f in ("results.json", "metrics.jsonl", "config.json")}
    files["checkpoints"] = " ".join(sorted(p.name for p in (run / "checkpoints").iterdir()))
    files["written"] = " ".join(str((run / f).stat().st_mtime_ns) for f in ("results.json", "config.json"))
    return files


def test_fresh_runs_get_their_own_directories(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("VITLAB_RUNS_DIR", raising=False)
    assert cli(["train", *TINY, "--epochs", "1"]) == 0
    first = tmp_path / "runs" / "digits" / "vit_tiny_patch16_224-digits-1"
    assert f"run directory: {Path('runs/digits/vit_tiny_patch16_224-digits-1')}" in capsys.readouterr().out
    before = _snapshot(first)
    # a variant that keeps the recipe (other lr, other dataset/model) still gets a fresh directory
    assert cli(["train", *TINY, "--epochs", "1", "--lr", "0.002"]) == 0
    second = tmp_path / "runs" / "digits" / "vit_tiny_patch16_224-digits-2"
    assert json.loads((second / "config.json").read_text())["optim"]["lr"] == 0.002
    assert _snapshot(first) == before


def test_existing_run_is_refused_without_resume_or_overwrite(tmp_path, capsys):
    run = tmp_path / "run"
    assert cli(["train", *TINY, "--epochs", "2", "--output-dir", str(run)]) == 0
    before = _snapshot(run)
    capsys.readouterr()
    assert cli(["train", *TINY, "--epochs", "1", "--output-dir", str(run)]) == 2
    err = capsys.readouterr().err
    assert "already holds a run" in err and "--resume" in err and "--overwrite" in err
    assert _snapshot(run) == before and latest_checkpoint(run).name == "epoch-0002"
    assert cli(["train", *TINY, "--epochs", "1", "--output-dir", str(run), "--overwrite"]) == 0
    assert latest_checkpoint(run).name == "epoch-0001"
    assert [json.loads(x)["epoch"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [1]
    assert not (run / "checkpoints" / "epoch-0002").exists()


def test_resume_uses_the_runs_own_config_and_extends_epochs(tmp_path, capsys):
    run = tmp_path / "run"
    assert cli(["train", *TINY, "--epochs", "1", "--seed", "3", "--output-dir", str(run)]) == 0
    capsys.readouterr()
    # as the README writes it: no overrides repeated; the run's config (tiny model, seed 3) is restored
    assert cli(["train", "--output-dir", str(run), "--resume", "--epochs", "2", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "resumed from" in out and "extending the run from 1 to 2 epochs" in out
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["epochs"] == 2 and cfg["seed"] == 3 and cfg["model"]["overrides"]["dim"] == 32
    assert [json.loads(x)["epoch"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert latest_checkpoint(run).name == "epoch-0002"


def test_resume_refuses_what_cannot_change(tmp_path, capsys):
    run = tmp_path / "run"
    assert cli(["train", *TINY, "--epochs", "2", "--output-dir", str(run)]) == 0
    before = _snapshot(run)
    capsys.readouterr()
    assert cli(["train", "--output-dir", str(run), "--resume", "--epochs", "1"]) == 2
    assert "cannot shorten" in capsys.readouterr().err
    assert cli(["train", "--output-dir", str(run), "--resume", "--lr", "0.5"]) == 2
    err = capsys.readouterr().err
    assert "cannot change optim.lr on --resume" in err and len(err.strip().splitlines()) == 1
    assert cli(["train", "--output-dir", str(run), "--resume", "model.overrides.depth=3"]) == 2
    assert "cannot change model.overrides.depth" in capsys.readouterr().err
    # the same epochs on a finished run: nothing is trained or rewritten
    assert cli(["train", "--output-dir", str(run), "--resume", "--no-progress"]) == 0
    assert "already finished its 2 epochs" in capsys.readouterr().out
    assert _snapshot(run) == before


def test_resume_without_output_dir_takes_the_latest_run(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("VITLAB_RUNS_DIR", str(tmp_path / "r"))
    assert cli(["train", *TINY, "--epochs", "1"]) == 0
    assert cli(["train", *TINY, "--epochs", "1", "--seed", "5"]) == 0
    capsys.readouterr()
    assert cli(["train", "--resume", "--epochs", "2", "--no-progress"]) == 0
    latest = tmp_path / "r" / "digits" / "vit_tiny_patch16_224-digits-2"
    assert f"resumed from {latest}" in capsys.readouterr().out
    assert json.loads((latest / "config.json").read_text())["seed"] == 5
    other = tmp_path / "r" / "digits" / "vit_tiny_patch16_224-digits-1"
    assert json.loads((other / "config.json").read_text())["epochs"] == 1
    with pytest.raises(FileNotFoundError, match="no run of .*vit_small_patch16_224-digits"):
        from vitlab.cli import _cmd_train, build_parser

        _cmd_train(build_parser().parse_args(["train", "--resume", "--model", "vit_small"]))
