"""Inference precisions and compilation: :func:`prepare_for_inference`.

One entry point turns a trained model into a fast inference callable:

===========  ===================================================================================
precision    what runs
===========  ===================================================================================
``fp32``     the model as it is
``bf16``     bfloat16 weights and activations (AMX / tensor cores); logits returned as float32
``bf16-amp`` ``torch.autocast`` to bfloat16 (weights stay float32, cast at every call)
``fp16``     float16 autocast (CUDA)
``int8``     dynamic int8 quantization of every ``nn.Linear`` (weights int8 per tensor,
             activations quantized per batch at run time; CPU only)
===========  ===================================================================================

``compile=True`` wraps the result in ``torch.compile`` (inductor) with freezing: the weights
become constants that inductor pre-packs (MKL / oneDNN), with bias, GELU and residual adds
fused into the matrix products.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from typing import Any

import torch
from torch import Tensor, nn

PRECISIONS = ("fp32", "bf16", "bf16-amp", "fp16", "int8")

_AUTOCAST = {"bf16-amp": torch.bfloat16, "fp16": torch.float16}


def _inductor_freezing() -> contextlib.AbstractContextManager:
    # Only the global config switches freezing on; torch.compile(options={"freezing": True}) does not.
    import torch._inductor.config as inductor_config

    return inductor_config.patch(freezing=True)


def _check_precision(precision: str, device: torch.device) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if precision == "int8" and device.type != "cpu":
        raise ValueError("int8 dynamic quantization runs on the CPU only; use bf16 or fp16 on a GPU")


def quantize_int8(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every ``nn.Linear`` dynamically quantized to int8 (CPU).

    Weights are stored as int8 (per-tensor scale); activations are quantized per batch at run
    time, the matrix products run in int8 and the rest (norms, softmax, GELU, convolutions)
    stays in float32.
    """
    from torch.ao.quantization import quantize_dynamic

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization's deprecation notice (torchao)
        return quantize_dynamic(copy.deepcopy(model).cpu().eval(), {nn.Linear}, dtype=torch.qint8)


class InferenceModel(nn.Module):
    """A model prepared by :func:`prepare_for_inference`; call it like the model.

    Attributes:
        model: The module that runs (a bf16 or int8 copy, or the model itself).
        precision: One of :data:`PRECISIONS`.
        compiled: Whether ``torch.compile`` wraps the forward.
        source: The original float32 model (its ``config`` and ``pretrained_cfg`` are
            exposed as attributes of this wrapper).
    """

    def __init__(self, model: nn.Module, source: nn.Module, precision: str, compiled: bool) -> None:
        super().__init__()
        self.model = model
        self.precision = precision
        self.compiled = compiled
        # Plain attributes, not submodules: no duplicate parameters in state_dict().
        self.__dict__["source"] = source
        self.__dict__["_run"] = model
        if compiled:
            # dynamic=False: one specialised graph per input shape (batch 1 and batch N both fast).
            self.__dict__["_run"] = torch.compile(model, dynamic=False)

    @property
    def config(self) -> Any:
        return self.source.config

    @property
    def pretrained_cfg(self) -> dict[str, Any]:
        return self.source.pretrained_cfg

    @property
    def input_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.precision == "bf16" else torch.float32

    def autocast(self, device_type: str) -> contextlib.AbstractContextManager:
        """The autocast context of this precision (a no-op for fp32, bf16 and int8)."""
        dtype = _AUTOCAST.get(self.precision)
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        """Images (B, C, H, W) -> float32 logits (no autograd graph is recorded)."""
        # Freezing (set while inductor compiles, i.e. on the first call per shape) turns the
        # weights into constants: pre-packed GEMM weights, bias / GELU / residual add fused in.
        freeze = _inductor_freezing() if self.compiled else contextlib.nullcontext()
        with torch.no_grad(), freeze, self.autocast(x.device.type):
            out = self._run(x.to(self.input_dtype))
        return out.float()


def prepare_for_inference(
    model: nn.Module,
    precision: str = "fp32",
    compile: bool = False,
    device: str | torch.device | None = None,
    tome: Any = None,
) -> InferenceModel:
    """Make an eval-mode inference callable of ``model`` at a precision, optionally compiled.

    Args:
        model: Any vitlab model (or a module mapping images to logits).
        precision: ``fp32``, ``bf16`` (bfloat16 weights and activations), ``bf16-amp``
            (autocast), ``fp16`` (autocast, for GPUs) or ``int8`` (dynamic quantization of the
            linear layers, CPU).
        compile: Wrap in ``torch.compile`` (the first calls compile; later ones are fast).
        device: Where to run; the model's device by default (``int8`` forces the CPU).
        tome: Token merging (:func:`vitlab.components.tome.apply_tome`) on the copy that runs:
            a merge schedule ``r`` (an int, one int per block or ``(r, inflection)``); None for none.
            A model already patched with token merging keeps its schedule in the copy.

    Returns:
        An :class:`InferenceModel`; ``model`` itself is left unchanged (bf16, int8 and token
        merging use copies).

    Raises:
        ValueError: An unknown precision, or int8 on a GPU.

    Example:
        >>> fast = prepare_for_inference(model, precision="bf16")
        >>> logits = fast(images)  # float32 logits
    """
    if device is None:
        device = next(model.parameters(), torch.empty(0)).device
    device = torch.device(device)
    _check_precision(precision, device)
    model = model.to(device).eval()
    if precision == "int8":
        run = quantize_int8(model)
    elif precision == "bf16":
        run = copy.deepcopy(model).to(torch.bfloat16)
    else:
        run = copy.deepcopy(model) if tome is not None else model
    if run is not model:
        _patch_copy(model, run, tome)
    return InferenceModel(run, model, precision, compile)


def _patch_copy(model: nn.Module, run: nn.Module, tome: Any) -> None:
    """Token merging on the copy ``run``: ``tome``'s schedule, or the one ``model`` is patched with.

    A deep copy of a patched model still holds the patched forwards of the original's blocks
    (closures over them), so the copy is unpatched and patched again on its own blocks.
    """
    from ..components.tome import apply_tome, remove_tome

    state = model.__dict__.get("_tome_state")
    remove_tome(run)
    if tome is not None:
        apply_tome(run, tome)
    elif state is not None:
        apply_tome(run, state.r, state.prop_attn, state.trace_source)


__all__ = ["InferenceModel", "PRECISIONS", "prepare_for_inference", "quantize_int8"]
