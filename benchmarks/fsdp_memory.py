"""Per-rank parameter, optimizer-state and EMA bytes under ``distributed.strategy=fsdp``, 1 vs 2 ranks.

``python benchmarks/fsdp_memory.py [--model vit_large_patch16_224] [--ranks 1 2]`` launches
``torchrun --nproc_per_node=N`` (gloo, CPU) for each N. Every rank builds the model on the meta
device, shards it with the engine's own path (:func:`vitlab.training.fsdp.shard`: each block, then
the root), materialises only its shards, builds the engine's AdamW (:func:`build_optimizer`) and
takes one step with zero gradients so the optimizer's moments exist. Bytes are measured by summing
the local shard sizes (``DTensor.to_local()``) of the parameters, of every optimizer-state tensor and
of the sharded EMA copy; rank 0 prints the largest rank's numbers. Nothing is trained.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

SRC = Path(__file__).resolve().parent.parent / "src"


def _local_bytes(t: torch.Tensor) -> int:
    local = t.to_local() if hasattr(t, "to_local") else t
    return local.numel() * local.element_size()


def measure(model_name: str) -> dict[str, int]:
    """This rank's bytes (run under torchrun; a collective)."""
    import torch.distributed as dist

    from vitlab.models import build_model
    from vitlab.training.fsdp import init_fsdp_process_group, scalars_to_1d, shard
    from vitlab.training.optim import build_optimizer

    device = torch.device("cpu")
    info = init_fsdp_process_group(device)
    with torch.device("meta"):
        model = build_model(model_name)
        ema = build_model(model_name)
    n_params = sum(p.numel() for p in model.parameters())
    for m in (model, ema):
        scalars_to_1d(m)
        shard(m, device, info.world_size)
        m.to_empty(device=device)  # only this rank's shards get memory
    for p in ema.parameters():
        p.requires_grad_(False)
    opt = build_optimizer(model, "adamw", 1e-3, 0.05, (0.9, 0.999))
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()  # creates exp_avg / exp_avg_sq (and step) for every parameter
    row = {
        "params": sum(_local_bytes(p) for p in model.parameters()),
        "optimizer": sum(_local_bytes(v) for st in opt.state.values() for v in st.values() if isinstance(v, torch.Tensor)),
        "ema": sum(_local_bytes(p) for p in ema.parameters()),
    }
    out = torch.tensor([row["params"], row["optimizer"], row["ema"]], dtype=torch.float64)
    dist.all_reduce(out, op=dist.ReduceOp.MAX)  # the largest rank's figure (uneven shards)
    dist.destroy_process_group()
    return {"ranks": info.world_size, "rank": info.rank, "model_params": n_params,
            "params": int(out[0]), "optimizer": int(out[1]), "ema": int(out[2])}


def _launch(model_name: str, ranks: int) -> dict[str, int]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(SRC)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
           __file__, "--worker", "--model", model_name]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"torchrun with {ranks} ranks failed:\n{res.stdout[-2000:]}{res.stderr[-2000:]}")
    line = [s for s in res.stdout.splitlines() if s.startswith("{")][-1]
    return json.loads(line)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="vit_large_patch16_224")
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        row = measure(args.model)
        if row["rank"] == 0:
            print(json.dumps(row), flush=True)
        return
    rows = [_launch(args.model, n) for n in args.ranks]
    base = rows[0]["params"] + rows[0]["optimizer"]
    mib = 2 ** 20
    print(f"{args.model}: {rows[0]['model_params']:,} parameters, fp32, AdamW, CPU/gloo, largest rank shown")
    print(f"{'ranks':>5}  {'params MiB':>10}  {'optimizer MiB':>13}  {'params+optim MiB':>16}  {'vs 1st':>6}  "
          f"{'EMA MiB':>8}")
    for r in rows:
        total = r["params"] + r["optimizer"]
        print(f"{r['ranks']:>5}  {r['params'] / mib:>10.1f}  {r['optimizer'] / mib:>13.1f}  {total / mib:>16.1f}  "
              f"{total / base:>6.3f}  {r['ema'] / mib:>8.1f}")


if __name__ == "__main__":
    main()
