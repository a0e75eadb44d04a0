"""Data loading throughput vs what the model consumes, so loading is never the silent bottleneck.

Writes a small ImageNet-style tree of JPEGs (ImageNet-like sizes, mixed modes) unless
``--data`` names one, then measures, in images/s:

* decode + random-resized-crop per sample in ``N`` DataLoader workers (``--workers``), and
  the same followed by the batched device augmentation (flip, RandAugment, normalise,
  random erasing) of the DeiT recipe;
* a training step of ``--model`` at the same size and batch (forward + backward + AdamW):
  what the model consumes.

    PYTHONPATH=src python benchmarks/data_loading.py --workers 0 1 2 --model vit_tiny_patch16_224
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

from vitlab.datasets import build_dataset
from vitlab.datasets.pipeline import RandomResizedCropSample
from vitlab.models import create_model
from vitlab.training.config import AugmentSection
from vitlab.training.run import build_augment


def make_tree(root: Path, n: int, seed: int = 0) -> Path:
    """``root/train/<class>/*.jpg``: ``n`` JPEGs of ImageNet-like sizes (about 500x375), 5% grey, 2% CMYK."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        w, h = int(rng.integers(300, 640)), int(rng.integers(240, 500))
        base = rng.integers(0, 256, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)  # smooth-ish content, JPEG-friendly
        img = Image.fromarray(base, "RGB").resize((w, h), Image.Resampling.BILINEAR)
        mode = "L" if i % 20 == 0 else ("CMYK" if i % 50 == 1 else "RGB")
        d = root / "train" / f"c{i % 4}"
        d.mkdir(parents=True, exist_ok=True)
        img.convert(mode).save(d / f"{i:05d}.jpg", quality=90)
    (root / "val").mkdir(exist_ok=True)
    return root


def loader_rate(data: Path, size: int, batch: int, workers: int, device_aug: bool, batches: int) -> float:
    """Images/s through the loader (and the device augmentation when ``device_aug``)."""
    ds = build_dataset(str(data), "train", transform=RandomResizedCropSample(size), check="none")
    loader = DataLoader(ds, batch_size=batch, shuffle=True, num_workers=workers, drop_last=True,
                        persistent_workers=workers > 0)
    aug = build_augment(AugmentSection(random_resized_crop=True, hflip=0.5, randaugment="rand-m9-mstd0.5-inc1",
                                       random_erasing=0.25), size, ds.mean, ds.std, crop_on_device=False)
    gen = torch.Generator().manual_seed(0)
    it = iter(loader)
    next(it)  # worker start-up is not throughput
    seen, t0 = 0, time.perf_counter()
    for _ in range(batches):
        try:
            x, _ = next(it)
        except StopIteration:
            it = iter(loader)
            x, _ = next(it)
        if device_aug:
            x = aug(x, gen)
        seen += x.shape[0]
    return seen / (time.perf_counter() - t0)


def model_rate(name: str, size: int, batch: int, steps: int) -> float:
    """Images/s of training steps (forward, backward, AdamW) on random input."""
    model = create_model(name, num_classes=1000, image_size=size)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x, y = torch.rand(batch, 3, size, size), torch.randint(0, 1000, (batch,))
    for i in range(steps + 1):
        if i == 1:
            t0 = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return batch * steps / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, help="an ImageNet-style tree (default: generate one)")
    p.add_argument("--images", type=int, default=256, help="images to generate")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--batches", type=int, default=6, help="timed batches per setting")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--model", default="vit_tiny_patch16_224")
    p.add_argument("--steps", type=int, default=3, help="timed training steps")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = args.data or make_tree(Path(tmp), args.images)
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {data}; size {args.size}, "
              f"batch {args.batch_size}\n")
        print("| stage | workers | images/s |\n|---|---|---|")
        for w in args.workers:
            print(f"| decode + random-resized-crop | {w} | {loader_rate(data, args.size, args.batch_size, w, False, args.batches):.0f} |")
            print(f"| + device augmentation (flip, RandAugment, normalise, erasing) | {w} | "
                  f"{loader_rate(data, args.size, args.batch_size, w, True, args.batches):.0f} |")
        print(f"| {args.model} training step (consumes) | - | {model_rate(args.model, args.size, args.batch_size, args.steps):.0f} |")


if __name__ == "__main__":
    main()
