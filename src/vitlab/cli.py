"""The ``vitlab`` command line: argument parsing only; the work is done by the library."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Sequence

from .errors import check_device, report_error


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
    from .training.convert_dcp import dcp_to_safetensors, is_dcp_checkpoint, safetensors_to_dcp

    if args.to_dcp or is_dcp_checkpoint(args.src):  # FSDP checkpoints: DCP <-> one safetensors file
        out = safetensors_to_dcp(args.src, args.dst) if args.to_dcp else dcp_to_safetensors(args.src, args.dst, args.which)
        print(f"wrote {out}")
        return 0
    overrides = {"num_classes": args.num_classes} if args.num_classes is not None else {}
    out = convert_checkpoint(args.src, args.dst, model_name=args.model, **overrides)
    print(f"wrote {out}")
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    """``vitlab predict``: the checkpoint's task (read from it) predicts; ``--task`` only checks it."""
    from .tasks.loading import checkpoint_task

    if not args.checkpoint and args.task not in (None, "classification"):
        raise ValueError(f"vitlab predict --task {args.task} needs --checkpoint (a {args.task} run or checkpoint)")
    task = checkpoint_task(args.checkpoint) if args.checkpoint else "classification"
    if args.task is not None and args.task != task:
        raise ValueError(f"{args.checkpoint} is a {task} checkpoint, not {args.task}: drop --task (predict reads "
                         "the task from the checkpoint)")
    if args.top_k is not None and args.top_k < 1:
        raise ValueError(f"--top-k must be at least 1, got {args.top_k}")
    if task == "classification":
        return _predict_classification(args)
    if args.tome is not None:
        raise ValueError(f"--tome (token merging) runs classification checkpoints; {args.checkpoint} is {task}")
    return _predict_with_hooks(args, task)


def _predict_with_hooks(args: argparse.Namespace, task: str) -> int:
    """Any task's predict hook: a line per image, the task's pictures in ``--output-dir``."""
    import inspect

    from .tasks.registry import get_inference

    hooks = get_inference(task)
    model = hooks.load(args.checkpoint, args.device)
    wanted = inspect.signature(hooks.predict).parameters  # the options the plugins added, by name
    options = {k: v for k, v in vars(args).items() if k in wanted and k not in ("model", "images") and v is not None}
    out_dir = Path(args.output_dir or "predictions")
    records = []
    for path, record in zip(args.images, hooks.predict(model, [str(p) for p in args.images], **options)):
        for note in record.get("notes", []):
            print(f"vitlab predict: note: {path}: {note}", file=sys.stderr)
        files = hooks.draw(str(path), record, out_dir, Path(path).stem)
        records.append({"image": str(path), **{k: v for k, v in record.items() if k not in hooks.json_exclude},
                        "files": [str(f) for f in files]})
        if not args.json:
            print(hooks.describe(str(path), record) + "".join(f"\n    wrote {f}" for f in files))
    if args.json:
        print(json.dumps(records, indent=2))
    return 0


def _predict_classification(args: argparse.Namespace) -> int:
    from .deploy import ViTClassifier

    if args.checkpoint:  # a path or hub id only: never taken as a model name
        from .pretrained import load_model

        clf = ViTClassifier(load_model(args.checkpoint), device=args.device, precision=args.precision,
                            compile=args.compile, tome=args.tome)
    else:
        clf = ViTClassifier.from_pretrained(resolve_model_name(args.model), device=args.device,
                                            precision=args.precision, compile=args.compile, tome=args.tome)
    results = clf.predict([str(p) for p in args.images], top_k=args.top_k or 5)
    for path, r in zip(args.images, results):  # notes go to stderr: stdout stays parseable
        for note in r["notes"]:
            print(f"vitlab predict: note: {path}: {note}", file=sys.stderr)
    if args.json:
        print(json.dumps([{"image": str(p), **r} for p, r in zip(args.images, results)], indent=2))
        return 0
    from .tasks.classify import ClassificationInference

    for path, r in zip(args.images, results):
        print(ClassificationInference.describe(str(path), r))
    return 0


def _default_recipe(args: argparse.Namespace) -> dict:
    """The recipe under the command line when there is no --config: digits, or the task's own."""
    from .training.recipes import task_recipe

    # --task, or a task=NAME override: both start from that task's built-in recipe
    task = getattr(args, "task", None) or next(
        (o.split("=", 1)[1] for o in getattr(args, "overrides", []) if o.startswith("task=")), None)
    return task_recipe(task)


