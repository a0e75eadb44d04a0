"""Mask R-CNN detection ops (``vitlab.tasks.rcnn.ops``) against torchvision's golden outputs.

``tests/fixtures/torchvision_roi_ops.safetensors`` (made by ``fixtures/make_torchvision_fixtures.py``
with torchvision 0.29) holds seeded inputs and torchvision's outputs: kept indices must be identical,
floats within 1e-5.
"""

from __future__ import annotations

import json

import pytest
import torch

from timm_fixtures import FIXTURES, timm_fixture
from vitlab.tasks.rcnn import ops

FIXTURE = timm_fixture(FIXTURES / "torchvision_roi_ops.safetensors")
T, META = FIXTURE.tensors, FIXTURE.metadata
ROI_CASES = {c["name"]: c for c in json.loads(META["roi_align_cases"])}
GRAD_CASES = [n for n, c in ROI_CASES.items() if c["grad"]]
THRESHOLDS = json.loads(META["nms_thresholds"])
MULTISCALE_CASES = {c["name"]: c for c in json.loads(META["multiscale_cases"])}
PADDINGS = json.loads(META["paste_paddings"])
ATOL = 1e-5


def close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    torch.testing.assert_close(actual, expected, atol=ATOL, rtol=0)


def roi_case(name: str) -> tuple[dict, torch.Tensor]:
    case = ROI_CASES[name]
    return case, T["roi_align.rois"] if case["spatial_scale"] == 1.0 else T["roi_align.rois_x4"]


def run_roi_align(name: str, x: torch.Tensor, rois: torch.Tensor | list[torch.Tensor] | None = None) -> torch.Tensor:
    case, default = roi_case(name)
    return ops.roi_align(x, default if rois is None else rois, tuple(case["output_size"]),
                         spatial_scale=case["spatial_scale"], sampling_ratio=case["sampling_ratio"],
                         aligned=case["aligned"])


def test_fixture_records_versions() -> None:
    assert META["torchvision_version"].startswith("0.") and META["torch_version"]


# ------------------------------------------------------------------------------------------ roi_align
@pytest.mark.parametrize("name", list(ROI_CASES))
def test_roi_align_matches_torchvision(name: str) -> None:
    close(run_roi_align(name, T["roi_align.input"]), T[f"roi_align.{name}.output"])


def test_fixture_rois_exercise_the_adaptive_count_and_borders() -> None:
    """The RoIs give several adaptive sample counts and some all-zero (outside / empty) outputs."""
    rois = T["roi_align.rois"]
    counts = {(int(torch.ceil((r[4] - r[2]).clamp(min=1) / 5)), int(torch.ceil((r[3] - r[1]).clamp(min=1) / 4)))
              for r in rois}
    assert len(counts) >= 5
    zero_rows = (T["roi_align.sr0_aligned.output"].flatten(1).abs().amax(1) == 0).sum()
    assert zero_rows >= 3  # zero width / height / sub-pixel when aligned, entirely outside


@pytest.mark.parametrize("name", ["sr2", "sr0_aligned_s025"])
def test_roi_align_takes_a_box_list_per_image(name: str) -> None:
    _, rois = roi_case(name)
    per_image = [rois[rois[:, 0] == i, 1:] for i in range(3)]
    order = torch.cat([torch.nonzero(rois[:, 0] == i).squeeze(1) for i in range(3)])
    close(run_roi_align(name, T["roi_align.input"], per_image), T[f"roi_align.{name}.output"][order])


@pytest.mark.parametrize("name", GRAD_CASES)
def test_roi_align_gradient_matches_torchvision(name: str) -> None:
    x = T["roi_align.input"].clone().requires_grad_(True)
    (run_roi_align(name, x) * T[f"roi_align.{name}.grad_weight"]).sum().backward()
    close(x.grad, T[f"roi_align.{name}.grad"])


