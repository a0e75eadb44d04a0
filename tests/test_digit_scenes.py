"""Digit scenes: determinism, split disjointness by pixel identity, tight boxes, masks, overlap bound."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F


from vitlab.datasets.digit_scenes import DigitScenes  # noqa: E402
from vitlab.datasets.digits import DigitsDataset, _load_digits  # noqa: E402
from vitlab.tasks.detection import box_iou  # noqa: E402


def _equal(a, b):
    return all(torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k] for k in a)


def test_deterministic_per_seed_and_order_free():
    pytest.importorskip("sklearn")
    a = DigitScenes("train", 6, clutter=3, seed=7)
    b = DigitScenes("train", 6, clutter=3, seed=7)
    later_first = [b[i] for i in reversed(range(6))][::-1]
    assert all(_equal(a[i], later_first[i]) for i in range(6))
    c = DigitScenes("train", 6, clutter=3, seed=8)
    assert not all(torch.equal(a[i]["image"], c[i]["image"]) for i in range(6))


def _rendered_ink_crops(size):
    """Every one of the 1,797 digits rendered at ``size`` (bilinear, ink >= 0.1, 8-bit), cropped to its ink."""
    images, _ = _load_digits()
    x = F.interpolate(torch.from_numpy(images), size=(size, size), mode="bilinear", align_corners=False)[:, 0]
    x = torch.where(x < 0.1, torch.zeros_like(x), x)
    x = torch.round(x.clamp(0, 1) * 255).to(torch.uint8).numpy()
    crops = {}
    for i, g in enumerate(x):
        rows, cols = np.flatnonzero(g.any(1)), np.flatnonzero(g.any(0))
        crops.setdefault(g[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1].tobytes(), []).append(i)
    return crops


@pytest.mark.parametrize("split", ["test", "val"])
def test_scenes_hold_only_their_split_digits_by_pixel_identity(split):
    pytest.importorskip("sklearn")
    scenes = DigitScenes(split, 12, max_digits=3, digit_size=(12, 16), max_overlap=0.0, seed=3)
    _, labels = _load_digits()
    pool = set(DigitsDataset(split).indices.tolist())  # the classification split, same seed
    crops = {s: _rendered_ink_crops(s) for s in range(12, 17)}
    seen = 0
    for sample in scenes:
        img = torch.round(sample["image"][0] * 255).to(torch.uint8).numpy()
        for box, label in zip(sample["boxes"].int().tolist(), sample["labels"].tolist()):
            x0, y0, x1, y1 = box
            key = img[y0:y1, x0:x1].tobytes()
            matches = [i for s in crops for i in crops[s].get(key, [])]
            assert matches, "a digit in the scene is not any rendered scikit-learn digit"
            assert set(matches) <= pool, f"{split} scene holds digits from outside the {split} split"
            assert {int(labels[i]) for i in matches} == {label}
            seen += 1
    assert seen >= 20


def test_boxes_tightly_enclose_the_ink():
    pytest.importorskip("sklearn")
    scenes = DigitScenes("train", 20, max_digits=4, max_overlap=0.0, clutter=0, seed=1)
    for sample in scenes:
        ink = sample["image"][0] > 0
        covered = torch.zeros_like(ink)
        for x0, y0, x1, y1 in sample["boxes"].int().tolist():
            region = ink[y0:y1, x0:x1]
            # ink on every edge of the box: nothing to trim
            assert region[0].any() and region[-1].any() and region[:, 0].any() and region[:, -1].any()
            covered[y0:y1, x0:x1] = True
        assert not (ink & ~covered).any(), "ink outside every box"


def test_masks_agree_with_boxes_labels_and_image():
    pytest.importorskip("sklearn")
    scenes = DigitScenes("val", 20, max_digits=5, max_overlap=0.4, clutter=4, seed=2)
    for sample in scenes:
        masks, sem, img = sample["instance_masks"], sample["semantic_mask"], sample["image"][0]
        labels = sample["labels"]
        assert masks.shape == (len(labels), *img.shape) and masks.dtype == torch.bool
        assert torch.equal(masks.any(0), sem > 0)
        assert not (masks.any(0) & (img == 0)).any()
        for m, (x0, y0, x1, y1) in zip(masks, sample["boxes"].int().tolist()):
            ys, xs = torch.nonzero(m, as_tuple=True)
            assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (x0, y0, x1, y1)
        # semantic class = 1 + the label of a digit covering the pixel; exactly that where one covers
        allowed = torch.zeros(11, *img.shape, dtype=torch.bool)
        for m, lab in zip(masks, labels.tolist()):
            allowed[lab + 1] |= m
        pix = sem > 0
        assert allowed.gather(0, sem[None])[0][pix].all()
        single = masks.sum(0) == 1
        only = (masks.int() * (labels[:, None, None] + 1)).sum(0)
        assert torch.equal(sem[single], only[single])
        assert 1 <= len(labels) <= 5 and int(sem.max()) <= 10


def test_overlap_bound_holds_and_is_reached():
    pytest.importorskip("sklearn")
    for bound in (0.0, 0.2):
        scenes = DigitScenes("train", 40, min_digits=3, max_digits=6, digit_size=(16, 28), max_overlap=bound, seed=4)
        worst, any_overlap = 0.0, False
        for sample in scenes:
            iou, _ = box_iou(sample["boxes"], sample["boxes"])
            iou.fill_diagonal_(0)
            worst = max(worst, float(iou.max()))
            any_overlap |= bool((iou > 0).any())
        assert worst <= bound + 1e-6
        if bound > 0:
            assert any_overlap and worst > bound / 2  # the bound is exercised, not vacuous


def test_split_of_train_scenes_is_the_classification_train_split():
    pytest.importorskip("sklearn")
    scenes = DigitScenes("train", 30, seed=5)
    used = torch.cat([s["digit_indices"] for s in scenes]).tolist()
    assert set(used) <= set(DigitsDataset("train").indices.tolist())
    assert set(scenes.pool.tolist()) == set(DigitsDataset("train").indices.tolist())


def test_bad_arguments_give_one_clear_error():
    pytest.importorskip("sklearn")
    with pytest.raises(ValueError, match="unknown digit scenes split 'dev'"):
        DigitScenes("dev")
    with pytest.raises(ValueError, match="digit_size"):
        DigitScenes("train", digit_size=(12, 80), canvas_size=64)
    with pytest.raises(ValueError, match="max_overlap"):
        DigitScenes("train", max_overlap=1.5)
