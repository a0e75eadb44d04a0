"""Throughput of EViT token keeping and local attention on vit_small_patch16_224 (random weights), CPU fp32.

Prints a markdown table of img/s for the plain model, EViT at keep rates ``--keep-rates`` (blocks
3, 6, 9, fused token) and local attention with a ``--window`` x ``--window`` neighbourhood
through eager FlexAttention, ``torch.compile``-d FlexAttention (if it compiles here) and the
dense boolean mask through SDPA; speed-up against the plain model, by wall clock (img/s) and by
process CPU time per image (less sensitive to other jobs on a shared machine). Every configuration is set
up on its own copy of the model and run once untimed (the compile happens there), then timed in each of ``--rounds`` rounds
(interleaved, the order rotated each round, so a noisy neighbour hits all alike); the median round counts. A script, not a
test: the numbers depend on the machine.

    OMP_NUM_THREADS=2 PYTHONPATH=src python benchmarks/sparse.py
    PYTHONPATH=src python benchmarks/sparse.py --rounds 3 --no-compile
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time
import warnings
from typing import Callable

import torch
from torch import nn

from vitlab.components.evit import apply_evit, evit_state
from vitlab.components.sparse_attention import apply_sparse_attention, flex_available, sparse_attention_state
from vitlab.models.registry import build_model

Config = tuple[str, Callable[[nn.Module], None], Callable[[nn.Module], str]]


def configs(args: argparse.Namespace) -> list[Config]:
    """(label, apply, describe) per configuration; ``describe`` says what the first forward did."""
    def plain_apply(m: nn.Module) -> None:
        return None

    def evit_apply(rate: float) -> Callable[[nn.Module], None]:
        return lambda m: apply_evit(m, rate)

    def evit_done(m: nn.Module) -> str:
        tokens = evit_state(m).tokens[-1]
        return f"{tokens} tokens after the last block"

    def local_apply(backend: str, compile: bool) -> Callable[[nn.Module], None]:
        return lambda m: apply_sparse_attention(m, "local", args.window, backend=backend, compile=compile)

    def local_done(m: nn.Module) -> str:
        state = sparse_attention_state(m)
        path = state.path + (f" ({state.fallback})" if state.fallback else "")
        density = state.dense_mask().float().mean().item()
        return f"path {path}, {density:.0%} of the score matrix"

    out: list[Config] = [("plain", plain_apply, lambda m: "197 tokens, dense SDPA")]
    out += [(f"EViT keep {r}", evit_apply(r), evit_done) for r in args.keep_rates]
    w = args.window
    if flex_available():
        out.append((f"local {w}x{w}, flex eager", local_apply("flex", False), local_done))
        if args.compile:
            out.append((f"local {w}x{w}, flex compiled", local_apply("flex", True), local_done))
    out.append((f"local {w}x{w}, dense mask SDPA", local_apply("dense", False), local_done))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="vit_small_patch16_224")
    ap.add_argument("--keep-rates", type=float, nargs="+", default=[0.7, 0.5])
    ap.add_argument("--window", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--iters", type=int, default=2, help="forward passes per timed round")
    ap.add_argument("--no-compile", dest="compile", action="store_false", help="skip compiled FlexAttention")
    args = ap.parse_args()
    warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = build_model(args.model).eval()
    x = torch.randn(args.batch_size, 3, *model.config.image_size)
    runs = configs(args)
    times: dict[str, list[float]] = {label: [] for label, _, _ in runs}
    cpu: dict[str, list[float]] = {label: [] for label, _, _ in runs}  # process CPU seconds per image
    notes: dict[str, str] = {}
    models: dict[str, nn.Module] = {}  # one patched copy per configuration: no re-patching between rounds
    with torch.no_grad():
        for label, apply, describe in runs:  # set-up pass: compiles, fills the mask caches
            m = copy.deepcopy(model)
            apply(m)
            try:
                start = time.perf_counter()
                m(x)
                notes[label] = describe(m) + f"; first call {time.perf_counter() - start:.1f} s"
                models[label] = m
            except Exception as err:  # e.g. torch.compile without a working C++ toolchain
                notes[label] = f"failed: {type(err).__name__}: {str(err).splitlines()[0][:120]}"
        order = list(models)
        for rnd in range(args.rounds):
            for label in order[rnd % len(order):] + order[:rnd % len(order)]:  # rotated: no fixed position in a round
                m = models[label]
                start, start_cpu = time.perf_counter(), time.process_time()
                for _ in range(args.iters):
                    m(x)
                times[label].append(args.batch_size * args.iters / (time.perf_counter() - start))
                cpu[label].append((time.process_time() - start_cpu) / (args.batch_size * args.iters))
    print(f"{args.model}, random weights, batch {args.batch_size}, {args.threads} threads, CPU fp32, no_grad, "
          f"torch {torch.__version__}, median of {args.rounds} interleaved rounds x {args.iters} forwards; "
          f"1-min load average at the end {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print()
    print("| configuration | img/s | speed-up vs plain | CPU-s / img | CPU speed-up | notes |")
    print("|---|---|---|---|---|---|")
    base, base_cpu = statistics.median(times["plain"]), statistics.median(cpu["plain"])
    for label in times:
        if times[label]:
            ips, cps = statistics.median(times[label]), statistics.median(cpu[label])
            print(f"| {label} | {ips:.1f} | {ips / base:.2f}x | {cps:.3f} | {base_cpu / cps:.2f}x | {notes[label]} |")
        else:
            print(f"| {label} | - | - | - | - | {notes[label]} |")


if __name__ == "__main__":
    main()
