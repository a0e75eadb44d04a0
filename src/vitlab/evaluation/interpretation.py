"""Explanations of a prediction, for every vitlab family.

* :func:`attention_rollout` (Abnar & Zuidema, 2020): residual added, rows renormalised, heads
  fused (mean / max / min), the lowest attentions discarded; :func:`rollout` runs it on a model
  through all its layers, stages and branches (see :mod:`vitlab.evaluation.layouts`). The
  rollout algebra itself lives in :mod:`vitlab.evaluation.rollout_math`.
* :func:`gradient_rollout`: the same product over ``relu(attention * gradient)`` of the
  target class score, averaged over heads (class-specific, as in Chefer et al., 2021).
* :func:`grad_cam` (Selvaraju et al., 2017) on any block's patch tokens, reshaped to the real
  token grid with prefix tokens excluded; Swin / PVT / CNN on stage outputs.
* :func:`occlusion` (Zeiler & Fergus, 2014): a patch masked at a time, batched; the map is the
  drop of the target score. The default grid has at most 16 x 16 cells whatever the backbone. :func:`saliency` (Simonyan et al., 2014): input gradients.
* :func:`pca_features` and :func:`feature_maps`: what ``forward_intermediates`` returns, as
  RGB (first three principal components of the patch tokens) or channel-norm heat maps.
* :func:`spearman_correlation`: rank correlation with average ranks for ties, for sanity
  checks (Adebayo et al., 2018: maps must change when the weights are re-randomised).

Every method takes a prepared batch (see :func:`prepare_image`) and returns an
:class:`Explanation` whose ``maps`` are (B, H, W) in input-image pixels.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import sys
from dataclasses import dataclass, field
from typing import Any, Iterator, Literal, Sequence

import torch
from torch import Tensor, nn

from ..components import capture_attention
from ..components.tome_explain import tracing_sources
from ..datasets.transforms import EvalTransform, ImageLike
from .layouts import (
    AttentionLayer,
    FeaturePoint,
    SegmentKey,
    TokenGrid,
    adapter_for,
    attention_layers,
    grid_to_image,
    require_attention,
    resolve_layers,
)
from .rollout_math import HeadFusion, attention_rollout, discard_lowest, fuse_heads, rollout_layers

__all__ = [
    "OCCLUSION_MAX_CELLS", "Explanation", "FeatureView", "HeadFusion", "Target", "attention_rollout",
    "capture_layers", "default_cam_layers", "default_patch_size", "discard_lowest", "eval_mode", "feature_maps",
    "feature_points", "fuse_heads", "grad_cam", "gradient_rollout", "gradient_weighted_attention", "image_notes",
    "occlusion", "pca_features", "prepare_image", "progress_bar", "resolve_targets", "rollout", "rollout_layers",
    "saliency", "spearman_correlation",
]

Target = int | Sequence[int] | Tensor | None


@dataclass
class Explanation:
    """The result of one explanation method on a batch.

    Attributes:
        method: ``rollout``, ``grad-rollout``, ``gradcam``, ``occlusion``, ``saliency``.
        maps: (B, H, W) importance in input-image pixels (not normalised).
        token_maps: The same at token resolution, per grid: description -> (B, h, w).
        targets: (B,) the classes explained (None for class-agnostic rollout).
        logits: (B, num_classes) the model's output on the batch.
        info: Method details (layers used, patch size, baseline, head fusion ...).
    """

    method: str
    maps: Tensor
    token_maps: dict[str, Tensor] = field(default_factory=dict)
    targets: Tensor | None = None
    logits: Tensor | None = None
    info: dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------- plumbing
def prepare_image(model: nn.Module, image: ImageLike | Sequence[ImageLike]) -> tuple[Tensor, Tensor]:
    """An image (path, PIL, array, tensor) -> (model input (B, C, H, W), display image (B, H, W, C) in [0, 1]).

    Paths, PIL images, arrays and uint8 tensors go through the model's own evaluation
    preprocessing (``pretrained_cfg``: resize, centre crop, normalisation). A float tensor
    (C, H, W) or (B, C, H, W) is taken as already preprocessed model input and shown
    min-max scaled.
    """
    device = next(model.parameters()).device
    channels = model.config.in_channels
    if isinstance(image, Tensor) and image.is_floating_point():
        x = image.unsqueeze(0) if image.ndim == 3 else image
        if x.ndim != 4 or x.shape[1] != channels:
            raise ValueError(f"expected an image tensor (B, {channels}, H, W) or ({channels}, H, W), "
                             f"got {tuple(image.shape)}")
        lo = x.amin(dim=(1, 2, 3), keepdim=True)
        hi = x.amax(dim=(1, 2, 3), keepdim=True)
        display = (x - lo) / (hi - lo).clamp(min=1e-8)
    else:
        transform = EvalTransform.from_config(model.pretrained_cfg, channels=channels)
        x = torch.cat([transform(t) for t in _unit_images(model, image)])
        # the transform's normalisation, undone for display (one value per model channel, as it applies it)
        mean, std = (torch.tensor(v if len(v) == channels else (sum(v) / len(v),) * channels).view(1, -1, 1, 1)
                     for v in (transform.mean, transform.std))
        display = (x * std + mean).clamp(0, 1)
    return x.to(device).float(), display.permute(0, 2, 3, 1).detach().cpu()


def _unit_images(model: nn.Module, image: ImageLike | Sequence[ImageLike]) -> list[Tensor]:
    """Checked images, each float (C, H, W) in [0, 1] (see :mod:`vitlab.tasks.inputs`)."""
    from ..tasks.inputs import background_for, to_unit_tensor

    background = background_for(model.pretrained_cfg)
    out: list[Tensor] = []
    for item in (list(image) if isinstance(image, (list, tuple)) else [image]):
        t = to_unit_tensor(item, background)
        out.extend(t.unbind(0) if t.ndim == 4 else [t])
    return out


def image_notes(model: nn.Module, image: ImageLike | Sequence[ImageLike]) -> list[str]:
    """Notes on how far the (first) image is from the model's training data; none for prepared tensors."""
    from ..tasks.inputs import input_notes

    if isinstance(image, Tensor) and image.is_floating_point():
        return []
    return input_notes(_unit_images(model, image)[0], model.pretrained_cfg, model.config.in_channels)


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Run ``model`` in eval mode (deterministic, single logits) and restore its mode after."""
    was = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was)


def resolve_targets(logits: Tensor, target: Target) -> Tensor:
    """(B,) classes to explain: the predicted ones when ``target`` is None; ValueError when out of range."""
    b, n = logits.shape
    if target is None:
        return logits.argmax(dim=1)
    t = torch.as_tensor(target, device=logits.device).long().flatten()
    if t.numel() == 1:
        t = t.expand(b)
    if t.numel() != b:
        raise ValueError(f"got {t.numel()} targets for a batch of {b} images")
    bad = t[(t < 0) | (t >= n)]
    if bad.numel():
        raise ValueError(f"target class {int(bad[0])} is out of range for a model with {n} classes (0..{n - 1})")
    return t.clone()


def _score(logits: Tensor, targets: Tensor) -> Tensor:
    return logits.gather(1, targets[:, None]).sum()


def _logits(model: nn.Module, x: Tensor) -> Tensor:
    out = model(x)
    if isinstance(out, (tuple, list)):  # a distilled model left in training mode
        out = torch.stack(list(out)).mean(0)
    return out


def capture_layers(model: nn.Module, x: Tensor) -> tuple[list[AttentionLayer], Tensor]:
    """Run ``model`` on ``x`` (eval mode, no gradients) recording attention -> (layers, logits)."""
    require_attention(model)
    with torch.no_grad(), eval_mode(model), tracing_sources(model), capture_attention(model) as cap:
        logits = _logits(model, x)
    return attention_layers(model, cap.records, x.shape[-2:]), logits


# ----------------------------------------------------------------------------- rollout
def _combine_grids(per_grid: dict[SegmentKey, tuple[TokenGrid, Tensor]], image_size: tuple[int, int],
                   interpolation: str) -> tuple[Tensor, dict[str, Tensor]]:
    """Token maps on one or more grids -> one image map (grids of different cells summed as densities)."""
    maps, tokens = [], {}
    ref = None
    for (name, stream), (grid, m) in per_grid.items():
        area = grid.cell[0] * grid.cell[1]
        ref = area if ref is None else ref
        maps.append(grid_to_image(m, grid, image_size, interpolation) * (ref / area))
        tokens[f"{name} {stream}" if len(per_grid) > 1 else name] = m
    return torch.stack(maps).sum(dim=0), tokens


def rollout(model: nn.Module, x: Tensor, head_fusion: HeadFusion = "mean", discard_ratio: float = 0.0,
            interpolation: str = "bilinear") -> Explanation:
    """Attention rollout of a vitlab transformer, read out where its classifier reads.

    The read-out is the class token (ViT, DeiT: class and distillation tokens averaged; CaiT;
    PVT v1; CrossViT: both branches' class tokens) or the mean of the last tokens
    (average-pooled models: Swin, PVT v2).

    Args:
        model: A vitlab transformer.
        x: Prepared images (B, C, H, W).
        head_fusion: ``"mean"``, ``"max"`` or ``"min"``.
        discard_ratio: Fraction of the lowest fused attentions zeroed per layer.
        interpolation: Token grid to pixels: ``"bilinear"`` or ``"nearest"``.
    """
    layers, logits = capture_layers(model, x)
    readout = adapter_for(model).readout(model)
    per_grid = rollout_layers(layers, readout, head_fusion, discard_ratio)
    maps, tokens = _combine_grids(per_grid, tuple(x.shape[-2:]), interpolation)
    return Explanation("rollout", maps, tokens, None, logits.detach(),
                       dict(head_fusion=head_fusion, discard_ratio=discard_ratio, layers=len(layers), readout=readout))


def gradient_weighted_attention(probs: Tensor, grad: Tensor | None) -> Tensor:
    """``relu(A * dS/dA)``: the attention entries that raise the target score, per head.

    Args:
        probs: Attention probabilities A, (B, heads, Nq, Nk).
        grad: The target score's gradient with respect to ``probs`` (same shape), or None
            when the layer does not reach the score (the result is then zero).

    Returns:
        (B, heads, Nq, Nk), non-negative: entries where attention and gradient disagree in
        sign are dropped, not flipped.
    """
    if grad is None:
        return torch.zeros_like(probs)
    return (probs * grad).clamp(min=0)


def gradient_rollout(model: nn.Module, x: Tensor, target: Target = None, discard_ratio: float = 0.0,
                     interpolation: str = "bilinear") -> Explanation:
    """Class-specific rollout: each layer's attention weighted by the target score's gradient.

    Per layer ``mean_heads(relu(A * dS/dA))`` replaces the fused attention; the rest is
    :func:`rollout` (residual, renormalisation, discard, read-out).
    """
    with torch.enable_grad(), eval_mode(model), tracing_sources(model), capture_attention(model, detach=False) as cap:
        logits = _logits(model, x)
        targets = resolve_targets(logits, target)
        probs = [r.probs for r in cap.records]
        grads = torch.autograd.grad(_score(logits, targets), probs, allow_unused=True)
    weighted = [dataclasses.replace(r, probs=gradient_weighted_attention(r.probs.detach(), g))
                for r, g in zip(cap.records, grads)]
    layers = attention_layers(model, weighted, x.shape[-2:])
    per_grid = rollout_layers(layers, adapter_for(model).readout(model), "mean", discard_ratio)
    maps, tokens = _combine_grids(per_grid, tuple(x.shape[-2:]), interpolation)
    return Explanation("grad-rollout", maps, tokens, targets, logits.detach(),
                       dict(discard_ratio=discard_ratio, layers=len(layers)))


# ----------------------------------------------------------------------------- Grad-CAM
def feature_points(model: nn.Module, image_size: tuple[int, int]) -> list[FeaturePoint]:
    """Where Grad-CAM / PCA can read features: blocks (ViT, DeiT, CaiT), stages (Swin, PVT, CNN),
    branch stages (CrossViT, branch-major like ``forward_intermediates``)."""
    return adapter_for(model).feature_points(model, tuple(image_size))


def default_cam_layers(model: nn.Module, points: Sequence[FeaturePoint]) -> list[int]:
    """1-based feature points Grad-CAM uses by default: per token stream, the deepest that
    reaches the head (both branches' last stage for CrossViT)."""
    deepest: dict[int, int] = {}
    for i, p in enumerate(points):
        if p.reaches_head:
            deepest[p.stream] = i + 1
    return sorted(deepest.values())


def grad_cam(model: nn.Module, x: Tensor, target: Target = None, layer: int | Sequence[int] | None = None,
             interpolation: str = "bilinear") -> Explanation:
    """Grad-CAM on the tokens of any block (or stage), on the real token grid.

    ``cam = relu(sum_c mean_hw(dS/dF_c) * F_c)`` with F the feature point's map (its tokens
    on their token grid, prefix tokens dropped). Several layers: their image maps summed.

    No hooks: the maps come from ``model.forward_intermediates`` (which keeps them on the
    forward path), the score from ``model.forward_head`` of its final features, and the
    gradients from ``torch.autograd.grad(score, maps)``.

    Args:
        model: Any vitlab model (CNNs included).
        x: Prepared images (B, C, H, W).
        target: Class(es) to explain; the prediction when None.
        layer: 1-based feature point(s) (see :func:`feature_points`); by default the deepest
            whose patch tokens reach the classifier (block L-1 of a class-token ViT: block
            L's patch tokens never reach its head).
        interpolation: Token grid to pixels.

    Raises:
        ValueError: A layer out of range, or one whose patch tokens never reach the classifier.
    """
    image_size = tuple(x.shape[-2:])
    points = feature_points(model, image_size)
    chosen = resolve_layers(layer, len(points), "feature layers (blocks or stages)") if layer is not None \
        else [k - 1 for k in default_cam_layers(model, points)]
    for j in chosen:
        if not points[j].reaches_head:
            ok = [i + 1 for i, p in enumerate(points) if p.reaches_head]
            raise ValueError(
                f"Grad-CAM on {points[j].label} is zero: its patch tokens never reach the classifier, which reads "
                f"the class token; choose a layer in {ok[0]}..{ok[-1]}"
            )
    indices = sorted(set(chosen))
    with torch.enable_grad(), eval_mode(model):
        final, feats = model.forward_intermediates(x, indices=indices)  # maps (B, C, h, w) on the forward path
        out = model.forward_head(final)
        logits = torch.stack(list(out)).mean(0) if isinstance(out, (tuple, list)) else out
        targets = resolve_targets(logits, target)
        grads = torch.autograd.grad(_score(logits, targets), feats)
    by_index = {i: (f.detach(), g) for i, f, g in zip(indices, feats, grads)}
    maps, tokens = [], {}
    for j in chosen:
        fmap, gmap = by_index[j]
        grid = TokenGrid(tuple(fmap.shape[-2:]), points[j].cell)
        weights = gmap.mean(dim=(2, 3), keepdim=True)  # (B, C, 1, 1)
        cam = (weights * fmap).sum(dim=1).clamp(min=0)  # (B, h, w)
        tokens[points[j].label] = cam
        maps.append(grid_to_image(cam, grid, image_size, interpolation))
    return Explanation("gradcam", torch.stack(maps).sum(0), tokens, targets, logits.detach(),
                       dict(layers=[j + 1 for j in chosen], labels=[points[j].label for j in chosen]))


# ----------------------------------------------------------------------------- perturbation
def progress_bar(items: Sequence[Any], desc: str, enabled: bool = True) -> Any:
    """``items`` wrapped in a tqdm bar on stderr (the plain sequence when disabled or without tqdm)."""
    if not enabled:
        return items
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm comes with the training extra
        return items
    return tqdm(items, desc=desc, file=sys.stderr, leave=False, dynamic_ncols=True)



#: Occlusion's default grid has at most this many cells per side (at most 256 masks).
OCCLUSION_MAX_CELLS = 16


def default_patch_size(model: nn.Module, image_size: tuple[int, int]) -> int:
    """The occlusion patch: the smallest multiple of the model's finest token cell (its patch
    size; 1 pixel for a model without ``feature_info``) that covers the image in at most
    :data:`OCCLUSION_MAX_CELLS` cells per side, i.e. at most 256 masked forward passes whatever
    the backbone (Swin's 4-pixel patches at 224: 16-pixel cells, 14 x 14 = 196 masks)."""
    reduction = int(round(model.feature_info[0]["reduction"])) if hasattr(model, "feature_info") else 1
    cell = max(reduction, 1)
    return cell * math.ceil(max(image_size) / (OCCLUSION_MAX_CELLS * cell))


def occlusion(model: nn.Module, x: Tensor, target: Target = None, patch_size: int | None = None,
              stride: int | None = None, baseline: float | str = 0.0, batch_size: int = 64,
              progress: bool = False) -> Explanation:
    """Occlusion sensitivity: the drop of the target score when one patch at a time is masked.

    Args:
        model: Any classifier returning logits.
        x: Prepared images (B, C, H, W).
        target: Class(es) to explain; the prediction when None.
        patch_size: Side of the masked square; by default :func:`default_patch_size` (at most
            16 x 16 cells, a multiple of the model's patch size).
        stride: Step between masks; ``patch_size`` by default. Overlapping masks are averaged.
        baseline: Value written into the mask (in model-input units): a number (0: the
            normalisation mean), ``"min"`` (each image's minimum: blank for dark-background
            data) or ``"mean"`` (each image's channel means).
        batch_size: Masked images per forward pass.
        progress: Show a progress bar (tqdm, on stderr) over the masked batches.

    Returns:
        An :class:`Explanation`; ``token_maps["occlusion"]`` holds the drops (B, rows, cols).
    """
    b, c, h, w = x.shape
    p = patch_size or default_patch_size(model, (h, w))
    s = stride or p
    if p < 1 or s < 1 or batch_size < 1:
        raise ValueError(f"patch_size, stride and batch_size must be positive, got {p}, {s}, {batch_size}")
    ys = torch.arange(0, max(h - p, 0) + 1, s, device=x.device)
    xs = torch.arange(0, max(w - p, 0) + 1, s, device=x.device)
    if ys[-1] + p < h:  # cover the last rows / columns too
        ys = torch.cat([ys, ys.new_tensor([h - p])])
    if xs[-1] + p < w:
        xs = torch.cat([xs, xs.new_tensor([w - p])])
    y0, x0 = torch.meshgrid(ys, xs, indexing="ij")
    y0, x0 = y0.flatten(), x0.flatten()  # (M,)
    ry, rx = torch.arange(h, device=x.device)[None], torch.arange(w, device=x.device)[None]
    rows = (ry >= y0[:, None]) & (ry < y0[:, None] + p)  # (M, H)
    cols = (rx >= x0[:, None]) & (rx < x0[:, None] + p)  # (M, W)
    masks = (rows[:, :, None] & cols[:, None, :]).float()  # (M, H, W)
    counts = masks.sum(dim=0).clamp(min=1)
    if isinstance(baseline, str):
        if baseline not in ("min", "mean"):
            raise ValueError(f"baseline must be a number, 'min' or 'mean', got {baseline!r}")
        fills = x.amin(dim=(2, 3)) if baseline == "min" else x.mean(dim=(2, 3))  # (B, C)
    else:
        fills = torch.full((b, c), float(baseline), device=x.device)
    n_masks = masks.shape[0]
    with torch.no_grad(), eval_mode(model):
        logits = _logits(model, x)
        targets = resolve_targets(logits, target)
        base = logits.gather(1, targets[:, None])[:, 0]
        drops = torch.empty(b * n_masks, device=x.device)  # (image, mask) pairs, mask fastest
        for start in progress_bar(range(0, b * n_masks, batch_size), f"occlusion ({n_masks} masks)", progress):
            pair = torch.arange(start, min(start + batch_size, b * n_masks), device=x.device)
            img, m = pair // n_masks, masks[pair % n_masks][:, None]  # m: (n, 1, H, W)
            batch = x[img] * (1 - m) + fills[img][:, :, None, None] * m
            scores = _logits(model, batch).gather(1, targets[img][:, None])[:, 0]
            drops[pair] = base[img] - scores
    drops = drops.view(b, n_masks)  # (B * M,) -> (B, M)
    maps = torch.einsum("bm,mhw->bhw", drops, masks) / counts
    token = drops.view(b, len(ys), len(xs))  # (B, M) -> (B, rows, cols)
    return Explanation("occlusion", maps, {"occlusion": token}, targets, logits,
                       dict(patch_size=p, stride=s, baseline=baseline, masks=int(masks.shape[0])))


def saliency(model: nn.Module, x: Tensor, target: Target = None,
             mode: Literal["gradient", "gradient_x_input"] = "gradient") -> Explanation:
    """Input-gradient saliency: ``max_c |dS/dx|`` (Simonyan et al.), or ``|sum_c x * dS/dx|``."""
    if mode not in ("gradient", "gradient_x_input"):
        raise ValueError(f"mode must be 'gradient' or 'gradient_x_input', got {mode!r}")
    inp = x.detach().clone().requires_grad_(True)
    with torch.enable_grad(), eval_mode(model):
        logits = _logits(model, inp)
        targets = resolve_targets(logits, target)
        (grad,) = torch.autograd.grad(_score(logits, targets), [inp])
    maps = grad.abs().amax(dim=1) if mode == "gradient" else (grad * inp.detach()).sum(dim=1).abs()
    return Explanation("saliency", maps, {}, targets, logits.detach(), dict(mode=mode))


# ----------------------------------------------------------------------------- features
@dataclass
class FeatureView:
    """Features of one layer from ``forward_intermediates``.

    Attributes:
        layer: 1-based feature index (as in :func:`feature_points`).
        label: ``block 6``, ``stage 2``, ``branch 1 stage 3`` ...
        features: (B, C, h, w) the raw map.
        token_image: (B, h, w, 3) PCA colours per token, or (B, h, w) channel norm.
        image: The same at image size: (B, H, W, 3) or (B, H, W).
        explained_variance: Share of variance of each principal component (PCA only).
    """

    layer: int
    label: str
    features: Tensor
    token_image: Tensor
    image: Tensor
    explained_variance: list[float] = field(default_factory=list)


def _intermediates(model: nn.Module, x: Tensor, layers: int | Sequence[int] | None,
                   default_last: int | None = None) -> list[tuple[int, FeaturePoint, Tensor]]:
    """(index, feature point, map (B, C, h, w)) of the chosen layers (default: the last ``default_last``, or all)."""
    points = feature_points(model, tuple(x.shape[-2:]))
    chosen = resolve_layers(layers, len(points), "feature layers (blocks or stages)") if layers is not None \
        else list(range(len(points) - min(default_last or len(points), len(points)), len(points)))
    with torch.no_grad(), eval_mode(model):
        feats = model.forward_intermediates(x, indices=chosen, intermediates_only=True)
    return [(j, points[j], f.float()) for j, f in zip(chosen, feats)]


def pca_features(model: nn.Module, x: Tensor, layers: int | Sequence[int] | None = None,
                 interpolation: str = "nearest") -> list[FeatureView]:
    """The first three principal components of the patch tokens of chosen layers, as RGB.

    The components are fitted on all tokens of the batch together (so colours compare
    across images), each scaled to [0, 1].

    Args:
        layers: 1-based feature layers (blocks / stages, see :func:`feature_points`);
            the last three by default.
    """
    out = []
    for j, point, f in _intermediates(model, x, layers, default_last=3):
        b, c, h, w = f.shape
        tokens = f.permute(0, 2, 3, 1).reshape(-1, c)  # (B, C, h, w) -> (B*h*w, C)
        centred = tokens - tokens.mean(dim=0, keepdim=True)
        _, sv, vh = torch.linalg.svd(centred, full_matrices=False)
        k = min(3, vh.shape[0])
        proj = centred @ vh[:k].T  # (B*h*w, k)
        proj = proj * torch.sign(proj.gather(0, proj.abs().argmax(0, keepdim=True)))  # deterministic signs
        lo, hi = proj.amin(0), proj.amax(0)
        rgb = (proj - lo) / (hi - lo).clamp(min=1e-8)
        if k < 3:
            rgb = torch.cat([rgb, rgb.new_zeros(rgb.shape[0], 3 - k)], dim=1)
        rgb = rgb.view(b, h, w, 3)  # (B*h*w, 3) -> (B, h, w, 3)
        var = sv**2
        explained = (var[:k] / var.sum().clamp(min=1e-12)).tolist()
        grid = TokenGrid((h, w), point.cell)
        image = grid_to_image(rgb.permute(0, 3, 1, 2), grid, tuple(x.shape[-2:]), interpolation).permute(0, 2, 3, 1)
        out.append(FeatureView(j + 1, point.label, f, rgb, image, explained))
    return out


def feature_maps(model: nn.Module, x: Tensor, layers: int | Sequence[int] | None = None,
                 interpolation: str = "bilinear") -> list[FeatureView]:
    """Intermediate feature maps from ``forward_intermediates``: the L2 norm over channels per token."""
    out = []
    for j, point, f in _intermediates(model, x, layers):
        norm = f.norm(dim=1)  # (B, h, w)
        grid = TokenGrid(tuple(norm.shape[-2:]), point.cell)
        image = grid_to_image(norm, grid, tuple(x.shape[-2:]), interpolation)
        out.append(FeatureView(j + 1, point.label, f, norm, image))
    return out


# ----------------------------------------------------------------------------- statistics
def _average_ranks(v: Tensor) -> Tensor:
    """0-based ranks of a 1-D tensor, ties sharing their average rank."""
    values, order = v.sort()
    _, inverse, counts = torch.unique_consecutive(values, return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).double()
    mean_rank = ends - (counts.double() + 1) / 2  # (start + end - 1) / 2 for each run of ties
    ranks = torch.empty_like(mean_rank[inverse])
    ranks[order] = mean_rank[inverse]
    return ranks


def spearman_correlation(a: Tensor, b: Tensor) -> float:
    """Spearman's rank correlation of two maps of the same size (ties get average ranks).

    Returns NaN when either map is constant.
    """
    if a.numel() != b.numel():
        raise ValueError(f"maps of different sizes: {tuple(a.shape)} and {tuple(b.shape)}")
    ra = _average_ranks(a.detach().flatten().double().cpu())
    rb = _average_ranks(b.detach().flatten().double().cpu())
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = (ra.norm() * rb.norm()).item()
    return float("nan") if denom == 0 else float((ra @ rb).item() / denom)
