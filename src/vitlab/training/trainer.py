"""The training engine: one loop for classification and distillation.

Per step: batch to device -> resize (progressive resizing) -> augmentation -> normalisation
-> mixup/cutmix -> forward under autocast -> loss (+ distillation) -> backward (accumulated)
-> clip -> optimizer step -> lr schedule -> EMA. Per epoch: evaluation (model and EMA),
``metrics.jsonl``, an atomic checkpoint. At the end: test metrics in ``results.json``,
curves and a confusion matrix as PNG.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from ..datasets.transforms import normalize
from ..evaluation.metrics import confusion_matrix, topk_correct
from .checkpoint import latest_checkpoint, load_training_checkpoint, save_training_checkpoint, set_rng_state
from .config import TrainConfig, config_to_dict
from .distributed import DistInfo, GlobalBatchSampler, all_reduce_mean, init_distributed
from .ema import ModelEma
from .optim import WarmupCosineScheduler, build_optimizer

Augment = Callable[[Tensor, torch.Generator], Tensor]


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available; use --device cpu")
    return dev


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


@torch.no_grad()
def evaluate_model(
    model: nn.Module,
    loader: DataLoader,
    device: torch.device,
    image_size: int | None = None,
    mean: tuple[float, ...] | None = None,
    std: tuple[float, ...] | None = None,
    amp_dtype: torch.dtype | None = None,
) -> dict[str, Any]:
    """Loss, top-1/top-5 accuracy (%) and the confusion matrix of ``model`` on a loader of
    ([0, 1] images, labels), resized to ``image_size`` and normalised with ``mean``/``std``."""
    was = model.training
    model.eval()
    loss_sum, seen, hits1, hits5 = 0.0, 0, 0, 0
    preds, targets = [], []
    num_classes = 0
    for x, y in loader:
        x = x.to(device).float()
        if image_size is not None and tuple(x.shape[-2:]) != (image_size, image_size):
            # (B, C, H, W) -> (B, C, size, size)
            x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False, antialias=True)
        if mean is not None and std is not None:
            x = normalize(x, mean, std)
        y = y.to(device)
        ctx = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else contextlib.nullcontext()
        with ctx:
            logits = model(x)
        logits = logits.float()
        num_classes = logits.shape[1]
        loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
        hits = topk_correct(logits, y, (1, 5))
        hits1, hits5 = hits1 + hits[1], hits5 + hits[5]
        seen += y.shape[0]
        preds.append(logits.argmax(1).cpu())
        targets.append(y.cpu())
    model.train(was)
    cm = confusion_matrix(torch.cat(preds), torch.cat(targets), num_classes) if seen else None
    return {"loss": loss_sum / max(seen, 1), "top1": 100.0 * hits1 / max(seen, 1),
            "top5": 100.0 * hits5 / max(seen, 1), "n": seen, "confusion": cm}


class Trainer:
    """Trains a model on datasets (or loaders) according to a :class:`TrainConfig`.

    Args:
        model: Any vitlab model (or nn.Module returning logits).
        config: The run configuration.
        train_data: A Dataset of (image in [0, 1] (C, H, W), label) or a DataLoader.
        val_data, test_data: Optional evaluation sets (Dataset or DataLoader).
        labels: Class names (for the confusion matrix and checkpoints).
        mean, std: Normalisation applied on the device after augmentation; None for none
            (e.g. a user's loader that already normalises).
        augment: ``augment(batch, generator) -> batch`` from [0, 1] images to normalised
            ones (training only; it replaces the normalisation above).
        mixup: ``mixup(x, y, generator) -> (x, soft_targets)``, training only.
        criterion: ``criterion(inputs, outputs, targets) -> loss``; cross-entropy by default.
        output_dir: Run directory (``config.output_dir`` by default).
        log: Where progress lines go (rank 0 only).
    """

    def __init__(
        self,
        model: nn.Module,
        config: TrainConfig,
        train_data: Dataset | DataLoader,
        val_data: Dataset | DataLoader | None = None,
        test_data: Dataset | DataLoader | None = None,
        labels: list[str] | None = None,
        mean: tuple[float, ...] | None = None,
        std: tuple[float, ...] | None = None,
        augment: Augment | None = None,
        mixup: Callable[..., tuple[Tensor, Tensor]] | None = None,
        criterion: Callable[[Tensor, Any, Tensor], Tensor] | None = None,
        output_dir: str | Path | None = None,
        log: Callable[[str], None] = print,
    ) -> None:
        self.cfg = config
        self.device = resolve_device(config.device)
        self.dist = init_distributed(self.device)
        self.log_fn = log
        self.out = Path(output_dir or config.output_dir)
        if self.dist.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(config.seed + self.dist.rank)
        self.model = model.to(self.device)
        if config.model.grad_checkpointing:
            if not hasattr(model, "set_grad_checkpointing"):
                raise ValueError(f"{type(model).__name__} does not support gradient checkpointing")
            model.set_grad_checkpointing(True)
        self.labels = labels
        self.mean, self.std = mean, std
        self.augment, self.mixup = augment, mixup
        self.criterion = criterion or (lambda inputs, outputs, target: F.cross_entropy(outputs, target))
        self.train_loader = self._loader(train_data, train=True)
        self.val_loader = self._loader(val_data, train=False) if val_data is not None else None
        self.test_loader = self._loader(test_data, train=False) if test_data is not None else None
        self.accum = config.optim.accumulation_steps
        self.steps_per_epoch = max(1, math.ceil(len(self.train_loader) / self.accum))
        total = self.steps_per_epoch * config.epochs
        o = config.optim
        self.optimizer = build_optimizer(model, o.name, o.lr, o.weight_decay, o.betas, layer_decay=o.layer_decay)
        warmup = min(total, int(round(o.warmup_epochs * self.steps_per_epoch)))
        self.scheduler = WarmupCosineScheduler(self.optimizer, o.lr, total, warmup, o.min_lr)
        self.amp_dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[config.precision]
        if self.amp_dtype is torch.float16 and self.device.type != "cuda":
            raise ValueError("precision fp16 needs CUDA; use bf16 on CPU")
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype is torch.float16)
        self.ema = ModelEma(model, config.ema_decay) if config.ema_decay else None
        if self.dist.enabled:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = nn.parallel.DistributedDataParallel(model, device_ids=ids)
        self.epoch = 0
        self.step = 0
        self.history: list[dict[str, Any]] = []
        self.best: dict[str, Any] = {}

    # ------------------------------------------------------------------ data
    def _loader(self, data: Dataset | DataLoader, train: bool) -> DataLoader:
        if isinstance(data, DataLoader):
            return data
        bs = self.cfg.data.batch_size if train else self.cfg.data.eval_batch_size
        if train:
            sampler = GlobalBatchSampler(len(data), bs, self.dist.rank, self.dist.world_size, seed=self.cfg.seed, shuffle=True)
        else:
            sampler = GlobalBatchSampler(len(data), bs, shuffle=False)
        return DataLoader(data, batch_sampler=sampler, num_workers=self.cfg.data.num_workers,
                          pin_memory=self.device.type == "cuda")

    def image_size_at(self, epoch: int) -> int | None:
        """Progressive resizing: the size for an epoch (None keeps the loader's size)."""
        size = self.cfg.data.image_size
        for s, e in zip(self.cfg.data.progressive_sizes, self.cfg.data.progressive_epochs):
            if epoch >= e:
                size = s
        if self.cfg.data.progressive_sizes and epoch < min(self.cfg.data.progressive_epochs):
            size = self.cfg.data.progressive_sizes[0]
        return size

    def _prepare(self, x: Tensor, size: int | None, gen: torch.Generator | None) -> Tensor:
        x = x.to(self.device, non_blocking=True).float()
        if size is not None and tuple(x.shape[-2:]) != (size, size):
            # (B, C, H, W) -> (B, C, size, size)
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        if gen is not None and self.augment is not None:
            x = self.augment(x, gen)  # the augmentation ends with the normalisation
            if size is not None and tuple(x.shape[-2:]) != (size, size):
                # A fixed-size crop (RandomResizedCrop to data.image_size) would undo progressive resizing.
                # (B, C, H', W') -> (B, C, size, size)
                x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
            return x
        if self.mean is not None and self.std is not None:
            x = normalize(x, self.mean, self.std)
        return x

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def log(self, msg: str) -> None:
        if self.dist.is_main:
            self.log_fn(msg)

    # ----------------------------------------------------------------- train
    def train_epoch(self) -> dict[str, float]:
        """One pass over the training data; returns loss, accuracy, throughput, time."""
        model = self.model
        model.train()
        sampler = getattr(self.train_loader, "batch_sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(self.epoch)
        gen = torch.Generator(device=self.device).manual_seed(self.cfg.seed * 100003 + self.epoch * 7919 + self.dist.rank)
        size = self.image_size_at(self.epoch)
        loss_sum, correct, seen, t0 = 0.0, 0, 0, time.perf_counter()
        bar = self._progress(len(self.train_loader), f"epoch {self.epoch + 1}/{self.cfg.epochs}")
        self.optimizer.zero_grad(set_to_none=True)
        n_batches = len(self.train_loader)
        for i, (x, y) in enumerate(self.train_loader):
            x = self._prepare(x, size, gen)
            y = y.to(self.device)
            target = y
            if self.mixup is not None:
                x, target = self.mixup(x, y, generator=gen)
            last_micro = (i + 1) % self.accum == 0 or i + 1 == n_batches
            sync = contextlib.nullcontext()
            if self.dist.enabled and not last_micro:
                sync = model.no_sync()
            with sync:
                with self._autocast():
                    out = model(x)
                    loss = self.criterion(x, out, target)
                if not torch.isfinite(loss):
                    last = latest_checkpoint(self.out)
                    raise TrainingDiverged(
                        f"loss is {loss.item()} at epoch {self.epoch + 1}, batch {i + 1}: training stopped. "
                        f"The last good checkpoint is {last or '(none yet)'}; lower optim.lr, enable "
                        f"optim.clip_grad or use fp32."
                    )
                self.scaler.scale(loss / self.accum).backward()
            if last_micro:
                self._optimizer_step()
            logits = out[0] + out[1] if isinstance(out, tuple) else out
            loss_sum += loss.item() * y.shape[0]
            correct += topk_correct(logits.detach().float(), y, (1,))[1]
            seen += y.shape[0]
            if bar is not None:
                bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{self.scheduler.get_last_lr()[-1]:.2e}")
                bar.update(1)
        if bar is not None:
            bar.close()
        elapsed = time.perf_counter() - t0
        return {
            "train_loss": all_reduce_mean(loss_sum / max(seen, 1), self.dist),
            "train_top1": all_reduce_mean(100.0 * correct / max(seen, 1), self.dist),
            "throughput": seen * self.dist.world_size / elapsed,
            "epoch_time": elapsed,
            "image_size": size,
        }

    def _optimizer_step(self) -> None:
        clip = self.cfg.optim.clip_grad
        if clip:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.step += 1
        if self.ema is not None:
            self.ema.update(unwrap(self.model))

    def _progress(self, total: int, desc: str):
        if not (self.cfg.progress and self.dist.is_main and sys.stderr.isatty()):
            return None
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)

    # ------------------------------------------------------------------ eval
    def evaluate(self, loader: DataLoader, model: nn.Module | None = None) -> dict[str, Any]:
        """Loss, top-1/top-5 accuracy (%) and the confusion matrix on a loader."""
        return evaluate_model(unwrap(model or self.model), loader, self.device, self.cfg.data.image_size,
                              self.mean, self.std, self.amp_dtype)

    # ---------------------------------------------------------- checkpoints
    def state(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "ema_updates": self.ema.updates if self.ema else 0,
            "history": json.dumps(self.history),
            "best": json.dumps(self.best),
        }

    def save(self) -> Path | None:
        if not self.dist.is_main:
            return None
        return save_training_checkpoint(self.out, self.epoch, unwrap(self.model), self.state(),
                                        self.ema.module if self.ema else None, labels=self.labels)

    def resume(self, folder: str | Path | None = None) -> bool:
        """Restore the latest checkpoint of the run directory (or ``folder``); False if none."""
        folder = Path(folder) if folder is not None else latest_checkpoint(self.out)
        if folder is None:
            return False
        st = load_training_checkpoint(folder)
        unwrap(self.model).load_state_dict(st["model"])
        self.optimizer.load_state_dict(st["optimizer"])
        for g in self.optimizer.param_groups:  # keep our extra keys' values from the checkpoint
            g.setdefault("lr_scale", 1.0)
        self.scheduler.load_state_dict(st["scheduler"])
        self.scaler.load_state_dict(st["scaler"])
        if self.ema is not None and st.get("ema") is not None:
            self.ema.load_state_dict(st["ema"], int(st["ema_updates"]))
        self.epoch = int(st["epoch"])
        self.step = int(st["step"])
        self.history = json.loads(st["history"])
        self.best = json.loads(st["best"])
        set_rng_state(st["rng"])
        if self.dist.rank:
            torch.manual_seed(self.cfg.seed + self.dist.rank + 7 * self.epoch)
        self.log(f"resumed from {folder} (epoch {self.epoch}, step {self.step})")
        return True

    # ------------------------------------------------------------------- fit
    def fit(self) -> dict[str, Any]:
        """Train for the remaining epochs; returns the final results (test metrics when a test set is given)."""
        metrics_file = self.out / "metrics.jsonl"
        if self.dist.is_main:
            (self.out / "config.json").write_text(json.dumps(config_to_dict(self.cfg), indent=2))
            if self.epoch == 0 and metrics_file.exists():
                metrics_file.unlink()
        while self.epoch < self.cfg.epochs:
            rec: dict[str, Any] = {"epoch": self.epoch + 1}
            rec.update(self.train_epoch())
            rec["lr"] = self.scheduler.get_last_lr()[-1]
            rec["step"] = self.step
            last = self.epoch + 1 == self.cfg.epochs
            if self.val_loader is not None and ((self.epoch + 1) % self.cfg.eval_every == 0 or last):
                v = self.evaluate(self.val_loader)
                rec.update(val_loss=v["loss"], val_top1=v["top1"], val_top5=v["top5"])
                if self.ema is not None:
                    e = self.evaluate(self.val_loader, self.ema.module)
                    rec.update(ema_val_loss=e["loss"], ema_val_top1=e["top1"], ema_val_top5=e["top5"])
            self.epoch += 1
            self.history.append(rec)
            if self.dist.is_main:
                with metrics_file.open("a") as f:
                    f.write(json.dumps(rec) + "\n")
            self.log(self._summary(rec))
            if self.epoch % self.cfg.save_every == 0 or last:
                self.save()
        return self.finish()

    def _summary(self, r: dict[str, Any]) -> str:
        parts = [f"epoch {r['epoch']}/{self.cfg.epochs}", f"loss {r['train_loss']:.4f}"]
        if "val_top1" in r:
            parts.append(f"val top-1 {r['val_top1']:.2f}%")
        if "ema_val_top1" in r:
            parts.append(f"EMA {r['ema_val_top1']:.2f}%")
        parts += [f"lr {r['lr']:.2e}", f"{r['throughput']:.0f} img/s", f"{r['epoch_time']:.1f}s"]
        return "  ".join(parts)

    def finish(self) -> dict[str, Any]:
        """Test metrics (model and EMA), ``results.json``, curves and confusion-matrix PNGs."""
        results: dict[str, Any] = {"epochs": self.epoch, "steps": self.step}
        if self.history:
            results["final_val_top1"] = self.history[-1].get("val_top1")
            results["train_time_s"] = sum(h["epoch_time"] for h in self.history)
        loader = self.test_loader or self.val_loader
        cm = None
        if loader is not None:
            split = "test" if self.test_loader is not None else "val"
            t = self.evaluate(loader)
            results.update({f"{split}_top1": t["top1"], f"{split}_top5": t["top5"], f"{split}_loss": t["loss"], f"{split}_n": t["n"]})
            cm = t["confusion"]
            if self.ema is not None:
                e = self.evaluate(loader, self.ema.module)
                results.update({f"ema_{split}_top1": e["top1"], f"ema_{split}_top5": e["top5"], f"ema_{split}_loss": e["loss"]})
            results["split"] = split
        if self.dist.is_main:
            (self.out / "results.json").write_text(json.dumps(results, indent=2))
            self._plots(cm)
        return results

    def _plots(self, cm: Tensor | None) -> None:
        try:
            from ..evaluation.plots import plot_confusion_matrix, plot_curves

            if self.history:
                plot_curves(self.history, self.out / "curves.png")
            if cm is not None:
                labels = self.labels or [str(i) for i in range(cm.shape[0])]
                plot_confusion_matrix(cm, labels, self.out / "confusion_matrix.png")
        except ImportError as e:
            self.log(f"plots skipped: {e}")
