"""Issue 22: YOLOS hub config, COCO/caption file errors, the MAE family message, zero-shot notes,
plot labels and legends, COCO metrics with nothing to measure."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from vitlab.datasets.coco import AnnotationError, CocoDetection


# ---------------------------------------------------------------- 1. hustvl/yolos-tiny config
def test_hustvl_yolos_tiny_config_loads_and_equals_huggingface(tmp_path):
    """The published hustvl/yolos-tiny YolosConfig (800x1333 -> a 50x83 grid), depth cut to 2 to stay fast.

    Kept from the hub config: image_size [800, 1333], patch_size 16, hidden_size 192, heads 3,
    intermediate_size 768, 100 detection tokens, use_mid_position_embeddings False, 91 labels,
    gelu, layer_norm_eps 1e-12, qkv_bias True. Changed: num_hidden_layers 12 -> 2.
    """
    transformers = pytest.importorskip("transformers")
    from vitlab.tasks.detection.convert_yolos import load_hf_yolos

    torch.manual_seed(0)
    cfg = transformers.YolosConfig(
        image_size=[800, 1333], patch_size=16, hidden_size=192, num_hidden_layers=2, num_attention_heads=3,
        intermediate_size=768, num_detection_tokens=100, use_mid_position_embeddings=False, num_labels=91,
        hidden_act="gelu", layer_norm_eps=1e-12, qkv_bias=True,
    )
    hf = transformers.YolosForObjectDetection(cfg).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.copy_(1 + 0.2 * torch.randn_like(p) if "layernorm" in name and name.endswith("weight")
                    else 0.1 * torch.randn_like(p))
    assert hf.vit.embeddings.position_embeddings.shape == (1, 1 + 50 * 83 + 100, 192)
    hf.save_pretrained(tmp_path)
    ours = load_hf_yolos(tmp_path)
    assert ours.backbone.grid_size == (50, 83) and ours.mid_pos_embed is None
    torch.testing.assert_close(ours.det_pos_embed, hf.vit.embeddings.position_embeddings[:, -100:])
    x = torch.randn(2, 3, 64, 96)  # a 4x6 grid: the 50x83 embedding is resampled
    with torch.no_grad():
        ref, out = hf(pixel_values=x), ours(x)
    assert ref.logits.std() > 0.1 and (ref.pred_boxes[0] - ref.pred_boxes[1]).abs().max() > 0.01
    torch.testing.assert_close(out["logits"], ref.logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out["pred_boxes"], ref.pred_boxes, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------- 2./3. COCO and caption files
def _coco(tmp_path, images, annotations):
    (tmp_path / "img").mkdir(exist_ok=True)
    for img in images:
        Image.fromarray(np.zeros((img["height"], img["width"], 3), np.uint8)).save(tmp_path / "img" / img["file_name"])
    path = tmp_path / "my_instances.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations,
                                "categories": [{"id": 1, "name": "cat"}]}))
    return path


IMAGES = [{"id": 1, "file_name": "a.png", "width": 20, "height": 20},
          {"id": 2, "file_name": "b.png", "width": 30, "height": 30}]


def _ann(aid, image_id, bbox=(1, 1, 5, 5), category_id=1):
    return {"id": aid, "image_id": image_id, "category_id": category_id, "bbox": list(bbox), "iscrowd": 0}


@pytest.mark.parametrize("on_error", ["raise", "skip"])
def test_coco_duplicate_image_id_is_refused_naming_the_id_and_file(tmp_path, on_error):
    images = IMAGES + [{"id": 2, "file_name": "c.png", "width": 40, "height": 40}]
    path = _coco(tmp_path, images, [_ann(1, 2)])
    with pytest.raises(AnnotationError) as e:
        CocoDetection(path, tmp_path / "img", on_error=on_error)
    msg = str(e.value)
    assert "duplicate image id 2" in msg and str(path) in msg and "\n" not in msg


def test_coco_duplicate_annotation_ids_are_refused_naming_the_ids_and_file(tmp_path):
    path = _coco(tmp_path, IMAGES, [_ann(7, 1), _ann(7, 2), _ann(8, 1), _ann(9, 2), _ann(9, 1)])
    with pytest.raises(AnnotationError) as e:
        CocoDetection(path, tmp_path / "img")
    msg = str(e.value)
    assert "duplicate annotation ids 7, 9" in msg and str(path) in msg


def test_coco_unique_ids_still_load(tmp_path):
    path = _coco(tmp_path, IMAGES, [_ann(1, 1), _ann(2, 2, (2, 3, 4, 5))])
    ds = CocoDetection(path, tmp_path / "img")
    assert ds.image_ids == [1, 2] and ds[1]["boxes"].tolist() == [[2.0, 3.0, 6.0, 8.0]]


@pytest.mark.parametrize("ann, match", [
    (_ann(5, 99), "annotation 5: unknown image_id 99"),
    (_ann(5, 1, category_id=4), "annotation 5: unknown category_id 4"),
    (_ann(5, 1, bbox=(1, 1, 0, 5)), "annotation 5: empty box"),
    (_ann(5, 1, bbox=(18, 1, 5, 5)), "annotation 5: box .* outside"),
    ({"id": 5, "image_id": 1, "category_id": 1, "bbox": "x"}, "annotation 5: bbox must be"),
])
def test_every_coco_annotation_error_names_the_annotations_file(tmp_path, ann, match):
    path = _coco(tmp_path, IMAGES, [ann])
    with pytest.raises(AnnotationError, match=match) as e:
        CocoDetection(path, tmp_path / "img")
    assert str(e.value).startswith(f"{path}: ")


def test_coco_mask_and_image_errors_name_the_annotations_file(tmp_path):
    path = _coco(tmp_path, IMAGES, [_ann(5, 1)])
    ds = CocoDetection(path, tmp_path / "img", load_masks=True)
    with pytest.raises(AnnotationError, match="annotation 5: no segmentation") as e:
        ds[0]
    assert str(path) in str(e.value)
    Image.fromarray(np.zeros((31, 30, 3), np.uint8)).save(tmp_path / "img" / "b.png")
    with pytest.raises(AnnotationError, match="b.png' is 30x31") as e:
        ds[1]
    assert str(path) in str(e.value)


def test_coco_non_utf8_file_names_the_file(tmp_path):
    path = tmp_path / "instances.json"
    path.write_bytes(b'{"images": [], "annotations": [], "categories": [{"id": 1, "name": "caf\xe9"}]}')
    with pytest.raises(AnnotationError, match="not UTF-8") as e:
        CocoDetection(path, tmp_path)
    assert str(path) in str(e.value)


@pytest.mark.parametrize("name, content, line", [
    ("captions.csv", b"image,caption\na.png,a cat\nb.png,un caf\xe9 noir\n", 3),
    ("captions.jsonl", b'{"image": "a.png", "caption": "a cat"}\n\n{"image": "b.png", "caption": "caf\xe9"}\n', 3),
])
def test_non_utf8_caption_file_gives_one_error_with_file_and_line(tmp_path, name, content, line):
    from vitlab.datasets.captions import CaptionFolder

    for f in ("a.png", "b.png"):
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / f)
    (tmp_path / name).write_bytes(content)
    with pytest.raises(ValueError) as e:
        CaptionFolder(tmp_path)
    msg = str(e.value)
    assert f"{tmp_path / name} line {line} is not UTF-8" in msg and "\n" not in msg
    assert not isinstance(e.value, UnicodeDecodeError)


def test_utf8_caption_file_with_bom_reads(tmp_path):
    from vitlab.datasets.captions import CaptionFolder

    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "a.png")
    (tmp_path / "captions.csv").write_bytes("\ufeffimage,caption\na.png,un café noir\n".encode("utf-8"))
    ds = CaptionFolder(tmp_path)
    assert ds.corpus() == ["un café noir"]


# ---------------------------------------------------------------- 4. MAE on a hierarchical family
def test_mae_on_pvt_names_the_families_that_can_do_mae_and_simmim(capsys):
    from vitlab.cli import main

    assert main(["train", "--task", "mae", "--model", "pvt_tiny", "--epochs", "1"]) == 2
    err = capsys.readouterr().err
    assert "forward_features(mask" not in err and "PyramidVisionTransformer (family 'pvt')" in err
    assert "MAE needs a plain ViT family (cait, deit, deit_plain, vit)" in err
    assert "SimMIM a hierarchical family with a mask token (pvt_v2, swin)" in err


# ---------------------------------------------------------------- 5. zero-shot notes
def _digit_clip():
    from vitlab.datasets.captions import DigitCaptions
    from vitlab.models.text import text_config
    from vitlab.tasks.clip import CLIP, CLIPConfig

    data = DigitCaptions("train")
    cfg = CLIPConfig(image_model="vit_tiny_patch16_224",
                     image_overrides=dict(image_size=16, patch_size=8, dim=16, depth=1, heads=2, mlp_dim=32,
                                          in_channels=1),
                     text=text_config("clip_text_tiny", vocab_size=20, context_length=10, dim=16, depth=1, heads=2,
                                      mlp_dim=32), embed_dim=8)
    model = CLIP(cfg).eval()
    model.pretrained_cfg = {"task": "clip", "input_size": [1, 16, 16], "mean": list(data.mean),
                            "std": list(data.std), "crop_pct": 1.0}
    return model, data


def _photo():
    """scikit-image's astronaut, else a colourful, bright photo-like picture (smooth colour fields plus texture)."""
    try:
        from skimage import data

        return data.astronaut()
    except ImportError:
        yy, xx = np.mgrid[0:256, 0:256] / 255.0
        rng = np.random.default_rng(0)
        rgb = np.stack([0.6 + 0.3 * np.sin(6 * xx), 0.5 + 0.3 * yy, 0.7 - 0.3 * xx * yy], -1)
        return (np.clip(rgb + 0.05 * rng.standard_normal(rgb.shape), 0, 1) * 255).astype(np.uint8)


