"""COCO format: reading a user's instances JSON, writing digit scenes, bad annotations, and COCO mAP."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from vitlab.datasets.coco import AnnotationError, CocoDetection, MissingImageError, write_coco
from vitlab.tasks.detection import CocoEvaluator, evaluate_coco



def _user_dataset(tmp_path, annotations, images=None):
    """A small COCO dataset the way users bring one: RGB images, sparse category ids, xywh boxes."""
    (tmp_path / "img").mkdir(exist_ok=True)
    images = images or [{"id": 11, "file_name": "a.png", "width": 40, "height": 30},
                        {"id": 12, "file_name": "b.jpg", "width": 20, "height": 20}]
    rng = np.random.default_rng(0)
    for img in images:
        arr = rng.integers(0, 256, (img["height"], img["width"], 3), dtype=np.uint8)
        Image.fromarray(arr).save(tmp_path / "img" / img["file_name"])
    data = {
        "images": images,
        "annotations": annotations,
        "categories": [{"id": 7, "name": "cat"}, {"id": 3, "name": "dog"}],
    }
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(data))
    return path


GOOD = [
    {"id": 1, "image_id": 11, "category_id": 7, "bbox": [5, 6, 10, 4], "area": 40, "iscrowd": 0},
    {"id": 2, "image_id": 11, "category_id": 3, "bbox": [0, 0, 40, 30], "area": 1200, "iscrowd": 0},
    {"id": 3, "image_id": 11, "category_id": 3, "bbox": [1, 1, 2, 2], "area": 4, "iscrowd": 1},
    {"id": 4, "image_id": 12, "category_id": 7, "bbox": [2.5, 3.5, 4.0, 5.0], "area": 20, "iscrowd": 0},
]


def test_reads_a_user_coco_dataset(tmp_path):
    path = _user_dataset(tmp_path, GOOD)
    ds = CocoDetection(path, tmp_path / "img")
    assert len(ds) == 2 and ds.category_ids == [3, 7] and ds.classes == ["dog", "cat"]
    a = ds[0]
    assert a["image_id"] == 11 and a["image"].shape == (3, 30, 40)
    expected = np.asarray(Image.open(tmp_path / "img" / "a.png"), dtype=np.float32).transpose(2, 0, 1) / 255
    assert torch.equal(a["image"], torch.from_numpy(expected))
    # xywh -> xyxy, category 7 -> label 1, 3 -> 0; the crowd annotation is no target
    assert torch.equal(a["boxes"], torch.tensor([[5.0, 6.0, 15.0, 10.0], [0.0, 0.0, 40.0, 30.0]]))
    assert a["labels"].tolist() == [1, 0]
    b = ds[1]
    assert torch.equal(b["boxes"], torch.tensor([[2.5, 3.5, 6.5, 8.5]])) and b["labels"].tolist() == [1]


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"id": 17, "image_id": 11, "category_id": 7, "bbox": [35, 5, 10, 4]}, r"annotation 17: box .* outside .*'a\.png' of 40x30"),
        ({"id": 18, "image_id": 11, "category_id": 99, "bbox": [1, 1, 2, 2]}, r"annotation 18: unknown category_id 99 \(the file declares \[3, 7\]\)"),
        ({"id": 19, "image_id": 55, "category_id": 7, "bbox": [1, 1, 2, 2]}, r"annotation 19: unknown image_id 55"),
        ({"id": 20, "image_id": 12, "category_id": 7, "bbox": [1, 1, 0, 2]}, r"annotation 20: empty box"),
        ({"id": 21, "image_id": 12, "category_id": 7, "bbox": [1, 1, 2]}, r"annotation 21: bbox must be \[x, y, width, height\]"),
    ],
)
def test_bad_annotation_names_its_id(tmp_path, bad, message):
    path = _user_dataset(tmp_path, GOOD + [bad])
    with pytest.raises(AnnotationError, match=message):
        CocoDetection(path, tmp_path / "img")


def test_box_within_tolerance_is_clipped_beyond_it_is_an_error(tmp_path):
    near = {"id": 40, "image_id": 12, "category_id": 3, "bbox": [-0.5, 12, 10, 8.75], "area": 1, "iscrowd": 0}
    ds = CocoDetection(_user_dataset(tmp_path, GOOD + [near]), tmp_path / "img")
    assert torch.equal(ds[1]["boxes"][1], torch.tensor([0.0, 12.0, 9.5, 20.0]))
    with pytest.raises(AnnotationError, match="annotation 40: box"):
        CocoDetection(_user_dataset(tmp_path, GOOD + [near]), tmp_path / "img", box_tolerance=0.25)


def test_polygon_segmentation_is_decoded(tmp_path):
    pytest.importorskip("pycocotools")
    ann = {"id": 50, "image_id": 12, "category_id": 3, "bbox": [2, 2, 6, 4], "area": 24, "iscrowd": 0,
           "segmentation": [[2, 2, 8, 2, 8, 6, 2, 6]]}
    ds = CocoDetection(_user_dataset(tmp_path, [ann]), tmp_path / "img", load_masks=True)
    mask = ds[1]["instance_masks"][0]
    ys, xs = torch.nonzero(mask, as_tuple=True)
    # pycocotools rasterises the 6x4 rectangle to pixel columns 2..7 and rows 2..5
    assert (xs.min(), xs.max(), ys.min(), ys.max()) == (2, 7, 2, 5) and int(mask.sum()) == 24


def test_malformed_file_gives_one_clear_error(tmp_path):
    path = _user_dataset(tmp_path, GOOD)
    data = json.loads(path.read_text())
    (tmp_path / "no_categories.json").write_text(json.dumps({"images": [], "annotations": []}))
    with pytest.raises(AnnotationError, match="not a COCO instances file: no categories"):
        CocoDetection(tmp_path / "no_categories.json", tmp_path / "img")
    del data["images"][1]["height"]
    (tmp_path / "no_height.json").write_text(json.dumps(data))
    with pytest.raises(AnnotationError, match="image entry 1 has no height"):
        CocoDetection(tmp_path / "no_height.json", tmp_path / "img")
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(AnnotationError, match="broken.json is not valid JSON"):
        CocoDetection(tmp_path / "broken.json", tmp_path / "img")


def test_missing_image_names_the_file(tmp_path):
    path = _user_dataset(tmp_path, GOOD)
    (tmp_path / "img" / "b.jpg").unlink()
    with pytest.raises(MissingImageError, match=r"image 'b\.jpg' \(id 12\) not found"):
        CocoDetection(path, tmp_path / "img")
    with pytest.raises(FileNotFoundError, match="annotation file not found"):
        CocoDetection(tmp_path / "nope.json", tmp_path / "img")


def test_skip_mode_drops_and_counts(tmp_path):
    bad = [
        {"id": 30, "image_id": 11, "category_id": 7, "bbox": [-5, 0, 10, 10]},
        {"id": 31, "image_id": 11, "category_id": 1, "bbox": [1, 1, 2, 2]},
    ]
    path = _user_dataset(tmp_path, GOOD + bad)
    (tmp_path / "img" / "b.jpg").unlink()
    with pytest.warns(UserWarning, match="skipped 3 bad annotations and 1 missing images"):
        ds = CocoDetection(path, tmp_path / "img", on_error="skip")
    # two bad ones, plus annotation 4 whose image is missing
    assert ds.skipped == {"images": 1, "annotations": 3}
    assert ds.image_ids == [11] and ds[0]["labels"].tolist() == [1, 0]


def test_unreadable_or_resized_image_names_the_file(tmp_path):
    path = _user_dataset(tmp_path, GOOD)
    (tmp_path / "img" / "a.png").write_bytes(b"not a png")
    Image.fromarray(np.zeros((21, 20, 3), np.uint8)).save(tmp_path / "img" / "b.jpg")
    ds = CocoDetection(path, tmp_path / "img")
    with pytest.raises(AnnotationError, match=r"a\.png' cannot be read as an image"):
        ds[0]
    with pytest.raises(AnnotationError, match=r"b\.jpg' is 20x21 pixels but its annotation says 20x20"):
        ds[1]


def test_digit_scenes_round_trip_through_coco(tmp_path):
    pytest.importorskip("pycocotools")
    pytest.importorskip("sklearn")
    from vitlab.datasets.digit_scenes import DigitScenes

    scenes = DigitScenes("test", 6, canvas_size=(48, 64), max_overlap=0.3, clutter=3, seed=9)
    path = write_coco(scenes, tmp_path / "coco", scenes.classes)
    ds = CocoDetection(path, tmp_path / "coco" / "images", load_masks=True)
    assert len(ds) == 6 and ds.classes == scenes.classes
    for k in range(6):
        a, b = scenes[k], ds[k]
        assert a["image_id"] == b["image_id"]
        assert torch.equal(a["image"], b["image"])
        assert torch.equal(a["boxes"], b["boxes"]) and torch.equal(a["labels"], b["labels"])
        assert torch.equal(a["instance_masks"], b["instance_masks"])
    data = json.loads(path.read_text())
    assert [c["id"] for c in data["categories"]] == list(range(1, 11))
    ann = data["annotations"][0]
    mask = scenes[ann["image_id"]]["instance_masks"][0]
    assert ann["area"] == float(mask.sum())
    # the written RLE is standard COCO: pycocotools decodes it to the same mask
    from pycocotools import mask as mask_utils

    rle = mask_utils.frPyObjects(ann["segmentation"], 48, 64)
    assert np.array_equal(mask_utils.decode(rle).astype(bool), mask.numpy())


# ---------------------------------------------------------------- evaluation


def _two_box_gt():
    return {
        "images": [{"id": 1, "file_name": "x.png", "width": 100, "height": 100}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 20, 20], "area": 400, "iscrowd": 0},
            {"id": 2, "image_id": 1, "category_id": 1, "bbox": [50, 50, 20, 20], "area": 400, "iscrowd": 0},
        ],
        "categories": [{"id": 1, "name": "a"}],
    }


def test_perfect_predictions_give_ap_one():
    pytest.importorskip("pycocotools")
    gt = _two_box_gt()
    res = [{"image_id": 1, "category_id": 1, "bbox": a["bbox"], "score": 0.5} for a in gt["annotations"]]
    m = evaluate_coco(gt, res)
    assert m["AP"] == m["AP50"] == m["AP75"] == m["AP_small"] == 1.0
    assert m["AP_medium"] is None and m["AP_large"] is None  # no such objects (pycocotools' -1)


def test_shifted_box_gives_the_hand_computed_ap():
    pytest.importorskip("pycocotools")
    # box 2 shifted by 4 px: IoU 16*20 / (800 - 320) = 2/3, a hit at IoU thresholds .5-.65 (4 of
    # 10) only; above, recall is 1/2 at precision 1: 51 of the 101 recall points
    gt = _two_box_gt()
    res = [
        {"image_id": 1, "category_id": 1, "bbox": [10, 10, 20, 20], "score": 0.9},
        {"image_id": 1, "category_id": 1, "bbox": [54, 50, 20, 20], "score": 0.8},
    ]
    m = evaluate_coco(gt, res)
    assert m["AP50"] == pytest.approx(1.0)
    assert m["AP75"] == pytest.approx(51 / 101)
    assert m["AP"] == pytest.approx((4 + 6 * 51 / 101) / 10)
    assert evaluate_coco(gt, [])["AP"] == 0.0


def test_evaluator_equals_cocoeval_run_on_the_written_files(tmp_path):
    pytest.importorskip("pycocotools")
    pytest.importorskip("sklearn")
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    from vitlab.datasets.digit_scenes import DigitScenes

    scenes = DigitScenes("val", 8, canvas_size=96, digit_size=(12, 40), max_overlap=0.2, seed=11)
    gt_path = write_coco(scenes, tmp_path, scenes.classes)
    g = torch.Generator().manual_seed(0)
    evaluator = CocoEvaluator(gt_path)
    records = []
    for s in scenes:
        n = len(s["labels"])
        boxes = s["boxes"] + torch.randn(n, 4, generator=g) * 2.5  # shifted, some clearly off
        boxes[:, 2:] = torch.maximum(boxes[:, 2:], boxes[:, :2] + 1)
        labels = s["labels"].clone()
        labels[0] = (labels[0] + 1) % 10  # one wrong class per image
        scores = torch.rand(n, generator=g)
        evaluator.update([{"boxes": boxes, "scores": scores, "labels": labels}], [s["image_id"]])
        for b, sc, lab in zip(boxes.tolist(), scores.tolist(), labels.tolist()):
            records.append({"image_id": s["image_id"], "category_id": lab + 1,
                            "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]], "score": sc})
    res_path = tmp_path / "results.json"
    res_path.write_text(json.dumps(records))

    gt = COCO(str(gt_path))
    ev = COCOeval(gt, gt.loadRes(str(res_path)), iouType="bbox")
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    direct = [None if v == -1 else v for v in ev.stats.tolist()]  # -1: nothing to measure, reported as None
    ours = evaluator.compute()
    from_files = evaluate_coco(gt_path, res_path)
    for got in (list(ours.values()), list(from_files.values())):
        assert [v is None for v in got] == [v is None for v in direct]
        assert [v for v in got if v is not None] == pytest.approx([v for v in direct if v is not None], abs=1e-9)
    assert 0.05 < ours["AP"] < 0.95  # neither trivial nor perfect


def test_perfect_detr_outputs_through_postprocessing_give_ap_one(tmp_path):
    pytest.importorskip("pycocotools")
    # the whole path a model's outputs take: normalised cxcywh -> pixels -> COCO results -> mAP
    pytest.importorskip("sklearn")
    from vitlab.datasets.digit_scenes import DigitScenes
    from vitlab.tasks.detection import normalize_boxes, postprocess_detections

    scenes = DigitScenes("test", 5, canvas_size=(48, 80), max_overlap=0.3, seed=12)
    evaluator = CocoEvaluator(write_coco(scenes, tmp_path, scenes.classes))
    for s in scenes:
        n, queries = len(s["labels"]), 6
        logits = torch.full((1, queries, 11), -10.0)
        logits[0, n:, 10] = 10.0  # the spare queries say no-object
        logits[0, torch.arange(n), s["labels"]] = 10.0
        boxes = torch.full((1, queries, 4), 0.5)
        boxes[0, :n] = normalize_boxes(s["boxes"], (48, 80))
        dets = postprocess_detections(logits, boxes, [(48, 80)], score_threshold=0.5)
        assert len(dets[0]["labels"]) == n
        evaluator.update(dets, [s["image_id"]])
    m = evaluator.compute()
    assert m["AP"] == pytest.approx(1.0) and m["AP75"] == pytest.approx(1.0)
