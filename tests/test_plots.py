"""Figures: each is saved where asked and returned; bad inputs are refused with a clear message."""

from __future__ import annotations

import pytest
import torch
from matplotlib.figure import Figure

from eexit.errors import EexitValueError
from eexit.plots import plot_accuracy_cost, plot_exit_histogram, plot_per_exit_accuracy, plot_reliability


def _logits(n: int = 50, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=g) * 3, torch.randint(0, 4, (n,), generator=g)


def test_reliability_one_panel_per_method(tmp_path):
    path = tmp_path / "sub" / "rel.png"
    fig = plot_reliability({"a": _logits(), "b": _logits(seed=1)}, path, binning="mass", n_bins=5)
    assert isinstance(fig, Figure) and len(fig.axes) == 2
    assert path.stat().st_size > 1000
    assert "ECE" in fig.axes[0].get_title()


def test_exit_histogram_and_per_exit_accuracy(tmp_path):
    fig = plot_exit_histogram({"a": [0.5, 0.3, 0.2], "b": [0.1, 0.1, 0.8]}, tmp_path / "h.png")
    assert len(fig.axes[0].patches) == 6
    assert (tmp_path / "h.png").exists()
    fig = plot_per_exit_accuracy({"a": [0.5, float("nan"), 0.9]}, tmp_path / "acc.png", exit_labels=["1", "2", "head"])
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["1", "2", "head"]
    fig = plot_accuracy_cost({"a": [(2.0, 0.7), (1.0, 0.5)]}, None, reference=(3.0, 0.9))
    [line] = fig.axes[0].get_lines()
    assert list(line.get_xdata()) == [1.0, 2.0] and list(line.get_ydata()) == [50.0, 70.0]  # sorted by cost, in %
    [star] = fig.axes[0].collections
    assert star.get_offsets().tolist() == [[3.0, 90.0]]
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == ["a", "full backbone"]


def test_plots_refuse_bad_input():
    with pytest.raises(EexitValueError, match="non-empty mapping"):
        plot_exit_histogram({})
    with pytest.raises(EexitValueError, match="same length"):
        plot_exit_histogram({"a": [0.5, 0.5], "b": [1.0]})
    with pytest.raises(EexitValueError, match="labels"):
        plot_per_exit_accuracy({"a": [0.5, 0.5]}, exit_labels=["x"])
    with pytest.raises(EexitValueError, match="labels"):
        plot_reliability({"a": (torch.randn(3, 2), torch.tensor([0, 1, 5]))})
