"""DenseAugment: kornia geometric augmentation carrying boxes and masks, seeded from a generator."""

import pytest
import torch

from vitlab.datasets.augment.dense import DenseAugment  # noqa: E402


def scene(h: int = 48, w: int = 48):
    """Two rectangles: class 3 and class 7, with their boxes (xyxy, pixels) and a semantic mask."""
    img = torch.zeros(2, 3, h, w)
    masks = torch.zeros(2, h, w, dtype=torch.long)
    rects = [(5, 10, 30, 20, 3), (30, 30, 40, 40, 7)]
    for x0, y0, x1, y1, c in rects:
        img[0, :, y0:y1, x0:x1] = c / 10
        masks[0, y0:y1, x0:x1] = c
    boxes = [torch.tensor([[float(x0), y0, x1, y1] for x0, y0, x1, y1, _ in rects]), torch.zeros(0, 4)]
    return img, boxes, masks


def mask_box(m: torch.Tensor, c: int) -> torch.Tensor:
    ys, xs = torch.nonzero(m == c, as_tuple=True)
    return torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float)


def test_flip_moves_boxes_and_masks_exactly():
    img, boxes, masks = scene()
    aug = DenseAugment(48, scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=1.0)
    out = aug(img, boxes, masks, generator=torch.Generator().manual_seed(0))
    expected = boxes[0].clone()
    expected[:, [0, 2]] = 48 - boxes[0][:, [2, 0]]
    torch.testing.assert_close(out.boxes[0], expected, atol=1e-3, rtol=0)
    assert torch.equal(out.masks, masks.flip(-1))
    torch.testing.assert_close(out.images, img.flip(-1), atol=1e-5, rtol=0)


def test_boxes_follow_the_mask_under_crop_and_affine():
    img, boxes, masks = scene()
    aug = DenseAugment(32, scale=(0.6, 1.0), degrees=0.0, translate=(0.1, 0.1), affine_p=1.0, min_box_area=1.0)
    for seed in range(5):
        out = aug(img, boxes, masks, generator=torch.Generator().manual_seed(seed))
        kept_classes = torch.tensor([3, 7])[out.keep[0]]
        for c, box in zip(kept_classes.tolist(), out.boxes[0]):
            torch.testing.assert_close(box, mask_box(out.masks[0], c), atol=1.5, rtol=0)
        assert out.boxes[1].shape == (0, 4)


def test_mask_labels_stay_labels_and_outside_pixels_are_ignored():
    img, boxes, masks = scene()
    aug = DenseAugment(40, scale=(0.5, 1.0), degrees=30.0, translate=(0.2, 0.2), affine_p=1.0, fill_label=255)
    out = aug(img, boxes, masks, generator=torch.Generator().manual_seed(3))
    assert set(out.masks.unique().tolist()) <= {0, 3, 7, 255}
    assert (out.masks == 255).any()  # a 30-degree rotation brings in pixels from outside
    # those pixels are exactly where the image is black padding in every channel of image 1 (all zeros anyway)
    assert out.masks.dtype == torch.long and out.masks.shape == (2, 40, 40)


def test_a_box_cropped_away_is_dropped_with_its_label():
    img, boxes, masks = scene()
    # crop a small area: over 20 seeds some crops must miss the small class-7 box
    aug = DenseAugment(24, scale=(0.1, 0.1), ratio=(1.0, 1.0), hflip=0.0)
    dropped = 0
    for seed in range(20):
        out = aug(img, boxes, masks, generator=torch.Generator().manual_seed(seed))
        assert len(out.boxes[0]) == int(out.keep[0].sum())
        for c, k in zip((3, 7), out.keep[0].tolist()):
            if not k:
                dropped += 1
                assert (out.masks[0] == c).sum() < 0.3 * (masks[0] == c).sum() * (24 / 15) ** 2 + 4
    assert dropped > 0


def test_same_generator_state_same_augmentation_and_global_rng_untouched():
    img, boxes, masks = scene()
    aug = DenseAugment(32, degrees=15.0, affine_p=1.0)
    state = torch.random.get_rng_state()
    a = aug(img, boxes, masks, generator=torch.Generator().manual_seed(11))
    assert torch.equal(torch.random.get_rng_state(), state)
    b = aug(img, boxes, masks, generator=torch.Generator().manual_seed(11))
    c = aug(img, boxes, masks, generator=torch.Generator().manual_seed(12))
    assert torch.equal(a.images, b.images) and torch.equal(a.masks, b.masks)
    assert all(torch.equal(x, y) for x, y in zip(a.boxes, b.boxes))
    assert not torch.equal(a.images, c.images)


def test_bad_inputs_get_one_clear_message():
    img, boxes, masks = scene()
    aug = DenseAugment(32)
    with pytest.raises(ValueError, match="one box tensor per image"):
        aug(img, boxes[:1])
    with pytest.raises(ValueError, match=r"masks must be \(B, H, W\)"):
        aug(img, masks=masks[:, :10])
    with pytest.raises(ValueError, match=r"\(n, 4\) xyxy"):
        aug(img, [torch.zeros(3), torch.zeros(0, 4)])
    with pytest.raises(ValueError, match="scale must be a range"):
        DenseAugment(32, scale=(0.0, 1.0))
