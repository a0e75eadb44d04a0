"""Image classification with vitlab: train a small ViT on the bundled digits, evaluate, predict.

    python examples/classification.py [--epochs 30] [--output-dir runs/example_classification]

Uses the Python API end to end: a config from the digits recipe, the training engine, the
saved checkpoint, and ViTClassifier on a few test images.
"""

from __future__ import annotations

import argparse

from vitlab import ViTClassifier
from vitlab.datasets import DigitsDataset
from vitlab.training import build_trainer, load_config
from vitlab.training.checkpoint import latest_checkpoint
from vitlab.training.recipes import DIGITS_RECIPE


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--output-dir", default="runs/example_classification")
    args = p.parse_args()

    cfg = load_config(None, [f"epochs={args.epochs}", f"output_dir={args.output_dir}"], base=DIGITS_RECIPE)
    trainer = build_trainer(cfg)
    results = trainer.fit()
    print(f"test top-1 {results['test_top1']:.2f}%  (checkpoint: {latest_checkpoint(args.output_dir)})")

    clf = ViTClassifier.from_pretrained(latest_checkpoint(args.output_dir))
    test = DigitsDataset("test")
    images = [test[i][0] for i in range(5)]
    for (image, label), pred in zip((test[i] for i in range(5)), clf.predict(images, top_k=3)):
        print(f"true {label}  predicted {pred['class']} ({pred['confidence']:.1%})")


if __name__ == "__main__":
    main()
