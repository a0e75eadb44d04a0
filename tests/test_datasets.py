"""Datasets: digits split, image folders with corrupt files, CIFAR with a restricted unpickler, factory."""

import os
import pickle
import warnings
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from vitlab.datasets import (
    CIFARDataset, DigitsDataset, ImageFolderDataset, SyntheticDataset, build_dataset, image_folder_splits,
    imagenet_folder,
)
from vitlab.datasets.cifar import SafeUnpickler, safe_pickle_load
from vitlab.datasets.digits import stratified_split


# --------------------------------------------------------------------------- digits
def test_digits_split_sizes_disjoint_and_stratified():
    splits = {s: DigitsDataset(s) for s in ("train", "val", "test")}
    idx = {s: set(d.indices.tolist()) for s, d in splits.items()}
    assert sum(len(d) for d in splits.values()) == 1797
    assert idx["train"] | idx["val"] | idx["test"] == set(range(1797))
    assert not (idx["train"] & idx["val"]) and not (idx["train"] & idx["test"]) and not (idx["val"] & idx["test"])
    total = Counter(splits["train"].targets) + Counter(splits["val"].targets) + Counter(splits["test"].targets)
    for c, n in total.items():
        assert Counter(splits["test"].targets)[c] == round(n * 0.2)
        assert Counter(splits["val"].targets)[c] == round(n * 0.1)
    x, y = splits["train"][0]
    assert x.shape == (1, 8, 8) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    assert isinstance(y, int) and splits["train"].num_classes == 10 and splits["train"].classes[3] == "3"
    # mean/std: the train split's pixel statistics, shared by every split
    assert splits["train"].mean[0] == pytest.approx(float(splits["train"].images.mean()), rel=1e-5)
    assert splits["train"].std[0] == pytest.approx(float(splits["train"].images.std(unbiased=False)), rel=1e-4)
    assert splits["val"].mean == splits["train"].mean and splits["test"].std == splits["train"].std


def test_digits_split_is_deterministic():
    a, b, c = DigitsDataset("val", seed=0), DigitsDataset("val", seed=0), DigitsDataset("val", seed=1)
    assert np.array_equal(a.indices, b.indices) and torch.equal(a.images, b.images)
    assert not np.array_equal(a.indices, c.indices)
    with pytest.raises(ValueError, match="split"):
        DigitsDataset("holdout")


def test_stratified_split_validates_fractions():
    with pytest.raises(ValueError, match="fractions"):
        stratified_split([0, 1, 0, 1], (0.0, 0.6, 0.5))


# --------------------------------------------------------------------------- image folders
def _png(path, size=(10, 12), color=(255, 0, 0)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "imgs"
    for i in range(3):
        _png(root / "cat" / f"{i}.png", (10 + i, 12), (200, 10 * i, 0))
        _png(root / "dog" / f"{i}.PNG", (12, 10 + i), (0, 10 * i, 200))
    bad = root / "dog" / "broken.png"
    bad.write_bytes(os.urandom(64))
    (root / "dog" / "notes.txt").write_text("not an image")
    return root, bad


def test_image_folder_skips_corrupt_png_by_path(folder):
    root, bad = folder
    with pytest.warns(UserWarning, match="broken.png"):
        ds = ImageFolderDataset(root, image_size=8)
    assert len(ds) == 6 and ds.skipped == [bad]
    assert ds.classes == ["cat", "dog"] and ds.num_classes == 2 and sorted(Counter(ds.targets).values()) == [3, 3]
    x, y = ds[5]
    assert x.shape == (3, 8, 8) and x.dtype == torch.float32 and y == 1
    assert float(x[2].mean()) == pytest.approx(200 / 255, abs=0.02)  # blue dog
    with pytest.warns(UserWarning, match="broken.png"):
        grey = ImageFolderDataset(root, image_size=(6, 9), channels=1)
    assert grey[0][0].shape == (1, 6, 9) and grey.mean == (0.5,)


def test_image_folder_raise_names_the_path(folder):
    root, bad = folder
    with pytest.raises(ValueError, match="broken.png"):
        ImageFolderDataset(root, on_error="raise")


def test_image_folder_lazy_check(folder):
    root, bad = folder
    lazy = ImageFolderDataset(root, on_error="raise", check="none")
    i = [p for p, _ in lazy.samples].index(bad)
    with pytest.raises(ValueError, match="broken.png"):
        lazy[i]
    skip = ImageFolderDataset(root, check="none")
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        x, y = skip[i]  # falls through to the next good sample
    assert skip.skipped == [bad] and x.ndim == 3


def test_image_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        ImageFolderDataset(tmp_path / "missing")
    (tmp_path / "empty" / "a").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no images"):
        ImageFolderDataset(tmp_path / "empty")
    with pytest.raises(ValueError, match="on_error"):
        ImageFolderDataset(tmp_path / "empty", on_error="ignore")


def test_image_folder_splits(tmp_path):
    for split in ("train", "val"):
        _png(tmp_path / "data" / split / "a" / "0.png")
        _png(tmp_path / "data" / split / "b" / "0.png")
    _png(tmp_path / "data" / "train" / "c" / "0.png")  # a class missing from val keeps its index
    train, val = image_folder_splits(tmp_path / "data", image_size=8)
    assert train.classes == val.classes == ["a", "b", "c"] and len(val) == 2
    _png(tmp_path / "only_train" / "train" / "a" / "0.png")
    with pytest.raises(FileNotFoundError, match="val/"):
        image_folder_splits(tmp_path / "only_train")
    with pytest.raises(FileNotFoundError):
        image_folder_splits(tmp_path / "nowhere")
    net = imagenet_folder(tmp_path / "data", "val")
    assert net.mean == (0.485, 0.456, 0.406) and net.classes == ["a", "b", "c"]


# --------------------------------------------------------------------------- CIFAR
def _fake_cifar10(root, n=2, protocol=2):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        batch = {b"batch_label": name.encode(), b"labels": [int(v) for v in rng.integers(0, 10, n)],
                 b"data": data, b"filenames": [f"{name}_{i}.png".encode() for i in range(n)]}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=protocol))
        batches[name] = batch
    meta = {b"label_names": [c.encode() for c in ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog",
                                                    "horse", "ship", "truck"]], b"num_vis": 3072}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=protocol))
    return folder, batches


