"""Assemble a training run from a :class:`TrainConfig`: data, model, augmentation, loss, trainer."""

from __future__ import annotations

import copy
import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from ..datasets.augment import (
    ColorJitter,
    Compose,
    Normalize,
    RandAugment,
    RandomAffine,
    RandomErasing,
    RandomHorizontalFlip,
    RandomResizedCrop,
    parse_rand_augment,
)
from ..datasets.factory import build_dataset
from ..datasets.pipeline import (
    RandomResizedCropSample,
    ResizeCenterCropSample,
    dataset_kind,
    dataset_label,
    preprocessing_record,
)
from ..models.registry import create_model
from .config import AugmentSection, TrainConfig, _build, set_dotted
from .losses import DistillationLoss, LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from .mixup import Mixup
from .trainer import Trainer, unwrap


def build_augment(aug: AugmentSection, image_size: int, mean, std, crop_on_device: bool = True) -> Compose:
    """The training augmentation on [0, 1] batches, ending with normalisation (and erasing).

    ``crop_on_device=False`` leaves out the random-resized crop: it then runs per sample in
    the DataLoader workers (image folders, whose images differ in size).
    """
    ops: list[Any] = []
    if aug.random_resized_crop and crop_on_device:
        ops.append(RandomResizedCrop(image_size, tuple(aug.crop_scale), tuple(aug.crop_ratio)))
    if aug.hflip > 0:
        ops.append(RandomHorizontalFlip(aug.hflip))
    if aug.affine_p > 0:
        ops.append(RandomAffine(aug.affine_degrees, aug.affine_translate, tuple(aug.affine_scale), aug.affine_shear,
                                fill=0.0, p=aug.affine_p))
    if aug.randaugment:
        ra: RandAugment = parse_rand_augment(aug.randaugment)
        if aug.randaugment_ops:
            ra = RandAugment(ra.num_ops, ra.magnitude, ra.magnitude_std, ra.max_magnitude, ra.op_prob,
                             ops=aug.randaugment_ops, fill=0.0 if len(mean) == 1 else ra.fill)
        ops.append(ra)
    elif aug.color_jitter > 0:
        ops.append(ColorJitter(aug.color_jitter, aug.color_jitter, aug.color_jitter if len(mean) == 3 else 0.0))
    ops.append(Normalize(mean, std))
    if aug.random_erasing > 0:
        ops.append(RandomErasing(aug.random_erasing))
    return Compose(ops)


def build_criterion(cfg: TrainConfig, teacher: nn.Module | None) -> Callable[..., torch.Tensor]:
    """Cross-entropy (soft targets under mixup, label smoothing otherwise), wrapped for distillation."""
    a = cfg.augment
    if a.mixup_alpha > 0 or a.cutmix_alpha > 0:
        base: nn.Module = SoftTargetCrossEntropy()
    elif a.label_smoothing > 0:
        base = LabelSmoothingCrossEntropy(a.label_smoothing)
    else:
        base = nn.CrossEntropyLoss()
    d = cfg.distill
    return DistillationLoss(base, teacher, d.type if teacher is not None else "none", d.alpha, d.tau)


def build_teacher(cfg: TrainConfig, num_classes: int, in_channels: int, image_size: int | None) -> nn.Module | None:
    """The distillation teacher: a registered model (optionally with weights) or a checkpoint."""
    d = cfg.distill
    if d.type == "none":
        return None
    from ..pretrained import load_model

    if d.teacher:
        extra: dict[str, Any] = {"in_channels": in_channels}
        if image_size is not None:
            extra["image_size"] = image_size
        teacher = create_model(d.teacher, pretrained=d.teacher_checkpoint, num_classes=num_classes, **extra)
    else:
        teacher = load_model(d.teacher_checkpoint)
    if getattr(teacher.config, "num_classes", num_classes) != num_classes:
        raise ValueError(f"the teacher predicts {teacher.config.num_classes} classes; the data has {num_classes}")
    return teacher.eval()


