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
