"""CLIP as a task of the engine (issue 15): caption datasets, the ITM head with hard negatives
and re-ranking, duplicate-aware targets through the task, the temperature clamp after every
optimizer step, 2-rank DDP with features gathered with gradients, and the CLI
(train --task clip, zero-shot, retrieve, eval)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from optional import needs  # noqa: E402
from vitlab.cli import main as cli  # noqa: E402
from vitlab.components.attention import CrossAttention  # noqa: E402
from vitlab.datasets.captions import (  # noqa: E402
    DIGIT_TEMPLATES,
    DIGIT_WORDS,
    CaptionFolder,
    DigitCaptions,
    SceneCaptions,
    scene_caption,
)
from vitlab.datasets.digits import DigitsDataset  # noqa: E402
from vitlab.models.text import text_config  # noqa: E402
from vitlab.tasks import get_task  # noqa: E402
from vitlab.tasks.clip import CLIP, CLIPConfig, CLIPTask, clip_loss  # noqa: E402
from vitlab.tasks.clip.itm import ITMHead, itm_loss, mine_hard_negatives, rerank_top_k  # noqa: E402
from vitlab.tasks.clip.tokenizer import CLIPTokenizer  # noqa: E402
from vitlab.tasks.base import Batch  # noqa: E402
from vitlab.training import build_trainer, load_config  # noqa: E402

HERE = Path(__file__).parent
#: A tiny CLIP on digit captions for engine runs (seconds on a CPU).
TINY = ["task=clip", "progress=false", "device=cpu", "augment.affine_p=0.0",
        "model.overrides={patch_size: 4, dim: 16, depth: 1, heads: 2, mlp_dim: 32}",
        "clip={embed_dim: 16, text_overrides: {dim: 16, depth: 1, heads: 2, mlp_dim: 32}, captions_per_image: 1, "
        "vocab_size: 64}"]


#: The CLIP tokenizer (tokenizers) and the digits (scikit-learn); the other tests run without them.
needs_tokenizers_and_digits = needs("tokenizers", "sklearn.datasets", extra="pip install 'vitlab[clip,digits]'")


def tiny_clip(itm_depth: int = 0, vocab: int = 40, channels: int = 1, context: int = 8) -> CLIP:
    cfg = CLIPConfig(image_model="vit_tiny_patch16_224",
                     image_overrides=dict(image_size=16, patch_size=4, in_channels=channels, dim=16, depth=1, heads=2,
                                          mlp_dim=32),
                     text=text_config("clip_text_tiny", vocab_size=vocab, dim=16, depth=1, heads=2, mlp_dim=32,
                                      context_length=context),
                     embed_dim=8, itm_depth=itm_depth)
    return CLIP(cfg)


# ------------------------------------------------------------------------ caption datasets
@needs_tokenizers_and_digits
def test_digit_captions_vary_templates_and_keep_the_class():
    data = DigitCaptions("train", captions_per_image=2)
    digits = DigitsDataset("train")
    assert len(data) == 2 * len(digits)
    used = set()
    for i in range(0, len(data), 37):
        s = data[i]
        label = digits.targets[i % len(digits)]
        assert s["label"] == label
        torch.testing.assert_close(s["image"], digits[i % len(digits)][0], atol=0, rtol=0)
        name = s["caption"].split()[-1]
        assert name in (str(label), DIGIT_WORDS[label]), s["caption"]
        template = s["caption"][: -len(name)] + "{}"
        assert template in DIGIT_TEMPLATES
        used.add(template)
    assert len(used) >= 6  # varied templates, not one
    # the same index always gets the same caption
    assert data.caption(11) == DigitCaptions("train", captions_per_image=2).caption(11)
    # the test digits are held out
    assert not set(DigitCaptions("test").digits.indices.tolist()) & set(digits.indices.tolist())


@needs_tokenizers_and_digits
def test_scene_captions_are_compositional_and_follow_the_boxes():
    boxes = torch.tensor([[20.0, 2, 30, 12], [1, 4, 11, 14]])  # digit 3 on the right, 7 on the left
    labels = torch.tensor([3, 7])
    assert scene_caption(boxes, labels) == ("a 7 to the left of a 3", 73)
    assert scene_caption(boxes, labels, converse=True) == ("a 3 to the right of a 7", 73)
    assert scene_caption(boxes[[1, 0]], labels[[1, 0]])[1] == 73  # order of the boxes does not matter
    swapped = torch.tensor([[1.0, 2, 11, 12], [20, 4, 30, 14]])
    assert scene_caption(swapped, labels) == ("a 3 to the left of a 7", 37)  # same words, other layout
    vertical = torch.tensor([[0.0, 20, 10, 30], [2, 0, 12, 10]])
    assert scene_caption(vertical, labels) == ("a 7 above a 3", 173)
    assert scene_caption(vertical, labels, converse=True) == ("a 3 below a 7", 173)
    data = SceneCaptions("val", num_scenes=12)
    for i in range(12):
        s, scene = data[i], data.scenes[i]
        b, lab = scene["boxes"], scene["labels"]
        cx, cy = (b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2
        words = s["caption"].split()
        if words[1] == "single":  # the second digit found no free place
            assert len(b) == 1 and s["caption"] == f"a single {int(lab[0])}"
            continue
        first, second = int(words[1]), int(words[-1])
        if "left" in words or "right" in words:
            assert abs(cx[0] - cx[1]) >= abs(cy[0] - cy[1])
            left = int(lab[int(cx.argmin())])
            assert left == (first if "left" in words else second), (s["caption"], b, lab)
        else:
            top = int(lab[int(cy.argmin())])
            assert top == (first if "above" in words else second), (s["caption"], b, lab)
        assert s["image"].shape == (1, 24, 24)


@needs_tokenizers_and_digits
def test_scene_negative_caption_is_the_mirror_layout_in_the_same_phrasing():
    data = SceneCaptions("val", num_scenes=40, canvas_size=16, digit_size=(8, 8))
    seen = 0
    for i in range(40):
        s, scene = data[i], data.scenes[i]
        words = s["caption"].split()
        if words[1] == "single" or words[1] == words[-1]:  # one digit, or two equal ones: no mirror layout
            assert s["negative_caption"] == ""
            continue
        # by hand: the caption's two numerals exchanged, every other word kept
        assert s["negative_caption"].split() == [words[0], words[-1], *words[2:-1], words[1]]
        # and it describes the boxes with their digits exchanged (another layout group)
        mirror, group = scene_caption(scene["boxes"], scene["labels"].flip(0), converse="right" in words or "below" in words)
        assert s["negative_caption"] == mirror and group != s["label"]
        seen += 1
    assert seen >= 10


def _png(path: Path, value: int = 128) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((10, 12, 3), value, dtype=np.uint8)).save(path)


def test_caption_folder_reads_csv_and_jsonl_and_groups_equal_captions(tmp_path):
    for name in ("a.png", "b.png", "sub/c.png"):
        _png(tmp_path / name)
    (tmp_path / "captions.csv").write_text("image,caption\na.png,a red  square\nb.png,a blue square\n"
                                           "sub/c.png,a red square\n")
    data = CaptionFolder(tmp_path, image_size=16)
    assert [data[i]["caption"] for i in range(3)] == ["a red square", "a blue square", "a red square"]
    assert [data[i]["label"] for i in range(3)] == [0, 1, 0]  # equal captions: one group
    assert data[0]["image"].shape == (3, 16, 16)
    torch.testing.assert_close(data[0]["image"], torch.full((3, 16, 16), 128 / 255))
    jl = tmp_path / "caps.jsonl"
    jl.write_text(json.dumps({"image": "a.png", "caption": "one"}) + "\n\n" + json.dumps({"image": "b.png", "caption": "two"}))
    assert [data[i]["caption"] for i, data in [(0, CaptionFolder(tmp_path, jl)), (1, CaptionFolder(tmp_path, jl))]] == ["one", "two"]
    grey = CaptionFolder(tmp_path, jl, channels=1, image_size=4)
    assert grey[0]["image"].shape == (1, 4, 4)
    train, val = CaptionFolder(tmp_path, split="train", val_fraction=0.34), CaptionFolder(tmp_path, split="val", val_fraction=0.34)
    assert len(train) + len(val) == 3 and len(val) == 1


@pytest.mark.parametrize("content,error,match", [
    ("image,caption\na.png,ok\nmissing.png,a cat\n", FileNotFoundError, r"captions.csv line 3: image 'missing.png' not found"),
    ("image,caption\na.png,  \n", ValueError, r"captions.csv line 2: empty caption for image 'a.png'"),
    ("file,text\na.png,a cat\n", ValueError, r"must have the columns 'image' and 'caption'; it lacks \['image', 'caption'\]"),
])
def test_caption_folder_errors_name_the_file_and_line(tmp_path, content, error, match):
    _png(tmp_path / "a.png")
    (tmp_path / "captions.csv").write_text(content)
    with pytest.raises(error, match=match):
        CaptionFolder(tmp_path)


def test_caption_folder_jsonl_and_missing_file_errors(tmp_path):
    _png(tmp_path / "a.png")
    (tmp_path / "c.jsonl").write_text('{"image": "a.png", "text": "x"}\n')
    with pytest.raises(ValueError, match=r"c.jsonl line 1 must be an object with the keys 'image' and 'caption'"):
        CaptionFolder(tmp_path, "c.jsonl")
    (tmp_path / "c.jsonl").write_text('{"image": "a.png", \n')
    with pytest.raises(ValueError, match=r"c.jsonl line 1 is not valid JSON"):
        CaptionFolder(tmp_path, "c.jsonl")
    with pytest.raises(FileNotFoundError, match=r"has no captions.csv or captions.jsonl"):
        CaptionFolder(tmp_path)


# ---------------------------------------------------------------------------------- ITM
def test_hard_negatives_are_the_most_similar_non_positives():
    sim = torch.tensor([[0.9, 0.8, 0.1],
                        [0.7, 0.6, 0.65],
                        [0.2, 0.3, 0.5]])
    pos = torch.tensor([[True, True, False],   # image 0 matches texts 0 and 1 (duplicate captions)
                        [True, True, False],
                        [False, False, True]])
    neg_t, has_t, neg_i, has_i = mine_hard_negatives(sim, pos)
    # image 0: non-positive texts {2} -> 2; image 1 -> 2; image 2: texts {0, 1}, 0.3 > 0.2 -> 1
    assert neg_t.tolist() == [2, 2, 1] and has_t.tolist() == [True, True, True]
    # text 0: non-positive images {2} -> 2; text 1 -> 2; text 2: images {0, 1}, 0.65 > 0.1 -> 1
    assert neg_i.tolist() == [2, 2, 1] and has_i.tolist() == [True, True, True]
    all_pos = torch.ones(2, 2, dtype=torch.bool)
    assert mine_hard_negatives(torch.rand(2, 2), all_pos)[1].tolist() == [False, False]


def test_itm_head_cross_attends_from_text_tokens_to_image_tokens():
    torch.manual_seed(0)
    head = ITMHead(text_dim=16, image_dim=12, depth=2, heads=2).eval()
    seen = []
    for m in head.modules():
        if isinstance(m, CrossAttention):
            m.register_forward_hook(lambda mod, args, kw, out: seen.append((args[0].shape, kw["context"].shape)),
                                    with_kwargs=True)
    text, image = torch.randn(3, 5, 16), torch.randn(3, 7, 12)
    eos = torch.tensor([4, 2, 3])
    logits = head(text, image, eos)
    assert logits.shape == (3,)
    assert seen == [(torch.Size([3, 5, 16]), torch.Size([3, 7, 16]))] * 2  # queries: text; keys/values: image
    other = image.clone()
    other[1] = torch.randn(7, 12)
    changed = head(text, other, eos)
    assert torch.equal(changed[[0, 2]], logits[[0, 2]]) and not torch.allclose(changed[1], logits[1])
    # text is causal: tokens after end-of-text do not change the logit
    late = text.clone()
    late[2, 4] += 1.0
    torch.testing.assert_close(head(late, image, eos)[2], logits[2])


def test_itm_head_reads_the_backbones_patch_tokens_and_their_positions():
    # "a 3 to the left of a 7" needs where things are: the head must cross-attend to every
    # patch token of the backbone (not a pooled vector), and those tokens carry position
    torch.manual_seed(0)
    model = tiny_clip(itm_depth=1).eval()
    contexts = []
    for m in model.itm.modules():
        if isinstance(m, CrossAttention):
            m.register_forward_hook(lambda mod, args, kw, out: contexts.append(kw["context"]), with_kwargs=True)
    images = torch.rand(2, 1, 16, 16)
    ids = torch.tensor([[38, 3, 4, 39, 0, 0, 0, 0]] * 2)
    _, txt_tok = model.text_features(ids)

    def logit(x: torch.Tensor) -> torch.Tensor:
        _, img_tok = model.image_features(x)
        return model.itm_logits(img_tok, txt_tok, ids)

    with torch.no_grad():
        base = logit(images)
        expected = model.itm.image_norm(model.itm.image_proj(model.visual.forward_features(images)))
        torch.testing.assert_close(contexts[-1], expected)
        assert contexts[-1].shape == (2, 1 + 16, 16)  # class token + a 4 x 4 grid of patches
        mirrored = torch.cat([images[..., 8:], images[..., :8]], dim=-1)  # left and right halves exchanged
        assert (logit(mirrored) - base).abs().min() > 1e-4  # the head tells a layout from its mirror
        model.visual.pos_embed.weight.zero_()  # without positions the patches are a set: no difference
        torch.testing.assert_close(logit(mirrored), logit(images), atol=1e-5, rtol=1e-5)


def test_rerank_reorders_only_the_top_k_by_the_itm_score():
    sim = torch.tensor([[0.9, 0.8, 0.7, 0.1],
                        [0.1, 0.2, 0.3, 0.4]])
    itm = torch.tensor([[-1.0, 2.0, 5.0, 9.0],     # item 3 is outside query 0's top-3: not re-ranked
                        [0.0, 0.0, 1.0, -3.0]])
    calls = []

    def score(q, g):
        calls.append(len(q))
        return itm[q, g]

    out = rerank_top_k(sim, 3, score)
    assert calls == [6]
    assert out[0].argsort(descending=True).tolist() == [2, 1, 0, 3]
    assert out[1].argsort(descending=True).tolist() == [2, 1, 3, 0]  # top-3 (3, 2, 1) re-ordered by ITM
    assert out[0, 3] == sim[0, 3] and out[1, 0] == sim[1, 0]  # the rest keep their similarity


def test_rerank_fusion_orders_the_top_k_by_itm_logit_plus_weighted_similarity():
    sim = torch.tensor([[0.9, 0.5, 0.4, 0.1]])
    itm = torch.tensor([[0.0, 1.0, 1.2, 9.0]])
    score = lambda q, g: itm[q, g]  # noqa: E731
    # by hand, top-3 = items 0, 1, 2: ITM alone 1.2 > 1.0 > 0.0; ITM + 10 x sim: 9.0 > 6.0 > 5.2
    assert rerank_top_k(sim, 3, score)[0].argsort(descending=True).tolist() == [2, 1, 0, 3]
    fused = rerank_top_k(sim, 3, score, fusion=10.0)
    assert fused[0].argsort(descending=True).tolist() == [0, 1, 2, 3]
    assert fused[0, 3] == sim[0, 3]


def test_training_forward_pairs_each_image_with_its_text_and_mined_negatives(monkeypatch):
    import vitlab.tasks.clip.model as clip_model

    torch.manual_seed(0)
    model = tiny_clip(itm_depth=1)
    ids = torch.tensor([[38, 3, 39, 0, 0, 0, 0, 0], [38, 4, 39, 0, 0, 0, 0, 0], [38, 3, 39, 0, 0, 0, 0, 0],
                        [38, 5, 6, 39, 0, 0, 0, 0]])
    labels = torch.tensor([0, 1, 0, 2])  # texts 0 and 2 are the same caption
    pairs, masks = [], []
    orig_itm, orig_mine = model.itm_logits, clip_model.mine_hard_negatives

    def spy(img_tok, txt_tok, ids_):
        pairs.append((img_tok, ids_))
        return orig_itm(img_tok, txt_tok, ids_)

    def spy_mine(sim, pos):
        masks.append(pos)
        return orig_mine(sim, pos)

    model.itm_logits = spy
    monkeypatch.setattr(clip_model, "mine_hard_negatives", spy_mine)
    images = torch.rand(4, 1, 16, 16)
    out = model(images, ids, labels, train_outputs=True)
    # the positives excluded from mining are all pairs with equal labels, not just the diagonal
    assert torch.equal(masks[0], labels[:, None] == labels[None, :])
    sim = out["image_emb"] @ out["text_emb"].t()
    masked = sim.detach().masked_fill(masks[0], -2.0)
    exp_texts = torch.cat([torch.arange(4), masked.argmax(1), torch.arange(4)])
    exp_images = torch.cat([torch.arange(4), torch.arange(4), masked.argmax(0)])
    img_tok, got_ids = pairs[0]
    assert torch.equal(got_ids, ids[exp_texts])
    _, all_tokens = model.image_features(images)
    torch.testing.assert_close(img_tok, all_tokens[exp_images])
    assert out["itm_targets"].tolist() == [1.0] * 4 + [0.0] * 8
    assert all(labels[t] != labels[i] for i, t in zip(exp_images[4:].tolist(), exp_texts[4:].tolist()))


@needs_tokenizers_and_digits
def test_training_forward_adds_each_scene_with_its_swapped_caption_as_a_negative(monkeypatch):
    torch.manual_seed(0)
    tok = CLIPTokenizer.train(SceneCaptions("val", num_scenes=1).corpus(), vocab_size=40, context_length=8)
    task = CLIPTask(tok, (0.5,), (0.5,))
    raw = {"image": torch.rand(3, 1, 16, 16), "label": torch.tensor([37, 73, 201]),
           "caption": ["a 3 to the left of a 7", "a 7 to the left of a 3", "a single 1"],
           "negative_caption": ["a 7 to the left of a 3", "a 3 to the left of a 7", ""]}
    batch = task.prepare(raw, torch.device("cpu"), 16, None)
    model = tiny_clip(itm_depth=1, vocab=tok.vocab_size).train()
    pairs = []
    orig_itm = model.itm_logits

    def spy(img_tok, txt_tok, ids_):
        pairs.append((img_tok, txt_tok, ids_))
        return orig_itm(img_tok, txt_tok, ids_)

    model.itm_logits = spy
    out = task.forward(model, batch.inputs)
    # 3 positives + 3 + 3 mined negatives, then the two scenes that have a mirror caption with it (target 0)
    assert out["itm_targets"].tolist() == [1.0] * 3 + [0.0] * 8
    img_tok, txt_tok, ids = pairs[-1]
    assert torch.equal(ids, tok(["a 7 to the left of a 3", "a 3 to the left of a 7"]))
    _, all_img_tok = model.image_features(batch.inputs[0])
    torch.testing.assert_close(img_tok, all_img_tok[:2])
    torch.testing.assert_close(txt_tok, model.text.forward_features(ids))
    assert out["itm_logits"].shape == (11,)
    # switched off: no swapped negatives
    task_off = CLIPTask(tok, (0.5,), (0.5,), swap_negatives=False)
    out_off = task_off.forward(model, task_off.prepare(raw, torch.device("cpu"), 16, None).inputs)
    assert out_off["itm_targets"].tolist() == [1.0] * 3 + [0.0] * 6


def test_scene_negative_label_is_the_mirror_layouts_label():
    data = SceneCaptions("val", num_scenes=40, canvas_size=16, digit_size=(8, 8))
    for i in range(40):
        s, scene = data[i], data.scenes[i]
        if not s["negative_caption"]:
            assert s["negative_label"] == -1
            continue
        words = s["caption"].split()
        _, group = scene_caption(scene["boxes"], scene["labels"].flip(0), converse="right" in words or "below" in words)
        assert s["negative_label"] == group != s["label"]


@needs_tokenizers_and_digits
def test_swap_contrastive_puts_each_scenes_swapped_caption_into_its_images_softmax():
    torch.manual_seed(0)
    tok = CLIPTokenizer.train(SceneCaptions("val", num_scenes=1).corpus(), vocab_size=40, context_length=8)
    raw = {"image": torch.rand(3, 1, 16, 16), "label": torch.tensor([37, 73, 201]),
           "caption": ["a 3 to the left of a 7", "a 7 to the left of a 3", "a single 1"],
           "negative_caption": ["a 7 to the left of a 3", "a 3 to the left of a 7", ""],
           "negative_label": torch.tensor([73, 37, -1])}
    model = tiny_clip(itm_depth=1, vocab=tok.vocab_size).train()
    task = CLIPTask(tok, (0.5,), (0.5,), swap_contrastive=True)
    batch = task.prepare(raw, torch.device("cpu"), 16, None)
    out = task.forward(model, batch.inputs)
    # the swapped captions' embeddings, with gradients, and which images have one
    neg_ids = tok(["a 7 to the left of a 3", "a 3 to the left of a 7", ""])
    torch.testing.assert_close(out["negative_emb"], model.encode_text(neg_ids, normalize=True))
    assert out["negative_keep"].tolist() == [True, True, False] and out["negative_emb"].requires_grad
    # the loss by hand: images 0 and 1 see the two swapped captions as further candidates; scene 0's swapped
    # caption describes scene 1's layout (73), so it is image 1's positive, and vice versa
    # distinct unit vectors (a fresh model's embeddings are nearly all alike)
    out.update(image_emb=F.normalize(torch.randn(3, 8), dim=-1), text_emb=F.normalize(torch.randn(3, 8), dim=-1),
               negative_emb=F.normalize(torch.randn(3, 8), dim=-1))
    img, txt, neg = out["image_emb"], out["text_emb"], out["negative_emb"][:2]
    hand = clip_loss(img, txt, out["scale"], batch.targets, negative_text_emb=neg,
                     negative_text_labels=torch.tensor([73, 37]))
    torch.testing.assert_close(task.loss(batch, out), hand + task.itm_weight * itm_loss(out["itm_logits"], out["itm_targets"]))
    assert not torch.allclose(hand, clip_loss(img, txt, out["scale"], batch.targets))
    # without labels for the swapped captions they would be negatives of every image: another number
    assert not torch.allclose(hand, clip_loss(img, txt, out["scale"], batch.targets, negative_text_emb=neg))
    # off (the default): no swapped-caption embeddings
    off = CLIPTask(tok, (0.5,), (0.5,))
    assert "negative_emb" not in off.forward(model, off.prepare(raw, torch.device("cpu"), 16, None).inputs)
    with pytest.raises(ValueError, match="swap_contrastive .* clip loss"):
        CLIPTask(tok, (0.5,), (0.5,), loss="siglip", swap_contrastive=True)


# ---------------------------------------------------------------- the task's loss
def _task_batch(duplicate_aware: bool):
    tok = CLIPTokenizer.train(["a 1", "a 2", "a 3"], vocab_size=8, context_length=8)
    task = CLIPTask(tok, (0.5,), (0.5,), duplicate_aware=duplicate_aware)
    raw = {"image": torch.rand(4, 1, 16, 16), "caption": ["a 1", "a 2", "a 1", "a 3"], "label": torch.tensor([1, 2, 1, 3])}
    batch = task.prepare(raw, torch.device("cpu"), 16, None)
    return task, batch, tok


@needs_tokenizers_and_digits
def test_task_loss_treats_duplicate_captions_as_positives():
    torch.manual_seed(0)
    for aware in (True, False):
        task, batch, tok = _task_batch(aware)
        model = tiny_clip(vocab=tok.vocab_size).train()
        out = task.forward(model, batch.inputs)
        # distinct unit vectors (a fresh model's embeddings are nearly all alike)
        img, txt = F.normalize(torch.randn(4, 8), dim=-1), F.normalize(torch.randn(4, 8), dim=-1)
        out.update(image_emb=img, text_emb=txt)
        # by hand: image 0 and 2 share a caption, so row 0's target is (1/2, 0, 1/2, 0)
        logits = model.scale() * img @ txt.t()
        target = torch.eye(4)
        if aware:
            target = torch.tensor([[0.5, 0, 0.5, 0], [0, 1, 0, 0], [0.5, 0, 0.5, 0], [0, 0, 0, 1.0]])
        hand = 0.5 * (-(target * logits.log_softmax(1)).sum(1).mean() - (target.t() * logits.t().log_softmax(1)).sum(1).mean())
        torch.testing.assert_close(task.loss(batch, out), hand)
    assert not torch.allclose(clip_loss(img, txt, model.scale(), batch.targets), clip_loss(img, txt, model.scale()))


@needs_tokenizers_and_digits
def test_task_prepares_normalised_images_and_clip_token_ids():
    task, batch, tok = _task_batch(True)
    images, ids, labels = batch.inputs
    assert ids.shape == (4, 8) and torch.equal(ids, tok(["a 1", "a 2", "a 1", "a 3"]))
    assert labels.tolist() == [1, 2, 1, 3] and batch.extra["captions"][3] == "a 3"
    assert get_task("clip") is CLIPTask


# ------------------------------------------------------------------ engine: the clamp
@needs_tokenizers_and_digits
def test_logit_scale_never_exceeds_100_during_training(tmp_path):
    from vitlab.tasks.clip import CLIP_DIGITS_RECIPE

    cfg = load_config(None, TINY + ["epochs=1", "data.batch_size=256", "optim.warmup_epochs=0", "optim.lr=0.1",
                                    f"output_dir={tmp_path}"], base=CLIP_DIGITS_RECIPE)
    cfg.clip.init_logit_scale = 99.0
    trainer = build_trainer(cfg, log=lambda s: None)
    model = trainer.model
    # every step pushes the temperature up hard (a gradient of -1 on the log-scale)
    model.logit_scale.register_hook(lambda g: torch.full_like(g, -1.0))
    scales = []
    step = trainer._optimizer_step

    def recorded():
        step()
        scales.append(model.logit_scale.exp().item())

    trainer._optimizer_step = recorded
    trainer.train_epoch()
    assert len(scales) == trainer.steps_per_epoch == 5
    assert max(scales) <= 100.0 * (1 + 1e-6)
    assert scales[-1] == pytest.approx(100.0)  # it was pushed to the cap and held there


# ------------------------------------------------------------------------ engine: DDP
def _run_worker(out: Path, nproc: int, batch: int, extra: list[str]) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE.parent / "src")}
    worker = [str(HERE / "clip_ddp_worker.py"), str(out), "8"]
    if nproc == 1:
        cmd = [sys.executable, *worker]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *worker]
    res = subprocess.run(cmd + TINY + extra + [f"data.batch_size={batch}", "epochs=1", f"output_dir={out}"], env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]


@needs_tokenizers_and_digits
@pytest.mark.slow
def test_two_rank_ddp_equals_one_process_with_the_global_batch(tmp_path):
    # Global batch 32: 2 ranks x 16 vs 1 process x 32; duplicate captions across the ranks are
    # positives, and every rank's loss sees all 32 x 32 pairs through the gathered features.
    # a constant lr (min_lr = lr): the schedule's length does not matter; 8 steps of each run
    common = ["optim.warmup_epochs=0", "optim.lr=0.002", "optim.min_lr=0.002", "optim.weight_decay=0.0"]
    _run_worker(tmp_path / "ddp", nproc=2, batch=16, extra=common)
    _run_worker(tmp_path / "single", nproc=1, batch=32, extra=common)
    from safetensors.torch import load_file

    init = load_file(str(tmp_path / "single" / "init0.safetensors"))
    single = load_file(str(tmp_path / "single" / "rank0.safetensors"))
    r0, r1 = (load_file(str(tmp_path / "ddp" / f"rank{r}.safetensors")) for r in (0, 1))
    for k in single:
        assert torch.equal(r0[k], r1[k]), k
        torch.testing.assert_close(r0[k], single[k], atol=2e-5, rtol=0, msg=k)
        assert k == "text.pos_embed" or (single[k] - init[k]).abs().max() > 1e-3, f"{k} did not train"
    ddp, one = (json.loads((tmp_path / n / "loss0.json").read_text()) for n in ("ddp", "single"))
    assert ddp["step"] == one["step"] == 8
    assert ddp["train_loss"] == pytest.approx(one["train_loss"], rel=1e-5)  # the global-batch loss on every rank


# ---------------------------------------------------------------------------------- CLI
@pytest.fixture(scope="module")
def clip_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("clip_run")
    code = cli(["train", "--task", "clip", "--epochs", "1", "--no-progress", "--output-dir", str(out), *TINY[3:]])
    assert code == 0
    return out


@needs_tokenizers_and_digits
def test_train_task_clip_without_data_arguments_trains_on_digit_captions(clip_run, capsys):
    cfg = json.loads((clip_run / "config.json").read_text())
    assert cfg["task"] == "clip" and cfg["data"]["dataset"] == "digits"
    results = json.loads((clip_run / "results.json").read_text())
    assert results["primary_metric"] == "zero_shot_top1" and results["test_n"] == len(DigitsDataset("test"))
    for key in ("test_zero_shot_top1", "test_t2i_R@1", "test_i2t_R@10", "test_t2i_median_rank"):
        assert key in results
    assert (clip_run / "similarity_matrix.png").stat().st_size > 5000
    # the tokenizer travels with the checkpoint: same ids as a BPE trained on the same captions
    from vitlab.tasks.clip.convert import load_clip_checkpoint

    model, tok = load_clip_checkpoint(clip_run)
    fresh = CLIPTokenizer.train(DigitCaptions("train").corpus(), vocab_size=64, context_length=16)
    texts = ["a handwritten 7", "the digit seven", "an unseen word"]
    assert torch.equal(tok(texts), fresh(texts))
    assert model.text.config.vocab_size == tok.vocab_size


def _digit_png(path: Path, index: int) -> int:
    from PIL import Image

    d = DigitsDataset("test")
    img, label = d[index]
    Image.fromarray((img[0].numpy() * 255).round().astype(np.uint8)).save(path)
    return label


@needs_tokenizers_and_digits
def test_zero_shot_cli_ranks_labels_as_the_prompt_ensemble_does(clip_run, tmp_path, capsys):
    from vitlab.tasks.clip.convert import load_clip_checkpoint

    files = [tmp_path / f"d{i}.png" for i in range(3)]
    for i, f in enumerate(files):
        _digit_png(f, i * 40)
    assert cli(["zero-shot", "--checkpoint", str(clip_run), "--labels", "zero,one,two,three", "--top-k", "4",
                *map(str, files)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3
    # by hand: normalised mean of the normalised prompt embeddings per label, cosine with the image
    model, tok = load_clip_checkpoint(clip_run)
    mean, std = model.pretrained_cfg["mean"][0], model.pretrained_cfg["std"][0]
    for f, line in zip(files, lines):
        from PIL import Image

        x = torch.from_numpy(np.asarray(Image.open(f), dtype=np.float32) / 255.0)[None, None]
        with torch.no_grad():
            img = F.normalize(model.encode_image((x - mean) / std), dim=-1)[0]
            scores = []
            for name in ("zero", "one", "two", "three"):
                t = F.normalize(model.encode_text(tok([tp.format(name) for tp in DIGIT_TEMPLATES])), dim=-1).mean(0)
                scores.append(float(img @ F.normalize(t, dim=0)))
        order = [("zero", "one", "two", "three")[i] for i in np.argsort(scores)[::-1]]
        printed = [w for w in line.split(": ", 1)[1].split() if not w.endswith("%")]
        assert printed == order, (line, scores)
        probs = torch.tensor(scores).mul(model.scale().item()).softmax(0)
        percents = [float(w[:-1]) for w in line.split(": ", 1)[1].split() if w.endswith("%")]
        assert percents == pytest.approx(sorted((100 * probs).tolist(), reverse=True), abs=0.051)


@needs_tokenizers_and_digits
def test_retrieve_and_eval_cli_on_a_clip_checkpoint(clip_run, tmp_path, capsys):
    files = [tmp_path / f"d{i}.png" for i in range(2)]
    for i, f in enumerate(files):
        _digit_png(f, i)
    assert cli(["retrieve", "--checkpoint", str(clip_run), "--images", *map(str, files), "--texts", "the digit one",
                "a handwritten 7", "--top-k", "2"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 4 and out[0].startswith("text 'the digit one': ") and out[2].startswith(f"image {files[0]}: ")
    # by hand: cosine similarities of the normalised images and texts, best first
    from PIL import Image

    from vitlab.tasks.clip.convert import load_clip_checkpoint

    model, tok = load_clip_checkpoint(clip_run)
    mean, std = model.pretrained_cfg["mean"][0], model.pretrained_cfg["std"][0]
    x = torch.stack([torch.from_numpy(np.asarray(Image.open(f), dtype=np.float32) / 255.0)[None] for f in files])
    with torch.no_grad():
        cos = F.normalize(model.encode_image((x - mean) / std), dim=-1) @ F.normalize(
            model.encode_text(tok(["the digit one", "a handwritten 7"])), dim=-1).t()  # (2 images, 2 texts)
    for j, line in enumerate(out[:2]):
        order = [str(files[i]) for i in cos[:, j].argsort(descending=True).tolist()]
        assert [w for w in line.split(": ", 1)[1].split() if not w.startswith("(")] == order
        assert f"({float(cos[:, j].max()):.3f})" in line
    assert cli(["eval", "--checkpoint", str(clip_run)]) == 0
    out = capsys.readouterr().out
    results = json.loads((clip_run / "results.json").read_text())
    assert f"zero-shot accuracy: top-1 {100 * results['test_zero_shot_top1']:.2f}%" in out
    assert f"text->image: R@1 {100 * results['test_t2i_R@1']:.2f}%" in out and "median rank" in out


@needs_tokenizers_and_digits
def test_clip_cli_errors_are_one_clear_line(clip_run, tmp_path, capsys):
    f = tmp_path / "d.png"
    _digit_png(f, 0)
    cases = [
        (["zero-shot", "--checkpoint", str(clip_run), "--labels", "cat,,dog", str(f)], "--labels must be comma-separated"),
        (["zero-shot", "--checkpoint", str(clip_run), "--labels", "cat", str(tmp_path / "nope.png")], "image not found"),
        (["zero-shot", "--checkpoint", str(clip_run), "--labels", "cat", str(f), "--templates", "no slot"],
         "must contain '{}'"),
        (["retrieve", "--checkpoint", str(clip_run), "--images", str(f), "--texts", "a 1", "--rerank", "3"],
         "needs a CLIP model with an image-text matching head"),
    ]
    for argv, msg in cases:
        assert cli(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and msg in err[0], err


def test_clip_recipe_file_equals_the_builtin_recipe():
    import yaml

    from vitlab.tasks.clip import CLIP_DIGITS_RECIPE

    assert yaml.safe_load((HERE.parent / "configs" / "clip_digits.yaml").read_text()) == CLIP_DIGITS_RECIPE


@needs_tokenizers_and_digits
@pytest.mark.slow
def test_clip_example_trains_classifies_zero_shot_and_retrieves(tmp_path):
    res = subprocess.run([sys.executable, str(HERE.parent / "examples" / "clip_training.py"), "--epochs", "1", "--tiny",
                          "--output-dir", str(tmp_path)], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "PYTHONPATH": str(HERE.parent / "src")})
    assert res.returncode == 0, res.stderr[-3000:]
    engine = json.loads((tmp_path / "results.json").read_text())["test_zero_shot_top1"]
    # the example's own zero-shot pass over the test digits (class names only) is printed beside the engine's
    assert f"test zero-shot top-1 (engine): {100 * engine:.2f}%" in res.stdout
    assert "zero-shot on the 359 held-out digits" in res.stdout and res.stdout.count("top-5 test images") == 3


@needs_tokenizers_and_digits
def test_task_eval_metrics_equal_hand_computed_zero_shot_and_retrieval():
    from vitlab.tasks.clip.task import CLIPEvalMetrics

    tok = CLIPTokenizer.train(["a 1"], vocab_size=4, context_length=8)
    task = CLIPTask(tok, (0.5,), (0.5,), itm_top_k=0, prompts=[["x"], ["y"]])
    metrics = task.eval_metrics()
    assert isinstance(metrics, CLIPEvalMetrics)
    s = 2 ** -0.5
    img = torch.tensor([[1.0, 0.0], [s, s], [0.0, 1.0]])
    txt = torch.tensor([[0.0, 1.0], [1.0, 0.0], [s, -s]])
    labels = torch.tensor([0, 1, 1])
    zs = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # (D, K): class 0 along x, class 1 along y
    for rows in ([0, 1], [2]):  # two batches
        batch = Batch(None, labels[rows], len(rows), {"captions": [f"c{i}" for i in rows]})
        metrics.update(batch, {"image_emb": img[rows], "text_emb": txt[rows], "scale": torch.tensor(1.0), "bias": None,
                               "zero_shot": zs})
    res = metrics.compute()
    # zero-shot: image 0 -> x (class 0, right), image 1 ties -> class 0 (argmax first; wrong), image 2 -> y (right)
    assert res["zero_shot_top1"] == pytest.approx(2 / 3)
    # sim = img @ txt.T = [[0, 1, s], [s, s, 0], [1, 0, -s]]; positives: image 0 - text 0; images 1, 2 - texts 1, 2
    # t2i: text 0 (col 0 = [0, s, 1]) ranks image 0 third; text 1 ([1, s, 0]) ranks image 1 (s) 2nd;
    #      text 2 ([s, 0, -s]): images 1, 2 score 0 and -s, image 0 above both -> rank 2
    assert res["t2i_R@1"] == pytest.approx(0.0) and res["t2i_R@5"] == pytest.approx(1.0)
    assert res["t2i_mean_rank"] == pytest.approx((3 + 2 + 2) / 3) and res["t2i_median_rank"] == 2
    # i2t: image 0 (row [0, 1, s]) -> text 0 scores 0: rank 3; image 1 ([s, s, 0]) -> text 1 ties text 0: rank 1;
    #      image 2 ([1, 0, -s]) -> best positive text 1 (0): rank 2
    assert res["i2t_R@1"] == pytest.approx(1 / 3) and res["i2t_mean_rank"] == pytest.approx(2.0)
    assert res["n"] == 3 and res["similarity"].shape == (3, 3) and res["similarity_captions"] == ["c0", "c1", "c2"]


@needs_tokenizers_and_digits
def test_clip_trains_on_a_user_caption_folder(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    rows = ["image,caption"]
    for i in range(12):
        colour = ("red", "green", "blue")[i % 3]
        px = np.zeros((20, 20, 3), dtype=np.uint8)
        px[..., i % 3] = 200 + rng.integers(0, 50)
        Image.fromarray(px).save(tmp_path / f"{i}.png")
        rows.append(f"{i}.png,a {colour} square")
    (tmp_path / "captions.csv").write_text("\n".join(rows) + "\n")
    cfg = load_config(None, TINY + ["epochs=1", "data.batch_size=4", "data.image_size=16", f"data.dataset={tmp_path}",
                                    f"output_dir={tmp_path / 'run'}"])
    trainer = build_trainer(cfg, log=lambda s: None)
    assert trainer.task.primary_metric == "t2i_R@1" and trainer.model.visual.config.in_channels == 3
    assert len(trainer.train_loader.dataset) + len(trainer.val_loader.dataset) == 12
    res = trainer.fit()
    assert res["split"] == "val" and "val_t2i_R@1" in res and res["val_n"] == 1
    assert (tmp_path / "run" / "similarity_matrix.png").is_file()


@pytest.mark.parametrize("argv", [["train", "--task", "clip"], ["train", "task=clip"]])
def test_train_task_clip_starts_from_the_clip_recipe(argv):
    from vitlab.cli import _train_config, build_parser
    from vitlab.tasks.clip import CLIP_DIGITS_RECIPE

    cfg = _train_config(build_parser().parse_args(argv))
    assert cfg.task == "clip" and cfg.recipe == "clip_digits" and cfg.data.dataset == "digits"
    assert cfg.model.overrides == CLIP_DIGITS_RECIPE["model"]["overrides"] and cfg.epochs == CLIP_DIGITS_RECIPE["epochs"]
    assert _train_config(build_parser().parse_args(["train"])).recipe == "digits"  # classification keeps its own


FUSION = 3.0


@needs_tokenizers_and_digits
def test_eval_reranks_each_texts_top_k_images_with_the_itm_head():
    torch.manual_seed(0)
    model = tiny_clip(itm_depth=1).eval()
    with torch.no_grad():  # a head whose preferences differ from the similarities (a fresh one mostly agrees)
        for p in model.itm.parameters():
            p.normal_(0.0, 0.5)
    tok = CLIPTokenizer.train(["a 1"], vocab_size=4, context_length=8)
    task = CLIPTask(tok, (0.5,), (0.5,), itm_top_k=4, itm_fusion=FUSION)
    images = torch.rand(6, 1, 16, 16)
    ids = torch.randint(1, 38, (6, 8))
    ids[:, 5] = 39  # end of text: the largest id
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    metrics = task.eval_metrics()
    with torch.no_grad():
        for rows in ([0, 1, 2], [3, 4, 5]):
            batch = Batch((images[rows], ids[rows], labels[rows]), labels[rows], 3, {"captions": ["c"] * 3})
            metrics.update(batch, task.forward(model, batch.inputs))
        res = metrics.compute()
        # by hand: every (text, image) ITM logit; each text's 4 most similar images ordered by it, then the rest
        img, img_tok = model.image_features(images)
        txt, txt_tok = model.text_features(ids)
        sim = F.normalize(txt, dim=-1) @ F.normalize(img, dim=-1).t()  # (texts, images)
        itm = torch.stack([model.itm_logits(img_tok, txt_tok[t].expand(6, -1, -1), ids[t].expand(6, -1))
                           for t in range(6)])  # (texts, images)
    ranks, plain, fused = [], [], []
    scale = FUSION * float(model.scale().detach())
    for t in range(6):
        cand = sim[t].topk(4).indices.tolist()
        rest = [i for i in sim[t].argsort(descending=True).tolist() if i not in cand]
        order = sorted(cand, key=lambda i: -float(itm[t, i])) + rest
        ranks.append(1 + next(r for r, i in enumerate(order) if labels[i] == labels[t]))
        # fused: ITM logit + itm_fusion x the contrastive logit (scale x cosine)
        order = sorted(cand, key=lambda i: -float(itm[t, i] + scale * sim[t, i])) + rest
        fused.append(1 + next(r for r, i in enumerate(order) if labels[i] == labels[t]))
        plain.append(1 + next(r for r, i in enumerate(sim[t].argsort(descending=True).tolist())
                              if labels[i] == labels[t]))
    assert res["itm_t2i_mean_rank"] == pytest.approx(sum(ranks) / 6)
    assert res["itm_t2i_R@1"] == pytest.approx(sum(r == 1 for r in ranks) / 6)
    assert res["t2i_mean_rank"] == pytest.approx(sum(plain) / 6)
    assert ranks != plain  # the re-ranking changed the ranks here, so the check has teeth
    assert res["itm_fused_t2i_mean_rank"] == pytest.approx(sum(fused) / 6)
    assert fused != ranks  # the fusion changed them too


# ------------------------------------------------------------ the frozen-tower ITM phase
def _fake_features(model, image_deg, text_deg, width=16, n_tok=5):
    """Replace the towers' features: unit 2-D embeddings at the given angles, tokens filled with the index."""
    def unit(deg):
        r = torch.deg2rad(torch.tensor(deg, dtype=torch.float32))
        return F.pad(torch.stack([r.cos(), r.sin()], dim=1), (0, model.config.embed_dim - 2))  # (4, embed_dim)

    img_emb, txt_emb = unit(image_deg), unit(text_deg)
    model.image_features = lambda images: (img_emb, torch.arange(4.0)[:, None, None].expand(4, n_tok, width))
    model.text_features = lambda ids: (txt_emb, model.text.forward_features(ids))


