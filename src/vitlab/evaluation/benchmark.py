"""The benchmark harness: throughput, latency, FLOPs, memory and agreement of every inference mode.

:func:`benchmark` (and ``vitlab benchmark``) measures, for each model and mode:

- throughput: images/s at ``batch_size``, the median of ``repeats`` timed calls after warm-up;
- latency at batch 1: p50 and p95 of ``latency_repeats`` timed calls;
- parameters and GFLOPs per image (attention included: counted on the explicit path, since
  PyTorch's FlopCounterMode does not see the CPU flash-attention kernel);
- peak memory: the model's state plus the peak of what one call allocates (torch's profiler
  on the CPU, the CUDA allocator's statistics on a GPU);
- achieved GFLOP/s and its fraction of the matrix-multiply peak of the mode's compute dtype,
  measured in the same run: the fastest of a few large GEMMs (:func:`find_peak_gemm`) is
  timed again in every round next to the models, and the peak is its best median;
- agreement with float32 eager: the largest absolute logit difference and the top-1
  agreement, on ``agreement_data`` (e.g. the digits test set for a digits-trained model) or
  else on the timing batch.

Modes are timed interleaved (one call of each mode per round), so a load change on a shared
machine hits every mode alike. ``train=True`` adds forward + backward + AdamW-step
throughput in float32 and bf16 autocast, each with and without gradient checkpointing.
``reference="hf"`` / ``"timm"`` times the same architecture from Hugging Face transformers
or timm (random weights) in the same rounds.
"""

from __future__ import annotations

import copy
import csv
import io
import json
import math
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..deploy.inference import prepare_for_inference
from .flops import count_flops

#: Inference modes: name -> (precision for :func:`prepare_for_inference`, compiled).
#: ``onnx`` runs an exported file in onnxruntime.
MODE_SPECS: dict[str, tuple[str, bool]] = {
    "eager": ("fp32", False),
    "bf16": ("bf16", False),
    "bf16-amp": ("bf16-amp", False),
    "fp16": ("fp16", False),
    "compile": ("fp32", True),
    "compile-bf16": ("bf16", True),
    "int8": ("int8", False),
    "onnx": ("fp32", False),
}
MODES = tuple(MODE_SPECS)
DEFAULT_MODES = {"cpu": ("eager", "bf16", "bf16-amp", "compile-bf16", "int8", "onnx"),
                 "cuda": ("eager", "bf16", "fp16", "compile", "compile-bf16")}
#: Training variants: (autocast dtype name or None, gradient checkpointing).
TRAIN_MODES: dict[str, tuple[str | None, bool]] = {
    "train-fp32": (None, False), "train-fp32-ckpt": (None, True),
    "train-bf16": ("bf16", False), "train-bf16-ckpt": ("bf16", True),
}
REFERENCES = ("hf", "hf-eager", "timm")
_PEAK_DTYPE = {"fp32": "fp32", "bf16": "bf16", "bf16-amp": "bf16", "fp16": "fp16", "int8": "int8"}
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "int8": torch.int8}


@dataclass
class BenchmarkResult:
    """One row of a benchmark: a model (or reference implementation) in one mode.

    Attributes:
        model: Model name.
        impl: ``vitlab``, ``hf (sdpa)``, ``hf (eager)`` or ``timm``.
        mode: Inference mode (see :data:`MODES`) or training variant (:data:`TRAIN_MODES`).
        device: ``cpu`` or ``cuda``.
        batch_size: Batch size of the throughput measurement.
        image_size: (H, W).
        params: Parameters.
        gflops: GFLOPs per image (forward; forward + backward = 3x for training rows).
        throughput: Images per second (median of the timed runs).
        latency_p50_ms, latency_p95_ms: Batch-1 latency (inference rows).
        peak_memory_mb: Model state plus the peak allocated during one call / step.
        achieved_gflops: ``gflops * throughput``.
        peak_gflops: Matrix-multiply peak of the mode's compute dtype, measured in the run.
        peak_fraction: ``achieved_gflops / peak_gflops``.
        compute_dtype: The dtype whose peak is used.
        max_abs_diff: Largest |logit - float32 eager logit| on the agreement data.
        top1_agreement: Fraction of images whose top-1 class equals float32 eager's.
        agreement_on: What the agreement was measured on.
        note: Anything unusual (a mode that could not run and why).
    """

    model: str
    impl: str
    mode: str
    device: str
    batch_size: int
    image_size: tuple[int, int]
    params: int
    gflops: float
    throughput: float | None = None
    latency_p50_ms: float | None = None
    latency_p95_ms: float | None = None
    peak_memory_mb: float | None = None
    achieved_gflops: float | None = None
    peak_gflops: float | None = None
    peak_fraction: float | None = None
    compute_dtype: str = "fp32"
    max_abs_diff: float | None = None
    top1_agreement: float | None = None
    agreement_on: str = ""
    note: str = ""


