"""MAE pre-training on the bundled digits, then a linear probe and fine-tuning with 10% of the labels.

The same three steps on the command line:

    vitlab train --task mae --output-dir runs/mae                                   # pre-train
    vitlab train --task linear_probe --init-from runs/mae mae.probe_pool=mean       # probe
    vitlab train --task classification --init-from runs/mae optim.layer_decay=0.75  # fine-tune

Here they run through the Python API, each next to its baseline (random-init probe, training
from scratch), and the script prints the table of issue 12 for one seed
(``benchmarks/mae.py`` runs it over three). The digits are upsampled to 32x32 with 4x4
patches (configs/mae_digits.yaml says why).

    PYTHONPATH=src python examples/mae_pretraining.py --output-dir /tmp/mae-example
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from torch.utils.data import Subset

from vitlab.tasks import get_task
from vitlab.tasks.mae import encoder_from_run, init_from_overrides
from vitlab.training import Trainer, load_config
from vitlab.tasks.mae.task import MAE_DIGITS_RECIPE
from vitlab.training.recipes import DIGITS_RECIPE


def fit(cfg, train_indices: list[int] | None = None) -> dict:
    """Build the task's run from ``cfg`` (as ``vitlab train`` does) and train it, optionally on a
    subset of the training split."""
    torch.manual_seed(cfg.seed)
    setup = get_task(cfg.task).from_config(cfg)
    train = setup.train_data if train_indices is None else Subset(setup.train_data, train_indices)
    return Trainer(setup.model, cfg, train, setup.val_data, setup.test_data, task=setup.task).fit()


def ten_percent_of_labels(seed: int = 0) -> list[int]:
    """A stratified 10% of the digits training split (about 13 images per class)."""
    from vitlab.datasets.factory import build_dataset

    data = build_dataset("digits", "train", None)
    targets = torch.tensor([int(data[i][1]) for i in range(len(data))])
    g = torch.Generator().manual_seed(seed)
    keep: list[int] = []
    for c in range(10):
        members = (targets == c).nonzero().flatten()
        keep += members[torch.randperm(len(members), generator=g)[: round(0.1 * len(members))]].tolist()
    return sorted(keep)


def main() -> None:
    ap = argparse.ArgumentParser(description="MAE pre-training on digits, linear probe and 10%-label fine-tuning")
    ap.add_argument("--pretrain-epochs", type=int, default=30)
    ap.add_argument("--probe-epochs", type=int, default=10)
    ap.add_argument("--finetune-epochs", type=int, default=100)
    ap.add_argument("--model-overrides", default=None,
                    help="encoder overrides as YAML (default: the recipe's ViT, dim 64, depth 4)")
    ap.add_argument("--output-dir", type=Path, default=None, help="where the runs go (default: a temporary folder)")
    args = ap.parse_args()
    tmp = tempfile.TemporaryDirectory() if args.output_dir is None else None
    out = Path(tmp.name) if tmp is not None else args.output_dir
    common = ["progress=false"]
    encoder = [f"model.overrides={args.model_overrides}"] if args.model_overrides else []

    # 1. pre-train: task "mae" (a plain ViT: tokens dropped, light decoder, loss on hidden patches)
    run = out / "mae"
    pre = load_config(None, [*encoder, f"epochs={args.pretrain_epochs}", f"output_dir={run}", *common],
                      base=MAE_DIGITS_RECIPE)
    fit(pre)
    print(f"pre-trained: {run} (reconstructions/ holds a grid per evaluation, loss_curves.png the curves)")

    # The encoder of the run, as a classifier (what --init-from loads), for your own code:
    model = encoder_from_run(run, num_classes=10)
    print(f"encoder: {type(model).__name__} with {model.num_params():,} parameters, weights from {run}")

    # 2. linear probe (frozen encoder, BatchNorm without affine, Linear) vs the same probe at random init,
    #    on the mean of the patch tokens (after a short schedule the class token has learned little)
    probe = ["task=linear_probe", f"epochs={args.probe_epochs}", "mae.probe_pool=mean", "augment.affine_p=0.0",
             "augment.cutmix_alpha=0.0",
             "augment.label_smoothing=0.0", "ema_decay=null", "optim.lr=0.01", "optim.weight_decay=0.0",
             "optim.warmup_epochs=1", "data.batch_size=128", *common]
    probe_mae = fit(load_config(None, init_from_overrides(run) + probe + [f"output_dir={out / 'probe'}"],
                                base=DIGITS_RECIPE))["test_top1"]
    probe_rand = fit(load_config(None, init_from_overrides(run) + probe + [f"output_dir={out / 'probe-random'}",
                                                                         "model.pretrained=null"],
                                 base=DIGITS_RECIPE))["test_top1"]

    # 3. fine-tune on 10% of the labels with layer-wise lr decay vs the same recipe from scratch
    labelled = ten_percent_of_labels()
    # (no CutMix / MixUp: on 126 images they keep both sides underfitted)
    ft = ["task=classification", f"epochs={args.finetune_epochs}", "optim.layer_decay=0.75", "data.batch_size=32",
          "ema_decay=null", "augment.cutmix_alpha=0.0", "augment.mixup_prob=0.0", *common]
    ft_mae = fit(load_config(None, init_from_overrides(run) + ft + [f"output_dir={out / 'finetune'}"],
                             base=DIGITS_RECIPE), labelled)["test_top1"]
    ft_scratch = fit(load_config(None, init_from_overrides(run) + ft + [f"output_dir={out / 'scratch'}",
                                                                      "model.pretrained=null"],
                                 base=DIGITS_RECIPE), labelled)["test_top1"]

    print(f"\n| digits test top-1 (%) | MAE init | baseline | difference |")
    print("|---|---|---|---|")
    print(f"| linear probe (baseline: random init) | {probe_mae:.2f} | {probe_rand:.2f} | {probe_mae - probe_rand:+.2f} |")
    print(f"| fine-tune on {len(labelled)} labels (baseline: scratch) | {ft_mae:.2f} | {ft_scratch:.2f} | "
          f"{ft_mae - ft_scratch:+.2f} |")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
