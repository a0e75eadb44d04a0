"""CIFAR-10/100 from the standard python-pickle batches, read with a restricted unpickler.

The batches at https://www.cs.toronto.edu/~kriz/cifar.html are pickles. A pickle can call any
importable function while it loads, so a tampered file could run code. :class:`SafeUnpickler`
resolves only the few globals these files need (numpy array reconstruction and a handful of
harmless builtins) and refuses every other one with ``pickle.UnpicklingError``.
"""

from __future__ import annotations

import builtins
import codecs
import io
import pickle
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

CIFAR10_MEAN: tuple[float, float, float] = (0.4914, 0.4822, 0.4465)
CIFAR10_STD: tuple[float, float, float] = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN: tuple[float, float, float] = (0.5071, 0.4865, 0.4409)
CIFAR100_STD: tuple[float, float, float] = (0.2673, 0.2564, 0.2762)

_LAYOUT = {
    10: dict(folder="cifar-10-batches-py", archive="cifar-10-python.tar.gz",
             train=[f"data_batch_{i}" for i in range(1, 6)], test=["test_batch"], meta="batches.meta",
             labels=b"labels", names=b"label_names", mean=CIFAR10_MEAN, std=CIFAR10_STD),
    100: dict(folder="cifar-100-python", archive="cifar-100-python.tar.gz",
              train=["train"], test=["test"], meta="meta",
              labels=b"fine_labels", names=b"fine_label_names", mean=CIFAR100_MEAN, std=CIFAR100_STD),
}


def _numpy_global(module: str, name: str) -> Any:
    """``numpy.core.X.name`` or ``numpy._core.X.name``, whichever this numpy has."""
    import importlib

    sub = module.split(".", 2)[2]
    for base in ("numpy._core", "numpy.core"):
        try:
            return getattr(importlib.import_module(f"{base}.{sub}"), name)
        except (ImportError, AttributeError):
            continue
    raise pickle.UnpicklingError(f"numpy has no {module}.{name}")


_ALLOWED: dict[tuple[str, str], Callable[[], Any]] = {
    # numpy arrays (protocol <= 4: _reconstruct + ndarray + dtype; protocol 5: _frombuffer)
    **{(m, "_reconstruct"): (lambda m=m: _numpy_global(m, "_reconstruct"))
       for m in ("numpy.core.multiarray", "numpy._core.multiarray")},
    **{(m, "scalar"): (lambda m=m: _numpy_global(m, "scalar"))
       for m in ("numpy.core.multiarray", "numpy._core.multiarray")},
    **{(m, "_frombuffer"): (lambda m=m: _numpy_global(m, "_frombuffer"))
       for m in ("numpy.core.numeric", "numpy._core.numeric")},
    ("numpy", "ndarray"): lambda: np.ndarray,
    ("numpy", "dtype"): lambda: np.dtype,
    # Python 3 bytes written with protocol < 3
    ("_codecs", "encode"): lambda: codecs.encode,
    # plain containers and numbers
    **{("builtins", n): (lambda n=n: getattr(builtins, n))
       for n in ("bytearray", "bytes", "complex", "frozenset", "set", "slice", "range")},
}


class SafeUnpickler(pickle.Unpickler):
    """An unpickler that resolves only numpy array reconstruction and a few safe builtins.

    Anything else (``os.system``, ``subprocess.Popen``, ``builtins.eval``, ...) raises
    ``pickle.UnpicklingError`` before it is imported, so nothing in the file runs.
    """

    def find_class(self, module: str, name: str) -> Any:
        module = {"__builtin__": "builtins", "copy_reg": "copyreg"}.get(module, module)  # Python 2 names
        factory = _ALLOWED.get((module, name))
        if factory is None:
            raise pickle.UnpicklingError(
                f"refusing to load global {module}.{name}: only numpy arrays and plain Python values are allowed"
            )
        return factory()


