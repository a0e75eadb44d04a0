"""``vitlab explain`` and ``examples/attention_analysis.py``: run explanation methods on one image,
write a PNG per method (and a combined sheet) and a JSON of the numbers.

Methods: ``attention`` (per-layer attention maps), ``rollout``, ``grad-rollout``, ``gradcam``,
``occlusion``, ``saliency``, ``pca`` (patch tokens to RGB), ``distance`` (mean attention
distance, entropy and head roles per layer).

A model patched with token merging (:func:`vitlab.components.tome.apply_tome`) works as it is:
its merged tokens are mapped back to the patches (:mod:`vitlab.components.tome_explain`), and
the JSON header gets ``tome`` (the schedule and the tokens left after each block).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
import sys
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..components.tome_explain import merge_state
from ..datasets.transforms import ImageLike
from .analysis import analyze_attention, plot_attention_analysis, save_json
from . import interpretation as interp
from .layouts import has_attention
from .visualization import AttentionVisualizer, Panel, plot_sheet, save_figure

METHODS = ("attention", "rollout", "grad-rollout", "gradcam", "occlusion", "saliency", "pca", "distance")
ATTENTION_METHODS = ("attention", "rollout", "grad-rollout", "distance")
MAX_JSON_VALUES = 4096
SHEET_PANELS = 6  # maps per method on the combined sheet


@dataclass
class MethodOutput:
    """One method's panels (for the figures) and numbers (for the JSON)."""

    method: str
    rows: list[tuple[str, list[Panel]]]
    data: dict[str, Any] = field(default_factory=dict)
    figure: Any = None


def load_explain_model(checkpoint: str | Path | None = None, model: str | None = None, pretrained: bool = True,
                       device: str = "cpu") -> nn.Module:
    """The model to explain: a checkpoint (vitlab, timm or HF) or a registered name.

    Args:
        checkpoint: Checkpoint file, folder or hub id.
        model: Registered model name (its default pretrained weights unless ``pretrained`` is False).
        pretrained: With ``model``: load its default weights (False: random initialisation,
            for trying the tools on an architecture).
        device: Where to run.
    """
    if (checkpoint is None) == (model is None):
        raise ValueError("give exactly one of a checkpoint or a registered model name")
    if checkpoint is not None:
        from ..pretrained import load_model

        net = load_model(checkpoint)
    else:
        from ..pretrained import create_model

        net = create_model(model, pretrained=True if pretrained else None)
    return net.to(torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                               ("cpu" if device == "auto" else device))).eval()


def class_labels(model: nn.Module) -> list[str]:
    """The model's class names: its checkpoint's, ImageNet-1k's for 1000 classes, else none."""
    labels = list(getattr(model, "labels", None) or [])
    if not labels and getattr(model.config, "num_classes", 0) == 1000:
        from ..pretrained import imagenet_labels

        labels = imagenet_labels()
    return labels


def resolve_class(model: nn.Module, target: str | int | None) -> int | None:
    """A class index from an index or a class name (the checkpoint's labels, or ImageNet's)."""
    if target is None or isinstance(target, int):
        return target
    text = str(target).strip()
    if text.lstrip("-").isdigit():
        return int(text)
    labels = class_labels(model)
    wanted = text.lower()
    for i, label in enumerate(labels):  # a name, or one of its comma-separated synonyms (ImageNet)
        if wanted == label.lower() or wanted in (part.strip().lower() for part in label.split(",")):
            return i
    close = [lab for lab in labels if text.lower() in lab.lower()][:5]
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    raise ValueError(f"unknown target class {text!r}{hint}; give a class index or one of the model's labels")


def _to_json(t: Tensor) -> list:
    """A map as nested lists, average-pooled to at most 64x64 values."""
    t = t.detach().float().cpu()
    if t.numel() > MAX_JSON_VALUES:
        t = F.adaptive_avg_pool2d(t[None, None] if t.ndim == 2 else t[None], 64)[0]
        t = t[0] if t.ndim == 3 and t.shape[0] == 1 else t
    # (..., W) -> (rows, W)
    return [[round(float(v), 6) for v in row] for row in t.reshape(-1, t.shape[-1])]


def _prediction(model: nn.Module, logits: Tensor, k: int = 5) -> list[dict[str, Any]]:
    probs = logits.detach().float().softmax(-1)[0]
    labels = class_labels(model)
    top = probs.topk(min(k, probs.numel()))
    return [dict(index=int(i), label=labels[int(i)] if int(i) < len(labels) else str(int(i)), probability=float(p))
            for p, i in zip(top.values, top.indices)]


