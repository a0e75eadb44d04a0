"""``vitlab convert`` for sharded checkpoints: a DCP checkpoint <-> one safetensors file.

An FSDP run (``distributed.strategy=fsdp``) saves ``checkpoints/epoch-NNNN/{dcp/, meta.json,
state.pt}`` (:mod:`vitlab.training.checkpoint`). :func:`dcp_to_safetensors` gathers the model's
(or the EMA's) shards from ``dcp/`` into one vitlab safetensors file, with the parameters FSDP
holds as 1-D turned back into scalars and the model's vitlab metadata, so ``vitlab.load``,
predict and eval read it like any checkpoint. :func:`safetensors_to_dcp` goes back: a folder
``{dcp/, meta.json}`` holding the model's weights only (scalars made 1-D again), which
:func:`torch.distributed.checkpoint.load` reads on any number of ranks. No process group is needed.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from .checkpoint import DCP_DIR, META_FILE
from .fsdp import scalars_back, scalars_forward


def is_dcp_checkpoint(path: str | Path) -> bool:
    """True for a DCP folder (with ``.metadata``) or a checkpoint folder holding one in ``dcp/``."""
    path = Path(path)
    return (path / ".metadata").is_file() or (path / DCP_DIR / ".metadata").is_file()


def _dcp_folder(path: Path) -> tuple[Path, Path]:
    """The DCP folder and the ``meta.json`` beside it."""
    if (path / DCP_DIR / ".metadata").is_file():
        return path / DCP_DIR, path / META_FILE
    if (path / ".metadata").is_file():
        return path, path.parent / META_FILE
    raise FileNotFoundError(f"{path} is not a DCP checkpoint: expected {path / DCP_DIR / '.metadata'} "
                            f"(a checkpoint folder of a distributed.strategy=fsdp run) or {path / '.metadata'}")


def read_dcp_weights(path: str | Path, which: str = "model") -> tuple[dict[str, torch.Tensor], dict]:
    """The full (unsharded) weights ``which`` (``model`` or ``ema``) of a DCP checkpoint, with the
    scalars restored, and its ``meta.json`` (empty when missing)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    folder, meta_file = _dcp_folder(Path(path))
    meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
    reader = dcp.FileSystemReader(str(folder))
    stored = reader.read_metadata().state_dict_metadata
    prefix = f"{which}."
    sd = {k[len(prefix):]: torch.empty(tuple(m.size), dtype=m.properties.dtype)
          for k, m in stored.items() if k.startswith(prefix) and isinstance(m, TensorStorageMetadata)}
    if not sd:
        groups = sorted({k.split(".", 1)[0] for k in stored})
        raise ValueError(f"{path} holds no {which!r} weights (it has: {', '.join(groups)})")
    dcp.load({which: sd}, storage_reader=reader, no_dist=True)
    return scalars_back(sd, meta.get("scalar_params", [])), meta


def dcp_to_safetensors(src: str | Path, dst: str | Path, which: str = "model") -> Path:
    """Write the weights ``which`` of the DCP checkpoint ``src`` as the vitlab safetensors file ``dst``."""
    from safetensors.torch import save_file

    sd, meta = read_dcp_weights(src, which)
    dst = Path(dst)
    if dst.suffix != ".safetensors":
        dst = dst / "model.safetensors"
    dst.parent.mkdir(parents=True, exist_ok=True)
    header = {"format": "pt"}
    if "vitlab" in meta:
        header["vitlab"] = json.dumps(meta["vitlab"])
    tmp = dst.with_name(dst.name + ".tmp")
    try:
        save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp), metadata=header)
        os.replace(tmp, dst)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return dst


def safetensors_to_dcp(src: str | Path, dst: str | Path, scalars_1d: bool = True) -> Path:
    """Write the safetensors file ``src`` as a folder ``dst`` with ``dcp/`` (key ``model``) and ``meta.json``.

    Args:
        src: A vitlab (or any) safetensors file.
        dst: The folder to create (written under ``.NAME.tmp`` and renamed).
        scalars_1d: Store 0-d tensors as 1-D of size 1, as an FSDP model holds them.
    """
    import torch.distributed.checkpoint as dcp
    from safetensors import safe_open
    from safetensors.torch import load_file

    src, dst = Path(src), Path(dst)
    if not src.is_file() or src.suffix != ".safetensors":
        raise FileNotFoundError(f"expected a .safetensors file to convert to DCP, got {src}")
    sd = load_file(str(src))
    with safe_open(str(src), "pt") as f:
        header = f.metadata() or {}
    names = [k for k, v in sd.items() if v.dim() == 0] if scalars_1d else []
    meta = {"vitlab": json.loads(header["vitlab"])} if "vitlab" in header else {}
    meta["scalar_params"] = names
    if dst.exists():
        raise FileExistsError(f"{dst} already exists: choose a new folder for the DCP checkpoint")
    tmp = dst.with_name(f".{dst.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        dcp.save({"model": scalars_forward(sd, names)}, checkpoint_id=str(tmp / DCP_DIR), no_dist=True)
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2))
        os.replace(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst
