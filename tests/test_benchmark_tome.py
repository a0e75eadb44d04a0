"""Token merging in the benchmark and in prepare_for_inference (issue 24; no test asserts a speed)."""

from __future__ import annotations

import copy
import importlib

import pytest
import torch

from vitlab import create_model
from vitlab.benchmark import benchmark
from vitlab.benchmark.modes import digits_agreement_data, digits_labels, timm_arguments
from vitlab.benchmark.report import BenchmarkReport, BenchmarkResult
from vitlab.cli import main
from vitlab.components.tome import apply_tome, tome, tome_state
from vitlab.deploy import prepare_for_inference
from vitlab.evaluation import count_flops

SMALL_PEAK = ((128, 128, 128),)


def two_block_vit(**kw):
    """65 tokens (class + 8x8 patches), two blocks: r=4 leaves 61 then 57 tokens."""
    torch.manual_seed(0)
    cfg = dict(image_size=32, patch_size=4, dim=32, depth=2, heads=2, mlp_dim=64, num_classes=10)
    return create_model("vit_tiny_patch16_224", **{**cfg, **kw}).eval()


def test_prepare_for_inference_merges_on_a_copy():
    model = two_block_vit()
    x = torch.randn(3, 3, 32, 32)
    fast = prepare_for_inference(model, "fp32", tome=4)
    with torch.no_grad():
        out = fast(x)
        plain = model(x)
        with tome(model, 4):
            expected = model(x)
    assert "_tome_state" not in model.__dict__  # the model the user passed is left unpatched
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    assert (out - plain).abs().max() > 1e-4  # merging changed the computation
    assert tome_state(fast.model).tokens == [61, 57]


def test_a_bf16_copy_of_a_patched_model_merges_on_its_own_blocks():
    model = apply_tome(two_block_vit(), 4)
    x = torch.randn(2, 3, 32, 32)
    fast = prepare_for_inference(model, "bf16")
    reference = apply_tome(copy.deepcopy(two_block_vit()).to(torch.bfloat16), 4)
    tome_state(model).tokens = []
    with torch.no_grad():
        out = fast(x)
        expected = reference(x.to(torch.bfloat16)).float()
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    assert tome_state(fast.model).tokens == [61, 57]
    assert tome_state(model).tokens == []  # the float32 original's blocks did not run


def test_benchmark_rows_per_r_with_their_flops_tokens_and_agreement():
    model = two_block_vit()
    data = torch.randn(8, 3, 32, 32)
    report = benchmark([model], batch_size=4, modes=["eager", "bf16"], repeats=1, warmup=1, latency_repeats=0,
                       agreement_data=data, peak_shapes=SMALL_PEAK, tome=[0, 4])
    rows = {(r.mode, r.tome_r): r for r in report.results}
    assert set(rows) == {("eager", 0), ("bf16", 0), ("eager", 4), ("bf16", 4)}
    merged_flops = count_flops(apply_tome(copy.deepcopy(model), 4)) / 1e9
    assert rows["eager", 4].gflops == pytest.approx(merged_flops)
    assert rows["eager", 4].gflops < rows["eager", 0].gflops == pytest.approx(count_flops(model) / 1e9)
    assert rows["eager", 4].tokens_out == 57 and rows["eager", 0].tokens_out is None
    with torch.no_grad():
        plain = model(data)
        with tome(model, 4):
            merged = model(data)
    # agreement of a merged row is against the plain float32 model, not against itself
    assert rows["eager", 4].max_abs_diff == pytest.approx(float((merged - plain).abs().max()), rel=1e-5)
    assert rows["eager", 0].max_abs_diff == 0
    md = report.to_markdown()
    assert "| ToMe r | tokens |" in md and "| 4 | 57 |" in md


def test_accuracy_on_the_digits_labels():
    model = two_block_vit(image_size=16)
    report = benchmark([model], batch_size=64, modes=["eager"], repeats=1, warmup=1, latency_repeats=0,
                       agreement_data="digits", peak_shapes=SMALL_PEAK, tome=[2])
    x, y = digits_agreement_data(model), digits_labels()
    assert len(y) == len(x)
    with torch.no_grad():
        plain = (model(x).argmax(1) == y).float().mean().item()
        with tome(model, 2):
            merged = (model(x).argmax(1) == y).float().mean().item()
    acc = {r.tome_r: r.accuracy for r in report.results}
    assert acc == {0: pytest.approx(plain), 2: pytest.approx(merged)}
    assert "top-1 acc" in report.to_markdown()