@pytest.mark.parametrize("protocol", [2, 5])
def test_cifar10_reads_the_standard_format(tmp_path, protocol):
    folder, batches = _fake_cifar10(tmp_path, protocol=protocol)
    train = CIFARDataset(tmp_path, train=True)
    assert len(train) == 10 and train.classes[9] == "truck" and train.num_classes == 10
    x, y = train[2]  # first image of data_batch_2
    first = batches["data_batch_2"]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    assert torch.equal(x, torch.from_numpy(first[b"data"][0].reshape(3, 32, 32)).float() / 255)
    assert y == first[b"labels"][0]
    test = CIFARDataset(folder, train=False)  # the batches folder itself also works
    assert len(test) == 2 and test.targets == batches["test_batch"][b"labels"]
    assert build_dataset("cifar10", "val", data_dir=tmp_path).targets == test.targets


def test_cifar100(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    data = np.arange(2 * 3072, dtype=np.int64).astype(np.uint8).reshape(2, 3072)
    for name in ("train", "test"):
        (folder / name).write_bytes(pickle.dumps({b"data": data, b"fine_labels": [5, 99], b"coarse_labels": [1, 2]}))
    (folder / "meta").write_bytes(pickle.dumps({b"fine_label_names": [f"c{i}".encode() for i in range(100)]}))
    ds = CIFARDataset(tmp_path, train=False, num_classes=100)
    assert ds.targets == [5, 99] and ds.classes[99] == "c99" and ds.num_classes == 100


def test_cifar_missing_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="data_batch_1"):
        CIFARDataset(tmp_path, train=True)
    with pytest.raises(FileNotFoundError, match="cifar-100-python"):
        CIFARDataset(tmp_path, train=False, num_classes=100)


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"echo pwned > {self.marker}",))


def test_cifar_rejects_malicious_pickle(tmp_path):
    folder, _ = _fake_cifar10(tmp_path)
    marker = tmp_path / "pwned"
    (folder / "data_batch_3").write_bytes(pickle.dumps({b"data": _Evil(marker), b"labels": [0]}))
    with pytest.raises(pickle.UnpicklingError, match="system"):
        CIFARDataset(tmp_path, train=True)
    assert not marker.exists(), "the payload must not run"
    evil = tmp_path / "eval.pkl"
    evil.write_bytes(b"cbuiltins\neval\n(V__import__('os').getcwd()\ntR.")
    with pytest.raises(pickle.UnpicklingError, match="builtins.eval"):
        safe_pickle_load(evil)
    assert issubclass(SafeUnpickler, pickle.Unpickler)


def test_cifar_rejects_wrong_shapes(tmp_path):
    folder, _ = _fake_cifar10(tmp_path)
    (folder / "test_batch").write_bytes(pickle.dumps({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}))
    with pytest.raises(ValueError, match="3072"):
        CIFARDataset(tmp_path, train=False)