def test_itm_phase_pairs_positives_mined_shifted_and_mirror_negatives():
    torch.manual_seed(0)
    model = tiny_clip(itm_depth=1).train()
    # images at 0, 90, 180, 270 degrees; texts at 10, 80, 200, 300: cosine similarities (rows: images)
    #   image 0: .98  .17 -.94  .50     image 2: -.98 -.17  .94 -.50
    #   image 1: .17  .98 -.34 -.87     image 3: -.17 -.98  .34  .87
    _fake_features(model, [0, 90, 180, 270], [10, 80, 200, 300])
    labels = torch.tensor([0, 1, 0, 2])  # texts 0 and 2 share a caption: (0, 2) and (2, 0) are positives
    ids = torch.tensor([[38, 1, 39, 0, 0, 0, 0, 0], [38, 2, 39, 0, 0, 0, 0, 0], [38, 3, 39, 0, 0, 0, 0, 0],
                        [38, 4, 39, 0, 0, 0, 0, 0]])
    mirror = torch.tensor([[38, 11, 39, 0, 0, 0, 0, 0]] * 4)
    has = torch.tensor([True, False, True, False])
    seen = []
    orig = model.itm_logits

    def spy(img_tok, txt_tok, ids_):
        seen.append((img_tok[:, 0, 0].long().tolist(), ids_[:, 1].tolist()))
        return orig(img_tok, txt_tok, ids_)

    model.itm_logits = spy
    out = model(torch.zeros(4, 1, 16, 16), ids, labels, train_outputs=True, negative_ids=mirror, has_negative=has,
                itm_only=True, hard_negatives=2, shifted_negatives=2)
    images, texts = seen[0]
    got = sorted(zip(images, [t - 1 if t < 11 else "mirror" for t in texts], out["itm_targets"].tolist()),
                 key=str)
    expected = (
        [(i, i, 1.0) for i in range(4)]                                        # each image with its own text
        + [(0, 3, 0.0), (0, 1, 0.0), (1, 0, 0.0), (1, 2, 0.0),                 # each image's 2 hardest texts
           (2, 1, 0.0), (2, 3, 0.0), (3, 2, 0.0), (3, 0, 0.0)]                 # (positives never mined)
        + [(1, 0, 0.0), (3, 0, 0.0), (0, 1, 0.0), (2, 1, 0.0),                 # each text's 2 hardest images
           (3, 2, 0.0), (1, 2, 0.0), (0, 3, 0.0), (2, 3, 0.0)]
        + [(0, 1, 0.0), (1, 2, 0.0), (2, 3, 0.0), (3, 0, 0.0), (1, 3, 0.0), (3, 1, 0.0)]  # 1 and 2 places on
        + [(0, "mirror", 0.0), (2, "mirror", 0.0)]                              # the given mirror captions
    )
    assert got == sorted(expected, key=str)
    assert out["itm_logits"].shape == (len(expected),)


