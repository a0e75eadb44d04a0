"""The training run configuration: typed sections, YAML recipes and dotted overrides.

``load_config("configs/digits.yaml", ["optim.lr=5e-4", "epochs=10"])`` reads a recipe,
applies ``section.key=value`` overrides (values parsed as YAML), and validates every key and
value against the dataclasses below; a bad key names the valid ones and close matches.
"""

from __future__ import annotations

import copy
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..config import suggest
from ..tasks.registry import UnknownTaskError, config_sections, get_task

INTERPOLATIONS: tuple[str, ...] = ("bicubic", "bilinear", "nearest", "area")


@dataclass
class ModelSection:
    """Which model: a registered name, optional weights and config overrides."""

    name: str = "vit_tiny_patch16_224"
    pretrained: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    grad_checkpointing: bool = False


@dataclass
class DataSection:
    """Dataset and loading.

    ``image_size`` is the training size (None: the dataset's default, see
    :data:`vitlab.training.recipes.DATASET_DEFAULTS`). Evaluation images are resized to
    ``floor(image_size / crop_pct)`` and center-cropped (timm's eval transform) with
    ``interpolation``; these three values are what checkpoints record as their preprocessing.
    """

    dataset: str = "digits"
    data_dir: str | None = None
    image_size: int | None = None
    crop_pct: float = 1.0
    interpolation: str = "bilinear"
    batch_size: int = 64
    eval_batch_size: int = 256
    num_workers: int = 0
    progressive_sizes: list[int] = field(default_factory=list)
    progressive_epochs: list[int] = field(default_factory=list)


@dataclass
class AugmentSection:
    """Batched augmentation, mixup/cutmix and label smoothing (0 / None / false switches off).

    ``randaugment`` is a timm-style string (``"rand-m9-mstd0.5-inc1"``); ``randaugment_ops``
    restricts it to a subset of ops (e.g. only geometric ones for digits).
    """

    random_resized_crop: bool = False
    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (0.75, 1.3333333333333333)
    hflip: float = 0.0
    affine_degrees: float = 0.0
    affine_translate: float = 0.0
    affine_scale: tuple[float, float] = (1.0, 1.0)
    affine_shear: float = 0.0
    affine_p: float = 0.0
    color_jitter: float = 0.0
    randaugment: str | None = None
    randaugment_ops: list[str] = field(default_factory=list)
    random_erasing: float = 0.0
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    label_smoothing: float = 0.0


@dataclass
class OptimSection:
    """AdamW, warmup + cosine, clipping, accumulation, layer-wise decay."""

    name: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    layer_decay: float | None = None
    clip_grad: float | None = 1.0
    warmup_epochs: float = 5.0
    min_lr: float = 1e-6
    accumulation_steps: int = 1


@dataclass
class DistillSection:
    """DeiT distillation: teacher = a registered model name or a checkpoint path."""

    teacher: str | None = None
    teacher_checkpoint: str | None = None
    type: str = "none"
    alpha: float = 0.5
    tau: float = 1.0


@dataclass
class LogSection:
    """Extra logging: ``tensorboard`` writes event files to ``<run>/tensorboard`` (needs the
    ``tensorboard`` package) next to ``metrics.jsonl``."""

    tensorboard: bool = False


@dataclass
class DistributedSection:
    """How several ranks (torchrun) share the work: ``strategy`` ``ddp`` (replicated weights,
    the default) or ``fsdp`` (FSDP2: parameters, gradients, optimizer state and EMA sharded per
    transformer block, DCP checkpoints); ``compile`` compiles each block before sharding (fsdp)."""

    strategy: str = "ddp"
    compile: bool = False