@pytest.mark.parametrize("sampling_ratio", [2, 0])
def test_roi_align_backward_is_deterministic(sampling_ratio: int) -> None:
    """Many overlapping RoIs write into the same pixels: two backward passes agree bit for bit."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16, 20, 24, generator=g, requires_grad=True)
    xy = torch.rand(400, 2, generator=g) * 12
    rois = torch.cat([torch.randint(0, 2, (400, 1), generator=g).float(), xy, xy + 1 + torch.rand(400, 2, generator=g) * 12], 1)
    w = torch.randn(400, 16, 7, 7, generator=g)
    grads = []
    for _ in range(2):
        x.grad = None
        (ops.roi_align(x, rois, 7, 0.5, sampling_ratio, True) * w).sum().backward()
        grads.append(x.grad.clone())
    assert torch.equal(grads[0], grads[1])


def test_roi_align_without_rois() -> None:
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    y = ops.roi_align(x, torch.zeros(0, 5), (2, 3))
    assert y.shape == (0, 3, 2, 3)
    y.sum().backward()  # still part of the graph
    assert torch.equal(x.grad, torch.zeros_like(x))


# ------------------------------------------------------------------------------------------------ NMS
@pytest.mark.parametrize("threshold", THRESHOLDS)
def test_nms_matches_torchvision(threshold: float) -> None:
    keep = ops.nms(T["nms.boxes"], T["nms.scores"], threshold)
    assert keep.dtype == torch.int64
    assert torch.equal(keep, T[f"nms.keep.{threshold}"])


@pytest.mark.parametrize("threshold", THRESHOLDS)
@pytest.mark.parametrize("name", ["batched_nms", "batched_nms_large"])
def test_batched_nms_matches_torchvision(name: str, threshold: float) -> None:
    keep = ops.batched_nms(T[f"{name}.boxes"], T[f"{name}.scores"], T[f"{name}.idxs"], threshold)
    assert torch.equal(keep, T[f"{name}.keep.{threshold}"])


def test_nms_iou_exactly_at_threshold() -> None:
    """IoU 0.5 does not suppress at 0.5 (strictly greater); float IoU 0.3 exceeds the double 0.3."""
    scores = torch.tensor([0.9, 0.8])
    half = torch.tensor([[20.0, 20, 30, 21], [20, 20, 25, 21]])
    assert ops.nms(half, scores, 0.5).tolist() == [0, 1]
    assert ops.nms(torch.tensor([[0.0, 0, 10, 1], [0, 0, 3, 1]]), scores, 0.3).tolist() == [0]


def test_nms_without_boxes() -> None:
    for keep in (ops.nms(torch.zeros(0, 4), torch.zeros(0), 0.5),
                 ops.batched_nms(torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.int64), 0.5)):
        assert keep.dtype == torch.int64 and keep.shape == (0,)


# ------------------------------------------------------------------------------- multi-scale RoI Align
@pytest.mark.parametrize("name", list(MULTISCALE_CASES))
def test_multiscale_roi_align_matches_torchvision(name: str) -> None:
    case = MULTISCALE_CASES[name]
    feats = [T[f"multiscale.feat.{lv}"] for lv in case["levels"]]
    boxes = [T["multiscale.boxes.0"], T["multiscale.boxes.1"]]
    shapes = [tuple(s) for s in json.loads(META["image_shapes"])]
    out = ops.multiscale_roi_align(feats, boxes, shapes, tuple(case["output_size"]), case["sampling_ratio"],
                                   case["canonical_scale"], case["canonical_level"])
    close(out, T[f"multiscale.{name}.output"])


def test_multiscale_roi_align_gradient_reaches_every_used_level() -> None:
    feats = [T[f"multiscale.feat.{lv}"].clone().requires_grad_(True) for lv in range(4)]
    boxes = [T["multiscale.boxes.0"], T["multiscale.boxes.1"]]
    ops.multiscale_roi_align(feats, boxes, (128, 160), 4).square().sum().backward()
    assert all(f.grad is not None and f.grad.abs().sum() > 0 for f in feats)


def test_fixture_boxes_reach_every_level() -> None:
    boxes = torch.cat([T["multiscale.boxes.0"], T["multiscale.boxes.1"]])
    assert set(ops.map_levels(boxes, 2, 5).tolist()) == {0, 1, 2, 3}


def test_map_levels_formula() -> None:
    """Levels from torchvision's LevelMapper(2, 5) for these sides (checked in the reference env)."""
    sides = torch.tensor([1.0, 55.9, 56.0, 111.9, 112.0, 224.0, 447.0, 448.0, 2000.0, 112 - 4 * 2**-17])
    boxes = torch.stack([torch.zeros_like(sides), torch.zeros_like(sides), sides, sides], 1)
    # floor(4 + log2(side / 224) + 1e-6), clamped to [2, 5], minus 2; the last side (four float steps
    # under 112: 111.99997) reaches level 3 only through the 1e-6
    expected = [0, 0, 0, 0, 1, 2, 2, 3, 3, 1]
    assert ops.map_levels(boxes, 2, 5).tolist() == expected
    assert ops.map_levels([boxes[:4], boxes[4:]], 2, 5).tolist() == expected
    assert ops.map_levels(boxes, 2, 5, canonical_scale=112, canonical_level=3).tolist() == expected


