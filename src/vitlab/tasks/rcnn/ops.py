"""Detection ops for Mask R-CNN in pure PyTorch, with torchvision's semantics.

Each function reproduces its ``torchvision`` counterpart (the CPU kernels of torchvision 0.29)
to float rounding, and is checked against golden outputs in ``tests/fixtures/torchvision_roi_ops.safetensors``:

- :func:`roi_align` = ``torchvision.ops.roi_align`` (bilinear sampling, adaptive sample counts);
- :func:`nms`, :func:`batched_nms` = ``torchvision.ops.nms`` / ``batched_nms`` (same kept indices,
  ties included: equal scores are visited in index order, torchvision's stable sort);
- :func:`map_levels`, :func:`feature_scales`, :func:`multiscale_roi_align` =
  ``torchvision.ops.MultiScaleRoIAlign`` (FPN level mapper, scales inferred from the map sizes);
- :func:`paste_masks_in_image` = ``torchvision.models.detection.roi_heads.paste_masks_in_image``.

Everything is vectorised over RoIs and boxes and differentiable through autograd; the backward of
:func:`roi_align` is deterministic on CPU (an ``embedding_bag`` sum whose gradient is accumulated in
a fixed order), unlike a scatter with atomics.

Boxes are ``(x0, y0, x1, y1)`` in pixels. RoIs are ``(K, 5)`` rows ``(batch_index, x0, y0, x1, y1)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["batched_nms", "boxes_to_rois", "feature_scales", "map_levels", "multiscale_roi_align", "nms",
           "paste_masks_in_image", "roi_align"]



# ------------------------------------------------------------------------------------- input checks
def _check_boxes(boxes: object, name: str, width: int = 4) -> Tensor:
    if not isinstance(boxes, Tensor) or boxes.dim() != 2 or boxes.shape[1] != width:
        got = tuple(boxes.shape) if isinstance(boxes, Tensor) else type(boxes).__name__
        what = "(K, 4) boxes (x0, y0, x1, y1)" if width == 4 else "(K, 5) RoIs (batch_index, x0, y0, x1, y1)"
        raise ValueError(f"{name} must be a tensor of {what}; got {got}")
    if not boxes.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor; got {boxes.dtype}")
    return boxes


def _check_map(x: object, name: str) -> Tensor:
    if not isinstance(x, Tensor) or x.dim() != 4:
        got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{name} must be a (N, C, H, W) feature map tensor; got {got}")
    return x


def _pair(size: int | Sequence[int], name: str = "output_size") -> tuple[int, int]:
    pair = (size, size) if isinstance(size, int) else tuple(size)
    if len(pair) != 2 or not all(isinstance(s, int) and s > 0 for s in pair):
        raise ValueError(f"{name} must be a positive int or a (height, width) pair of positive ints; got {size!r}")
    return pair[0], pair[1]  # type: ignore[return-value]


def boxes_to_rois(boxes: Sequence[Tensor]) -> Tensor:
    """Per-image box lists -> one ``(sum K_i, 5)`` RoI tensor ``(batch_index, x0, y0, x1, y1)``.

    Args:
        boxes: One ``(K_i, 4)`` floating tensor per image, ``i`` being its batch index.

    Returns:
        The RoIs, images in order, in the boxes' dtype.

    Raises:
        ValueError: If ``boxes`` is not a non-empty list of ``(K_i, 4)`` floating tensors.
    """
    if isinstance(boxes, Tensor) or not isinstance(boxes, Sequence) or len(boxes) == 0:
        raise ValueError("boxes must be a non-empty list of (K_i, 4) tensors, one per image")
    checked = [_check_boxes(b, f"boxes[{i}]") for i, b in enumerate(boxes)]
    ids = [torch.full_like(b[:, :1], i) for i, b in enumerate(checked)]  # (K_i, 1) each
    return torch.cat([torch.cat(ids, 0), torch.cat(checked, 0)], dim=1)  # (sum K_i, 5)


# ------------------------------------------------------------------------------------------ RoI Align
def _axis_samples(start: Tensor, bin_size: Tensor, grid: int, pooled: int, size: int) -> tuple[Tensor, Tensor]:
    """Sample positions along one axis and their bilinear taps, with torchvision's border rules.

    A sample at ``c < -1`` or ``c > size`` (or NaN) contributes nothing; otherwise ``c`` is clamped
    to ``[0, size - 1]`` and read from the two neighbouring pixels ``floor(c)`` and ``floor(c) + 1``.

    Returns:
        ``index`` (K, pooled, grid, 2) int64 pixel rows (or columns) and ``weight`` (K, pooled, grid, 2).
    """
    dtype, device = start.dtype, start.device
    p = torch.arange(pooled, device=device, dtype=dtype)
    i = torch.arange(grid, device=device, dtype=dtype) + 0.5
    # Same order of float operations as the kernel: start + p * bin + (i + .5) * bin / grid.
    coord = (start[:, None, None] + p[None, :, None] * bin_size[:, None, None]
             + i[None, None, :] * bin_size[:, None, None] / grid)  # (K, pooled, grid)
    valid = (coord >= -1.0) & (coord <= size)
    coord = torch.where(valid, coord, torch.zeros_like(coord)).clamp(min=0.0)
    low = coord.to(torch.int64)  # coord >= 0: truncation is floor
    at_end = low >= size - 1
    low = torch.where(at_end, torch.full_like(low, size - 1), low)
    high = torch.where(at_end, low, low + 1)
    coord = torch.where(at_end, low.to(dtype), coord)
    frac = coord - low.to(dtype)
    weight = torch.stack((1.0 - frac, frac), dim=-1) * valid[..., None].to(dtype)  # (K, pooled, grid, 2)
    return torch.stack((low, high), dim=-1), weight


def _pool_group(flat: Tensor, base: Tensor, starts: tuple[Tensor, Tensor], bins: tuple[Tensor, Tensor],
                grid: tuple[int, int], pooled: tuple[int, int], hw: tuple[int, int]) -> Tensor:
    """RoI Align of RoIs sharing one ``(grid_h, grid_w)`` sample count: (K, ph * pw, C) sums."""
    (gh, gw), (ph, pw), (height, width) = grid, pooled, hw
    k = base.shape[0]
    ys, wys = _axis_samples(starts[0], bins[0], gh, ph, height)  # (K, ph, gh, 2)
    xs, wxs = _axis_samples(starts[1], bins[1], gw, pw, width)  # (K, pw, gw, 2)
    # Every (bin, sample, tap) as (K, ph, pw, gh, gw, 2, 2), then one bag per output bin.
    index = (base[:, None, None, None, None, None, None] + ys[:, :, None, :, None, :, None] * width
             + xs[:, None, :, None, :, None, :])
    weight = wys[:, :, None, :, None, :, None] * wxs[:, None, :, None, :, None, :]
    index = index.reshape(k * ph * pw, gh * gw * 4)  # (K, ph, pw, gh, gw, 2, 2) -> (K*ph*pw, taps)
    weight = weight.reshape(k * ph * pw, gh * gw * 4)
    out = F.embedding_bag(index, flat, per_sample_weights=weight, mode="sum")  # (K*ph*pw, C)
    return out.reshape(k, ph * pw, flat.shape[1])  # (K*ph*pw, C) -> (K, ph*pw, C)


def roi_align(input: Tensor, boxes: Tensor | Sequence[Tensor], output_size: int | Sequence[int],
              spatial_scale: float = 1.0, sampling_ratio: int = -1, aligned: bool = False) -> Tensor:
    """RoI Align (Mask R-CNN): average of bilinear samples in each bin, as ``torchvision.ops.roi_align``.

    Each RoI is scaled by ``spatial_scale`` (and shifted by -0.5 pixel if ``aligned``), split into
    ``output_size`` bins, and each bin averages ``grid_h x grid_w`` bilinear samples placed at the
    centres of a regular sub-grid. A sample above / left of -1 or below / right of the map's size
    counts as 0; others are clamped into the map. With ``aligned=False`` a RoI is at least 1x1.

    Args:
        input: Feature maps (N, C, H, W).
        boxes: RoIs (K, 5) ``(batch_index, x0, y0, x1, y1)``, or one (K_i, 4) tensor per image.
        output_size: Bins ``(oh, ow)`` (an int for a square).
        spatial_scale: Box coordinates -> map coordinates (1 / the map's stride).
        sampling_ratio: Samples per bin along each axis; ``<= 0``: ``ceil(roi_h / oh)`` by
            ``ceil(roi_w / ow)``, per RoI (RoIs are grouped by count, one vectorised pass each).
        aligned: Shift boxes by -0.5 pixel (Detectron2); ``False`` is the legacy behaviour.

    Returns:
        Pooled features (K, C, oh, ow) in the input's dtype; a RoI with no samples is 0. Differentiable
        w.r.t. ``input`` only (deterministically on CPU); the boxes get no gradient, as in torchvision.

    Raises:
        ValueError: On a wrong shape, a non-positive output size or a batch index outside ``[0, N)``.
    """
    input = _check_map(input, "input")
    if isinstance(boxes, Tensor):
        rois = _check_boxes(boxes, "boxes", width=5)
    else:
        rois = boxes_to_rois(boxes)
    ph, pw = _pair(output_size)
    n, c, height, width = input.shape
    rois = rois.detach().to(device=input.device, dtype=input.dtype)  # no gradient w.r.t. boxes, as torchvision
    k = rois.shape[0]
    flat = input.permute(0, 2, 3, 1).reshape(n * height * width, c)  # (N, C, H, W) -> (N*H*W, C)
    if k == 0:  # still an autograd output of the input
        return flat[:0].reshape(0, ph, pw, c).permute(0, 3, 1, 2)  # (0, C) -> (0, C, ph, pw)
    batch = rois[:, 0].to(torch.int64)  # the kernel truncates the index to int
    if int(batch.min()) < 0 or int(batch.max()) >= n:
        raise ValueError(f"boxes hold batch indices in [{int(batch.min())}, {int(batch.max())}]; "
                         f"expected values in [0, {n - 1}] for an input of {n} image(s)")
    offset = 0.5 if aligned else 0.0
    start_w = rois[:, 1] * spatial_scale - offset
    start_h = rois[:, 2] * spatial_scale - offset
    roi_w = (rois[:, 3] * spatial_scale - offset) - start_w
    roi_h = (rois[:, 4] * spatial_scale - offset) - start_h
    if not aligned:  # legacy: malformed RoIs become 1x1
        roi_w, roi_h = roi_w.clamp(min=1.0), roi_h.clamp(min=1.0)
    bin_h, bin_w = roi_h / ph, roi_w / pw
    if sampling_ratio > 0:
        grid = torch.full((k, 2), sampling_ratio, dtype=torch.int64, device=input.device)
    else:
        grid = torch.stack((torch.ceil(roi_h / ph), torch.ceil(roi_w / pw)), 1).to(torch.int64)  # (K, 2)

    base = batch * (height * width)
    pieces, order = [], []
    groups = grid[:1] if sampling_ratio > 0 else torch.unique(grid, dim=0)
    for gh, gw in groups.tolist():
        sel = torch.nonzero((grid[:, 0] == gh) & (grid[:, 1] == gw)).squeeze(1)
        if gh <= 0 or gw <= 0:  # an empty sample grid (aligned, degenerate RoI): zeros
            pieces.append(flat.new_zeros(sel.shape[0], ph * pw, c))
        else:
            sums = _pool_group(flat, base[sel], (start_h[sel], start_w[sel]), (bin_h[sel], bin_w[sel]),
                               (gh, gw), (ph, pw), (height, width))
            pieces.append(sums / float(gh * gw))
        order.append(sel)
    out = pieces[0] if len(pieces) == 1 else torch.cat(pieces)[torch.argsort(torch.cat(order))]
    return out.reshape(k, ph, pw, c).permute(0, 3, 1, 2).contiguous()  # (K, ph*pw, C) -> (K, C, ph, pw)


# ------------------------------------------------------------------------------------------------ NMS
def _suppression_matrix(boxes: Tensor, iou_threshold: float, chunk: int = 1024) -> Tensor:
    """``iou(i, j) > iou_threshold`` (K, K) bool, as the kernel computes it (IoU in the boxes' dtype)."""
    # The kernel compares the float IoU with the double threshold: the same as comparing with the
    # largest float not above it.
    limit = torch.tensor(iou_threshold, dtype=boxes.dtype, device=boxes.device)
    if limit.double().item() > iou_threshold:
        limit = torch.nextafter(limit, torch.tensor(-math.inf, dtype=boxes.dtype, device=boxes.device))
    x1, y1, x2, y2 = boxes.t().contiguous()  # contiguous columns: broadcasting strided ones is slow
    areas = (x2 - x1) * (y2 - y1)
    rows = []
    for s in range(0, boxes.shape[0], chunk):  # bounded memory for many boxes
        e = s + chunk
        # (chunk, K) overlaps; clamp with tensor bounds is max / min, and much faster than broadcasting them
        w = (x2[None].clamp(max=x2[s:e, None]) - x1[None].clamp(min=x1[s:e, None])).clamp_(min=0)
        h = (y2[None].clamp(max=y2[s:e, None]) - y1[None].clamp(min=y1[s:e, None])).clamp_(min=0)
        inter = w.mul_(h)
        rows.append(inter / (areas[s:e, None] + areas[None] - inter) > limit)
    return torch.cat(rows)


def _greedy(suppress: Tensor) -> Tensor:
    """Positions kept by greedy NMS over boxes already sorted by score, given ``suppress`` (K, K)."""
    table = suppress.cpu().numpy()
    removed = table[0] & False
    kept = []
    for i in range(table.shape[0]):
        if not removed[i]:
            kept.append(i)
            removed |= table[i]
    return torch.tensor(kept, dtype=torch.int64, device=suppress.device)


def _check_nms(boxes: Tensor, scores: Tensor, idxs: Tensor | None = None) -> None:
    _check_boxes(boxes, "boxes")
    if not isinstance(scores, Tensor) or scores.shape != (boxes.shape[0],):
        got = tuple(scores.shape) if isinstance(scores, Tensor) else type(scores).__name__
        raise ValueError(f"scores must be a ({boxes.shape[0]},) tensor, one per box; got {got}")
    if idxs is not None and (not isinstance(idxs, Tensor) or idxs.shape != (boxes.shape[0],)):
        got = tuple(idxs.shape) if isinstance(idxs, Tensor) else type(idxs).__name__
        raise ValueError(f"idxs must be a ({boxes.shape[0]},) tensor of category ids, one per box; got {got}")


def nms(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    """Greedy non-maximum suppression, as ``torchvision.ops.nms``.

    Boxes are visited by decreasing score; each kept box removes the later ones whose IoU with it
    is strictly greater than ``iou_threshold`` (the IoU in the boxes' dtype, compared in double). Equal scores keep
    their index order (a stable descending sort, as torchvision's kernel). A zero-area box has
    IoU 0 (or NaN) with everything: it is always kept and suppresses nothing.

    Args:
        boxes: (K, 4) ``x0, y0, x1, y1``.
        scores: (K,) scores.
        iou_threshold: Boxes with IoU above it are suppressed.

    Returns:
        int64 (k,) indices of the kept boxes, by decreasing score.

    Raises:
        ValueError: If ``boxes`` is not (K, 4) or ``scores`` not (K,).
    """
    _check_nms(boxes, scores)
    if boxes.shape[0] == 0:
        return torch.empty(0, dtype=torch.int64, device=boxes.device)
    order = torch.sort(scores, dim=0, descending=True, stable=True)[1]
    return order[_greedy(_suppression_matrix(boxes[order], iou_threshold))]


def batched_nms(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float) -> Tensor:
    """NMS within each category, as ``torchvision.ops.batched_nms``.

    Like torchvision: up to 1000 boxes (4000 coordinates; 100,000 off the CPU), one NMS over boxes
    shifted apart per category (``idx * (max coordinate + 1)``); above, one NMS per category and the
    kept indices sorted by score (torch's default, unstable, descending sort, as torchvision).

    Args:
        boxes: (K, 4) ``x0, y0, x1, y1``.
        scores: (K,) scores.
        idxs: (K,) integer category of each box; boxes of different categories never suppress each other.
        iou_threshold: Boxes with IoU above it are suppressed.

    Returns:
        int64 (k,) indices of the kept boxes, by decreasing score.

    Raises:
        ValueError: If the shapes do not agree.
    """
    _check_nms(boxes, scores, idxs)
    if boxes.numel() == 0:
        return torch.empty(0, dtype=torch.int64, device=boxes.device)
    # torchvision's switch from the coordinate offset trick to one NMS per class
    if boxes.numel() <= (4000 if boxes.device.type == "cpu" else 100_000):
        offsets = idxs.to(boxes) * (boxes.max() + torch.tensor(1).to(boxes))  # (K,)
        return nms(boxes + offsets[:, None], scores, iou_threshold)
    keep = torch.zeros_like(scores, dtype=torch.bool)
    for category in torch.unique(idxs):
        members = torch.nonzero(idxs == category).squeeze(1)
        keep[members[nms(boxes[members], scores[members], iou_threshold)]] = True
    kept = torch.nonzero(keep).squeeze(1)
    return kept[torch.sort(scores[kept], descending=True)[1]]


# ------------------------------------------------------------------------------- multi-scale RoI Align
def _image_hw(image_size: Sequence[int] | Sequence[Sequence[int]]) -> tuple[int, int]:
    sizes = [image_size] if len(image_size) and isinstance(image_size[0], int) else list(image_size)
    if not sizes or not all(len(s) == 2 and all(isinstance(v, int) and v > 0 for v in s) for s in sizes):
        raise ValueError(f"image_size must be (height, width) or a list of them; got {image_size!r}")
    return max(s[0] for s in sizes), max(s[1] for s in sizes)  # type: ignore[index]


def feature_scales(features: Sequence[Tensor], image_size: Sequence[int] | Sequence[Sequence[int]]) -> list[float]:
    """Each map's scale ``2 ** round(log2(map_height / image_height))``, as MultiScaleRoIAlign infers it.

    Args:
        features: Maps (N, C, H_l, W_l), finest first.
        image_size: ``(height, width)`` of the (unpadded) input, or one per image (the maximum is used).

    Returns:
        One power-of-two scale per map (e.g. 0.25 for a stride-4 map).
    """
    height = _image_hw(image_size)[0]
    scales = []
    for f in features:
        approx = float(f.shape[-2]) / float(height)
        scales.append(2 ** float(torch.tensor(approx).log2().round()))  # float32 log2, half-to-even round
    return scales


def map_levels(boxes: Tensor | Sequence[Tensor], k_min: int, k_max: int, canonical_scale: int = 224,
               canonical_level: int = 4, eps: float = 1e-6) -> Tensor:
    """FPN level of each box, ``floor(canonical_level + log2(sqrt(area) / canonical_scale) + eps)``.

    The level is clamped to ``[k_min, k_max]`` and returned relative to ``k_min`` (0 = the finest
    map), as torchvision's ``LevelMapper``.

    Args:
        boxes: (K, 4) boxes in image pixels, or a list of them (concatenated).
        k_min: Level of the finest map (log2 of its stride, e.g. 2 for stride 4).
        k_max: Level of the coarsest map.
        canonical_scale: Box size (sqrt of its area) mapped to ``canonical_level``.
        canonical_level: Level of a ``canonical_scale``-sized box.
        eps: Added before the floor.

    Returns:
        int64 (K,) level indices in ``[0, k_max - k_min]``.
    """
    if not isinstance(boxes, Tensor):
        boxes = torch.cat([_check_boxes(b, f"boxes[{i}]") for i, b in enumerate(boxes)])
    boxes = _check_boxes(boxes, "boxes")
    size = torch.sqrt((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))
    level = torch.floor(canonical_level + torch.log2(size / canonical_scale) + torch.tensor(eps, dtype=size.dtype))
    level = torch.clamp(level, min=k_min, max=k_max)
    return level.to(torch.int64) - k_min


def multiscale_roi_align(features: Sequence[Tensor], boxes: Sequence[Tensor],
                         image_size: Sequence[int] | Sequence[Sequence[int]], output_size: int | Sequence[int],
                         sampling_ratio: int = 2, canonical_scale: int = 224, canonical_level: int = 4) -> Tensor:
    """RoI Align from a feature pyramid, each box from its FPN level, as ``torchvision.ops.MultiScaleRoIAlign``.

    The scales come from the maps' sizes (:func:`feature_scales`), the levels from the box sizes
    (:func:`map_levels` with ``k_min, k_max = -log2`` of the first and last scale); each level is
    pooled with :func:`roi_align` (``aligned=False``). A single map pools every box from it.

    Args:
        features: Maps (N, C, H_l, W_l), finest first (e.g. strides 4, 8, 16, 32), same C.
        boxes: One (K_i, 4) tensor per image, in image pixels.
        image_size: ``(height, width)`` of the input images, or one per image (the maximum is used).
        output_size: Bins ``(oh, ow)``.
        sampling_ratio: Samples per bin per axis (``<= 0``: adaptive), see :func:`roi_align`.
        canonical_scale: See :func:`map_levels`.
        canonical_level: See :func:`map_levels`.

    Returns:
        Pooled features (sum K_i, C, oh, ow), images in order.

    Raises:
        ValueError: On empty / inconsistent features, or a box list that does not match the batch.
    """
    if isinstance(features, Tensor) or not isinstance(features, Sequence) or len(features) == 0:
        raise ValueError("features must be a non-empty list of (N, C, H, W) maps, finest first")
    maps = [_check_map(f, f"features[{i}]") for i, f in enumerate(features)]
    if any(f.shape[:2] != maps[0].shape[:2] for f in maps):
        raise ValueError(f"every feature map must share N and C; got shapes {[tuple(f.shape) for f in maps]}")
    rois = boxes_to_rois(boxes)
    if len(boxes) != maps[0].shape[0]:
        raise ValueError(f"expected one box tensor per image ({maps[0].shape[0]}); got {len(boxes)}")
    oh, ow = _pair(output_size)
    scales = feature_scales(maps, image_size)
    if len(maps) == 1:
        return roi_align(maps[0], rois, (oh, ow), scales[0], sampling_ratio)
    k_min = int(-torch.log2(torch.tensor(scales[0], dtype=torch.float32)).item())
    k_max = int(-torch.log2(torch.tensor(scales[-1], dtype=torch.float32)).item())
    levels = map_levels(rois[:, 1:], k_min, k_max, canonical_scale, canonical_level)
    result = maps[0].new_zeros(rois.shape[0], maps[0].shape[1], oh, ow)
    for level, (f, scale) in enumerate(zip(maps, scales)):
        members = torch.nonzero(levels == level).squeeze(1)
        if members.numel():
            result[members] = roi_align(f, rois[members], (oh, ow), scale, sampling_ratio).to(result.dtype)
    return result


# ------------------------------------------------------------------------------------ mask pasting
def _paste_matrix(src_size: int, start: Tensor, stop: Tensor, limit: int, dtype: torch.dtype) -> Tensor:
    """Resize ``src_size`` mask rows bilinearly (align_corners=False) to each box and place them in the image.

    A box covers image rows ``[start, stop)`` (``stop - start`` resized rows, at least 1); image row
    ``t`` (``0 <= t < limit``) takes resized row ``t - start`` if the box covers it, else nothing
    (the paste is clipped to the image). The same for columns.

    Returns:
        (K, limit, src_size) interpolation matrices (two taps per covered row).
    """
    device = start.device
    dst = (stop - start).clamp(min=1)  # (K,) resized size, as torchvision's max(size, 1)
    t = torch.arange(limit, device=device)
    r = t[None, :] - start[:, None]  # (K, limit) row inside the resized mask
    covered = (r >= 0) & (t[None, :] < stop[:, None])
    scale = torch.tensor(float(src_size), dtype=dtype, device=device) / dst.to(dtype)  # (K,) input / output
    src = (scale[:, None] * (r.to(dtype) + 0.5) - 0.5).clamp(min=0.0)  # (K, limit) source row
    low = src.floor().to(torch.int64).clamp(max=src_size - 1)
    frac = (src - low.to(dtype)).clamp(0.0, 1.0)
    high = torch.where(low < src_size - 1, low + 1, low)
    cols = torch.arange(src_size, device=device)
    taps = ((cols == low[..., None]).to(dtype) * (1.0 - frac)[..., None]
            + (cols == high[..., None]).to(dtype) * frac[..., None])  # (K, limit, src_size)
    return taps * covered[..., None].to(dtype)


def _expand_boxes(boxes: Tensor, scale: float) -> Tensor:
    """Grow boxes about their centres by ``scale`` (torchvision's float operations, in order)."""
    w_half = (boxes[:, 2] - boxes[:, 0]) * 0.5 * scale
    h_half = (boxes[:, 3] - boxes[:, 1]) * 0.5 * scale
    x_c = (boxes[:, 2] + boxes[:, 0]) * 0.5
    y_c = (boxes[:, 3] + boxes[:, 1]) * 0.5
    return torch.stack((x_c - w_half, y_c - h_half, x_c + w_half, y_c + h_half), dim=1)


def paste_masks_in_image(masks: Tensor, boxes: Tensor, image_shape: Sequence[int], padding: int = 1) -> Tensor:
    """Paste per-box mask probabilities into full images, as torchvision's ``paste_masks_in_image``.

    Each (M, M) mask is padded by ``padding`` zeros and its box grown by ``(M + 2p) / M`` about its
    centre, then truncated to integers; the padded mask is resized bilinearly (align_corners=False) to
    the box's ``(y1 - y0 + 1, x1 - x0 + 1)`` pixels and pasted at ``(y0, x0)``, clipped to the image.
    All boxes at once: each paste is ``rows @ mask @ cols^T`` with two-tap interpolation matrices.
    A box entirely outside the image gives an empty mask (torchvision raises a shape error there).

    Args:
        masks: (K, 1, M, M) or (K, M, M) probabilities (or logits: the paste is linear).
        boxes: (K, 4) ``x0, y0, x1, y1`` in image pixels.
        image_shape: ``(height, width)`` of the image.
        padding: Zero border added to each mask before resizing.

    Returns:
        (K, 1, height, width) pasted masks, in the masks' dtype.

    Raises:
        ValueError: On mismatched or wrongly shaped masks / boxes.
    """
    if not isinstance(masks, Tensor) or masks.dim() not in (3, 4) or (masks.dim() == 4 and masks.shape[1] != 1):
        got = tuple(masks.shape) if isinstance(masks, Tensor) else type(masks).__name__
        raise ValueError(f"masks must be (K, 1, M, M) or (K, M, M); got {got}")
    boxes = _check_boxes(boxes, "boxes")
    if boxes.shape[0] != masks.shape[0]:
        raise ValueError(f"expected one box per mask; got {boxes.shape[0]} boxes for {masks.shape[0]} masks")
    im_h, im_w = _pair(tuple(image_shape), "image_shape")
    if padding < 0:
        raise ValueError(f"padding must be >= 0; got {padding}")
    masks = masks.reshape(masks.shape[0], masks.shape[-2], masks.shape[-1])  # (K, 1, M, M) -> (K, M, M)
    k, m = masks.shape[0], masks.shape[-1]
    if k == 0:
        return masks.new_empty((0, 1, im_h, im_w))
    padded = F.pad(masks, (padding,) * 4)  # (K, M + 2p, M + 2p)
    ib = _expand_boxes(boxes, float(m + 2 * padding) / m).to(torch.int64)  # truncation, as torchvision
    x0, y0, x1, y1 = ib.unbind(1)
    dtype = padded.dtype if padded.is_floating_point() else torch.float32
    rows = _paste_matrix(padded.shape[-2], y0, y1 + 1, im_h, dtype)  # (K, H, Mp)
    cols = _paste_matrix(padded.shape[-1], x0, x1 + 1, im_w, dtype)  # (K, W, Mp)
    pasted = rows @ padded.to(dtype) @ cols.transpose(1, 2)  # (K, H, Mp) @ (K, Mp, Mp) @ (K, Mp, W) -> (K, H, W)
    return pasted[:, None]  # (K, H, W) -> (K, 1, H, W)
