"""Reading and writing checkpoints: safetensors first, pickle only through ``weights_only``.

A vitlab checkpoint is ``model.safetensors`` whose metadata holds the model's name, family,
config and preprocessing (``vitlab`` key, JSON); saved into a folder it also gets a
``config.json`` beside it with the same content.
"""

from __future__ import annotations

import json
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from ..config import config_to_dict
from ..errors import CheckpointError

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.pth", "pytorch_model.pth", "model.pt")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt", ".ckpt")
FORMAT_VERSION = 1


@dataclass
class Checkpoint:
    """Weights read from a file plus what came with them.

    Attributes:
        state_dict: Tensors by key, in the file's own layout (timm, HF or vitlab).
        path: The weights file.
        vitlab_config: The ``vitlab`` metadata of a vitlab checkpoint (model name, family,
            config, preprocessing, labels), or None.
        hf_config: A Hugging Face ``config.json`` found beside the weights, or None.
    """

    state_dict: dict[str, Tensor]
    path: Path
    vitlab_config: dict[str, Any] | None = None
    hf_config: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def _read_safetensors(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            return {k: f.get_tensor(k) for k in f.keys()}, meta
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path} is not a readable safetensors file (truncated or corrupt?): {e}") from None


def _read_pickle_weights(path: Path) -> dict[str, Tensor]:
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(
            f"{path} holds Python objects other than tensors, and vitlab only unpickles plain "
            f"weights (torch.load(weights_only=True)); re-save it as a state dict or safetensors: {e}"
        ) from None
    except Exception as e:  # noqa: BLE001 - torch.load raises IndexError, KeyError ... on foreign files
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint (truncated or corrupt?): "
                              f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    # Unwrap common training-checkpoint containers.
    for key in ("state_dict", "model", "model_state_dict", "module"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise ValueError(f"{path} does not hold a state dict (a mapping of names to tensors)")
    return dict(obj)


def find_weights_file(folder: Path) -> Path:
    """The weights file in a checkpoint folder (model.safetensors, pytorch_model.bin, ...)."""
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            return folder / name
    candidates = sorted(p for p in folder.iterdir() if p.suffix in WEIGHT_SUFFIXES and p.is_file())
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise FileNotFoundError(
            f"no weights file in {folder}: expected one of {', '.join(WEIGHT_FILES)} or a single "
            f"*.safetensors/*.bin/*.pth file"
        )
    raise ValueError(f"{folder} holds several weight files ({', '.join(p.name for p in candidates)}); pass one of them")


_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


def _follow_pointer(path: Path) -> Path | None:
    """The folder a run's ``checkpoints/latest`` pointer file names (or a run directory's latest), else None."""
    if path.is_dir():
        pointer = path / "checkpoints" / "latest"
        return _follow_pointer(pointer) if pointer.is_file() and not any((path / n).is_file() for n in WEIGHT_FILES) else None
    if path.suffix or path.stat().st_size > 256:
        return None
    try:
        name = path.read_text().strip()
    except (UnicodeDecodeError, OSError):
        return None
    target = path.parent / name
    return target if name and "/" not in name and target.is_dir() else None


def read_weights(path: str | Path) -> Checkpoint:
    """Read a local weights file or checkpoint folder (no hub look-up).

    A run's ``checkpoints/latest`` pointer file, or a run directory, is followed to the
    checkpoint folder it names.

    Raises:
        FileNotFoundError: No such file or folder.
        CheckpointError: Not a checkpoint (an image, a text file, a corrupt file).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    target = _follow_pointer(path)
    if target is not None:
        path = target
    elif path.is_file() and path.suffix.lower() not in WEIGHT_SUFFIXES:
        hint = " (an image: pass it as the image argument, and the weights with --checkpoint)" \
            if path.suffix.lower() in _IMAGE_SUFFIXES else ""
        raise CheckpointError(f"{path} is not a checkpoint{hint}; expected a {'/'.join(WEIGHT_SUFFIXES)} file, "
                              f"a checkpoint folder, a run directory or a run's checkpoints/latest")
    if path.is_dir() and (path / "dcp" / ".metadata").is_file():  # an FSDP run's sharded checkpoint
        raise CheckpointError(f"{path} is a sharded (distributed.strategy=fsdp, DCP) checkpoint; gather it into one "
                              f"file first: vitlab convert {path} model.safetensors (then load model.safetensors)")
    folder = path if path.is_dir() else path.parent
    file = find_weights_file(path) if path.is_dir() else path
    meta: dict[str, str] = {}
    if file.suffix == ".safetensors":
        sd, meta = _read_safetensors(file)
    else:
        sd = _read_pickle_weights(file)
    # Strip a DDP / wrapper prefix shared by every key.
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    vitlab_cfg = json.loads(meta["vitlab"]) if "vitlab" in meta else None
    hf_cfg = None
    cfg_file = folder / "config.json"
    if cfg_file.is_file():
        try:
            cfg = json.loads(cfg_file.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{cfg_file} is not valid JSON: {e}") from None
        if vitlab_cfg is None and "vitlab" in cfg:
            vitlab_cfg = cfg["vitlab"]
        elif "model_type" in cfg:
            hf_cfg = cfg
    return Checkpoint(sd, file, vitlab_cfg, hf_cfg)


def checkpoint_metadata(model: nn.Module, labels: list[str] | None = None, task: str | None = None) -> dict[str, Any]:
    """The ``vitlab`` metadata block of a model: name, family, task, config, preprocessing, labels.

    ``task`` (the registered task that loads it: ``vitlab.load`` dispatches on it) defaults to
    the model's ``task`` attribute (backbones: ``classification``); without either it is left
    out and readers go by the family.
    """
    task = task or getattr(model, "task", None)
    meta: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "model_name": getattr(model, "model_name", None),
        "family": getattr(model, "family", type(model).__name__),
        **({"task": task} if isinstance(task, str) else {}),
        "config": config_to_dict(model.config),
        "pretrained_cfg": {k: list(v) if isinstance(v, tuple) else v for k, v in getattr(model, "pretrained_cfg", {}).items()},
    }
    encoder = getattr(model, "encoder", None)
    if isinstance(encoder, nn.Module) and encoder is not model and hasattr(encoder, "config"):
        # a wrapper (MAE, SimMIM): its encoder's own record, so the whole model can be rebuilt
        meta["encoder"] = {"model_name": getattr(encoder, "model_name", None),
                           "family": getattr(encoder, "family", type(encoder).__name__),
                           "config": config_to_dict(encoder.config)}
    if labels is not None:
        meta["labels"] = list(labels)
    return meta


def save_checkpoint(model: nn.Module, path: str | Path, labels: list[str] | None = None,
                    task: str | None = None) -> Path:
    """Save a model as a vitlab checkpoint.

    ``path`` ending in ``.safetensors`` writes that one file (config in its metadata);
    any other path is a folder that gets ``model.safetensors`` and ``config.json``.
    The write is atomic: a temporary file renamed into place.

    Returns:
        The weights file written.
    """
    path = Path(path)
    meta = checkpoint_metadata(model, labels, task)
    if path.suffix == ".safetensors":
        file, folder = path, None
    else:
        folder = path
        folder.mkdir(parents=True, exist_ok=True)
        file = folder / "model.safetensors"
    file.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    tmp = file.with_name(file.name + ".tmp")
    try:
        save_file(tensors, str(tmp), metadata={"vitlab": json.dumps(meta), "format": "pt"})
        os.chmod(tmp, 0o666 & ~_umask())  # safetensors creates 0600; give the file the usual mode
        tmp.replace(file)
        if folder is not None:
            cfg_tmp = folder / "config.json.tmp"
            cfg_tmp.write_text(json.dumps({"vitlab": meta}, indent=2))
            cfg_tmp.replace(folder / "config.json")
    except BaseException:  # disk full, permission, Ctrl-C: no partial file stays behind
        for leftover in (tmp, (folder / "config.json.tmp") if folder is not None else None):
            if leftover is not None:
                leftover.unlink(missing_ok=True)
        raise
    return file


def _umask() -> int:
    """The process umask (read by setting and restoring it)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