@dataclass
class BenchmarkReport:
    """Results of :func:`benchmark` with the machine they ran on and the measured peaks.

    Attributes:
        results: One :class:`BenchmarkResult` per model, implementation and mode.
        machine: CPU / GPU, threads, library versions.
        peaks: Matrix-multiply peak GFLOP/s per compute dtype (``fp32``, ``bf16``, ...).
        settings: Batch size, repeats and the other arguments of the run.
    """

    results: list[BenchmarkResult]
    machine: dict[str, Any] = field(default_factory=dict)
    peaks: dict[str, float] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)

    def rows(self) -> list[dict[str, Any]]:
        return [asdict(r) for r in self.results]

    def to_json(self) -> str:
        return json.dumps({"machine": self.machine, "peaks": self.peaks, "settings": self.settings,
                           "results": self.rows()}, indent=2)

    def to_csv(self) -> str:
        buf = io.StringIO()
        names = list(BenchmarkResult.__dataclass_fields__)
        writer = csv.DictWriter(buf, fieldnames=names)
        writer.writeheader()
        for row in self.rows():
            row["image_size"] = "x".join(map(str, row["image_size"]))
            writer.writerow(row)
        return buf.getvalue()

    def to_markdown(self) -> str:
        """A Markdown table, the measured peaks and the machine."""
        head = ["model", "impl", "mode", "batch", "img/s", "lat p50 ms", "lat p95 ms", "params M", "GFLOPs",
                "peak MB", "GFLOP/s", "% of peak", "max abs diff", "top-1 agree"]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in self.results:
            cells = [r.model, r.impl, r.mode, str(r.batch_size), _fmt(r.throughput, 1), _fmt(r.latency_p50_ms, 1),
                     _fmt(r.latency_p95_ms, 1), _fmt(r.params / 1e6, 2), _fmt(r.gflops, 2), _fmt(r.peak_memory_mb, 0),
                     _fmt(r.achieved_gflops, 0),
                     "-" if r.peak_fraction is None else f"{100 * r.peak_fraction:.0f}% {r.compute_dtype}",
                     "-" if r.max_abs_diff is None else f"{r.max_abs_diff:.2e}",
                     "-" if r.top1_agreement is None else f"{100 * r.top1_agreement:.2f}%"]
            lines.append("| " + " | ".join(cells) + " |")
        notes = [f"- {r.model} {r.impl} {r.mode}: {r.note}" for r in self.results if r.note]
        agree = sorted({r.agreement_on for r in self.results if r.agreement_on})
        peaks = ", ".join(f"{k} {v:.0f}" for k, v in self.peaks.items())
        out = "\n".join(lines) + "\n\n"
        if peaks:
            out += f"Matrix-multiply peak measured in this run (GFLOP/s): {peaks}.\n"
        if agree:
            out += f"Agreement measured on: {'; '.join(agree)}.\n"
        out += "Machine: " + ", ".join(f"{k} {v}" for k, v in self.machine.items()) + ".\n"
        if notes:
            out += "\nNotes:\n" + "\n".join(notes) + "\n"
        return out

    def save(self, path: str | Path) -> Path:
        """Write ``.md``, ``.csv`` or ``.json`` (by the suffix)."""
        path = Path(path)
        writers = {".md": self.to_markdown, ".csv": self.to_csv, ".json": self.to_json}
        if path.suffix not in writers:
            raise ValueError(f"unknown output format {path.suffix!r}; use a .md, .csv or .json file")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(writers[path.suffix]())
        return path


def _fmt(v: float | None, digits: int) -> str:
    """Fixed decimals, or three significant digits for values too small to show with them."""
    if v is None:
        return "-"
    if v != 0 and abs(v) < 10 ** (1 - digits):
        return f"{v:.3g}"
    return f"{v:,.{digits}f}"


