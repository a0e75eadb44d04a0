"""The benchmark harness: throughput, latency, FLOPs, memory and agreement of every inference mode.

An application on top of :mod:`vitlab.deploy` (the inference modes and ONNX export), in the
layer order next to the CLI. Modules: :mod:`.harness` (:func:`benchmark`), :mod:`.measure`
(timing, matrix-multiply peak, memory, machine), :mod:`.modes` (mode table, models,
references, agreement data) and :mod:`.report` (results as Markdown / CSV / JSON).

:func:`benchmark` (and ``vitlab benchmark``) measures, for each model and mode:

- throughput: images/s at ``batch_size``, the median of ``repeats`` timed calls after warm-up;
- latency at batch 1: p50 and p95 of ``latency_repeats`` timed calls;
- parameters and GFLOPs per image (attention included: counted on the explicit path, since
  PyTorch's FlopCounterMode does not see the CPU flash-attention kernel);
- peak memory: the model's state plus the peak of what one call allocates (torch's profiler
  on the CPU, the CUDA allocator's statistics on a GPU);
- achieved GFLOP/s and its fraction of the matrix-multiply peak of the mode's compute dtype,
  measured in the same run: the fastest of a few large GEMMs (:func:`find_peak_gemm`) is
  timed again in every round next to the models, and the peak is its best median;
- agreement with float32 eager: the largest absolute logit difference and the top-1
  agreement, on ``agreement_data`` (e.g. the digits test set for a digits-trained model) or
  else on the timing batch.

Modes are timed interleaved (one call of each mode per round), so a load change on a shared
machine hits every mode alike. ``train=True`` adds forward + backward + AdamW-step
throughput in float32 and bf16 autocast, each with and without gradient checkpointing.
``reference="hf"`` / ``"timm"`` times the same architecture from Hugging Face transformers
or timm (random weights) in the same rounds.
"""

from .harness import BenchmarkSettings, apply_peaks, benchmark, benchmark_model, benchmark_training
from .measure import PeakGemm, find_peak_gemm, machine_info, measure_matmul_peak, module_bytes, peak_allocated_bytes
from .modes import DEFAULT_MODES, MODE_SPECS, MODES, REFERENCES, TRAIN_MODES, digits_agreement_data, reference_model
from .report import BenchmarkReport, BenchmarkResult

__all__ = [
    "BenchmarkReport", "BenchmarkResult", "BenchmarkSettings", "DEFAULT_MODES", "MODES", "MODE_SPECS", "REFERENCES",
    "TRAIN_MODES",
    "PeakGemm", "apply_peaks", "benchmark", "benchmark_model", "benchmark_training", "digits_agreement_data",
    "find_peak_gemm", "machine_info", "measure_matmul_peak", "module_bytes", "peak_allocated_bytes", "reference_model",
]
