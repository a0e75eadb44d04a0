"""Evaluation and analysis: FLOPs (metrics, benchmarks and explainability come with later issues)."""

from .flops import count_flops

__all__ = ["count_flops"]
