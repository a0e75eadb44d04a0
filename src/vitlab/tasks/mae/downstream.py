"""Downstream from a pre-training run directory: the encoder's weights, fine-tuning and probing.

A run directory of ``vitlab train`` holds ``config.json`` (the resolved config: model name and
overrides, image size) and ``checkpoints/latest`` naming the last checkpoint folder, whose
``model.safetensors`` holds the trained module. For an MAE or SimMIM run that module is the
pre-training wrapper: its encoder sits under ``encoder.`` (the decoder / pixel head and, for
SimMIM, the encoder's mask token are not needed downstream). A classification run's module is
the backbone itself.

``vitlab train --task classification --init-from RUN_DIR`` (fine-tuning) and ``--task
linear_probe --init-from RUN_DIR`` build the run's architecture and load these weights;
:func:`init_from_overrides` is what that flag adds to the config, for the Python API.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ...pretrained import create_model
from ...pretrained.io import read_weights

StateDict = dict[str, Tensor]
#: The checkpoint pointer file of a run's ``checkpoints/`` folder (written by the engine).
LATEST = "latest"


def run_checkpoint(path: str | Path) -> Path | None:
    """The weights file of a run directory's latest checkpoint (or of a checkpoint folder); None if
    ``path`` is neither."""
    path = Path(path)
    if (path / "model.safetensors").is_file() and (path / "state.pt").is_file():
        return path / "model.safetensors"
    pointer = path / "checkpoints" / LATEST
    if path.is_dir() and pointer.is_file():
        weights = path / "checkpoints" / pointer.read_text().strip() / "model.safetensors"
        if weights.is_file():
            return weights
    return None


def is_training_run(path: str | Path | None) -> bool:
    """True when ``path`` is a run directory (or checkpoint folder) of ``vitlab train`` with weights."""
    return path is not None and not isinstance(path, bool) and run_checkpoint(path) is not None


def _run_config(run_dir: Path) -> dict[str, Any]:
    for folder in (run_dir, *run_dir.parents[:3]):
        cfg = folder / "config.json"
        if cfg.is_file() and (folder / "checkpoints").is_dir():
            return json.loads(cfg.read_text())
    raise FileNotFoundError(f"{run_dir} is not a vitlab run directory (no config.json next to checkpoints/)")


def encoder_state_dict(run_dir: str | Path) -> StateDict:
    """The backbone's tensors of a run's latest checkpoint, in backbone keys.

    MAE / SimMIM runs: the ``encoder.`` entries with the prefix removed; other runs: every entry.

    Raises:
        FileNotFoundError: ``run_dir`` holds no checkpoint.
    """
    weights = run_checkpoint(run_dir)
    if weights is None:
        raise FileNotFoundError(f"{run_dir} holds no training checkpoint (expected RUN_DIR/checkpoints/{LATEST} "
                                "or a checkpoint folder with model.safetensors and state.pt)")
    sd = read_weights(weights).state_dict
    if any(k.startswith("encoder.") for k in sd):
        return {k[len("encoder."):]: v for k, v in sd.items() if k.startswith("encoder.")}
    return dict(sd)


def load_encoder_weights(model: nn.Module, run_dir: str | Path) -> nn.Module:
    """Copy a run's encoder weights into ``model`` (a backbone of the run's architecture), exactly.

    The classifier (whatever its size) keeps its fresh initialisation; a pre-training-only
    mask token the model does not own is left out.

    Raises:
        ValueError: Keys or shapes of another architecture (one message naming them).
    """
    sd = encoder_state_dict(run_dir)
    own = model.state_dict()
    heads = tuple(f"{n}." for n in getattr(model, "classifier_names", ("head",)))
    if "mask_token" in sd and "mask_token" not in own:
        sd.pop("mask_token")
    sd = {k: v for k, v in sd.items() if not k.startswith(heads)}
    missing = [k for k in own if k not in sd and not k.startswith(heads)]
    unexpected = [k for k in sd if k not in own]
    mismatched = [k for k in sd if k in own and sd[k].shape != own[k].shape]
    if missing or unexpected or mismatched:
        raise ValueError(f"the encoder of {run_dir} does not fit {type(model).__name__}: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}, other shapes {mismatched[:5]}; build the run's model "
                         f"(--init-from RUN_DIR takes its name and overrides)")
    with torch.no_grad():
        for k, v in sd.items():
            own[k].copy_(v)
    return model


def init_from_overrides(run_dir: str | Path) -> list[str]:
    """The dotted overrides that start a run from ``run_dir``'s encoder (what ``--init-from`` adds).

    They set the run's model (name and overrides) and image size, and ``model.pretrained`` to the
    run directory; later overrides still win.
    """
    run_dir = Path(run_dir)
    if run_checkpoint(run_dir) is None:
        raise FileNotFoundError(f"--init-from {run_dir}: no training checkpoint there (expected a run directory "
                                f"of vitlab train with checkpoints/{LATEST})")
    cfg = _run_config(run_dir)
    model = cfg.get("model", {})
    overrides = {k: v for k, v in dict(model.get("overrides", {})).items() if k != "mask_token"}
    out = [f"model.name={json.dumps(model.get('name'))}", f"model.overrides={json.dumps(overrides)}",
           f"model.pretrained={json.dumps(str(run_dir))}"]
    size = cfg.get("data", {}).get("image_size")
    if size:
        out.append(f"data.image_size={int(size)}")
    return out


def encoder_from_run(run_dir: str | Path, num_classes: int, **overrides: Any) -> nn.Module:
    """The run's backbone with its trained encoder weights and a fresh ``num_classes`` classifier.

    Args:
        run_dir: A pre-training (or classification) run directory.
        num_classes: Classifier outputs.
        **overrides: Config fields on top of the run's (``drop_path=0.1``).
    """
    run_dir = Path(run_dir)
    cfg = _run_config(run_dir)
    model_cfg = cfg.get("model", {})
    kw = {k: v for k, v in dict(model_cfg.get("overrides", {})).items() if k != "mask_token"}
    size = cfg.get("data", {}).get("image_size")
    if size and "image_size" not in kw:
        kw["image_size"] = int(size)
    kw.update(overrides)
    model = create_model(model_cfg["name"], num_classes=num_classes, **kw)
    return load_encoder_weights(model, run_dir)


__all__ = ["encoder_from_run", "encoder_state_dict", "init_from_overrides", "is_training_run", "load_encoder_weights",
           "run_checkpoint"]
