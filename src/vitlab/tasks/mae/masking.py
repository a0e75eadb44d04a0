"""Random patch masking by per-sample noise (He et al., 2022, "Masked Autoencoders Are Scalable Vision Learners")."""

from __future__ import annotations

import torch
from torch import Tensor


def num_visible(num_patches: int, mask_ratio: float) -> int:
    """How many of ``num_patches`` patches stay visible at ``mask_ratio`` (the paper's ``int(N * (1 - r))``)."""
    return int(num_patches * (1 - mask_ratio))


def random_masking(noise: Tensor, mask_ratio: float) -> tuple[Tensor, Tensor]:
    """The MAE mask drawn from per-patch noise: the patches with the smallest noise stay visible.

    Sorting the noise (argsort, as in the paper) makes the mask a pure function of ``noise``:
    the same noise tensor always gives the same mask.

    Args:
        noise: (B, N) noise, one value per patch (uniform in [0, 1) in training).
        mask_ratio: Fraction of patches to hide, in [0, 1).

    Returns:
        ``mask`` (B, N) bool, True where a patch is hidden (the backbone contract's convention),
        and ``ids_restore`` (B, N), the rank of every patch in the noise order (the inverse of
        the argsort permutation).

    Raises:
        ValueError: ``noise`` is not 2-D or ``mask_ratio`` is outside [0, 1).
    """
    if noise.ndim != 2:
        raise ValueError(f"noise must have shape (B, N), got {tuple(noise.shape)}")
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
    b, n = noise.shape
    keep = num_visible(n, mask_ratio)
    ids_shuffle = torch.argsort(noise, dim=1)  # ascending: small noise is kept
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    mask = ids_restore >= keep  # rank >= keep: hidden
    return mask, ids_restore


def normalize_patches(patches: Tensor) -> Tensor:
    """``norm_pix_loss`` targets: each patch (last dim) minus its mean, over its std (unbiased, as in MAE's code)."""
    mean = patches.mean(dim=-1, keepdim=True)
    var = patches.var(dim=-1, keepdim=True)
    return (patches - mean) / (var + 1e-6) ** 0.5


def patchify(images: Tensor, patch_size: int) -> Tensor:
    """Images (B, C, H, W) -> patches (B, N, p*p*C), each patch flattened (row, column, channel) as in MAE."""
    b, c, h, w = images.shape
    p = patch_size
    if h % p or w % p:
        raise ValueError(f"image size {h}x{w} is not a multiple of the patch size {p}")
    gh, gw = h // p, w // p
    # (B, C, gh*p, gw*p) -> (B, C, gh, p, gw, p) -> (B, gh, gw, p, p, C) -> (B, gh*gw, p*p*C)
    return images.reshape(b, c, gh, p, gw, p).permute(0, 2, 4, 3, 5, 1).reshape(b, gh * gw, p * p * c)


class RandomMasking:
    """What MAE and SimMIM share: a mask of ``grid`` cells at ``config.mask_ratio`` from per-sample noise.

    Mixed into a module that sets ``self.grid`` (gh, gw), ``self.target_size`` (the side of a
    cell in pixels) and ``self.config`` (``mask_ratio``, ``norm_pix_loss``).
    """

    grid: tuple[int, int]
    target_size: int
    config: object

    @property
    def num_patches(self) -> int:
        """Mask cells per image (gh * gw)."""
        return self.grid[0] * self.grid[1]

    def random_mask(self, images: Tensor, noise: Tensor | None = None) -> Tensor:
        """The (B, N) mask (True: hidden) for a batch, from ``noise`` (B, N) or fresh uniform noise.

        Raises:
            ValueError: ``noise`` of another shape.
        """
        b = images.shape[0]
        if noise is None:
            noise = torch.rand(b, self.num_patches, device=images.device)
        elif noise.shape != (b, self.num_patches):
            raise ValueError(f"noise must have shape (B, N) = ({b}, {self.num_patches}), got {tuple(noise.shape)}")
        return random_masking(noise, self.config.mask_ratio)[0]

    def targets(self, images: Tensor) -> Tensor:
        """Pixel targets (B, N, s*s*C) of the ``target_size`` cells, normalised per cell with ``norm_pix_loss``."""
        target = patchify(images, self.target_size)
        return normalize_patches(target) if self.config.norm_pix_loss else target


__all__ = ["RandomMasking", "normalize_patches", "num_visible", "patchify", "random_masking"]
