"""Mixup and CutMix with label smoothing (timm-style), seeded by a ``torch.Generator``."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

MODES = ("batch", "elem")


def one_hot_smooth(y: Tensor, num_classes: int, smoothing: float = 0.0) -> Tensor:
    """Hard labels (B,) -> smoothed one-hot (B, N): off ``smoothing / N``, on ``1 - smoothing + off``."""
    off = smoothing / num_classes
    out = torch.full((y.shape[0], num_classes), off, device=y.device, dtype=torch.float32)
    return out.scatter_(1, y.long().view(-1, 1), 1.0 - smoothing + off)


def mixup_target(y: Tensor, num_classes: int, lam: float | Tensor = 1.0, smoothing: float = 0.0) -> Tensor:
    """Soft targets ``lam * onehot(y) + (1 - lam) * onehot(y.flip(0))``, smoothed; ``lam`` a float or (B,)."""
    y1 = one_hot_smooth(y, num_classes, smoothing)
    y2 = one_hot_smooth(y.flip(0), num_classes, smoothing)
    lam_t = torch.as_tensor(lam, dtype=y1.dtype, device=y1.device)
    if lam_t.ndim == 1:
        lam_t = lam_t.view(-1, 1)  # (B,) -> (B, 1)
    return y1 * lam_t + y2 * (1.0 - lam_t)


def rand_bbox(height: int, width: int, lam: Tensor, generator: torch.Generator | None = None
              ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """CutMix boxes (timm's ``rand_bbox``): side ``sqrt(1 - lam)`` of the image, centre uniform, clipped.

    Args:
        lam: (B,) mixing weights before the area correction.

    Returns:
        ``(y0, y1, x0, x1)``, each (B,) long: rows ``y0:y1`` and columns ``x0:x1``.
    """
    cut = torch.sqrt(1.0 - lam)
    ch, cw = (height * cut).long(), (width * cut).long()
    gdev = generator.device if generator is not None else torch.device("cpu")
    n = lam.shape[0]
    cy = torch.randint(0, height, (n,), generator=generator, device=gdev).to(lam.device)
    cx = torch.randint(0, width, (n,), generator=generator, device=gdev).to(lam.device)
    y0, y1 = (cy - ch // 2).clamp(0, height), (cy + ch // 2).clamp(0, height)
    x0, x1 = (cx - cw // 2).clamp(0, width), (cx + cw // 2).clamp(0, width)
    return y0, y1, x0, x1


class Mixup:
    """Mixup (Zhang et al. 2018) / CutMix (Yun et al. 2019) with soft, smoothed targets.

    Each call mixes sample ``i`` with sample ``B - 1 - i`` (the batch flipped). With
    probability ``prob`` a mix happens; it is CutMix with probability ``switch_prob`` when both
    alphas are > 0, else whichever is enabled; ``lam ~ Beta(alpha, alpha)``. CutMix pastes a
    box of the partner and sets ``lam = 1 - box area / image area``. Targets are
    ``lam * smooth(y) + (1 - lam) * smooth(y.flip(0))`` where ``smooth`` puts ``1 - s + s/N``
    on the label and ``s/N`` elsewhere, so every row sums to 1. With both alphas 0 only label
    smoothing is applied.

    All randomness comes from ``generator`` (Beta samples through a numpy generator seeded
    from it), so a seeded generator reproduces the mix. After a call, ``last_lam`` (float, or
    (B,) tensor in ``"elem"`` mode) and ``last_mode`` (``"mixup"``, ``"cutmix"`` or None) tell
    what was done.

    Args:
        mixup_alpha: Beta parameter of mixup (0: off).
        cutmix_alpha: Beta parameter of CutMix (0: off).
        cutmix_minmax: Optional (min, max) box side fraction instead of the Beta sample.
        prob: Probability of mixing a batch (``"elem"``: a sample).
        switch_prob: Probability of CutMix instead of mixup when both are on.
        mode: ``"batch"`` (one lam per batch) or ``"elem"`` (one per sample).
        correct_lam: Correct the CutMix lam by the clipped box area (timm's default).
        label_smoothing: Smoothing ``s`` of the targets.
        num_classes: Number of classes N.

    Example:
        >>> mix = Mixup(num_classes=10)
        >>> x, y_soft = mix(x, y, generator=torch.Generator().manual_seed(0))
    """

    def __init__(self, mixup_alpha: float = 0.8, cutmix_alpha: float = 1.0,
                 cutmix_minmax: tuple[float, float] | None = None, prob: float = 1.0, switch_prob: float = 0.5,
                 mode: str = "batch", correct_lam: bool = True, label_smoothing: float = 0.1,
                 num_classes: int = 1000) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        if mixup_alpha < 0 or cutmix_alpha < 0:
            raise ValueError(f"alphas must be >= 0, got mixup_alpha={mixup_alpha}, cutmix_alpha={cutmix_alpha}")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.mixup_alpha, self.cutmix_alpha, self.cutmix_minmax = float(mixup_alpha), float(cutmix_alpha), cutmix_minmax
        if cutmix_minmax is not None:
            self.cutmix_alpha = max(self.cutmix_alpha, 1.0)  # as timm: minmax turns CutMix on
        self.prob, self.switch_prob, self.mode, self.correct_lam = float(prob), float(switch_prob), mode, correct_lam
        self.label_smoothing, self.num_classes = float(label_smoothing), int(num_classes)
        self.last_lam: float | Tensor = 1.0
        self.last_mode: str | None = None

    @property
    def enabled(self) -> bool:
        """Whether any mixing can happen (else only label smoothing)."""
        return self.prob > 0 and (self.mixup_alpha > 0 or self.cutmix_alpha > 0)

    def _draw(self, n: int, generator: torch.Generator | None) -> tuple[np.ndarray, np.ndarray]:
        """Per-draw (lam, use_cutmix) for ``n`` draws, from a numpy generator seeded by ``generator``."""
        gdev = generator.device if generator is not None else torch.device("cpu")
        seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=gdev).item())
        rng = np.random.default_rng(seed)
        use_mix = rng.random(n) < self.prob
        if self.mixup_alpha > 0 and self.cutmix_alpha > 0:
            cutmix = rng.random(n) < self.switch_prob
        else:
            cutmix = np.full(n, self.cutmix_alpha > 0)
        lam_mix = rng.beta(self.mixup_alpha, self.mixup_alpha, n) if self.mixup_alpha > 0 else np.ones(n)
        lam_cut = rng.beta(self.cutmix_alpha, self.cutmix_alpha, n) if self.cutmix_alpha > 0 else np.ones(n)
        lam = np.where(cutmix, lam_cut, lam_mix)
        lam = np.where(use_mix, lam, 1.0)
        return lam.astype(np.float64), cutmix & use_mix

    def _boxes(self, h: int, w: int, lam: Tensor, generator: torch.Generator | None
               ) -> tuple[tuple[Tensor, Tensor, Tensor, Tensor], Tensor]:
        if self.cutmix_minmax is not None:
            lo, hi = self.cutmix_minmax
            gdev = generator.device if generator is not None else torch.device("cpu")
            n = lam.shape[0]
            r = torch.rand(4, n, generator=generator, device=gdev, dtype=torch.float64).to(lam.device)
            ch, cw = (h * (lo + (hi - lo) * r[0])).long(), (w * (lo + (hi - lo) * r[1])).long()
            y0 = (r[2] * (h - ch + 1)).long().clamp(max=h - ch)
            x0 = (r[3] * (w - cw + 1)).long().clamp(max=w - cw)
            box = (y0, y0 + ch, x0, x0 + cw)
        else:
            box = rand_bbox(h, w, lam, generator)
        y0, y1, x0, x1 = box
        area = ((y1 - y0) * (x1 - x0)).to(lam.dtype)
        if self.correct_lam or self.cutmix_minmax is not None:
            lam = 1.0 - area / float(h * w)
        return box, lam

    def __call__(self, x: Tensor, y: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Mix a batch.

        Args:
            x: Images (B, C, H, W).
            y: Integer labels (B,).
            generator: Source of randomness.

        Returns:
            ``(x_mixed, targets)``: a new (B, C, H, W) tensor and soft targets (B, N) summing to 1.
        """
        if y.ndim != 1 or y.shape[0] != x.shape[0]:
            raise ValueError(f"expected labels (B,) for images (B, ...), got {tuple(y.shape)} and {tuple(x.shape)}")
        if y.is_floating_point():
            raise ValueError("Mixup expects integer class labels, not soft targets")
        self.last_lam, self.last_mode = 1.0, None
        if not self.enabled:
            return x, mixup_target(y, self.num_classes, 1.0, self.label_smoothing)
        B, _, H, W = x.shape
        n = 1 if self.mode == "batch" else B
        lam_np, cut_np = self._draw(n, generator)
        lam = torch.as_tensor(lam_np, device=x.device)
        cut = torch.as_tensor(cut_np, device=x.device)
        partner = x.flip(0)
        out = x
        if bool(cut.any()):
            box, lam_box = self._boxes(H, W, lam, generator)
            lam = torch.where(cut, lam_box, lam)
            y0, y1, x0, x1 = (v.view(-1, 1, 1, 1) for v in box)
            rows = torch.arange(H, device=x.device).view(1, 1, H, 1)
            cols = torch.arange(W, device=x.device).view(1, 1, 1, W)
            inside = (rows >= y0) & (rows < y1) & (cols >= x0) & (cols < x1)  # (n, 1, H, W)
            inside = inside & cut.view(-1, 1, 1, 1)
            out = torch.where(inside, partner, out)
        if bool((~cut).any()):
            w = torch.where(cut, torch.ones_like(lam), lam).to(x.dtype).view(-1, 1, 1, 1)
            out = out * w + partner * (1.0 - w)
        if self.mode == "batch":
            self.last_lam = float(lam[0])
            self.last_mode = None if self.last_lam == 1.0 and not bool(cut[0]) else ("cutmix" if bool(cut[0]) else "mixup")
            target_lam: float | Tensor = self.last_lam
        else:
            self.last_lam = lam.float()
            self.last_mode = "elem"
            target_lam = self.last_lam
        return out, mixup_target(y, self.num_classes, target_lam, self.label_smoothing)

    def __repr__(self) -> str:
        return (f"Mixup(mixup_alpha={self.mixup_alpha}, cutmix_alpha={self.cutmix_alpha}, prob={self.prob}, "
                f"switch_prob={self.switch_prob}, mode={self.mode!r}, label_smoothing={self.label_smoothing}, "
                f"num_classes={self.num_classes})")


__all__ = ["Mixup", "mixup_target", "one_hot_smooth", "rand_bbox"]
