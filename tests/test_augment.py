"""Batched augmentation (vitlab.datasets.augment) and Mixup/CutMix (vitlab.tasks.mixup)."""

import math

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from vitlab.datasets.augment import (
    RAND_AUGMENT_OPS, CenterCrop, ColorJitter, Compose, Normalize, RandAugment, RandomAffine, RandomErasing,
    RandomHorizontalFlip, RandomResizedCrop, RandomVerticalFlip, Resize, build_eval_transform, build_train_augment,
    equalize, parse_rand_augment,
)
from vitlab.tasks.mixup import Mixup, one_hot_smooth


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture
def batch() -> torch.Tensor:
    return torch.rand(6, 3, 16, 16, generator=gen(123))


# (factory, output H, W or None = same, keeps [0, 1])
RANDOM_OPS = {
    "rrc": (lambda: RandomResizedCrop(12), (12, 12), True),
    "hflip": (lambda: RandomHorizontalFlip(0.5), None, True),
    "vflip": (lambda: RandomVerticalFlip(0.5), None, True),
    "jitter": (lambda: ColorJitter(0.4, 0.4, 0.4, 0.1), None, True),
    "affine": (lambda: RandomAffine(15, 0.1, (0.9, 1.1), 0.1), None, True),
    "randaugment": (lambda: RandAugment(2, 9, op_prob=1.0), None, True),
    "erasing_random": (lambda: RandomErasing(1.0), None, False),
    "erasing_zero": (lambda: RandomErasing(1.0, value=0.0), None, True),
}


@pytest.mark.parametrize("name", list(RANDOM_OPS))
def test_random_op_contract(name, batch):
    factory, size, in_range = RANDOM_OPS[name]
    op = factory()
    out = op(batch, generator=gen(0))
    assert out.dtype == batch.dtype
    assert out.shape == (*batch.shape[:2], *(size or batch.shape[-2:]))
    if in_range:
        assert out.min() >= 0.0 and out.max() <= 1.0
    assert torch.equal(out, op(batch, generator=gen(0))), "same seed must give the same output"
    assert not torch.equal(out, op(batch, generator=gen(1))), "another seed must give another output"
    if size is None:
        assert not torch.equal(out, batch), "the op must change the batch"
    assert torch.equal(batch, torch.rand(6, 3, 16, 16, generator=gen(123))), "the input must not be modified"


@pytest.mark.parametrize("op", [Resize(8), Resize((10, 12)), CenterCrop(8), Normalize((0.5,), (0.25,))])
def test_deterministic_ops(op, batch):
    out = op(batch, generator=gen(0))
    assert out.dtype == batch.dtype
    assert torch.equal(out, op(batch))
    assert out.shape != batch.shape or not torch.equal(out, batch)


def test_resize_and_crop_sizes(batch):
    assert Resize(8)(batch).shape == (6, 3, 8, 8)
    assert Resize(8)(torch.rand(2, 1, 16, 32)).shape == (2, 1, 8, 16)  # shorter side
    assert CenterCrop((4, 6))(batch).shape == (6, 3, 4, 6)
    assert torch.equal(CenterCrop(8)(batch), batch[..., 4:12, 4:12])


def test_single_image_and_double_precision():
    x = torch.rand(3, 10, 10, dtype=torch.float64)
    out = RandAugment(op_prob=1.0)(x, generator=gen(0))
    assert out.shape == x.shape and out.dtype == torch.float64


def test_rejects_integer_images():
    with pytest.raises(ValueError, match="float image batch"):
        RandomHorizontalFlip()(torch.zeros(2, 3, 4, 4, dtype=torch.uint8))


def test_random_resized_crop_full_box_is_identity(batch):
    out = RandomResizedCrop(16, scale=(1.0, 1.0), ratio=(1.0, 1.0))(batch, generator=gen(0))
    torch.testing.assert_close(out, batch, atol=1e-5, rtol=0)


def test_flip_p1_and_p0(batch):
    torch.testing.assert_close(RandomHorizontalFlip(1.0)(batch, generator=gen(0)), batch.flip(-1))
    torch.testing.assert_close(RandomVerticalFlip(1.0)(batch, generator=gen(0)), batch.flip(-2))
    assert torch.equal(RandomHorizontalFlip(0.0)(batch, generator=gen(0)), batch)


