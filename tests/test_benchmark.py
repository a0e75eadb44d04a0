"""The benchmark harness and the inference modes (no test here asserts a speed)."""

from __future__ import annotations

import importlib
import json
import math

import pytest
import torch
import torch.nn.functional as F

from vitlab.cli import main
from vitlab.datasets.factory import build_dataset
from vitlab.deploy import prepare_for_inference
from vitlab.evaluation import benchmark, count_flops, measure_matmul_peak
from vitlab.evaluation.benchmark import digits_agreement_data, peak_allocated_bytes
from vitlab.models import create_model
from vitlab.tasks import ViTClassifier

SMALL_PEAK = ((128, 128, 128),)  # a quick matmul "peak" for the tests; real runs use large GEMMs


def one_block_vit(**kw):
    cfg = dict(image_size=32, patch_size=8, dim=32, depth=1, heads=2, mlp_dim=64, num_classes=10)
    return create_model("vit_tiny_patch16_224", **{**cfg, **kw}).eval()


def hand_count_one_block(image=32, patch=8, c=32, mlp=64, classes=10, channels=3) -> int:
    """Forward FLOPs (2 x MACs) of a 1-block ViT, written out layer by layer."""
    n = (image // patch) ** 2
    t = n + 1  # + class token
    patch_embed = 2 * n * c * channels * patch * patch
    qkv = 2 * t * c * 3 * c
    attention = 2 * (2 * t * t * c)  # q @ k^T and probs @ v over all heads
    proj = 2 * t * c * c
    mlp_flops = 2 * t * c * mlp * 2
    head = 2 * c * classes
    return patch_embed + qkv + attention + proj + mlp_flops + head


def test_flops_equal_a_hand_count():
    assert count_flops(one_block_vit()) == hand_count_one_block()


def test_harness_returns_every_field_with_sane_values():
    model = one_block_vit()
    report = benchmark([model], batch_size=4, modes=["eager", "bf16", "int8"], repeats=2, warmup=1,
                       latency_repeats=3, peak_shapes=SMALL_PEAK)
    rows = {r.mode: r for r in report.results}
    assert set(rows) == {"eager", "bf16", "int8"}
    for r in rows.values():
        assert r.note == ""
        assert r.params == sum(p.numel() for p in model.parameters())
        assert r.gflops == pytest.approx(hand_count_one_block() / 1e9)
        for v in (r.throughput, r.latency_p50_ms, r.latency_p95_ms, r.peak_memory_mb, r.achieved_gflops,
                  r.peak_gflops, r.peak_fraction):
            assert v is not None and math.isfinite(v) and v > 0, r
        assert r.latency_p50_ms <= r.latency_p95_ms
        assert r.achieved_gflops == pytest.approx(r.gflops * r.throughput)
        assert 0 <= r.top1_agreement <= 1 and r.max_abs_diff >= 0
    assert rows["eager"].max_abs_diff == 0 and rows["eager"].top1_agreement == 1
    assert rows["bf16"].compute_dtype == "bf16" and rows["int8"].compute_dtype == "int8"
    assert set(report.peaks) == {"fp32", "bf16", "int8"} and all(v > 0 for v in report.peaks.values())
    assert_peak_fractions(report)
    assert report.machine["torch threads"] >= 1


def assert_peak_fractions(report) -> None:
    """Each row's % of peak is its achieved GFLOP/s over the peak measured for its compute dtype in this report."""
    for r in report.results:
        peak = report.peaks[r.compute_dtype]
        assert r.peak_gflops == peak, (r.mode, r.peak_gflops, peak)
        assert r.peak_fraction == pytest.approx(r.achieved_gflops / peak, rel=1e-12), r.mode
    md = report.to_markdown().splitlines()
    col = md[0].split(" | ").index("% of peak")
    for r, line in zip(report.results, md[2:]):
        fraction = r.achieved_gflops / report.peaks[r.compute_dtype]
        assert line.split(" | ")[col] == f"{100 * fraction:.0f}% {r.compute_dtype}"
    # The rows are independent measurements: a constant fraction would be a bug (and is what a broken
    # report would show). Different modes and dtypes give different fractions.
    assert len({round(r.peak_fraction, 12) for r in report.results}) == len(report.results)


def test_training_rows():
    report = benchmark([one_block_vit()], batch_size=4, modes=["eager"], train=True, repeats=2, warmup=1,
                       latency_repeats=0, peak_shapes=SMALL_PEAK)
    assert_peak_fractions(report)
    train = {r.mode: r for r in report.results if r.mode.startswith("train")}
    assert set(train) == {"train-fp32", "train-fp32-ckpt", "train-bf16", "train-bf16-ckpt"}
    for r in train.values():
        assert r.throughput > 0 and r.peak_memory_mb > 0 and r.gflops == pytest.approx(3 * hand_count_one_block() / 1e9)


def test_report_formats(tmp_path):
    report = benchmark([one_block_vit()], batch_size=2, modes=["eager"], repeats=1, warmup=1, latency_repeats=2,
                       peak_shapes=SMALL_PEAK)
    md = report.save(tmp_path / "r.md").read_text()
    assert "| model |" in md and "Matrix-multiply peak" in md and "Machine:" in md
    csv_text = report.save(tmp_path / "r.csv").read_text()
    assert csv_text.splitlines()[0].startswith("model,impl,mode")
    data = json.loads(report.save(tmp_path / "r.json").read_text())
    assert data["results"][0]["mode"] == "eager" and "fp32" in data["peaks"]
    with pytest.raises(ValueError, match=r"\.md"):
        report.save(tmp_path / "r.txt")


def test_errors_name_the_choices():
    with pytest.raises(ValueError, match="eager.*onnx"):
        benchmark(["vit_tiny_patch16_224"], modes=["fp64"])
    with pytest.raises(ValueError, match="hf.*timm"):
        benchmark(["vit_tiny_patch16_224"], reference="keras")
    with pytest.raises(ValueError, match="bf16"):
        prepare_for_inference(one_block_vit(), precision="fp8")
    with pytest.raises(ValueError, match="CPU"):
        prepare_for_inference(one_block_vit(), precision="int8", device="cuda")


def test_peak_memory_counts_a_large_temporary():
    x = torch.randn(256, 1024)  # 1 MiB

    def fn():
        y = x * 2  # 1 MiB allocated and freed
        return float(y.sum())

    assert peak_allocated_bytes(fn) >= 2**20
    assert measure_matmul_peak("fp32", shapes=SMALL_PEAK, repeats=2) > 0


def test_hf_reference_runs_in_the_same_rounds():
    pytest.importorskip("transformers")
    report = benchmark([one_block_vit()], batch_size=2, modes=["eager"], reference="hf", repeats=1, warmup=1,
                       latency_repeats=0, peak_shapes=SMALL_PEAK)
    impls = {r.impl for r in report.results}
    assert impls == {"vitlab", "hf (sdpa)"}
    hf = next(r for r in report.results if r.impl != "vitlab")
    assert hf.params == report.results[0].params and hf.throughput > 0


# ---------------------------------------------------------------- agreement with a trained model


@pytest.fixture(scope="module")
def digits_model():
    """A 2-block ViT (2x2 patches of 4x4 pixels) trained on the digits for a second or two: ~95% test accuracy."""
    torch.manual_seed(0)
    data = build_dataset("digits", "train")
    x = torch.stack([data[i][0] for i in range(len(data))])
    y = torch.tensor([data[i][1] for i in range(len(data))])
    model = create_model("vit_tiny_patch16_224", image_size=8, patch_size=4, in_channels=1, dim=32, depth=2, heads=2,
                         mlp_dim=64, num_classes=10)
    model.pretrained_cfg = {**model.pretrained_cfg, "input_size": 8, "mean": tuple(data.mean), "std": tuple(data.std)}
    xn = (x - data.mean[0]) / data.std[0]
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: one thread is fastest, and immune to a busy machine
    try:
        for _ in range(150):
            idx = torch.randint(0, len(xn), (128,))
            loss = F.cross_entropy(model(xn[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    return model.eval()


def test_trained_model_learned_the_digits(digits_model):
    test = build_dataset("digits", "test")
    x = digits_agreement_data(digits_model)
    y = torch.tensor([test[i][1] for i in range(len(test))])
    with torch.no_grad():
        acc = (digits_model(x).argmax(1) == y).float().mean().item()
    assert acc > 0.85


# Stated tolerances against float32 on the digits test set: (min top-1 agreement, max abs logit
# difference); the trained model's logits span about -10..15.
AGREEMENT_TOLERANCES = {"bf16": (0.98, 0.25), "bf16-amp": (0.98, 0.1), "int8": (0.98, 0.5)}


def test_bf16_and_int8_agree_with_fp32_on_digits(digits_model):
    report = benchmark([digits_model], batch_size=64, modes=list(AGREEMENT_TOLERANCES), repeats=1, warmup=1,
                       latency_repeats=0, agreement_data="digits", peak_shapes=SMALL_PEAK)
    for r in report.results:
        assert "digits" in r.agreement_on
        if r.mode in AGREEMENT_TOLERANCES:
            min_top1, max_diff = AGREEMENT_TOLERANCES[r.mode]
            assert r.top1_agreement >= min_top1, (r.mode, r.top1_agreement)
            assert r.max_abs_diff <= max_diff, (r.mode, r.max_abs_diff)


@pytest.mark.parametrize("precision", ["bf16", "int8"])
def test_classifier_precisions_agree(digits_model, precision):
    test = build_dataset("digits", "test")
    images = [test[i][0] for i in range(32)]
    fp32 = ViTClassifier(digits_model, labels=[str(i) for i in range(10)]).predict(images)
    fast = ViTClassifier(digits_model, labels=[str(i) for i in range(10)], precision=precision).predict(images)
    same = sum(a["index"] == b["index"] for a, b in zip(fp32, fast))
    assert same >= 31
    assert all(abs(a["confidence"] - b["confidence"]) < 0.05 for a, b in zip(fp32, fast) if a["index"] == b["index"])


def test_cli_benchmark_writes_the_table(tmp_path, capsys, monkeypatch):
    bm = importlib.import_module("vitlab.evaluation.benchmark")  # the module (the package exports the function)
    real = bm.find_peak_gemm
    monkeypatch.setattr(bm, "find_peak_gemm", lambda dtype, device, *args: real(dtype, device, SMALL_PEAK, 2))
    out = tmp_path / "bench.json"
    args = ["benchmark", "vit_tiny", "--image-size", "32", "--batch-size", "2", "--modes", "eager", "int8",
            "--repeats", "1", "--warmup", "1", "--latency-repeats", "2", "--output", str(out), "--quiet"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "| vit_tiny_patch16_224 | vitlab | int8 |" in text
    assert {r["mode"] for r in json.loads(out.read_text())["results"]} == {"eager", "int8"}
    assert main(["benchmark", "vit_tiny", "--modes", "warp"]) == 2
    assert "choose from" in capsys.readouterr().err


def test_cli_predict_precision_flags(digits_model, tmp_path, capsys):
    from PIL import Image

    from vitlab.pretrained import save_checkpoint

    ckpt = save_checkpoint(digits_model, tmp_path / "ckpt", labels=[str(i) for i in range(10)])
    test = build_dataset("digits", "test")
    path = tmp_path / "digit.png"
    Image.fromarray((test[0][0][0].numpy() * 255).astype("uint8")).save(path)
    outs = []
    for flags in ([], ["--precision", "bf16"], ["--precision", "int8"]):
        assert main(["predict", "--checkpoint", str(ckpt), str(path), "--json", "--top-k", "1", *flags]) == 0
        outs.append(json.loads(capsys.readouterr().out)[0]["class"])
    assert outs[0] == outs[1] == outs[2]


def test_compiled_inference_matches_eager():
    model = one_block_vit()
    x = torch.randn(2, 3, 32, 32)
    fast = prepare_for_inference(model, "fp32", compile=True)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x), atol=1e-4, rtol=1e-4)
    assert fast.config is model.config and fast.compiled
