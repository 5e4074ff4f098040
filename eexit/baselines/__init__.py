"""Baselines evaluated on the same backbone, cost table and metrics as JEI-DNN (reference/jei-dnn.md §7)."""

from eexit.baselines.thresholds import (
    SCORES,
    OperatingPoint,
    apply_thresholds,
    budgeted_curve,
    fit_budgeted_thresholds,
    geometric_exit_distribution,
    margin,
    max_probability,
    negative_entropy,
)

__all__ = [
    "SCORES",
    "OperatingPoint",
    "apply_thresholds",
    "budgeted_curve",
    "fit_budgeted_thresholds",
    "geometric_exit_distribution",
    "margin",
    "max_probability",
    "negative_entropy",
]
