"""MAE foundations (issue 12): masking, decoder, loss, reconstruction, linear probe, foreign checkpoints."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch
import torch.nn.functional as F

from vitlab.components import Block, sincos_2d_pos_embed
from vitlab import create_model
from vitlab.models.vit import ViTConfig, VisionTransformer
from vitlab.tasks.mae import (
    MAE, LinearProbe, MAEConfig, load_mae_weights, mae_from_hf, patchify, random_masking, unpatchify,
)

TINY = dict(image_size=32, patch_size=8, dim=32, depth=2, heads=4, mlp_dim=64, num_classes=0)
GRID = (4, 4)


def tiny_mae(mask_ratio: float = 0.75, norm_pix_loss: bool = False, seed: int = 0) -> MAE:
    torch.manual_seed(seed)
    enc = VisionTransformer(ViTConfig(**TINY))
    mae = MAE(enc, MAEConfig(mask_ratio=mask_ratio, decoder_dim=16, decoder_depth=2, decoder_heads=2,
                             norm_pix_loss=norm_pix_loss))
    with torch.no_grad():  # every parameter away from its init, so each one matters
        for p in mae.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return mae.eval()


# ------------------------------------------------------------------ masking
def test_masking_keeps_the_smallest_noise_and_is_a_function_of_noise():
    noise = torch.tensor([[0.5, 0.1, 0.9, 0.3], [0.2, 0.8, 0.4, 0.6]])
    mask, ids_restore = random_masking(noise, 0.5)
    # row 0: smallest noise at patches 1 and 3 -> visible; row 1: patches 0 and 2
    assert mask.tolist() == [[True, False, True, False], [False, True, False, True]]
    assert ids_restore.tolist() == [[2, 0, 3, 1], [0, 3, 1, 2]]  # rank of each patch's noise
    again, _ = random_masking(noise.clone(), 0.5)
    assert torch.equal(again, mask)
    mask75, _ = random_masking(torch.rand(3, 16), 0.75)
    assert mask75.sum(dim=1).tolist() == [12, 12, 12]  # N - int(N * (1 - r)) hidden


def test_mae_mask_comes_from_the_given_noise():
    mae = tiny_mae(mask_ratio=0.5)
    x = torch.randn(2, 3, 32, 32)
    noise = torch.rand(2, 16)
    _, _, m1 = mae(x, noise)
    _, _, m2 = mae(x, noise)
    assert torch.equal(m1, m2)
    expected = noise > noise.median(dim=1, keepdim=True).values  # the lower median is the 8th smallest: 8 hidden
    assert torch.equal(m1, expected)


def test_mae_config_validation():
    with pytest.raises(ValueError, match="mask_ratio must be in"):
        MAEConfig(mask_ratio=1.0)
    with pytest.raises(ValueError, match="divisible by decoder_heads"):
        MAEConfig(decoder_dim=20, decoder_heads=3)
    with pytest.raises(ValueError, match="decoder_depth must be positive"):
        MAEConfig(decoder_depth=0)
    assert MAEConfig(decoder_dim=64).decoder_mlp_dim == 256
    with pytest.raises(dataclasses.FrozenInstanceError):
        MAEConfig().mask_ratio = 0.5  # type: ignore[misc]


# ------------------------------------------------------------------ patches
def test_patchify_layout_and_unpatchify_roundtrip():
    x = torch.arange(2 * 3 * 8 * 12, dtype=torch.float32).reshape(2, 3, 8, 12)
    p = 4
    patches = patchify(x, p)
    assert patches.shape == (2, 6, 48)
    for b, i, j, r, c, ch in [(0, 0, 0, 0, 0, 0), (1, 1, 2, 3, 1, 2), (0, 0, 1, 2, 3, 1), (1, 1, 0, 1, 2, 0)]:
        # patch (i, j) flattened (row, column, channel), as MAE's einsum 'nchpwq->nhwpqc'
        assert patches[b, i * 3 + j, (r * p + c) * 3 + ch] == x[b, ch, i * p + r, j * p + c]
    assert torch.equal(unpatchify(patches, p, (2, 3), 3), x)


# ------------------------------------------------------------------ masked forward
def test_encoder_sees_exactly_the_visible_patch_embeddings():
    mae = tiny_mae(mask_ratio=0.5)
    enc = mae.encoder
    seen = []
    hook = enc.blocks[0].register_forward_hook(lambda m, inp, out: seen.append(inp[0].detach()))
    x = torch.randn(2, 3, 32, 32)
    noise = torch.rand(2, 16)
    _, _, mask = mae(x, noise)
    hook.remove()
    tokens = seen[0]
    assert tokens.shape == (2, 1 + 8, 32)  # class token + the 8 visible patches
    w, b = enc.patch_embed.proj.weight, enc.patch_embed.proj.bias
    # (B, D, 4, 4) -> (B, 16, D), raster order, plus the position embedding
    emb = F.conv2d(x, w, b, stride=8).flatten(2).transpose(1, 2) + enc.pos_embed.weight[:, 1:]
    for i in range(2):
        visible = emb[i][~mask[i]]  # raster order, as forward_features(mask=...) keeps them
        torch.testing.assert_close(tokens[i, 1:], visible, rtol=0, atol=1e-6)
        torch.testing.assert_close(tokens[i, 0], enc.cls_token[0, 0] + enc.pos_embed.weight[0, 0], rtol=0, atol=1e-6)


def test_gradients_reach_every_trainable_parameter():
    mae = tiny_mae().train()
    loss, _, _ = mae(torch.randn(2, 3, 32, 32), torch.rand(2, 16))
    loss.backward()
    no_grad = [n for n, p in mae.named_parameters()
               if p.requires_grad and (p.grad is None or not p.grad.abs().sum() > 0)]
    assert no_grad == []
    assert all(isinstance(b, Block) for b in mae.decoder.decoder_blocks)  # the shared block
    assert "decoder.decoder_pos_embed" not in dict(mae.named_parameters())  # fixed, not trained


def test_loss_is_on_hidden_patches_only():
    for npl in (False, True):
        mae = tiny_mae(norm_pix_loss=npl)
        x = torch.randn(2, 3, 32, 32)
        loss, pred, mask = mae(x, torch.rand(2, 16))
        t = patchify(x, 8)
        if npl:
            t = (t - t.mean(-1, keepdim=True)) / (t.var(-1, keepdim=True) + 1e-6) ** 0.5
        per_patch = ((pred - t) ** 2).mean(-1)
        torch.testing.assert_close(loss, per_patch[mask].mean(), rtol=1e-6, atol=1e-7)
        assert not torch.allclose(loss, per_patch.mean())


def test_decoder_position_embedding_is_mae_sincos():
    mae = tiny_mae()
    pos = mae.decoder.decoder_pos_embed[0]
    # MAE's fixed table for patch (row 1, column 2), width 16: [sin x, cos x, sin y, cos y], omega_k = 10000^(-k/4)
    omega = torch.tensor([10000.0 ** (-k / 4) for k in range(4)])
    expected = torch.cat([(2 * omega).sin(), (2 * omega).cos(), omega.sin(), omega.cos()])
    torch.testing.assert_close(pos[1 * 4 + 2], expected)
    # and it matters: without it the prediction changes
    x, noise = torch.randn(1, 3, 32, 32), torch.rand(1, 16)
    _, pred, _ = mae(x, noise)
    mae.decoder.decoder_pos_embed.zero_()
    _, pred0, _ = mae(x, noise)
    assert not torch.allclose(pred, pred0)


def test_reconstruct_takes_visible_from_input_and_hidden_from_prediction():
    for npl in (False, True):
        mae = tiny_mae(norm_pix_loss=npl)
        x = torch.randn(2, 3, 32, 32)
        noise = torch.rand(2, 16)
        _, pred, mask = mae(x, noise)
        rec, rmask = mae.reconstruct(x, noise)
        assert torch.equal(rmask, mask)
        got, inp = patchify(rec, 8), patchify(x, 8)
        assert torch.equal(got[~mask], inp[~mask])
        if npl:  # back to pixels with each patch's own statistics
            pred = pred * (inp.var(-1, keepdim=True) + 1e-6) ** 0.5 + inp.mean(-1, keepdim=True)
        torch.testing.assert_close(got[mask], pred[mask])


def test_errors_speak_to_the_user():
    mae = tiny_mae()
    with pytest.raises(ValueError, match="expects 32x32 images"):
        mae(torch.randn(1, 3, 48, 48))
    with pytest.raises(ValueError, match=r"noise must have shape \(B, N\) = \(1, 16\)"):
        mae(torch.randn(1, 3, 32, 32), torch.rand(1, 15))


# ------------------------------------------------------------------ linear probe
def test_linear_probe_batchnorm_without_affine_over_frozen_encoder():
    torch.manual_seed(0)
    enc = VisionTransformer(ViTConfig(**{**TINY, "dropout": 0.5}))
    probe = LinearProbe(enc, num_classes=5).train()
    assert not enc.training  # the frozen encoder stays in eval (no dropout) while the probe trains
    assert [n for n, p in probe.named_parameters() if p.requires_grad] == ["head.weight", "head.bias"]
    x = torch.randn(6, 3, 32, 32)
    logits = probe(x)
    f = enc.forward_head(enc.forward_features(x), pre_logits=True)
    z = (f - f.mean(0)) / (f.var(0, unbiased=False) + 1e-6).sqrt()  # batch statistics, no scale or shift
    torch.testing.assert_close(logits, probe.head(z), rtol=1e-5, atol=1e-5)
    logits.sum().backward()
    assert all(p.grad is None for p in enc.parameters())


def test_linear_probe_mean_pool_reads_the_patch_tokens_not_the_class_token():
    torch.manual_seed(0)
    enc = VisionTransformer(ViTConfig(**TINY)).eval()
    seen = {}
    enc.norm.register_forward_hook(lambda m, i, o: seen.__setitem__("tokens", o))  # (B, 1 + 16, C) final tokens
    x = torch.randn(6, 3, 32, 32)
    mean_probe = LinearProbe(enc, num_classes=5, pool="mean")
    feats = mean_probe.features(x)
    tokens = seen["tokens"]
    assert tokens.shape[1] == 1 + 16
    expected = torch.stack([tokens[b, 1:].sum(0) / 16 for b in range(6)])  # patch tokens only, by hand
    torch.testing.assert_close(feats, expected, rtol=1e-6, atol=1e-6)
    # the default reads the class token (the encoder's own pre-logits), which the mean does not
    torch.testing.assert_close(LinearProbe(enc, num_classes=5).features(x), tokens[:, 0], rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="probe pool must be one of head, mean, got 'max'"):
        LinearProbe(enc, num_classes=5, pool="max")


# ------------------------------------------------------------------ checkpoints of others
@pytest.fixture(scope="module")
def hf_mae_dir(tmp_path_factory):
    """A tiny, randomly initialised HF ViTMAEForPreTraining saved with save_pretrained."""
    pytest.importorskip("transformers")
    from transformers import ViTMAEConfig, ViTMAEForPreTraining

    torch.manual_seed(0)
    cfg = ViTMAEConfig(
        image_size=32, patch_size=8, num_channels=3, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, decoder_hidden_size=16, decoder_num_hidden_layers=2, decoder_num_attention_heads=2,
        decoder_intermediate_size=48, mask_ratio=0.75, layer_norm_eps=1e-6,
    )
    hf = ViTMAEForPreTraining(cfg).eval()
    with torch.no_grad():
        for n, p in hf.named_parameters():
            if "pos_embed" not in n and "position_embeddings" not in n:
                p.add_(torch.randn_like(p) * 0.3)
    # transformers 5 leaves the fixed sin-cos tables at zero after a random init; fill them with HF's own code
    hf.decoder.initialize_weights(16)
    proj = hf.vit.embeddings.patch_embeddings.projection
    kept = {n: p.detach().clone() for n, p in hf.vit.embeddings.named_parameters() if "position" not in n}
    proj._is_hf_initialized = False
    hf.vit.embeddings.initialize_weights()
    with torch.no_grad():
        for n, p in hf.vit.embeddings.named_parameters():
            if n in kept:
                p.copy_(kept[n])
    assert hf.decoder.decoder_pos_embed.abs().sum() > 0 and hf.vit.embeddings.position_embeddings.abs().sum() > 0
    folder = tmp_path_factory.mktemp("hf_mae")
    hf.save_pretrained(folder)
    return folder, hf


@pytest.mark.parametrize("norm_pix_loss", [False, True])
def test_hf_parity_same_mask_reconstruction_and_loss(hf_mae_dir, norm_pix_loss):
    folder, hf = hf_mae_dir
    hf.config.norm_pix_loss = norm_pix_loss
    mae = mae_from_hf(folder, norm_pix_loss=norm_pix_loss).eval()
    torch.manual_seed(1)
    x, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 16)
    with torch.no_grad():
        ref = hf(pixel_values=x, noise=noise)
        loss, pred, mask = mae(x, noise)
    assert torch.equal(mask, ref.mask.bool())
    torch.testing.assert_close(pred, ref.logits, rtol=0, atol=1e-5)
    torch.testing.assert_close(loss, ref.loss, rtol=0, atol=1e-5)


def test_transformers4_decoder_key_names_load(hf_mae_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    folder, hf = hf_mae_dir
    hf.config.norm_pix_loss = False
    sd = load_file(str(folder / "model.safetensors"))
    old = {k.replace("decoder.decoder_encoder.layer.", "decoder.decoder_layers."): v for k, v in sd.items()}
    assert any(k.startswith("decoder.decoder_layers.1.attention.attention.query") for k in old)
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    save_file(old, str(tmp_path / "model.safetensors"))
    x, noise = torch.randn(1, 3, 32, 32), torch.rand(1, 16)
    with torch.no_grad():
        torch.testing.assert_close(mae_from_hf(tmp_path).eval()(x, noise)[1], hf(pixel_values=x, noise=noise).logits,
                                   rtol=0, atol=1e-5)


def _original_layout(mae: MAE) -> dict[str, torch.Tensor]:
    """facebookresearch/mae's pre-training keys: timm encoder keys at the top, decoder_* and mask_token."""
    sd = {k[len("encoder."):]: v for k, v in mae.state_dict().items() if k.startswith("encoder.")}
    sd.update({k[len("decoder."):]: v for k, v in mae.state_dict().items() if k.startswith("decoder.")})
    pos = mae.decoder.decoder_pos_embed
    sd["decoder_pos_embed"] = torch.cat([torch.zeros(1, 1, pos.shape[-1]), pos], dim=1)  # zero class row
    return sd


