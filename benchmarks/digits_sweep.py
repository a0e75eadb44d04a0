"""Run several digits recipes side by side (one process each, 2 threads) and print test accuracy.

Used to choose the default ``vitlab train`` recipe. Example (16 cores: 8 runs at once):
    PYTHONPATH=src python benchmarks/digits_sweep.py --jobs 8
Each run is ``vitlab train`` with the bundled recipe plus the overrides listed below.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from concurrent.futures import ProcessPoolExecutor

CANDIDATES = {
    "default": [],
    "lr1e-3": ["optim.lr=1e-3"],
    "wd0.1_e150": ["optim.weight_decay=0.1", "epochs=150"],
    "bs32_e80": ["data.batch_size=32", "epochs=80", "optim.lr=1e-3"],
}
SEEDS = (0, 1, 2, 3)


def run(item: tuple[str, list[str]]) -> dict:
    name, overrides = item
    import torch

    torch.set_num_threads(2)
    from vitlab.training import build_trainer, load_config
    from vitlab.training.recipes import DIGITS_RECIPE

    cfg = load_config(None, overrides + [f"output_dir=/tmp/sweep/{name}", "progress=false"], base=DIGITS_RECIPE)
    t0 = time.perf_counter()
    res = build_trainer(cfg, log=lambda s: None).fit()
    return {"name": name, "test_top1": res.get("test_top1"), "ema_test_top1": res.get("ema_test_top1"),
            "final_val_top1": res.get("final_val_top1"), "seconds": round(time.perf_counter() - t0, 1),
            "overrides": overrides}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--jobs", type=int, default=max(1, (os.cpu_count() or 2) // 2))
    p.add_argument("--only", nargs="*")
    args = p.parse_args()
    items = [(f"{k}_s{seed}", v + [f"seed={seed}"]) for k, v in CANDIDATES.items() if not args.only or k in args.only
             for seed in SEEDS]
    with ProcessPoolExecutor(args.jobs) as ex:
        for r in ex.map(run, items):
            print(json.dumps(r), flush=True)


if __name__ == "__main__":
    main()
