"""What MAE pre-training buys on the digits, and what token dropping saves (issue 12).

Prints one markdown table, over ``--seeds`` seeds (3 by default):

1. linear probe (frozen encoder, BatchNorm without affine, Linear) of the MAE-pretrained ViT
   vs the same probe on the encoder at random init (target: >= 10 points higher), on the mean
   of the patch tokens (``mae.probe_pool=mean``: the usual feature after a short schedule)
   and, as row 1', on the class token (the MAE paper's probe after 800+ epochs);
2. fine-tuning with 10% of the training labels (13 per class, stratified), MAE init vs
   training from scratch with the same recipe and epochs (target: >= 3 points higher; 100
   epochs, no CutMix / MixUp);
3. pre-training throughput (forward + backward, images/s) with token dropping vs the encoder
   on all tokens (the hidden ones as mask tokens, SimMIM-style) and the decoder on all tokens;
4. the probe on a hierarchical backbone (a tiny Swin) pre-trained with SimMIM vs random init.

Everything runs through the engine (``task: mae``, ``task: linear_probe``,
``task: classification`` with ``--init-from``); only the 10% label subset and the ``--quick``
data subsets are made here. The digits are upsampled to 32x32 with 4x4 patches (an 8x8 grid,
one patch per original pixel: 16 of 64 patches stay visible at 75% masking, where the native
8x8 image with 2x2 patches would leave 4 of 16).

    PYTHONPATH=src python benchmarks/mae.py --quick      # minutes: tiny models and epochs, 1 seed
    PYTHONPATH=src python benchmarks/mae.py              # the full table (see benchmarks/README.md)
    PYTHONPATH=src python benchmarks/mae.py --profile large --stages throughput  # row 3 alone, the larger ViT
    PYTHONPATH=src python benchmarks/mae.py --profile medium --stages probe --set mae.mask_ratio=0.5
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Subset

from vitlab.tasks import get_task
from vitlab.tasks.mae import init_from_overrides
from vitlab.training import Trainer, load_config
from vitlab.tasks.mae.task import MAE_DIGITS_RECIPE
from vitlab.training.recipes import DIGITS_RECIPE

VIT = "{patch_size: 4, dim: 64, depth: 4, heads: 4, mlp_dim: 128}"  # the mae_digits recipe's encoder
VIT_LARGE = "{patch_size: 4, dim: 128, depth: 6, heads: 4, mlp_dim: 256}"
VIT_QUICK = "{patch_size: 4, dim: 32, depth: 2, heads: 2, mlp_dim: 64}"
SWIN = "{patch_size: 2, dim: 32, depths: [2, 2], heads: [2, 4], window_size: 4}"
SWIN_QUICK = "{patch_size: 2, dim: 16, depths: [1, 1], heads: [1, 2], window_size: 4}"

PROFILES: dict[str, dict[str, Any]] = {
    # the measured table (benchmarks/README.md): the recipe's ViT, 30 pre-training epochs, 3 seeds
    "full": dict(vit=VIT, swin=SWIN_QUICK, pretrain_epochs=30, simmim_epochs=30, probe_epochs=10, finetune_epochs=100,
                 subset=None, throughput_rounds=7),
    # the first signal (10 pre-training epochs, 1 seed): the MAE probe was below random init
    "medium": dict(vit=VIT, swin=SWIN_QUICK, pretrain_epochs=10, simmim_epochs=10, probe_epochs=10, finetune_epochs=30,
                   subset=None, throughput_rounds=5),
    # a wider, deeper ViT and a larger Swin, 60 epochs (not measured but for its throughput)
    "large": dict(vit=VIT_LARGE, swin=SWIN, pretrain_epochs=60, simmim_epochs=60, probe_epochs=30, finetune_epochs=100,
                  subset=None, throughput_rounds=7),
    "quick": dict(vit=VIT_QUICK, swin=SWIN_QUICK, pretrain_epochs=1, simmim_epochs=1, probe_epochs=1,
                  finetune_epochs=1, subset=192, throughput_rounds=3),
}
#: Probe recipe: no augmentation, no label smoothing, no weight decay (the MAE paper's probe).
PROBE = ["augment.affine_p=0.0", "augment.cutmix_alpha=0.0", "augment.label_smoothing=0.0", "ema_decay=null",
         "optim.lr=0.01", "optim.weight_decay=0.0", "optim.warmup_epochs=1", "data.batch_size=128"]
#: Fine-tuning recipe (MAE init and scratch alike): the digits recipe's affine augmentation and label
#: smoothing without CutMix / MixUp (on 126 images they kept both sides underfitted: ~30% after 30 epochs),
#: layer-wise lr decay.
FINETUNE = ["optim.layer_decay=0.75", "optim.lr=1e-3", "optim.warmup_epochs=5", "data.batch_size=32",
            "ema_decay=null", "augment.cutmix_alpha=0.0", "augment.mixup_prob=0.0"]


def fit(cfg: Any, train_subset: list[int] | None = None) -> dict[str, Any]:
    """Train ``cfg`` as ``build_trainer`` would (same seeding), optionally on a subset of the training split."""
    torch.manual_seed(cfg.seed)
    setup = get_task(cfg.task).from_config(cfg)
    train = setup.train_data if train_subset is None else Subset(setup.train_data, train_subset)
    trainer = Trainer(setup.model, cfg, train, setup.val_data, setup.test_data, task=setup.task, log=lambda s: None)
    return trainer.fit()


def first(n: int | None) -> list[int] | None:
    return None if n is None else list(range(n))


def labelled_subset(fraction: float, seed: int) -> list[int]:
    """A stratified ``fraction`` of the digits training split (the same classes in every share)."""
    from vitlab.datasets.factory import build_dataset

    data = build_dataset("digits", "train", None)
    targets = torch.tensor([int(data[i][1]) for i in range(len(data))])
    g = torch.Generator().manual_seed(1000 + seed)
    idx: list[int] = []
    for c in targets.unique().tolist():
        members = (targets == c).nonzero().flatten()
        k = max(1, round(fraction * len(members)))
        idx += members[torch.randperm(len(members), generator=g)[:k]].tolist()
    return sorted(idx)


def pretrain(work: Path, name: str, model: str, overrides: str, epochs: int, seed: int, subset: int | None,
             extra: list[str]) -> Path:
    out = work / name
    cfg = load_config(None, [f"model.name={model}", f"model.overrides={overrides}", f"epochs={epochs}",
                             f"seed={seed}", f"output_dir={out}", "progress=false", *extra], base=MAE_DIGITS_RECIPE)
    fit(cfg, first(subset))
    return out


def probe(work: Path, name: str, run: Path, epochs: int, seed: int, subset: int | None,
          random_init: bool = False, pool: str = "mean") -> float:
    extra = ["model.pretrained=null"] if random_init else []
    extra.append(f"mae.probe_pool={pool}")
    cfg = load_config(None, init_from_overrides(run) + ["task=linear_probe", f"epochs={epochs}", f"seed={seed}",
                                                        f"output_dir={work / name}", "progress=false", *PROBE, *extra],
                      base=DIGITS_RECIPE)
    return float(fit(cfg, first(subset))["test_top1"])


def finetune(work: Path, name: str, run: Path, epochs: int, seed: int, labelled: list[int],
             scratch: bool = False) -> float:
    extra = ["model.pretrained=null"] if scratch else []
    cfg = load_config(None, init_from_overrides(run) + ["task=classification", f"epochs={epochs}", f"seed={seed}",
                                                        f"output_dir={work / name}", "progress=false", *FINETUNE,
                                                        *extra], base=DIGITS_RECIPE)
    return float(fit(cfg, labelled)["test_top1"])


def throughput(overrides: str, rounds: int, batch: int = 64) -> dict[str, float]:
    """Pre-training images/s (forward + backward) with token dropping and with the encoder and
    decoder on all tokens, timed interleaved; medians of wall-clock and of process CPU time
    (the latter is what a shared machine's load disturbs least).

    Returns:
        ``drop`` / ``all``: images per wall-clock second; ``drop_cpu`` / ``all_cpu``: images per
        CPU second.
    """
    cfg = load_config(None, [f"model.overrides={overrides}", "output_dir=/nonexistent"], base=MAE_DIGITS_RECIPE)
    torch.manual_seed(0)
    mae = get_task("mae").from_config(cfg).model.train()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 1, 32, 32, generator=g)
    noise = torch.rand(batch, mae.num_patches, generator=g)

    def dropped() -> None:
        mae.zero_grad(set_to_none=True)
        mae(x, noise)[0].backward()

    def all_tokens() -> None:  # the encoder on every token (hidden ones as mask tokens), the decoder on all
        mae.zero_grad(set_to_none=True)
        mask = mae.random_mask(x, noise)
        tokens = mae.encoder.forward_features(x)  # (B, 1 + N, C): the cost of a mask-token encoder
        pred = mae.decoder(tokens, torch.zeros_like(mask), mae.num_prefix_tokens)
        err = ((pred - mae.targets(x)) ** 2).mean(dim=-1)
        ((err * mask).sum() / mask.sum()).backward()

    times: dict[str, list[float]] = {"drop": [], "all": [], "drop_cpu": [], "all_cpu": []}
    for fn in (dropped, all_tokens):  # warm-up
        fn()
    for _ in range(rounds):
        for key, fn in (("drop", dropped), ("all", all_tokens)):
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            times[key].append(time.perf_counter() - t0)
            times[f"{key}_cpu"].append(time.process_time() - c0)
    return {k: batch / statistics.median(v) for k, v in times.items()}


def mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


STAGES = ("probe", "finetune", "simmim", "throughput")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny models, 1 epoch each, data subsets, 1 seed")
    ap.add_argument("--profile", choices=sorted(PROFILES), default=None,
                    help="full (default: 30 pre-training epochs, 3 seeds), medium (10 epochs, 1 seed), large "
                         "(width 128, depth 6, 60 epochs) or quick")
    ap.add_argument("--seeds", type=int, default=None, help="seeds (default: 3; --quick: 1)")
    ap.add_argument("--pretrain-epochs", type=int, default=None, help="MAE and SimMIM pre-training epochs "
                    "(default: the profile's)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="an override of the MAE pre-training config (mae.mask_ratio=0.5, optim.lr=2e-3); repeatable")
    ap.add_argument("--stages", default=",".join(STAGES),
                    help=f"comma-separated stages to run (default: all of {','.join(STAGES)}); MAE pre-training "
                         "runs when probe or finetune does")
    ap.add_argument("--work-dir", type=Path, default=None, help="where the runs go (default: a temporary folder)")
    args = ap.parse_args(argv)
    profile = args.profile or ("quick" if args.quick else "full")
    p = dict(PROFILES[profile])
    if args.pretrain_epochs:
        p["pretrain_epochs"] = p["simmim_epochs"] = args.pretrain_epochs
    stages = set(args.stages.split(","))
    if not stages <= set(STAGES):
        ap.error(f"--stages: unknown {sorted(stages - set(STAGES))}; choose from {', '.join(STAGES)}")
    seeds = list(range(args.seeds or (3 if profile in ("full", "large") else 1)))
    tmp = tempfile.TemporaryDirectory() if args.work_dir is None else None
    work = Path(tmp.name) if tmp is not None else args.work_dir
    res: dict[str, list[float]] = {k: [] for k in ("probe_mae", "probe_rand", "probe_mae_cls", "probe_rand_cls",
                                                    "ft_mae", "ft_scratch", "probe_simmim", "probe_swin_rand")}
    stage_s: dict[str, float] = {}
    cpu0 = time.process_time()

    def timed(stage: str, fn, *a, **kw):
        t0 = time.perf_counter()
        out = fn(*a, **kw)
        stage_s[stage] = stage_s.get(stage, 0.0) + time.perf_counter() - t0
        shown = f"{out:.2f}" if isinstance(out, float) else str(out)
        print(f"  {stage}: {shown} ({time.perf_counter() - t0:.0f}s)", flush=True)  # partial results survive a kill
        return out

    for seed in seeds:
        w = work / f"seed{seed}"
        if stages & {"probe", "finetune"}:
            run = timed("MAE pre-training", pretrain, w, "mae", "vit_tiny_patch16_224", p["vit"],
                        p["pretrain_epochs"], seed, p["subset"], args.set)
        if "probe" in stages:
            for pool, suffix in (("mean", ""), ("head", "_cls")):
                res[f"probe_mae{suffix}"].append(timed("probes", probe, w, f"probe-mae-{pool}", run, p["probe_epochs"],
                                                       seed, p["subset"], pool=pool))
                res[f"probe_rand{suffix}"].append(timed("probes", probe, w, f"probe-rand-{pool}", run,
                                                        p["probe_epochs"], seed, p["subset"], pool=pool,
                                                        random_init=True))
        if "finetune" in stages:
            labelled = labelled_subset(0.1, seed)
            res["ft_mae"].append(timed("fine-tuning", finetune, w, "ft-mae", run, p["finetune_epochs"], seed,
                                       labelled))
            res["ft_scratch"].append(timed("fine-tuning", finetune, w, "ft-scratch", run, p["finetune_epochs"], seed,
                                           labelled, scratch=True))
        if "simmim" in stages:
            swin = timed("SimMIM pre-training", pretrain, w, "simmim", "swin_tiny_patch4_window7_224", p["swin"],
                         p["simmim_epochs"], seed, p["subset"], ["mae.mask_ratio=0.6"])
            res["probe_simmim"].append(timed("probes", probe, w, "probe-simmim", swin, p["probe_epochs"], seed,
                                             p["subset"]))
            res["probe_swin_rand"].append(timed("probes", probe, w, "probe-swin-rand", swin, p["probe_epochs"], seed,
                                                p["subset"], random_init=True))
        print(f"seed {seed}: " + ", ".join(f"{k} {v[-1]:.2f}" for k, v in res.items() if v), flush=True)
    speed = timed("throughput", throughput, p["vit"], p["throughput_rounds"]) if "throughput" in stages else None
    n = len(seeds)

    def row(name: str, a: str, b: str, target: str) -> None:
        if res[a]:
            gain = statistics.mean(res[a]) - statistics.mean(res[b])
            print(f"| {name} | {mean_std(res[a])} | {mean_std(res[b])} | {gain:+.2f} | {target} |")

    print(f"\n## MAE on digits ({profile} profile, {p['pretrain_epochs']} pre-training epochs, {n} "
          f"seed{'s' * (n > 1)}; test top-1 %, mean ± std)\n")
    print("| measure | pre-trained | baseline | difference | target |")
    print("|---|---|---|---|---|")
    row("1. linear probe, ViT (mean of patch tokens): MAE vs random init", "probe_mae", "probe_rand", ">= +10")
    row("1'. linear probe, ViT (class token): MAE vs random init", "probe_mae_cls", "probe_rand_cls", ">= +10")
    row("2. fine-tune on 10% labels, ViT: MAE init vs scratch", "ft_mae", "ft_scratch", ">= +3")
    if speed is not None:
        print(f"| 3. pre-training img/s (wall): tokens dropped vs all tokens | {speed['drop']:.0f} | "
              f"{speed['all']:.0f} | x{speed['drop'] / speed['all']:.2f} | speed-up |")
        print(f"| 3'. pre-training img per CPU-s: tokens dropped vs all tokens | {speed['drop_cpu']:.0f} | "
              f"{speed['all_cpu']:.0f} | x{speed['drop_cpu'] / speed['all_cpu']:.2f} | speed-up |")
    row("4. linear probe, Swin (SimMIM) vs random init", "probe_simmim", "probe_swin_rand", "higher")
    print("\nwall time per stage: " + ", ".join(f"{k} {v:.0f}s" for k, v in stage_s.items())
          + f"; CPU time {time.process_time() - cpu0:.0f}s; torch threads {torch.get_num_threads()}")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
