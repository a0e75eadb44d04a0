"""Masked autoencoder pre-training (He et al., 2022) over any backbone that drops masked tokens."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ...models.base import Backbone, check_config
from .decoder import MAEDecoder
from .masking import RandomMasking, num_visible, patchify


@dataclass(frozen=True)
class MAEConfig:
    """Configuration of :class:`MAE` (the encoder brings its own config).

    Attributes:
        mask_ratio: Fraction of patches hidden from the encoder, in [0, 1).
        decoder_dim: Decoder width (divisible by 4 for the sin-cos embedding and by ``decoder_heads``).
        decoder_depth: Decoder blocks.
        decoder_heads: Decoder attention heads.
        decoder_mlp_dim: Hidden width of the decoder MLPs; default ``4 * decoder_dim``.
        norm_pix_loss: Regress per-patch normalised pixels (mean 0, variance 1 per patch).
        qkv_bias: Bias in the decoder's qkv projections.
        norm_eps: Epsilon of the decoder's LayerNorms.
    """

    mask_ratio: float = 0.75
    decoder_dim: int = 512
    decoder_depth: int = 8
    decoder_heads: int = 16
    decoder_mlp_dim: int | None = None
    norm_pix_loss: bool = False
    qkv_bias: bool = True
    norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        if self.decoder_mlp_dim is None:
            object.__setattr__(self, "decoder_mlp_dim", 4 * self.decoder_dim)
        check_config(
            self,
            positive=("decoder_dim", "decoder_depth", "decoder_heads", "decoder_mlp_dim", "norm_eps"),
            checks=[
                (0.0 <= self.mask_ratio < 1.0, f"mask_ratio must be in [0, 1), got {self.mask_ratio}"),
                (self.decoder_heads <= 0 or self.decoder_dim % self.decoder_heads == 0,
                 f"decoder_dim ({self.decoder_dim}) must be divisible by decoder_heads ({self.decoder_heads})"),
                (self.decoder_dim % 4 == 0,
                 f"decoder_dim must be divisible by 4 (2-D sin-cos position embedding), got {self.decoder_dim}"),
            ],
        )


def unpatchify(patches: Tensor, patch_size: int, grid: tuple[int, int], in_channels: int) -> Tensor:
    """Patches (B, N, p*p*C) -> images (B, C, gh*p, gw*p); the inverse of :func:`patchify`."""
    b = patches.shape[0]
    gh, gw = grid
    p, c = patch_size, in_channels
    if patches.shape[1:] != (gh * gw, p * p * c):
        raise ValueError(f"expected patches of shape (B, {gh * gw}, {p * p * c}), got {tuple(patches.shape)}")
    # (B, gh*gw, p*p*C) -> (B, gh, gw, p, p, C) -> (B, C, gh, p, gw, p) -> (B, C, gh*p, gw*p)
    return patches.reshape(b, gh, gw, p, p, c).permute(0, 5, 1, 3, 2, 4).reshape(b, c, gh * p, gw * p)


def compose_reconstruction(images: Tensor, pred: Tensor, mask: Tensor, patch_size: int, grid: tuple[int, int],
                           in_channels: int, norm_pix_loss: bool) -> tuple[Tensor, Tensor]:
    """Image-space (reconstruction, masked input) from patch predictions (B, N, p*p*C) and a (B, N) mask.

    With ``norm_pix_loss`` the predictions are mapped back with each patch's own mean and
    variance (as the MAE demo does).
    """
    patches = patchify(images, patch_size)
    pred = pred.to(patches.dtype)
    if norm_pix_loss:
        mean = patches.mean(dim=-1, keepdim=True)
        var = patches.var(dim=-1, keepdim=True)
        pred = pred * (var + 1e-6) ** 0.5 + mean
    hidden = mask.unsqueeze(-1)
    recon = unpatchify(torch.where(hidden, pred, patches), patch_size, grid, in_channels)
    masked = unpatchify(torch.where(hidden, torch.zeros_like(patches), patches), patch_size, grid, in_channels)
    return recon, masked


class MAE(RandomMasking, nn.Module):
    """Masked autoencoder: an encoder that sees only the visible patches and a light decoder.

    The encoder is any :class:`~vitlab.models.base.Backbone` whose ``forward_features(x, mask)``
    drops the hidden patch tokens (plain ViT / DeiT); it is used only through that contract
    (``config.patch_size``, ``config.image_size``, ``config.in_channels``, ``num_features``,
    ``token_layout``).

    Args:
        encoder: The backbone to pre-train (its classifier is not used).
        config: An :class:`MAEConfig`.

    Raises:
        ValueError: The encoder has no patch size or a non-token output.
    """

    def __init__(self, encoder: Backbone, config: MAEConfig | None = None) -> None:
        super().__init__()
        self.config = config or MAEConfig()
        ec = encoder.config
        patch = getattr(ec, "patch_size", None)
        if not isinstance(patch, int):
            raise ValueError(f"MAE needs an encoder with one integer config.patch_size, got {patch!r}")
        self.encoder = encoder
        self.patch_size = patch
        self.in_channels = int(ec.in_channels)
        self.image_size = tuple(ec.image_size)
        self.grid = (self.image_size[0] // patch, self.image_size[1] // patch)
        last = encoder.token_layout(self.image_size).features[-1]
        prefix = last.prefix
        if prefix is None:
            raise ValueError(f"MAE needs an encoder with token outputs; {type(encoder).__name__} returns maps")
        plain = len({int(i["reduction"]) for i in encoder.feature_info}) == 1  # hierarchical ones are told below
        if plain and tuple(last.grid.cell) != (float(patch), float(patch)):
            # a hybrid ViT: patch_size counts on a CNN's map, whose stem must see the whole image
            raise ValueError(
                f"MAE cannot pre-train {type(encoder).__name__}: its tokens cover {last.grid.cell[0]:g}x"
                f"{last.grid.cell[1]:g} pixels, not {patch}x{patch} image patches, because a CNN stem makes them from "
                f"the whole image, so masked patches cannot be dropped before it; use a plain ViT family"
            )
        # the tokens forward_features puts before the patches (CaiT: its class token, which the
        # patch-map layout does not count); the layout's count for a backbone that declares none
        self.num_prefix_tokens = int(getattr(encoder, "num_prefix_tokens", prefix))
        c = self.config
        self.decoder = MAEDecoder(
            encoder.num_features, self.grid, patch * patch * self.in_channels, c.decoder_dim, c.decoder_depth,
            c.decoder_heads, int(c.decoder_mlp_dim), qkv_bias=c.qkv_bias, norm_eps=c.norm_eps,
        )

    @property
    def target_size(self) -> int:
        """Side in pixels of the cells whose pixels are predicted."""
        return self.patch_size

    def forward(self, images: Tensor, noise: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Mask, encode the visible patches, decode every patch, and score the hidden ones.

        Args:
            images: (B, C, H, W) at the encoder's ``image_size``.
            noise: Optional (B, N) masking noise (the same noise gives the same mask).

        Returns:
            ``loss`` (mean squared error over the hidden patches only), ``pred`` (B, N, p*p*C) and
            ``mask`` (B, N) bool, True where a patch was hidden.

        Raises:
            ValueError: Images of another size, or noise of another shape.
        """
        if tuple(images.shape[-2:]) != self.image_size:
            raise ValueError(f"MAE expects {self.image_size[0]}x{self.image_size[1]} images, got "
                             f"{images.shape[-2]}x{images.shape[-1]}")
        mask = self.random_mask(images, noise)
        tokens = self.encoder.forward_features(images, mask=mask)
        expected = self.num_prefix_tokens + num_visible(self.num_patches, self.config.mask_ratio)
        if tokens.ndim != 3 or tokens.shape[1] != expected:
            raise ValueError(f"{type(self.encoder).__name__}.forward_features(mask=...) must return the {expected} "
                             f"prefix and visible tokens, got shape {tuple(tokens.shape)}")
        pred = self.decoder(tokens, mask, self.num_prefix_tokens)
        loss = ((pred - self.targets(images)) ** 2).mean(dim=-1)  # (B, N) per-patch error
        m = mask.to(loss.dtype)
        loss = (loss * m).sum() / m.sum().clamp_min(1.0)
        return loss, pred, mask

    @torch.no_grad()
    def reconstruct(self, images: Tensor, noise: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Image-space reconstruction: hidden patches from the prediction, visible ones from the input.

        With ``norm_pix_loss`` the prediction is mapped back to pixels with each patch's own mean
        and variance (as the MAE demo does).

        Args:
            images: (B, C, H, W).
            noise: Optional (B, N) masking noise.

        Returns:
            The reconstruction (B, C, H, W) and the mask (B, N), True where a patch was hidden.
        """
        _, pred, mask = self.forward(images, noise)
        patches = patchify(images, self.patch_size)
        if self.config.norm_pix_loss:
            mean = patches.mean(dim=-1, keepdim=True)
            var = patches.var(dim=-1, keepdim=True)
            pred = pred * (var + 1e-6) ** 0.5 + mean
        mixed = torch.where(mask.unsqueeze(-1), pred, patches)
        return unpatchify(mixed, self.patch_size, self.grid, self.in_channels), mask


    def compose(self, images: Tensor, pred: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """(reconstruction, masked input), both (B, C, H, W), from a forward's ``pred`` and ``mask``:
        hidden patches from ``pred``, visible ones from ``images``; zeros at hidden patches in the input."""
        return compose_reconstruction(images, pred, mask, self.patch_size, self.grid, self.in_channels,
                                      self.config.norm_pix_loss)


#: Features a :class:`LinearProbe` can read (see its docstring).
PROBE_POOLS = ("head", "mean")


class LinearProbe(nn.Module):
    """MAE's linear probe: BatchNorm without affine, then a linear classifier, over a frozen encoder.

    The encoder's parameters are frozen and it stays in eval mode (``train()`` leaves it there).
    The feature is chosen by ``pool``: ``"head"``, the encoder's own pooled pre-logits
    (``forward_head(..., pre_logits=True)``: a ViT's class token, as the MAE paper probes a
    model pre-trained for 800+ epochs), or ``"mean"``, the mean of the final (normed) patch
    tokens, prefix tokens left out (the common choice after short schedules, where the class
    token, which no loss reaches directly, has learned little; a map output is averaged
    over its positions).

    Args:
        encoder: A backbone (its own classifier is ignored).
        num_classes: Classifier outputs.
        pool: ``"head"`` or ``"mean"``.

    Raises:
        ValueError: ``num_classes`` not positive or an unknown ``pool``.
    """

    def __init__(self, encoder: Backbone, num_classes: int, pool: str = "head") -> None:
        super().__init__()
        if num_classes <= 0:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        if pool not in PROBE_POOLS:
            raise ValueError(f"probe pool must be one of {', '.join(PROBE_POOLS)}, got {pool!r}")
        self.pool = pool
        self.num_prefix_tokens = int(getattr(encoder, "num_prefix_tokens", 0))
        self.encoder = encoder
        self.config = encoder.config  # what checkpoints record about the model
        for p in self.encoder.parameters():
            p.requires_grad_(False)
        self.norm = nn.BatchNorm1d(encoder.num_features, affine=False, eps=1e-6)
        self.head = nn.Linear(encoder.num_features, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=0.01)
        nn.init.zeros_(self.head.bias)
        self.encoder.eval()

    def train(self, mode: bool = True) -> "LinearProbe":
        """Set the probe's mode; the frozen encoder always stays in eval mode."""
        super().train(mode)
        self.encoder.eval()
        return self

    def forward(self, images: Tensor) -> Tensor:
        """Images (B, C, H, W) -> logits (B, num_classes)."""
        with torch.no_grad():
            feats = self.features(images)
        return self.head(self.norm(feats))

    def features(self, images: Tensor) -> Tensor:
        """Images (B, C, H, W) -> the probed features (B, num_features), by ``pool``."""
        out = self.encoder.forward_features(images)
        if self.pool == "head":
            return self.encoder.forward_head(out, pre_logits=True)
        if out.ndim == 4:  # a map (B, C, h, w): its mean over positions
            return out.mean(dim=(2, 3))
        return out[:, self.num_prefix_tokens:].mean(dim=1)  # tokens (B, P + N, C) -> patch mean (B, C)


__all__ = ["MAE", "MAEConfig", "LinearProbe", "PROBE_POOLS", "compose_reconstruction", "patchify", "unpatchify"]