class _Resized(Dataset):
    """A dataset with a per-sample transform applied to its images; keeps its metadata."""

    def __init__(self, dataset: Any, transform: Callable[[Tensor], Tensor]) -> None:
        self.dataset, self.transform = dataset, transform
        for attr in ("classes", "num_classes", "mean", "std", "targets"):
            if hasattr(dataset, attr):
                setattr(self, attr, getattr(dataset, attr))

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        x, y = self.dataset[index]
        return self.transform(x), y


def build_datasets(cfg: TrainConfig) -> tuple[Any, Any, Any | None]:
    """Train/val/test datasets yielding [0, 1] images at ``cfg.data.image_size``.

    Image folders and ImageNet trees (images of any size and mode) are decoded and cropped
    per sample in the DataLoader workers: a random-resized crop (``augment.crop_scale``,
    ``augment.crop_ratio``) or, without it, the evaluation transform for training; resize to
    ``image_size / crop_pct`` + center crop for evaluation, both with ``data.interpolation``.
    Fixed-size datasets (digits, CIFAR, synthetic) are resized per sample only when the
    training size or crop differs from their own; their random-resized crop runs batched on
    the device.
    """
    data = cfg.data
    size = data.image_size
    kind = dataset_kind(data.dataset)

    def build(split: str, transform: Callable[[Tensor], Tensor] | None = None) -> Any:
        kw = {"transform": transform} if transform is not None else {}
        return build_dataset(data.dataset, split, data.data_dir, **kw)

    def build_test(transform: Callable[[Tensor], Tensor] | None = None) -> Any | None:
        try:
            return build(split="test", transform=transform)
        except (ValueError, FileNotFoundError):
            return None

    if kind == "folder":
        if size is None:
            raise ValueError(f"data.image_size must be set to train on the image folder {data.dataset}")
        evaluate = ResizeCenterCropSample(size, data.crop_pct, data.interpolation)
        a = cfg.augment
        crop = (RandomResizedCropSample(size, a.crop_scale, a.crop_ratio, data.interpolation)
                if a.random_resized_crop else evaluate)
        return build("train", crop), build("val", evaluate), build_test(evaluate)
    train_set, val_set, test_set = build("train"), build("val"), build_test()
    native = tuple(train_set[0][0].shape[-2:])
    if size is None:
        size = data.image_size = int(native[-1])
    if native != (size, size):
        train_set = _Resized(train_set, ResizeCenterCropSample(size, 1.0, data.interpolation))
    if native != (size, size) or data.crop_pct != 1.0:
        evaluate = ResizeCenterCropSample(size, data.crop_pct, data.interpolation)
        val_set = _Resized(val_set, evaluate)
        test_set = _Resized(test_set, evaluate) if test_set is not None else None
    return train_set, val_set, test_set


#: Effective training rate assumed for the CPU estimate (GFLOP/s, forward + backward); set
#: ``VITLAB_CPU_GFLOPS`` to your machine's. Measured: the digits recipe (0.0276 GFLOPs per
#: image forward, x3 for training, 1257 images x 120 epochs = 12.5 TFLOP) trains in about
#: 125 s on 2 CPU cores, i.e. ~100 GFLOP/s effective; larger models run their matmuls at a
#: similar or better rate.
ASSUMED_CPU_GFLOPS: float = 100.0
#: Runs estimated above this many hours on a CPU get a warning line before they start.
CPU_WARN_HOURS: float = 1.0


def estimate_train_hours(model: nn.Module, image_size: int, in_channels: int, images_per_epoch: int, epochs: int,
                         gflops_per_s: float | None = None) -> float:
    """Hours to train ``model`` on a CPU: 3 x forward FLOPs x images x epochs / rate.

    Args:
        model: The model (counted with one image of ``image_size``).
        image_size: Training side in pixels.
        in_channels: Input channels.
        images_per_epoch: Training images per epoch.
        epochs: Epochs still to run.
        gflops_per_s: Effective rate; ``$VITLAB_CPU_GFLOPS`` or :data:`ASSUMED_CPU_GFLOPS`.
    """
    from ..evaluation.flops import count_flops

    rate = gflops_per_s or float(os.environ.get("VITLAB_CPU_GFLOPS", ASSUMED_CPU_GFLOPS))
    flops = count_flops(model, (1, in_channels, image_size, image_size))
    return 3.0 * flops * images_per_epoch * epochs / (rate * 1e9) / 3600.0


