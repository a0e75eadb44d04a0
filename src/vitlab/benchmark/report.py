"""Benchmark results and their reports: one row per model and mode, Markdown / CSV / JSON."""

from __future__ import annotations

import csv
import io
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

#: Training variants (their throughput is not comparable with an inference row).
TRAIN_ROWS = ("train-fp32", "train-bf16", "train-fp32-ckpt", "train-bf16-ckpt")


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
        tome_r: Token-merging schedule of the row (pairs merged per block; None: no merging).
        tokens_out: Tokens left after the last block with token merging (None without).
        accuracy: Top-1 accuracy against the true labels of the agreement data, when it has
            labels (the digits test set).
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
    tome_r: int | None = None
    tokens_out: int | None = None
    accuracy: float | None = None
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
        merged = any(r.tome_r is not None for r in self.results)
        labelled = any(r.accuracy is not None for r in self.results)
        base = self.timm_eager()
        if merged:
            head[3:3] = ["ToMe r", "tokens"]
        if labelled:
            head.append("top-1 acc")
        if base is not None:
            head.append("vs timm eager")
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in self.results:
            cells = [r.model, r.impl, r.mode, str(r.batch_size), _fmt(r.throughput, 1), _fmt(r.latency_p50_ms, 1),
                     _fmt(r.latency_p95_ms, 1), _fmt(r.params / 1e6, 2), _fmt(r.gflops, 2), _fmt(r.peak_memory_mb, 0),
                     _fmt(r.achieved_gflops, 0),
                     "-" if r.peak_fraction is None else f"{100 * r.peak_fraction:.0f}% {r.compute_dtype}",
                     "-" if r.max_abs_diff is None else f"{r.max_abs_diff:.2e}",
                     "-" if r.top1_agreement is None else f"{100 * r.top1_agreement:.2f}%"]
            if merged:
                cells[3:3] = ["-" if r.tome_r is None else str(r.tome_r), _fmt(r.tokens_out, 0)]
            if labelled:
                cells.append("-" if r.accuracy is None else f"{100 * r.accuracy:.2f}%")
            if base is not None:
                cells.append("-" if r.throughput is None or r.mode in TRAIN_ROWS else f"{r.throughput / base:.2f}x")
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

    def timm_eager(self) -> float | None:
        """Throughput of the timm eager (float32) row, the reference of the ``vs timm eager`` column."""
        rates = [r.throughput for r in self.results if r.impl == "timm" and r.mode == "eager" and r.throughput]
        return rates[0] if len(rates) == 1 else None

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
