"""Transfer learning: pretrain a ViT on digits 0-4, then fine-tune it on digits 5-9.

    python examples/transfer_learning.py [--pretrained CHECKPOINT] [--epochs 5]

With --pretrained (any vitlab, timm or Hugging Face checkpoint, or a registered name whose
weights are in the local hub cache) the first step is skipped. Fine-tuning first trains only
the new head (frozen backbone), then unfreezes everything with layer-wise lr decay.
"""

from __future__ import annotations

import argparse

import torch
from torch.utils.data import Dataset

from vitlab import ViTTransferLearning
from vitlab.datasets import DigitsDataset
from vitlab.training import build_trainer, load_config
from vitlab.training.checkpoint import latest_checkpoint
from vitlab.training.recipes import DIGITS_RECIPE


class DigitSubset(Dataset):
    """Digits of some classes only, relabelled 0..k-1."""

    def __init__(self, split: str, digits: list[int]) -> None:
        base = DigitsDataset(split)
        self.items = [(x, digits.index(y)) for x, y in (base[i] for i in range(len(base))) if y in digits]
        self.classes = [str(d) for d in digits]
        self.num_classes = len(digits)
        self.mean, self.std = base.mean, base.std

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.items[i]


def pretrain(output_dir: str, epochs: int) -> str:
    """A source model on digits 0-4 (through the training engine)."""
    cfg = load_config(None, [f"epochs={epochs}", f"output_dir={output_dir}", "progress=false"], base=DIGITS_RECIPE)
    trainer = build_trainer(cfg, log=lambda s: None)
    source = [DigitSubset(s, [0, 1, 2, 3, 4]) for s in ("train", "val", "test")]
    model = trainer.model
    model.reset_classifier(5)
    from vitlab.training import Trainer

    res = Trainer(model, cfg, *source, labels=source[0].classes, mean=source[0].mean, std=source[0].std,
                  augment=trainer.augment, output_dir=output_dir, log=lambda s: None).fit()
    print(f"source model (digits 0-4): test top-1 {res['test_top1']:.2f}%")
    return str(latest_checkpoint(output_dir))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pretrained", help="checkpoint or registered name (default: pretrain on digits 0-4)")
    p.add_argument("--epochs", type=int, default=5, help="head-only epochs; as many again with everything unfrozen")
    p.add_argument("--source-epochs", type=int, default=30, help="epochs of the digits 0-4 source model")
    p.add_argument("--output-dir", default="runs/example_transfer")
    args = p.parse_args()

    source = args.pretrained or pretrain(f"{args.output_dir}/source", epochs=args.source_epochs)
    target = [DigitSubset(s, [5, 6, 7, 8, 9]) for s in ("train", "val", "test")]
    transfer = ViTTransferLearning(pretrained_model=source, num_classes=5, freeze_backbone=True)
    trainable = sum(p.numel() for p in transfer.model.parameters() if p.requires_grad)
    print(f"fine-tuning {trainable:,} of {transfer.model.num_params():,} parameters first (the head)")
    res = transfer.fine_tune(dataset=target[0], val_dataset=target[1], test_dataset=target[2], epochs=args.epochs,
                             learning_rate=1e-3, unfreeze_epochs=args.epochs, layer_decay=0.75,
                             output_dir=f"{args.output_dir}/target", progress=False)
    head_only = [h for h in transfer.history if h["phase"] == "head"][-1]
    print(f"digits 5-9 after the head-only phase: val top-1 {head_only['val_top1']:.2f}%")
    print(f"digits 5-9 after unfreezing: test top-1 {res['test_top1']:.2f}%")


if __name__ == "__main__":
    main()