# ---------------------------------------------------------------------------- measurement


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_rate(fn: Callable[[], Any], work: float, device: torch.device, repeats: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return work / statistics.median(times)


#: GEMM shapes (M, K, N) tried for the peak: squares of three sizes and a wide one.
PEAK_SHAPES = ((1024, 1024, 1024), (2048, 2048, 2048), (4096, 4096, 4096), (4096, 4096, 1024))


@dataclass
class PeakGemm:
    """The fastest of the tried GEMMs for one dtype: re-timed in the benchmark's rounds.

    Attributes:
        dtype: ``fp32``, ``bf16``, ``fp16`` or ``int8``.
        shape: (M, K, N) of the fastest product.
        gflops: Its median rate when it was chosen.
        run: Computes the product once.
    """

    dtype: str
    shape: tuple[int, int, int]
    gflops: float
    run: Callable[[], Any]

    @property
    def gflop(self) -> float:
        m, k, n = self.shape
        return 2.0 * m * k * n / 1e9


def find_peak_gemm(dtype: str = "fp32", device: str | torch.device = "cpu",
                   shapes: Sequence[tuple[int, int, int]] = PEAK_SHAPES, repeats: int = 5) -> PeakGemm:
    """Time ``torch.mm`` (``torch._int_mm`` for int8) on each shape; return the fastest.

    B is used transposed, as ``nn.Linear`` uses its weight.

    Raises:
        ValueError: An unknown dtype, or one with no matrix multiply on ``device``.
    """
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(_DTYPES)}")
    dt, device = _DTYPES[dtype], torch.device(device)
    best: PeakGemm | None = None
    for m, k, n in shapes:
        if dt == torch.int8:
            a = torch.randint(-64, 64, (m, k), dtype=dt, device=device)
            b = torch.randint(-64, 64, (n, k), dtype=dt, device=device)
            fn: Callable[[], Any] = lambda a=a, b=b: torch._int_mm(a, b.t())
        else:
            a = torch.randn(m, k, device=device).to(dt)
            b = torch.randn(n, k, device=device).to(dt)
            fn = lambda a=a, b=b: torch.mm(a, b.t())
        try:
            rate = _median_rate(fn, 2.0 * m * k * n / 1e9, device, repeats, warmup=1)
        except RuntimeError:  # e.g. no int8 GEMM on this device
            continue
        if best is None or rate > best.gflops:
            best = PeakGemm(dtype, (m, k, n), rate, fn)
    if best is None:
        raise ValueError(f"no {dtype} matrix multiply on {device}")
    return best


def measure_matmul_peak(dtype: str = "fp32", device: str | torch.device = "cpu",
                        shapes: Sequence[tuple[int, int, int]] = PEAK_SHAPES, repeats: int = 5) -> float:
    """The matrix-multiply peak in GFLOP/s: the best median rate over ``shapes`` (see :func:`find_peak_gemm`).

    Args:
        dtype: ``fp32``, ``bf16``, ``fp16`` or ``int8``.
        device: Where to measure.
        shapes: (M, K, N) products tried.
        repeats: Timed calls per shape (after one warm-up call).
    """
    return find_peak_gemm(dtype, device, shapes, repeats).gflops


def _state_bytes(obj: Any) -> int:
    if isinstance(obj, Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, (tuple, list)):
        return sum(_state_bytes(o) for o in obj)
    if isinstance(obj, dict):
        return sum(_state_bytes(o) for o in obj.values())
    return 0


def module_bytes(module: nn.Module) -> int:
    """Bytes of a module's state (parameters and buffers, quantized packed weights included)."""
    try:
        return _state_bytes(module.state_dict())
    except RuntimeError:  # some packed modules cannot serialise; count parameters and buffers
        return sum(_state_bytes(t) for t in (*module.parameters(), *module.buffers()))


