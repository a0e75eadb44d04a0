"""Evaluation and analysis: FLOPs, explainability and attention analysis.

The benchmark harness is :mod:`vitlab.benchmark` (it sits above :mod:`vitlab.deploy`).
"""

from ..models.flops import count_flops

__all__ = ["count_flops"]

# Explainability and attention analysis (issue 5).
from .analysis import analyze_attention, attention_entropy, mean_attention_distance, plot_attention_analysis
from .explain import METHODS as EXPLAIN_METHODS, explain, explain_all, run_explain
from .interpretation import (
    Explanation, FeatureView, attention_rollout, feature_maps, grad_cam, gradient_rollout, gradient_weighted_attention,
    occlusion, pca_features,
    prepare_image, rollout, saliency, spearman_correlation,
)
from .layouts import AttentionLayer, TokenGrid, attention_layers
from .registers import plot_register_comparison, register_report, token_norms
from .visualization import AttentionMaps, AttentionVisualizer, LayerMap, plot_attention_maps

__all__ += [
    "AttentionLayer", "AttentionMaps", "AttentionVisualizer", "EXPLAIN_METHODS", "Explanation", "FeatureView",
    "LayerMap", "TokenGrid", "analyze_attention", "attention_entropy", "attention_layers", "attention_rollout",
    "explain", "explain_all", "feature_maps", "grad_cam", "gradient_rollout", "gradient_weighted_attention",
    "mean_attention_distance",
    "occlusion", "pca_features", "plot_attention_analysis", "plot_attention_maps", "plot_register_comparison",
    "prepare_image", "register_report", "rollout", "run_explain", "saliency", "spearman_correlation", "token_norms",
]
