"""MAE / SimMIM checkpoints as plugins: load the pre-training model back, reconstruct images.

A pre-training checkpoint holds the wrapper's typed config (``MAEConfig`` / ``SimMIMConfig``)
and its encoder's (``meta["encoder"]``: model name, family, config), so :meth:`MAEInference.load`
rebuilds exactly the saved model. ``predict`` hides patches with the evaluation's fixed noise
stream (the same masks for the same image) and reports the reconstruction loss on the hidden
patches; ``draw`` writes the original / masked / reconstruction strip.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from ...config import config_from_dict
from ...errors import CheckpointError
from ...models.registry import register_task_model
from ..base import TaskInference, resize_images
from ..inputs import to_unit_tensor
from ..registry import register_inference
from ..classify import ClassificationInference
from .model import MAE, LinearProbe, MAEConfig
from .plots import save_reconstruction_grid
from .simmim import SimMIM, SimMIMConfig
from .task import MAETask

register_task_model("MAE", MAE, MAEConfig, "mae")
register_task_model("SimMIM", SimMIM, SimMIMConfig, "mae")
WRAPPERS = {"MAE": (MAE, MAEConfig), "SimMIM": (SimMIM, SimMIMConfig)}


def load_pretraining_model(path: str | Path) -> nn.Module:
    """An :class:`MAE` or :class:`SimMIM` from a vitlab checkpoint (eval mode, ``pretrained_cfg`` set).

    Raises:
        CheckpointError: Not an MAE / SimMIM checkpoint, one saved without its encoder's record
            (written before vitlab recorded it: its encoder still loads with ``--init-from``), or
            weights that do not fit.
    """
    from ...pretrained import read_weights
    from ...pretrained import model_from_meta

    ck = read_weights(path)
    meta = ck.vitlab_config or {}
    family = meta.get("family")
    if family not in WRAPPERS:
        raise CheckpointError(f"{path} is not an MAE / SimMIM checkpoint (family {family!r})")
    if not meta.get("encoder"):
        raise CheckpointError(f"{path} records no encoder (written by an older vitlab); its encoder still loads "
                              "into a classifier: vitlab train --init-from RUN_DIR")
    model_class, config_class = WRAPPERS[family]
    model = model_class(model_from_meta(meta["encoder"]), config_from_dict(config_class, meta.get("config") or {}))
    missing, unexpected = model.load_state_dict(ck.state_dict, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"the weights in {path} do not fit its {family} config: missing {sorted(missing)[:3]}, "
                              f"unexpected {sorted(unexpected)[:3]}")
    model.pretrained_cfg = dict(meta.get("pretrained_cfg") or {})
    return model.eval()


@register_inference("mae")
class MAEInference(TaskInference):
    """MAE / SimMIM checkpoints: reconstruction loss and strips of hidden-patch reconstructions."""

    json_exclude = ("grid",)

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> nn.Module:
        return load_pretraining_model(path).to(device)

    @classmethod
    def predict(cls, model: nn.Module, images: Sequence[Any], **options: Any) -> list[dict[str, Any]]:
        """Per image ``loss`` (on the hidden patches), ``mask_ratio`` (the fraction hidden) and
        ``grid`` (original / masked / reconstruction, (3, 1, C, H, W) in [0, 1], for :meth:`draw`)."""
        pcfg = getattr(model, "pretrained_cfg", {}) or {}
        channels, size = int(model.in_channels), int(model.image_size[0])
        task = MAETask.for_model(model, pcfg.get("mean", [0.5] * channels), pcfg.get("std", [0.5] * channels))
        device = next(model.parameters()).device
        records = []
        for image in images:
            x = to_unit_tensor(image, 0.0)
            if x.shape[0] != channels:  # grey <-> colour, as the training images were read
                x = x.mean(0, keepdim=True) if channels == 1 else x.expand(channels, *x.shape[1:])
            x = resize_images(x[None], size)  # (C, H, W) -> (1, C, S, S)
            task.eval_metrics()  # the evaluation's fixed noise stream, restarted: same image, same masks
            batch = task.prepare(x, device, None, None)
            with torch.no_grad():
                loss, pred, mask = task.forward(model, batch.inputs)
            records.append({"loss": float(loss), "mask_ratio": float(mask.float().mean()),
                            "grid": task.grid_images(batch.inputs[0], pred, mask), "notes": []})
        return records

    @classmethod
    def draw(cls, image: Any, record: dict[str, Any], output_dir: str | Path, stem: str) -> list[Path]:
        """``<stem>_reconstruction.png``: the original, the masked input and the reconstruction."""
        return [save_reconstruction_grid(record["grid"], Path(output_dir) / f"{stem}_reconstruction.png")]

    @classmethod
    def describe(cls, name: str, record: dict[str, Any]) -> str:
        return f"{name}: reconstruction loss {record['loss']:.4f} on {record['mask_ratio']:.0%} hidden patches"


def load_probe(path: str | Path) -> nn.Module:
    """A :class:`LinearProbe` from a ``task: linear_probe`` checkpoint (eval mode, labels set).

    Raises:
        CheckpointError: Not a probe checkpoint, one without its encoder's record, or weights
            that do not fit.
    """
    from ...pretrained import model_from_meta, read_weights

    ck = read_weights(path)
    meta = ck.vitlab_config or {}
    if meta.get("family") != "LinearProbe" or not meta.get("encoder"):
        raise CheckpointError(f"{path} is not a linear-probe checkpoint with its encoder's record (family "
                              f"{meta.get('family')!r})")
    pcfg = {k: tuple(v) if isinstance(v, list) else v for k, v in (meta.get("pretrained_cfg") or {}).items()}
    encoder = model_from_meta(meta["encoder"])
    probe = LinearProbe(encoder, int(encoder.config.num_classes), pool=str(pcfg.get("probe_pool", "head")))
    missing, unexpected = probe.load_state_dict(ck.state_dict, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"the weights in {path} do not fit its probe: missing {sorted(missing)[:3]}, "
                              f"unexpected {sorted(unexpected)[:3]}")
    probe.pretrained_cfg = pcfg
    probe.labels = meta.get("labels")
    return probe.eval()


@register_inference("linear_probe")
class LinearProbeInference(ClassificationInference):
    """Linear-probe checkpoints: classified and evaluated as any classifier."""

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> nn.Module:
        return load_probe(path).to(device)

    @classmethod
    def evaluate(cls, checkpoint: str | Path, dataset: str | None = None, split: str | None = None,
                 output_dir: str | Path | None = None, device: str = "cpu", batch_size: int = 256,
                 **options: Any) -> dict[str, Any]:
        return super().evaluate(checkpoint, dataset, split, output_dir, device, batch_size,
                                model=load_probe(checkpoint), **options)


__all__ = ["LinearProbeInference", "MAEInference", "load_pretraining_model", "load_probe"]