def test_itm_loss_balanced_weighs_positives_and_negatives_equally():
    from vitlab.tasks.clip.itm import itm_loss

    logits, targets = torch.tensor([2.0, -1.0, 0.5, -3.0]), torch.tensor([1.0, 0.0, 0.0, 0.0])
    bce = lambda z, y: -(y * math.log(1 / (1 + math.exp(-z))) + (1 - y) * math.log(1 - 1 / (1 + math.exp(-z))))  # noqa: E731
    pos = bce(2.0, 1)
    neg = (bce(-1.0, 0) + bce(0.5, 0) + bce(-3.0, 0)) / 3
    assert float(itm_loss(logits, targets, balanced=True)) == pytest.approx((pos + neg) / 2, rel=1e-6)
    assert float(itm_loss(logits, targets)) == pytest.approx((pos + 3 * neg) / 4, rel=1e-6)


def test_itm_phase_is_the_last_itm_epochs_of_the_run():
    tok = CLIPTokenizer.train(["a 1", "a 2"], vocab_size=8, context_length=8)
    task = CLIPTask(tok, (0.5,), (0.5,), itm_epochs=2)
    phases = []
    for epoch in range(5):
        task.start_epoch(epoch, 5)
        phases.append(task.itm_phase)
    assert phases == [False, False, False, True, True]
    off = CLIPTask(tok, (0.5,), (0.5,))
    off.start_epoch(4, 5)
    assert not off.itm_phase


