"""DDP through torchrun on CPU (gloo): 2 ranks stay in sync and equal one process with the global batch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

HERE = Path(__file__).parent
COMMON = [
    "data.dataset=synthetic", "epochs=2", "progress=false", "ema_decay=null", "augment.affine_p=0",
    "augment.label_smoothing=0", "augment.cutmix_alpha=0", "optim.warmup_epochs=1", "optim.lr=0.05",
    # SGD, not AdamW: the gradient of the key bias is exactly zero in theory (softmax ignores a
    # constant per row), so it holds only rounding noise, which Adam would scale up to full steps.
    "optim.name=sgd",
    "model.overrides={image_size: 8, patch_size: 2, dim: 32, depth: 2, heads: 2, mlp_dim: 64, drop_path: 0.0}",
]


def _run(out: Path, nproc: int, batch: int) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE.parent / "src")}
    if nproc == 1:
        cmd = [sys.executable, str(HERE / "ddp_worker.py"), str(out)]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               str(HERE / "ddp_worker.py"), str(out)]
    res = subprocess.run(cmd + COMMON + [f"data.batch_size={batch}", "device=cpu"], env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]


def test_two_ranks_in_sync_and_equal_single_process(tmp_path):
    _run(tmp_path / "ddp", nproc=2, batch=16)
    _run(tmp_path / "single", nproc=1, batch=32)
    r0 = load_file(str(tmp_path / "ddp" / "rank0.safetensors"))
    r1 = load_file(str(tmp_path / "ddp" / "rank1.safetensors"))
    single = load_file(str(tmp_path / "single" / "rank0.safetensors"))
    for k in r0:
        assert torch.equal(r0[k], r1[k]), f"ranks diverged at {k}"
        torch.testing.assert_close(r0[k], single[k], atol=2e-5, rtol=1e-4, msg=k)
    # Only rank 0 wrote the run directory's checkpoint and metrics.
    assert (tmp_path / "ddp" / "run" / "checkpoints" / "latest").is_file()
    lines = (tmp_path / "ddp" / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2
    # Training moved the weights away from the shared initialisation.
    init = load_file(str(tmp_path / "ddp" / "init.safetensors"))
    assert max((r0[k] - init[k]).abs().max().item() for k in r0) > 1e-3