def test_zero_shot_notes_warn_on_a_photo_and_not_on_a_digit():
    from vitlab.tasks.clip.zero_shot import zero_shot_notes
    from vitlab.tasks.inputs import input_notes

    model, data = _digit_clip()
    digit = data[0]["image"]  # (1, 8, 8) in [0, 1], the training data itself
    photo = _photo()
    notes = zero_shot_notes(model, [digit, photo])
    assert len(notes) == 2 and notes[0] == []
    assert any("colour image given to a 1-channel" in n for n in notes[1])
    # the very notes of predict: input_notes on the unit image, against the checkpoint's statistics
    unit = torch.from_numpy(photo).permute(2, 0, 1).float() / 255
    assert notes[1] == input_notes(unit, model.pretrained_cfg, 1)
    # a (B, C, H, W) batch counts as B images
    assert zero_shot_notes(model, [torch.stack([digit, 1 - digit])])[0] == []
    assert len(zero_shot_notes(model, [torch.stack([digit, 1 - digit])])) == 2


# ---------------------------------------------------------------- 6. plots
def test_segmentation_overlay_legend_has_a_colour_patch_per_class(tmp_path):
    from matplotlib.patches import Patch

    from vitlab.tasks.segmentation.visualize import overlay_grid_figure, save_overlay_grid, voc_palette

    image = torch.rand(3, 16, 16)
    target = torch.zeros(16, 16, dtype=torch.long)
    target[:8] = 1
    pred = target.clone()
    pred[12:, 12:] = 3
    labels = ["background", "cat", "dog", "bird"]
    fig = overlay_grid_figure([image], [target], [pred], labels)
    legend = fig.axes[2].get_legend()
    assert legend is not None
    handles = legend.legend_handles
    assert all(isinstance(h, Patch) for h in handles)
    assert [t.get_text() for t in legend.get_texts()] == ["cat", "bird"]
    for h, c in zip(handles, (1, 3)):
        np.testing.assert_allclose(h.get_facecolor()[:3], voc_palette()[c] / 255.0)
    assert not fig.axes[2].texts  # no bare text list any more
    out = save_overlay_grid([image], [target], [pred], tmp_path / "overlay.png", labels)
    assert out.is_file()