def test_timm_arguments_rebuild_an_overridden_vit():
    model = create_model("vit_tiny_patch16_224", image_size=56, patch_size=4, num_classes=10)
    assert timm_arguments(model) == {"img_size": (56, 56), "patch_size": 4, "in_chans": 3, "embed_dim": 192,
                                     "depth": 12, "num_heads": 3, "mlp_ratio": 4.0, "qkv_bias": True}
    assert timm_arguments(create_model("vit_base_patch16_reg4_gap_256"))["reg_tokens"] == 4
    assert timm_arguments(create_model("swin_tiny_patch4_window7_224")) == {}


def test_the_timm_eager_row_is_the_reference_column():
    def row(impl, mode, ips, r=None):
        return BenchmarkResult("m", impl, mode, "cpu", 8, (56, 56), 10, 1.0, throughput=ips, tome_r=r)

    report = BenchmarkReport([row("vitlab", "eager", 150.0, 0), row("vitlab", "eager", 300.0, 13),
                              row("timm", "eager", 100.0), row("timm", "compile", 120.0)])
    assert report.timm_eager() == 100.0
    lines = report.to_markdown().splitlines()
    assert lines[0].endswith("| vs timm eager |")
    assert [line.split(" | ")[-1] for line in lines[2:6]] == ["1.50x |", "3.00x |", "1.00x |", "1.20x |"]


def test_cli_tome_flag(tmp_path, capsys, monkeypatch):
    bm = importlib.import_module("vitlab.benchmark.harness")
    real = bm.find_peak_gemm
    monkeypatch.setattr(bm, "find_peak_gemm", lambda dtype, device, *args: real(dtype, device, SMALL_PEAK, 2))
    args = ["benchmark", "vit_tiny", "--image-size", "32", "--batch-size", "2", "--modes", "eager", "onnx",
            "--repeats", "1", "--warmup", "1", "--latency-repeats", "0", "--tome", "8", "--quiet"]
    assert main(args) == 0
    text = capsys.readouterr().out
    # vit_tiny at 32 px: 2x2 patches of 16 px, 5 tokens; r=8 is clamped to the pairs left in each of
    # the 12 blocks (2, then 1), so 2 tokens (the class token and one patch) reach the head
    assert "| vit_tiny_patch16_224 | vitlab | eager | 8 | 2 |" in text
    assert "| vit_tiny_patch16_224 | vitlab | onnx | 0 | - |" in text  # onnx: the plain model only
    assert "| vitlab | onnx | 8 |" not in text


def test_predict_with_tome_runs_the_merged_model(tmp_path, capsys):
    import json

    from PIL import Image

    from vitlab.deploy import ViTClassifier
    from vitlab.pretrained import save_checkpoint

    model = two_block_vit()
    with torch.no_grad():
        model.head.weight.mul_(100)  # confident enough for the merge to move the confidence visibly
    ckpt = save_checkpoint(model, tmp_path / "ckpt", labels=[str(i) for i in range(10)])
    path = tmp_path / "image.png"
    Image.fromarray((torch.rand(32, 32, 3) * 255).to(torch.uint8).numpy()).save(path)
    assert main(["predict", "--checkpoint", str(ckpt), str(path), "--json", "--top-k", "3", "--tome", "4"]) == 0
    got = json.loads(capsys.readouterr().out)[0]
    merged = ViTClassifier(model, labels=[str(i) for i in range(10)], tome=4).predict(str(path), top_k=3)
    plain = ViTClassifier(model, labels=[str(i) for i in range(10)]).predict(str(path), top_k=3)
    assert got["confidence"] == pytest.approx(merged["confidence"], abs=1e-6)
    assert abs(merged["confidence"] - plain["confidence"]) > 1e-3
    assert "_tome_state" not in model.__dict__
