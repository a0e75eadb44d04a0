"""Training checkpoints: written atomically each epoch, read back for an exact resume.

A checkpoint is a folder ``checkpoints/epoch-NNNN`` holding ``model.safetensors`` (a vitlab
checkpoint, usable on its own for predict/eval), ``ema.safetensors`` when EMA is on, and
``state.pt`` (optimizer, scheduler, scaler, RNG states, counters: tensors and plain Python
values only, read back with ``torch.load(weights_only=True)``). The folder is written under
a hidden temporary name (``.epoch-NNNN.tmp``) and renamed; then the ``latest`` pointer file
is replaced atomically. A kill at any moment leaves the previous checkpoint and pointer intact
and no half-written ``epoch-NNNN`` folder; the next save removes the temporary folder.

With ``distributed.strategy=fsdp`` the weights, the optimizer and the EMA are written by every
rank into ``dcp/`` with ``torch.distributed.checkpoint`` (each rank its shards; keyed by parameter
name, so a checkpoint saved on N ranks loads on M), next to rank 0's ``state.pt`` (without the
optimizer) and ``meta.json`` (the model's vitlab metadata and the parameters made 1-D for FSDP,
what ``vitlab convert`` needs to write one safetensors file). The same temporary folder, rename
and pointer rule applies: every rank writes into the temporary folder, rank 0 renames it.
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
#: The DCP folder inside a sharded (``distributed.strategy=fsdp``) checkpoint.
DCP_DIR = "dcp"
#: The model description next to it: the vitlab metadata and the parameters made 1-D for FSDP.
META_FILE = "meta.json"


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
    try:
        tmp.mkdir()
        files = [save_checkpoint(model, tmp / "model.safetensors", labels=labels, task=task)]
        if ema_model is not None:
            files.append(save_checkpoint(ema_model, tmp / "ema.safetensors", labels=labels, task=task))
        _torch_save({**state, "epoch": epoch, "rng": rng_state()}, tmp / "state.pt")
        files.append(tmp / "state.pt")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return _commit(ck_dir, name, tmp, files, keep)


def _commit(ck_dir: Path, name: str, tmp: Path, files: list[Path], keep: int) -> Path:
    """fsync ``files``, rename the finished ``tmp`` folder to ``name``, point ``latest`` at it, prune old ones."""
    final = ck_dir / name
    replaced = None
    try:
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
    weights = (folder / "model.safetensors").is_file() or (folder / DCP_DIR / ".metadata").is_file()
    return (folder / "state.pt").is_file() and weights


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


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


def _sharded_state(model: nn.Module, optimizer: torch.optim.Optimizer, ema_model: nn.Module | None) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    sd: dict[str, Any] = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer)}
    if ema_model is not None:
        sd["ema"] = get_model_state_dict(ema_model)
    return sd


def save_sharded_checkpoint(
    run_dir: str | Path,
    epoch: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    meta: dict[str, Any],
    ema_model: nn.Module | None = None,
    keep: int = 2,
    is_main: bool = True,
) -> Path:
    """Write ``checkpoints/epoch-NNNN`` of an FSDP run (called on every rank, a collective).

    Args:
        run_dir: The run directory (shared by the ranks).
        epoch: Number of finished epochs.
        model: The sharded model.
        optimizer: Its optimizer (its state goes into ``dcp/``, keyed by parameter name).
        state: Scheduler/scaler states, counters, metrics (rank 0's, into ``state.pt``).
        meta: ``meta.json``'s content (the vitlab metadata and the 1-D scalar names).
        ema_model: The sharded EMA model, if any.
        keep: How many most recent checkpoints to keep.
        is_main: True on rank 0, which prepares and renames the folder.
    """
    import json

    import torch.distributed.checkpoint as dcp

    ck_dir = Path(run_dir) / "checkpoints"
    name = f"epoch-{epoch:04d}"
    tmp = ck_dir / f".{name}.tmp"
    if is_main:
        ck_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    _barrier()
    try:
        dcp.save(_sharded_state(model, optimizer, ema_model), checkpoint_id=str(tmp / DCP_DIR))
        _barrier()
        if not is_main:
            _barrier()
            return ck_dir / name
        _torch_save({**state, "epoch": epoch, "rng": rng_state()}, tmp / "state.pt")
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2))
        files = [tmp / "state.pt", tmp / META_FILE, *sorted((tmp / DCP_DIR).iterdir())]
    except BaseException:
        if is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    final = _commit(ck_dir, name, tmp, files, keep)
    _barrier()
    return final


def load_sharded_checkpoint(folder: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                            ema_model: nn.Module | None = None) -> dict[str, Any]:
    """Load an FSDP checkpoint (saved on any number of ranks) into the sharded ``model``,
    ``optimizer`` and ``ema_model`` in place (a collective); returns ``state.pt``'s content
    with ``has_ema`` (whether the checkpoint holds an EMA)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    folder = Path(folder)
    if not (folder / DCP_DIR / ".metadata").is_file():
        raise FileNotFoundError(f"{folder} is not a sharded (distributed.strategy=fsdp) checkpoint: no {DCP_DIR}/.metadata")
    try:
        state = torch.load(folder / "state.pt", map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - report any unreadable file the same way
        raise ValueError(f"cannot read {folder / 'state.pt'} (missing, truncated or corrupt?): {e}") from None
    stored = dcp.FileSystemReader(str(folder / DCP_DIR)).read_metadata().state_dict_metadata
    has_ema = any(k.startswith("ema.") for k in stored)
    sd = _sharded_state(model, optimizer, ema_model if has_ema else None)
    dcp.load(sd, checkpoint_id=str(folder / DCP_DIR))
    set_model_state_dict(model, sd["model"])
    set_optimizer_state_dict(model, optimizer, sd["optim"])
    if ema_model is not None and has_ema:
        set_model_state_dict(ema_model, sd["ema"])
    state["has_ema"] = has_ema
    return state
