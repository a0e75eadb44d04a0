"""YOLOS: parity with Hugging Face's ``YolosForObjectDetection``, gradients, the DETR loss, bad checkpoints.

transformers is a dev dependency (the reference); these tests skip without it.
"""

import json

import pytest
import torch

from vitlab.errors import CheckpointError
from vitlab.models.vit import ViTConfig
from vitlab.tasks.detection import DETRLoss, HungarianMatcher, postprocess_detections
from vitlab.tasks.detection.convert_yolos import convert_hf_yolos, load_hf_yolos
from vitlab.tasks.detection.yolos import YOLOS, YOLOSConfig



def transformers_module():
    """``transformers``, or a skip of the calling test only (the vitlab-only tests need no transformers)."""
    return pytest.importorskip("transformers")


NUM_LABELS = 4
TRAIN_SIZE = (32, 48)  # a 4x6 patch grid with patch 8


def _hf_model(mid: bool, seed: int = 0):
    """A tiny random HF YOLOS whose weights are scaled up so outputs differ clearly between images and queries."""
    torch.manual_seed(seed)
    cfg = transformers_module().YolosConfig(
        hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64, image_size=list(TRAIN_SIZE),
        patch_size=8, num_detection_tokens=6, num_labels=NUM_LABELS, use_mid_position_embeddings=mid,
    )
    model = transformers_module().YolosForObjectDetection(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layernorm" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(0.3 * torch.randn_like(p))  # HF's init (std 0.02) gives near-constant outputs
    return model


@pytest.fixture(scope="module", params=[True, False], ids=["mid_pos", "no_mid_pos"])
def pair(request, tmp_path_factory):
    hf = _hf_model(request.param)
    folder = tmp_path_factory.mktemp("yolos")
    hf.save_pretrained(folder)
    return hf, load_hf_yolos(folder), folder


@pytest.mark.parametrize("size", [TRAIN_SIZE, (48, 64), (24, 40)], ids=["train", "larger", "smaller"])
def test_logits_and_boxes_equal_huggingface(pair, size):
    hf, ours, _ = pair
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        ref = hf(pixel_values=x)
        out = ours(x)
    assert ref.logits.std() > 0.1 and (ref.pred_boxes[0] - ref.pred_boxes[1]).abs().max() > 0.05  # a real signal
    torch.testing.assert_close(out["logits"], ref.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["pred_boxes"], ref.pred_boxes, atol=1e-5, rtol=1e-5)


def test_mid_position_embeddings_follow_the_config(pair):
    hf, ours, _ = pair
    assert (ours.mid_pos_embed is not None) == hf.config.use_mid_position_embeddings
    if ours.mid_pos_embed is not None:
        assert ours.mid_pos_embed.shape == (2, 1 + 4 * 6 + 6, 32)


def test_transformers4_mid_position_key_loads(pair):
    hf, ours, _ = pair
    sd = hf.state_dict()
    if "vit.encoder.mid_position_embeddings" in sd:
        sd["vit.encoder.interpolation.mid_position_embeddings"] = sd.pop("vit.encoder.mid_position_embeddings")
    converted = convert_hf_yolos(sd, ours)
    own = ours.state_dict()
    assert converted.keys() == own.keys()
    for k in own:
        assert torch.equal(converted[k], own[k]), k


def _targets():
    g = torch.Generator().manual_seed(3)
    targets = []
    for n in (3, 0):
        cxcy = torch.rand(n, 2, generator=g) * 0.6 + 0.2
        wh = torch.rand(n, 2, generator=g) * 0.3 + 0.05
        targets.append({"labels": torch.randint(0, NUM_LABELS, (n,), generator=g), "boxes": torch.cat([cxcy, wh], 1)})
    return targets


def test_detr_loss_on_yolos_outputs_equals_huggingface_loss(pair):
    """HF computes its loss inside the model (matching included); DETRLoss on our outputs must give the same terms."""
    hf, ours, _ = pair
    x = torch.randn(2, 3, *TRAIN_SIZE)
    targets = _targets()
    with torch.no_grad():
        ref = hf(pixel_values=x, labels=[{"class_labels": t["labels"], "boxes": t["boxes"]} for t in targets])
        out = ours(x)
    c = hf.config
    loss = DETRLoss(
        NUM_LABELS, HungarianMatcher(c.class_cost, c.bbox_cost, c.giou_cost), eos_coef=c.eos_coefficient,
        weight_bbox=c.bbox_loss_coefficient, weight_giou=c.giou_loss_coefficient, aux_loss=False,
    )(out, targets)
    for name in ("loss_ce", "loss_bbox", "loss_giou"):
        assert loss[name].item() == pytest.approx(ref.loss_dict[name].item(), rel=1e-5, abs=1e-6), name
    assert loss["loss"].item() == pytest.approx(ref.loss.item(), rel=1e-5)


def test_postprocessing_equals_huggingface_image_processor(pair):
    hf, ours, _ = pair
    x = torch.randn(2, 3, *TRAIN_SIZE)
    with torch.no_grad():
        ref_out = hf(pixel_values=x)
        out = ours(x)
    sizes = [(32, 48), (64, 40)]
    ref = transformers_module().YolosImageProcessor().post_process_object_detection(ref_out, threshold=0.3, target_sizes=sizes)
    got = postprocess_detections(out["logits"], out["pred_boxes"], sizes, score_threshold=0.3)
    for r, o, (h, w) in zip(ref, got, sizes):
        order = r["scores"].argsort(descending=True, stable=True)
        scale = torch.tensor([w, h, w, h], dtype=torch.float32)
        assert len(order) > 0
        torch.testing.assert_close(o["scores"], r["scores"][order])
        assert o["labels"].tolist() == r["labels"][order].tolist()
        torch.testing.assert_close(o["boxes"], torch.minimum(r["boxes"][order].clamp(min=0), scale))


def _tiny(mid: bool = True) -> YOLOS:
    vit = ViTConfig(image_size=(16, 24), patch_size=8, dim=16, depth=3, heads=2, mlp_dim=32, pad_input=False)
    return YOLOS(YOLOSConfig(vit=vit, num_classes=3, num_detection_tokens=4, use_mid_position_embeddings=mid))


@pytest.mark.parametrize("mid", [True, False])
def test_detr_loss_gradients_reach_every_parameter(mid):
    model = _tiny(mid).train()
    targets = [{"labels": torch.tensor([0, 2]), "boxes": torch.tensor([[0.3, 0.4, 0.2, 0.2], [0.7, 0.6, 0.3, 0.4]])},
               {"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.5, 0.5]])}]
    out = model(torch.randn(2, 3, 24, 32))  # another size than the config's: the resampling is differentiable too
    DETRLoss(3)(out, targets)["loss"].backward()
    dead = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not dead, dead
    assert {n for n, _ in model.named_parameters()} >= {"det_token", "det_pos_embed", "backbone.cls_token"}


def test_hf_vit_checkpoint_is_refused_with_one_clear_error(tmp_path):
    cfg = transformers_module().ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                                 image_size=32, patch_size=8, num_labels=3)
    transformers_module().ViTForImageClassification(cfg).save_pretrained(tmp_path)
    with pytest.raises(CheckpointError) as e:
        load_hf_yolos(tmp_path)
    msg = str(e.value)
    assert "\n" not in msg and "YOLOS" in msg and "'vit'" in msg


def test_yolos_weights_that_do_not_fit_the_config_give_one_clear_error(pair, tmp_path):
    hf, _, _ = pair
    hf.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["num_detection_tokens"] = 7  # the weights hold 6
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError) as e:
        load_hf_yolos(tmp_path)
    msg = str(e.value)
    assert "\n" not in msg and "does not fit" in msg and "det_token" in msg


def test_detection_weights_missing_give_one_clear_error(pair):
    hf, ours, _ = pair
    sd = {k: v for k, v in hf.state_dict().items() if "detection_tokens" not in k}
    with pytest.raises(CheckpointError, match="detection_tokens"):
        convert_hf_yolos(sd, ours)


def test_grad_checkpointing_recomputes_blocks_with_the_same_gradients():
    torch.manual_seed(1)
    model = _tiny().train()
    x = torch.randn(2, 3, 16, 24)
    calls = []
    for blk in model.backbone.blocks:
        blk.register_forward_pre_hook(lambda *_: calls.append(1))  # the recompute may stop before the end

    def grads(checkpointing):
        model.zero_grad()
        model.set_grad_checkpointing(checkpointing)
        calls.clear()
        out = model(x)
        (out["logits"].square().sum() + out["pred_boxes"].sum()).backward()
        return len(calls), {n: p.grad.clone() for n, p in model.named_parameters()}

    n_plain, plain = grads(False)
    n_ckpt, ckpt = grads(True)
    assert (n_plain, n_ckpt) == (3, 6)  # every block runs again in the backward pass
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], msg=name)