def test_color_jitter_grey_images():
    x = torch.rand(4, 1, 8, 8, generator=gen(5))
    out = ColorJitter(0.5, 0.5, 0.5, 0.2)(x, generator=gen(0))
    assert out.shape == x.shape and not torch.equal(out, x)


@pytest.mark.parametrize("name", [o for o in RAND_AUGMENT_OPS if o != "identity"])
def test_each_rand_augment_op_changes_the_image(name, batch):
    op = RandAugment(num_ops=1, magnitude=9, magnitude_std=0.0, op_prob=1.0, ops=[name])
    out = op(batch, generator=gen(0))
    assert out.shape == batch.shape and out.min() >= 0 and out.max() <= 1
    assert not torch.equal(out, batch)


def _pil(x: torch.Tensor) -> Image.Image:
    return Image.fromarray((x.permute(1, 2, 0) * 255).round().byte().numpy())


def test_equalize_matches_pil():
    a = (np.random.default_rng(0).beta(2, 5, (12, 14, 3)) * 255).astype(np.uint8)
    x = torch.from_numpy(a).permute(2, 0, 1)[None].float() / 255
    ours = (equalize(x)[0].permute(1, 2, 0) * 255).round().byte().numpy()
    np.testing.assert_array_equal(ours, np.asarray(ImageOps.equalize(Image.fromarray(a))))


def test_rand_augment_identity_only_is_a_no_op(batch):
    assert torch.equal(RandAugment(ops=["identity"], op_prob=1.0)(batch, generator=gen(0)), batch)


def test_parse_rand_augment():
    ra = parse_rand_augment("rand-m9-mstd0.5-inc1")
    assert (ra.num_ops, ra.magnitude, ra.magnitude_std, ra.op_prob) == (2, 9.0, 0.5, 0.5)
    ra = parse_rand_augment("rand-n3-m7-p1.0")
    assert (ra.num_ops, ra.magnitude, ra.magnitude_std, ra.op_prob) == (3, 7.0, 0.0, 1.0)
    with pytest.raises(ValueError, match="unknown part"):
        parse_rand_augment("rand-m9-zz1")
    with pytest.raises(ValueError, match="unknown RandAugment op"):
        RandAugment(ops=["warp"])


def test_random_erasing_box_and_probability(batch):
    out = RandomErasing(1.0, value=0.0)(batch, generator=gen(0))
    for i in range(batch.shape[0]):
        erased = (out[i] != batch[i]).any(0)
        rows, cols = erased.any(1).nonzero(), erased.any(0).nonzero()
        h, w = int(rows.max() - rows.min() + 1), int(cols.max() - cols.min() + 1)
        assert int(erased.sum()) == h * w, "the erased region is one box"
        assert 0.02 * 256 * 0.5 <= h * w <= 256 / 3 * 1.5
        assert (out[i][:, erased] == 0).all()
    assert torch.equal(RandomErasing(0.0)(batch, generator=gen(0)), batch)


def test_random_erasing_before_normalize_matches_after(batch):
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    after = Compose([Normalize(mean, std), RandomErasing(1.0)])(batch, generator=gen(0))
    before = Compose([RandomErasing(1.0, mean=mean, std=std), Normalize(mean, std)])(batch, generator=gen(0))
    torch.testing.assert_close(before, after, atol=1e-5, rtol=1e-5)


def test_normalize_broadcasts_single_channel_stats(batch):
    torch.testing.assert_close(Normalize((0.5,), (0.25,))(batch), (batch - 0.5) / 0.25)
    with pytest.raises(ValueError, match="channels"):
        Normalize((0.5, 0.5), (0.2, 0.2))(batch)


def test_build_train_augment_pipeline(batch):
    aug = build_train_augment(12, (0.5,) * 3, (0.25,) * 3, auto_augment="rand-m9-mstd0.5-inc1", re_prob=0.25)
    kinds = [type(t).__name__ for t in aug.transforms]
    assert kinds == ["RandomResizedCrop", "RandomHorizontalFlip", "RandAugment", "Normalize", "RandomErasing"]
    out = aug(batch, gen(0))  # positional generator, as the trainer calls it
    assert out.shape == (6, 3, 12, 12)
    assert torch.equal(out, aug(batch, generator=gen(0)))
    digits = build_train_augment(8, (0.3,), (0.4,), random_resized_crop=False, hflip=0, rotate=10, translate=0.1,
                                 color_jitter=0, normalize=False)
    assert [type(t).__name__ for t in digits.transforms] == ["Resize", "RandomAffine"]
    assert digits(torch.rand(4, 1, 8, 8), gen(0)).shape == (4, 1, 8, 8)


