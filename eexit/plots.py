"""Matplotlib figures of early-exit results, saved to files and returned."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

__all__ = ["plot_accuracy_cost"]


def plot_accuracy_cost(
    curves: Mapping[str, Sequence[tuple[float, float]]],
    path: str | Path | None = None,
    *,
    reference: tuple[float, float] | None = None,
    title: str = "Accuracy vs cost",
    xlabel: str = "mean GFLOPs per image",
):
    """Accuracy against mean cost, one line per method.

    Args:
        curves: method name -> (cost, accuracy) points; accuracies in [0, 1].
        path: where to save the PNG (parent folders are created); ``None`` only returns the figure.
        reference: (cost, accuracy) of the full backbone, drawn as a star.

    Returns:
        The matplotlib ``Figure``.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.2), dpi=120)
    markers = "osD^vP*X"
    for i, (name, points) in enumerate(curves.items()):
        pts = sorted(points)
        ax.plot(
            [c for c, _ in pts], [100 * a for _, a in pts], marker=markers[i % len(markers)], ms=4, lw=1.2, label=name
        )
    if reference is not None:
        ax.scatter([reference[0]], [100 * reference[1]], marker="*", s=160, c="k", zorder=5, label="full backbone")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path)
    return fig
