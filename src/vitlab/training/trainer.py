"""The training engine: one loop for every task.

Per step: the task prepares the batch (to the device, resized to the epoch's size for
progressive resizing, augmented) -> forward and loss under autocast -> backward
(accumulated; DDP / FSDP gradients synchronised on the last micro-batch only) -> the NaN stop ->
clip -> optimizer step -> lr schedule -> the task's ``after_step`` -> EMA. Per epoch: evaluation (model and EMA),
``metrics.jsonl`` (and TensorBoard when ``log.tensorboard``), an atomic checkpoint. At the
end: test metrics in ``results.json`` and the task's plots.

What differs between tasks (batches, loss, metrics, extra state, plots) is the task's
(:class:`vitlab.tasks.Task`); the engine never looks inside a batch.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from ..tasks.base import Task, autocast, evaluate_task, resolve_device
from ..tasks.registry import get_task
from .checkpoint import (latest_checkpoint, load_sharded_checkpoint, load_training_checkpoint, save_sharded_checkpoint,
                         save_training_checkpoint, set_rng_state)
from .config import TrainConfig, config_to_dict
from .distributed import DistInfo, GlobalBatchSampler, all_reduce_mean, init_distributed
from .ema import ModelEma
from .fsdp import init_fsdp_process_group, prepare_fsdp
from .optim import WarmupCosineScheduler, build_optimizer

Augment = Callable[[Tensor, torch.Generator], Tensor]

#: What ``log.tensorboard=true`` needs when ``tensorboard`` does not import.
TENSORBOARD_HINT = "log.tensorboard=true needs the tensorboard package: pip install tensorboard (or 'vitlab[tensorboard]')"


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DistributedDataParallel wrapper (or the model itself)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def tensorboard_writer(log_dir: Path) -> Any:
    """A ``torch.utils.tensorboard.SummaryWriter`` on ``log_dir``.

    Raises:
        ImportError: tensorboard is not installed (one line naming ``pip install tensorboard``).
    """
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ImportError(TENSORBOARD_HINT) from None
    return SummaryWriter(log_dir=str(log_dir))


class Trainer:
    """Trains a model for a task according to a :class:`TrainConfig`.

    Args:
        model: Any nn.Module; the task calls it (``task.forward``).
        config: The run configuration.
        train_data: A Dataset or a DataLoader of the task's batches.
        val_data: Optional validation set (Dataset or DataLoader).
        test_data: Optional test set (Dataset or DataLoader).
        labels: Classification only (no ``task``): class names.
        mean: Classification only: normalisation mean applied on the device after
            augmentation; None for none (e.g. a user's loader that already normalises).
        std: Classification only: normalisation std.
        augment: Classification only: ``augment(batch, generator) -> batch`` from [0, 1]
            images to normalised ones (training only; it replaces the normalisation above).
        mixup: Classification only: ``mixup(x, y, generator) -> (x, soft_targets)``.
        criterion: Classification only: ``criterion(inputs, outputs, targets) -> loss``;
            cross-entropy by default.
        output_dir: Run directory (``config.output_dir`` by default).
        log: Where progress lines go (rank 0 only).
        task: The task; None builds a :class:`~vitlab.tasks.ClassificationTask` from the
            classification-only arguments above.
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
        task: Task | None = None,
    ) -> None:
        if task is not None and any(v is not None for v in (labels, mean, std, augment, mixup, criterion)):
            raise ValueError("pass either a task or the classification arguments (labels, mean, std, augment, "
                             "mixup, criterion), not both: the task owns them")
        self.cfg = config
        self.device = resolve_device(config.device)
        self.fsdp = config.distributed.strategy == "fsdp"
        self.dist = init_fsdp_process_group(self.device) if self.fsdp else init_distributed(self.device)
        self.log_fn = log
        self.out = Path(output_dir or config.output_dir)
        if self.dist.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
        self.task: Task = task if task is not None else get_task("classification")(labels, mean, std, augment, mixup,
                                                                                    criterion)
        self.task.to(self.device)
        self._tb_wanted = bool(config.log.tensorboard) and self.dist.is_main
        if self._tb_wanted:
            try:  # fail before training, not after the first epoch
                importlib.import_module("torch.utils.tensorboard")
            except ImportError:
                raise ImportError(TENSORBOARD_HINT) from None
        torch.manual_seed(config.seed + self.dist.rank)
        self.model = model.to(self.device)
        if config.model.grad_checkpointing:
            if not hasattr(model, "set_grad_checkpointing"):
                raise ValueError(f"{type(model).__name__} does not support gradient checkpointing")
            model.set_grad_checkpointing(True)
        self.ema: ModelEma | None = None
        self.scalar_params: list[str] = []  # FSDP: 0-d parameters made 1-D (0-d again in exported files)
        if self.fsdp:  # before the optimizer: it must hold the sharded parameters
            from ..pretrained.io import checkpoint_metadata

            # the model's description, taken before fully_shard renames its class (FSDP<Name>)
            self._meta = checkpoint_metadata(model, self.task.labels, self.task.name)
            _, self.ema, self.scalar_params = prepare_fsdp(model, self.device, self.dist.world_size,
                                                           config.distributed.compile, config.ema_decay)
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
        if config.ema_decay and not self.fsdp:
            self.ema = ModelEma(model, config.ema_decay)
        if self.dist.enabled and not self.fsdp:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = nn.parallel.DistributedDataParallel(model, device_ids=ids)
        self.epoch = 0
        self.step = 0
        self.history: list[dict[str, Any]] = []
        self.best: dict[str, Any] = {}

    # ------------------------------------------------- the classification task's parts
    # Kept as attributes of the trainer for code written against the classification-only
    # engine; they belong to the task (AttributeError for a task without them).
    @property
    def criterion(self) -> Callable[..., Tensor]:
        """The classification task's ``criterion(inputs, outputs, targets)`` (settable)."""
        return self.task.criterion  # type: ignore[attr-defined]

    @criterion.setter
    def criterion(self, value: Callable[..., Tensor]) -> None:
        self.task.criterion = value  # type: ignore[attr-defined]

    @property
    def mean(self) -> tuple[float, ...] | None:
        """The classification task's normalisation mean."""
        return self.task.mean  # type: ignore[attr-defined]

    @property
    def std(self) -> tuple[float, ...] | None:
        """The classification task's normalisation std."""
        return self.task.std  # type: ignore[attr-defined]

    @property
    def augment(self) -> Augment | None:
        """The classification task's on-device training augmentation."""
        return self.task.augment  # type: ignore[attr-defined]

    @property
    def mixup(self) -> Callable[..., tuple[Tensor, Tensor]] | None:
        """The classification task's Mixup/CutMix."""
        return self.task.mixup  # type: ignore[attr-defined]

    @property
    def labels(self) -> list[str] | None:
        """The task's class names (None for a task without classes)."""
        return self.task.labels

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

    def _autocast(self) -> contextlib.AbstractContextManager:
        return autocast(self.device, self.amp_dtype)

    def log(self, msg: str) -> None:
        """Print ``msg`` through the log function (rank 0 only)."""
        if self.dist.is_main:
            self.log_fn(msg)

    # ----------------------------------------------------------------- train
    def train_epoch(self) -> dict[str, float]:
        """One pass over the training data; returns the loss, the task's training metrics
        (``train_<name>``), throughput, time and image size."""
        model = self.model
        model.train()
        self.task.start_epoch(self.epoch, self.cfg.epochs)
        sampler = getattr(self.train_loader, "batch_sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(self.epoch)
        gen = torch.Generator(device=self.device).manual_seed(self.cfg.seed * 100003 + self.epoch * 7919 + self.dist.rank)
        size = self.image_size_at(self.epoch)
        metrics = self.task.train_metrics()
        loss_sum, seen, t0 = 0.0, 0, time.perf_counter()
        bar = self._progress(len(self.train_loader), f"epoch {self.epoch + 1}/{self.cfg.epochs}")
        self.optimizer.zero_grad(set_to_none=True)
        n_batches = len(self.train_loader)
        for i, raw in enumerate(self.train_loader):
            batch = self.task.prepare(raw, self.device, size, gen)
            last_micro = (i + 1) % self.accum == 0 or i + 1 == n_batches
            sync = contextlib.nullcontext()
            if self.fsdp:  # reduce-scatter the gradients on the last micro-batch only
                model.set_requires_gradient_sync(last_micro)
            elif self.dist.enabled and not last_micro:
                sync = model.no_sync()
            with sync:
                with self._autocast():
                    out = self.task.forward(model, batch.inputs)
                    loss = self.task.loss(batch, out)
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
            loss_sum += loss.item() * batch.size
            seen += batch.size
            metrics.update(batch, out)
            if bar is not None:
                bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{self.scheduler.get_last_lr()[-1]:.2e}")
                bar.update(1)
        if bar is not None:
            bar.close()
        elapsed = time.perf_counter() - t0
        rec: dict[str, Any] = {"train_loss": all_reduce_mean(loss_sum / max(seen, 1), self.dist)}
        for k, v in metrics.compute().items():
            if k != "n" and _is_scalar(v):
                rec[f"train_{k}"] = all_reduce_mean(float(v), self.dist)
        rec.update(throughput=seen * self.dist.world_size / elapsed, epoch_time=elapsed, image_size=size)
        return rec

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
        self.task.after_step(unwrap(self.model))
        if self.ema is not None:
            self.ema.update(unwrap(self.model))

    def _progress(self, total: int, desc: str):
        if not (self.cfg.progress and self.dist.is_main and sys.stderr.isatty()):
            return None
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)

    # ------------------------------------------------------------------ eval
    def evaluate(self, loader: DataLoader, model: nn.Module | None = None) -> dict[str, Any]:
        """The task's evaluation metrics (classification: loss, top-1/top-5 %, ``n``, confusion matrix)."""
        return evaluate_task(unwrap(model or self.model), self.task, loader, self.device, self.cfg.data.image_size,
                             self.amp_dtype)

    # ---------------------------------------------------------- checkpoints
    def state(self) -> dict[str, Any]:
        """Everything besides the weights that an exact resume needs (the task's state included;
        with FSDP the optimizer's state goes into the sharded checkpoint instead)."""
        return {
            "step": self.step,
            **({} if self.fsdp else {"optimizer": self.optimizer.state_dict()}),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "ema_updates": self.ema.updates if self.ema else 0,
            "history": json.dumps(self.history),
            "best": json.dumps(self.best),
            "task": self.task.state_dict(),
        }

    def save(self) -> Path | None:
        """Write this epoch's checkpoint (rank 0 only; FSDP: every rank its shards); returns its folder."""
        if self.fsdp:
            meta = {"vitlab": self._meta, "scalar_params": self.scalar_params}
            return save_sharded_checkpoint(self.out, self.epoch, self.model, self.optimizer, self.state(), meta,
                                           self.ema.module if self.ema else None, is_main=self.dist.is_main)
        if not self.dist.is_main:
            return None
        return save_training_checkpoint(self.out, self.epoch, unwrap(self.model), self.state(),
                                        self.ema.module if self.ema else None, labels=self.task.labels,
                                        task=self.task.name)

    def resume(self, folder: str | Path | None = None) -> bool:
        """Restore the latest checkpoint of the run directory (or ``folder``); False if none."""
        folder = Path(folder) if folder is not None else latest_checkpoint(self.out)
        if folder is None:
            return False
        if self.fsdp:
            st = load_sharded_checkpoint(folder, self.model, self.optimizer, self.ema.module if self.ema else None)
        else:
            st = load_training_checkpoint(folder)
            unwrap(self.model).load_state_dict(st["model"])
            self.optimizer.load_state_dict(st["optimizer"])
        for g in self.optimizer.param_groups:  # keep our extra keys' values from the checkpoint
            g.setdefault("lr_scale", 1.0)
        self.scheduler.load_state_dict(st["scheduler"])
        self.scaler.load_state_dict(st["scaler"])
        if self.ema is not None and self.fsdp and st["has_ema"]:
            self.ema.updates = int(st["ema_updates"])
        elif self.ema is not None and st.get("ema") is not None:
            self.ema.load_state_dict(st["ema"], int(st["ema_updates"]))
        self.epoch = int(st["epoch"])
        self.step = int(st["step"])
        self.history = json.loads(st["history"])
        self.best = json.loads(st["best"])
        self.task.load_state_dict(st.get("task", {}))
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
        writer = tensorboard_writer(self.out / "tensorboard") if self._tb_wanted else None
        try:
            while self.epoch < self.cfg.epochs:
                rec: dict[str, Any] = {"epoch": self.epoch + 1}
                rec.update(self.train_epoch())
                rec["lr"] = self.scheduler.get_last_lr()[-1]
                rec["step"] = self.step
                last = self.epoch + 1 == self.cfg.epochs
                if self.val_loader is not None and ((self.epoch + 1) % self.cfg.eval_every == 0 or last):
                    val = self.evaluate(self.val_loader)
                    rec.update(_prefixed("val", val))
                    if self.dist.is_main or self.fsdp:
                        self._after_evaluation(val)
                    if self.ema is not None:
                        rec.update(_prefixed("ema_val", self.evaluate(self.val_loader, self.ema.module)))
                    self._track_best(rec)
                self.epoch += 1
                self.history.append(rec)
                if self.dist.is_main:
                    with metrics_file.open("a") as f:
                        f.write(json.dumps(rec) + "\n")
                    if writer is not None:
                        for k, v in rec.items():
                            if k != "epoch" and _is_scalar(v):
                                writer.add_scalar(k, v, self.epoch)
                        writer.flush()
                self.log(self._summary(rec))
                if self.epoch % self.cfg.save_every == 0 or last:
                    self.save()
            return self.finish()
        finally:
            if writer is not None:
                writer.close()

    def _track_best(self, rec: dict[str, Any]) -> None:
        key = f"val_{self.task.primary_metric}"
        value = rec.get(key)
        if value is None:
            return
        old = self.best.get(key)
        better = old is None or (value > old if self.task.higher_is_better else value < old)
        if better:
            self.best = {"epoch": rec["epoch"], key: value}

    def _summary(self, r: dict[str, Any]) -> str:
        primary = self.task.primary_metric
        parts = [f"epoch {r['epoch']}/{self.cfg.epochs}", f"loss {r['train_loss']:.4f}"]
        if f"val_{primary}" in r:
            parts.append(f"val {self.task.format_metric(primary, r[f'val_{primary}'])}")
        if f"ema_val_{primary}" in r:
            parts.append(f"EMA {self.task.format_metric(primary, r[f'ema_val_{primary}'])}")
        parts += [f"lr {r['lr']:.2e}", f"{r['throughput']:.0f} img/s", f"{r['epoch_time']:.1f}s"]
        return "  ".join(parts)

    def finish(self) -> dict[str, Any]:
        """Test metrics (model and EMA), ``results.json`` and the task's plots."""
        primary = self.task.primary_metric
        results: dict[str, Any] = {"task": self.task.name, "primary_metric": primary, "epochs": self.epoch,
                                   "steps": self.step}
        if self.history:
            results[f"final_val_{primary}"] = self.history[-1].get(f"val_{primary}")
            results["train_time_s"] = sum(h["epoch_time"] for h in self.history)
        if self.best:
            results["best"] = self.best
        loader = self.test_loader or self.val_loader
        final = None
        if loader is not None:
            split = "test" if self.test_loader is not None else "val"
            final = self.evaluate(loader)
            results.update(_prefixed(split, final, keep_n=True))
            if self.ema is not None:
                results.update(_prefixed(f"ema_{split}", self.evaluate(loader, self.ema.module)))
            results["split"] = split
        if self.dist.is_main:
            (self.out / "results.json").write_text(json.dumps(results, indent=2))
        if self.dist.is_main or self.fsdp:
            self._plots(final)
        return results

    @contextlib.contextmanager
    def _hook_dir(self):
        """Where the task's output hooks write: the run directory on rank 0. Under FSDP every rank
        runs them (a forward of the sharded model is a collective), the others into a folder thrown away."""
        if self.dist.is_main:
            yield self.out
        else:
            import tempfile

            with tempfile.TemporaryDirectory(prefix="vitlab-rank") as tmp:
                yield Path(tmp)

    def _after_evaluation(self, metrics: dict[str, Any]) -> None:
        try:
            with self._hook_dir() as out:
                self.task.after_evaluation(out, self.epoch + 1, metrics)
        except ImportError as e:
            self.log(f"evaluation outputs skipped: {e}")

    def _plots(self, final: dict[str, Any] | None) -> None:
        try:
            with self._hook_dir() as out:
                self.task.plots(out, self.history, final)
        except ImportError as e:
            self.log(f"plots skipped: {e}")


def _is_scalar(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _prefixed(prefix: str, metrics: dict[str, Any], keep_n: bool = False) -> dict[str, Any]:
    """``{prefix_name: value}`` for the scalar metrics (``n`` only with ``keep_n``); None (a metric with
    nothing to measure, e.g. COCO AP of a size without objects) is kept as null."""
    return {f"{prefix}_{k}": v for k, v in metrics.items() if (_is_scalar(v) or v is None) and (keep_n or k != "n")}
