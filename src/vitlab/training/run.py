"""Assemble a training run from a :class:`TrainConfig` (the task builds data, model and loss), run directories, resume."""

from __future__ import annotations

import copy
import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ..datasets.pipeline import dataset_label
from ..tasks.registry import get_task
from .config import TrainConfig, _build, config_to_dict, load_config, set_dotted
from .trainer import Trainer, unwrap


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
    from ..models.flops import count_flops

    rate = gflops_per_s or float(os.environ.get("VITLAB_CPU_GFLOPS", ASSUMED_CPU_GFLOPS))
    flops = count_flops(model, (1, in_channels, image_size, image_size))
    return 3.0 * flops * images_per_epoch * epochs / (rate * 1e9) / 3600.0


def build_trainer(cfg: TrainConfig, output_dir: str | Path | None = None, log: Callable[[str], None] = print) -> Trainer:
    """The task's datasets and model from a config, as a ready :class:`Trainer`.

    ``cfg.task`` picks the task from the registry (:func:`vitlab.tasks.get_task`); its
    ``from_config`` builds the task, the model and the datasets (classification:
    :meth:`vitlab.tasks.ClassificationTask.from_config`). Without ``output_dir`` or
    ``cfg.output_dir`` a fresh run directory is made (:func:`new_run_dir`).
    """
    torch.manual_seed(cfg.seed)  # the model's initialisation is part of the run's reproducibility
    if output_dir is None and cfg.output_dir is None:
        prepare_output_dir(cfg)  # a fresh runs/<recipe>/<model>-<dataset>-<N>
    setup = get_task(cfg.task).from_config(cfg)
    return Trainer(setup.model, cfg, setup.train_data, setup.val_data, setup.test_data, task=setup.task,
                   output_dir=output_dir, log=log)


# --------------------------------------------------------------------------- run directories
#: Files that make a folder a run directory (a fresh run never writes into one).
RUN_FILES: tuple[str, ...] = ("config.json", "metrics.jsonl", "results.json", "checkpoints")
#: What ``--overwrite`` removes from a run directory before the new run starts.
RUN_OUTPUTS: tuple[str, ...] = RUN_FILES + ("curves.png", "confusion_matrix.png", "loss_curves.png", "reconstructions")


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
    stage = get_task(cfg.task).prerequisite(cfg, out)
    if stage is not None:
        _train_prerequisite(cfg, out, *stage, log=log)
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


def _train_prerequisite(cfg: TrainConfig, out: Path, folder: Path, recipe: dict[str, Any],
                        log: Callable[[str], None]) -> None:
    """Train the task's first step (``recipe``) into ``folder`` unless it finished there, then point
    ``cfg.model.pretrained`` at it. The run's ``config.json`` is written first, so a run killed
    during the first step resumes it with ``--resume``."""
    cfg.model.pretrained = str(folder)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config_to_dict(cfg), indent=2))
    if (folder / "results.json").is_file():
        return
    # composed as `vitlab train --config RECIPE` composes it: the dataset's defaults (the digits'
    # augmentation) under the recipe
    step = load_config(None, base=copy.deepcopy(recipe), flags={"output_dir": str(folder), "progress": cfg.progress,
                                                                 "device": cfg.device, "seed": cfg.seed})
    log(f"first step: training {step.task} ({step.model.name}) into {folder}")
    resumed = (folder / "config.json").is_file()
    train(resume_config(folder, {}) if resumed else step, resume=resumed, log=log)
    log(f"first step done; {cfg.task} starts from {folder}")


def _warn_if_slow(trainer: Trainer, cfg: TrainConfig, log: Callable[[str], None]) -> None:
    """One warning line when the remaining epochs would take more than :data:`CPU_WARN_HOURS` on a CPU."""
    if trainer.device.type != "cpu" or trainer.epoch >= cfg.epochs or cfg.data.image_size is None:
        return
    model = unwrap(trainer.model)
    channels = getattr(getattr(model, "config", None), "in_channels", None)
    if channels is None:  # not an image backbone: no estimate
        return
    n = len(trainer.train_loader.dataset) if hasattr(trainer.train_loader, "dataset") else 0
    hours = estimate_train_hours(model, int(cfg.data.image_size), int(channels), n, cfg.epochs - trainer.epoch)
    if hours > CPU_WARN_HOURS:
        log(f"warning: this run needs about {hours:.1f} hours on a CPU ({cfg.model.name} at "
            f"{cfg.data.image_size}x{cfg.data.image_size}, {n} images x {cfg.epochs - trainer.epoch} epochs at an assumed "
            f"{float(os.environ.get('VITLAB_CPU_GFLOPS', ASSUMED_CPU_GFLOPS)):.0f} GFLOP/s); use a GPU (--device cuda), "
            f"fewer epochs, a smaller model or data.image_size")