def test_build_eval_transform(batch):
    ev = build_eval_transform(8, (0.5,), (0.5,), crop_pct=0.5)
    out = ev(batch)
    assert out.shape == (6, 3, 8, 8)
    torch.testing.assert_close(out, (Resize(16)(batch)[..., 4:12, 4:12] - 0.5) / 0.5)
    assert torch.equal(build_eval_transform(16, (0.0,), (1.0,))(batch), batch)


# --------------------------------------------------------------------------- Mixup / CutMix
def _distinct_batch(b: int = 4, h: int = 8, w: int = 8) -> torch.Tensor:
    """Sample i is constant i + 1, so every pixel of x differs from x.flip(0) (b even)."""
    return (torch.arange(b, dtype=torch.float32) + 1).view(b, 1, 1, 1).expand(b, 3, h, w).contiguous()


def test_mixup_is_the_hand_computed_mixture():
    x, y = torch.rand(4, 3, 8, 8, generator=gen(7)), torch.tensor([0, 1, 2, 3])
    mix = Mixup(mixup_alpha=0.8, cutmix_alpha=0.0, label_smoothing=0.1, num_classes=5)
    out, target = mix(x, y, generator=gen(3))
    # the same draws by hand: a numpy generator seeded from the torch generator, then Beta(0.8, 0.8)
    rng = np.random.default_rng(int(torch.randint(0, 2**62, (1,), generator=gen(3)).item()))
    assert rng.random(1)[0] < 1.0  # the "apply with prob" draw
    lam = float(rng.beta(0.8, 0.8, 1)[0])
    assert mix.last_mode == "mixup" and mix.last_lam == pytest.approx(lam)
    torch.testing.assert_close(out, lam * x + (1 - lam) * x.flip(0))
    off, on = 0.1 / 5, 1 - 0.1 + 0.1 / 5
    expected = torch.full((4, 5), off)
    for i in range(4):
        expected[i, y[i]] += lam * (on - off)
        expected[i, y.flip(0)[i]] += (1 - lam) * (on - off)
    torch.testing.assert_close(target, expected)
    torch.testing.assert_close(target.sum(1), torch.ones(4))


def test_cutmix_lambda_is_one_minus_box_area():
    x, y = _distinct_batch(), torch.tensor([0, 1, 2, 3])
    for seed in range(5):
        mix = Mixup(mixup_alpha=0.0, cutmix_alpha=1.0, label_smoothing=0.0, num_classes=4)
        out, target = mix(x, y, generator=gen(seed))
        assert mix.last_mode == "cutmix"
        box = (out != x).any(1)  # (B, H, W): pasted pixels
        assert torch.equal(box, box[:1].expand_as(box)), "one box for the whole batch"
        area = int(box[0].sum())
        assert mix.last_lam == pytest.approx(1 - area / 64)
        assert torch.equal(out[:, :, box[0]], x.flip(0)[:, :, box[0]])
        lam = mix.last_lam
        torch.testing.assert_close(target, lam * torch.eye(4)[y] + (1 - lam) * torch.eye(4)[y.flip(0)])
        torch.testing.assert_close(target.sum(1), torch.ones(4))


def test_mixup_reproducible_and_switches():
    x, y = torch.rand(4, 3, 8, 8, generator=gen(1)), torch.tensor([0, 1, 2, 3])
    mix = Mixup(num_classes=4)
    a, ta = mix(x, y, generator=gen(0))
    b, tb = mix(x, y, generator=gen(0))
    assert torch.equal(a, b) and torch.equal(ta, tb)
    lams = set()
    for s in range(5):
        mix(x, y, generator=gen(s))
        lams.add(round(mix.last_lam, 6))
    assert len(lams) > 1
    m = Mixup(switch_prob=1.0, num_classes=4)
    m(x, y, generator=gen(0))
    assert m.last_mode == "cutmix"
    m = Mixup(switch_prob=0.0, num_classes=4)
    m(x, y, generator=gen(0))
    assert m.last_mode == "mixup"


