"""ViT / DeiT numerical parity with Hugging Face transformers and timm (golden fixtures)."""

from __future__ import annotations

import pytest
import torch

import vitlab
from vitlab.models import DistilledVisionTransformer, ViTConfig, VisionTransformer
from vitlab.pretrained import convert_state_dict, load_model, load_state_dict_checked

from timm_fixtures import resample_reference, timm_fixture


def randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """Give every parameter a non-trivial value so every weight matters for parity."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 and ("norm" in name.lower()) and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            elif p.ndim >= 2 and "embed" not in name and "token" not in name:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))


HF_CONFIGS = {
    "tiny": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=32, patch_size=8),
    "base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072, image_size=224, patch_size=16),
}


@pytest.mark.parametrize("size", ["tiny", "base"])
def test_hf_vit_for_image_classification_parity(size, tmp_path):
    transformers = pytest.importorskip("transformers")  # only the HF tests need it
    cfg = transformers.ViTConfig(**HF_CONFIGS[size], num_labels=10, layer_norm_eps=1e-6)
    hf = transformers.ViTForImageClassification(cfg).eval()
    randomize(hf, seed=1)
    hf.save_pretrained(tmp_path / "hf")
    x = torch.randn(2 if size == "tiny" else 1, 3, cfg.image_size, cfg.image_size)
    with torch.no_grad():
        ref = hf(pixel_values=x).logits
    model = load_model(tmp_path / "hf").eval()  # architecture read from config.json
    assert isinstance(model, VisionTransformer) and model.config.dim == cfg.hidden_size
    with torch.no_grad():
        out = model(x)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=0)
    if size == "base":
        # The same checkpoint through create_model with the registered name.
        named = vitlab.create_model("vit_base_patch16_224", pretrained=tmp_path / "hf", num_classes=10).eval()
        with torch.no_grad():
            torch.testing.assert_close(named(x), ref, atol=1e-4, rtol=0)


def test_hf_vit_model_features_parity(tmp_path):
    transformers = pytest.importorskip("transformers")  # only the HF tests need it
    """A ViTModel checkpoint (no classifier): features match; the head is initialised fresh."""
    cfg = transformers.ViTConfig(**HF_CONFIGS["tiny"], layer_norm_eps=1e-6)
    hf = transformers.ViTModel(cfg, add_pooling_layer=False).eval()
    randomize(hf, seed=2)
    hf.save_pretrained(tmp_path / "hf")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = hf(pixel_values=x).last_hidden_state
    with pytest.warns(UserWarning, match="classifier head not loaded"):
        model = vitlab.create_model(
            "vit_tiny_patch16_224", pretrained=tmp_path / "hf", num_classes=5,
            image_size=32, patch_size=8, dim=32, depth=2, heads=4, mlp_dim=64,
        ).eval()
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(x), ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("size", ["tiny", "base"])
def test_hf_deit_with_teacher_parity(size, tmp_path):
    transformers = pytest.importorskip("transformers")  # only the HF tests need it
    cfg = transformers.DeiTConfig(**HF_CONFIGS[size], num_labels=7, layer_norm_eps=1e-6)
    hf = transformers.DeiTForImageClassificationWithTeacher(cfg).eval()
    randomize(hf, seed=3)
    hf.save_pretrained(tmp_path / "hf")
    x = torch.randn(1, 3, cfg.image_size, cfg.image_size)
    with torch.no_grad():
        ref = hf(pixel_values=x)
    model = load_model(tmp_path / "hf")
    assert isinstance(model, DistilledVisionTransformer)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref.logits, atol=1e-4, rtol=0)
        model.train()
        for m in model.modules():  # dropout-free anyway; train mode returns both heads
            m.training = True
        cls_logits, dist_logits = model(x)
    torch.testing.assert_close(cls_logits, ref.cls_logits, atol=1e-4, rtol=0)
    torch.testing.assert_close(dist_logits, ref.distillation_logits, atol=1e-4, rtol=0)


def _fixture(case: str):
    """(timm kwargs, timm state dict, other tensors) of ``timm_<case>.safetensors``."""
    return timm_fixture(case)[:3]


def _vit_config(kw) -> ViTConfig:
    extra = dict(pool="mean", class_token=False) if kw.get("global_pool") == "avg" else {}
    return ViTConfig(
        image_size=kw["img_size"], patch_size=kw["patch_size"], in_channels=kw["in_chans"],
        num_classes=kw["num_classes"], dim=kw["embed_dim"], depth=kw["depth"], heads=kw["num_heads"],
        mlp_dim=int(kw["embed_dim"] * kw["mlp_ratio"]), qkv_bias=kw["qkv_bias"], **extra,
    )


@pytest.mark.parametrize("case", ["vit", "vit_gap", "deit_distilled"])
def test_timm_golden_fixture_parity(case):
    kw, sd, t = _fixture(case)
    cls = DistilledVisionTransformer if case.startswith("deit") else VisionTransformer
    model = cls(_vit_config(kw)).eval()
    converted, layout = convert_state_dict(sd, model)
    assert layout == "timm"
    load_state_dict_checked(model, converted)
    with torch.no_grad():
        torch.testing.assert_close(model(t["input"]), t["output"], atol=1e-5, rtol=0)
        torch.testing.assert_close(model.forward_features(t["input"]), t["features"], atol=1e-5, rtol=0)
        if case == "deit_distilled":
            model.train()
            cls_logits, dist_logits = model(t["input"])
            torch.testing.assert_close(cls_logits, t["output_head"], atol=1e-5, rtol=0)
            torch.testing.assert_close(dist_logits, t["output_head_dist"], atol=1e-5, rtol=0)


def test_timm_fixture_through_file_and_create_model(tmp_path):
    """A timm checkpoint file on disk loads through create_model and vitlab convert."""
    from safetensors.torch import save_file

    kw, sd, t = _fixture("vit")
    path = tmp_path / "timm_vit.safetensors"
    save_file(sd, str(path))
    overrides = dict(image_size=32, patch_size=8, dim=24, depth=2, heads=3, mlp_dim=96)
    model = vitlab.create_model("vit_tiny_patch16_224", pretrained=path, num_classes=10, **overrides).eval()
    torch.testing.assert_close(model(t["input"]), t["output"], atol=1e-5, rtol=0)
    # A different grid: the position embedding is resampled, the model still runs and differs slightly.
    bigger = vitlab.create_model("vit_tiny_patch16_224", pretrained=path, num_classes=10, **{**overrides, "image_size": 48})
    assert bigger.pos_embed.weight.shape == (1, 1 + 36, 24)
    # timm's filter would give exactly these grid rows (bicubic, antialias), class row kept.
    torch.testing.assert_close(bigger.pos_embed.weight.detach(), resample_reference()["vit.pos_embed.6x6"], atol=1e-6, rtol=0)
    torch.testing.assert_close(bigger.pos_embed.weight[:, :1], sd["pos_embed"][:, :1])


@pytest.mark.parametrize("grid", [(6, 6), (6, 5), (3, 2)], ids=["6x6", "6x5", "3x2"])
@pytest.mark.parametrize("case", ["vit", "vit_gap", "deit_distilled"])
def test_timm_checkpoint_on_another_grid_resamples_like_timm(case, grid):
    """Loading the 4x4-grid fixture into a model with another grid gives the position embedding
    timm's ``checkpoint_filter_fn`` gives (stored in timm_resample.safetensors), prefix rows kept."""
    kw, sd, _ = _fixture(case)
    cls = DistilledVisionTransformer if case.startswith("deit") else VisionTransformer
    model = cls(_vit_config({**kw, "img_size": (8 * grid[0], 8 * grid[1])}))
    load_state_dict_checked(model, convert_state_dict(sd, model)[0])
    expected = resample_reference()[f"{case}.pos_embed.{grid[0]}x{grid[1]}"]
    assert model.pos_embed.weight.shape == expected.shape
    assert expected.std() > 0.1  # a zeroed or constant grid could not match by chance
    torch.testing.assert_close(model.pos_embed.weight.detach(), expected, atol=1e-6, rtol=0)
