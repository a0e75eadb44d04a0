"""Token merging (ToMe) on a model trained here: throughput and accuracy against r, next to timm.

The model: ``configs/digits56_tome.yaml`` (the digits at 56 px, 4 px patches: 196 patch tokens).
Every vitlab mode is timed at each r, and timm's ViT of the same architecture (the trained
weights loaded into it) in the same interleaved rounds, eager and compiled, in one process: run
it where timm imports (the reference environment of ../shared/tools/timm-reference-env.sh, plus
scikit-learn for the digits). Accuracy is measured on the digits test set (359 images).

    vitlab train --config configs/digits56_tome.yaml --output-dir runs/digits56_tome
    PYTHONPATH=src /tmp/timm-ref/bin/python benchmarks/tome.py --checkpoint runs/digits56_tome \\
        --r 0 16 32 48 64 --modes eager compile int8 --output benchmarks/results/tome_digits56 \\
        --about "digits ViT (configs/digits56_tome.yaml, 196 patches)"

Writes OUTPUT.md (the table and a summary), OUTPUT.json and OUTPUT.png (img/s and top-1 against r,
timm's eager and compiled throughput as lines). A script, not a test: the numbers depend on the
machine. Without ``--checkpoint`` it times vit_small_patch16_224 with random weights (no accuracy).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

from vitlab.benchmark import benchmark
from vitlab.benchmark.report import BenchmarkReport, BenchmarkResult


def _load(checkpoint: str) -> Any:
    from vitlab import load

    return load(checkpoint)  # a checkpoint, or a run directory (its final weights)


def summary(report: BenchmarkReport, max_loss: float = 0.01) -> list[str]:
    """The figures the issue asks for: the fastest vitlab row within ``max_loss`` top-1 of the plain
    model, per mode, against timm eager and compiled; and the fastest row of all."""
    rows = [r for r in report.results if r.throughput]
    timm = {r.mode: r for r in rows if r.impl == "timm"}
    plain = next((r for r in rows if r.impl == "vitlab" and r.mode == "eager" and not r.tome_r), None)
    out = []
    for name, ref in (("timm eager", timm.get("eager")), ("timm compiled", timm.get("compile"))):
        if ref is not None:
            out.append(f"- {name}: {ref.throughput:,.1f} img/s" +
                       ("" if ref.accuracy is None else f", top-1 {100 * ref.accuracy:.2f}%"))
    base = timm.get("eager")
    if plain is None or base is None:
        return out
    for mode in dict.fromkeys(r.mode for r in rows if r.impl == "vitlab"):
        ok = [r for r in rows if r.impl == "vitlab" and r.mode == mode
              and (r.accuracy is None or plain.accuracy is None or r.accuracy >= plain.accuracy - max_loss)]
        if not ok:
            continue
        best = max(ok, key=lambda r: r.throughput)
        acc = "" if best.accuracy is None else f", top-1 {100 * best.accuracy:.2f}%"
        comp = timm.get("compile")
        vs_compiled = f", {best.throughput / comp.throughput:.2f}x timm compiled" if comp else ""
        out.append(f"- vitlab {mode}, fastest r within {100 * max_loss:.0f} pt of plain top-1: r={best.tome_r}: "
                   f"{best.throughput:,.1f} img/s{acc}: {best.throughput / base.throughput:.2f}x timm eager"
                   f"{vs_compiled}")
    return out


def plot(report: BenchmarkReport, path: Path, about: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in report.results if r.throughput]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for mode in dict.fromkeys(r.mode for r in rows if r.impl == "vitlab"):
        pts = sorted((r.tome_r or 0, r.throughput, r.accuracy) for r in rows if r.impl == "vitlab" and r.mode == mode)
        if len(pts) < 2:
            continue
        ax1.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"vitlab {mode} + ToMe")
        if all(p[2] is not None for p in pts):
            ax2.plot([p[0] for p in pts], [100 * p[2] for p in pts], marker="o", label=f"vitlab {mode} + ToMe")
    styles = {"eager": "--", "compile": ":", "int8": "-."}
    for r in rows:
        if r.impl == "timm":
            ax1.axhline(r.throughput, color="k", linestyle=styles.get(r.mode, "-"), label=f"timm {r.mode}")
            if r.accuracy is not None and r.mode == "eager":
                ax2.axhline(100 * r.accuracy, color="k", linestyle="--", label="timm eager (same weights)")
    ax1.set(xlabel="r (token pairs merged per block)", ylabel="images / s", title="Throughput")
    ax2.set(xlabel="r (token pairs merged per block)", ylabel="top-1 on the digits test set (%)",
            title="Accuracy")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    first = rows[0] if rows else None
    size = "x".join(map(str, first.image_size)) if first else "?"
    fig.suptitle(f"Token merging (ToMe): {about or (first.model if first else '')}, {size} px input, "
                 f"batch {first.batch_size if first else '?'}, {report.machine.get('torch threads', '?')} CPU threads, "
                 "timm with the same weights", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", help="a run directory or checkpoint (default: vit_small_patch16_224, random)")
    ap.add_argument("--r", type=int, nargs="+", default=[0, 8, 16, 24, 32])
    ap.add_argument("--modes", nargs="+", default=["eager", "compile"])
    ap.add_argument("--no-timm", action="store_true", help="skip the timm reference")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--output", type=Path, default=Path("benchmarks/results/tome"))
    ap.add_argument("--about", default="", help="the model in the figure's title (default: its model name)")
    ap.add_argument("--replot", action="store_true", help="only redraw OUTPUT.png from OUTPUT.json")
    args = ap.parse_args()
    if args.replot:
        data = json.loads(args.output.with_suffix(".json").read_text())
        results = [BenchmarkResult(**{**r, "image_size": tuple(r["image_size"])}) for r in data["results"]]
        report = BenchmarkReport(results, data["machine"], data["peaks"], data["settings"])
        print(f"wrote {plot(report, args.output.with_suffix('.png'), args.about)}")
        return
    torch.manual_seed(0)
    model = _load(args.checkpoint) if args.checkpoint else "vit_small_patch16_224"
    report = benchmark([model], batch_size=args.batch_size, modes=args.modes, repeats=args.repeats, warmup=2,
                       latency_repeats=0, threads=args.threads, reference=None if args.no_timm else "timm",
                       agreement_data="digits" if args.checkpoint else None, tome=args.r,
                       log=lambda s: print(s, flush=True))
    lines = summary(report)
    command = "PYTHONPATH=src python benchmarks/tome.py " + " ".join(sys.argv[1:])
    text = f"# Token merging\n\nCommand: `{command}`\n\n" + report.to_markdown() + ("\nSummary:\n" + "\n".join(lines) + "\n" if lines else "")
    print(text)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.with_suffix(".md").write_text(text)
    args.output.with_suffix(".json").write_text(json.dumps(json.loads(report.to_json()) | {"summary": lines}, indent=2))
    print(f"wrote {args.output.with_suffix('.md')}, .json and "
          f"{plot(report, args.output.with_suffix('.png'), args.about)}")


if __name__ == "__main__":
    main()
