"""Instance segmentation benchmark on digit scenes: COCO box and mask AP of Mask R-CNN on a ViT
(plain, and ViTDet's windowed blocks with decomposed relative positions) and on PVT v2 / Swin
through an FPN, side by side with the DETR detection recipe on the same scenes; CPU time.

    python benchmarks/instance.py --quick                       # smoke run: tiny data, 1 epoch
    python benchmarks/instance.py --threads 1 --configs mask_rcnn_vitdet detr_recipe   # the two recipes
    python benchmarks/instance.py --threads 1 epochs=12 --configs mask_rcnn_vitdet

(``KEY=VALUE`` overrides go before ``--configs``.) Every Mask R-CNN configuration starts from the
instance recipe (:data:`vitlab.tasks.rcnn.task.INSTANCE_RECIPE`, ``vitlab train --task instance``)
and ``detr_recipe`` is the detection recipe (``vitlab train --task detection``), both with their
first step (the digits classifier of the backbone) included in the run and its CPU time. Metrics
are on the **test** scenes (digits of the test split only). CPU is ``time.process_time`` of the
whole run (first step, data, training, evaluations) on the threads given. A script, not a timed
test: numbers depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from typing import Any

import torch

from vitlab.tasks.detection.task import DETECTION_RECIPE
from vitlab.tasks.rcnn.task import INSTANCE_RECIPE
from vitlab.training import load_config
from vitlab.training.run import train

_GLOBAL = ["model.overrides.window_size=0", "model.overrides.global_blocks=[]", "model.overrides.rel_pos=none"]
#: name -> (description, recipe, overrides on top of it)
CONFIGS: dict[str, tuple[str, dict[str, Any], list[str]]] = {
    "mask_rcnn_vitdet": ("Mask R-CNN, ViTDet blocks (4x4 windows in 0, 2; global 1, 3; decomposed rel. pos.) + "
                         "simple pyramid (the recipe)", INSTANCE_RECIPE, []),
    "mask_rcnn_vit_global": ("Mask R-CNN, ViT with global attention everywhere, no rel. pos.", INSTANCE_RECIPE,
                             _GLOBAL),
    "mask_rcnn_pvt": ("Mask R-CNN, PVT v2-b0 + FPN", INSTANCE_RECIPE,
                      ["model.name=pvt_v2_b0", "model.overrides={}"]),
    "detr_recipe": ("DETR + two-stage + spatial prior (the detection recipe), boxes only", DETECTION_RECIPE, []),
}
QUICK = {"instance": ["epochs=1", "instance.scenes.num_train=32", "instance.scenes.num_val=8",
                      "instance.scenes.num_test=16", "instance.pretrain_backbone=false"],
         "detection": ["epochs=1", "detection.scenes.num_train=32", "detection.scenes.num_val=8",
                       "detection.scenes.num_test=16", "detection.pretrain_backbone=false"]}


def run(name: str, extra: list[str], quick: bool, log: bool, keep: str | None = None) -> dict[str, Any]:
    desc, recipe, overrides = CONFIGS[name]
    task = recipe["task"]
    cpu0, wall0 = time.process_time(), time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        out = f"{keep}/{name}" if keep else f"{tmp}/{name}"
        ov = overrides + (QUICK[task] if quick else []) + extra + ["progress=false", "device=cpu", f"output_dir={out}"]
        cfg = load_config(None, ov, base=recipe)
        res = train(cfg, log=print if log else (lambda s: None))
    cpu_s, wall_s = time.process_time() - cpu0, time.perf_counter() - wall0
    return {"config": name, "model": desc, "AP50": res["test_AP50"], "AP": res["test_AP"],
            "mask_AP50": res.get("test_mask_AP50"), "mask_AP": res.get("test_mask_AP"), "epochs": res["epochs"],
            "train_s": res["train_time_s"], "cpu_s": cpu_s, "wall_s": wall_s}


def _f(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| model | box AP@.5 | box AP | mask AP@.5 | mask AP | epochs | training (s) | CPU (s) | wall (s) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {_f(r['AP50'])} | {_f(r['AP'])} | {_f(r['mask_AP50'])} | {_f(r['mask_AP'])} | "
                     f"{r['epochs']} | {r['train_s']:.0f} | {r['cpu_s']:.0f} | {r['wall_s']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny data and 1 epoch: checks the script, measures nothing")
    p.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--output", help="also write the rows as JSON")
    p.add_argument("--verbose", action="store_true", help="print every epoch")
    p.add_argument("--keep", metavar="DIR", help="keep each run directory as DIR/NAME (default: a temporary one)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides for every configuration")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for name in args.configs:
        rows.append(run(name, list(args.overrides), args.quick, args.verbose, args.keep))
        r = rows[-1]
        print(f"{name}: box AP50 {_f(r['AP50'])}  mask AP50 {_f(r['mask_AP50'])}  CPU {r['cpu_s']:.0f}s  "
              f"wall {r['wall_s']:.0f}s", flush=True)
    print(table(rows))
    if args.output:
        with open(args.output, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