#: Tiny two-digit scenes for engine runs of the ITM phase.
SCENES_TINY = ["task=clip", "progress=false", "device=cpu", "data.dataset=digit_scenes", "optim.warmup_epochs=0",
               "model.overrides={patch_size: 4, dim: 16, depth: 1, heads: 2, mlp_dim: 32}",
               "clip={embed_dim: 16, text_overrides: {dim: 16, depth: 1, heads: 2, mlp_dim: 32}, vocab_size: 64, itm_depth: 1, "
               "num_scenes: 32, canvas_size: 16, digit_size: [8, 8], itm_epochs: 1}"]


@needs_tokenizers_and_digits
def test_itm_phase_freezes_both_towers_and_trains_only_the_itm_head(tmp_path):
    from vitlab.tasks.clip import CLIP_DIGITS_RECIPE

    cfg = load_config(None, SCENES_TINY + ["epochs=2", "data.batch_size=16", f"output_dir={tmp_path}"],
                      base=CLIP_DIGITS_RECIPE)
    trainer = build_trainer(cfg, log=lambda s: None)
    model = trainer.model

    def weights():
        return {n: p.detach().clone() for n, p in model.named_parameters()}

    start = weights()
    trainer.train_epoch()  # epoch 1 of 2: contrastive (and joint ITM) training of everything
    assert not trainer.task.itm_phase
    middle = weights()
    trainer.epoch = 1
    trainer.train_epoch()  # epoch 2 of 2: the ITM phase (itm_epochs: 1)
    assert trainer.task.itm_phase
    end = weights()
    towers = [n for n in start if not n.startswith("itm.")]
    head = [n for n in start if n.startswith("itm.")]
    assert towers and head
    assert all(not torch.equal(start[n], middle[n]) for n in ("visual.patch_embed.proj.weight", "text.token_embedding.weight",
                                                           "visual_projection.weight", "logit_scale"))
    changed = [n for n in towers if not torch.equal(middle[n], end[n])]
    assert not changed, f"the ITM phase changed tower weights: {changed}"
    assert all(not torch.equal(middle[n], end[n]) for n in head), "every ITM head weight learns in the ITM phase"


