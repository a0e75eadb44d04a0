"""Issue 10 (part 2): predict / explain take real inputs without mangling them, refuse what they
cannot take with one clear message, and say when an image is far from the training data."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import vitlab
from vitlab.cli import main as cli
from vitlab.errors import InputError, NonFiniteOutputError
from vitlab.pretrained import save_checkpoint
from vitlab.tasks import ViTClassifier
from vitlab.tasks.inputs import to_unit_tensor

TINY = dict(image_size=32, patch_size=8, dim=24, depth=2, heads=3, mlp_dim=48)
DIGITS_CFG = dict(input_size=8, mean=(0.305,), std=(0.376,), crop_pct=1.0, interpolation="bilinear")


def photo_model(num_classes: int = 3) -> torch.nn.Module:
    """A tiny RGB ViT with ImageNet normalisation (mean intensity 0.449: white background)."""
    return vitlab.create_model("vit_tiny_patch16_224", num_classes=num_classes, **TINY).eval()


def digits_model() -> torch.nn.Module:
    """A tiny 1-channel ViT with the digits recipe's preprocessing (light-on-dark, mean 0.305)."""
    model = vitlab.create_model("vit_tiny_patch16_224", num_classes=10, in_channels=1,
                                **{**TINY, "image_size": 8, "patch_size": 2}).eval()
    model.pretrained_cfg = {**model.pretrained_cfg, **DIGITS_CFG}
    return model


def sklearn_digit(index: int = 0) -> np.ndarray:
    from sklearn.datasets import load_digits

    return load_digits().images[index]  # (8, 8) float64 in 0..16, ink bright


# ------------------------------------------------------------------ bit depth and alpha
def test_16bit_png_is_scaled_not_clipped_to_white(tmp_path):
    rng = np.random.default_rng(0)
    grey8 = rng.integers(0, 256, size=(40, 40), dtype=np.uint8)
    Image.fromarray(grey8.astype(np.uint16) * 257).save(tmp_path / "deep.png")  # 16-bit: v * 257 == v / 255
    with Image.open(tmp_path / "deep.png") as im:
        assert im.mode.startswith("I")  # really a 16-bit file
    Image.fromarray(grey8).save(tmp_path / "flat.png")
    clf = ViTClassifier(photo_model())
    deep, flat = clf.preprocess(tmp_path / "deep.png"), clf.preprocess(tmp_path / "flat.png")
    torch.testing.assert_close(deep, flat, atol=1e-5, rtol=0)
    unit = to_unit_tensor(tmp_path / "deep.png")
    torch.testing.assert_close(unit[0], torch.from_numpy(grey8).float() / 255, atol=1e-6, rtol=0)
    # uint16 arrays follow the same rule
    torch.testing.assert_close(clf.preprocess(grey8.astype(np.uint16) * 257), flat, atol=1e-5, rtol=0)


@pytest.mark.parametrize("model_fn, background", [(photo_model, (255, 255, 255)), (digits_model, (0, 0, 0))])
def test_rgba_is_composited_on_the_training_background(tmp_path, model_fn, background):
    rng = np.random.default_rng(1)
    rgba = rng.integers(0, 256, size=(32, 32, 4), dtype=np.uint8)
    rgba[:16, :, 3] = 0  # fully transparent top half with random (hidden) colours
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    # Reference: PIL's own compositing on the documented background (white for photos, black for digits).
    ref = Image.alpha_composite(Image.new("RGBA", (32, 32), (*background, 255)), Image.fromarray(rgba, "RGBA"))
    clf = ViTClassifier(model_fn())
    got, want = clf.preprocess(tmp_path / "a.png"), clf.preprocess(ref.convert("RGB"))
    torch.testing.assert_close(got, want, atol=2.5 / 255 / min(clf.transform.std), rtol=0)  # PIL rounds to 8 bits
    assert clf.background == (1.0 if background[0] else 0.0)


# ------------------------------------------------------------------ arrays: range and dtype
def test_raw_sklearn_digits_floats_are_refused_with_the_expected_range():
    clf = ViTClassifier(digits_model())
    with pytest.raises(InputError, match=r"float values in \[0, 15\], expected \[0, 1\].*x / 16"):
        clf.predict(sklearn_digit())
    clf.predict(sklearn_digit() / 16.0)  # scaled: accepted


@pytest.mark.parametrize("array, pattern", [
    (np.full((8, 8), np.nan), "NaN or infinite"),
    (np.full((8, 8), 300, dtype=np.int64), r"int64 values in 300\.\.300, expected 0\.\.255"),
    (np.full((8, 8), -1, dtype=np.int16), r"expected 0\.\.255"),
    (np.zeros((3, 16, 16), dtype=np.uint8), r"channels-first .*transpose\(1, 2, 0\)"),
    (np.zeros((8, 8), dtype=np.complex64), "complex"),
])
def test_bad_arrays_are_refused_naming_what_was_expected(array, pattern):
    with pytest.raises(InputError, match=pattern):
        ViTClassifier(photo_model()).predict(array)


