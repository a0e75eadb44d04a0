"""Token merging through the explainability tools and dense features (issue 24).

The reference for every check is the equivalence behind proportional attention: a merged
token of size s attends and is attended to exactly like s copies of itself in a plain block.
So the attention of a patched block, spread back on the patches, must equal the plain
block's attention on the unmerged sequence where every patch holds its merged token; and the
rollout of a merged model must equal a token-level rollout with the size-weighted merge between
blocks, computed here by loops from the captured per-block probabilities and sources.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from test_tome import PREFIX, SMALL, images, make
from vitlab.components import capture_attention
from vitlab.components.tome import apply_tome, expand_tokens, tome, tome_state, unmerge_tokens
from vitlab.evaluation import gradient_rollout, rollout
from vitlab.evaluation.explain import explain_all
from vitlab.evaluation.interpretation import capture_layers
from vitlab.evaluation.layouts import attention_layers
from vitlab.models.vit import ViTConfig, VisionTransformer

N_PATCH = 64  # 8 x 8 grid


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def sharp(family: str) -> nn.Module:
    """A test model with peaked attention (queries and keys scaled up), so maps differ visibly."""
    if family == "gap":  # no class token, mean pooling: rollout reads the mean over the patches
        torch.manual_seed(0)
        model = VisionTransformer(ViTConfig(mlp_dim=64, class_token=False, pool="mean", **SMALL)).eval()
    else:
        model = make(family)
    with torch.no_grad():
        for name, lin in model.named_modules():
            if isinstance(lin, nn.Linear) and name.rsplit(".", 1)[-1] in ("qkv", "q", "kv"):
                lin.weight.mul_(3.0)
    return model


def block_io(model: nn.Module) -> dict[str, dict[int, torch.Tensor]]:
    """Hooks recording every patched block's (merged) input and output of the next forward."""
    seen: dict[str, dict[int, torch.Tensor]] = {"in": {}, "out": {}}
    for i, blk in enumerate(model.blocks):
        blk.register_forward_pre_hook(lambda m, a, i=i: seen["in"].__setitem__(i, a[0]))
        blk.register_forward_hook(lambda m, a, o, i=i: seen["out"].__setitem__(i, o))
    return seen


def repeated(tokens: torch.Tensor, source: torch.Tensor | None) -> torch.Tensor:
    """The unmerged sequence: every original token holds the merged token it went into."""
    return tokens if source is None else unmerge_tokens(tokens, source)


# ------------------------------------------------------------------ sources
def test_sources_after_every_block():
    model, x = make("vit"), images()
    with torch.no_grad(), tome(model, [5, 0, 7], trace_source=True) as state:
        model(x)
        src = state.sources
    n = N_PATCH + 1
    assert [s.shape[1] for s in src] == [n - 5, n - 5, n - 12] and src[1] is src[0]
    assert src[2] is state.source
    # every token of block 0 lies in exactly one token of block 2
    nested = src[2] @ src[0].transpose(1, 2)  # (B, N2, N0): the size of token u inside token t
    assert torch.equal((nested > 0).sum(1), torch.ones(2, n - 5, dtype=torch.long))
    with torch.no_grad(), tome(model, 5) as state:  # no tracking asked, none kept
        model(x)
        assert state.sources == [] and state.source is None


# ------------------------------------------------------------------ attention maps
@pytest.mark.parametrize("family", ["vit", "deit", "cait"])
def test_block_attention_on_patches_equals_plain_attention_on_repeated_tokens(family):
    model, x = sharp(family), images()
    apply_tome(model, [9, 6, 0])
    seen = block_io(model)
    layers, _ = capture_layers(model, x)
    state = tome_state(model)
    assert state.trace_source is False and len(state.sources) == 3  # switched on for the capture only
    n = N_PATCH + PREFIX[family]
    for i in (1, 2):
        assert layers[i].source.shape[-1] == state.tokens[i - 1] < n  # recorded over merged tokens
        blk = model.blocks[i]
        full = repeated(seen["in"][i], state.sources[i - 1])  # (B, N_orig, C)
        with torch.no_grad(), capture_attention(blk) as cap:
            blk.attn(blk.norm1(full))
        expected = cap.records[0].probs  # plain attention over the repeated tokens
        got = layers[i].probs
        assert got.shape == expected.shape == (2, 2, n, n)
        assert torch.allclose(got, expected, atol=1e-6)


def test_class_attention_on_patches_equals_plain_class_attention_on_repeated_tokens():
    model, x = sharp("cait"), images()
    apply_tome(model, 8)
    seen = block_io(model)
    layers, _ = capture_layers(model, x)
    src = tome_state(model).source
    tokens = seen["out"][2]  # the merged patch tokens class attention reads
    blk = model.blocks_token_only[0]
    with torch.no_grad(), capture_attention(blk) as cap:
        type(blk).forward(blk, model.cls_token.expand(2, -1, -1), repeated(tokens, src))
    got = layers[3].probs
    assert got.shape == cap.records[0].probs.shape == (2, 2, 1, 1 + N_PATCH)
    assert torch.allclose(got, cap.records[0].probs, atol=1e-6)


