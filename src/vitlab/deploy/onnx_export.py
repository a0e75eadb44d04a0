"""ONNX export of any vitlab model, checked by running the file in ONNX Runtime.

``export_onnx`` writes the file; ``check_onnx`` runs it in onnxruntime on random images and
returns the largest absolute difference from PyTorch's float32 logits; ``OnnxRuntimeModel``
is the exported file as a callable on tensors (the benchmark's ``onnx`` mode). The file's
``metadata_props`` carry the preprocessing and class names (:func:`onnx_metadata`; read them
back with :func:`read_onnx_metadata`).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

EXPORT_FORMATS = ("onnx",)
INPUT_NAME = "pixel_values"
OUTPUT_NAME = "logits"


def _onnxruntime() -> Any:
    try:
        import onnxruntime
    except ImportError:
        raise ImportError("running ONNX files needs onnxruntime: pip install 'vitlab[onnx]'") from None
    return onnxruntime


def model_input_shape(model: nn.Module, batch_size: int = 1,
                      image_size: int | tuple[int, int] | None = None) -> tuple[int, int, int, int]:
    """(B, C, H, W) of a model's default input (its config's image size unless given)."""
    cfg = model.config
    size = image_size if image_size is not None else cfg.image_size
    h, w = (size, size) if isinstance(size, int) else size
    return batch_size, cfg.in_channels, int(h), int(w)


def export_onnx(
    model: nn.Module,
    path: str | Path,
    batch_size: int = 1,
    image_size: int | tuple[int, int] | None = None,
    dynamic_batch: bool = False,
    opset: int = 17,
) -> Path:
    """Write ``model`` (float32, eval mode) as an ONNX file with input ``pixel_values``.

    Args:
        model: Any vitlab model.
        path: Output ``.onnx`` file (folders are created).
        batch_size: Batch size traced into the graph (and the only one accepted unless
            ``dynamic_batch``).
        image_size: Input size; the model's configured size by default. The graph accepts
            only this size.
        dynamic_batch: Make the batch dimension symbolic.
        opset: ONNX opset.

    Returns:
        The written path.
    """
    try:
        import onnx  # noqa: F401  (the exporter needs it)
    except ImportError:
        raise ImportError("ONNX export needs onnx: pip install 'vitlab[onnx]'") from None
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    device = next(model.parameters()).device
    x = torch.randn(model_input_shape(model, batch_size, image_size), device=device)
    axes = {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}} if dynamic_batch else None
    was_training = model.training
    model.eval()
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # tracer warnings on shape checks; exporter deprecation notices
            torch.onnx.export(model, (x,), str(path), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                              dynamic_axes=axes, opset_version=opset, dynamo=False)
    finally:
        model.train(was_training)
    write_onnx_metadata(path, onnx_metadata(model, image_size))
    return path


def onnx_metadata(model: nn.Module, image_size: int | tuple[int, int] | None = None) -> dict[str, str]:
    """The preprocessing and class names an ONNX consumer needs, as ``metadata_props`` strings.

    Keys (values JSON-encoded): ``model_name``, ``input_size`` ([C, H, W] of the graph input),
    ``mean`` and ``std`` (per channel, applied to pixels scaled to [0, 1]), ``crop_pct``,
    ``interpolation``, ``labels`` (class names, index order), ``pixel_layout`` (``NCHW``).
    """
    import json

    from ..evaluation.explain import class_labels

    pcfg = dict(getattr(model, "pretrained_cfg", {}) or {})
    channels = model.config.in_channels
    _, c, h, w = model_input_shape(model, 1, image_size)

    def per_channel(values: Any, default: float) -> list[float]:
        v = [float(x) for x in (values if isinstance(values, (list, tuple)) else [values])] if values is not None \
            else [default]
        return v if len(v) == channels else [sum(v) / len(v)] * channels

    labels = class_labels(model) or [str(i) for i in range(model.config.num_classes)]
    meta = dict(model_name=getattr(model, "model_name", None) or type(model).__name__, input_size=[c, h, w],
                mean=per_channel(pcfg.get("mean"), 0.5), std=per_channel(pcfg.get("std"), 0.5),
                crop_pct=float(pcfg.get("crop_pct", 1.0)), interpolation=pcfg.get("interpolation", "bicubic"),
                labels=list(labels), pixel_layout="NCHW")
    return {k: json.dumps(v) for k, v in meta.items()}


def write_onnx_metadata(path: str | Path, metadata: dict[str, str]) -> None:
    """Set (replace) ``metadata_props`` entries of an ONNX file in place."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    keep = [p for p in proto.metadata_props if p.key not in metadata]
    del proto.metadata_props[:]
    proto.metadata_props.extend(keep)
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(proto, str(path))


def read_onnx_metadata(path: str | Path) -> dict[str, Any]:
    """The ``metadata_props`` of an ONNX file, JSON values decoded (see :func:`onnx_metadata`)."""
    import json

    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    out: dict[str, Any] = {}
    for p in proto.metadata_props:
        try:
            out[p.key] = json.loads(p.value)
        except json.JSONDecodeError:
            out[p.key] = p.value
    return out