def _create_model(cfg: TrainConfig, num_classes: int, channels: int, image_size: int) -> nn.Module:
    overrides = dict(cfg.model.overrides)
    overrides.setdefault("in_channels", channels)
    overrides.setdefault("image_size", image_size)
    try:
        return create_model(cfg.model.name, pretrained=cfg.model.pretrained, num_classes=num_classes, **overrides)
    except (ValueError, TypeError) as e:
        if "image_size" in cfg.model.overrides:
            raise
        raise ValueError(
            f"cannot build {cfg.model.name} for the {image_size}x{image_size} images of {cfg.data.dataset}: {e}. "
            f"Set data.image_size=N (the model's own size is slow on CPU) or fit the model to the data with "
            f"model.overrides (e.g. model.overrides.patch_size=2)"
        ) from None


def build_trainer(cfg: TrainConfig, output_dir: str | Path | None = None, log: Callable[[str], None] = print) -> Trainer:
    """Datasets, model, augmentation and loss from a config, as a ready :class:`Trainer`.

    The model is built for the data's size (``data.image_size``) unless
    ``model.overrides.image_size`` says otherwise. Its ``pretrained_cfg`` (saved in every
    checkpoint) records the preprocessing this run uses: ``input_size``, the dataset's
    ``mean``/``std``, ``crop_pct`` and ``interpolation``. Without ``output_dir`` or
    ``cfg.output_dir`` a fresh run directory is made (:func:`new_run_dir`).
    """
    torch.manual_seed(cfg.seed)  # the model's initialisation is part of the run's reproducibility
    data = cfg.data
    if output_dir is None and cfg.output_dir is None:
        prepare_output_dir(cfg)  # a fresh runs/<recipe>/<model>-<dataset>-<N>
    train_set, val_set, test_set = build_datasets(cfg)
    sample, _ = train_set[0]
    channels = sample.shape[0]
    image_size = int(data.image_size or sample.shape[-1])
    model = _create_model(cfg, train_set.num_classes, channels, image_size)
    model_size = getattr(model.config, "image_size", (image_size, image_size))
    if data.image_size is None and tuple(model_size) != (image_size, image_size):
        image_size = model_size[0]
    cfg.data.image_size = image_size
    mean, std = tuple(train_set.mean), tuple(train_set.std)
    # Checkpoints carry the preprocessing this run evaluates with (predict / eval read it back).
    model.pretrained_cfg = {**model.pretrained_cfg,
                            **preprocessing_record(image_size, mean, std, data.crop_pct, data.interpolation)}
    augment = build_augment(cfg.augment, image_size, mean, std, crop_on_device=dataset_kind(data.dataset) != "folder")
    a = cfg.augment
    mixup = None
    if a.mixup_alpha > 0 or a.cutmix_alpha > 0:
        mixup = Mixup(mixup_alpha=a.mixup_alpha, cutmix_alpha=a.cutmix_alpha, prob=a.mixup_prob,
                      switch_prob=a.mixup_switch_prob, label_smoothing=a.label_smoothing,
                      num_classes=train_set.num_classes)
    teacher = build_teacher(cfg, train_set.num_classes, channels, image_size)
    if hasattr(model, "set_distilled_training"):
        model.set_distilled_training(teacher is not None)
    trainer = Trainer(model, cfg, train_set, val_set, test_set, labels=list(train_set.classes), mean=mean, std=std,
                      augment=augment, mixup=mixup, criterion=build_criterion(cfg, teacher),
                      output_dir=output_dir, log=log)
    if teacher is not None:
        teacher.to(trainer.device)
    return trainer


# --------------------------------------------------------------------------- run directories
#: Files that make a folder a run directory (a fresh run never writes into one).
RUN_FILES: tuple[str, ...] = ("config.json", "metrics.jsonl", "results.json", "checkpoints")
#: What ``--overwrite`` removes from a run directory before the new run starts.
RUN_OUTPUTS: tuple[str, ...] = RUN_FILES + ("curves.png", "confusion_matrix.png")


def runs_root() -> Path:
    """Where default run directories go: ``$VITLAB_RUNS_DIR`` or ``./runs``."""
    return Path(os.environ.get("VITLAB_RUNS_DIR", "runs"))