def test_feature_scales_are_inferred_from_map_sizes() -> None:
    feats = [torch.zeros(1, 1, 100 // s, 152 // s) for s in (4, 8, 16, 32)]  # 25, 12, 6, 3 rows
    assert ops.feature_scales(feats, (100, 152)) == [0.25, 0.125, 0.0625, 0.03125]
    assert ops.feature_scales(feats, [(90, 152), (100, 140)]) == [0.25, 0.125, 0.0625, 0.03125]


# ------------------------------------------------------------------------------------ mask pasting
@pytest.mark.parametrize("padding", PADDINGS)
def test_paste_masks_matches_torchvision(padding: int) -> None:
    shape = tuple(json.loads(META["paste_image"]))
    close(ops.paste_masks_in_image(T["paste.masks"], T["paste.boxes"], shape, padding),
          T[f"paste.pad{padding}.output"])
    close(ops.paste_masks_in_image(T["paste.masks"][:, 0], T["paste.boxes"], shape, padding),
          T[f"paste.pad{padding}.output"])


def test_paste_masks_outside_the_image_are_empty() -> None:
    masks = torch.rand(3, 1, 5, 5)
    boxes = torch.tensor([[70.0, 5, 80, 20], [-20.0, 5, -10, 20], [5.0, -30, 20, -10]])
    assert torch.equal(ops.paste_masks_in_image(masks, boxes, (40, 64)), torch.zeros(3, 1, 40, 64))
    assert ops.paste_masks_in_image(masks[:0], boxes[:0], (40, 64)).shape == (0, 1, 40, 64)


# ------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("call, message", [
    (lambda: ops.roi_align(torch.zeros(1, 2, 4, 4), torch.zeros(3, 4), 2), r"\(K, 5\) RoIs"),
    (lambda: ops.roi_align(torch.zeros(1, 2, 4, 4), [torch.zeros(3, 5)], 2), r"boxes\[0\] must be .*\(K, 4\)"),
    (lambda: ops.roi_align(torch.zeros(2, 4, 4), torch.zeros(3, 5), 2), r"\(N, C, H, W\)"),
    (lambda: ops.roi_align(torch.zeros(1, 2, 4, 4), torch.tensor([[1.0, 0, 0, 2, 2]]), 2), r"batch indices"),
    (lambda: ops.roi_align(torch.zeros(1, 2, 4, 4), torch.zeros(3, 5), (2, 0)), r"output_size"),
    (lambda: ops.nms(torch.zeros(3, 5), torch.zeros(3), 0.5), r"\(K, 4\) boxes"),
    (lambda: ops.nms(torch.zeros(3, 4), torch.zeros(2), 0.5), r"scores must be a \(3,\)"),
    (lambda: ops.batched_nms(torch.zeros(3, 4), torch.zeros(3), torch.zeros(2), 0.5), r"idxs must be"),
    (lambda: ops.multiscale_roi_align([torch.zeros(2, 2, 8, 8)], [torch.zeros(1, 4)], (32, 32), 2), r"one box"),
    (lambda: ops.multiscale_roi_align([], [torch.zeros(1, 4)], (32, 32), 2), r"non-empty list"),
    (lambda: ops.map_levels(torch.zeros(3, 5), 2, 5), r"\(K, 4\) boxes"),
    (lambda: ops.paste_masks_in_image(torch.zeros(2, 2, 5, 5), torch.zeros(2, 4), (8, 8)), r"\(K, 1, M, M\)"),
    (lambda: ops.paste_masks_in_image(torch.zeros(2, 5, 5), torch.zeros(3, 4), (8, 8)), r"one box per mask"),
])
def test_bad_shapes_raise_clear_errors(call, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()
