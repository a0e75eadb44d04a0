"""Register tokens on a small digits ViT: accuracy and the artifact metrics, without and with registers.

Trains two ViTs with the engine on the bundled digits (upsampled to 16x16, 2x2 patches: 64 patch
tokens), the same recipe and seed, ``reg_tokens=0`` and ``reg_tokens=4``; then measures on the
test split what :mod:`vitlab.evaluation.registers` measures (last block's patch-token norms and
their high-norm outliers; where the class token's last-block attention goes and how concentrated
it is on a few patches), prints accuracy and the metrics, writes a JSON and the comparison figure.

Darcet et al. see the artifacts in large models trained long on big data (ViT-L and up, DINOv2,
OpenCLIP, DeiT-III); a tiny model trained for minutes may show none, so read the numbers rather
than expecting the paper's picture. A script, not a test: about 5-6 CPU minutes in all at
``OMP_NUM_THREADS=1`` (50 epochs each). Measured numbers: benchmarks/results/registers_digits.md.

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/registers.py
    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/registers.py --epochs 5 --out /tmp/reg --runs /tmp/reg
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from vitlab.evaluation.registers import outlier_stats, plot_register_comparison, register_report, report_table
from vitlab.training.config import load_config
from vitlab.training.recipes import DIGITS_RECIPE
from vitlab.training.run import build_trainer

MODEL = dict(patch_size=2, dim=64, depth=4, heads=4, mlp_dim=128, drop_path=0.05)


def train_one(registers: int, epochs: int, out: Path, seed: int) -> tuple[torch.nn.Module, dict, object]:
    """One run of the shared recipe with ``reg_tokens=registers``: (model, results, trainer)."""
    overrides = [f"model.overrides={json.dumps({**MODEL, 'reg_tokens': registers})}", "data.image_size=16",
                 f"epochs={epochs}", f"seed={seed}", "ema_decay=null", "optim.warmup_epochs=3"]
    cfg = load_config(base=DIGITS_RECIPE, overrides=overrides)
    trainer = build_trainer(cfg, output_dir=out / f"reg{registers}", log=lambda _m: None)
    start = time.process_time()
    results = trainer.fit()
    results["cpu_time_s"] = time.process_time() - start
    return trainer.model.eval(), results, trainer


def eval_images(trainer, limit: int) -> torch.Tensor:
    """Up to ``limit`` prepared test (else validation) images (B, C, H, W), as the engine feeds them."""
    loader = trainer.test_loader or trainer.val_loader
    xs, n = [], 0
    for batch in loader:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch["image"]
        xs.append(x)
        n += x.shape[0]
        if n >= limit:
            break
    x = torch.cat(xs)[:limit].float()
    return x


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--images", type=int, default=256, help="test images the artifact metrics are measured on")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"),
                    help="where registers_digits.png and registers_digits.json go")
    ap.add_argument("--runs", type=Path, default=Path("runs/benchmarks/registers"), help="the two run directories")
    args = ap.parse_args()
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    args.runs.mkdir(parents=True, exist_ok=True)
    reports, summary = [], {}
    x = None
    for registers in (0, 4):
        model, results, trainer = train_one(registers, args.epochs, args.runs, args.seed)
        x = eval_images(trainer, args.images) if x is None else x
        name = "no registers" if registers == 0 else f"{registers} registers"
        report = register_report(model, x, name=name)
        std_cut = outlier_stats(report.norms.patch, threshold="std")
        report.extra.update(accuracy=results.get(f"{results.get('split', 'val')}_top1"),
                            split=results.get("split"), cpu_time_s=round(results["cpu_time_s"], 1),
                            epochs=results["epochs"], outlier_share_mean_3std=std_cut["outlier_share"],
                            threshold_mean_3std=std_cut["threshold"])
        reports.append(report)
        summary[name] = report.to_dict()
        print(f"{name}: {report.extra['split']} accuracy {report.extra['accuracy']:.2f}%, "
              f"{report.extra['cpu_time_s']:.0f} CPU s")
    figure = plot_register_comparison(reports, images=x, save_to=args.out / "registers_digits.png",
                                      title="digits ViT (64 patches), without vs with 4 registers")
    (args.out / "registers_digits.json").write_text(json.dumps(summary, indent=2))
    print(f"\nartifact metrics on {x.shape[0]} test images (last block; outlier: norm > median + 3 * 1.4826 MAD)")
    print(report_table(reports))
    print("| model | accuracy | outlier share (mean + 3 std) | register norms (mean) | cls norm |")
    print("|---|---|---|---|---|")
    for r in reports:
        d = r.to_dict()["prefix_norms"]
        regs = [v for k, v in d.items() if k.startswith("reg")]
        reg_text = f"{sum(regs) / len(regs):.2f}" if regs else "-"
        print(f"| {r.name} | {r.extra['accuracy']:.2f}% | {100 * r.extra['outlier_share_mean_3std']:.2f}% | "
              f"{reg_text} | {d.get('cls', float('nan')):.2f} |")
    print(f"\nfigure: {figure}\nnumbers: {args.out / 'registers_digits.json'}")


if __name__ == "__main__":
    main()