def run_stem(cfg: TrainConfig) -> Path:
    """``runs/<recipe>/<model>-<dataset>``: the prefix of this config's run directories."""
    return runs_root() / cfg.recipe / f"{cfg.model.name}-{dataset_label(cfg.data.dataset)}"


def _numbered_runs(stem: Path) -> list[tuple[int, Path]]:
    if not stem.parent.is_dir():
        return []
    prefix = stem.name + "-"
    runs = []
    for p in stem.parent.iterdir():
        if p.is_dir() and p.name.startswith(prefix) and p.name[len(prefix):].isdigit():
            runs.append((int(p.name[len(prefix):]), p))
    return sorted(runs)


def new_run_dir(cfg: TrainConfig) -> Path:
    """Create and return a fresh ``runs/<recipe>/<model>-<dataset>-<N>`` (N = the last + 1).

    The directory is claimed with an exclusive ``mkdir``, so two runs started together get
    different numbers.
    """
    stem = run_stem(cfg)
    stem.parent.mkdir(parents=True, exist_ok=True)
    n = max((i for i, _ in _numbered_runs(stem)), default=0) + 1
    while True:
        path = stem.parent / f"{stem.name}-{n}"
        try:
            path.mkdir()
            return path
        except FileExistsError:
            n += 1


def latest_run_dir(cfg: TrainConfig) -> Path | None:
    """The most recent (highest-numbered) run directory of this recipe/model/dataset, if any."""
    runs = [p for _, p in _numbered_runs(run_stem(cfg)) if is_run_dir(p)]
    return runs[-1] if runs else None


def is_run_dir(path: str | Path) -> bool:
    """True when ``path`` holds (part of) a training run."""
    path = Path(path)
    return path.is_dir() and any((path / f).exists() for f in RUN_FILES)


def prepare_output_dir(cfg: TrainConfig, resume: bool = False, overwrite: bool = False) -> Path:
    """The run directory for ``cfg``: a fresh one when ``cfg.output_dir`` is None.

    An existing run directory is only written into with ``resume`` (continue it) or
    ``overwrite`` (its results, metrics, checkpoints and plots are deleted first).

    Raises:
        ValueError: ``cfg.output_dir`` holds another run and neither flag is given, or
            both are given.
    """
    if resume and overwrite:
        raise ValueError("--resume continues a run and --overwrite replaces it: choose one")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        if cfg.output_dir is None:
            raise ValueError("a distributed run (torchrun) needs --output-dir: the ranks must share one run directory")
        if int(os.environ.get("RANK", "0")) != 0:
            return Path(cfg.output_dir)  # rank 0 checks (and clears) it; the others follow
    if cfg.output_dir is None:
        if resume:
            raise ValueError("--resume needs the run directory: pass --output-dir RUN_DIR")
        path = new_run_dir(cfg)
        cfg.output_dir = str(path)
        return path
    path = Path(cfg.output_dir)
    if is_run_dir(path) and not resume:
        if not overwrite:
            raise ValueError(
                f"{path} already holds a run: pass --resume to continue it, --overwrite to replace it, "
                f"or leave out --output-dir for a fresh runs/<recipe>/<model>-<dataset>-<N> directory"
            )
        for name in RUN_OUTPUTS:
            target = path / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    return path


# --------------------------------------------------------------------------- resume
#: Settings a resumed run may change: where and how it runs, not what it computes.
#: ``epochs`` may only grow (the cosine schedule is stretched to the new length).
RESUME_CHANGEABLE: tuple[str, ...] = (
    "epochs", "device", "progress", "data.num_workers", "data.data_dir", "data.eval_batch_size", "output_dir",
)


def _get_dotted(values: dict[str, Any], key: str) -> Any:
    node: Any = values
    for p in key.split("."):
        if not isinstance(node, dict) or p not in node:
            raise KeyError(key)
        node = node[p]
    return node


