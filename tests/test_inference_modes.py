"""What each inference mode actually runs: bf16 weights and activations, int8 quantized linear
layers, a torch.compile graph that is produced and called.

Checked where it happens (forward hooks on the modules that run, dynamo backends that count
their calls), through :func:`prepare_for_inference`, :class:`ViTClassifier` and ``vitlab predict``.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from vitlab.cli import main
from vitlab.deploy import prepare_for_inference
from vitlab.benchmark import benchmark
from vitlab import create_model
from vitlab.deploy import ViTClassifier

from torch.ao.nn.quantized.dynamic import Linear as QLinear  # noqa: E402


def tiny_vit() -> nn.Module:
    torch.manual_seed(0)
    model = create_model("vit_tiny_patch16_224", image_size=8, patch_size=4, in_channels=1, dim=32, depth=1, heads=2,
                         mlp_dim=64, num_classes=10)
    model.pretrained_cfg = {**model.pretrained_cfg, "input_size": 8, "mean": (0.5,), "std": (0.25,),
                            "crop_pct": 1.0, "interpolation": "bilinear"}
    return model.eval()


def linears(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]


class DtypeSpy:
    """Forward hooks on every Linear, LayerNorm and quantized Linear.

    ``calls``: (name, type, input dtype, output dtype) per call.
    """

    def __init__(self, model: nn.Module) -> None:
        self.calls: list[tuple[str, type, torch.dtype, torch.dtype]] = []
        kinds = (nn.Linear, nn.LayerNorm, QLinear)
        self.handles = [m.register_forward_hook(self._hook(n)) for n, m in model.named_modules()
                        if isinstance(m, kinds)]

    def _hook(self, name: str):
        def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
            self.calls.append((name, type(module), args[0].dtype, out.dtype))
        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def counting_compile(monkeypatch) -> dict[str, int]:
    """Make every ``torch.compile`` use a backend that counts the graphs it gets and the calls of each.

    The graphs run eagerly (no inductor: fast); what matters is that dynamo traced the model and
    that the call went through the traced graph, not through the eager model.
    """
    torch._dynamo.reset()
    counts = {"compile": 0, "graphs": 0, "calls": 0}
    real = torch.compile

    def backend(gm: torch.fx.GraphModule, example_inputs):
        counts["graphs"] += 1

        def run(*args):
            counts["calls"] += 1
            return gm.forward(*args)
        return run

    def compile(model, **kwargs):
        counts["compile"] += 1
        kwargs.pop("backend", None)
        return real(model, backend=backend, **kwargs)

    monkeypatch.setattr(torch, "compile", compile)
    return counts


# ----------------------------------------------------------------------------- prepare_for_inference
def test_bf16_runs_bfloat16_weights_and_activations():
    model = tiny_vit()
    x = torch.randn(3, 1, 8, 8)
    fast = prepare_for_inference(model, "bf16")
    params = {p.dtype for p in fast.model.parameters()}
    assert params == {torch.bfloat16}, params
    assert {p.dtype for p in model.parameters()} == {torch.float32}, "the source model is left in float32"
    spy = DtypeSpy(fast.model)
    out = fast(x)
    spy.remove()
    # every linear and norm of the model ran, on bfloat16 inputs, with bfloat16 outputs
    ran = {name for name, *_ in spy.calls}
    assert ran == {n for n, m in fast.model.named_modules() if isinstance(m, (nn.Linear, nn.LayerNorm))}
    assert {(i, o) for _, _, i, o in spy.calls} == {(torch.bfloat16, torch.bfloat16)}
    # the logits: float32, equal to the bf16 model's, not to the float32 model's
    assert out.dtype == torch.float32
    ref = copy.deepcopy(model).to(torch.bfloat16)
    with torch.no_grad():
        torch.testing.assert_close(out, ref(x.bfloat16()).float(), atol=0, rtol=0)
        assert not torch.equal(out, model(x))


@pytest.mark.parametrize("precision, dtype", [("bf16-amp", torch.bfloat16), ("fp16", torch.float16)])
def test_autocast_precisions_run_linears_in_half_precision(precision, dtype):
    model = tiny_vit()
    x = torch.randn(3, 1, 8, 8)
    fast = prepare_for_inference(model, precision)
    assert fast.model is model and {p.dtype for p in model.parameters()} == {torch.float32}  # weights stay float32
    spy = DtypeSpy(fast.model)
    out = fast(x)
    spy.remove()
    outs = {o for _, kind, _, o in spy.calls if kind is nn.Linear}
    assert outs == {dtype}, f"{precision}: linear outputs {outs}"
    assert out.dtype == torch.float32
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype):
        torch.testing.assert_close(out, model(x).float(), atol=0, rtol=0)


def test_int8_runs_dynamic_quantized_linears():
    model = tiny_vit()
    x = torch.randn(3, 1, 8, 8)
    fast = prepare_for_inference(model, "int8")
    names = linears(model)
    quantized = {n: m for n, m in fast.model.named_modules() if isinstance(m, QLinear)}
    assert set(quantized) == set(names), "every nn.Linear becomes a dynamic int8 Linear"
    assert not linears(fast.model), "no float nn.Linear is left"
    assert all(m.weight().dtype == torch.qint8 for m in quantized.values())
    assert linears(model) == names, "the source model is left as it was"
    spy = DtypeSpy(fast.model)
    out = fast(x)
    spy.remove()
    ran = {name for name, kind, *_ in spy.calls if kind is QLinear}
    assert ran == set(names), "every quantized Linear ran"
    assert not any(kind is nn.Linear for _, kind, *_ in spy.calls)
    with torch.no_grad():
        assert not torch.equal(out, model(x)), "int8 logits differ (slightly) from float32 ones"


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_compile_produces_and_calls_a_graph(monkeypatch, precision):
    counts = counting_compile(monkeypatch)
    model = tiny_vit()
    x = torch.randn(2, 1, 8, 8)
    fast = prepare_for_inference(model, precision, compile=True)
    assert fast.compiled and counts["compile"] == 1
    out = fast(x)
    assert counts["graphs"] >= 1, "dynamo traced the model"
    graphs, first = counts["graphs"], counts["calls"]
    assert first >= 1, "the call ran the traced graph"
    fast(x)
    assert counts["graphs"] == graphs and counts["calls"] == 2 * first, "the second call reuses the graph"
    eager = prepare_for_inference(model, precision)
    torch.testing.assert_close(out, eager(x), atol=1e-5, rtol=0)


def test_no_compile_means_no_graph(monkeypatch):
    counts = counting_compile(monkeypatch)
    fast = prepare_for_inference(tiny_vit(), "fp32")
    fast(torch.randn(2, 1, 8, 8))
    assert not fast.compiled and counts == {"compile": 0, "graphs": 0, "calls": 0}


# ----------------------------------------------------------------------------- ViTClassifier and the CLI
def test_classifier_precision_reaches_the_model(monkeypatch):
    images = [torch.rand(1, 8, 8) for _ in range(2)]
    bf16 = ViTClassifier(tiny_vit(), precision="bf16")
    spy = DtypeSpy(bf16.runner.model)
    bf16.predict(images)
    spy.remove()
    assert spy.calls and {(i, o) for _, _, i, o in spy.calls} == {(torch.bfloat16, torch.bfloat16)}

    int8 = ViTClassifier(tiny_vit(), precision="int8")
    spy = DtypeSpy(int8.runner.model)
    int8.predict(images)
    spy.remove()
    kinds = {kind for _, kind, *_ in spy.calls}
    assert QLinear in kinds and nn.Linear not in kinds

    counts = counting_compile(monkeypatch)
    compiled = ViTClassifier(tiny_vit(), compile=True)
    compiled.predict(images)
    assert counts["graphs"] >= 1 and counts["calls"] >= 1


class GlobalSpy:
    """Counts, for the whole process, float Linear calls by input dtype and quantized Linear calls."""

    def __init__(self, monkeypatch) -> None:
        self.float_inputs: list[torch.dtype] = []
        self.quantized = 0
        real_linear, real_q = nn.Linear.forward, QLinear.forward

        def linear(module, x):
            self.float_inputs.append(x.dtype)
            return real_linear(module, x)

        def qlinear(module, x):
            self.quantized += 1
            return real_q(module, x)

        monkeypatch.setattr(nn.Linear, "forward", linear)
        monkeypatch.setattr(QLinear, "forward", qlinear)


@pytest.fixture
def checkpoint_and_image(tmp_path):
    from PIL import Image

    from vitlab.pretrained import save_checkpoint

    ckpt = save_checkpoint(tiny_vit(), tmp_path / "ckpt", labels=[str(i) for i in range(10)])
    path = tmp_path / "digit.png"
    Image.fromarray((torch.rand(8, 8) * 255).byte().numpy(), mode="L").save(path)
    return ckpt, path


@pytest.mark.parametrize("precision", ["fp32", "bf16", "int8"])
def test_cli_predict_precision_runs_that_precision(checkpoint_and_image, monkeypatch, capsys, precision):
    ckpt, image = checkpoint_and_image
    spy = GlobalSpy(monkeypatch)
    assert main(["predict", "--checkpoint", str(ckpt), str(image), "--json", "--precision", precision]) == 0
    assert json.loads(capsys.readouterr().out)[0]["class"] in [str(i) for i in range(10)]
    if precision == "int8":
        assert spy.quantized == 5 and spy.float_inputs == []  # qkv, proj, fc1, fc2, head
    else:
        expected = torch.bfloat16 if precision == "bf16" else torch.float32
        assert len(spy.float_inputs) == 5 and set(spy.float_inputs) == {expected} and spy.quantized == 0


def test_cli_predict_compile_runs_a_graph(checkpoint_and_image, monkeypatch, capsys):
    ckpt, image = checkpoint_and_image
    counts = counting_compile(monkeypatch)
    assert main(["predict", "--checkpoint", str(ckpt), str(image), "--json", "--compile"]) == 0
    capsys.readouterr()
    assert counts["compile"] == 1 and counts["graphs"] >= 1 and counts["calls"] >= 1


# ----------------------------------------------------------------------------- the benchmark's modes
@pytest.mark.parametrize("mode", ["bf16", "int8", "compile", "compile-bf16"])
def test_benchmark_mode_runs_what_it_names(monkeypatch, mode):
    counts = counting_compile(monkeypatch)
    model = tiny_vit()
    report = benchmark([model], batch_size=2, modes=[mode], repeats=1, warmup=1, latency_repeats=0,
                       peak_shapes=((32, 32, 32),))
    assert {r.mode for r in report.results} == {"eager", mode} and all(r.note == "" for r in report.results)
    compiled = mode.startswith("compile")
    assert (counts["graphs"] >= 1 and counts["calls"] >= 1) if compiled else counts["compile"] == 0
    # Run the mode once more with spies on what executes (the benchmark's own runner).
    from vitlab.benchmark.modes import _prepare_mode

    spy = GlobalSpy(monkeypatch)
    runner = _prepare_mode(mode, model, torch.device("cpu"), None, 1)
    with torch.inference_mode():
        runner(torch.randn(2, 1, 8, 8))
    if mode == "int8":
        assert spy.quantized == 5 and spy.float_inputs == []
    else:
        assert set(spy.float_inputs) == {torch.bfloat16 if mode.endswith("bf16") else torch.float32}
