"""Training curves and confusion matrices as PNG files; they live in :mod:`vitlab.tasks.plots`
(a task draws the plots of its run, below the training engine)."""

from ..tasks.plots import _pyplot, plot_confusion_matrix, plot_curves

__all__ = ["_pyplot", "plot_confusion_matrix", "plot_curves"]