def test_mae_reconstruction_grid_labels_its_rows(tmp_path):
    from vitlab.tasks.mae.plots import save_reconstruction_grid

    grid = torch.zeros(3, 2, 1, 8, 8) + 0.5  # mid-grey cells, white padding
    path = save_reconstruction_grid(grid, tmp_path / "grid.png")
    arr = np.asarray(Image.open(path).convert("L"))
    scale, pad, h = 4, 2, 8
    assert arr.shape[0] == (3 * (h + pad) + pad) * scale
    margin = arr.shape[1] - (2 * (8 + pad) + pad) * scale
    assert margin > 20  # a label column left of the grid
    np.testing.assert_array_equal(arr[pad * scale:(pad + h) * scale, margin + pad * scale], 128)  # the grid, shifted
    for r in range(3):  # dark text pixels in each row's band of the margin, none in the padding between rows
        band = arr[(pad + r * (h + pad)) * scale:(pad + r * (h + pad) + h) * scale, :margin]
        assert (band < 100).sum() > 10, r
    # the labels differ in length: "reconstruction" reaches further right than "masked"
    widths = [np.flatnonzero((arr[(pad + r * (h + pad)) * scale:(pad + r * (h + pad) + h) * scale, :margin] < 100)
                             .any(0)).max() for r in range(3)]
    assert widths[2] > max(widths[0], widths[1]) + 15
    save_reconstruction_grid(torch.rand(3, 2, 3, 8, 8), tmp_path / "rgb.png")  # colour grids too