def resume_config(run_dir: str | Path, changes: dict[str, Any] | None = None) -> TrainConfig:
    """The resolved config a run was started with (its ``config.json``), with the few
    ``changes`` a resume allows (:data:`RESUME_CHANGEABLE`).

    Args:
        run_dir: The run directory.
        changes: Dotted key -> value asked for on the command line. A value equal to the
            run's is accepted for any key.

    Raises:
        FileNotFoundError: ``run_dir`` holds no config.json.
        ValueError: A change that would make the run something else (one line, naming it),
            or fewer epochs than the run already has.
    """
    run_dir = Path(run_dir)
    cfg_file = run_dir / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{run_dir} is not a run directory (no config.json): nothing to resume")
    stored = json.loads(cfg_file.read_text())
    values = copy.deepcopy(stored)
    for key, value in (changes or {}).items():
        try:
            old = _get_dotted(stored, key)
        except KeyError:
            old = None
        if _same(old, value):
            continue
        if key not in RESUME_CHANGEABLE:
            raise ValueError(
                f"cannot change {key} on --resume (the run has {key}={old!r}, asked {value!r}): a resumed run "
                f"continues with its own config; start a new run (leave out --resume) to change it"
            )
        if key == "epochs" and int(value) < int(old):
            raise ValueError(
                f"the run at {run_dir} is set for {old} epochs; --epochs {value} cannot shorten it "
                f"(--epochs N > {old} extends it)"
            )
        set_dotted(values, key, value)
    values["output_dir"] = str(run_dir)
    return _build(TrainConfig, values)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return float(a) == float(b)
    return a == b


def train(cfg: TrainConfig, resume: bool = False, overwrite: bool = False,
          log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run a whole training job; returns ``results.json``'s content.

    A fresh run gets a fresh directory (or refuses to write into ``cfg.output_dir`` when it
    holds another run, unless ``overwrite``). ``resume`` continues the run in
    ``cfg.output_dir`` from its last checkpoint; build ``cfg`` with :func:`resume_config`
    so it is the run's own. A finished run is not trained or rewritten again.
    """
    out = prepare_output_dir(cfg, resume, overwrite)
    trainer = build_trainer(cfg, output_dir=out, log=log)
    if resume:
        stored_epochs = None
        if (out / "config.json").is_file():
            stored_epochs = json.loads((out / "config.json").read_text()).get("epochs")
        if not trainer.resume():
            log(f"no checkpoint in {trainer.out}; starting from scratch")
        elif trainer.epoch >= cfg.epochs:
            results_file = out / "results.json"
            if results_file.is_file():
                log(f"the run in {out} already finished its {cfg.epochs} epochs; nothing to do "
                    f"(--epochs N > {cfg.epochs} extends it)")
                return json.loads(results_file.read_text())
        elif stored_epochs is not None and cfg.epochs != stored_epochs:
            lr_now = trainer.scheduler.lr_at(trainer.step)
            log(f"extending the run from {stored_epochs} to {cfg.epochs} epochs: the warmup + cosine schedule now "
                f"spans {cfg.epochs} epochs (lr continues at {lr_now:.3e} from step {trainer.step})")
    _warn_if_slow(trainer, cfg, log)
    return trainer.fit()


def _warn_if_slow(trainer: Trainer, cfg: TrainConfig, log: Callable[[str], None]) -> None:
    """One warning line when the remaining epochs would take more than :data:`CPU_WARN_HOURS` on a CPU."""
    if trainer.device.type != "cpu" or trainer.epoch >= cfg.epochs:
        return
    model = unwrap(trainer.model)
    channels = int(getattr(model.config, "in_channels", 3))
    n = len(trainer.train_loader.dataset) if hasattr(trainer.train_loader, "dataset") else 0
    hours = estimate_train_hours(model, int(cfg.data.image_size), channels, n, cfg.epochs - trainer.epoch)
    if hours > CPU_WARN_HOURS:
        log(f"warning: this run needs about {hours:.1f} hours on a CPU ({cfg.model.name} at "
            f"{cfg.data.image_size}x{cfg.data.image_size}, {n} images x {cfg.epochs - trainer.epoch} epochs at an assumed "
            f"{float(os.environ.get('VITLAB_CPU_GFLOPS', ASSUMED_CPU_GFLOPS)):.0f} GFLOP/s); use a GPU (--device cuda), "
            f"fewer epochs, a smaller model or data.image_size")
