"""SegmentationFolder: images + single-channel or palette PNG masks, with clear errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vitlab.datasets.digit_scenes import DigitScenes
from vitlab.datasets.seg_folder import SegmentationFolder
from vitlab.errors import InputError

CLASSES = ["background"] + [f"digit_{d}" for d in range(10)]


def _write_scenes(root: Path, n: int = 3, palette: bool = False) -> list[dict]:
    """Digit scenes written as RGB JPEG/PNG images and L or P masks; returns the source items."""
    scenes = DigitScenes("train", num_scenes=n, canvas_size=(40, 56), seed=3)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    (root / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    items = []
    for i in range(n):
        item = scenes[i]
        img = (item["image"][0].numpy() * 255).round().astype(np.uint8)
        Image.fromarray(np.stack([img] * 3, -1)).save(root / "images" / f"scene_{i}.png")
        mask = item["semantic_mask"].numpy().astype(np.uint8)
        if palette:
            m = Image.fromarray(mask, mode="P")
            m.putpalette([(37 * k) % 256 for k in range(256 * 3)])
        else:
            m = Image.fromarray(mask, mode="L")
        m.save(root / "masks" / f"scene_{i}.png")
        items.append(item)
    return items


@pytest.mark.parametrize("palette", [False, True])
def test_reads_pairs_with_exact_labels(tmp_path: Path, palette: bool) -> None:
    items = _write_scenes(tmp_path, palette=palette)
    ds = SegmentationFolder(tmp_path)
    assert len(ds) == 3 and ds.num_classes == 11 and ds.classes == CLASSES
    for i, item in enumerate(items):
        got = ds[i]
        assert got["semantic_mask"].dtype == torch.int64
        assert torch.equal(got["semantic_mask"], item["semantic_mask"])
        assert got["semantic_mask"].max() > 0  # some digit present
        torch.testing.assert_close(got["image"], item["image"].expand(3, -1, -1))
    if palette:
        with Image.open(tmp_path / "masks" / "scene_0.png") as im:
            assert im.mode == "P"  # RGB colours differ from the labels; indices are read
    ds.verify()


def test_ignore_index_and_reduce_zero_label(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    Image.new("RGB", (3, 2)).save(tmp_path / "images" / "a.jpg")
    Image.fromarray(np.array([[0, 1, 2], [3, 255, 1]], dtype=np.uint8), mode="L").save(tmp_path / "masks" / "a.png")
    ds = SegmentationFolder(tmp_path, classes=["x", "y", "z", "w"])
    assert ds[0]["semantic_mask"].tolist() == [[0, 1, 2], [3, 255, 1]]
    ade = SegmentationFolder(tmp_path, classes=["x", "y", "z"], reduce_zero_label=True)
    assert ade[0]["semantic_mask"].tolist() == [[255, 0, 1], [2, 255, 0]]


def test_missing_pair_is_named(tmp_path: Path) -> None:
    _write_scenes(tmp_path, n=2)
    (tmp_path / "masks" / "scene_1.png").unlink()
    with pytest.raises(InputError, match=r"1 image\(s\) without a mask .*scene_1.png needs scene_1.png"):
        SegmentationFolder(tmp_path)
    Image.new("L", (56, 40)).save(tmp_path / "masks" / "scene_1.png")
    Image.new("L", (56, 40)).save(tmp_path / "masks" / "orphan.png")
    with pytest.raises(InputError, match=r"1 mask\(s\) without an image .*orphan.png"):
        SegmentationFolder(tmp_path)


def test_mask_of_another_size(tmp_path: Path) -> None:
    _write_scenes(tmp_path, n=2)
    Image.new("L", (28, 20)).save(tmp_path / "masks" / "scene_1.png")
    ds = SegmentationFolder(tmp_path)
    with pytest.raises(InputError, match=r"scene_1.png is 28x20 but its image is 56x40"):
        ds[1]
    with pytest.raises(InputError, match="28x20"):
        ds.verify()


def test_unknown_label_value(tmp_path: Path) -> None:
    _write_scenes(tmp_path, n=1)
    mask = np.zeros((40, 56), dtype=np.uint8)
    mask[3, 4] = 11  # 11 classes: 0..10
    mask[5, 5] = 255  # ignore: fine
    Image.fromarray(mask, mode="L").save(tmp_path / "masks" / "scene_0.png")
    with pytest.raises(InputError, match=r"label value\(s\) \[11\] outside the 11 classes \(0..10\)"):
        SegmentationFolder(tmp_path)[0]


def test_rgb_mask_and_missing_class_list(tmp_path: Path) -> None:
    _write_scenes(tmp_path, n=1)
    Image.new("RGB", (56, 40)).save(tmp_path / "masks" / "scene_0.png")
    with pytest.raises(InputError, match="is a RGB image; masks must be single-channel"):
        SegmentationFolder(tmp_path)[0]
    (tmp_path / "classes.txt").unlink()
    with pytest.raises(InputError, match="class list not found"):
        SegmentationFolder(tmp_path)
