"""``build_dataset``: one entry point from a dataset name (or a folder) and a split to a Dataset."""

from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import Any

from torch import Tensor
from torch.utils.data import Dataset

from .cifar import CIFARDataset
from .digits import DigitsDataset, stratified_split
from .folder import ImageFolderDataset, _split_dir, imagenet_folder
from .synthetic import SyntheticDataset

DATASET_NAMES: tuple[str, ...] = ("digits", "cifar10", "cifar100", "synthetic", "imagenet")
SPLITS: tuple[str, ...] = ("train", "val", "test")


class SubsetDataset(Dataset):
    """A subset of a dataset that keeps its ``classes``/``num_classes``/``mean``/``std``."""

    def __init__(self, dataset: Any, indices: Any, split: str = "") -> None:
        self.dataset = dataset
        self.indices = [int(i) for i in indices]
        self.split = split
        self.classes = dataset.classes
        self.num_classes = dataset.num_classes
        self.mean, self.std = dataset.mean, dataset.std
        self.targets = [dataset.targets[i] for i in self.indices]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        return self.dataset[self.indices[index]]


def _take(fn: Any, kw: dict[str, Any], name: str) -> dict[str, Any]:
    """Check ``kw`` against ``fn``'s parameters so a typo is an error, not silently ignored."""
    params = inspect.signature(fn).parameters
    unknown = sorted(set(kw) - set(params))
    if unknown:
        allowed = ", ".join(p for p in params if p not in ("self", "root", "split", "train"))
        raise TypeError(f"unknown option(s) {unknown} for dataset {name!r}; it accepts: {allowed}")
    return kw


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")


def _folder_split(root: Path, split: str, kw: dict[str, Any]) -> Dataset:
    """``root/<split>/<class>/...`` when split folders exist, else a seeded stratified split of ``root``."""
    seed = kw.pop("seed", 0)
    val_fraction = kw.pop("val_fraction", 0.1)
    test_fraction = kw.pop("test_fraction", 0.0)
    train_dir = _split_dir(root, "train")
    if train_dir is not None:
        folder = _split_dir(root, split)
        if folder is None:
            raise FileNotFoundError(f"{root} has train/ but no {split}/ folder (expected {root}/{split}/<class>/<image>)")
        if split != "train" and "classes" not in kw:
            kw["classes"] = sorted(d.name for d in os.scandir(train_dir) if d.is_dir() and not d.name.startswith("."))
        return ImageFolderDataset(folder, **_take(ImageFolderDataset, kw, str(root)))
    full = ImageFolderDataset(root, **_take(ImageFolderDataset, kw, str(root)))
    parts = stratified_split(full.targets, (0.0, val_fraction, test_fraction), seed)
    idx = dict(zip(SPLITS, parts))[split]
    if len(idx) == 0:
        raise ValueError(
            f"the {split} split of {root} is empty: give it its own folder ({root}/{split}/<class>/...) "
            f"or a {split}_fraction > 0 (build_dataset option); vitlab eval uses the val split when there is no test split"
        )
    return SubsetDataset(full, idx, split)


def _shard_dataset(path: str, split: str, kw: dict[str, Any]) -> Dataset:
    """``shards:PATH``: a map-style view of the shard set (``streaming=True``: the streamed ShardDataset)."""
    if kw.pop("streaming", False):
        from .shard_stream import ShardDataset

        return ShardDataset(path, split, **_take(ShardDataset, kw, "shards"))
    from .shards import ShardIndexDataset

    return ShardIndexDataset(path, split, **_take(ShardIndexDataset, kw, "shards"))


def build_dataset(name: str | os.PathLike, split: str = "train", data_dir: str | os.PathLike | None = None,
                  **kw: Any) -> Dataset:
    """A dataset by name, or an image folder by path.

    Every dataset returns ``(image, label)`` with a float (C, H, W) image in [0, 1] and has
    ``classes``, ``num_classes``, ``mean`` and ``std``.

    Args:
        name: ``"digits"`` (scikit-learn, no download), ``"cifar10"``, ``"cifar100"`` (python
            batches under ``data_dir``), ``"synthetic"``, ``"imagenet"`` (``data_dir/train``,
            ``data_dir/val``) or a path to an image folder: ``path/{train,val}/<class>/...``, or
            ``path/<class>/...`` split by class with ``val_fraction`` (0.1), ``test_fraction``
            (0.0) and ``seed`` (0); or ``"shards:PATH"``, tar shards written by ``vitlab data shard``
            (``PATH/<split>/`` or one set for train): random access by default, streamed with
            ``streaming=True`` (:class:`~vitlab.datasets.shard_stream.ShardDataset`).
        split: ``"train"``, ``"val"`` or ``"test"``. CIFAR has no val split: ``"val"`` and
            ``"test"`` both read its test batch.
        data_dir: Where CIFAR/ImageNet live; defaults to ``$VITLAB_DATA_DIR`` or ``./data``.
        **kw: Options of the dataset class (e.g. ``seed`` for digits, ``image_size`` for
            folders, ``num_samples``/``num_classes``/``image_size`` for synthetic).

    Raises:
        ValueError: Unknown name or split. TypeError: an option the dataset doesn't take.
        FileNotFoundError: The data is not where it should be.
    """
    _check_split(split)
    key = str(name).lower()
    if key.startswith("shards:"):
        return _shard_dataset(str(name)[len("shards:"):], split, dict(kw))
    root = Path(data_dir if data_dir is not None else os.environ.get("VITLAB_DATA_DIR", "data"))
    if key == "digits":
        return DigitsDataset(split, **_take(DigitsDataset, kw, key))
    if key in ("cifar10", "cifar100"):
        return CIFARDataset(root, train=split == "train", num_classes=int(key[5:]), **_take(CIFARDataset, kw, key))
    if key == "synthetic":
        defaults = dict(num_samples=512 if split == "train" else 128, num_classes=10, image_size=32)
        return SyntheticDataset(**_take(SyntheticDataset, {**defaults, **kw, "split": split}, key))
    if key == "imagenet":
        return imagenet_folder(root, split, **_take(ImageFolderDataset, kw, key))
    path = Path(name)
    if path.is_dir():
        return _folder_split(path, split, dict(kw))
    if isinstance(name, os.PathLike) or os.sep in str(name) or path.exists():
        raise FileNotFoundError(f"dataset folder not found: {path}")
    raise ValueError(f"unknown dataset {str(name)!r}; choose one of {', '.join(DATASET_NAMES)}, a path to an image folder or shards:PATH")
