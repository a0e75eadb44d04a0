"""Training checkpoints: written atomically each epoch, read back for an exact resume.

A checkpoint is a folder ``checkpoints/epoch-NNNN`` holding ``model.safetensors`` (a vitlab
checkpoint, usable on its own for predict/eval), ``ema.safetensors`` when EMA is on, and
``state.pt`` (optimizer, scheduler, scaler, RNG states, counters: tensors and plain Python
values only, read back with ``torch.load(weights_only=True)``). The folder is written under
a hidden temporary name (``.epoch-NNNN.tmp``) and renamed; then the ``latest`` pointer file
is replaced atomically. A kill at any moment leaves the previous checkpoint and pointer intact
and no half-written ``epoch-NNNN`` folder; the next save removes the temporary folder.
"""

from __future__ import annotations

import errno
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..pretrained import read_weights, save_checkpoint

LATEST = "latest"


def rng_state() -> dict[str, Any]:
    """Every RNG the training loop draws from (torch CPU/CUDA, numpy, Python)."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the RNG states captured by :func:`rng_state` (CUDA only where available)."""
    torch.set_rng_state(state["torch"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def save_training_checkpoint(
    run_dir: str | Path,
    epoch: int,
    model: nn.Module,
    state: dict[str, Any],
    ema_model: nn.Module | None = None,
    labels: list[str] | None = None,
    keep: int = 2,
    task: str | None = None,
) -> Path:
    """Write ``checkpoints/epoch-NNNN`` atomically and point ``latest`` at it.

    Args:
        run_dir: The run directory.
        epoch: Number of finished epochs.
        model: The (unwrapped) model.
        state: Optimizer/scheduler/scaler states, counters, metrics (tensors and plain values).
        ema_model: The EMA model, if any.
        labels: Class names stored with the weights.
        task: The task's registry name, recorded in the weights' metadata (``vitlab.load``).
        keep: How many most recent checkpoints to keep.
    """
    ck_dir = Path(run_dir) / "checkpoints"
    ck_dir.mkdir(parents=True, exist_ok=True)
    name = f"epoch-{epoch:04d}"
    tmp = ck_dir / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    final = ck_dir / name
    replaced = None
    try:
        tmp.mkdir()
        files = [save_checkpoint(model, tmp / "model.safetensors", labels=labels, task=task)]
        if ema_model is not None:
            files.append(save_checkpoint(ema_model, tmp / "ema.safetensors", labels=labels, task=task))
        _torch_save({**state, "epoch": epoch, "rng": rng_state()}, tmp / "state.pt")
        files.append(tmp / "state.pt")
        for f in files:
            _fsync(f)
        if final.exists():  # the same epoch again: move the old folder aside in one step, never half-deleted
            replaced = ck_dir / f".{name}.old"
            shutil.rmtree(replaced, ignore_errors=True)
            os.replace(final, replaced)
        os.replace(tmp, final)
        pointer_tmp = ck_dir / f".{LATEST}.tmp"
        pointer_tmp.write_text(name)
        _fsync(pointer_tmp)
        os.replace(pointer_tmp, ck_dir / LATEST)
    except BaseException:  # disk full, permission, Ctrl-C: the previous checkpoint and pointer stay
        shutil.rmtree(tmp, ignore_errors=True)
        (ck_dir / f".{LATEST}.tmp").unlink(missing_ok=True)
        raise
    if replaced is not None:
        shutil.rmtree(replaced, ignore_errors=True)
    old = sorted(p for p in ck_dir.glob("epoch-*") if p.is_dir() and p.name != name)
    for p in old[: max(0, len(old) - (keep - 1))]:
        shutil.rmtree(p, ignore_errors=True)
    return final


def _is_complete(folder: Path) -> bool:
    return (folder / "state.pt").is_file() and (folder / "model.safetensors").is_file()


def _torch_save(obj: Any, path: Path) -> None:
    """``torch.save``, with its short-write RuntimeError (``unexpected pos``) raised as OSError(ENOSPC)."""
    try:
        torch.save(obj, path)
    except RuntimeError as e:
        if "unexpected pos" in str(e) or "write" in str(e).lower():
            raise OSError(errno.ENOSPC, f"write failed, disk full? ({str(e).splitlines()[0]})", str(path)) from None
        raise


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The folder the ``latest`` pointer names, or None when the run has no checkpoint.

    If the pointer names a folder that is gone (a kill while the same epoch was being saved
    again), that folder's previous version (moved aside to ``.epoch-NNNN.old``) is returned,
    or else the newest complete ``epoch-NNNN`` folder.
    """
    ck_dir = Path(run_dir) / "checkpoints"
    pointer = ck_dir / LATEST
    if not pointer.is_file():
        return None
    name = pointer.read_text().strip()
    folder = ck_dir / name
    if folder.is_dir():
        return folder
    if _is_complete(ck_dir / f".{name}.old"):
        return ck_dir / f".{name}.old"
    complete = sorted(p for p in ck_dir.glob("epoch-*") if p.is_dir() and _is_complete(p))
    return complete[-1] if complete else None


def load_training_checkpoint(folder: str | Path) -> dict[str, Any]:
    """Read a checkpoint folder: ``{"model": state_dict, "ema": state_dict | None, **state}``."""
    folder = Path(folder)
    state_file = folder / "state.pt"
    if not state_file.is_file():
        raise FileNotFoundError(f"{folder} is not a training checkpoint (no state.pt)")
    try:
        state = torch.load(state_file, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - report any unreadable file the same way
        raise ValueError(f"cannot read {state_file} (truncated or corrupt?): {e}") from None
    state["model"] = read_weights(folder / "model.safetensors").state_dict
    ema = folder / "ema.safetensors"
    state["ema"] = read_weights(ema).state_dict if ema.is_file() else None
    return state