def resolve_model_name(name: str) -> str:
    """A registered name, or a short alias (``vit_base``, ``swin_t``); see :func:`vitlab.models.registry.resolve_model_name`."""
    from .models.registry import resolve_model_name as resolve

    return resolve(name)


def _train_flags(args: argparse.Namespace) -> dict[str, object]:
    """The explicit flags of ``vitlab train`` as dotted config keys (strongest layer)."""
    flags = {"data.data_dir": args.data_dir, "epochs": args.epochs, "data.batch_size": args.batch_size,
             "optim.lr": args.lr, "seed": args.seed, "output_dir": args.output_dir, "device": args.device,
             "precision": args.precision, "task": args.task}
    out = {k: v for k, v in flags.items() if v is not None}
    if args.no_progress:
        out["progress"] = False
    return out


def _train_config(args: argparse.Namespace):
    """The config of a fresh run: defaults < dataset defaults < recipe < --model/--dataset < KEY=VALUE < flags."""
    from .training.config import load_config

    model = resolve_model_name(args.model) if args.model else None
    overrides = list(args.overrides)
    if getattr(args, "init_from", None):
        from .tasks.mae import init_from_overrides

        overrides = init_from_overrides(args.init_from) + overrides  # the run's model; KEY=VALUE still wins
    return load_config(args.config, overrides, base=None if args.config else _default_recipe(args),
                       model=model, dataset=args.dataset, flags=_train_flags(args))


def _resume_changes(args: argparse.Namespace) -> dict[str, object]:
    """What the command line asks to set on a resumed run, as dotted key -> value."""
    from .training.config import apply_overrides

    def flatten(values: dict, prefix: str = "") -> dict[str, object]:
        out: dict[str, object] = {}
        for k, v in values.items():
            key = f"{prefix}{k}"
            if isinstance(v, dict) and v:
                out.update(flatten(v, key + "."))
            else:
                out[key] = v
        return out

    changes = flatten(apply_overrides({}, list(args.overrides)))
    changes.update({k: v for k, v in _train_flags(args).items() if k != "output_dir"})
    if args.model:
        changes["model.name"] = resolve_model_name(args.model)
    if args.dataset:
        changes["data.dataset"] = args.dataset
    if args.config:
        changes["recipe"] = _train_config(args).recipe
    return changes


def _cmd_train(args: argparse.Namespace) -> int:
    import time

    from .training.run import latest_run_dir, resume_config, run_stem, train

    if args.resume:
        run_dir = args.output_dir
        if run_dir is None:
            fresh = _train_config(args)
            run_dir = latest_run_dir(fresh)
            if run_dir is None:
                raise FileNotFoundError(f"no run of {run_stem(fresh)}-<N> to resume; pass --output-dir RUN_DIR")
        cfg = resume_config(run_dir, _resume_changes(args))
    else:
        cfg = _train_config(args)
    args.run_dir = cfg.output_dir  # named by the Ctrl-C / disk-full resume hint
    t0 = time.perf_counter()
    results = train(cfg, resume=args.resume, overwrite=args.overwrite)
    if int(os.environ.get("RANK", "0")) != 0:
        return 0  # under torchrun only rank 0 reports
    split = results.get("split", "test")
    print(f"finished in {time.perf_counter() - t0:.0f}s; run directory: {cfg.output_dir}")
    if f"{split}_top1" in results:
        line = f"{split} accuracy: top-1 {results[f'{split}_top1']:.2f}%  top-5 {results[f'{split}_top5']:.2f}%"
        if f"ema_{split}_top1" in results:
            line += f"  (EMA top-1 {results[f'ema_{split}_top1']:.2f}%)"
        print(line)
    elif f"{split}_{results.get('primary_metric')}" in results:  # another task: its primary metric
        primary = results["primary_metric"]
        line = f"{split} {primary}: {results[f'{split}_{primary}']:.6g}"
        if f"ema_{split}_{primary}" in results:
            line += f"  (EMA {results[f'ema_{split}_{primary}']:.6g})"
        print(line)
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    """``vitlab eval``: the checkpoint's task (read from it) evaluates and reports."""
    from .tasks.loading import checkpoint_task
    from .tasks.registry import get_inference

    hooks = get_inference(checkpoint_task(args.checkpoint))
    options = {"data_dir": args.data_dir} if args.data_dir else {}
    res = hooks.evaluate(args.checkpoint, args.dataset, split=args.split, output_dir=args.output_dir,
                         device=args.device, batch_size=args.batch_size, **options)
    print(hooks.report(res))
    return 0


