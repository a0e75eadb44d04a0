"""CLIP foundations: text tower, tokenizer, model, losses, zero-shot, retrieval, HF conversion.

Reference values come from Hugging Face transformers (a randomly initialised tiny
``CLIPModel`` and a ``CLIPTokenizer`` built from a vocabulary written here, no downloads)
and from hand computations in plain Python.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from vitlab.models.text import TextTransformer, causal_mask, text_config
from vitlab.tasks.clip import (
    CLIP, CLIPConfig, clip_loss, retrieval_metrics, siglip_loss, zero_shot_accuracy, zero_shot_classifier,
    zero_shot_weights,
)
from vitlab.tasks.clip.convert import load_clip, load_hf_clip, save_clip
from vitlab.tasks.clip.tokenizer import CLIPTokenizer



def transformers_module():
    """``transformers``, or a skip of the calling test only (the vitlab-only tests need no transformers)."""
    return pytest.importorskip("transformers")


WORDS = ["a", "photo", "of", "the", "dog", "cat", "red", "car", "two", "dogs", "on", "grass"]
CAPTIONS = [
    "a photo of a dog",
    "A  Photo of the CAT.",
    "two dogs on the grass!!",
    "a red car, 2 cats",
    "the dog's photo",
    "grass\tgrass  photo",
]


# ----------------------------------------------------------------- fixtures
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte -> printable character table (written out from its definition)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


@pytest.fixture(scope="module")
def vocab_folder(tmp_path_factory):
    """vocab.json + merges.txt of a tiny CLIP BPE: all bytes, their ``</w>`` forms, merges for WORDS."""
    chars = list(_bytes_to_unicode().values())
    vocab_list = chars + [c + "</w>" for c in chars]
    merges: list[tuple[str, str]] = []
    for word in WORDS:  # merge left to right: ((p h) o) t o</w>
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:
            pair = (parts[0], parts[1])
            merged = parts[0] + parts[1]
            if pair not in merges:
                merges.append(pair)
                vocab_list.append(merged)
            parts = [merged] + parts[2:]
    vocab_list = list(dict.fromkeys(vocab_list)) + ["<|startoftext|>", "<|endoftext|>"]
    folder = tmp_path_factory.mktemp("clip_tok")
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab_list)}), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n",
                                       encoding="utf-8")
    return folder


def _hf_tiny_clip(eos_token_id: int = 2):
    cfg = transformers_module().CLIPConfig(
        text_config=dict(vocab_size=99, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=12, eos_token_id=eos_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                           image_size=24, patch_size=8),
        projection_dim=16,
    )
    torch.manual_seed(1)
    model = transformers_module().CLIPModel(cfg).eval()
    with torch.no_grad():  # move every tensor off its trivial init (LayerNorm 1/0, zero biases)
        for name, p in model.named_parameters():
            if name != "logit_scale":
                p.add_(torch.randn_like(p) * 0.2)
    return model


# ---------------------------------------------------------- HF parity
@pytest.mark.parametrize("eos_token_id", [2, 7])
def test_hf_clip_folder_gives_same_embeddings_and_logits(tmp_path, eos_token_id):
    hf = _hf_tiny_clip(eos_token_id)
    hf.save_pretrained(tmp_path)
    model, _ = load_hf_clip(tmp_path)
    images = torch.randn(3, 3, 24, 24)
    if eos_token_id == 2:  # legacy configs pool at the largest id: the end-of-text is the max id
        ids = torch.tensor([[97, 5, 9, 98, 0, 0, 0, 0], [97, 40, 98, 0, 0, 0, 0, 0], [97, 1, 2, 3, 4, 5, 6, 98]])
    else:  # pooled at the first id 7; larger ids before and after it
        ids = torch.tensor([[97, 50, 7, 98, 98, 98, 98, 98], [97, 7, 60, 61, 62, 7, 7, 7], [97, 1, 2, 3, 4, 5, 6, 7]])
    with torch.no_grad():
        ref = hf(input_ids=ids, pixel_values=images)
        img = model.encode_image(images)
        txt = model.encode_text(ids)
        logits_i, logits_t = model(images, ids)
        hf_img, hf_txt = hf.get_image_features(pixel_values=images), hf.get_text_features(input_ids=ids)
    # transformers 5 returns an output object, earlier versions the tensor
    hf_img = getattr(hf_img, "pooler_output", hf_img)
    hf_txt = getattr(hf_txt, "pooler_output", hf_txt)
    torch.testing.assert_close(img, hf_img, atol=1e-5, rtol=0)
    torch.testing.assert_close(txt, hf_txt, atol=1e-5, rtol=0)
    torch.testing.assert_close(logits_i, ref.logits_per_image, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits_t, ref.logits_per_text, atol=1e-5, rtol=1e-5)


def test_hf_folder_of_another_architecture_is_one_clear_error(tmp_path):
    from vitlab.errors import CheckpointError

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "vit", "hidden_size": 8}))
    with pytest.raises(CheckpointError, match="not a Hugging Face CLIPModel config"):
        load_hf_clip(tmp_path)


# ----------------------------------------------------------- tokenizer
def test_tokenizer_from_vocab_and_merges_matches_hf(vocab_folder):
    hf = transformers_module().CLIPTokenizer.from_pretrained(str(vocab_folder))
    ours = CLIPTokenizer.from_pretrained(vocab_folder, context_length=32)
    expected = hf(CAPTIONS)["input_ids"]
    got = ours(CAPTIONS)
    for row, exp in zip(got, expected):
        assert row[: len(exp)].tolist() == exp
        assert (row[len(exp):] == ours.eos_id).all()  # padded with end-of-text, as HF pads
    # the merges were applied: "photo" is one token, not five bytes
    photo = ours.tokenizer.token_to_id("photo</w>")
    assert photo is not None and photo in got[0].tolist()


def test_tokenizer_json_of_hf_loads_with_same_ids(vocab_folder, tmp_path):
    hf = transformers_module().CLIPTokenizer.from_pretrained(str(vocab_folder))
    hf.save_pretrained(tmp_path)
    assert (tmp_path / "tokenizer.json").is_file()
    (tmp_path / "vocab.json").unlink(missing_ok=True)  # only tokenizer.json is left to read
    (tmp_path / "merges.txt").unlink(missing_ok=True)
    ours = CLIPTokenizer.from_pretrained(tmp_path, context_length=32)
    for text, exp in zip(CAPTIONS, hf(CAPTIONS)["input_ids"]):
        assert ours.encode_ids(text) == exp


def test_tokenizer_truncates_and_pads_like_clip(vocab_folder):
    hf = transformers_module().CLIPTokenizer.from_pretrained(str(vocab_folder))
    ours = CLIPTokenizer.from_pretrained(vocab_folder, context_length=6)
    long = "a photo of the red car on the grass"
    full = ours.encode_ids(long)
    ids = ours([long, "dog"])
    # [start] first four tokens [end]: the last kept position is forced to end-of-text
    assert ids[0].tolist() == full[:5] + [ours.eos_id]
    assert ids[0].tolist() == hf(long, truncation=True, max_length=6)["input_ids"]
    dog = ours.tokenizer.token_to_id("dog</w>")
    assert ids[1].tolist() == [ours.bos_id, dog, ours.eos_id, ours.eos_id, ours.eos_id, ours.eos_id]
    with pytest.raises(ValueError, match="more than the context length 6"):
        ours([long], truncate=False)


def test_trained_bpe_is_saved_and_restored_with_the_checkpoint(tmp_path):
    corpus = ["a photo of a dog", "a photo of a cat", "a dog on the grass", "the cat on a car"] * 5
    tok = CLIPTokenizer.train(corpus, vocab_size=50, context_length=10)
    # the special tokens are the largest ids: argmax pooling finds the end-of-text
    assert tok.eos_id == tok.vocab_size - 1 and tok.bos_id == tok.vocab_size - 2
    assert tok.tokenizer.token_to_id("photo</w>") is not None  # a frequent word became one token
    assert tok.decode(tok(["A photo of a DOG"])[0]) == "a photo of a dog"
    cfg = CLIPConfig(image_model="vit_tiny_patch16_224",
                     image_overrides=dict(image_size=16, patch_size=8, dim=16, depth=1, heads=2, mlp_dim=32),
                     text=text_config("clip_text_tiny", vocab_size=tok.vocab_size, context_length=10, dim=16,
                                      depth=1, heads=2, mlp_dim=32), embed_dim=8)
    model = CLIP(cfg).eval()
    with torch.no_grad():
        model.logit_scale.fill_(2.0)
    save_clip(model, tmp_path, tok)
    model2, tok2 = load_clip(tmp_path)
    texts = ["a cat on the grass", "a dog"]
    assert torch.equal(tok2(texts), tok(texts))
    images = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(model2(images, tok2(texts))[0], model(images, tok(texts))[0], atol=0, rtol=0)


# ----------------------------------------------------------- text tower
def test_text_tower_is_causal_and_pools_the_end_of_text_token():
    enc = TextTransformer(text_config("clip_text_tiny", vocab_size=50, context_length=8, embed_dim=0)).eval()
    ids = torch.tensor([[48, 3, 4, 49, 0, 0, 0, 0]])
    changed = ids.clone()
    changed[0, 5] = 17  # a token after the end-of-text
    with torch.no_grad():
        a, b = enc.forward_features(ids), enc.forward_features(changed)
        torch.testing.assert_close(a[:, :5], b[:, :5], atol=0, rtol=0)  # nothing looks ahead
        assert not torch.allclose(a[:, 5], b[:, 5])
        torch.testing.assert_close(enc(ids), a[:, 3], atol=0, rtol=0)  # argmax id 49 sits at position 3
    assert causal_mask(3)[0, 0].tolist() == [[0.0, float("-inf"), float("-inf")], [0.0, 0.0, float("-inf")],
                                             [0.0, 0.0, 0.0]]
    with pytest.raises(ValueError, match="exceeds the context length 8"):
        enc(torch.zeros(1, 9, dtype=torch.long))
    with pytest.raises(KeyError, match="unknown text encoder 'nope'"):
        text_config("nope")


# ------------------------------------------------------- temperature
def test_logit_scale_starts_at_clip_value_and_is_clamped_at_100():
    cfg = CLIPConfig(image_model="vit_tiny_patch16_224",
                     image_overrides=dict(image_size=16, patch_size=8, dim=16, depth=1, heads=2, mlp_dim=32),
                     text=text_config("clip_text_tiny", vocab_size=20, dim=16, depth=1, heads=2, mlp_dim=32),
                     embed_dim=8)
    model = CLIP(cfg)
    assert model.logit_scale.item() == pytest.approx(math.log(1 / 0.07))
    with torch.no_grad():
        model.logit_scale.fill_(math.log(99.0))
    opt = torch.optim.SGD([model.logit_scale], lr=1.0)
    (-model.scale()).backward()  # pushes the scale up: one step takes log-scale far past log(100)
    opt.step()
    assert model.logit_scale.item() > math.log(100.0)
    assert model.scale().item() == pytest.approx(100.0)  # the value used in the logits is capped
    images, ids = torch.randn(2, 3, 16, 16), torch.tensor([[1, 2, 19], [1, 3, 19]])
    with torch.no_grad():
        logits, _ = model(images, ids)
        cos = model.encode_image(images, True) @ model.encode_text(ids, True).t()
    torch.testing.assert_close(logits, 100.0 * cos)
    model.clamp_logit_scale_()
    assert model.logit_scale.item() == pytest.approx(math.log(100.0))


# ------------------------------------------------------------ losses
IMG = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])
TXT = torch.tensor([[0.8, 0.6], [0.0, 1.0], [0.6, -0.8]])  # i2t and t2i terms differ


def _hand_cos() -> list[list[float]]:
    rows = []
    for a in IMG.tolist():
        rows.append([sum(x * y for x, y in zip(a, b)) / math.hypot(*a) / math.hypot(*b) for b in TXT.tolist()])
    return rows


def _hand_ce(row: list[float], targets: list[float]) -> float:
    lse = math.log(sum(math.exp(v) for v in row))
    return -sum(t * (v - lse) for v, t in zip(row, targets))


@pytest.mark.parametrize("labels", [None, [0, 1, 0]])
def test_clip_loss_equals_hand_computation(labels):
    s = 2.0
    cos = _hand_cos()
    logits = [[s * v for v in row] for row in cos]
    n = 3
    pos = [[(i == j) if labels is None else labels[i] == labels[j] for j in range(n)] for i in range(n)]
    i2t = sum(_hand_ce(logits[i], [p / sum(pos[i]) for p in pos[i]]) for i in range(n)) / n
    cols = [[logits[i][j] for i in range(n)] for j in range(n)]
    pos_t = [[pos[i][j] for i in range(n)] for j in range(n)]
    t2i = sum(_hand_ce(cols[j], [p / sum(pos_t[j]) for p in pos_t[j]]) for j in range(n)) / n
    lab = None if labels is None else torch.tensor(labels)
    got = clip_loss(IMG * 3.0, TXT, s, lab)  # embeddings are normalised inside
    assert got.item() == pytest.approx((i2t + t2i) / 2, abs=1e-6)
    if labels is not None:  # duplicates are positives, not negatives: a different number than plain CLIP
        assert got.item() != pytest.approx(clip_loss(IMG, TXT, s).item(), abs=1e-3)


NEG = torch.tensor([[1.0, 0.0], [-0.6, 0.8]])  # two further texts (e.g. digit-swapped captions)


@pytest.mark.parametrize("labels", [None, [0, 1, 0]])
def test_clip_loss_with_negative_texts_equals_hand_computation(labels):
    s = 2.0
    cos = _hand_cos()
    neg_cos = [[sum(x * y for x, y in zip(a, b)) / math.hypot(*a) / math.hypot(*b) for b in NEG.tolist()]
               for a in IMG.tolist()]
    n = 3
    neg_labels = [5, 1]  # the second negative text describes layout 1: a positive of image 1 when labels say so
    pos = [[(i == j) if labels is None else labels[i] == labels[j] for j in range(n)] for i in range(n)]
    neg_pos = [[labels is not None and labels[i] == g for g in neg_labels] for i in range(n)]
    # image -> text rows: the 3 texts and then the 2 negative texts; text -> image rows unchanged
    i2t = 0.0
    for i in range(n):
        row = [s * v for v in cos[i] + neg_cos[i]]
        p_row = pos[i] + neg_pos[i]
        i2t += _hand_ce(row, [p / sum(p_row) for p in p_row]) / n
    cols = [[s * cos[i][j] for i in range(n)] for j in range(n)]
    pos_t = [[pos[i][j] for i in range(n)] for j in range(n)]
    t2i = sum(_hand_ce(cols[j], [p / sum(pos_t[j]) for p in pos_t[j]]) for j in range(n)) / n
    lab = None if labels is None else torch.tensor(labels)
    got = clip_loss(IMG, TXT, s, lab, negative_text_emb=NEG * 2.0, negative_text_labels=torch.tensor(neg_labels))
    assert got.item() == pytest.approx((i2t + t2i) / 2, abs=1e-6)
    assert got.item() > clip_loss(IMG, TXT, s, lab).item() + 1e-3  # the negatives make it harder


@pytest.mark.parametrize("labels", [None, [0, 1, 0]])
def test_siglip_loss_equals_hand_computation(labels):
    s, b = 3.0, -1.5
    cos = _hand_cos()
    total = 0.0
    for i in range(3):
        for j in range(3):
            positive = (i == j) if labels is None else labels[i] == labels[j]
            z = 1.0 if positive else -1.0
            total += math.log(1 + math.exp(-z * (s * cos[i][j] + b)))
    lab = None if labels is None else torch.tensor(labels)
    assert siglip_loss(IMG, TXT, s, b, lab).item() == pytest.approx(total / 3, abs=1e-6)


# ---------------------------------------------------------- zero-shot
def test_zero_shot_weights_average_normalised_templates_and_renormalise():
    # class 0: templates (3, 4) and (0, 2); class 1: (1, 0) and (0, -5)
    emb = torch.tensor([[[3.0, 4.0], [0.0, 2.0]], [[1.0, 0.0], [0.0, -5.0]]])
    w = zero_shot_weights(emb)
    m0 = (0.3, 0.9)  # mean of (0.6, 0.8) and (0, 1)
    m1 = (0.5, -0.5)
    exp = torch.tensor([[m0[0] / math.hypot(*m0), m1[0] / math.hypot(*m1)],
                        [m0[1] / math.hypot(*m0), m1[1] / math.hypot(*m1)]])
    torch.testing.assert_close(w, exp)
    images = torch.tensor([[0.0, 1.0], [1.0, -0.1], [1.0, 1.0]])  # -> class 0, class 1, class 0
    acc = zero_shot_accuracy(images, w, torch.tensor([0, 1, 1]), topk=(1, 2))
    assert acc == {"top1": pytest.approx(2 / 3), "top2": 1.0}


def test_zero_shot_classifier_ensembles_prompts_per_class():
    tok = CLIPTokenizer.train(["a photo of a dog", "a sketch of a cat", "a bird"] * 3, vocab_size=50,
                              context_length=10)
    cfg = CLIPConfig(image_model="vit_tiny_patch16_224",
                     image_overrides=dict(image_size=16, patch_size=8, dim=16, depth=1, heads=2, mlp_dim=32),
                     text=text_config("clip_text_tiny", vocab_size=tok.vocab_size, context_length=10, dim=16,
                                      depth=1, heads=2, mlp_dim=32), embed_dim=8)
    model = CLIP(cfg).eval()
    templates = ["a photo of a {}.", "a sketch of a {}."]
    classes = ["dog", "cat", "bird"]
    w = zero_shot_classifier(model, tok, classes, templates)
    with torch.no_grad():
        for k, c in enumerate(classes):
            e = torch.stack([model.encode_text(tok([t.format(c)]), normalize=True)[0] for t in templates])
            m = e.mean(0)
            torch.testing.assert_close(w[:, k], m / m.norm(), atol=1e-6, rtol=0)


# ---------------------------------------------------------- retrieval
def test_retrieval_metrics_equal_hand_computed_ranks():
    images = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    # texts 0, 1 describe image 0, text 2 image 1, text 3 image 2
    texts = torch.tensor([[0.0, 1.0], [0.8, 0.6], [0.6, 0.8], [-0.6, -0.8]])
    # cos (images x texts): img0 [0, .8, .6, -.6]; img1 [1, .6, .8, -.8]; img2 [0, -.8, -.6, .6]
    m = retrieval_metrics(images, texts, torch.tensor([0, 0, 1, 2]), ks=(1, 2))
    # i2t: img0 best caption t1 rank 1; img1 wants t2 (rank 2 after t0); img2 wants t3 (rank 1)
    assert m["i2t_R@1"] == pytest.approx(2 / 3) and m["i2t_R@2"] == 1.0
    assert m["i2t_mean_rank"] == pytest.approx(4 / 3) and m["i2t_median_rank"] == 1.0
    # t2i: t0 -> img0 scores 0, img1 1, img2 0: one image scores higher (the tie does not) = rank 2
    # t1 -> img0 rank 1; t2 -> img1 rank 1; t3 -> img2 rank 1
    assert m["t2i_R@1"] == pytest.approx(3 / 4) and m["t2i_R@2"] == 1.0
    assert m["t2i_mean_rank"] == pytest.approx(5 / 4) and m["t2i_median_rank"] == 1.0
    # an even number of ranks [1, 2]: the median is the lower middle value, the mean 1.5
    two = retrieval_metrics(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([[1.0, 0.0], [1.0, 0.1]]))
    assert two["t2i_median_rank"] == 1.0 and two["t2i_mean_rank"] == 1.5
    with pytest.raises(ValueError, match="text_to_image is needed"):
        retrieval_metrics(images, texts)


# ------------------------------------------------- any image backbone
def _one_variant_per_family() -> list[str]:
    from vitlab.models import get_entry, list_models

    seen: dict[str, str] = {}
    for name in list_models():
        seen.setdefault(get_entry(name).family, name)
    return sorted(seen.values())


@pytest.mark.parametrize("name", _one_variant_per_family())
def test_clip_image_tower_is_any_backbone_through_the_contract(name):
    from conftest import tiny_model

    backbone = tiny_model(name, num_classes=0).eval()
    size = backbone.config.image_size
    cfg = CLIPConfig(image_model=name, text=text_config("clip_text_tiny", vocab_size=20, dim=16, depth=1, heads=2,
                                                         mlp_dim=32), embed_dim=8)
    model = CLIP(cfg, image_tower=backbone).eval()
    images = torch.randn(2, 3, *size)
    with torch.no_grad():
        # without a classifier, the backbone's own forward returns its pooled pre-logit features
        expected = model.visual_projection(backbone(images))
        torch.testing.assert_close(model.encode_image(images), expected, atol=1e-6, rtol=0)
        assert not torch.allclose(model.encode_image(images)[0], model.encode_image(images)[1])


def test_siglip_option_adds_a_learnable_bias_to_the_logits():
    cfg = CLIPConfig(image_model="vit_tiny_patch16_224",
                     image_overrides=dict(image_size=16, patch_size=8, dim=16, depth=1, heads=2, mlp_dim=32),
                     text=text_config("clip_text_tiny", vocab_size=20, dim=16, depth=1, heads=2, mlp_dim=32),
                     embed_dim=8, init_logit_scale=10.0, logit_bias=-10.0)
    model = CLIP(cfg).eval()
    assert "logit_bias" in dict(model.named_parameters())
    images, ids = torch.randn(2, 3, 16, 16), torch.tensor([[1, 2, 19], [1, 3, 19]])
    with torch.no_grad():
        logits, per_text = model(images, ids)
        cos = model.encode_image(images, True) @ model.encode_text(ids, True).t()
    torch.testing.assert_close(logits, 10.0 * cos - 10.0)
    torch.testing.assert_close(per_text, logits.t())


def test_missing_tokenizer_and_checkpoint_files_are_one_clear_error(tmp_path):
    from vitlab.errors import CheckpointError

    with pytest.raises(FileNotFoundError, match="holds no CLIP tokenizer"):
        CLIPTokenizer.from_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="config.json is missing"):
        load_hf_clip(tmp_path)
    with pytest.raises(CheckpointError, match="holds no vitlab CLIP checkpoint"):
        load_clip(tmp_path)
