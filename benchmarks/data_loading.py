"""Data loading throughput vs what the model consumes, so loading is never the silent bottleneck.

Writes a small ImageNet-style tree of JPEGs (ImageNet-like sizes, mixed modes) unless
``--data`` names one, then measures, in images/s:

* decode + random-resized-crop per sample in ``N`` DataLoader workers (``--workers``);
* the batched device augmentation of the DeiT recipe (flip, RandAugment, normalise,
  random erasing) on one such batch;
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
from vitlab import create_model
from vitlab.training.config import AugmentSection
from vitlab.tasks.image_classification import build_augment


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


def loader_rate(data: Path, size: int, batch: int, workers: int, batches: int) -> tuple[float, torch.Tensor]:
    """Images/s of decode + random-resized-crop through a DataLoader with ``workers`` workers.

    Timed from the iterator's creation (worker start-up included) over ``batches`` batches,
    so prefetching cannot inflate the rate. Returns the rate and the last batch.
    """
    ds = build_dataset(str(data), "train", transform=RandomResizedCropSample(size), check="none")
    loader = DataLoader(ds, batch_size=batch, shuffle=True, num_workers=workers, drop_last=True)
    if len(loader) < batches:
        raise ValueError(f"{data} has {len(ds)} images: fewer than {batches} batches of {batch}")
    t0 = time.perf_counter()
    it = iter(loader)
    for _ in range(batches):
        x, _ = next(it)
    rate = batches * batch / (time.perf_counter() - t0)
    del it
    return rate, x


def augment_rate(x: torch.Tensor, mean, std, repeats: int) -> float:
    """Images/s of the DeiT recipe's batched device augmentation (flip, RandAugment, normalise, erasing)."""
    aug = build_augment(AugmentSection(random_resized_crop=True, hflip=0.5, randaugment="rand-m9-mstd0.5-inc1",
                                       random_erasing=0.25), x.shape[-1], mean, std, crop_on_device=False)
    gen = torch.Generator().manual_seed(0)
    aug(x, gen)
    t0 = time.perf_counter()
    for _ in range(repeats):
        aug(x, gen)
    return repeats * x.shape[0] / (time.perf_counter() - t0)


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
    p.add_argument("--batches", type=int, default=8, help="timed batches per setting")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--model", default="vit_tiny_patch16_224")
    p.add_argument("--steps", type=int, default=3, help="timed training steps")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = args.data or make_tree(Path(tmp), args.images)
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {data}; size {args.size}, "
              f"batch {args.batch_size}\n")
        print("| stage | workers | images/s |\n|---|---|---|")
        x = None
        for w in args.workers:
            rate, x = loader_rate(data, args.size, args.batch_size, w, args.batches)
            print(f"| decode + random-resized-crop to {args.size} (DataLoader) | {w} | {rate:.0f} |")
        mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
        print(f"| batched augmentation on the device (flip, RandAugment m9, normalise, erasing) | - | "
              f"{augment_rate(x, mean, std, args.batches):.0f} |")
        print(f"| {args.model} training step (what the model consumes) | - | "
              f"{model_rate(args.model, args.size, args.batch_size, args.steps):.0f} |")


if __name__ == "__main__":
    main()
