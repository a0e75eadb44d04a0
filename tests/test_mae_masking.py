"""Masking through the backbone contract (issue 12): every family takes ``forward_features(x, mask)``.

Plain ViT families (ViT, DeiT, distilled DeiT, CaiT) drop the hidden patch tokens: a hook on
block 0 sees exactly the visible tokens. Hierarchical families (Swin, PVT v2) built with
``mask_token=True`` put their learned mask token at the hidden patches: a hook on the first
block sees it exactly there and the patch embedding elsewhere. Families that cannot take a mask
keep one clear error. The lists are checked against the registry, so a new family must be
placed in one of them.
"""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_model
from vitlab.models.registry import _MODELS

PLAIN = ["vit_tiny_patch16_224", "deit_tiny_patch16_224", "deit_tiny_distilled_patch16_224", "cait_xxs24_224"]
HIERARCHICAL = ["swin_tiny_patch4_window7_224", "pvt_v2_b0"]
NO_MASK = ["pvt_tiny", "crossvit_tiny_240", "cnn_small", "vit_tiny_r_s16_p8_224"]


def _images(model, batch: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randn(batch, model.config.in_channels, *model.config.image_size, generator=g)


def _mask(batch: int, n: int, hidden: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    order = torch.stack([torch.randperm(n, generator=g) for _ in range(batch)])
    return order < hidden  # (B, N), exactly `hidden` True per row, at different places per row


def _perturb(model) -> None:
    """Move every parameter off its init (LayerScale 1e-4, zero tokens) so each one matters."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)


def _first_block(model) -> torch.nn.Module:
    if hasattr(model, "blocks"):  # ViT, DeiT, CaiT
        return model.blocks[0]
    if hasattr(model, "layers"):  # Swin
        return model.layers[0].blocks[0]
    return model.stages[0].blocks[0]  # PVT v2


def _block0_input(model, x: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    seen = []
    handle = _first_block(model).register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()))
    try:
        out = model.forward_features(x, mask=mask)
    finally:
        handle.remove()
    return seen[0], out


def test_every_family_is_placed():
    families = {e.family: name for name, e in _MODELS.items()}
    placed = {_MODELS[n].family for n in PLAIN + HIERARCHICAL + NO_MASK}
    assert placed == set(families), f"put one variant of {sorted(set(families) - placed)} in a list above"


@pytest.mark.parametrize("name", PLAIN)
@torch.no_grad()
def test_plain_encoder_sees_exactly_the_visible_tokens(name):
    torch.manual_seed(0)
    model = tiny_model(name, num_classes=5).eval()
    _perturb(model)
    x = _images(model)
    grid = model.patch_embed.grid_size(tuple(model.config.image_size))
    n = grid[0] * grid[1]
    mask = _mask(2, n, hidden=n - 3)
    full, _ = _block0_input(model, x, None)
    seen, out = _block0_input(model, x, mask)
    p = full.shape[1] - n  # prefix tokens in block 0 (CaiT: none, its class token joins later)
    expected = torch.stack([torch.cat([full[b, :p], full[b, p:][~mask[b]]]) for b in range(2)])
    assert seen.shape == (2, p + 3, full.shape[-1])
    torch.testing.assert_close(seen, expected, atol=0, rtol=0)
    assert out.shape[1] == model.num_prefix_tokens + 3
    # the hidden pixels no longer matter (patches do not overlap)
    ps = model.patch_embed.stride[0] if hasattr(model.patch_embed, "stride") else model.config.patch_size
    y = x.clone()
    hidden0 = int(mask[0].nonzero()[0])
    r, c = divmod(hidden0, grid[1])
    y[0, :, r * ps:(r + 1) * ps, c * ps:(c + 1) * ps] += 7.0
    torch.testing.assert_close(model.forward_features(y, mask=mask), out, atol=0, rtol=0)


@pytest.mark.parametrize("name", HIERARCHICAL)
@torch.no_grad()
def test_hierarchical_mask_token_sits_exactly_at_hidden_patches(name):
    torch.manual_seed(0)
    model = tiny_model(name, num_classes=5, mask_token=True).eval()
    _perturb(model)
    x = _images(model)
    tokens, grid = model.patch_embed(x)  # (B, N, C) after the patch embedding (and its norm)
    n = tokens.shape[1]
    mask = _mask(2, n, hidden=n // 2)
    seen, out = _block0_input(model, x, mask)
    token = model.mask_token[0, 0]
    assert torch.equal(seen[mask], token.expand(int(mask.sum()), -1))
    assert torch.equal(seen[~mask], tokens[~mask])
    assert out.ndim == 4 and not torch.allclose(out, model.forward_features(x))
    # all hidden: every token is the mask token, the image no longer matters at all
    everything = torch.ones(2, n, dtype=torch.bool)
    torch.testing.assert_close(model.forward_features(x, mask=everything),
                               model.forward_features(x + 3.0, mask=everything), atol=0, rtol=0)


@pytest.mark.parametrize("name", PLAIN + HIERARCHICAL)
def test_masked_forward_reaches_every_trainable_parameter(name):
    torch.manual_seed(0)
    extra = {"mask_token": True} if name in HIERARCHICAL else {}
    model = tiny_model(name, num_classes=5, **extra).train()
    _perturb(model)
    x = _images(model)
    if name in HIERARCHICAL:
        n = model.patch_embed(x)[0].shape[1]
    else:
        grid = model.patch_embed.grid_size(tuple(model.config.image_size))
        n = grid[0] * grid[1]
    mask = _mask(2, n, hidden=n // 2)
    out = model.forward_head(model.forward_features(x, mask=mask))
    out = out[0] + out[1] if isinstance(out, tuple) else out
    out.pow(2).sum().backward()
    dead = [k for k, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
    assert not dead, f"no gradient for {dead}"


@pytest.mark.parametrize("name", HIERARCHICAL)
def test_hierarchical_without_mask_token_is_one_clear_error(name):
    model = tiny_model(name, num_classes=5)
    assert model.mask_token is None and "mask_token" not in model.state_dict()
    x = _images(model)
    n = model.patch_embed(x)[0].shape[1]
    with pytest.raises(ValueError, match="mask_token=True"):
        model.forward_features(x, mask=torch.zeros(2, n, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"shape \(B, N\)"):
        tiny_model(name, num_classes=5, mask_token=True).forward_features(x, mask=torch.zeros(2, 3, dtype=torch.bool))


@pytest.mark.parametrize("name", NO_MASK)
def test_families_without_masking_raise_one_clear_error(name):
    model = tiny_model(name, num_classes=5)
    with pytest.raises(ValueError, match=r"cannot be pre-trained by masked image modelling: MAE needs a plain ViT family \(.*vit.*\), SimMIM .*swin"):
        model.forward_features(_images(model), mask=torch.zeros(2, 4, dtype=torch.bool))