def test_itm_epochs_need_an_itm_head_and_a_contrastive_phase(tmp_path):
    from vitlab.tasks.clip import CLIP_DIGITS_RECIPE

    for extra, match in (({"itm_depth": 0}, "set itm_depth >= 1"), ({"itm_epochs": 3}, "must be fewer than epochs")):
        cfg = load_config(None, SCENES_TINY + ["epochs=3", f"output_dir={tmp_path}"], base=CLIP_DIGITS_RECIPE)
        for key, value in extra.items():
            setattr(cfg.clip, key, value)
        with pytest.raises(ValueError, match=match):
            build_trainer(cfg, log=lambda s: None)


@needs_tokenizers_and_digits
def test_siglip_starts_at_the_papers_scale_and_bias_or_the_given_bias(tmp_path):
    from vitlab.tasks.clip import CLIP_DIGITS_RECIPE

    cfg = load_config(None, TINY + ["epochs=1", f"output_dir={tmp_path}"], base=CLIP_DIGITS_RECIPE)
    cfg.clip.loss = "siglip"
    model = build_trainer(cfg, log=lambda s: None).model
    assert model.logit_scale.item() == pytest.approx(math.log(10.0)) and model.logit_bias.item() == -10.0
    cfg.clip.init_logit_bias = math.log(0.1 / 0.9)  # a batch with 10% positives per row
    model = build_trainer(cfg, log=lambda s: None).model
    assert model.logit_bias.item() == pytest.approx(math.log(0.1 / 0.9))