def _parser_with(common: argparse.ArgumentParser) -> type:
    """An ArgumentParser class whose instances (the subcommands) inherit ``common``'s options."""

    class SubParser(argparse.ArgumentParser):
        def __init__(self, *a: object, **kw: object) -> None:
            kw.setdefault("parents", [common])  # type: ignore[arg-type]
            super().__init__(*a, **kw)  # type: ignore[arg-type]

    return SubParser


def build_parser() -> argparse.ArgumentParser:
    """The ``vitlab`` argument parser."""
    p = argparse.ArgumentParser(prog="vitlab", description="Vision Transformers: models, training, analysis.",
                                epilog="Exit codes: 0 success, 1 the run failed (I/O, diverged, non-finite outputs), "
                                       "2 usage or input error, 130 interrupted.")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error instead of one line")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show the traceback of an error instead of one line")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_parser_with(common))

    m = sub.add_parser("models", help="list registered models with parameters, GFLOPs and input size")
    m.add_argument("pattern", nargs="?", default="*", help="shell-style name pattern, e.g. 'vit_*'")
    m.add_argument("--json", action="store_true", help="print JSON")
    m.add_argument("--no-flops", action="store_true", help="skip the FLOP count (faster)")
    m.set_defaults(func=_cmd_models)

    c = sub.add_parser("convert", help="write a vitlab safetensors checkpoint from a timm / HF checkpoint or a DCP "
                       "(distributed.strategy=fsdp) checkpoint folder; --to-dcp: a safetensors file to a DCP folder")
    c.add_argument("src", help="checkpoint file, folder or hub id")
    c.add_argument("dst", help="output .safetensors file or folder")
    c.add_argument("--model", help="registered model name (inferred when omitted)")
    c.add_argument("--num-classes", type=int, help="classifier size (head re-initialised if it differs)")
    c.add_argument("--to-dcp", action="store_true", help="SRC .safetensors -> DST folder with dcp/ and meta.json")
    c.add_argument("--which", choices=("model", "ema"), default="model", help="DCP source: model or EMA weights")
    c.set_defaults(func=_cmd_convert)

    pr = sub.add_parser("predict", help="classify images (--task detection: detect objects; "
                                        "--task segmentation: segment them)")
    g = pr.add_mutually_exclusive_group(required=True)
    g.add_argument("--model", help="registered model name (its default pretrained weights)")
    g.add_argument("--checkpoint", help="checkpoint file, folder or hub id")
    pr.add_argument("images", nargs="+", type=Path, help="image files")
    pr.add_argument("--top-k", type=int, default=None,
                    help="classes shown (default 5); detection: most detections per image (default all)")
    pr.add_argument("--task", default=None,
                    help="optional: the task is read from the checkpoint (classification: the top-k classes; "
                         "detection: boxes drawn + JSON; segmentation: mask + overlay PNGs); given, it must match")
    pr.add_argument("--output-dir", "--output_dir", dest="output_dir", default=None,
                    help="detection / segmentation: where the PNG and JSON files go (default: predictions/)")
    pr.add_argument("--device", default="cpu")
    pr.add_argument("--json", action="store_true", help="print JSON")
    pr.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "bf16-amp", "fp16", "int8"],
                    help="inference precision (bf16: bfloat16 weights and activations; int8: dynamic quantization, CPU)")
    pr.add_argument("--compile", action="store_true", help="torch.compile the model (the first call compiles)")
    pr.add_argument("--tome", type=int, metavar="R", help="token merging: merge R token pairs per block (ViT/DeiT/CaiT)")
    from .tasks.registry import list_inference

    for hooks in list_inference().values():  # each task's own predict options
        hooks.add_predict_arguments(pr)
    pr.set_defaults(func=_cmd_predict)

    t = sub.add_parser("train", help="train a model (no arguments: the bundled digits recipe)",
                       description="Train a model. Without --config the bundled digits recipe is used; "
                                   "KEY=VALUE overrides (e.g. optim.lr=5e-4 model.overrides.depth=4) apply last.")
    t.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted config overrides")
    t.add_argument("--config", type=Path, help="YAML recipe (configs/*.yaml)")
    t.add_argument("--task", help="what to train: a registered task (default: the recipe's, classification); "
                                  "see vitlab.tasks.list_tasks()")
    t.add_argument("--model", help="registered model name or alias (vit_base)")
    t.add_argument("--init-from", "--init_from", dest="init_from", metavar="RUN_DIR",
                   help="start from the encoder of a training run (e.g. an MAE pre-training run): its model, "
                        "overrides and image size, its latest checkpoint's encoder weights (fine-tune with "
                        "--task classification optim.layer_decay=0.75, or probe with --task linear_probe)")
    t.add_argument("--dataset", help="digits | cifar10 | cifar100 | imagenet | synthetic | PATH to an image folder")
    t.add_argument("--data-dir", "--data_dir", dest="data_dir", help="where CIFAR / ImageNet data live")
    t.add_argument("--epochs", type=int)
    t.add_argument("--batch-size", "--batch_size", dest="batch_size", type=int)
    t.add_argument("--lr", "--learning-rate", "--learning_rate", dest="lr", type=float)
    t.add_argument("--seed", type=int)
    t.add_argument("--output-dir", "--output_dir", dest="output_dir",
                   help="run directory (default: a fresh runs/<recipe>/<model>-<dataset>-<N>)")
    t.add_argument("--resume", action="store_true",
                   help="continue a run with its own config: the one in --output-dir, else the most recent "
                        "runs/<recipe>/<model>-<dataset>-<N>; only --epochs (to extend), --device and loading "
                        "options may change")
    t.add_argument("--overwrite", action="store_true",
                   help="let a fresh run replace the run in --output-dir (its results and checkpoints are deleted)")
    t.add_argument("--device", help="auto | cpu | cuda | cuda:N")
    t.add_argument("--precision", choices=["fp32", "bf16", "fp16"])
    t.add_argument("--no-progress", action="store_true", help="no progress bars")
    t.set_defaults(func=_cmd_train)

    e = sub.add_parser("eval", help="evaluate a checkpoint: top-1/top-5 and a confusion matrix "
                                    "(segmentation: the per-class IoU table and mIoU; detection: the COCO box table)")
    e.add_argument("--checkpoint", required=True, help="checkpoint file or folder (or a run's checkpoints/epoch-N)")
    e.add_argument("--dataset", default=None,
                   help="classification: digits | cifar10 | ... | PATH; segmentation: digit_scenes | PATH "
                        "(default: the data the checkpoint was trained on)")
    e.add_argument("--split", default=None, choices=["train", "val", "test"],
                   help="default: test when the dataset has one, else val")
    e.add_argument("--data-dir", "--data_dir", dest="data_dir")
    e.add_argument("--output-dir", "--output_dir", dest="output_dir", default=None, help="where to write the confusion matrix")
    e.add_argument("--batch-size", type=int, default=256)
    e.add_argument("--device", default="auto")
    e.set_defaults(func=_cmd_eval)

    from .benchmark.harness import add_benchmark_command
    from .deploy.onnx_export import add_export_command
    from .evaluation.explain import add_explain_command
    from .datasets.shards import add_data_command

    for add in (add_benchmark_command, add_export_command, add_explain_command, add_data_command):
        add(sub)
    from .tasks.registry import list_inference

    for hooks in list_inference().values():  # the task plugins' own commands (CLIP: zero-shot, retrieve)
        hooks.add_commands(sub)
    return p


# ----------------------------------------------------------------------------- CLIP commands
def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``vitlab`` console script.

    Errors a user can cause are printed as one line ``vitlab COMMAND: error: ...`` and exit
    with 2 (usage or input), 1 (the run failed) or 130 (Ctrl-C); ``--debug`` re-raises them
    with the traceback. See :mod:`vitlab.errors`.
    """
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        # KEY=VALUE overrides may come after options (`--epochs 1 optim.lr=5e-4`); argparse only
        # collects the first run of positionals.
        if getattr(args, "command", None) == "train" and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides = [*args.overrides, *extra]
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        check_device(getattr(args, "device", None))
        return int(args.func(args) or 0)
    except (Exception, KeyboardInterrupt) as e:  # noqa: BLE001 - the CLI boundary: one line per error
        if getattr(args, "debug", False):
            raise
        return report_error(e, args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