def test_mixup_off_gives_smoothed_one_hot():
    x, y = torch.rand(3, 1, 4, 4), torch.tensor([2, 0, 1])
    out, target = Mixup(prob=0.0, label_smoothing=0.3, num_classes=3)(x, y, generator=gen(0))
    assert torch.equal(out, x)
    off, on = 0.1, 1 - 0.3 + 0.1
    torch.testing.assert_close(target, torch.tensor([[off, off, on], [on, off, off], [off, on, off]]))
    torch.testing.assert_close(one_hot_smooth(y, 3, 0.3), target)


def test_mixup_elem_mode_per_sample_lambda():
    x, y = _distinct_batch(6), torch.arange(6)
    mix = Mixup(mixup_alpha=1.0, cutmix_alpha=1.0, mode="elem", label_smoothing=0.0, num_classes=6)
    out, target = mix(x, y, generator=gen(2))
    lam = mix.last_lam
    assert isinstance(lam, torch.Tensor) and lam.shape == (6,)
    torch.testing.assert_close(target.sum(1), torch.ones(6))
    for i in range(6):
        pasted = (out[i] == x.flip(0)[i]).all(0).float().mean()
        mixed = lam[i] * x[i] + (1 - lam[i]) * x.flip(0)[i]
        # each sample is either a lam-mixture or a CutMix with 1 - lam of its pixels pasted
        assert torch.allclose(out[i], mixed) or math.isclose(float(pasted), 1 - float(lam[i]), abs_tol=1e-6)
        assert float(target[i, y[i]]) == pytest.approx(float(lam[i]) + (float(1 - lam[i]) if y.flip(0)[i] == y[i] else 0))


# --------------------------------------------------------------------------- against references (PIL, colorsys)
def _bar(size: int = 33) -> torch.Tensor:
    """A black image with a bright horizontal bar through the centre (1, 1, S, S)."""
    x = torch.zeros(1, 1, size, size)
    c = size // 2
    x[..., c - 1 : c + 2, 4 : size - 4] = 1.0
    return x


def _bar_angle(img: torch.Tensor) -> float:
    """Angle (degrees, counter-clockwise as seen) of the bar: the principal axis of the intensity's second moments."""
    h, w = img.shape[-2:]
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij")
    m = img.double().reshape(h, w)
    total = m.sum()
    cx, cy = (m * xs).sum() / total, (m * ys).sum() / total
    cxx = (m * (xs - cx) ** 2).sum() / total
    cyy = (m * (ys - cy) ** 2).sum() / total
    cxy = (m * (xs - cx) * (ys - cy)).sum() / total
    return -math.degrees(0.5 * math.atan2(2 * cxy, cxx - cyy))  # y points down: negate for counter-clockwise


@pytest.mark.parametrize("magnitude, degrees", [(10, 30.0), (5, 15.0), (2, 6.0)])
def test_rand_augment_rotate_angle_follows_the_magnitude(magnitude, degrees):
    x = _bar().expand(8, 1, -1, -1)
    assert abs(_bar_angle(x[0])) < 1e-6
    op = RandAugment(num_ops=1, magnitude=magnitude, magnitude_std=0.0, op_prob=1.0, ops=["rotate"], fill=0.0)
    out = op(x, generator=gen(0))
    angles = [_bar_angle(o) for o in out]
    assert all(abs(abs(a) - degrees) < 0.5 for a in angles), angles
    assert {a > 0 for a in angles} == {True, False}, "both directions are drawn"
    # The same rotation as PIL's (bilinear, about the centre), for the sign that was drawn.
    bar = Image.fromarray((_bar()[0, 0] * 255).byte().numpy())
    for o, a in zip(out, angles):
        ref = torch.from_numpy(np.array(bar.rotate(math.copysign(degrees, a), resample=Image.BILINEAR))) / 255
        assert (o[0] - ref).abs().mean() < 0.01, (a, float((o[0] - ref).abs().mean()))