def test_without_proportional_attention_each_token_is_spread_evenly():
    model, x = make("vit"), images()
    apply_tome(model, 8, prop_attn=False)
    layers, _ = capture_layers(model, x)
    src = tome_state(model).sources[0]  # tokens block 1 attends over
    got, merged = layers[1].probs, layers[1].source
    assert torch.allclose(got.sum(-1), torch.ones(2, 2, N_PATCH + 1))
    per_token = got @ src.transpose(1, 2)[:, None]  # (B, heads, N_orig, N_now): patches of a key summed
    rows = merged.gather(2, src.argmax(1)[:, None, :, None].expand(-1, 2, -1, merged.shape[-1]))  # query rows copied
    assert torch.allclose(per_token, rows, atol=1e-6)


def test_attention_maps_and_pixel_queries_on_a_patched_model():
    from vitlab.evaluation import AttentionVisualizer

    model, x = make("vit"), images(1)
    apply_tome(model, 10)
    maps = AttentionVisualizer(model).generate_attention_maps(x)
    assert [m.token_map.shape for m in maps] == [(1, 8, 8)] * 3
    for m in maps:  # attention to the patches plus attention to the class token is the whole row
        assert torch.allclose(m.token_map.sum((-1, -2)) + m.prefix_attention, torch.ones(1), atol=1e-6)
    probs = capture_layers(model, x)[0][2].probs
    src = tome_state(model).sources[1]
    group = src.argmax(1)[0]  # the token each original token belongs to
    # two patches merged into one token ask the same question: equal query rows
    merged_pairs = [(j, k) for j in range(1, N_PATCH + 1) for k in range(j + 1, N_PATCH + 1) if group[j] == group[k]]
    assert merged_pairs
    j, k = merged_pairs[0]
    assert torch.equal(probs[0, :, j], probs[0, :, k])
    cell = 4  # pixels per patch
    yj, xj = divmod(j - 1, 8)
    pixel = AttentionVisualizer(model).generate_attention_maps(x, layers=[3], query=(yj * cell + 1.0, xj * cell + 1.0))
    assert torch.allclose(pixel.maps[0].token_map[0].flatten(), probs[0, :, j, 1:].mean(0), atol=1e-6)


# ------------------------------------------------------------------ rollout
def reference_rollout(probs: list[torch.Tensor], sources: list[torch.Tensor | None]) -> torch.Tensor:
    """Token-level rollout with the size-weighted merge between blocks, by loops -> (B, N_now, N_orig)."""
    b, n = probs[0].shape[0], probs[0].shape[-1]
    rows = torch.eye(n).expand(b, n, n)
    prev = None
    for p, src in zip(probs, sources):
        a = p.mean(1)
        rows = (0.5 * a @ rows + 0.5 * rows) / (0.5 * a.sum(-1, keepdim=True) + 0.5)
        if src is not None and (prev is None or src.shape[1] != prev.shape[1]):
            old = prev if prev is not None else torch.eye(n).expand(b, n, n)
            merge = torch.zeros(b, src.shape[1], old.shape[1])
            for bi in range(b):
                for t in range(src.shape[1]):
                    for u in range(old.shape[1]):
                        if (src[bi, t] * old[bi, u]).sum() > 0:  # token u went into token t
                            merge[bi, t, u] = old[bi, u].sum() / src[bi, t].sum()
            rows, prev = merge @ rows, src
    return rows


@pytest.mark.parametrize("family", ["vit", "deit", "cait"])
def test_rollout_r0_is_plain_rollout_exactly(family):
    model, x = make(family), images()
    plain = rollout(model, x)
    with tome(model, 0):
        merged = rollout(model, x)
        grad_merged = gradient_rollout(model, x, target=1)
    assert torch.equal(merged.maps, plain.maps)
    assert torch.equal(grad_merged.maps, gradient_rollout(model, x, target=1).maps)