def test_original_mae_layout_loads(hf_mae_dir, tmp_path):
    folder, hf = hf_mae_dir
    hf.config.norm_pix_loss = False
    ref = mae_from_hf(folder).eval()
    sd = _original_layout(ref)
    assert {"mask_token", "decoder_embed.weight", "decoder_blocks.1.attn.qkv.weight", "decoder_norm.weight",
            "decoder_pred.bias", "blocks.0.attn.qkv.weight", "cls_token", "pos_embed"} <= set(sd)
    path = tmp_path / "mae_pretrain.pth"
    torch.save({"model": sd, "epoch": 799}, path)
    fresh = MAE(VisionTransformer(ViTConfig(**TINY, norm_eps=1e-6)),
                MAEConfig(decoder_dim=16, decoder_depth=2, decoder_heads=2, decoder_mlp_dim=48)).eval()
    load_mae_weights(fresh, path)
    x, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 16)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x, noise)[1], hf(pixel_values=x, noise=noise).logits, rtol=0, atol=1e-5)
    bad = dict(sd, decoder_pos_embed=torch.zeros_like(sd["decoder_pos_embed"]))
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="not the fixed 2-D sin-cos"):
        load_mae_weights(fresh, tmp_path / "bad.pth")


def test_create_model_loads_the_encoder_of_an_mae_checkpoint(hf_mae_dir, tmp_path):
    folder, hf = hf_mae_dir
    arch = dict(image_size=32, patch_size=8, dim=32, depth=2, heads=4, mlp_dim=64, norm_eps=1e-6)
    torch.save({"model": _original_layout(mae_from_hf(folder))}, tmp_path / "orig.pth")
    x = torch.randn(2, 3, 32, 32)
    hf.config.mask_ratio = 0.0
    try:
        with torch.no_grad():  # every patch, in noise order = raster order
            ref = hf.vit(pixel_values=x, noise=torch.arange(16.0).expand(2, 16)).last_hidden_state
    finally:
        hf.config.mask_ratio = 0.75
    for source in (folder, tmp_path / "orig.pth"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the fresh classifier head is announced
            clf = create_model("vit_tiny_patch16_224", pretrained=source, num_classes=5, **arch).eval()
        with torch.no_grad():
            torch.testing.assert_close(clf.forward_features(x), ref, rtol=0, atol=1e-5)


def test_hf_decoder_table_is_vitlab_sincos(hf_mae_dir):
    _, hf = hf_mae_dir
    table = hf.decoder.decoder_pos_embed[0].detach()
    assert torch.equal(table[0], torch.zeros(16))  # class row
    torch.testing.assert_close(table[1:], sincos_2d_pos_embed(16, GRID), rtol=0, atol=1e-6)