def test_float_tensors_outside_unit_range_are_refused():
    clf = ViTClassifier(photo_model())
    with pytest.raises(InputError, match=r"float values in \[255, 255\], expected \[0, 1\]"):
        clf.predict(torch.full((3, 32, 32), 255.0))
    small_ints = np.full((8, 8), 200, dtype=np.int32)  # 0..255 in a wider int type: 8-bit
    torch.testing.assert_close(clf.preprocess(small_ints), clf.preprocess(small_ints.astype(np.uint8)))


# ------------------------------------------------------------------ non-finite outputs
def test_nan_logits_raise_instead_of_a_confident_answer(tmp_path, capsys):
    model = photo_model()
    with torch.no_grad():
        model.head.bias.fill_(float("nan"))
    with pytest.raises(NonFiniteOutputError, match="NaN/infinite outputs"):
        ViTClassifier(model).predict(np.zeros((32, 32, 3), dtype=np.uint8))
    save_checkpoint(model, tmp_path / "ck")
    Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8)).save(tmp_path / "x.png")
    assert cli(["predict", "--checkpoint", str(tmp_path / "ck"), str(tmp_path / "x.png")]) == 1
    out, err = capsys.readouterr()
    assert "nan" not in out.lower() and out == ""
    assert err.count("\n") == 1 and "NaN/infinite outputs" in err and "x.png" in err


# ------------------------------------------------------------------ notes: far from the training data
def test_dark_on_light_digit_gets_a_polarity_note(tmp_path, capsys):
    clf = ViTClassifier(digits_model())
    light_on_dark = (sklearn_digit() / 16.0 * 255).astype(np.uint8)
    dark_on_light = 255 - light_on_dark
    assert clf.predict(light_on_dark)["notes"] == []
    notes = clf.predict(dark_on_light)["notes"]
    assert len(notes) == 1 and "inverted" in notes[0] and "light-on-dark" in notes[0]
    # Through the CLI: the note on stderr, the answer on stdout.
    save_checkpoint(clf.model, tmp_path / "ck", labels=[str(i) for i in range(10)])
    Image.fromarray(dark_on_light).resize((64, 64)).save(tmp_path / "drawn.png")
    assert cli(["predict", "--checkpoint", str(tmp_path / "ck"), str(tmp_path / "drawn.png"), "--json"]) == 0
    out, err = capsys.readouterr()
    assert "note: " in err and "inverted" in err
    assert "inverted" in json.loads(out)[0]["notes"][0]


def test_notes_for_size_channels_and_blank_images():
    clf = ViTClassifier(photo_model())  # 32-pixel RGB input
    tiny = np.random.default_rng(0).integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
    assert any("much smaller" in n for n in clf.predict(tiny)["notes"])
    wide = np.random.default_rng(0).integers(0, 256, size=(32, 128, 3), dtype=np.uint8)
    assert any("centre crop keeps only its middle 25%" in n for n in clf.predict(wide)["notes"])
    blank = np.full((32, 32, 3), 128, dtype=np.uint8)
    assert any("uniform" in n for n in clf.predict(blank)["notes"])
    grey = np.random.default_rng(0).integers(0, 256, size=(32, 32), dtype=np.uint8)
    assert any("grey image" in n for n in clf.predict(grey)["notes"])
    colour = np.random.default_rng(0).integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
    assert ViTClassifier(photo_model()).predict(colour)["notes"] == []
    assert any("colour image" in n for n in ViTClassifier(digits_model()).predict(colour)["notes"])


# ------------------------------------------------------------------ files PIL refuses
def test_decompression_bomb_is_one_clear_error(tmp_path, monkeypatch, capsys):
    Image.fromarray(np.zeros((40, 40, 3), dtype=np.uint8)).save(tmp_path / "big.png")
    clf = ViTClassifier(photo_model())
    for limit in (1000, 500):  # 1600 pixels: a warning above the limit, an error above twice it
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
        with pytest.raises(InputError, match="decompression bomb"):
            clf.predict(tmp_path / "big.png")
    save_checkpoint(clf.model, tmp_path / "ck")
    assert cli(["predict", "--checkpoint", str(tmp_path / "ck"), str(tmp_path / "big.png")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "big.png" in err and "decompression bomb" in err


def test_explain_checks_inputs_and_reports_notes(tmp_path):
    from vitlab.evaluation.explain import explain

    model = digits_model()
    with pytest.raises(InputError, match=r"expected \[0, 1\]"):
        explain(model, sklearn_digit(), "saliency", output_dir=tmp_path, progress=False)
    drawn = 255 - (sklearn_digit() / 16.0 * 255).astype(np.uint8)
    record = explain(model, drawn, "saliency", output_dir=tmp_path, progress=False)
    assert any("inverted" in n for n in record["notes"])
