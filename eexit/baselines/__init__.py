"""Baselines evaluated on the same backbone, cost table and metrics as JEI-DNN (reference/jei-dnn.md §7).

* confidence thresholds fitted by the MSDNet budgeted-batch protocol (:func:`budgeted_curve`);
* per-exit thresholds tuned on validation by coordinate descent (:func:`tune_thresholds`), the strongest
  simple baseline;
* BoostedNet (:func:`train_boosted`): each IM learns the residual of the ensemble before it;
* L2W-DEN (:func:`train_l2w`): a meta-learned network weights each sample's per-exit losses.

BoostedNet and L2W-DEN train the IMs of an attached model on cached features of its frozen backbone; both are
then evaluated with budgeted thresholds, BoostedNet on its ensemble logits (:meth:`BoostedNet.logits`).
"""

from eexit.baselines.boosted import BoostedNet, boosted_logits, train_boosted
from eexit.baselines.l2w import L2WResult, WeightNet, l2w_weights, train_l2w
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
from eexit.baselines.tuned import DEFAULT_PRICES, tune_thresholds, tuned_threshold_curve

__all__ = [
    "DEFAULT_PRICES",
    "SCORES",
    "BoostedNet",
    "L2WResult",
    "OperatingPoint",
    "WeightNet",
    "apply_thresholds",
    "boosted_logits",
    "budgeted_curve",
    "fit_budgeted_thresholds",
    "geometric_exit_distribution",
    "l2w_weights",
    "margin",
    "max_probability",
    "negative_entropy",
    "train_boosted",
    "train_l2w",
    "tune_thresholds",
    "tuned_threshold_curve",
]