def _det_sample(scores):
    n = len(scores)
    return {"image": torch.rand(1, 32, 32), "gt_boxes": torch.tensor([[4.0, 4.0, 20.0, 20.0]]),
            "gt_labels": torch.tensor([0]), "boxes": torch.tensor([[5.0, 5.0, 21.0, 19.0]] * n).reshape(-1, 4),
            "labels": torch.zeros(n, dtype=torch.long), "scores": torch.tensor(scores, dtype=torch.float32)}


def test_detection_plot_says_when_nothing_passed_the_threshold(tmp_path):
    from vitlab.tasks.detection.plots import plot_predictions, predictions_figure

    fig = predictions_figure([_det_sample([0.3, 0.49]), _det_sample([0.8]), _det_sample([])], ["one"], 0.5)
    texts = [[t.get_text() for t in ax.texts] for ax in fig.axes]
    assert texts[0] == ["no detection >= 0.50"]
    assert texts[1] == ["one 0.80"]
    assert texts[2] == ["no detection >= 0.50"]
    fig = predictions_figure([_det_sample([0.3])], ["one"], 0.25)
    assert [t.get_text() for t in fig.axes[0].texts] == ["one 0.30"]
    assert plot_predictions([_det_sample([0.1])], ["one"], tmp_path / "p.png").is_file()


def test_clip_similarity_shows_whole_captions_inside_the_figure(tmp_path):
    from vitlab.tasks.clip.plots import plot_similarity, similarity_figure

    captions = ["a photo of the digit seven written in thick black ink", "3",
                "an extraordinarily long caption that keeps going well past twenty-eight characters"]
    fig = similarity_figure(torch.rand(3, 3), captions)
    ax = fig.axes[0]
    ticks = ax.get_xticklabels()
    assert [t.get_text().replace("\n", " ") for t in ticks] == captions  # whole, only wrapped
    assert max(len(line) for t in ticks for line in t.get_text().splitlines()) <= 24
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    box = fig.bbox
    for t in ticks + ax.get_yticklabels() + [ax.title]:
        b = t.get_window_extent(renderer)
        assert b.x0 >= box.x0 - 1 and b.y0 >= box.y0 - 1 and b.x1 <= box.x1 + 1 and b.y1 <= box.y1 + 1, t.get_text()
    assert plot_similarity(torch.rand(3, 3), captions, tmp_path / "sim.png").is_file()


# ---------------------------------------------------------------- 7. COCO metrics with nothing to measure
def test_coco_metrics_are_none_where_there_is_nothing_to_measure():
    pytest.importorskip("pycocotools")
    from vitlab.tasks.detection.coco_eval import COCO_METRICS, evaluate_coco

    gt = {"images": [{"id": 1, "width": 100, "height": 100}],
          "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 50, 50], "area": 2500,
                           "iscrowd": 0}],  # one medium object (32^2 < 2500 < 96^2): no small, no large
          "categories": [{"id": 1, "name": "a"}]}
    res = [{"image_id": 1, "category_id": 1, "bbox": [10, 10, 50, 50], "score": 0.9}]
    m = evaluate_coco(gt, res)
    assert set(m) == set(COCO_METRICS)
    assert m["AP_small"] is None and m["AP_large"] is None and m["AR_small"] is None and m["AR_large"] is None
    assert m["AP"] == pytest.approx(1.0) and m["AP_medium"] == pytest.approx(1.0)
    assert json.loads(json.dumps(m))["AP_small"] is None  # null in results.json


def test_results_json_keeps_a_metric_with_nothing_to_measure_as_null():
    import json

    from vitlab.tasks.detection.task import DetectionTask
    from vitlab.training.trainer import _prefixed

    record = _prefixed("test", {"AP50": 0.9, "AP_small": None, "n": 6, "samples": [1]}, keep_n=True)
    assert record == {"test_AP50": 0.9, "test_AP_small": None, "test_n": 6}
    assert json.loads(json.dumps(record))["test_AP_small"] is None  # null in results.json, not -1, not dropped
    assert DetectionTask.format_metric(None, "AP_small", None) == "AP_small n/a"
