"""Measurement: timed calls (median rate, interleaved rounds, percentiles), the matrix-multiply
peak, memory (state and peak allocation) and the machine's description."""

from __future__ import annotations

import math
import os
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from .modes import _DTYPES


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
