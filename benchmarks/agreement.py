"""Agreement of every CPU inference mode with float32 eager on the digits test set, with trained models.

The trained models are benchmarked with ``agreement_data="digits"`` (max abs logit difference
and top-1 agreement with float32 eager over the 359 test images, plus the usual speed columns):

1. ``digits``: the bundled ``vitlab train`` recipe (a 6-block ViT on the 8x8 images), trained
   for ``--digits-epochs`` epochs, or loaded from ``--digits-checkpoint``;
2. ``vit_small_patch16_224`` (ViT-S/16, 10 classes, one input channel because the digits are
   grey) trained from scratch for ``--vit-s-epochs`` epochs (bf16 autocast) on the digits
   upsampled to 224x224 (bilinear, as the trainer does), or loaded from ``--vit-s-checkpoint``;
   its test images are upsampled the same way;
3. with ``--vit-s-probe``: ViT-S/16 (3 channels) whose classifier is a linear probe fitted on the
   float32 features of its frozen, randomly initialised backbone (a cheap way to a ViT-S/16 whose
   logits separate the digits without hours of CPU training).

Usage (the runs behind benchmarks/README.md):
    PYTHONPATH=src python benchmarks/agreement.py --digits-epochs 25 --vit-s-epochs 1 --output agreement_cpu.md
    PYTHONPATH=src python benchmarks/agreement.py --skip-digits --skip-vit-s --vit-s-probe --output agreement_probe.md
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from vitlab.benchmark import benchmark
from vitlab.pretrained import load_model
from vitlab.training import build_trainer, load_config
from vitlab.training.recipes import DIGITS_RECIPE

MODES = ["eager", "bf16", "bf16-amp", "compile", "compile-bf16", "int8", "onnx"]


def train_digits_model(overrides: list[str], out: Path, log=print) -> tuple[torch.nn.Module, dict]:
    """Train with the digits recipe plus ``overrides``; returns the final model and results.json."""
    cfg = load_config(None, overrides + [f"output_dir={out}", "progress=false"], base=DIGITS_RECIPE)
    trainer = build_trainer(cfg, log=log)
    results = trainer.fit()
    model = trainer.model.cpu().eval()
    return model, results


def linear_probe_vit_s(log=print) -> tuple[torch.nn.Module, float]:
    """ViT-S/16 (3 channels, 10 classes) whose head is fitted to the digits on its frozen, randomly
    initialised backbone: the float32 pre-logit features of the train images (upsampled to 224)
    and a softmax regression on them. Returns the model and its test top-1 accuracy."""
    import torch.nn.functional as F

    from vitlab.datasets.factory import build_dataset
    from vitlab.benchmark import digits_agreement_data
    from vitlab import create_model

    torch.manual_seed(0)
    model = create_model("vit_small_patch16_224", num_classes=10).eval()
    train = build_dataset("digits", "train")
    model.pretrained_cfg = {**model.pretrained_cfg, "mean": tuple(train.mean) * 3, "std": tuple(train.std) * 3}

    def features(split: str) -> tuple[torch.Tensor, torch.Tensor]:
        x = digits_agreement_data(model, split=split)
        data = build_dataset("digits", split)
        y = torch.tensor([data[i][1] for i in range(len(data))])
        with torch.inference_mode():
            f = torch.cat([model.forward_head(model.forward_features(c), pre_logits=True) for c in x.split(64)])
        return f.clone(), y

    log("extracting ViT-S/16 features of the digits (train and test, 224x224)")
    (ftr, ytr), (fte, yte) = features("train"), features("test")
    head = torch.nn.Linear(ftr.shape[1], 10)
    opt = torch.optim.AdamW(head.parameters(), lr=1e-2, weight_decay=1e-4)
    for _ in range(500):
        loss = F.cross_entropy(head(ftr), ytr)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.head.load_state_dict(head.state_dict())
    with torch.no_grad():
        acc = (head(fte).argmax(1) == yte).float().mean().item()
    return model, 100 * acc


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--digits-checkpoint", help="a trained digits checkpoint (skips training)")
    p.add_argument("--digits-epochs", type=int, default=60)
    p.add_argument("--vit-s-checkpoint", help="a ViT-S/16 digits checkpoint (skips training)")
    p.add_argument("--vit-s-epochs", type=int, default=3)
    p.add_argument("--skip-vit-s", action="store_true", help="no fully trained ViT-S/16")
    p.add_argument("--vit-s-probe", action="store_true",
                   help="add ViT-S/16 with a linear-probe head on its frozen random backbone")
    p.add_argument("--skip-digits", action="store_true", help="no digits-recipe model")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--modes", nargs="+", default=MODES)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--output", type=Path, default=Path("benchmarks/results/agreement_cpu.md"))
    args = p.parse_args()

    work = Path(tempfile.mkdtemp(prefix="vitlab-agreement-"))
    models: dict[str, torch.nn.Module] = {}
    notes = []
    t0 = time.perf_counter()
    if args.skip_digits:
        pass
    elif args.digits_checkpoint:
        models["digits recipe"] = load_model(args.digits_checkpoint)
        notes.append(f"digits recipe model: {args.digits_checkpoint}")
    else:
        models["digits recipe"], res = train_digits_model([f"epochs={args.digits_epochs}"], work / "digits")
        top1 = res.get("test_top1", float("nan"))
        notes.append(f"digits recipe model: {args.digits_epochs} epochs, test top-1 {top1:.2f}%")
    if not args.skip_vit_s:
        if args.vit_s_checkpoint:
            models["ViT-S/16 digits 224"] = load_model(args.vit_s_checkpoint)
            notes.append(f"ViT-S/16 digits model: {args.vit_s_checkpoint}")
        else:
            overrides = ["model.name=vit_small_patch16_224", "model.overrides={}", "data.image_size=224",
                         "data.batch_size=32", "data.eval_batch_size=64", f"epochs={args.vit_s_epochs}",
                         "optim.warmup_epochs=0.5", "optim.lr=5e-4", "augment.cutmix_alpha=0.0",
                         "augment.affine_p=0.0", "augment.label_smoothing=0.0", "ema_decay=null", "precision=bf16"]
            models["ViT-S/16 digits 224"], res = train_digits_model(overrides, work / "vit_s")
            notes.append(f"ViT-S/16 digits model: {args.vit_s_epochs} epochs from scratch at 224x224 (bf16 autocast), "
                         f"test top-1 {res.get('test_top1', float('nan')):.2f}%")
    if args.vit_s_probe:
        models["ViT-S/16 digits 224 (probe)"], acc = linear_probe_vit_s()
        notes.append(f"ViT-S/16 digits 224 (probe): 3-channel ViT-S/16 with a random frozen backbone and a linear "
                     f"head fitted on its float32 features of the train images, test top-1 {acc:.2f}%")
    print(f"trained in {time.perf_counter() - t0:.0f}s", flush=True)
    report = benchmark(models, batch_size=args.batch_size, modes=args.modes, repeats=args.repeats, warmup=1,
                       latency_repeats=0, agreement_data="digits", log=lambda s: print(s, flush=True))
    text = report.to_markdown() + "\nModels:\n" + "\n".join(f"- {n}" for n in notes) + "\n"
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