@dataclass
class TrainConfig:
    """A whole training run.

    ``task`` names a registered task (:func:`vitlab.tasks.list_tasks`): what a batch is, the
    loss, the metrics and the plots; the engine does the rest. A task's own options sit in
    the typed section it registers (``segmentation``, ``mae``, ``detection``, ``clip``...):
    read as ``cfg.segmentation`` and written as a top-level key of a recipe, held in
    ``sections``; every registered section is present with its defaults.
    """

    task: str = "classification"
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    augment: AugmentSection = field(default_factory=AugmentSection)
    optim: OptimSection = field(default_factory=OptimSection)
    distill: DistillSection = field(default_factory=DistillSection)
    log: LogSection = field(default_factory=LogSection)
    distributed: DistributedSection = field(default_factory=DistributedSection)
    epochs: int = 30
    seed: int = 0
    device: str = "auto"
    precision: str = "fp32"
    ema_decay: float | None = None
    output_dir: str | None = None
    recipe: str = "custom"
    progress: bool = True
    save_every: int = 1
    eval_every: int = 1
    sections: dict[str, Any] = field(default_factory=dict)

    def __getattr__(self, name: str) -> Any:
        """A registered task's section (``cfg.segmentation``)."""
        sections = self.__dict__.get("sections")
        if sections is not None and name in sections:
            return sections[name]
        raise AttributeError(f"{type(self).__name__} has no attribute or task section {name!r}")

    def __post_init__(self) -> None:
        for key, section in config_sections().items():
            if key not in self.sections:
                self.sections[key] = section()
            elif isinstance(self.sections[key], dict):
                self.sections[key] = _build(section, self.sections[key], key)
        errors = []
        try:
            get_task(self.task)
        except UnknownTaskError as e:
            errors.append(str(e))
        if self.epochs <= 0:
            errors.append(f"epochs must be positive, got {self.epochs}")
        if self.precision not in ("fp32", "bf16", "fp16"):
            errors.append(f"precision must be fp32, bf16 or fp16, got {self.precision!r}")
        if self.optim.name not in ("adamw", "sgd"):
            errors.append(f"optim.name must be adamw or sgd, got {self.optim.name!r}")
        if self.distill.type not in ("none", "soft", "hard"):
            errors.append(f"distill.type must be none, soft or hard, got {self.distill.type!r}")
        if self.distill.type != "none" and not (self.distill.teacher or self.distill.teacher_checkpoint):
            errors.append("distill.type is set but there is no distill.teacher or distill.teacher_checkpoint")
        if len(self.data.progressive_sizes) != len(self.data.progressive_epochs):
            errors.append("data.progressive_sizes and data.progressive_epochs must have the same length")
        if self.optim.accumulation_steps < 1:
            errors.append("optim.accumulation_steps must be >= 1")
        if self.ema_decay is not None and not 0 < self.ema_decay < 1:
            errors.append(f"ema_decay must be in (0, 1), got {self.ema_decay}")
        if not 0.0 < self.data.crop_pct <= 1.0:
            errors.append(f"data.crop_pct must be in (0, 1], got {self.data.crop_pct}")
        if self.data.interpolation not in INTERPOLATIONS:
            errors.append(f"data.interpolation must be one of {', '.join(INTERPOLATIONS)}, got {self.data.interpolation!r}")
        if self.data.image_size is not None and self.data.image_size <= 0:
            errors.append(f"data.image_size must be positive, got {self.data.image_size}")
        if self.data.batch_size <= 0:
            errors.append(f"data.batch_size must be positive, got {self.data.batch_size}")
        if self.distributed.strategy not in ("ddp", "fsdp"):
            errors.append(f"distributed.strategy must be ddp or fsdp, got {self.distributed.strategy!r}")
        elif self.distributed.strategy == "fsdp" and self.precision == "fp16":
            errors.append("distributed.strategy=fsdp trains in fp32 or bf16 (precision=bf16), not fp16")
        if self.distributed.compile and self.distributed.strategy != "fsdp":
            errors.append("distributed.compile compiles each block before FSDP sharding: it needs distributed.strategy=fsdp")
        errors += range_errors(self)
        if errors:
            raise ValueError("invalid training config: " + "; ".join(errors))


#: Valid ranges of numeric options, ``section.key -> (low, high)`` (inclusive; None: unbounded).
RANGES: dict[str, tuple[float | None, float | None]] = {
    **{f"augment.{k}": (0.0, 1.0) for k in ("hflip", "affine_p", "random_erasing", "mixup_prob",
                                               "mixup_switch_prob", "affine_translate")},
    "augment.label_smoothing": (0.0, 0.99),
    **{f"augment.{k}": (0.0, None) for k in ("affine_degrees", "affine_shear", "color_jitter", "mixup_alpha",
                                                "cutmix_alpha")},
    "optim.lr": (0.0, None), "optim.weight_decay": (0.0, None), "optim.min_lr": (0.0, None),
    "optim.warmup_epochs": (0.0, None), "distill.alpha": (0.0, 1.0), "distill.tau": (0.0, None),
}