def peak_allocated_bytes(fn: Callable[[], Any], device: str | torch.device = "cpu") -> int:
    """Peak bytes allocated by torch during ``fn()`` above what was allocated before it.

    On a GPU from the CUDA allocator's statistics; on the CPU from the allocation events of
    torch's profiler (running total, so frees are accounted for).
    """
    device = torch.device(device)
    if device.type == "cuda":
        _sync(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        _sync(device)
        return max(0, torch.cuda.max_memory_allocated(device) - before)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    peak = 0
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        extra = node.extra_fields
        if type(extra).__name__ == "_ExtraFields_Allocation":
            peak = max(peak, int(extra.total_allocated))
        stack.extend(node.children)
    return peak


def machine_info(device: str | torch.device = "cpu") -> dict[str, Any]:
    """CPU model, cores, torch threads, library versions and the GPU (if used)."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info: dict[str, Any] = {"cpu": cpu, "cores": os.cpu_count(), "torch threads": torch.get_num_threads(),
                            "torch": torch.__version__}
    if torch.device(device).type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    try:
        import onnxruntime

        info["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    return info


# ---------------------------------------------------------------------------- models and modes


def _load(model: str | nn.Module, image_size: int | None, label: str | None = None) -> tuple[str, nn.Module]:
    if isinstance(model, nn.Module):
        if label:
            return label, model
        return getattr(model, "model_name", None) or type(model).__name__, model
    from ..models.registry import list_models
    from ..pretrained import create_model

    if model in list_models() and not Path(model).exists():
        return model, create_model(model, **({"image_size": image_size} if image_size else {}))
    if Path(model).exists():
        from ..pretrained import load_model

        loaded = load_model(model)
        return getattr(loaded, "model_name", None) or Path(model).stem, loaded
    create_model(model)  # raises: unknown name, with close matches
    raise AssertionError("unreachable")


class _Logits(nn.Module):
    """A Hugging Face image classifier called like a vitlab model: images -> logits."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return self.model(pixel_values=x).logits


def reference_model(kind: str, model: nn.Module) -> tuple[str, nn.Module]:
    """The same architecture (random weights) from Hugging Face transformers or timm.

    Args:
        kind: ``hf`` (transformers' ViT, SDPA attention), ``hf-eager`` (its explicit
            attention) or ``timm``.
        model: The vitlab model whose architecture to copy (HF: ViT/DeiT without
            distillation token; timm: any registered name).

    Returns:
        (implementation label, module mapping images to logits).

    Raises:
        ValueError: An unknown kind or an architecture the reference library lacks.
        ImportError: transformers / timm missing.
    """
    if kind not in REFERENCES:
        raise ValueError(f"unknown reference {kind!r}; choose one of {', '.join(REFERENCES)}")
    cfg = model.config
    if kind == "timm":
        try:
            import timm
        except ImportError:
            raise ImportError("reference 'timm' needs timm: pip install timm") from None
        name = getattr(model, "model_name", None)
        if not name or name not in timm.list_models():
            raise ValueError(f"timm has no model named {name!r}")
        return "timm", timm.create_model(name, pretrained=False, num_classes=cfg.num_classes).eval()
    if getattr(model, "family", "") not in ("vit", "deit") or getattr(model, "num_distill_tokens", 0) \
            or cfg.pool != "cls" or cfg.image_size[0] != cfg.image_size[1]:
        name = getattr(model, "model_name", None) or type(model).__name__
        raise ValueError(f"Hugging Face's ViT has no counterpart of {name}")
    try:
        from transformers import ViTConfig as HFViTConfig
        from transformers import ViTForImageClassification
    except ImportError:
        raise ImportError("reference 'hf' needs transformers: pip install 'vitlab[dev]'") from None
    impl = "eager" if kind == "hf-eager" else "sdpa"
    hf_cfg = HFViTConfig(hidden_size=cfg.dim, num_hidden_layers=cfg.depth, num_attention_heads=cfg.heads,
                         intermediate_size=cfg.mlp_dim, image_size=cfg.image_size[0], patch_size=cfg.patch_size,
                         num_channels=cfg.in_channels, qkv_bias=cfg.qkv_bias, layer_norm_eps=cfg.norm_eps,
                         num_labels=max(cfg.num_classes, 1), attn_implementation=impl)
    return f"hf ({impl})", _Logits(ViTForImageClassification(hf_cfg)).eval()


def _prepare_mode(mode: str, model: nn.Module, device: torch.device, onnx_dir: Path,
                  threads: int) -> Callable[[Tensor], Tensor]:
    precision, compiled = MODE_SPECS[mode]
    if mode == "onnx":
        from ..deploy.onnx_export import OnnxRuntimeModel, export_onnx

        if device.type != "cpu":
            raise ValueError("the onnx mode runs onnxruntime on the CPU")
        path = export_onnx(model, onnx_dir / "model.onnx", batch_size=1, dynamic_batch=True)
        return OnnxRuntimeModel(path, threads=threads)
    return prepare_for_inference(model, precision, compile=compiled, device=device)


def digits_agreement_data(model: nn.Module, limit: int | None = None, split: str = "test") -> Tensor:
    """The digits images of a split prepared for ``model``: resized to its input, its channels, its mean/std."""
    from ..datasets.factory import build_dataset
    from ..datasets.transforms import normalize

    data = build_dataset("digits", split)
    x = torch.stack([data[i][0] for i in range(len(data) if limit is None else min(limit, len(data)))])
    cfg = model.config
    size = tuple(cfg.image_size)
    if tuple(x.shape[-2:]) != size:
        # (N, 1, 8, 8) -> (N, 1, H, W), as the trainer resizes
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
    if cfg.in_channels != x.shape[1]:
        x = x.expand(-1, cfg.in_channels, -1, -1)
    pcfg = getattr(model, "pretrained_cfg", {})
    mean, std = tuple(pcfg.get("mean", data.mean)), tuple(pcfg.get("std", data.std))
    if len(mean) != cfg.in_channels:
        mean, std = (sum(mean) / len(mean),) * cfg.in_channels, (sum(std) / len(std),) * cfg.in_channels
    return normalize(x, mean, std).contiguous()


def _batched_logits(fn: Callable[[Tensor], Tensor], data: Tensor, batch_size: int, device: torch.device) -> Tensor:
    """Logits of ``data`` in fixed-size batches (the last one padded), so compiled modes see one shape."""
    out = []
    for i in range(0, data.shape[0], batch_size):
        chunk = data[i : i + batch_size]
        n = chunk.shape[0]
        if n < batch_size:
            chunk = torch.cat([chunk, chunk[-1:].expand(batch_size - n, *chunk.shape[1:])])
        with torch.inference_mode():
            out.append(fn(chunk.to(device)).float().cpu()[:n])
    return torch.cat(out)


def _interleaved(fns: dict[str, Callable[[], Any]], repeats: int, device: torch.device) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times[k].append(time.perf_counter() - t0)
    return times


def _percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    pos = (len(s) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def _check_modes(modes: Sequence[str]) -> list[str]:
    out = []
    for m in modes:
        if m not in MODE_SPECS:
            raise ValueError(f"unknown mode {m!r}; choose from {', '.join(MODES)}")
        out.append(m)
    return out


# ---------------------------------------------------------------------------- the harness


@dataclass
class BenchmarkSettings:
    """How :func:`benchmark` measures (see its arguments)."""

    batch_size: int = 16
    image_size: int | None = None
    modes: Sequence[str] | None = None
    train: bool = False
    reference: Sequence[str] = ()
    device: str = "cpu"
    repeats: int = 10
    warmup: int = 2
    latency_repeats: int = 20
    agreement_data: str | Tensor | None = None
    peak_shapes: Sequence[tuple[int, int, int]] = PEAK_SHAPES

    def describe(self) -> dict[str, Any]:
        """The settings as JSON-friendly values."""
        out = {k: v for k, v in asdict(self).items() if k != "agreement_data"}
        data = self.agreement_data
        out["agreement_data"] = data if data is None or isinstance(data, str) else f"tensor {tuple(data.shape)}"
        out["peak_shapes"] = [list(s) for s in self.peak_shapes]
        return out


def benchmark_model(
    model: str | nn.Module,
    settings: BenchmarkSettings | None = None,
    peaks: dict[str, PeakGemm] | None = None,
    label: str | None = None,
    work_dir: str | Path | None = None,
    log: Callable[[str], None] | None = None,
) -> list[BenchmarkResult]:
    """Benchmark one model in several modes (see :func:`benchmark`).

    Args:
        model: A registered name, a checkpoint path or a module.
        settings: What to measure; :class:`BenchmarkSettings` defaults when None.
        peaks: Compute dtype -> :class:`PeakGemm`; filled with the GEMMs it needs, re-timed
            in every round of timing (the peak is the best rate seen), shared across calls.
        label: The model's name in the table (default: its model name).
        work_dir: Where ONNX files go (a temporary folder by default).
        log: Progress messages.
    """
    import tempfile

    st = settings or BenchmarkSettings()
    batch_size, image_size, repeats, warmup = st.batch_size, st.image_size, st.repeats, st.warmup
    latency_repeats, agreement_data, peak_shapes = st.latency_repeats, st.agreement_data, st.peak_shapes
    device = torch.device(st.device)
    modes = _check_modes(st.modes if st.modes is not None else DEFAULT_MODES.get(device.type, ("eager",)))
    if "eager" not in modes:
        modes = ["eager", *modes]  # the float32 reference of every agreement
    refs = [st.reference] if isinstance(st.reference, str) else list(st.reference or [])
    peaks = {} if peaks is None else peaks
    say = log or (lambda s: None)
    threads = torch.get_num_threads()

    name, net = _load(model, image_size, label)
    net = net.to(device).eval()
    cfg = net.config
    size = (image_size, image_size) if image_size else tuple(cfg.image_size)
    shape = (cfg.in_channels, *size)
    flops = count_flops(net, (1, *shape)) / 1e9
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch_size, *shape, generator=gen).to(device)
    x1 = x[:1].contiguous()
    if isinstance(agreement_data, str):
        if agreement_data != "digits":
            raise ValueError(f"unknown agreement data {agreement_data!r}; use 'digits' or pass a tensor")
        agree_x, agree_on = digits_agreement_data(net), "the digits test set (resized to the model's input)"
    elif agreement_data is not None:
        agree_x, agree_on = agreement_data, f"{agreement_data.shape[0]} given images"
    else:
        agree_x, agree_on = x, f"the timing batch ({batch_size} random images)"

    def need_peak(dtype: str) -> None:
        if dtype not in peaks:
            say(f"finding the {dtype} matmul peak on {device.type}")
            peaks[dtype] = find_peak_gemm(dtype, device, peak_shapes)

    # ---- build every (impl, mode) runner
    rows: dict[str, BenchmarkResult] = {}
    runners: dict[str, Callable[[Tensor], Tensor]] = {}
    impls: list[tuple[str, nn.Module]] = [("vitlab", net)]
    for kind in refs:
        try:
            impl_label, ref_net = reference_model(kind, net)
            impls.append((impl_label, ref_net.to(device)))
        except (ValueError, ImportError) as e:
            say(f"{name}: no {kind} reference: {e}")
    tmp = tempfile.TemporaryDirectory() if work_dir is None else None
    onnx_dir = Path(work_dir if work_dir is not None else tmp.name)  # type: ignore[union-attr]
    try:
        for impl, module in impls:
            n_params = sum(p.numel() for p in module.parameters())
            for mode in modes:
                if impl != "vitlab" and mode == "onnx":
                    continue
                key = f"{impl}|{mode}"
                precision = MODE_SPECS[mode][0]
                dtype = "fp32" if mode == "onnx" else _PEAK_DTYPE[precision]
                row = BenchmarkResult(name, impl, mode, device.type, batch_size, size, n_params, flops,
                                      compute_dtype=dtype, agreement_on=agree_on)
                rows[key] = row
                try:
                    say(f"{name} [{impl}] {mode}: preparing")
                    runner = _prepare_mode(mode, module, device, onnx_dir / f"{impl}-{mode}".replace(" ", ""),
                                           threads)
                    with torch.inference_mode():
                        for _ in range(max(1, warmup)):
                            runner(x)
                            if latency_repeats > 0:
                                runner(x1)
                    runners[key] = runner
                    need_peak(dtype)
                except (ValueError, ImportError, RuntimeError) as e:
                    row.note = f"not run: {str(e).splitlines()[0][:200]}"
                    say(f"{name} [{impl}] {mode}: {row.note}")

        # ---- throughput and latency, interleaved over modes
        say(f"{name}: timing {len(runners)} runners, {repeats} rounds at batch {batch_size}")
        with torch.inference_mode():
            times = _interleaved({**{k: (lambda r=r: r(x)) for k, r in runners.items()}, **_peak_runners(peaks)},
                                 repeats, device)
            lat = _interleaved({k: (lambda r=r: r(x1)) for k, r in runners.items()}, latency_repeats, device) \
                if latency_repeats > 0 else {}
        _update_peaks(peaks, times)
        for key, row in rows.items():
            if key not in times:
                continue
            row.throughput = batch_size / statistics.median(times[key])
            row.achieved_gflops = row.gflops * row.throughput
            if key in lat:
                row.latency_p50_ms = 1e3 * _percentile(lat[key], 0.5)
                row.latency_p95_ms = 1e3 * _percentile(lat[key], 0.95)

        # ---- memory and agreement
        ref_logits: dict[str, Tensor] = {}
        for key, runner in runners.items():
            row = rows[key]
            impl = key.split("|")[0]
            if row.mode != "onnx":
                source = getattr(runner, "model", None)
                state = module_bytes(source) if isinstance(source, nn.Module) else 0
                with torch.inference_mode():
                    row.peak_memory_mb = (state + peak_allocated_bytes(lambda: runner(x), device)) / 2**20
            logits = _batched_logits(runner, agree_x, batch_size, device)
            if row.mode == "eager":
                ref_logits[impl] = logits
            base = ref_logits.get(impl)
            if base is not None:
                row.max_abs_diff = float((logits - base).abs().max())
                row.top1_agreement = float((logits.argmax(1) == base.argmax(1)).float().mean())
    finally:
        if tmp is not None:
            tmp.cleanup()
    out = list(rows.values())
    if st.train:
        out += benchmark_training(net, name, x, device, repeats=max(3, repeats // 2), warmup=warmup,
                                  peaks=peaks, peak_shapes=peak_shapes, log=say)
    apply_peaks(out, peaks)
    return out


def _peak_runners(peaks: dict[str, PeakGemm]) -> dict[str, Callable[[], Any]]:
    return {f"peak|{dtype}": g.run for dtype, g in peaks.items()}


def _update_peaks(peaks: dict[str, PeakGemm], times: dict[str, list[float]]) -> None:
    """Raise each peak to its GEMM's median rate in these rounds (same load as the models)."""
    for dtype, g in peaks.items():
        ts = times.get(f"peak|{dtype}")
        if ts:
            g.gflops = max(g.gflops, g.gflop / statistics.median(ts))


def apply_peaks(results: Sequence[BenchmarkResult], peaks: dict[str, PeakGemm]) -> None:
    """Fill ``peak_gflops`` and ``peak_fraction`` of results from the peaks of their compute dtype."""
    for r in results:
        g = peaks.get(r.compute_dtype)
        if g is not None and r.achieved_gflops is not None:
            r.peak_gflops = g.gflops
            r.peak_fraction = r.achieved_gflops / g.gflops


def benchmark_training(model: nn.Module, name: str, x: Tensor, device: torch.device,
                       variants: Sequence[str] = tuple(TRAIN_MODES), repeats: int = 5, warmup: int = 1,
                       peaks: dict[str, PeakGemm] | None = None,
                       peak_shapes: Sequence[tuple[int, int, int]] = PEAK_SHAPES,
                       log: Callable[[str], None] | None = None) -> list[BenchmarkResult]:
    """Forward + backward + AdamW step throughput and peak memory of training variants.

    Each variant trains its own copy of ``model`` on the batch ``x`` with random labels;
    GFLOPs per image are 3x the forward's (recomputation under checkpointing is not counted,
    so it shows as a lower fraction of the peak).
    """
    peaks = {} if peaks is None else peaks
    say = log or (lambda s: None)
    flops = 3 * count_flops(model, (1, *x.shape[1:])) / 1e9
    y = torch.randint(0, max(1, model.config.num_classes), (x.shape[0],), device=device)
    results = []
    steps: dict[str, Callable[[], None]] = {}
    for variant in variants:
        if variant not in TRAIN_MODES:
            raise ValueError(f"unknown training variant {variant!r}; choose from {', '.join(TRAIN_MODES)}")
        amp, ckpt = TRAIN_MODES[variant]
        dtype = amp or "fp32"
        m = copy.deepcopy(model).to(device).train()
        m.set_grad_checkpointing(ckpt)
        opt = torch.optim.AdamW(m.parameters(), lr=1e-5)

        def step(m: nn.Module = m, opt: torch.optim.Optimizer = opt, amp: str | None = amp) -> None:
            with torch.autocast(device.type, dtype=_DTYPES[amp or "bf16"], enabled=amp is not None):
                loss = F.cross_entropy(m(x).float(), y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        say(f"{name} {variant}: warming up")
        for _ in range(max(1, warmup)):
            step()
        if dtype not in peaks:
            peaks[dtype] = find_peak_gemm(dtype, device, peak_shapes)
        state = module_bytes(m) + sum(_state_bytes(list(s.values())) for s in opt.state.values())
        row = BenchmarkResult(name, "vitlab", variant, device.type, x.shape[0], tuple(x.shape[-2:]),
                              sum(p.numel() for p in m.parameters()), flops, compute_dtype=dtype)
        row.peak_memory_mb = (state + peak_allocated_bytes(step, device)) / 2**20
        steps[variant] = step
        results.append(row)
    times = _interleaved({**steps, **_peak_runners(peaks)}, repeats, device)
    _update_peaks(peaks, times)
    for row in results:
        row.throughput = row.batch_size / statistics.median(times[row.mode])
        row.achieved_gflops = row.gflops * row.throughput
    apply_peaks(results, peaks)
    return results


def benchmark(
    models: str | nn.Module | Sequence[str | nn.Module] | Mapping[str, str | nn.Module],
    batch_size: int = 16,
    image_size: int | None = None,
    modes: Sequence[str] | None = None,
    train: bool = False,
    reference: str | Sequence[str] | None = None,
    device: str | torch.device = "cpu",
    repeats: int = 10,
    warmup: int = 2,
    latency_repeats: int = 20,
    threads: int | None = None,
    agreement_data: str | Tensor | None = None,
    peak_shapes: Sequence[tuple[int, int, int]] = PEAK_SHAPES,
    log: Callable[[str], None] | None = None,
) -> BenchmarkReport:
    """Benchmark models in inference modes (and training), with the machine's matmul peak.

    Args:
        models: Registered names, checkpoint paths or modules, or a mapping label -> one of these.
        batch_size: Batch of the throughput measurement.
        image_size: Input side; each model's configured size by default.
        modes: Inference modes from :data:`MODES`; the device's defaults when None
            (``eager`` is always added: it is the reference of the agreement columns).
        train: Also measure training steps (:func:`benchmark_training`).
        reference: ``"hf"``, ``"hf-eager"``, ``"timm"`` or a list: the same architecture from
            that library, timed in the same rounds (every mode but ``onnx``).
        device: ``cpu`` or ``cuda``.
        repeats: Timed rounds for throughput (median reported).
        warmup: Untimed calls per mode first (compilation happens there).
        latency_repeats: Timed batch-1 rounds (0 to skip latency).
        threads: torch intra-op threads (and onnxruntime's); torch's current setting if None.
        agreement_data: ``"digits"`` (the digits test set, for a digits-trained model), a
            tensor of prepared images, or None for the random timing batch.
        peak_shapes: GEMM shapes (M, K, N) tried for the matmul peak (:func:`find_peak_gemm`);
            the fastest is timed again in every round, and the peak is its best median.
        log: Progress messages (e.g. ``print``).

    Returns:
        A :class:`BenchmarkReport`; ``report.save("results.md")`` writes it.

    Raises:
        ValueError: An unknown model, mode or reference.

    Example:
        >>> report = benchmark(["vit_small_patch16_224"], modes=["eager", "bf16"], reference="hf")
        >>> print(report.to_markdown())
    """
    if isinstance(models, (str, nn.Module)):
        models = [models]
    items = list(models.items()) if isinstance(models, Mapping) else [(None, m) for m in models]
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but CUDA is not available")
    _check_modes(modes or ())
    refs = [reference] if isinstance(reference, str) else list(reference or [])
    for kind in refs:
        if kind not in REFERENCES:
            raise ValueError(f"unknown reference {kind!r}; choose one of {', '.join(REFERENCES)}")
    settings = BenchmarkSettings(batch_size, image_size, list(modes) if modes else None, train, refs, str(device),
                                 repeats, warmup, latency_repeats, agreement_data, peak_shapes)
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        peaks: dict[str, PeakGemm] = {}
        results: list[BenchmarkResult] = []
        for label, m in items:
            results += benchmark_model(m, settings, peaks, label=label, log=log)
        apply_peaks(results, peaks)  # the final peaks (the best rate seen in the whole run)
        return BenchmarkReport(results, machine_info(device), {k: g.gflops for k, g in peaks.items()},
                               settings.describe())
    finally:
        torch.set_num_threads(previous)


__all__ = [
    "BenchmarkReport", "BenchmarkResult", "BenchmarkSettings", "DEFAULT_MODES", "MODES", "MODE_SPECS", "REFERENCES",
    "TRAIN_MODES",
    "PeakGemm", "apply_peaks", "benchmark", "benchmark_model", "benchmark_training", "digits_agreement_data",
    "find_peak_gemm", "machine_info", "measure_matmul_peak", "module_bytes", "peak_allocated_bytes", "reference_model",
]
