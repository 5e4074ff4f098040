"""Matplotlib figures of early-exit results, saved to files and returned.

The accuracy-cost curve, reliability diagrams, exit histograms and per-exit accuracy: the figures of the
JEI-DNN evaluation (Regol et al., ICLR 2024; ``reference/jei-dnn.md`` §5.2), computed with :mod:`eexit.metrics`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from torch import Tensor

from .errors import EexitValueError
from .metrics import Binning, expected_calibration_error, reliability_bins

__all__ = ["plot_accuracy_cost", "plot_exit_histogram", "plot_per_exit_accuracy", "plot_reliability"]


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


def _figure(width: float = 6.0, height: float = 4.2, ncols: int = 1):
    """A figure outside pyplot's registry (nothing to close, no global state), and its axes."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=120)
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    return fig, list(axes)


def _save(fig, path: str | Path | None):
    fig.tight_layout()
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path)
    return fig


def _check_methods(name: str, methods: Mapping[str, object]) -> None:
    if not isinstance(methods, Mapping) or not methods:
        raise EexitValueError(
            f"{name}: expected a non-empty mapping method name -> values, got {methods!r}. "
            "Fix: pass e.g. {'JEI-DNN': ...}."
        )


def plot_reliability(
    methods: Mapping[str, tuple[Tensor, Tensor]],
    path: str | Path | None = None,
    *,
    n_bins: int = 15,
    binning: Binning = "width",
    title: str = "Reliability",
):
    """Reliability diagrams: accuracy against mean confidence per bin, one panel per method, ECE in the title.

    Bins come from :func:`eexit.metrics.reliability_bins` (one softmax of the logits, the same bins as the ECE).

    Args:
        methods: method name -> (logits ``[N, C]`` of the exit each sample took, labels ``[N]``).
        path: where to save the PNG; ``None`` only returns the figure.
        n_bins, binning: the binning (``"width"`` or ``"mass"``), as :func:`eexit.metrics.expected_calibration_error`.
        title: the figure's title.

    Returns:
        The matplotlib ``Figure``.
    """
    _check_methods("methods", methods)
    fig, axes = _figure(3.0 * len(methods) + 0.4, 3.4, len(methods))
    for ax, (name, (logits, labels)) in zip(axes, methods.items()):
        bins = reliability_bins(logits, labels, n_bins=n_bins, binning=binning)
        ece = expected_calibration_error(logits, labels, n_bins=n_bins, binning=binning)
        used = bins.count > 0
        lo, hi = bins.edges[:-1][used].numpy(), bins.edges[1:][used].numpy()
        ax.bar(lo, bins.accuracy[used].numpy(), width=hi - lo, align="edge", alpha=0.6, edgecolor="k", lw=0.5)
        ax.plot(bins.confidence[used].numpy(), bins.accuracy[used].numpy(), "o", ms=3, c="C1", label="bin means")
        ax.plot([0, 1], [0, 1], "k--", lw=0.8, label="perfect calibration")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("confidence (max softmax)")
        ax.set_title(f"{name}\nECE {100 * ece:.1f} % ({binning}, {n_bins} bins)", fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy")
    axes[0].legend(fontsize=7, loc="upper left")
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def _per_exit_axis(
    name: str, series: Mapping[str, Sequence[float]], exit_labels: Sequence[str] | None
) -> tuple[int, list[str]]:
    """Check one equal-length, non-empty per-exit series per method; return E and the E tick labels."""
    _check_methods(name, series)
    lengths = {len(v) for v in series.values()}
    if len(lengths) != 1 or 0 in lengths:
        raise EexitValueError(
            f"{name}: expected one non-empty list per method, all of the same length (one value per exit), got "
            f"lengths {sorted(lengths)}. Fix: pass every method's per-exit values for the same model."
        )
    num_exits = lengths.pop()
    labels = list(exit_labels) if exit_labels is not None else [str(k + 1) for k in range(num_exits)]
    if len(labels) != num_exits:
        raise EexitValueError(f"exit_labels: expected {num_exits} labels, got {len(labels)}.")
    return num_exits, labels


def plot_exit_histogram(
    rates: Mapping[str, Sequence[float]],
    path: str | Path | None = None,
    *,
    exit_labels: Sequence[str] | None = None,
    title: str = "Where samples exit",
):
    """Grouped bars of the fraction of samples leaving at each exit, one colour per method.

    Args:
        rates: method name -> fraction of samples per exit (``EvaluationReport.exit_rates``), all of length E.
        path: where to save the PNG; ``None`` only returns the figure.
        exit_labels: E tick labels (default: 1..E, the last marked "head").

    Returns:
        The matplotlib ``Figure``.
    """
    num_exits, labels = _per_exit_axis("rates", rates, exit_labels)
    fig, (ax,) = _figure()
    width = 0.8 / len(rates)
    for i, (name, r) in enumerate(rates.items()):
        xs = [k - 0.4 + width * (i + 0.5) for k in range(num_exits)]
        ax.bar(xs, [100 * v for v in r], width=width, label=name)
    ax.set_xticks(range(num_exits), labels)
    ax.set_xlabel("exit")
    ax.set_ylabel("samples exiting (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_per_exit_accuracy(
    accuracies: Mapping[str, Sequence[float]],
    path: str | Path | None = None,
    *,
    exit_labels: Sequence[str] | None = None,
    title: str = "Accuracy of each exit (all test samples)",
):
    """Accuracy of every exit, one line per method (e.g. ``EvaluationReport.exit_accuracy_all``).

    NaN entries (an exit no sample took, in ``exit_accuracy_exited``) leave a gap in the line.

    Args:
        accuracies: method name -> accuracy per exit in [0, 1], all of length E.
        path: where to save the PNG; ``None`` only returns the figure.
        exit_labels: E tick labels (default: 1..E).

    Returns:
        The matplotlib ``Figure``.
    """
    num_exits, labels = _per_exit_axis("accuracies", accuracies, exit_labels)
    fig, (ax,) = _figure()
    markers = "osD^vP*X"
    for i, (name, acc) in enumerate(accuracies.items()):
        ax.plot(range(num_exits), [100 * float(a) for a in acc], marker=markers[i % len(markers)], ms=4, label=name)
    ax.set_xticks(range(num_exits), labels)
    ax.set_xlabel("exit")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)
