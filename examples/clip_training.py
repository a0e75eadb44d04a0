"""Train a small CLIP on captioned digits, then classify held-out digits zero-shot and retrieve.

    python examples/clip_training.py                   # ~30 epochs, several minutes on a CPU
    python examples/clip_training.py --epochs 2 --tiny # a quick look

What it shows:
1. ``task: clip`` on the engine: captions such as "a handwritten 7" or "the digit seven",
   duplicate-aware contrastive targets (all captions of a class are positives), a BPE
   tokenizer trained on the captions and saved inside the checkpoint;
2. zero-shot classification of the test digits with a prompt ensemble (no classifier was
   ever trained on the labels);
3. text->image retrieval with free-form captions;
4. reloading the run's checkpoint (model + tokenizer) for inference.
"""

from __future__ import annotations

import argparse

import torch

from vitlab.datasets.captions import DIGIT_WORDS, DigitCaptions
from vitlab.tasks.clip import CLIP_DIGITS_RECIPE
from vitlab.tasks.clip.convert import load_clip_checkpoint
from vitlab.tasks.clip.inference import retrieval_scores, zero_shot_predict
from vitlab.training import build_trainer, load_config


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--tiny", action="store_true", help="a much smaller model and one caption per digit (fast)")
    p.add_argument("--output-dir", default="runs/clip_example")
    args = p.parse_args()

    overrides = [f"epochs={args.epochs}", f"output_dir={args.output_dir}", "progress=false", "device=cpu"]
    if args.tiny:
        overrides += ["model.overrides={patch_size: 4, dim: 32, depth: 1, heads: 2, mlp_dim: 64}",
                      "clip={embed_dim: 32, captions_per_image: 1}"]
    cfg = load_config(None, overrides, base=CLIP_DIGITS_RECIPE)
    results = build_trainer(cfg).fit()
    print(f"test zero-shot top-1 (engine): {100 * results['test_zero_shot_top1']:.2f}%  "
          f"text->image R@1: {100 * results['test_t2i_R@1']:.2f}%")

    # Reload the checkpoint: the tokenizer travels with it.
    model, tokenizer = load_clip_checkpoint(args.output_dir)
    test = DigitCaptions("test")
    mean, std = model.pretrained_cfg["mean"][0], model.pretrained_cfg["std"][0]
    images = (torch.stack([test[i]["image"] for i in range(len(test))]) - mean) / std  # (N, 1, 8, 8)
    labels = torch.tensor([test[i]["label"] for i in range(len(test))])
    probs = zero_shot_predict(model, tokenizer, images, list(DIGIT_WORDS))
    acc = (probs.argmax(1) == labels).float().mean()
    print(f"zero-shot on the {len(test)} held-out digits with class names {', '.join(DIGIT_WORDS[:3])}, ...: "
          f"{100 * acc:.2f}%")

    queries = ["a handwritten 3", "the digit seven", "an image of a 0"]
    sim = retrieval_scores(model, tokenizer, images[:100], queries)  # (100 images, 3 texts)
    for j, q in enumerate(queries):
        top = sim[:, j].topk(5).indices
        print(f"{q!r}: top-5 test images show digits {labels[top].tolist()}")


if __name__ == "__main__":
    main()
