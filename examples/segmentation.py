"""Semantic segmentation with vitlab: train on digit scenes, evaluate (per-class IoU), draw.

    python examples/segmentation.py [--epochs 30] [--output-dir runs/example_segmentation] [KEY=VALUE ...]

Uses the Python API end to end: the built-in segmentation recipe (PVT v2 b0 + SegFormer's
all-MLP head on 64x64 scenes of scikit-learn digits; background + 10 digit classes), the
training engine, the saved checkpoint evaluated on the test scenes, and a figure of a few
test scenes with their ground truth and predicted masks (``predictions.png``), plus the mask
and overlay PNGs ``vitlab predict --task segmentation`` would write for one scene.
``--head setr_naive --model vit_tiny_patch16_224`` trains SETR on a ViT instead (patch 4).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from PIL import Image

from vitlab.datasets.digit_scenes import DigitScenes
from vitlab.tasks.segmentation.apply import evaluate_segmentation_checkpoint, format_iou_table, segment
from vitlab.tasks.segmentation.model import load_segmenter
from vitlab.tasks.segmentation.task import SEGMENTATION_RECIPE
from vitlab.tasks.segmentation.visualize import overlay, save_mask_png, save_overlay_grid
from vitlab.training import build_trainer, load_config
from vitlab.training.checkpoint import latest_checkpoint

VIT_PATCH4 = "{patch_size: 4, dim: 128, depth: 6, heads: 4, mlp_dim: 256}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--scenes", type=int, default=2000, help="training scenes")
    p.add_argument("--model", default=None, help="backbone (default: the recipe's pvt_v2_b0)")
    p.add_argument("--head", default=None, help="setr_naive | setr_pup | setr_mla | mlp | fpn (default: the recipe's)")
    p.add_argument("--output-dir", default="runs/example_segmentation")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="more config overrides (segmentation.test_scenes=100)")
    args = p.parse_args()

    overrides = [f"epochs={args.epochs}", f"output_dir={args.output_dir}", f"segmentation.train_scenes={args.scenes}"]
    if args.model:
        overrides.append(f"model.name={args.model}")
        if args.model.startswith(("vit", "deit")):
            overrides.append(f"model.overrides={VIT_PATCH4}")
    if args.head:
        overrides.append(f"segmentation.head={args.head}")
    cfg = load_config(None, overrides + list(args.overrides), base=SEGMENTATION_RECIPE)
    results = build_trainer(cfg).fit()
    print(f"test mIoU {results['test_mIoU']:.4f}  pixel accuracy {results['test_pixel_accuracy']:.4f}")

    # evaluate the saved checkpoint alone, as `vitlab eval --checkpoint RUN` does
    ckpt = latest_checkpoint(args.output_dir)
    print(format_iou_table(evaluate_segmentation_checkpoint(ckpt, device="cpu")))

    # draw: a few test scenes, their ground truth and the predicted masks
    model, labels = load_segmenter(ckpt)
    scenes = DigitScenes("test", num_scenes=4, canvas_size=cfg.segmentation.canvas_size)
    images = torch.stack([scenes[i]["image"] for i in range(4)])
    truth = [scenes[i]["semantic_mask"] for i in range(4)]
    pred = segment(model, images).argmax(1)
    out = Path(args.output_dir)
    print(f"wrote {save_overlay_grid(list(images), truth, list(pred), out / 'predictions.png', labels)}")
    print(f"wrote {save_mask_png(pred[0], out / 'scene0_mask.png')}")
    Image.fromarray(overlay(images[0], pred[0])).save(out / "scene0_overlay.png")
    print(f"wrote {out / 'scene0_overlay.png'}")


if __name__ == "__main__":
    main()