class OnnxRuntimeModel:
    """An ONNX file run by onnxruntime on the CPU, called like a model: (B, C, H, W) -> logits.

    Args:
        path: The ``.onnx`` file.
        threads: Intra-op threads; torch's thread count by default, so timings compare.
    """

    def __init__(self, path: str | Path, threads: int | None = None) -> None:
        ort = _onnxruntime()
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or torch.get_num_threads()
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.path = Path(path)
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def __call__(self, x: Tensor) -> Tensor:
        out = self.session.run(None, {self.input_name: x.detach().float().cpu().contiguous().numpy()})[0]
        return torch.from_numpy(out)


def check_onnx(model: nn.Module, path: str | Path, batch_size: int = 2, image_size: int | tuple[int, int] | None = None,
               seed: int = 0) -> float:
    """Max absolute difference between onnxruntime's and PyTorch's logits on random images."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(model_input_shape(model, batch_size, image_size), generator=gen)
    ort_out = OnnxRuntimeModel(path)(x)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            ref = model(x.to(next(model.parameters()).device)).float().cpu()
    finally:
        model.train(was_training)
    return float((ort_out - ref).abs().max())


@dataclass
class ExportResult:
    """What :func:`export_model` wrote and how well it matches PyTorch.

    Attributes:
        path: The exported file.
        format: ``"onnx"``.
        input_shape: (B, C, H, W) traced; B is symbolic when ``dynamic_batch``.
        dynamic_batch: Whether any batch size is accepted.
        max_abs_diff: Largest |onnxruntime - PyTorch| logit difference (None when not checked).
    """

    path: Path
    format: str
    input_shape: tuple[int, int, int, int]
    dynamic_batch: bool
    max_abs_diff: float | None


def export_model(
    model: nn.Module,
    path: str | Path,
    format: str = "onnx",
    batch_size: int = 1,
    image_size: int | tuple[int, int] | None = None,
    dynamic_batch: bool = False,
    opset: int = 17,
    check: bool = True,
) -> ExportResult:
    """Export ``model`` and (by default) check the file against PyTorch in onnxruntime.

    With ``dynamic_batch`` the check runs at a batch size other than the traced one, so a
    batch dimension that was baked in is caught.

    Raises:
        ValueError: An unknown format.
        ImportError: onnx / onnxruntime missing (the ``vitlab[onnx]`` extra).
    """
    if format not in EXPORT_FORMATS:
        raise ValueError(f"unknown export format {format!r}; choose one of {', '.join(EXPORT_FORMATS)}")
    out = export_onnx(model, path, batch_size, image_size, dynamic_batch, opset)
    diff = None
    if check:
        check_batch = batch_size + 1 if dynamic_batch else batch_size
        diff = check_onnx(model, out, check_batch, image_size)
    return ExportResult(out, format, model_input_shape(model, batch_size, image_size), dynamic_batch, diff)


# ----------------------------------------------------------------------------- the command
def _cmd_export(args: Any) -> int:
    if args.checkpoint:
        from ..pretrained import load_model

        model = load_model(args.checkpoint)
    else:
        from ..pretrained import create_model

        model = create_model(_resolve(args.model))
    res = export_model(model, args.output, format=args.format, batch_size=args.batch_size, image_size=args.image_size,
                       dynamic_batch=args.dynamic_batch, opset=args.opset, check=not args.no_check)
    batch = "dynamic batch" if res.dynamic_batch else f"batch {res.input_shape[0]}"
    print(f"wrote {res.path} (input {'x'.join(map(str, res.input_shape[1:]))}, {batch})")
    if res.max_abs_diff is not None:
        print(f"onnxruntime vs PyTorch: max abs logit difference {res.max_abs_diff:.3e}")
    return 0


def add_export_command(sub: Any) -> None:
    """``vitlab export`` (argparse subparsers ``sub``)."""
    x = sub.add_parser("export", help="export a model to ONNX and check it in onnxruntime")
    g = x.add_mutually_exclusive_group(required=True)
    g.add_argument("--model", help="registered model name or alias (random weights)")
    g.add_argument("--checkpoint", help="checkpoint file or folder")
    x.add_argument("--format", default="onnx", choices=["onnx"])
    x.add_argument("--output", required=True, type=Path, help="output file, e.g. model.onnx")
    x.add_argument("--dynamic-batch", action="store_true", help="accept any batch size")
    x.add_argument("--batch-size", type=int, default=1)
    x.add_argument("--image-size", type=int, help="input side (the model's own by default)")
    x.add_argument("--opset", type=int, default=17)
    x.add_argument("--no-check", action="store_true", help="skip the onnxruntime comparison")
    x.set_defaults(func=_cmd_export)


def _resolve(name: str) -> str:
    from ..models.registry import resolve_model_name

    return resolve_model_name(name)


__all__ = ["EXPORT_FORMATS", "ExportResult", "OnnxRuntimeModel", "check_onnx", "export_model", "export_onnx",
           "model_input_shape", "onnx_metadata", "read_onnx_metadata", "write_onnx_metadata"]