def range_errors(cfg: "TrainConfig") -> list[str]:
    """``key must be in [low, high], got value`` for every option of :data:`RANGES` outside its range."""
    errors = []
    for key, (low, high) in RANGES.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if isinstance(value, (int, float)) and ((low is not None and value < low) or (high is not None and value > high)):
            valid = f"[{low:g}, {high:g}]" if high is not None else f">= {low:g}"
            errors.append(f"{key} must be {'in ' if high is not None else ''}{valid}, got {value:g}")
    return errors


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check / convert a YAML value to a field's annotated type."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except ValueError as e:
                errors.append(str(e))
        raise ValueError(errors[0] if errors else f"{where}: bad value {value!r}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ValueError(f"{where} must be a mapping of {', '.join(f.name for f in dataclasses.fields(tp))}")
        return _build(tp, value, where)
    if tp is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{where} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{where} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 3e-3 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{where} must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ValueError(f"{where} must be a string, got {value!r}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{where} must be a list, got {value!r}")
        args = typing.get_args(tp)
        if origin is tuple:
            if len(args) != len(value):
                raise ValueError(f"{where} must have {len(args)} values, got {value!r}")
            return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        return [_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{where} must be a mapping, got {value!r}")
        return dict(value)
    return value


def _build(cls: type, values: dict[str, Any], where: str = "") -> Any:
    types_ = _field_types(cls)
    kwargs: dict[str, Any] = {}
    if cls is TrainConfig:  # the registered task sections are top-level keys too
        sections = config_sections()
        types_ = {k: v for k, v in types_.items() if k != "sections"} | sections
        kwargs["sections"] = {}
    for key, value in values.items():
        path = f"{where}.{key}" if where else key
        if key not in types_:
            raise ValueError(
                f"unknown config key {path!r}.{suggest(key, list(types_))} "
                f"Valid keys{' in ' + where if where else ''}: {', '.join(types_)}"
            )
        if cls is TrainConfig and key in sections:
            kwargs["sections"][key] = _coerce(value, types_[key], path)
        else:
            kwargs[key] = _coerce(value, types_[key], path)
    return cls(**kwargs)


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """A plain dict (YAML/JSON-friendly) of a config."""
    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    out = plain(cfg)
    if isinstance(cfg, TrainConfig):  # the task sections as top-level keys, as a recipe writes them
        out.update(out.pop("sections"))
    return out


def apply_overrides(values: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` strings (value parsed as YAML) to a nested dict."""
    out = config_to_dict(values) if dataclasses.is_dataclass(values) else copy.deepcopy(values)
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like key.sub=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as e:
            raise ValueError(f"cannot parse the value of {key!r}: {e}") from None
        parts = key.strip().split(".")
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ValueError(f"{key!r}: {p!r} is not a section")
        node[parts[-1]] = value
    return out


def set_dotted(values: dict[str, Any], key: str, value: Any) -> None:
    """Set ``values["a"]["b"] = value`` for ``key="a.b"`` (a typed value, not parsed)."""
    parts = key.split(".")
    node = values
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ValueError(f"{key!r}: {p!r} is not a section")
    node[parts[-1]] = value


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    base: dict[str, Any] | None = None,
    model: str | None = None,
    dataset: str | None = None,
    flags: dict[str, Any] | None = None,
) -> TrainConfig:
    """Compose a :class:`TrainConfig`; later layers win:

    1. the dataclass defaults;
    2. the dataset's defaults (:data:`vitlab.training.recipes.DATASET_DEFAULTS`: image size,
       evaluation crop, augmentation) for the dataset the run ends up using;
    3. the recipe: ``base`` and then the YAML file at ``path``;
    4. ``model`` (replaces the recipe's whole ``model`` section, its overrides included) and
       ``dataset`` (replaces ``data.dataset``);
    5. dotted ``overrides`` (``"optim.lr=5e-4"``, values parsed as YAML);
    6. ``flags``: typed values by dotted key (the CLI's ``--epochs``, ``--lr``...).

    The recipe's name (``recipe``: the YAML's ``recipe`` key, else its file name) files
    runs under ``runs/<recipe>/``.

    Raises:
        FileNotFoundError: The recipe does not exist.
        ValueError: An unknown key or a value of the wrong type, naming the valid keys.
    """
    from ..datasets.pipeline import dataset_kind
    from .recipes import DATASET_DEFAULTS

    values: dict[str, Any] = copy.deepcopy(base or {})
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ValueError(f"{path} is not valid YAML: {e}") from None
        if not isinstance(loaded, dict):
            raise ValueError(f"{path} must hold a mapping of config sections")
        values = _merge(values, loaded)
        values.setdefault("recipe", path.stem)
    if model is not None:
        values["model"] = {"name": model}
    if dataset is not None:
        set_dotted(values, "data.dataset", dataset)
    values = apply_overrides(values, overrides or [])
    for key, value in (flags or {}).items():
        set_dotted(values, key, value)
    data = values.get("data") if isinstance(values.get("data"), dict) else {}
    name = data.get("dataset", DataSection.dataset)
    defaults = DATASET_DEFAULTS.get(dataset_kind(str(name)), {})
    values = _merge(copy.deepcopy(defaults), values)
    if isinstance(values.get("data"), dict) and values["data"].get("image_size") is None:
        values["data"]["image_size"] = defaults.get("data", {}).get("image_size")  # null: the dataset's size
    return _build(TrainConfig, values)


def _merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) and k != "overrides" else v
    return out