def _colorsys_hue_shift(x: torch.Tensor, shift: float) -> torch.Tensor:
    import colorsys

    out = torch.empty_like(x)
    for i in range(x.shape[-2]):
        for j in range(x.shape[-1]):
            h, s, v = colorsys.rgb_to_hsv(*x[:, i, j].tolist())
            out[:, i, j] = torch.tensor(colorsys.hsv_to_rgb((h + shift) % 1.0, s, v))
    return out


@pytest.mark.parametrize("shift", [0.2, -0.35, 0.5])
def test_color_jitter_hue_is_a_hue_rotation(shift):
    x = torch.rand(2, 3, 5, 6, generator=gen(11))
    out = ColorJitter(hue=(shift, shift))(x, generator=gen(0))
    for i in range(2):
        torch.testing.assert_close(out[i], _colorsys_hue_shift(x[i], shift), atol=1e-5, rtol=0)


def test_color_jitter_random_hue_is_one_shift_per_sample_within_the_range():
    import colorsys

    x = torch.rand(4, 3, 5, 6, generator=gen(11))
    out = ColorJitter(hue=0.1)(x, generator=gen(3))
    shifts = []
    for i in range(4):
        hues = [(colorsys.rgb_to_hsv(*out[i, :, r, c].tolist())[0] - colorsys.rgb_to_hsv(*x[i, :, r, c].tolist())[0])
                for r in range(5) for c in range(6)]
        wrapped = [(h + 0.5) % 1.0 - 0.5 for h in hues]  # to [-0.5, 0.5)
        shift = float(np.median(wrapped))
        assert -0.1 - 1e-4 <= shift <= 0.1 + 1e-4
        torch.testing.assert_close(out[i], _colorsys_hue_shift(x[i], shift), atol=1e-4, rtol=0)
        shifts.append(shift)
    assert len({round(s, 4) for s in shifts}) == 4 and max(map(abs, shifts)) > 0.01, shifts


@pytest.mark.parametrize("name, factor, enhancer", [("brightness", 1.6, "Brightness"),
                                                    ("brightness", 0.3, "Brightness"),
                                                    ("saturation", 1.7, "Color"), ("saturation", 0.2, "Color"),
                                                    ("contrast", 1.5, "Contrast")])
def test_color_jitter_factors_match_pil_image_enhance(name, factor, enhancer):
    from PIL import ImageEnhance

    a = (np.random.default_rng(1).random((9, 10, 3)) * 255).astype(np.uint8)
    x = torch.from_numpy(a).permute(2, 0, 1)[None].float() / 255
    out = ColorJitter(**{name: (factor, factor)})(x, generator=gen(0))
    ref = np.asarray(getattr(ImageEnhance, enhancer)(Image.fromarray(a)).enhance(factor)).astype(np.float32) / 255
    diff = (out[0].permute(1, 2, 0).numpy() - ref)
    assert np.abs(diff).max() <= 1.5 / 255 if enhancer != "Contrast" else np.abs(diff).max() <= 3 / 255


@pytest.mark.parametrize("op, enhancer", [("brightness", "Brightness"), ("color", "Color"), ("sharpness", "Sharpness")])
@pytest.mark.parametrize("magnitude", [3, 9])
def test_rand_augment_enhance_ops_use_the_magnitude(op, enhancer, magnitude):
    """timm's increasing enhance ops: factor 1 +- 0.9 * magnitude / 10, as PIL's ImageEnhance."""
    from PIL import ImageEnhance

    a = (np.random.default_rng(2).random((9, 10, 3)) * 255).astype(np.uint8)
    x = torch.from_numpy(a).permute(2, 0, 1)[None].float().expand(6, -1, -1, -1) / 255
    ra = RandAugment(num_ops=1, magnitude=magnitude, magnitude_std=0.0, op_prob=1.0, ops=[op])
    out = ra(x, generator=gen(4))
    matched = set()
    for o in out:
        got = o.permute(1, 2, 0).numpy()
        for sign in (1, -1):
            factor = 1 + sign * 0.9 * magnitude / 10
            ref = np.asarray(getattr(ImageEnhance, enhancer)(Image.fromarray(a)).enhance(factor)) / 255
            if np.abs(got - ref).max() <= 1.5 / 255:
                matched.add(sign)
                break
        else:
            pytest.fail(f"{op} at magnitude {magnitude}: no PIL factor 1 +- {0.9 * magnitude / 10} matches")
    assert matched == {1, -1}