def _layers_or_default(layers: Sequence[int] | None, n: int, strict: bool) -> Sequence[int] | None:
    if layers is None or strict:
        return layers
    return layers if all(0 < k <= n or -n <= k < 0 for k in layers) else None


def _attention(model: nn.Module, x: Tensor, layers: Sequence[int] | None, target: int | None, heads: Any,
               strict: bool) -> MethodOutput:
    maps = AttentionVisualizer(model).generate_attention_maps(x[:1], layers=layers, heads=heads)
    if heads == "all":
        panels: list[Panel] = [(f"L{m.layer} head {h}", m.map[0, h]) for m in maps.maps for h in range(m.map.shape[1])]
    else:
        panels = [(f"L{m.layer} {m.query}\n{m.label}", m.map[0]) for m in maps.maps]
    data = dict(heads=heads, layers=[
        dict(layer=m.layer, label=m.label, query=m.query, grid=list(m.grid.shape), cell_px=list(m.grid.cell),
             prefix_attention=m.prefix_attention[0].tolist(),
             token_map=_to_json(m.token_map[0]) if m.token_map.ndim == 3 else [_to_json(t) for t in m.token_map[0]])
        for m in maps.maps])
    return MethodOutput("attention", _wrap([("image", None)] + panels), data)


def _rollout(model: nn.Module, x: Tensor, layers: Sequence[int] | None, target: int | None, heads: Any,
             strict: bool, gradient: bool = False) -> MethodOutput:
    res = interp.gradient_rollout(model, x[:1], target) if gradient else interp.rollout(model, x[:1])
    data: dict[str, Any] = dict(token_maps={k: _to_json(v[0]) for k, v in res.token_maps.items()},
                                info={k: v for k, v in res.info.items() if k != "readout"})
    if res.targets is not None:
        data["target"] = int(res.targets[0])
    return MethodOutput(res.method, [("", [("image", None), (res.method, res.maps[0])])], data)


def _gradcam(model: nn.Module, x: Tensor, layers: Sequence[int] | None, target: int | None, heads: Any,
             strict: bool) -> MethodOutput:
    chosen = _layers_or_default(layers, len(interp.feature_points(model, tuple(x.shape[-2:]))), strict)
    runs = [interp.grad_cam(model, x[:1], target, k) for k in chosen or [None]]
    panels: list[Panel] = [(f"Grad-CAM {', '.join(r.info['labels'])}", r.maps[0]) for r in runs]
    data = dict(target=int(runs[0].targets[0]), layers=[
        dict(layers=r.info["layers"], labels=r.info["labels"],
             token_maps={k: _to_json(v[0]) for k, v in r.token_maps.items()})
        for r in runs])
    return MethodOutput("gradcam", _wrap([("image", None)] + panels), data)


def _occlusion(model: nn.Module, x: Tensor, layers: Sequence[int] | None, target: int | None, heads: Any,
               strict: bool, progress: bool = False) -> MethodOutput:
    res = interp.occlusion(model, x[:1], target, progress=progress)
    data = dict(target=int(res.targets[0]), score_drop=_to_json(res.token_maps["occlusion"][0]), **res.info)
    return MethodOutput("occlusion", [("", [("image", None), ("occlusion (score drop)", res.maps[0])])], data)


def _saliency(model: nn.Module, x: Tensor, layers: Sequence[int] | None, target: int | None, heads: Any,
              strict: bool) -> MethodOutput:
    res = interp.saliency(model, x[:1], target)
    data = dict(target=int(res.targets[0]), saliency=_to_json(res.maps[0]))
    return MethodOutput("saliency", [("", [("image", None), ("saliency |dS/dx|", res.maps[0])])], data)


def _pca(model: nn.Module, x: Tensor, layers: Sequence[int] | None, target: int | None, heads: Any,
         strict: bool) -> MethodOutput:
    chosen = _layers_or_default(layers, len(interp.feature_points(model, tuple(x.shape[-2:]))), strict)
    views = interp.pca_features(model, x[:1], chosen)
    panels: list[Panel] = [(f"PCA {v.label}", v.image[0]) for v in views]
    data = dict(layers=[dict(layer=v.layer, label=v.label, grid=list(v.token_image.shape[1:3]),
                             explained_variance=v.explained_variance) for v in views])
    return MethodOutput("pca", _wrap([("image", None)] + panels), data)


def _distance(model: nn.Module, x: Tensor, layers: Sequence[int] | None, target: int | None, heads: Any,
              strict: bool) -> MethodOutput:
    analysis = analyze_attention(interp.capture_layers(model, x[:1])[0])
    return MethodOutput("distance", [], analysis, plot_attention_analysis(analysis))


