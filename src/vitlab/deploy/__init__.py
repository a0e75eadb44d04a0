"""Deployment: inference precisions and compilation, ONNX export checked in onnxruntime."""

from .inference import PRECISIONS, InferenceModel, prepare_for_inference, quantize_int8
from .onnx_export import (EXPORT_FORMATS, ExportResult, OnnxRuntimeModel, check_onnx, export_model, export_onnx,
                          onnx_metadata, read_onnx_metadata)

__all__ = [
    "EXPORT_FORMATS", "ExportResult", "InferenceModel", "OnnxRuntimeModel", "PRECISIONS", "check_onnx",
    "export_model", "export_onnx", "onnx_metadata", "prepare_for_inference", "quantize_int8", "read_onnx_metadata",
]
