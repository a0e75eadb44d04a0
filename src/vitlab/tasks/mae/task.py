"""MAE / SimMIM pre-training and the linear probe as tasks of the training engine.

``task: mae`` pre-trains the encoder named by ``model.name`` on the images of ``data.dataset``
(labels unused). A plain ViT family (ViT, DeiT, CaiT) gets MAE: hidden tokens dropped, a light
decoder (``mae.decoder_*``), the loss on hidden patches (``mae.norm_pix_loss``). A family whose
config has ``mask_token`` (Swin, PVT v2) gets SimMIM: mask tokens in, a linear pixel head on
the final map, L1 or L2 (``mae.simmim_loss``) on hidden pixels. The masking noise of training
batches comes from the engine's generator (exact resume); evaluation batches use a fixed noise
stream, so the validation loss of every epoch scores the same masks. After each evaluation a
PNG grid (original / masked input / reconstruction of the first validation images) goes to
``<run>/reconstructions/epoch-NNNN.png``; at the end the loss curves to ``loss_curves.png``.

``task: linear_probe`` trains BatchNorm (no affine) + Linear on the frozen encoder of
``model.pretrained`` (a pre-training run directory, see ``--init-from``); the rest is the
classification task.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from ...datasets.transforms import normalize
from ...models.registry import get_entry
from ...pretrained import create_model
from ..base import Batch, Metrics, RunConfig, Task, resize_images
from ..image_classification import ClassificationTask, build_augment, build_datasets
from ..registry import TaskSetup, register_task
from .model import MAE, LinearProbe, MAEConfig, compose_reconstruction, unpatchify
from .plots import plot_loss_curves, save_reconstruction_grid
from .simmim import SimMIM, SimMIMConfig

Augment = Callable[[Tensor, torch.Generator], Tensor]
#: Seed of the evaluation noise stream (the same masks at every evaluation).
EVAL_NOISE_SEED = 20220

#: Validation images shown in each reconstruction grid.
GRID_IMAGES = 8

#: ``vitlab train --task mae`` with no recipe (configs/mae_digits.yaml holds the same values): MAE
#: pre-training of a small ViT on the digits upsampled to 32x32 with 4x4 patches. The 8x8
#: originals with 2x2 patches give 16 patches, so 75% masking would leave 4 visible ones;
#: at 32 px / patch 4 the grid is 8x8 = 64 patches (one per original pixel), 16 stay visible,
#: and the encoder still runs on 17 tokens. No norm_pix_loss: an upsampled patch is nearly
#: flat, its normalised pixels would be noise. The ViT (width 64, depth 4) and the 30 epochs
#: are the best setting measured by benchmarks/mae.py (benchmarks/README.md: 10 epochs probed
#: below random init, 30 epochs well above it).
MAE_DIGITS_RECIPE: dict[str, Any] = {
    "recipe": "mae_digits",
    "task": "mae",
    "model": {
        "name": "vit_tiny_patch16_224",
        "overrides": {"patch_size": 4, "dim": 64, "depth": 4, "heads": 4, "mlp_dim": 128},
    },
    "data": {"dataset": "digits", "image_size": 32, "batch_size": 64, "eval_batch_size": 512},
    "optim": {"lr": 1e-3, "weight_decay": 0.05, "betas": [0.9, 0.95], "warmup_epochs": 5, "min_lr": 1e-5,
              "clip_grad": 1.0},
    "mae": {"mask_ratio": 0.75, "decoder_dim": 64, "decoder_depth": 2, "decoder_heads": 4, "norm_pix_loss": False},
    "epochs": 30,
    "seed": 0,
}


@dataclasses.dataclass
class MAESection:
    """Masked-image pre-training (config section ``mae``): MAE for plain ViT families, SimMIM for hierarchical ones.

    ``mask_ratio`` is the fraction of patches hidden (MAE: 0.75; SimMIM: 0.6 in its paper);
    ``decoder_*`` shape MAE's light decoder (``decoder_mlp_dim`` None: 4 x ``decoder_dim``);
    ``norm_pix_loss`` regresses per-patch normalised pixels; ``simmim_loss`` is ``l1`` or ``l2``;
    ``probe_pool`` is the feature ``task: linear_probe`` reads: ``head`` (the encoder's pooled
    pre-logits, a ViT's class token) or ``mean`` (the mean of the patch tokens).
    """

    mask_ratio: float = 0.75
    decoder_dim: int = 128
    decoder_depth: int = 2
    decoder_heads: int = 4
    decoder_mlp_dim: int | None = None
    norm_pix_loss: bool = False
    simmim_loss: str = "l1"
    probe_pool: str = "head"

    def __post_init__(self) -> None:
        errors = []
        if not 0.0 <= self.mask_ratio <= 0.99:
            errors.append(f"mae.mask_ratio must be in [0, 0.99], got {self.mask_ratio:g}")
        if self.simmim_loss not in ("l1", "l2"):
            errors.append(f"mae.simmim_loss must be l1 or l2, got {self.simmim_loss!r}")
        if self.probe_pool not in ("head", "mean"):
            errors.append(f"mae.probe_pool must be head or mean, got {self.probe_pool!r}")
        if errors:
            raise ValueError("invalid training config: " + "; ".join(errors))


class MAEEvalMetrics(Metrics):
    """Mean reconstruction loss over the validation set; keeps the first batch's grid images."""

    def __init__(self, task: "MAETask") -> None:
        self.task = task
        self.loss_sum, self.n = 0.0, 0
        self.grid: Tensor | None = None

    def update(self, batch: Batch, outputs: Any) -> None:
        loss, pred, mask = outputs
        self.loss_sum += float(loss) * batch.size
        self.n += batch.size
        if self.grid is None:
            self.grid = self.task.grid_images(batch.inputs[0], pred, mask)

    def compute(self) -> dict[str, Any]:
        return {"loss": self.loss_sum / max(self.n, 1), "n": self.n, "reconstructions": self.grid}


@register_task("mae")
class MAETask(Task):
    config_section = "mae"
    config_class = MAESection
    default_recipe = MAE_DIGITS_RECIPE
    families = ("MAE", "SimMIM")

    """Masked-image pre-training on batches of ([0, 1] images, anything): MAE or SimMIM.

    Args:
        num_patches: Mask units per image (``model.num_patches``).
        patch_size: Pixels per mask unit side (MAE: the patch; SimMIM: the total stride).
        grid: Mask-unit grid (gh, gw).
        in_channels: Image channels.
        norm_pix_loss: Whether the model regresses normalised patches (for the grids).
        mean: Normalisation mean applied on the device.
        std: Normalisation std.
        augment: ``augment(batch, generator) -> batch`` from [0, 1] images to normalised ones
            (training only; it replaces the normalisation above).
    """

    primary_metric = "loss"
    higher_is_better = False

    def __init__(self, num_patches: int, patch_size: int, grid: tuple[int, int], in_channels: int,
                 norm_pix_loss: bool, mean: Sequence[float], std: Sequence[float],
                 augment: Augment | None = None) -> None:
        self.num_patches, self.patch_size, self.grid = num_patches, patch_size, tuple(grid)
        self.in_channels, self.norm_pix_loss = in_channels, norm_pix_loss
        self.mean, self.std = tuple(mean), tuple(std)
        self.augment = augment
        self._eval_gen: torch.Generator | None = None

    @classmethod
    def for_model(cls, model: MAE | SimMIM, mean: Sequence[float], std: Sequence[float],
                  augment: Augment | None = None) -> "MAETask":
        """The task for an :class:`MAE` or :class:`SimMIM` model."""
        return cls(model.num_patches, model.patch_size, model.grid, model.in_channels,
                   model.config.norm_pix_loss, mean, std, augment)

    def prepare(self, batch: Any, device: torch.device, image_size: int | None,
                generator: torch.Generator | None) -> Batch:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        x = resize_images(x.to(device, non_blocking=True).float(), image_size)
        if generator is not None and self.augment is not None:
            x = resize_images(self.augment(x, generator), image_size)  # ends with the normalisation
        else:
            x = normalize(x, self.mean, self.std)
        if generator is None:  # evaluation: a fixed stream, restarted by eval_metrics()
            if self._eval_gen is None:
                self._eval_gen = torch.Generator(device=device).manual_seed(EVAL_NOISE_SEED)
            generator = self._eval_gen
        noise = torch.rand(x.shape[0], self.num_patches, generator=generator, device=device)  # (B, N)
        return Batch((x, noise), None, int(x.shape[0]))

    def forward(self, model: nn.Module, inputs: Any) -> Any:
        x, noise = inputs
        return model(x, noise)

    def loss(self, batch: Batch, outputs: Any) -> Tensor:
        return outputs[0]

    def eval_metrics(self) -> Metrics:
        self._eval_gen = None  # every evaluation sees the same masks
        return MAEEvalMetrics(self)

    def grid_images(self, images: Tensor, pred: Tensor, mask: Tensor) -> Tensor:
        """(3, K, C, H, W) in [0, 1]: originals, masked inputs (hidden patches grey) and reconstructions
        (hidden patches predicted, visible ones copied) of the first K images."""
        k = min(GRID_IMAGES, images.shape[0])
        images, pred, mask = images[:k].float(), pred[:k].float(), mask[:k]
        recon, _ = compose_reconstruction(images, pred, mask, self.patch_size, self.grid, self.in_channels,
                                          self.norm_pix_loss)
        mean = torch.tensor(self.mean, device=images.device).view(1, -1, 1, 1)  # (C,) -> (1, C, 1, 1)
        std = torch.tensor(self.std, device=images.device).view(1, -1, 1, 1)  # (C,) -> (1, C, 1, 1)
        original = images * std + mean
        units = mask.unsqueeze(-1).float().expand(-1, -1, self.patch_size**2 * self.in_channels)  # (B, N, p*p*C)
        hidden = unpatchify(units, self.patch_size, self.grid, self.in_channels) > 0.5  # (B, C, H, W)
        masked = torch.where(hidden, torch.full_like(original, 0.5), original)
        return torch.stack([original, masked, recon * std + mean]).clamp(0, 1).cpu()  # (3, K, C, H, W)

    def after_evaluation(self, out_dir: Path, epoch: int, metrics: dict[str, Any]) -> list[Path]:
        grid = metrics.get("reconstructions")
        if grid is None:
            return []
        return [save_reconstruction_grid(grid, Path(out_dir) / "reconstructions" / f"epoch-{epoch:04d}.png")]

    def plots(self, out_dir: Path, history: Sequence[dict[str, Any]], final: dict[str, Any] | None) -> list[Path]:
        return [plot_loss_curves(history, Path(out_dir) / "loss_curves.png")] if history else []

    @classmethod
    def from_config(cls, cfg: RunConfig) -> TaskSetup:
        """Datasets, encoder and MAE / SimMIM model of a pre-training run from a ``TrainConfig``.

        Records ``in_channels`` in ``cfg.model.overrides`` and the size in ``cfg.data.image_size``,
        so the run directory's config rebuilds the encoder downstream (``--init-from``).
        """
        train_set, val_set, test_set = build_datasets(cfg)
        sample = train_set[0][0]
        channels, size = int(sample.shape[0]), int(cfg.data.image_size or sample.shape[-1])
        cfg.data.image_size = size
        cfg.model.overrides.setdefault("in_channels", channels)
        overrides = dict(cfg.model.overrides)
        overrides.setdefault("image_size", size)
        m = cfg.mae
        hierarchical = "mask_token" in {f.name for f in dataclasses.fields(get_entry(cfg.model.name).config_class)}
        if hierarchical:
            overrides["mask_token"] = True
        encoder = create_model(cfg.model.name, pretrained=cfg.model.pretrained, num_classes=0, **overrides)
        if hierarchical:
            model: MAE | SimMIM = SimMIM(encoder, SimMIMConfig(mask_ratio=m.mask_ratio, loss=m.simmim_loss,
                                                               norm_pix_loss=m.norm_pix_loss))
        else:
            model = MAE(encoder, MAEConfig(mask_ratio=m.mask_ratio, decoder_dim=m.decoder_dim,
                                           decoder_depth=m.decoder_depth, decoder_heads=m.decoder_heads,
                                           decoder_mlp_dim=m.decoder_mlp_dim, norm_pix_loss=m.norm_pix_loss))
        mean, std = tuple(train_set.mean), tuple(train_set.std)
        model.pretrained_cfg = {"task": "mae", "input_size": [channels, size, size], "mean": list(mean),
                                "std": list(std), "crop_pct": 1.0, "interpolation": "bilinear"}
        augment = build_augment(cfg.augment, size, mean, std)
        return TaskSetup(cls.for_model(model, mean, std, augment), model, train_set, val_set, test_set)


@register_task("linear_probe")
class LinearProbeTask(ClassificationTask):
    """Classification by a linear probe (BatchNorm without affine, then Linear) on a frozen encoder.

    The encoder comes from ``model.pretrained`` (``--init-from RUN_DIR``: a pre-training run
    directory; without it the encoder is randomly initialised, the baseline of a probe).
    ``mae.probe_pool`` picks the feature: ``head`` (the encoder's pooled pre-logits, a ViT's
    class token) or ``mean`` (the mean of the patch tokens).
    """

    config_section = "mae"
    config_class = MAESection
    default_recipe = None
    families = ("LinearProbe",)

    @classmethod
    def from_config(cls, cfg: RunConfig) -> TaskSetup:
        setup = super().from_config(cfg)
        backbone = setup.model
        probe = LinearProbe(backbone, int(backbone.config.num_classes), pool=cfg.mae.probe_pool)
        probe.pretrained_cfg = {**dict(getattr(backbone, "pretrained_cfg", {})), "probe_pool": cfg.mae.probe_pool}
        setup.model = probe
        return setup


__all__ = ["LinearProbeTask", "MAESection", "MAETask", "MAE_DIGITS_RECIPE"]