def test_no_weight_decay_names_the_tokens_and_position_embeddings():
    model = _tiny()
    names = model.no_weight_decay()
    assert names <= {n for n, _ in model.named_parameters()}
    assert names >= {"backbone.cls_token", "backbone.pos_embed.weight", "det_token", "det_pos_embed", "mid_pos_embed"}
    assert not any(n.endswith("weight") for n in names - {"backbone.pos_embed.weight"})


# ------------------------------------------------------------------ register tokens (Darcet et al.)
def _tiny_reg(no_embed_class: bool | None = None, mid: bool = True) -> YOLOS:
    vit = ViTConfig(image_size=(16, 24), patch_size=8, dim=16, depth=3, heads=2, mlp_dim=32, pad_input=False,
                    reg_tokens=2, no_embed_class=no_embed_class)
    torch.manual_seed(0)
    model = YOLOS(YOLOSConfig(vit=vit, num_classes=3, num_detection_tokens=4, use_mid_position_embeddings=mid))
    with torch.no_grad():  # distinct, clearly non-zero tokens so a mix-up shows
        model.backbone.reg_token.normal_(std=1.0)
        model.backbone.cls_token.normal_(std=1.0)
    return model.eval()


def _block_inputs(model: YOLOS, x: torch.Tensor) -> list[torch.Tensor]:
    seen = []
    hooks = [blk.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach()))
             for blk in model.backbone.blocks]
    try:
        with torch.no_grad():
            out = model(x)
    finally:
        for h in hooks:
            h.remove()
    return seen, out


