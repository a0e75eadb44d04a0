"""Evaluation and analysis: FLOPs, the benchmark harness, explainability and attention analysis."""

from .benchmark import BenchmarkReport, BenchmarkResult, benchmark, measure_matmul_peak
from .flops import count_flops

__all__ = ["BenchmarkReport", "BenchmarkResult", "benchmark", "count_flops", "measure_matmul_peak"]

# Explainability and attention analysis (issue 5).
from .analysis import analyze_attention, attention_entropy, mean_attention_distance, plot_attention_analysis
from .explain import METHODS as EXPLAIN_METHODS, explain, explain_all, run_explain
from .interpretation import (
    Explanation, FeatureView, attention_rollout, feature_maps, grad_cam, gradient_rollout, gradient_weighted_attention,
    occlusion, pca_features,
    prepare_image, rollout, saliency, spearman_correlation,
)
from .layouts import AttentionLayer, TokenGrid, attention_layers
from .visualization import AttentionMaps, AttentionVisualizer, LayerMap, plot_attention_maps

__all__ += [
    "AttentionLayer", "AttentionMaps", "AttentionVisualizer", "EXPLAIN_METHODS", "Explanation", "FeatureView",
    "LayerMap", "TokenGrid", "analyze_attention", "attention_entropy", "attention_layers", "attention_rollout",
    "explain", "explain_all", "feature_maps", "grad_cam", "gradient_rollout", "gradient_weighted_attention",
    "mean_attention_distance",
    "occlusion", "pca_features", "plot_attention_analysis", "plot_attention_maps", "prepare_image", "rollout",
    "run_explain", "saliency", "spearman_correlation",
]
