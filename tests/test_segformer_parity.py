"""A Hugging Face SegformerForSemanticSegmentation folder loads into vitlab with the same logits."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from vitlab.errors import CheckpointError
from vitlab.tasks.segmentation.convert_segformer import load_segformer
from vitlab.tasks.segmentation.heads import backbone_intermediates



def transformers_module():
    """``transformers``, or a skip of the calling test only (the rest of the file needs no transformers)."""
    return pytest.importorskip("transformers")


TINY = dict(
    num_channels=3, num_encoder_blocks=4, depths=[1, 2, 1, 1], sr_ratios=[8, 4, 2, 1], hidden_sizes=[8, 16, 24, 32],
    num_attention_heads=[1, 2, 3, 4], mlp_ratios=[4, 2, 4, 4], decoder_hidden_size=16, num_labels=5,
)


def _hf_model(**overrides):
    torch.manual_seed(0)
    cfg = transformers_module().SegformerConfig(**{**TINY, **overrides})
    model = transformers_module().SegformerForSemanticSegmentation(cfg).eval()
    with torch.no_grad():  # move every weight off its init (norms at 1/0, BN stats at 0/1)
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
        bn = model.decode_head.batch_norm
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
    return model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model = _hf_model()
    folder = tmp_path_factory.mktemp("segformer")
    model.save_pretrained(folder)
    return model, folder


@pytest.mark.parametrize("size", [(64, 64), (45, 67)])
def test_segformer_logits_match(saved, size) -> None:
    hf, folder = saved
    ours = load_segformer(folder)
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        ref = hf(pixel_values=x).logits  # (B, K, H/4, W/4)
        head_logits = ours.head(backbone_intermediates(ours.backbone, x, [0, 1, 2, 3]))
        full = ours(x)
    torch.testing.assert_close(head_logits, ref, atol=1e-5, rtol=0)
    ref_full = F.interpolate(ref, size=size, mode="bilinear", align_corners=False)
    torch.testing.assert_close(full, ref_full, atol=1e-5, rtol=0)


def test_released_checkpoint_key_layout_loads(saved, tmp_path) -> None:
    """The nvidia/segformer-* checkpoints use transformers 4's names (encoder.block.N.M, attention.self.query, linear_c)."""
    from safetensors.torch import save_file

    hf, folder = saved
    old = {}
    for k, v in hf.state_dict().items():
        k = k.replace("decode_head.linear_projections.", "decode_head.linear_c.")
        for new, legacy in ((".layernorm_before.", ".layer_norm_1."), (".layernorm_after.", ".layer_norm_2."),
                            (".attention.q_proj.", ".attention.self.query."),
                            (".attention.k_proj.", ".attention.self.key."),
                            (".attention.v_proj.", ".attention.self.value."),
                            (".attention.o_proj.", ".attention.output.dense."),
                            (".attention.sequence_reduction.sequence_reduction.", ".attention.self.sr."),
                            (".attention.sequence_reduction.layer_norm.", ".attention.self.layer_norm."),
                            (".mlp.fc1.", ".mlp.dense1."), (".mlp.fc2.", ".mlp.dense2.")):
            k = k.replace(new, legacy)
        parts = k.split(".")
        if k.startswith("segformer.stages."):
            s = parts[2]
            if parts[3] == "patch_embeddings":
                k = ".".join(["segformer.encoder.patch_embeddings", s] + parts[4:])
            elif parts[3] == "blocks":
                k = ".".join(["segformer.encoder.block", s] + parts[4:])
            elif parts[3] == "layer_norm":
                k = ".".join(["segformer.encoder.layer_norm", s] + parts[4:])
        old[k] = v.contiguous()
    assert any(k.startswith("segformer.encoder.block.0.0.attention.self.query") for k in old)
    save_file(old, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    ours = load_segformer(tmp_path)
    x = torch.randn(1, 3, 64, 48)
    with torch.no_grad():
        torch.testing.assert_close(ours.head(backbone_intermediates(ours.backbone, x, [0, 1, 2, 3])),
                                   hf(pixel_values=x).logits, atol=1e-5, rtol=0)


def test_encoder_pvt_v2_cannot_express_is_refused(tmp_path) -> None:
    model = _hf_model(patch_sizes=[7, 5, 3, 3])
    model.save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match=r"cannot be expressed by vitlab's PVT v2: patch_sizes \[7, 5, 3, 3\]"):
        load_segformer(tmp_path)


def test_weights_that_do_not_fit_the_config(saved, tmp_path) -> None:
    hf, folder = saved
    cfg = json.loads((folder / "config.json").read_text())
    cfg["hidden_sizes"] = [8, 16, 24, 40]
    cfg["num_attention_heads"] = [1, 2, 3, 4]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes())
    with pytest.raises(CheckpointError, match="does not fit its config.json: size mismatch"):
        load_segformer(tmp_path)


def test_not_a_segformer_folder(tmp_path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "vit"}))
    with pytest.raises(CheckpointError, match="not a SegFormer"):
        load_segformer(tmp_path)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_segformer(tmp_path / "nowhere")


def test_segformer_parity_in_float64_is_exact(saved) -> None:
    """In float64 the two agree to 1e-10, tight enough to see any LayerNorm epsilon differing
    from SegFormer's 1e-5 (a 1e-6 epsilon, HF PvtV2's, moves logits by ~1e-7)."""
    hf, folder = saved
    ours = load_segformer(folder).double()
    ref_model = _hf_model().double()
    x = torch.randn(1, 3, 48, 40, dtype=torch.float64)
    with torch.no_grad():
        ref = ref_model(pixel_values=x).logits
        got = ours.head(backbone_intermediates(ours.backbone, x, [0, 1, 2, 3]))
    torch.testing.assert_close(got, ref, atol=1e-10, rtol=0)
