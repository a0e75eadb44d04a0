"""Writing figures: the one helper that both the attention analysis and the attention maps
use (it sits below :mod:`.analysis` and :mod:`.visualization`, so neither imports the other
for it)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..tasks.plots import _pyplot

__all__ = ["save_figure"]


def save_figure(fig: Any, path: str | Path) -> Path:
    """Write a figure as PNG (folders created) and close it.

    Args:
        fig: A matplotlib figure.
        path: Where to write it.

    Returns:
        The path written.
    """
    plt = _pyplot()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, format="png")
    plt.close(fig)
    return path
