"""The examples run as written (with few epochs, to keep CI fast)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_example(name: str, *args: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    res = subprocess.run([sys.executable, str(ROOT / "examples" / name), *args], capture_output=True, text=True,
                         env=env, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    return res.stdout


def test_classification_example(tmp_path):
    out = run_example("classification.py", "--epochs", "2", "--output-dir", str(tmp_path))
    assert "test top-1" in out and out.count("predicted") == 5


def test_transfer_learning_example(tmp_path):
    out = run_example("transfer_learning.py", "--source-epochs", "2", "--epochs", "1", "--output-dir", str(tmp_path))
    assert "after unfreezing: test top-1" in out
    assert (tmp_path / "target" / "full" / "results.json").is_file()


@pytest.mark.parametrize("script", ["classification.py", "transfer_learning.py"])
def test_examples_have_help(script):
    assert "usage" in run_example(script, "--help")
