"""The ``vitlab`` command line: argument parsing only; the work is done by the library."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence


def _cmd_models(args: argparse.Namespace) -> int:
    import torch

    from .evaluation import count_flops
    from .models import build_model, list_models

    names = list_models(args.pattern)
    if not names:
        print(f"no model matches {args.pattern!r}", file=sys.stderr)
        return 1
    rows = []
    for name in names:
        with torch.device("meta"):
            model = build_model(name)
        size = model.config.image_size
        flops = count_flops(model) if not args.no_flops else None
        rows.append((name, model.num_params(), flops, f"{size[0]}x{size[1]}"))
    if args.json:
        print(json.dumps([dict(name=n, params=p, gflops=None if f is None else f / 1e9, input_size=s) for n, p, f, s in rows], indent=2))
        return 0
    width = max(len(r[0]) for r in rows)
    print(f"{'model':<{width}}  {'params':>13}  {'GFLOPs':>8}  {'GMACs':>7}  input")
    for name, params, flops, size in rows:
        fl = f"{flops / 1e9:8.2f}  {flops / 2e9:7.2f}" if flops is not None else f"{'-':>8}  {'-':>7}"
        print(f"{name:<{width}}  {params:>13,}  {fl}  {size}")
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    from .pretrained import convert_checkpoint

    overrides = {"num_classes": args.num_classes} if args.num_classes is not None else {}
    out = convert_checkpoint(args.src, args.dst, model_name=args.model, **overrides)
    print(f"wrote {out}")
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from .tasks import ViTClassifier

    source = args.checkpoint or args.model
    clf = ViTClassifier.from_pretrained(source, device=args.device)
    results = clf.predict([str(p) for p in args.images], top_k=args.top_k)
    if args.json:
        print(json.dumps([{"image": str(p), **r} for p, r in zip(args.images, results)], indent=2))
        return 0
    for path, r in zip(args.images, results):
        print(f"{path}: {r['class']} ({r['confidence']:.1%})")
        for t in r["top_k"][1:]:
            print(f"    {t['class']} ({t['confidence']:.1%})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The ``vitlab`` argument parser."""
    p = argparse.ArgumentParser(prog="vitlab", description="Vision Transformers: models, training, analysis.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    m = sub.add_parser("models", help="list registered models with parameters, GFLOPs and input size")
    m.add_argument("pattern", nargs="?", default="*", help="shell-style name pattern, e.g. 'vit_*'")
    m.add_argument("--json", action="store_true", help="print JSON")
    m.add_argument("--no-flops", action="store_true", help="skip the FLOP count (faster)")
    m.set_defaults(func=_cmd_models)

    c = sub.add_parser("convert", help="write a vitlab safetensors checkpoint from a timm / HF checkpoint")
    c.add_argument("src", help="checkpoint file, folder or hub id")
    c.add_argument("dst", help="output .safetensors file or folder")
    c.add_argument("--model", help="registered model name (inferred when omitted)")
    c.add_argument("--num-classes", type=int, help="classifier size (head re-initialised if it differs)")
    c.set_defaults(func=_cmd_convert)

    pr = sub.add_parser("predict", help="classify images")
    g = pr.add_mutually_exclusive_group(required=True)
    g.add_argument("--model", help="registered model name (its default pretrained weights)")
    g.add_argument("--checkpoint", help="checkpoint file, folder or hub id")
    pr.add_argument("images", nargs="+", type=Path, help="image files")
    pr.add_argument("--top-k", type=int, default=5)
    pr.add_argument("--device", default="cpu")
    pr.add_argument("--json", action="store_true", help="print JSON")
    pr.set_defaults(func=_cmd_predict)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``vitlab`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, ImportError) as e:
        print(f"vitlab {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
