"""The light MAE decoder: the shared transformer Block over visible and mask tokens."""

from __future__ import annotations

from functools import partial

import torch
from torch import Tensor, nn

from ...components import Block, sincos_2d_pos_embed
from ...models.base import init_linears


class MAEDecoder(nn.Module):
    """Encoder tokens of the visible patches -> predicted pixels of every patch.

    The visible tokens are projected to the decoder width, a shared learned ``mask_token``
    fills every hidden position, a fixed 2-D sin-cos position embedding is added to the
    patch positions (prefix tokens get none, as the zero class row of MAE's table), and
    ``decoder_blocks`` (the package's one :class:`~vitlab.components.Block`), ``decoder_norm``
    and ``decoder_pred`` produce ``patch_size**2 * in_channels`` values per patch.

    Args:
        encoder_dim: Width of the encoder's tokens.
        grid: Patch grid (gh, gw) of the images.
        patch_dim: Outputs per patch (``patch_size**2 * in_channels``).
        dim: Decoder width.
        depth: Decoder blocks.
        heads: Decoder attention heads.
        mlp_dim: Hidden width of the decoder MLPs.
        qkv_bias: Bias in the decoder's qkv projections.
        norm_eps: LayerNorm epsilon.
    """

    def __init__(
        self,
        encoder_dim: int,
        grid: tuple[int, int],
        patch_dim: int,
        dim: int,
        depth: int,
        heads: int,
        mlp_dim: int,
        qkv_bias: bool = True,
        norm_eps: float = 1e-6,
    ) -> None:
        super().__init__()
        self.grid = tuple(grid)
        self.decoder_embed = nn.Linear(encoder_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        pos = sincos_2d_pos_embed(dim, self.grid).unsqueeze(0)  # (1, gh*gw, dim)
        self.register_buffer("decoder_pos_embed", pos, persistent=False)
        norm = partial(nn.LayerNorm, eps=norm_eps)
        self.decoder_blocks = nn.ModuleList(
            Block(dim, heads, mlp_dim, qkv_bias=qkv_bias, norm_layer=norm) for _ in range(depth)
        )
        self.decoder_norm = norm(dim)
        self.decoder_pred = nn.Linear(dim, patch_dim)
        init_linears(self)
        nn.init.normal_(self.mask_token, std=0.02)

    def forward(self, tokens: Tensor, mask: Tensor, num_prefix_tokens: int) -> Tensor:
        """Decode.

        Args:
            tokens: (B, P + N_visible, C) encoder output, prefix tokens first, then the visible
                patches in raster order (what ``forward_features(x, mask)`` of a plain ViT gives).
            mask: (B, N) bool, True where a patch is hidden.
            num_prefix_tokens: P.

        Returns:
            (B, N, patch_dim) predictions for every patch (prefix tokens dropped).
        """
        b, n = mask.shape
        if n != self.decoder_pos_embed.shape[1]:
            raise ValueError(f"the decoder was built for {self.decoder_pos_embed.shape[1]} patches, got a mask of {n}")
        x = self.decoder_embed(tokens)  # (B, P + N_vis, D)
        d = x.shape[-1]
        prefix, visible = x[:, :num_prefix_tokens], x[:, num_prefix_tokens:]
        full = self.mask_token.to(x.dtype).expand(b, n, d)  # (B, N, D)
        # put the visible tokens back at their raster positions: (B, N_vis, D) -> (B * N_vis, D)
        full = full.masked_scatter((~mask).unsqueeze(-1), visible.reshape(-1, d))
        full = full + self.decoder_pos_embed.to(x.dtype)
        x = torch.cat([prefix, full], dim=1)  # (B, P + N, D)
        for blk in self.decoder_blocks:
            x = blk(x)
        x = self.decoder_pred(self.decoder_norm(x))
        return x[:, num_prefix_tokens:]


__all__ = ["MAEDecoder"]