def safe_pickle_load(path: str | Path) -> Any:
    """Load a pickle file with :class:`SafeUnpickler` (``encoding="bytes"``, as the CIFAR files need).

    Raises:
        pickle.UnpicklingError: The file refers to a global outside the allow-list or is not a
            valid pickle; the message names the file.
    """
    path = Path(path)
    data = path.read_bytes()
    try:
        return SafeUnpickler(io.BytesIO(data), encoding="bytes").load()
    except pickle.UnpicklingError as e:
        raise pickle.UnpicklingError(f"{path}: {e}") from None
    except (EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError, ImportError) as e:
        raise pickle.UnpicklingError(f"{path}: not a valid CIFAR pickle ({type(e).__name__}: {e})") from None


def _get(d: Any, key: bytes, path: Path) -> Any:
    if not isinstance(d, dict):
        raise ValueError(f"{path}: expected a pickled dict, got {type(d).__name__}")
    if key in d:
        return d[key]
    skey = key.decode()
    if skey in d:
        return d[skey]
    raise ValueError(f"{path}: missing key {key!r} (found {sorted(map(str, d))})")


class CIFARDataset(Dataset):
    """CIFAR-10 or CIFAR-100 as (3, 32, 32) float tensors in [0, 1] and int labels.

    Args:
        root: The folder that holds ``cifar-10-batches-py/`` (or ``cifar-100-python/``), or that
            folder itself.
        train: The 50,000 training images (True) or the 10,000 test images (False).
        num_classes: 10 or 100 (CIFAR-100's fine labels).
        transform: Optional callable applied to each (3, 32, 32) tensor.

    Attributes:
        classes, num_classes, mean, std: Class names from the meta file, their count and the
            usual per-channel statistics of the training set.
        data: uint8 tensor (N, 3, 32, 32); targets: list of labels.
    """

    def __init__(
        self,
        root: str | Path,
        train: bool = True,
        num_classes: int = 10,
        transform: Callable[[Tensor], Tensor] | None = None,
    ) -> None:
        if num_classes not in _LAYOUT:
            raise ValueError(f"num_classes must be 10 (CIFAR-10) or 100 (CIFAR-100), got {num_classes}")
        spec = _LAYOUT[num_classes]
        root = Path(root)
        folder = root if root.name == spec["folder"] else root / spec["folder"]
        names = spec["train"] if train else spec["test"]
        expected = [folder / n for n in [*names, spec["meta"]]]
        missing = [p for p in expected if not p.is_file()]
        if missing:
            hint = (f"; extract {root / spec['archive']} there" if (root / spec["archive"]).is_file()
                    else "; download the python version from https://www.cs.toronto.edu/~kriz/cifar.html")
            raise FileNotFoundError(
                f"CIFAR-{num_classes} files not found: missing {', '.join(str(p) for p in missing)} "
                f"(expected {', '.join(p.name for p in expected)} in {folder}{hint})"
            )
        datas, labels = [], []
        for p in expected[:-1]:
            batch = safe_pickle_load(p)
            data = np.asarray(_get(batch, b"data", p))
            lab = list(_get(batch, spec["labels"], p))
            if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(lab) != len(data):
                raise ValueError(
                    f"{p}: expected uint8 data of shape (N, 3072) and N labels, got {data.dtype} {data.shape} "
                    f"and {len(lab)} labels"
                )
            datas.append(data)
            labels.extend(int(v) for v in lab)
        meta = safe_pickle_load(expected[-1])
        classes = [n.decode() if isinstance(n, bytes) else str(n) for n in _get(meta, spec["names"], expected[-1])]
        if len(classes) != num_classes:
            raise ValueError(f"{expected[-1]}: expected {num_classes} class names, got {len(classes)}")
        bad = [v for v in labels if not 0 <= v < num_classes]
        if bad:
            raise ValueError(f"labels outside 0..{num_classes - 1} in {folder}: e.g. {bad[0]}")
        self.root = folder
        self.train = train
        self.data = torch.from_numpy(np.concatenate(datas).reshape(-1, 3, 32, 32))  # (N, 3072) -> (N, 3, 32, 32)
        self.targets: list[int] = labels
        self.classes = classes
        self.num_classes = num_classes
        self.mean: tuple[float, ...] = spec["mean"]
        self.std: tuple[float, ...] = spec["std"]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        x = self.data[index].float().div_(255.0)
        if self.transform is not None:
            x = self.transform(x)
        return x, self.targets[index]

    def __repr__(self) -> str:
        return f"CIFARDataset(num_classes={self.num_classes}, train={self.train}, n={len(self)})"
