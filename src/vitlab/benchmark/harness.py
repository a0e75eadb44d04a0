"""The harness: every mode of every model timed in interleaved rounds, the training variants,
the peaks applied to the rows, and :func:`benchmark` itself."""

from __future__ import annotations

import copy
import sys
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..models.flops import count_flops
from .measure import (
    PEAK_SHAPES, PeakGemm, _interleaved, _percentile, _state_bytes, find_peak_gemm, machine_info, module_bytes,
    peak_allocated_bytes,
)
from .modes import (
    DEFAULT_MODES, MODE_SPECS, REFERENCES, TRAIN_MODES, _DTYPES, _PEAK_DTYPE, _batched_logits, _check_modes, _load,
    _prepare_mode, digits_agreement_data, digits_labels, reference_model,
)
from .report import BenchmarkReport, BenchmarkResult


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
    tome: Sequence[int] = ()

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
    labels: Tensor | None = None
    if isinstance(agreement_data, str):
        if agreement_data != "digits":
            raise ValueError(f"unknown agreement data {agreement_data!r}; use 'digits' or pass a tensor")
        agree_x, agree_on = digits_agreement_data(net), "the digits test set (resized to the model's input)"
        labels = digits_labels()
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
        variants = [(impl, module, None) for impl, module in impls]
        if st.tome:
            variants[1:1] = [("vitlab", net, r) for r in sorted(set(st.tome)) if r > 0]
        merged = {r: _merged_counts(net, r, (1, *shape)) for _, _, r in variants if r is not None}
        for impl, module, r in variants:
            n_params = sum(p.numel() for p in module.parameters())
            for mode in modes:
                if mode == "onnx" and (impl != "vitlab" or r is not None):
                    continue  # onnx: vitlab's plain model only (merge indices depend on the input)
                key = f"{impl}|{mode}" + ("" if r is None else f"|r{r}")
                precision = MODE_SPECS[mode][0]
                dtype = "fp32" if mode == "onnx" else _PEAK_DTYPE[precision]
                row = BenchmarkResult(name, impl, mode, device.type, batch_size, size, n_params,
                                      flops if r is None else merged[r][0], compute_dtype=dtype, agreement_on=agree_on)
                if impl == "vitlab" and st.tome:
                    row.tome_r, row.tokens_out = (0, None) if r is None else (r, merged[r][1])
                rows[key] = row
                try:
                    say(f"{name} [{impl}{'' if r is None else f' ToMe r={r}'}] {mode}: preparing")
                    runner = _prepare_mode(mode, module, device, onnx_dir / f"{impl}-{mode}".replace(" ", ""),
                                           threads, tome=r)
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
            if row.mode == "eager" and key.count("|") == 1:
                ref_logits[impl] = logits
            base = ref_logits.get(impl)
            if labels is not None:
                row.accuracy = float((logits.argmax(1) == labels).float().mean())
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


def _merged_counts(net: nn.Module, r: int, shape: tuple[int, ...]) -> tuple[float, int]:
    """GFLOPs per image and the tokens left after the last block of ``net`` with token merging ``r``."""
    from ..components.tome import apply_tome, tome_state

    patched = apply_tome(copy.deepcopy(net), r)
    gflops = count_flops(patched, shape) / 1e9  # counts the merged blocks' smaller products
    return gflops, tome_state(patched).tokens[-1]


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
    tome: Sequence[int] = (),
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
        tome: Token-merging ``r`` values: every vitlab mode (but onnx) is also timed with
            :func:`~vitlab.components.tome.apply_tome` at each ``r`` > 0 (rows with ``tome_r``;
            the plain rows get ``tome_r=0``), with its GFLOPs, tokens left and agreement.

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
                                 repeats, warmup, latency_repeats, agreement_data, peak_shapes, list(tome))
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


# ----------------------------------------------------------------------------- the command
def _cmd_benchmark(args: Any) -> int:
    models = [m if Path(m).exists() else _resolve(m) for m in args.models]
    report = benchmark(models, batch_size=args.batch_size, image_size=args.image_size, modes=args.modes,
                       train=args.train, reference=args.reference, device=args.device, repeats=args.repeats,
                       warmup=args.warmup, latency_repeats=args.latency_repeats, threads=args.threads,
                       agreement_data=args.agreement_data, tome=args.tome or (),
                       log=None if args.quiet else (lambda s: print(s, file=sys.stderr)))
    print(report.to_markdown())
    if args.output:
        print(f"wrote {report.save(args.output)}")
    return 0


def add_benchmark_command(sub: Any) -> None:
    """``vitlab benchmark`` (argparse subparsers ``sub``)."""
    b = sub.add_parser("benchmark", help="throughput, latency, FLOPs, memory and agreement per inference mode",
                       description="Benchmark models in inference modes (median throughput, batch-1 latency, "
                                   "GFLOPs, peak memory, fraction of the measured matmul peak, agreement with fp32).")
    b.add_argument("models", nargs="+", metavar="MODEL", help="registered names, aliases or checkpoint paths")
    b.add_argument("--batch-size", type=int, default=16)
    b.add_argument("--image-size", type=int, help="input side (the model's own by default)")
    b.add_argument("--modes", nargs="+", metavar="MODE",
                   help="inference modes: eager bf16 bf16-amp fp16 compile compile-bf16 int8 onnx (default on "
                        "CPU: eager bf16 bf16-amp compile-bf16 int8 onnx; CUDA: eager bf16 fp16 compile compile-bf16)")
    b.add_argument("--train", action="store_true",
                   help="also time training steps (fp32/bf16, with/without checkpointing)")
    b.add_argument("--reference", nargs="+", metavar="LIB",
                   help="time the same architecture from hf (transformers, SDPA), hf-eager or timm")
    b.add_argument("--agreement-data", choices=["digits"],
                   help="measure agreement (and accuracy) on the digits test set")
    b.add_argument("--tome", nargs="+", type=int, metavar="R",
                   help="also time vitlab with token merging (ToMe) merging R token pairs per block, for each R")
    b.add_argument("--device", default="cpu")
    b.add_argument("--threads", type=int, help="torch (and onnxruntime) threads")
    b.add_argument("--repeats", type=int, default=10, help="timed rounds (median reported)")
    b.add_argument("--warmup", type=int, default=2)
    b.add_argument("--latency-repeats", type=int, default=20, help="timed batch-1 rounds (0: skip latency)")
    b.add_argument("--output", type=Path, help="write the results (.md, .csv or .json)")
    b.add_argument("--quiet", action="store_true", help="no progress messages")
    b.set_defaults(func=_cmd_benchmark)


def _resolve(name: str) -> str:
    from ..models.registry import resolve_model_name

    return resolve_model_name(name)