_RUNNERS = {
    "attention": _attention, "rollout": _rollout, "grad-rollout": partial(_rollout, gradient=True),
    "gradcam": _gradcam, "occlusion": _occlusion, "saliency": _saliency, "pca": _pca, "distance": _distance,
}


def run_method(model: nn.Module, x: Tensor, method: str, layers: Sequence[int] | None = None,
               target: int | None = None, heads: Any = "mean", strict: bool = True,
               progress: bool = False) -> MethodOutput:
    """Run one method on prepared input ``x`` (first image shown) -> panels and JSON numbers.

    Args:
        layers: Attention layers for ``attention``; blocks / stages for ``gradcam`` and ``pca``
            (one panel each). Ignored by the others.
        strict: Raise on layers out of range for ``gradcam`` / ``pca``; otherwise fall back to
            their defaults (used when one ``--layers`` list drives every method).
        progress: Show a progress bar on stderr for the long methods (``occlusion``).
    """
    if method not in _RUNNERS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if method in ATTENTION_METHODS and not has_attention(model):
        raise ValueError(f"method {method!r} needs attention layers, and {type(model).__name__} has none; "
                         f"use gradcam, occlusion, saliency or pca")
    if method == "occlusion":
        return _occlusion(model, x, layers, target, heads, strict, progress=progress)
    return _RUNNERS[method](model, x, layers, target, heads, strict)


def _wrap(panels: list[Panel], per_row: int = 6) -> list[tuple[str, list[Panel]]]:
    return [("", panels[i : i + per_row]) for i in range(0, len(panels), per_row)]


def _header(model: nn.Module, x: Tensor, image: Any, target: int | None) -> dict[str, Any]:
    from ..tasks.inputs import check_finite

    with torch.no_grad(), interp.eval_mode(model):
        logits = model(x[:1])
    check_finite(logits, [str(image)] if isinstance(image, (str, Path)) else None)
    record = dict(model=getattr(model, "model_name", None) or type(model).__name__, family=getattr(model, "family", None),
                  image=str(image) if isinstance(image, (str, Path)) else None, input_size=list(x.shape[-2:]),
                  prediction=_prediction(model, logits), target=target, notes=interp.image_notes(model, image))
    state = merge_state(model)
    if state is not None:  # token merging: maps are on the original patches (see components.tome_explain)
        record["tome"] = dict(r=list(state.r), prop_attn=state.prop_attn, tokens=list(state.tokens))
    return record


def explain(model: nn.Module, image: ImageLike | Tensor, method: str = "attention", layers: Sequence[int] | None = None,
            target: str | int | None = None, output_dir: str | Path = "explain", heads: Any = "mean",
            progress: bool = True) -> dict[str, Any]:
    """Run one method and write ``<output_dir>/<method>.png`` and ``<method>.json``.

    Args:
        model: Any vitlab model.
        image: Image path, PIL image, array or prepared tensor (only the first image is used).
        method: One of :data:`METHODS`.
        layers: See :func:`run_method`.
        target: Class index or name to explain; the prediction by default.
        output_dir: Where to write.
        heads: Head reduction for ``attention``.
        progress: Progress bar on stderr for the long methods (``occlusion``).

    Returns:
        The JSON record (with ``files``: the paths written; ``notes``: how far the image is
        from the training data, see :func:`vitlab.tasks.inputs.input_notes`).
    """
    out = Path(output_dir)
    x, display = interp.prepare_image(model, image)
    cls = resolve_class(model, target)
    result = run_method(model, x, method, layers, cls, heads, progress=progress)
    record = dict(_header(model, x, image, cls), method=method, **result.data)
    png = _save_figure(result, display[0], out)
    record["files"] = [str(png), str(png.with_suffix(".json"))]
    save_json(record, png.with_suffix(".json"))
    return record


def _save_figure(result: MethodOutput, image: Tensor, out: Path) -> Path:
    """``<out>/<method>.png``: the method's own figure, or its panels over the image."""
    png = out / f"{result.method.replace('-', '_')}.png"
    if result.figure is not None:
        return save_figure(result.figure, png)
    plot_sheet(image, result.rows, png, title=result.method)
    return png


