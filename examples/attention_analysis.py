"""Explain one prediction with every method vitlab has, for any model family.

    python examples/attention_analysis.py --model_path CKPT --image_path IMG --output_dir DIR
    python examples/attention_analysis.py --model vit_base_patch16_224 --image_path cat.jpg --output_dir out

Writes one figure per method (attention maps per layer, attention rollout, gradient-weighted
rollout, Grad-CAM, occlusion, input-gradient saliency, PCA of patch tokens, mean attention
distance and entropy per head), a combined sheet (``sheet.png``) and ``explain.json`` with the
numbers. A model without attention (the CNN) gets the methods that apply to it.
"""

from __future__ import annotations

import argparse

from vitlab.evaluation import explain_all
from vitlab.evaluation.explain import load_explain_model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model_path", "--model-path", "--checkpoint", dest="model_path",
                     help="checkpoint file or folder (vitlab, timm or Hugging Face)")
    src.add_argument("--model", help="registered model name (its default pretrained weights)")
    p.add_argument("--image_path", "--image-path", "--image", dest="image_path", required=True)
    p.add_argument("--output_dir", "--output-dir", dest="output_dir", default="runs/attention_analysis")
    p.add_argument("--layers", type=int, nargs="+", help="1-based attention layers to show (default: all)")
    p.add_argument("--target", help="class index or name to explain (default: the prediction)")
    p.add_argument("--device", default="cpu")
    args = p.parse_args()

    model = load_explain_model(args.model_path, args.model, device=args.device)
    record = explain_all(model, args.image_path, args.output_dir, layers=args.layers, target=args.target)
    top = record["prediction"][0]
    print(f"{args.image_path}: predicted {top['label']} ({top['probability']:.1%})")
    distance = record["methods"].get("distance")
    if distance:
        by_layer = ", ".join("-" if d is None else f"{d:.1f}" for d in distance["summary"]["mean_distance_by_layer"])
        print(f"mean attention distance per layer (pixels): {by_layer}")
        print(f"head roles: {distance['summary']['roles']}")
    for method, reason in record["skipped"].items():
        print(f"skipped {method}: {reason}")
    for f in record["files"]:
        print(f"wrote {f}")


if __name__ == "__main__":
    main()