@pytest.mark.parametrize("size", [(16, 24), (24, 32)], ids=["train", "other"])
def test_registers_are_prefix_tokens_without_position_and_the_heads_skip_them(size):
    model = _tiny_reg()
    vit = model.backbone
    n = (size[0] // 8) * (size[1] // 8)
    assert vit.pos_embed.weight.shape == (1, 6, 16) and model.mid_pos_embed.shape == (2, 6 + 4, 16)  # grid, det only
    x = torch.randn(2, 3, *size)
    inputs, out = _block_inputs(model, x)
    first = inputs[0]  # (B, cls + 2 registers + N + Q, C)
    assert first.shape == (2, 3 + n + 4, 16)
    patches, _ = vit.patch_embed(x)
    torch.testing.assert_close(first[:, 0], vit.cls_token[0].expand(2, -1))  # no position row
    torch.testing.assert_close(first[:, 1:3], vit.reg_token[0].expand(2, -1, -1))  # registers: no position either
    if size == (16, 24):  # patches and detection tokens get exactly their own rows
        torch.testing.assert_close(first[:, 3:3 + n], patches + vit.pos_embed.weight)
        torch.testing.assert_close(first[:, 3 + n:], (model.det_token + model.det_pos_embed).expand(2, -1, -1))
    # the heads read the last Q tokens: predictions per image = detection tokens, not registers
    assert out["logits"].shape == (2, 4, 4) and out["pred_boxes"].shape == (2, 4, 4)
    with torch.no_grad():
        final = model.forward_tokens(x)
        torch.testing.assert_close(out["logits"], model.class_head(final[:, -4:]))


def test_mid_position_embedding_skips_the_registers():
    model = _tiny_reg()
    x = torch.randn(1, 3, 16, 24)
    captured = []
    h = model.backbone.blocks[0].register_forward_hook(lambda _m, _a, y: captured.append(y.detach()))
    inputs, _ = _block_inputs(model, x)
    h.remove()
    added = inputs[1] - captured[0]  # what YOLOS added between block 1 and block 2
    torch.testing.assert_close(added[:, :3], torch.zeros_like(added[:, :3]))  # class token, registers: nothing
    torch.testing.assert_close(added[0, 3:], model.mid_pos_embed[0])


def test_registers_with_position_rows_when_no_embed_class_is_false():
    model = _tiny_reg(no_embed_class=False)
    vit = model.backbone
    assert vit.pos_embed.weight.shape == (1, 3 + 6, 16) and model.mid_pos_embed.shape == (2, 3 + 6 + 4, 16)
    x = torch.randn(2, 3, 24, 32)  # another size: the grid rows resample, the 3 prefix rows are kept
    inputs, out = _block_inputs(model, x)
    pe = vit.pos_embed.weight
    torch.testing.assert_close(inputs[0][:, 1:3], (vit.reg_token + pe[:, 1:3]).expand(2, -1, -1))
    torch.testing.assert_close(inputs[0][:, 0], (vit.cls_token + pe[:, :1])[0].expand(2, -1))
    assert inputs[0].shape == (2, 3 + 12 + 4, 16) and out["logits"].shape == (2, 4, 4)


def test_registers_get_gradients_and_change_the_detections():
    model = _tiny_reg().train()
    targets = [{"labels": torch.tensor([0]), "boxes": torch.tensor([[0.5, 0.5, 0.3, 0.3]])}]
    DETRLoss(3)(model(torch.randn(1, 3, 16, 24)), targets)["loss"].backward()
    assert model.backbone.reg_token.grad is not None and model.backbone.reg_token.grad.abs().sum() > 0
    model.eval()
    x = torch.randn(1, 3, 16, 24)
    with torch.no_grad():
        before = model(x)["pred_boxes"]
        g = torch.Generator().manual_seed(1)
        model.backbone.reg_token.add_(torch.randn(model.backbone.reg_token.shape, generator=g))
        assert not torch.allclose(model(x)["pred_boxes"], before, atol=1e-4)
    assert "backbone.reg_token" in model.no_weight_decay()