def test_itm_phase_residual_adds_the_weighted_contrastive_logit_of_each_pair():
    torch.manual_seed(0)
    model = tiny_clip(itm_depth=1).train()
    _fake_features(model, [0, 90, 180, 270], [10, 80, 200, 300])
    ids = torch.tensor([[38, k, 39, 0, 0, 0, 0, 0] for k in (1, 2, 3, 4)])
    mirror = torch.tensor([[38, 11, 39, 0, 0, 0, 0, 0]] * 4)
    has = torch.tensor([True, False, False, False])
    kw = dict(train_outputs=True, negative_ids=mirror, has_negative=has, itm_only=True, hard_negatives=1,
              shifted_negatives=0)
    plain = model(torch.zeros(4, 1, 16, 16), ids, torch.arange(4), **kw)["itm_logits"]
    fused = model(torch.zeros(4, 1, 16, 16), ids, torch.arange(4), itm_residual=2.0, **kw)["itm_logits"]
    scale = float(model.scale().detach())
    # the positives come first: image i with text i, angles 10, 10, 20 and 30 degrees apart
    cos = torch.cos(torch.deg2rad(torch.tensor([10.0, 10.0, 20.0, 30.0])))
    torch.testing.assert_close(fused[:4] - plain[:4], 2.0 * scale * cos, atol=1e-4, rtol=1e-4)
    # the last pair: image 0 (at 0 degrees) with its mirror caption, through the text tower
    with torch.no_grad():
        mirror_cos = model.encode_text(mirror[:1], normalize=True)[0, 0]  # image 0's unit embedding is (1, 0, ...)
    assert float((fused[-1] - plain[-1]).detach()) == pytest.approx(2.0 * scale * float(mirror_cos), abs=1e-4)


