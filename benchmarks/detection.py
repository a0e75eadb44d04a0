"""Detection benchmark on digit scenes: COCO AP of DETR (plain and DN-DETR) and YOLOS, on a ViT
and on a hierarchical backbone, with training time and inference throughput.

    python benchmarks/detection.py --quick                 # a smoke run: tiny data, 1 epoch, minutes
    python benchmarks/detection.py                         # the full table (see benchmarks/README.md)
    python benchmarks/detection.py --configs detr_dn_vit   # one configuration
    python benchmarks/detection.py --output results.json
    python benchmarks/detection.py epochs=60 data.batch_size=16 --overfit 64 --configs detr_plain_vit   # overfitting check
    python benchmarks/detection.py model.pretrained=RUN_DIR --configs detr_plain_vit   # backbone from a classifier run

(``KEY=VALUE`` overrides go before ``--configs``, which takes several names.)

Every configuration trains with the engine from the detection recipe
(:data:`vitlab.tasks.detection.task.DETECTION_RECIPE`) and is evaluated on the **test**
scenes (digits from the test split only). Training time is the engine's (sum of the epochs,
evaluations excluded); inference img/s is eval-mode forward passes at the evaluation batch
size, median of a few rounds, on the threads given (2 by default: the issue's "2 CPU cores").
This is a script, not a timed test: numbers depend on the machine and its load. Each row
also reports the process's CPU time (``time.process_time``, all threads) and wall time of
the whole run (data, training and evaluations).

``--overfit N`` is the overfitting check: N training scenes, no augmentation, and the AP is
measured on those training scenes (the check that a configuration can fit at all).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from typing import Any

import torch

from vitlab.tasks.detection.task import DETECTION_RECIPE
from vitlab.training import build_trainer, load_config

#: name -> (description, overrides on top of the recipe)
CONFIGS: dict[str, tuple[str, list[str]]] = {
    "detr_two_stage_vit": ("DETR + two-stage + spatial prior (the recipe), ViT", []),
    "detr_dn_two_stage_vit": ("DETR + DN + two-stage + spatial prior, ViT", ["detection.detr.remedy=dn_two_stage"]),
    "detr_two_stage_noprior_vit": ("DETR + two-stage, no spatial prior, ViT", ["detection.detr.spatial_prior=false"]),
    "detr_dn_vit": ("DETR + DN (anchor queries) + spatial prior, ViT", ["detection.detr.remedy=dn"]),
    "detr_plain_vit": ("DETR (plain), ViT", ["detection.detr.remedy=none", "detection.detr.spatial_prior=false"]),
    "detr_group_vit": ("DETR + Group DETR (K=3), ViT", ["detection.detr.remedy=none", "detection.detr.spatial_prior=false",
                                                      "detection.detr.query_groups=3"]),
    "yolos_vit": ("YOLOS, ViT", ["detection.detector=yolos"]),
    "detr_two_stage_pvt": ("DETR + two-stage + spatial prior, PVT v2-b0", ["model.name=pvt_v2_b0", "model.overrides={}",
                                                                           "detection.detr.num_levels=2"]),
    "detr_plain_pvt": ("DETR (plain), PVT v2-b0", ["model.name=pvt_v2_b0", "model.overrides={}",
                                                   "detection.detr.remedy=none", "detection.detr.spatial_prior=false",
                                                   "detection.detr.num_levels=2"]),
}
QUICK = ["epochs=1", "detection.scenes.num_train=32", "detection.scenes.num_val=8",
         "detection.scenes.num_test=16", "data.batch_size=16", "model.overrides.depth=1",
         "detection.detr.dec_layers=2", "detection.detr.enc_layers=0"]


def throughput(model: torch.nn.Module, size: int, channels: int, batch: int, rounds: int = 5) -> float:
    """Median eval-mode images per second at ``batch``."""
    model.eval()
    x = torch.rand(batch, channels, size, size)
    with torch.no_grad():
        model(x)
        times = []
        for _ in range(rounds):
            t0 = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - t0)
    return batch / statistics.median(times)


def run(name: str, extra: list[str], quick: bool, log: bool, overfit: int = 0, keep: str | None = None) -> dict[str, Any]:
    desc, overrides = CONFIGS[name]
    cpu0, wall0 = time.process_time(), time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        out = f"{keep}/{name}" if keep else tmp
        over = ([f"detection.scenes.num_train={overfit}", "detection.augment=false", "detection.scenes.num_val=8",
                 "detection.scenes.num_test=8", "eval_every=100000"] if overfit else [])
        ov = overrides + (QUICK if quick else []) + over + extra + ["progress=false", "device=cpu", f"output_dir={out}"]
        if quick and "model.name=pvt_v2_b0" in overrides:
            ov = [o for o in ov if not o.startswith("model.overrides.depth")]
        cfg = load_config(None, ov, base=DETECTION_RECIPE)
        trainer = build_trainer(cfg, log=print if log else (lambda s: None))
        res = trainer.fit()
        model = trainer.model
        if overfit:  # AP on the training scenes themselves
            from vitlab.tasks.detection.inference import evaluate_detector

            train = evaluate_detector(model, trainer.train_loader.dataset, cfg.data.eval_batch_size)
            res = {**res, "test_AP50": train["AP50"], "test_AP": train["AP"]}
        cpu_s, wall_s = time.process_time() - cpu0, time.perf_counter() - wall0
        c = int(model.pretrained_cfg["input_size"][0])
        ips = throughput(model, cfg.data.image_size, c, cfg.data.eval_batch_size)
    return {"config": name, "model": desc, "AP50": res["test_AP50"], "AP": res["test_AP"],
            "split": "train (overfit)" if overfit else "test",
            "train_s": res["train_time_s"], "cpu_s": cpu_s, "wall_s": wall_s, "epochs": res["epochs"],
            "img_per_s": ips, "params_M": sum(p.numel() for p in model.parameters()) / 1e6}


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| model | split | AP@.5 | AP@[.5:.95] | epochs | training (s) | CPU (s) | wall (s) | inference img/s "
             "| params (M) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['split']} | {r['AP50']:.3f} | {r['AP']:.3f} | {r['epochs']} | "
                     f"{r['train_s']:.0f} | {r['cpu_s']:.0f} | {r['wall_s']:.0f} | {r['img_per_s']:.0f} | "
                     f"{r['params_M']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny data and 1 epoch: checks the script, measures nothing")
    p.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
    p.add_argument("--threads", type=int, default=2, help="torch threads (the issue measures on 2 CPU cores)")
    p.add_argument("--output", help="also write the rows as JSON")
    p.add_argument("--overfit", type=int, default=0, metavar="N",
                   help="overfitting check: N training scenes, no augmentation, AP on those scenes")
    p.add_argument("--verbose", action="store_true", help="print every epoch")
    p.add_argument("--keep", metavar="DIR", help="keep each run directory as DIR/NAME (default: a temporary one)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides for every configuration")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for name in args.configs:
        rows.append(run(name, list(args.overrides), args.quick, args.verbose, args.overfit, args.keep))
        r = rows[-1]
        print(f"{name}: AP50 {r['AP50']:.3f}  AP {r['AP']:.3f}  ({r['split']})  training {r['train_s']:.0f}s  "
              f"CPU {r['cpu_s']:.0f}s  wall {r['wall_s']:.0f}s", flush=True)
    print(table(rows))
    if args.output:
        with open(args.output, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
