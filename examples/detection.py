"""Object detection with vitlab: train DETR on digit scenes, evaluate (COCO AP), draw detections.

    python examples/detection.py [--epochs 40] [--num-train 2000] [--output-dir runs/example_detection]

Uses the Python API end to end, in the two steps of the measured recipe: a digits classifier
of the backbone's shape (configs/detection_backbone_digits.yaml, about a minute; skip it with
``--backbone-epochs 0``), then the detection recipe (the same as ``vitlab train --task
detection``) with that classifier as DETR's backbone; the saved checkpoint reloaded with
``load_detector``, COCO metrics on the test scenes (digits never seen in training), and a PNG
with the boxes drawn on a test scene.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

from vitlab.tasks.detection.detr import REMEDIES
from vitlab.tasks.detection.task import DETECTION_RECIPE
from vitlab.tasks.detection.inference import (
    data_for_checkpoint,
    detect,
    detections_to_json,
    draw_detections,
    evaluate_detector,
    load_detector,
)
from vitlab.training import build_trainer, load_config
from vitlab.training.checkpoint import latest_checkpoint


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--num-train", type=int, default=2000, help="training scenes")
    p.add_argument("--num-val", type=int, default=200, help="validation scenes (evaluated every epoch)")
    p.add_argument("--num-test", type=int, default=400, help="test scenes")
    p.add_argument("--remedy", default="two_stage", choices=REMEDIES,
                   help="two-stage query selection (the recipe), with DN-DETR denoising, DN alone, or plain DETR")
    p.add_argument("--backbone-epochs", type=int, default=30,
                   help="epochs of the digits classifier that initialises the backbone (0: random backbone)")
    p.add_argument("--output-dir", default="runs/example_detection")
    args = p.parse_args()

    overrides = [f"epochs={args.epochs}", f"output_dir={args.output_dir}",
                 f"detection.scenes.num_train={args.num_train}", f"detection.scenes.num_val={args.num_val}",
                 f"detection.scenes.num_test={args.num_test}", f"detection.detr.remedy={args.remedy}"]
    if args.remedy == "none":  # plain DETR has no reference boxes for the spatial prior
        overrides.append("detection.detr.spatial_prior=false")
    if args.backbone_epochs > 0:  # step 1: the backbone learns digits at the scenes' scale
        recipe = Path(__file__).resolve().parents[1] / "configs" / "detection_backbone_digits.yaml"
        backbone_dir = Path(args.output_dir) / "backbone"
        clf = build_trainer(load_config(str(recipe), [f"epochs={args.backbone_epochs}",
                                                      f"output_dir={backbone_dir}"])).fit()
        print(f"backbone classifier: test top-1 {clf['test_top1']:.2f}%")
        overrides.append(f"model.pretrained={backbone_dir}")
    cfg = load_config(None, overrides, base=DETECTION_RECIPE)
    results = build_trainer(cfg).fit()
    print(f"test AP50 {results['test_AP50']:.3f}  AP {results['test_AP']:.3f}  "
          f"(training {results['train_time_s']:.0f}s)")

    model = load_detector(latest_checkpoint(args.output_dir))
    test = data_for_checkpoint(model, "test")
    res = evaluate_detector(model, test)
    print(f"reloaded checkpoint: test AP50 {res['AP50']:.3f}  AP {res['AP']:.3f}  (n={res['n']})")

    sample = test[0]
    det = detect(model, sample["image"][None], score_threshold=0.5)[0]
    image = Image.fromarray((sample["image"][0].numpy() * 255).astype(np.uint8))
    out = Path(args.output_dir) / "example_detections.png"
    draw_detections(image.resize((256, 256), Image.NEAREST),
                    {**det, "boxes": det["boxes"] * 256 / image.width}, test.classes).save(out)
    truth = sample["labels"][sample["labels"] >= 0].tolist()
    print(f"scene 0: true digits {sorted(truth)}; detected "
          f"{[(d['class'], round(d['score'], 2)) for d in detections_to_json(det, test.classes)]} -> {out}")


if __name__ == "__main__":
    main()