def test_task_trains_the_fused_score_in_the_itm_phase_when_asked():
    tok = CLIPTokenizer.train(["a 1", "a 2", "a 3"], vocab_size=8, context_length=8)
    raw = {"image": torch.rand(3, 1, 16, 16), "caption": ["a 1", "a 2", "a 3"], "label": torch.tensor([1, 2, 3])}
    model = tiny_clip(itm_depth=1, vocab=tok.vocab_size).train()
    calls = []
    model.forward_itm = lambda *a, **k: calls.append(a) or {}
    for residual, expected in ((True, 2.5), (False, 0.0)):
        task = CLIPTask(tok, (0.5,), (0.5,), itm_epochs=1, itm_fusion=2.5, itm_residual=residual,
                        itm_hard_negatives=3, itm_shifted_negatives=1)
        task.start_epoch(1, 2)
        task.forward(model, task.prepare(raw, torch.device("cpu"), 16, None).inputs)
        assert calls[-1][5:] == (3, 1, expected)
    task.start_epoch(0, 2)  # before the phase: the joint training forward
    out = task.forward(model, task.prepare(raw, torch.device("cpu"), 16, None).inputs)
    assert len(calls) == 2 and "image_emb" in out


def _layout_image(a: int, b: int) -> torch.Tensor:
    """A 16 px 'scene': pattern a in the left half, pattern b in the right half (1: bar, 2: stripe, 3: block)."""
    img = torch.zeros(1, 16, 16)
    for digit, x0 in ((a, 0), (b, 8)):
        if digit == 1:
            img[0, 2:14, x0 + 3 : x0 + 5] = 1.0
        elif digit == 2:
            img[0, 7:9, x0 + 1 : x0 + 7] = 1.0
        else:
            img[0, 4:12, x0 + 2 : x0 + 6] = 1.0
    return img


@needs_tokenizers_and_digits
@pytest.mark.slow
@pytest.mark.parametrize("positions", [True, False])
def test_itm_phase_learns_to_tell_a_layout_from_its_mirror_only_with_positions(positions):
    layouts = [(a, b) for a in (1, 2, 3) for b in (1, 2, 3) if a != b]
    tok = CLIPTokenizer.train(SceneCaptions("val", num_scenes=1).corpus(), vocab_size=40, context_length=12)
    raw = {"image": torch.stack([_layout_image(a, b) for a, b in layouts]),
           "caption": [f"a {a} to the left of a {b}" for a, b in layouts],
           "negative_caption": [f"a {b} to the left of a {a}" for a, b in layouts],
           "label": torch.tensor([10 * a + b for a, b in layouts])}
    torch.manual_seed(0)
    model = tiny_clip(itm_depth=1, vocab=tok.vocab_size, context=12).train()
    with torch.no_grad():
        if positions:  # as salient as a trained tower's (at their 0.02 init they vanish under the final norm)
            model.visual.pos_embed.weight.normal_(0.0, 1.0)
        else:
            model.visual.pos_embed.weight.zero_()  # the frozen image tower's patches become a set
    task = CLIPTask(tok, (0.5,), (0.5,), itm_epochs=1, itm_hard_negatives=2, itm_shifted_negatives=1)
    task.start_epoch(1, 2)
    batch = task.prepare(raw, torch.device("cpu"), 16, None)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(200):
        loss = task.loss(batch, task.forward(model, batch.inputs))
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        _, img_tok = model.image_features(batch.inputs[0])
        _, txt_tok = model.text_features(batch.inputs[1])
        mirror_img = torch.tensor([layouts.index((b, a)) for a, b in layouts])
        own = model.itm_logits(img_tok, txt_tok, batch.inputs[1])  # each caption with its own layout
        mirrored = model.itm_logits(img_tok[mirror_img], txt_tok, batch.inputs[1])  # ... with the mirror layout
    if positions:
        assert bool((own > mirrored + 2.0).all()), (own, mirrored)  # every caption picks its layout, by a margin
    else:
        torch.testing.assert_close(own, mirrored, atol=1e-5, rtol=1e-5)  # a set of patches has no left and right


@needs_tokenizers_and_digits
def test_itm_lr_scale_multiplies_the_learning_rate_of_the_itm_head_only(tmp_path):
    from vitlab.tasks.clip import CLIP_DIGITS_RECIPE

    cfg = load_config(None, SCENES_TINY + ["epochs=2", "optim.lr=0.002", f"output_dir={tmp_path}"],
                      base=CLIP_DIGITS_RECIPE)
    cfg.clip.itm_lr_scale = 3.0
    trainer = build_trainer(cfg, log=lambda s: None)
    lrs = {name: g["lr"] for g in trainer.optimizer.param_groups for name in g["names"]}
    head = {n: v for n, v in lrs.items() if n.startswith("itm.")}
    assert head and all(v == pytest.approx(3 * 0.002) for v in head.values())
    assert all(v == pytest.approx(0.002) for n, v in lrs.items() if n not in head)  # the towers, projections, scale


