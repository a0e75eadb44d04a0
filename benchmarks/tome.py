"""Throughput of token merging (ToMe) on vit_small_patch16_224 (random weights), CPU eager fp32.

Prints img/s at r = 0, 8, 13, 16 merged pairs per block (``--r``), with ``--threads`` torch
threads (2 by default), batch ``--batch-size``: the median of ``--rounds`` timed rounds after
warm-up (and one untimed pass before each timing), every r timed in each round (interleaved, so a noisy neighbour hits all alike).
A script, not a test: the numbers depend on the machine.

    PYTHONPATH=src python benchmarks/tome.py
    PYTHONPATH=src python benchmarks/tome.py --r 0 13 --batch-size 32 --rounds 5
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from vitlab.components.tome import apply_tome, remove_tome, tome_state
from vitlab.models.registry import build_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="vit_small_patch16_224")
    ap.add_argument("--r", type=int, nargs="+", default=[0, 8, 13, 16])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--iters", type=int, default=2, help="forward passes per timed round")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = build_model(args.model).eval()
    x = torch.randn(args.batch_size, 3, *model.config.image_size)
    times: dict[int, list[float]] = {r: [] for r in args.r}
    tokens: dict[int, int] = {}
    with torch.inference_mode():
        for rnd in range(args.rounds + 1):  # round 0 is warm-up
            for r in args.r:
                apply_tome(model, r)
                model(x)  # one untimed pass on this r's shapes
                start = time.perf_counter()
                for _ in range(args.iters):
                    model(x)
                elapsed = time.perf_counter() - start
                tokens[r] = tome_state(model).tokens[-1]
                remove_tome(model)
                if rnd:
                    times[r].append(args.batch_size * args.iters / elapsed)
    print(f"{args.model}, batch {args.batch_size}, {args.threads} threads, fp32 eager, median of {args.rounds} rounds")
    print("| r | tokens after last block | img/s | speed-up |")
    print("|---|---|---|---|")
    base = statistics.median(times[args.r[0]])
    for r in args.r:
        ips = statistics.median(times[r])
        print(f"| {r} | {tokens[r]} | {ips:.1f} | {ips / base:.2f}x |")


if __name__ == "__main__":
    main()