@pytest.mark.parametrize("family", ["vit", "deit", "cait", "gap"])
def test_rollout_of_a_merged_model_equals_the_loop_reference(family):
    model, x = sharp(family), images()
    with torch.no_grad(), tome(model, [6, 4, 9], trace_source=True) as state:
        with capture_attention(model) as cap:
            model(x)
        probs, sources = [r.probs for r in cap.records], list(state.sources)
        got = rollout(model, x).token_maps["grid"]  # (B, 8, 8)
    depth, p = len(model.blocks), PREFIX.get(family, 0)
    rows = reference_rollout(probs[:depth], sources)
    if family == "cait":  # class attention: the class token's row over [itself, merged patch tokens]
        cls = torch.zeros(2, 1, N_PATCH + 1)
        cls[:, 0, -1] = 1.0  # its own column after the 64 patch columns
        keys_rows = torch.cat([cls, torch.cat([rows, torch.zeros(2, rows.shape[1], 1)], -1)], dim=1)
        for pr in probs[depth:]:
            a = pr.mean(1)  # (B, 1, 1 + N_now)
            cls = (0.5 * a @ keys_rows + 0.5 * cls) / (0.5 * a.sum(-1, keepdim=True) + 0.5)
            keys_rows = torch.cat([cls, keys_rows[:, 1:]], dim=1)
        read = cls[:, 0, :N_PATCH]
    elif family == "gap":  # the mean over the original patches: the size-weighted mean of the token rows
        read = (sources[-1].sum(-1, keepdim=True) * rows).sum(1) / N_PATCH
    else:  # class (and distillation) token rows, patch columns
        read = rows[:, :p, p:].mean(1)
    assert got.shape == (2, 8, 8)
    assert torch.allclose(got.flatten(1), read, rtol=1e-5, atol=1e-8)
    assert (got - rollout(model, x).token_maps["grid"]).abs().max() > 1e-3 * got.max()  # merging changed it


def test_attention_layers_need_the_sources_of_that_forward():
    model, x = make("vit"), images()
    apply_tome(model, 8)
    with torch.no_grad(), capture_attention(model) as cap:  # no source tracking
        model(x)
    with pytest.raises(ValueError, match="source tracking"):
        attention_layers(model, cap.records, (32, 32))


# ------------------------------------------------------------------ dense features
@pytest.mark.parametrize("family", ["vit", "deit", "cait"])
def test_forward_intermediates_returns_full_patch_grids(family):
    model, x = make(family), images()
    p = PREFIX[family]
    apply_tome(model, [10, 6, 8], trace_source=True)
    seen = block_io(model)
    with torch.no_grad():
        feats = model.forward_features(x)
        merged_out = dict(seen["out"])
        sources = list(tome_state(model).sources)
        final, maps = model.forward_intermediates(x)
    assert torch.equal(final, feats)  # the final features stay merged, bit-identical
    for i, fmap in enumerate(maps):
        full = expand_tokens(merged_out[i], sources[i])[:, p:]  # (B, 64, C): every patch its token's features
        assert fmap.shape == (2, 32, 8, 8)
        assert torch.equal(fmap.flatten(2).transpose(1, 2), full)
    only = model.forward_intermediates(x, indices=[1], intermediates_only=True, norm=True)
    assert only[0].shape == (2, 32, 8, 8)
    with tome(model, 0):  # r = 0: exactly the plain model
        f0, m0 = model.forward_intermediates(x)
    ref_final, ref_maps = model.forward_intermediates(x)
    assert torch.equal(f0, ref_final) and all(torch.equal(a, b) for a, b in zip(m0, ref_maps))


def test_intermediate_maps_stay_on_the_forward_path():
    model, x = make("vit"), images()
    apply_tome(model, [10, 6, 8])
    seen = block_io(model)
    final, maps = model.forward_intermediates(x, indices=[1])
    src = tome_state(model).sources[1]
    score = model.forward_head(final)[:, 2].sum()
    (grad,) = torch.autograd.grad(score, maps)
    out = model(x)[:, 2].sum()
    (merged_grad,) = torch.autograd.grad(out, [seen["out"][1]])  # gradient on the merged tokens after block 2
    per_patch = grad.flatten(2).transpose(1, 2)  # (B, 64, C)
    group = src.argmax(1)[:, 1:]  # patches' tokens
    size = src.sum(-1)
    # each patch gets 1/size of its token's gradient; summed over a token's patches it is the token's
    expect = merged_grad.gather(1, group[..., None].expand(-1, -1, 32)) / size.gather(1, group)[..., None]
    assert torch.allclose(per_patch, expect, atol=1e-6)


# ------------------------------------------------------------------ the tools end to end
def test_explain_all_on_a_patched_model(tmp_path):
    model, x = make("vit"), images(1)
    apply_tome(model, 10)
    methods = ("attention", "rollout", "grad-rollout", "gradcam", "pca", "distance", "saliency")
    record = explain_all(model, x[0], tmp_path, methods=methods, progress=False)
    assert sorted(record["methods"]) == sorted(methods) and not record["skipped"]
    assert (tmp_path / "sheet.png").is_file()
    assert record["tome"]["r"] == [10, 10, 10] and record["tome"]["tokens"] == [55, 45, 35]
    assert tome_state(model).trace_source is False  # switched back off