@needs_tokenizers_and_digits
def test_eval_mirror_accuracy_counts_own_caption_above_its_mirror_contrastively_and_by_itm():
    torch.manual_seed(2)
    model = tiny_clip(itm_depth=1).eval()
    with torch.no_grad():  # a head with preferences of its own
        for p in model.itm.parameters():
            p.normal_(0.0, 0.5)
    tok = CLIPTokenizer.train(["a 1"], vocab_size=4, context_length=8)
    task = CLIPTask(tok, (0.5,), (0.5,), itm_top_k=4)
    images = torch.rand(8, 1, 16, 16)
    ids = torch.randint(1, 38, (8, 8))
    ids[:, 5] = 39  # end of text: the largest id
    mirror = ids[:, [0, 3, 2, 1, 4, 5, 6, 7]]  # the same tokens with two of them exchanged, as a mirror caption
    has = torch.tensor([True, True, False, True, True, True, False, True])  # two scenes without a mirror layout
    labels = torch.arange(8)
    metrics = task.eval_metrics()
    with torch.no_grad():
        for rows in ([0, 1, 2, 3], [4, 5, 6, 7]):
            batch = Batch((images[rows], ids[rows], labels[rows], mirror[rows], has[rows]), labels[rows], 4,
                          {"captions": ["c"] * 4})
            metrics.update(batch, task.forward(model, batch.inputs))
        res = metrics.compute()
        img, img_tok = model.image_features(images)
        own, own_tok = model.text_features(ids)
        mir, mir_tok = model.text_features(mirror)
        cos = lambda a, b: (F.normalize(a, dim=-1) * F.normalize(b, dim=-1)).sum(-1)  # noqa: E731
        wins = (cos(img, own) > cos(img, mir))[has]
        itm_wins = (model.itm_logits(img_tok, own_tok, ids) > model.itm_logits(img_tok, mir_tok, mirror))[has]
    assert res["mirror_acc"] == pytest.approx(float(wins.float().mean()))
    assert res["itm_mirror_acc"] == pytest.approx(float(itm_wins.float().mean()))
    assert 0 < float(wins.float().mean()) < 1 and 0 < float(itm_wins.float().mean()) < 1  # neither all nor none
    assert not torch.equal(wins, itm_wins)  # the two scores disagree somewhere, so each check has teeth


@needs_tokenizers_and_digits
def test_scene_eval_size_is_its_own_option_and_defaults_to_a_quarter():
    def setup(n, extra=""):
        ov = SCENES_TINY[-1].replace("num_scenes: 32", f"num_scenes: {n}{extra}")
        return CLIPTask.from_config(load_config(None, SCENES_TINY[:-1] + [ov]))

    s = setup(32)
    assert (len(s.train_data), len(s.val_data), len(s.test_data)) == (32, 8, 8)
    s = setup(32, ", eval_scenes: 5")
    assert (len(s.train_data), len(s.val_data), len(s.test_data)) == (32, 5, 5)
    # the evaluation scenes do not depend on how many training scenes there are
    other = setup(64, ", eval_scenes: 5")
    assert len(other.train_data) == 64
    for i in range(5):
        assert torch.equal(other.test_data[i]["image"], s.test_data[i]["image"])
    with pytest.raises(ValueError, match="eval_scenes must be >= 1"):
        setup(32, ", eval_scenes: 0")


@needs_tokenizers_and_digits
def test_scene_converse_option_sets_how_often_captions_use_the_converse_phrasing():
    from vitlab.tasks.clip.inference import evaluation_data

    def captions(extra=""):
        ov = SCENES_TINY[-1].replace("num_scenes: 32", f"num_scenes: 32{extra}")
        s = CLIPTask.from_config(load_config(None, SCENES_TINY[:-1] + [ov]))
        # the checkpoint's record: `vitlab eval` rebuilds the scenes in the phrasing it was trained on
        again = evaluation_data("digit_scenes", "test", num_scenes=32, scenes=s.model.pretrained_cfg["scenes"])
        return [d[i]["caption"] for d in (s.train_data, s.val_data, s.test_data, again) for i in range(len(d))]

    converse_words = ("right of", "below")
    default = captions()
    assert any(w in c for c in default for w in converse_words)  # 0.5 by default: both phrasings occur
    assert not any(w in c for c in captions(", converse: 0") for w in converse_words)  # every split
    always = captions(", converse: 1")
    assert all(any(w in c for w in converse_words) for c in always if "single" not in c)
    with pytest.raises(ValueError, match="converse must be a probability"):
        captions(", converse: 2")


def test_itm_head_image_pos_adds_a_2d_sincos_encoding_to_the_grid_tokens_only():
    from vitlab.components.embeddings import sincos_2d_pos_embed

    torch.manual_seed(0)
    head = ITMHead(text_dim=16, image_dim=12, depth=1, heads=2, image_pos=True, num_prefix_tokens=1).eval()
    plain = ITMHead(text_dim=16, image_dim=12, depth=1, heads=2).eval()
    plain.load_state_dict(head.state_dict())  # the encoding is fixed: the same weights
    contexts = []
    for m in head.modules():
        if isinstance(m, CrossAttention):
            m.register_forward_hook(lambda mod, args, kw, out: contexts.append(kw["context"]), with_kwargs=True)
    text, image, eos = torch.randn(2, 5, 16), torch.randn(2, 1 + 9, 12), torch.tensor([4, 3])
    with torch.no_grad():
        logits = head(text, image, eos)
        expected = head.image_norm(head.image_proj(image)) + torch.cat([torch.zeros(1, 16),
                                                                        sincos_2d_pos_embed(16, (3, 3))])
        torch.testing.assert_close(contexts[-1], expected)  # class token: nothing; the 3 x 3 grid: its place
        # exchange two grid tokens: a head without positions reads a set, one with positions sees a new layout
        swapped = image[:, [0, 9, 2, 3, 4, 5, 6, 7, 8, 1]]
        torch.testing.assert_close(plain(text, swapped, eos), plain(text, image, eos))
        assert (head(text, swapped, eos) - logits).abs().min() > 1e-4
    with pytest.raises(ValueError, match="square grid after 1 prefix token"):
        head(text, torch.randn(2, 1 + 8, 12), eos)


@needs_tokenizers_and_digits
def test_itm_image_pos_option_reaches_the_head_with_the_backbones_prefix_and_survives_saving(tmp_path):
    from vitlab.tasks.clip.convert import load_clip, save_clip

    def setup(model, extra, image="patch_size: 4, dim: 16, depth: 1, heads: 2, mlp_dim: 32, "):
        ov = SCENES_TINY[-1].replace("num_scenes: 32", f"num_scenes: 32{extra}")
        tower = SCENES_TINY[-2].replace("patch_size: 4, dim: 16, depth: 1, heads: 2, mlp_dim: 32", image.rstrip(", "))
        return CLIPTask.from_config(load_config(None, SCENES_TINY[:-2] + [f"model.name={model}", tower, ov]))

    vit = setup("vit_tiny_patch16_224", ", itm_image_pos: true").model
    assert vit.itm.image_pos and vit.itm.num_prefix_tokens == 1  # the class token gets no encoding
    assert not setup("vit_tiny_patch16_224", "").model.itm.image_pos  # off by default
    swin = setup("swin_tiny_patch4_window7_224", ", itm_image_pos: true",
                 "patch_size: 2, dim: 16, depths: [1], heads: [2], window_size: 4, ").model.eval()
    assert swin.itm.image_pos and swin.itm.num_prefix_tokens == 0
    save_clip(swin, tmp_path)
    again, _ = load_clip(tmp_path)
    assert again.itm.image_pos
    images, ids = torch.rand(2, 1, 16, 16), torch.tensor([[1, 2, 3, 4]] * 2)
    with torch.no_grad():
        _, img_tok = swin.image_features(images)
        _, txt_tok = swin.text_features(ids)
        torch.testing.assert_close(again.itm_logits(img_tok, txt_tok, ids), swin.itm_logits(img_tok, txt_tok, ids))


def test_clip_options_live_in_their_own_typed_section():
    from vitlab.tasks.clip import CLIP_DIGITS_RECIPE
    from vitlab.tasks.clip.task import CLIPSection

    cfg = load_config(None, ["clip.itm_depth=2", "clip.converse=0"], base=CLIP_DIGITS_RECIPE)
    assert isinstance(cfg.clip, CLIPSection) and (cfg.clip.itm_depth, cfg.clip.converse) == (2, 0.0)
    with pytest.raises(ValueError, match="unknown config key 'clip.itm_dept'.*itm_depth"):
        load_config(None, ["clip.itm_dept=2"], base=CLIP_DIGITS_RECIPE)
    with pytest.raises(ValueError, match="clip.loss must be clip or siglip"):
        load_config(None, ["clip.loss=triplet"], base=CLIP_DIGITS_RECIPE)
    # the image tower's overrides take no CLIP option: one place for each, said in one line
    cfg = load_config(None, ["model.overrides.itm_depth=1"], base=CLIP_DIGITS_RECIPE)
    with pytest.raises(ValueError, match=r"model.overrides.itm_depth is a CLIP option: set it in the clip section"):
        CLIPTask.from_config(cfg)