# --------------------------------------------------------------------------- synthetic and factory
def test_synthetic_is_deterministic_and_learnable():
    a = SyntheticDataset(40, 4, 8, channels=3, seed=0)
    b = SyntheticDataset(40, 4, 8, channels=3, seed=0)
    assert torch.equal(a[7][0], b[7][0]) and a[7][1] == 3 and a[7][0].shape == (3, 8, 8)
    assert not torch.equal(a[7][0], SyntheticDataset(40, 4, 8, seed=1)[7][0])
    val = SyntheticDataset(20, 4, 8, seed=0, split="val")
    assert not torch.equal(val[0][0], a[0][0])
    # nearest class mean of the train samples classifies the val samples
    xs = torch.stack([a[i][0] for i in range(40)])
    centroids = torch.stack([xs[i::4].mean(0) for i in range(4)]).flatten(1)
    correct = sum(int(torch.cdist(val[i][0].flatten()[None], centroids).argmin()) == val[i][1] for i in range(20))
    assert correct == 20


def test_build_dataset(tmp_path):
    assert isinstance(build_dataset("digits", "test"), DigitsDataset)
    syn = build_dataset("synthetic", "val", num_samples=8, image_size=16, num_classes=3)
    assert len(syn) == 8 and syn[0][0].shape == (3, 16, 16) and syn.num_classes == 3
    with pytest.raises(ValueError, match="digits, cifar10, cifar100, synthetic, imagenet"):
        build_dataset("mnist")
    with pytest.raises(ValueError, match="split"):
        build_dataset("digits", "dev")
    with pytest.raises(TypeError, match="unknown option"):
        build_dataset("digits", "train", sede=1)
    with pytest.raises(FileNotFoundError):
        build_dataset(str(tmp_path / "no" / "such"), "train")
    with pytest.raises(FileNotFoundError, match="cifar"):
        build_dataset("cifar100", "train", data_dir=tmp_path)


def test_build_dataset_from_folder(tmp_path):
    root = tmp_path / "flat"
    for c in ("a", "b"):
        for i in range(10):
            _png(root / c / f"{i}.png", (8, 8), (25 * i, 0, 0))
    train = build_dataset(str(root), "train", image_size=8, val_fraction=0.2)
    val = build_dataset(str(root), "val", image_size=8, val_fraction=0.2)
    assert len(train) == 16 and len(val) == 4 and sorted(Counter(val.targets).values()) == [2, 2]
    assert not set(train.indices) & set(val.indices)
    assert val.classes == ["a", "b"] and val[0][0].shape == (3, 8, 8)
    with pytest.raises(ValueError, match="empty"):
        build_dataset(str(root), "test")
    split = tmp_path / "split"
    for s in ("train", "val"):
        _png(split / s / "x" / "0.png")
    assert len(build_dataset(split, "val", image_size=4)) == 1


def test_cifar_trains_at_its_own_size_and_crops_like_folders(tmp_path):
    """`--dataset cifar10` brings 32x32 and CIFAR's augmentation (not the digits recipe's), and a
    different training size / crop is applied per sample exactly as for image folders."""
    import json

    from vitlab.cli import main as cli
    from vitlab.datasets.pipeline import ResizeCenterCropSample
    from vitlab.training import load_config
    from vitlab.tasks.image_classification import build_datasets

    _fake_cifar10(tmp_path / "data")
    out = tmp_path / "run"
    assert cli(["train", "model.overrides={patch_size: 8, dim: 32, depth: 1, heads: 2, mlp_dim: 64}",
                "--dataset", "cifar10", "--data-dir", str(tmp_path / "data"), "--epochs", "1", "--batch-size", "5",
                "--output-dir", str(out), "--no-progress"]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["data"]["image_size"] == 32 and cfg["augment"]["affine_p"] == 0.0
    assert cfg["augment"]["random_resized_crop"] and cfg["augment"]["hflip"] == 0.5
    cfg = load_config(None, ["data.dataset=cifar10", f"data.data_dir={tmp_path / 'data'}",
                             "data.crop_pct=0.5", "data.interpolation=bicubic"])  # native 32x32, but a 0.5 crop
    train, val, test = build_datasets(cfg)
    raw = CIFARDataset(tmp_path / "data", train=False)[1][0]
    assert torch.equal(val[1][0], ResizeCenterCropSample(32, 0.5, "bicubic")(raw))
    assert not torch.equal(val[1][0], raw) and torch.equal(train[0][0], CIFARDataset(tmp_path / "data")[0][0])