def explain_all(model: nn.Module, image: ImageLike | Tensor, output_dir: str | Path = "explain",
                layers: Sequence[int] | None = None, target: str | int | None = None,
                methods: Sequence[str] = METHODS, progress: bool = True) -> dict[str, Any]:
    """Run every method that applies to the model: a PNG per method, ``sheet.png`` with all
    the maps, and ``explain.json`` with every method's numbers.

    Attention-based methods are skipped (and listed under ``skipped``) for models without
    attention. ``layers`` selects attention layers; Grad-CAM and PCA use it where it names
    valid blocks / stages, their defaults otherwise. ``progress`` shows a bar over the
    methods (and occlusion's own) on stderr.
    """
    out = Path(output_dir)
    x, display = interp.prepare_image(model, image)
    cls = resolve_class(model, target)
    record = dict(_header(model, x, image, cls), methods={}, skipped={}, files=[])
    sheet: list[tuple[str, list[Panel]]] = []
    for method in interp.progress_bar(list(methods), "explain", progress):
        if method in ATTENTION_METHODS and not has_attention(model):
            record["skipped"][method] = "the model has no attention layers"
            continue
        result = run_method(model, x, method, layers, cls, strict=False, progress=progress)
        png = _save_figure(result, display[0], out)
        if result.figure is None:
            panels = [p for _, row in result.rows for p in row if p[1] is not None]
            if len(panels) > SHEET_PANELS:  # e.g. 24 attention layers: evenly spaced ones, the last included
                step = (len(panels) - 1) / (SHEET_PANELS - 1)
                panels = [panels[round(i * step)] for i in range(SHEET_PANELS)]
            sheet.append((method, panels))
        record["methods"][method] = result.data
        record["files"].append(str(png))
    if sheet:
        plot_sheet(display[0], [(name, [("image", None)] + panels) for name, panels in sheet], out / "sheet.png",
                   title=f"{record['model']}: prediction {record['prediction'][0]['label']}")
        record["files"].append(str(out / "sheet.png"))
    record["files"].append(str(out / "explain.json"))
    save_json(record, out / "explain.json")
    return record


def run_explain(image: str | Path, method: str = "attention", checkpoint: str | Path | None = None,
                model: str | None = None, layers: Sequence[int] | None = None, target: str | int | None = None,
                output_dir: str | Path = "explain", device: str = "cpu", heads: Any = "mean",
                pretrained: bool = True, progress: bool = True) -> dict[str, Any]:
    """What ``vitlab explain`` does: load the model, run ``method`` (or ``all``) on ``image``, write the files."""
    net = load_explain_model(checkpoint, model, pretrained=pretrained, device=device)
    if method == "all":
        return explain_all(net, image, output_dir, layers, target, progress=progress)
    return explain(net, image, method, layers, target, output_dir, heads, progress=progress)


# ----------------------------------------------------------------------------- the command
def _cmd_explain(args: Any) -> int:
    model = _resolve(args.model) if args.model else None
    record = run_explain(args.image, args.method, checkpoint=args.checkpoint, model=model, layers=args.layers,
                         target=args.target, output_dir=args.output_dir, device=args.device, heads=args.heads,
                         pretrained=not args.random_init, progress=not args.no_progress)
    for note in record.get("notes", []):
        print(f"vitlab explain: note: {args.image}: {note}", file=sys.stderr)
    top = record["prediction"][0]
    print(f"{args.image}: predicted {top['label']} ({top['probability']:.1%})")
    for f in record["files"]:
        print(f"wrote {f}")
    return 0


def add_explain_command(sub: Any) -> None:
    """``vitlab explain`` (argparse subparsers ``sub``)."""

    ex = sub.add_parser("explain", help="attention maps, rollout, Grad-CAM, occlusion, saliency, PCA, distances",
                        description="Explain a prediction: writes a PNG per method and a JSON of the numbers.")
    g = ex.add_mutually_exclusive_group(required=True)
    g.add_argument("--checkpoint", help="checkpoint file, folder or hub id")
    g.add_argument("--model", help="registered model name or alias (its default pretrained weights)")
    ex.add_argument("--image", required=True, type=Path, help="image file")
    ex.add_argument("--method", default="attention", choices=[*METHODS, "all"])
    ex.add_argument("--layers", type=int, nargs="+", metavar="N",
                    help="1-based attention layers (attention), blocks / stages (gradcam, pca)")
    ex.add_argument("--target", help="class index or name to explain (default: the prediction)")
    ex.add_argument("--heads", default="mean", type=lambda v: int(v) if v.lstrip("-").isdigit() else v,
                    help="attention heads: mean, max, all or a head index")
    ex.add_argument("--output-dir", "--output_dir", dest="output_dir", default="explain")
    ex.add_argument("--device", default="cpu")
    ex.add_argument("--random-init", action="store_true", help="with --model: random weights (no download)")
    ex.add_argument("--no-progress", action="store_true", help="no progress bars (occlusion, --method all)")
    ex.set_defaults(func=_cmd_explain)


def _resolve(name: str) -> str:
    from ..models.registry import resolve_model_name

    return resolve_model_name(name)
