"""Segmentation on digit scenes: SETR naive / PUP / MLA on a ViT, the all-MLP and FPN heads on
Swin and PVT v2, bilinear vs attention upsampling; test mIoU and training time.

    PYTHONPATH=src python benchmarks/segmentation.py --quick           # minutes: checks every config runs
    PYTHONPATH=src python benchmarks/segmentation.py                   # the full table (see benchmarks/README.md)
    PYTHONPATH=src python benchmarks/segmentation.py --only pvt_v2_mlp --epochs 12
    PYTHONPATH=src python benchmarks/segmentation.py --epochs 1 --threads 1 optim.warmup_epochs=0.2   # reduced, equal budget

Each configuration is the built-in segmentation recipe (``vitlab train --task segmentation``:
64x64 scenes, 2,000 training / 200 val / 500 test scenes, background + 10 digit classes)
with the backbone and head below, trained in this process with ``--threads`` torch threads
(2: the issue's "2 CPU cores"). The test split's digits are never seen in training. Wall
time depends on the machine's load; the CPU time of the process (``cpu_s``) is printed too
(cpu_s / threads is what an unloaded machine would take, roughly).
``--quick`` shrinks everything (32x32 canvases, 64 scenes, tiny backbones, 1 epoch): its
numbers say nothing about quality, only that every configuration trains and evaluates.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

VIT = "{patch_size: 4, dim: 128, depth: 6, heads: 4, mlp_dim: 256}"
SWIN = "{dim: 48, depths: [2, 2, 2, 2], heads: [2, 4, 8, 8], window_size: 4}"

#: name -> (what the table says, overrides on the segmentation recipe)
CONFIGS: dict[str, tuple[str, list[str]]] = {
    "vit_setr_naive": ("ViT (patch 4) + SETR naive", ["model.name=vit_tiny_patch16_224", f"model.overrides={VIT}",
                                                       "segmentation.head=setr_naive"]),
    "vit_setr_pup": ("ViT (patch 4) + SETR PUP", ["model.name=vit_tiny_patch16_224", f"model.overrides={VIT}",
                                                   "segmentation.head=setr_pup"]),
    "vit_setr_mla": ("ViT (patch 4) + SETR MLA", ["model.name=vit_tiny_patch16_224", f"model.overrides={VIT}",
                                                   "segmentation.head=setr_mla"]),
    "vit_setr_naive_aux": ("ViT + SETR naive + aux heads (blocks 2, 4; 0.4)",
                           ["model.name=vit_tiny_patch16_224", f"model.overrides={VIT}", "segmentation.head=setr_naive",
                            "segmentation.aux_indices=[1, 3]", "segmentation.aux_weights=[0.4, 0.4]"]),
    "vit_setr_naive_attn": ("ViT + SETR naive, attention upsampling",
                            ["model.name=vit_tiny_patch16_224", f"model.overrides={VIT}", "segmentation.head=setr_naive",
                             "segmentation.upsample=attention"]),
    "swin_mlp": ("Swin + all-MLP", ["model.name=swin_tiny_patch4_window7_224", f"model.overrides={SWIN}",
                                    "segmentation.head=mlp"]),
    "swin_fpn": ("Swin + semantic FPN", ["model.name=swin_tiny_patch4_window7_224", f"model.overrides={SWIN}",
                                         "segmentation.head=fpn"]),
    "pvt_v2_mlp": ("PVT v2 b0 + all-MLP", ["model.name=pvt_v2_b0", "segmentation.head=mlp"]),
    "pvt_v2_fpn": ("PVT v2 b0 + semantic FPN", ["model.name=pvt_v2_b0", "segmentation.head=fpn"]),
    "pvt_v2_mlp_attn": ("PVT v2 b0 + all-MLP, attention upsampling",
                        ["model.name=pvt_v2_b0", "segmentation.head=mlp", "segmentation.upsample=attention"]),
}

QUICK = ["segmentation.train_scenes=64", "segmentation.val_scenes=16", "segmentation.test_scenes=32",
         "segmentation.canvas_size=32", "segmentation.digit_size=[10,16]", "segmentation.channels=16",
         "segmentation.attn_heads=2", "segmentation.overlays=0", "data.batch_size=16"]
QUICK_MODELS = {
    "vit_tiny_patch16_224": "{patch_size: 4, dim: 32, depth: 4, heads: 2, mlp_dim: 64}",
    "swin_tiny_patch4_window7_224": "{dim: 16, depths: [1, 1, 1, 1], heads: [1, 2, 2, 2], window_size: 4}",
    "pvt_v2_b0": "{dims: [16, 32, 32, 32], depths: [1, 1, 1, 1], heads: [1, 1, 2, 2]}",
}


def overrides_for(name: str, quick: bool) -> list[str]:
    """The config overrides of one benchmark configuration (shrunk in quick mode)."""
    _, ov = CONFIGS[name]
    if not quick:
        return list(ov)
    model = next(o.split("=", 1)[1] for o in ov if o.startswith("model.name="))
    kept = [o for o in ov if not o.startswith("model.overrides=")]
    return kept + [f"model.overrides={QUICK_MODELS[model]}"] + QUICK


def run_one(name: str, quick: bool, epochs: int, out_root: Path, extra: list[str]) -> dict:
    """Train and test one configuration; returns its row."""
    from vitlab.tasks.segmentation.task import SEGMENTATION_RECIPE
    from vitlab.training import build_trainer, load_config

    ov = overrides_for(name, quick) + [f"epochs={epochs}", f"output_dir={out_root / name}", "progress=false"] + extra
    cfg = load_config(None, ov, base=SEGMENTATION_RECIPE)
    trainer = build_trainer(cfg, log=lambda s: print(f"  [{name}] {s}", file=sys.stderr, flush=True))
    params = sum(p.numel() for p in trainer.model.parameters())
    t0, c0 = time.perf_counter(), time.process_time()
    res = trainer.fit()
    return {"name": name, "what": CONFIGS[name][0], "params_M": params / 1e6, "epochs": epochs,
            "test_mIoU": res.get("test_mIoU"), "test_pixel_accuracy": res.get("test_pixel_accuracy"),
            "best_val_mIoU": res.get("best", {}).get("val_mIoU"), "train_s": res.get("train_time_s"),
            "wall_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0}


def table(rows: list[dict], threads: int) -> str:
    """The Markdown table of the rows."""
    lines = [f"| configuration | params (M) | epochs | test mIoU | test pixel acc. | train time (s, {threads} threads) | CPU s (train + eval) |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['what']} | {r['params_M']:.2f} | {r['epochs']} | {r['test_mIoU']:.4f} | "
                     f"{r['test_pixel_accuracy']:.4f} | {r['train_s']:.0f} | {r['cpu_s']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny configs, 1 epoch: checks that everything runs")
    p.add_argument("--only", nargs="+", choices=sorted(CONFIGS), help="run these configurations only")
    p.add_argument("--epochs", type=int, help="default: the recipe's (30; quick: 1)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (the issue's 2 CPU cores)")
    p.add_argument("--output-dir", type=Path, default=Path("runs/benchmark_segmentation"))
    p.add_argument("--json", type=Path, help="also write the rows as JSON")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="extra config overrides for every run")
    args = p.parse_args(argv)

    import torch

    from vitlab.tasks.segmentation.task import SEGMENTATION_RECIPE

    torch.set_num_threads(args.threads)
    epochs = args.epochs or (1 if args.quick else int(SEGMENTATION_RECIPE["epochs"]))
    rows = []
    for name in args.only or list(CONFIGS):
        row = run_one(name, args.quick, epochs, args.output_dir, list(args.overrides))
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
        if args.json:  # after every row: a run stopped part-way keeps the rows it finished
            args.json.write_text(json.dumps(rows, indent=2))
    print(("quick mode (tiny models, 1 epoch): the numbers only show that each configuration runs\n\n"
           if args.quick else "") + table(rows, args.threads))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
