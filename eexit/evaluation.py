"""evaluate(): the honest report of an early-exit model on a dataset.

Every number comes from one pass over the whole loader: each exit's logits are collected once, the exit
decisions are replayed with the same policy the early-exit forward uses (a test proves both agree), and the
metrics in :mod:`eexit.metrics` are computed once on the whole set (not averaged over mini-batches, and from a
single softmax: the two bugs of the original evaluation, ``reference/jei-dnn.md`` §5.4).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from . import metrics
from .data import FeatureCache, check_labels, check_loader, unpack_batch
from .errors import EexitTypeError, EexitValueError
from .inference import ExitPolicy, decide_exits
from .model import EarlyExitModel

__all__ = ["CollectedOutputs", "EvaluationReport", "collect_outputs", "evaluate", "evaluate_outputs", "mean_costs"]


@dataclass
class CollectedOutputs:
    """Every exit's logits, the gate logits and the labels of a whole dataset."""

    logits: torch.Tensor  # [E, N, C]
    gate_logits: torch.Tensor  # [E-1, N]
    labels: torch.Tensor  # [N]
    #: Graph backbones: each sample's FLOPs at every exit ``[N, E]`` and of the bare backbone ``[N]`` (float64),
    #: since a graph's cost grows with its size; ``None`` where every sample costs the cost table's (images, and
    #: graphs read from the disk feature cache, which keeps no graph sizes).
    sample_flops: torch.Tensor | None = None
    backbone_flops: torch.Tensor | None = None


def mean_costs(ee: EarlyExitModel, out: CollectedOutputs, taken: torch.Tensor) -> tuple[float, float]:
    """(mean FLOPs per sample at the exits ``taken``, mean FLOPs of the bare backbone on the same samples).

    Graphs collected with their sizes pay each their own cost (the fraction is of the same graphs' full cost);
    otherwise every sample costs the cost table's.
    """
    if out.sample_flops is not None and out.backbone_flops is not None:
        rows = torch.arange(taken.shape[0], device=out.sample_flops.device)
        return float(out.sample_flops[rows, taken.to(rows.device)].mean()), float(out.backbone_flops.mean())
    return metrics.expected_cost(taken, ee.cost_table.exit_flops), ee.cost_table.backbone_flops


@torch.no_grad()
def collect_outputs(
    ee: EarlyExitModel,
    source: Iterable[Any] | FeatureCache | CollectedOutputs,
    progress: bool = False,
    batch_size: int = 1024,
    name: str = "loader",
) -> CollectedOutputs:
    """Every exit's logits and gate logits, with the labels, of a whole dataset: the one way eexit collects them.

    Args:
        ee: the attached model.
        source: a loader of ``(images, labels)`` (or dicts; labels checked against the model's classes), in which
            case the backbone runs once over it; a :class:`~eexit.data.FeatureCache` of the frozen backbone's exit
            features, in which case only the exits run (what sweeps and baselines do on every epoch or λ); or
            outputs already collected, returned as they are.
        progress: show a progress bar over the loader.
        batch_size: mini-batch size when reading a feature cache.
        name: what the caller calls ``source``, for error messages.
    """
    if isinstance(source, CollectedOutputs):
        return source
    was_training = ee.training
    ee.eval()
    logits, gates, labels, flops, bare = [], [], [], [], []
    try:
        if isinstance(source, FeatureCache):
            for feats, final, _ in source.batches(batch_size, shuffle=False):
                out = ee.outputs_from_features(feats, final)
                logits.append(out.logits.float().cpu())  # [E, b, C]
                gates.append(out.gate_logits.float().cpu())  # [E-1, b]
            labels.append(source.labels.cpu())
            if source.sample_flops is not None and source.backbone_flops is not None:
                flops.append(source.sample_flops.cpu())
                bare.append(source.backbone_flops.cpu())
        else:
            if not isinstance(source, Iterable):
                raise EexitTypeError(
                    f"{name} must be a DataLoader (any iterable of (images, labels) batches), a FeatureCache or "
                    f"CollectedOutputs; got {type(source).__name__}."
                )
            check_loader(source, name)
            device = next(ee.parameters()).device
            for batch in tqdm(source, desc="evaluating", disable=not progress, leave=False):
                images, y = unpack_batch(batch)
                labels.append(check_labels(y, ee.num_classes).cpu())
                out = ee(images.to(device), all_exits=True)
                logits.append(out.logits.float().cpu())
                gates.append(out.gate_logits.float().cpu())
                if ee.cost_table is not None and ee.cost_table.per_sample:
                    sample, backbone = ee.sample_costs(images)
                    flops.append(sample.cpu())
                    bare.append(backbone.cpu())
    finally:
        ee.train(was_training)
    if not logits:
        raise EexitValueError("the loader yielded no batch (or the cache is empty); at least one sample is needed.")
    return CollectedOutputs(
        torch.cat(logits, dim=1),
        torch.cat(gates, dim=1),
        torch.cat(labels),
        torch.cat(flops) if flops else None,
        torch.cat(bare) if bare else None,
    )


@dataclass
class EvaluationReport:
    """What :func:`evaluate` measured. Costs are per sample; fractions are of the bare backbone's FLOPs."""

    num_samples: int
    accuracy: float
    mean_gflops: float
    mean_gmacs: float
    cost_fraction: float
    backbone_accuracy: float
    backbone_gflops: float
    exit_rates: list[float]
    exit_accuracy_all: list[float]
    exit_accuracy_exited: list[float]
    ece_width: float
    ece_mass: float
    conformal: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_markdown(self) -> str:
        """A small results table plus the exit histogram, for model cards and notes."""
        rows = [
            "| metric | value |",
            "|---|---|",
            f"| accuracy | {100 * self.accuracy:.2f} % |",
            f"| mean cost | {self.mean_gflops:.4g} GFLOPs ({100 * self.cost_fraction:.1f} % of the backbone) |",
            f"| backbone alone | {100 * self.backbone_accuracy:.2f} % at {self.backbone_gflops:.4g} GFLOPs |",
            f"| ECE (15 bins, equal width / equal mass) | {100 * self.ece_width:.2f} / {100 * self.ece_mass:.2f} % |",
        ]
        if self.conformal:
            c = self.conformal
            rows.append(
                f"| conformal coverage at α={c['alpha']} | {100 * c['coverage']:.1f} % (mean set size "
                f"{c['mean_set_size']:.2f}) |"
            )
        rows.append(f"| samples | {self.num_samples} |")
        hist = " / ".join(f"{100 * r:.0f}" for r in self.exit_rates)
        return "\n".join(rows) + f"\n\nExit histogram (% of samples per exit): {hist}\n"


def evaluate(
    ee: EarlyExitModel,
    loader: Iterable[Any],
    *,
    policy: ExitPolicy | None = None,
    calibration_loader: Iterable[Any] | None = None,
    alpha: float = 0.1,
    progress: bool = False,
) -> EvaluationReport:
    """Evaluate an early-exit model on a whole dataset.

    Args:
        ee: the attached (and usually trained) model.
        loader: test data, ``(images, labels)`` or dicts.
        policy: the exit policy (default: the gates with ``ee.config.threshold``).
        calibration_loader: held-out data to calibrate split-conformal prediction sets per exit; when given,
            the report includes empirical coverage and mean set size at level ``alpha``.
        alpha: conformal miscoverage level in (0, 1).
        progress: show a progress bar.

    Returns:
        An :class:`EvaluationReport`. The model is not changed: to save the report with the adapter (its model
        card shows it), store it yourself with ``ee.evaluation = report.to_dict()`` before ``save_pretrained``.
    """
    if not 0.0 < alpha < 1.0:
        raise EexitValueError(f"alpha must be in (0, 1), got {alpha}.")
    policy = ee._check_policy(policy)
    out = collect_outputs(ee, loader, progress)
    calibration = None
    if calibration_loader is not None:
        cal = collect_outputs(ee, calibration_loader, progress, name="calibration_loader")
        calibration = (cal, decide_exits(cal.logits, cal.gate_logits, policy))
    taken = decide_exits(out.logits, out.gate_logits, policy)  # [N]
    return evaluate_outputs(ee, out, taken, calibration=calibration, alpha=alpha)


def evaluate_outputs(
    ee: EarlyExitModel,
    out: CollectedOutputs,
    taken: torch.Tensor,
    *,
    calibration: tuple[CollectedOutputs, torch.Tensor] | None = None,
    alpha: float = 0.1,
) -> EvaluationReport:
    """The report of :func:`evaluate` from outputs already collected and exits already decided.

    For methods whose exits are not the gates' (confidence thresholds, BoostedNet's ensemble logits): pass
    their logits in ``out`` and the exit each sample takes; costs come from ``ee.cost_table`` (graphs: from each
    graph's own cost, ``out.sample_flops``, when the outputs were collected from a loader or an in-memory
    :class:`~eexit.data.FeatureCache`; the disk cache keeps no graph sizes).

    Args:
        ee: the model (for the cost table and whether the last exit is the backbone's head).
        out: every exit's logits ``[E, N, C]`` and the labels on the evaluated split.
        taken: the exit of each sample ``[N]``.
        calibration: (outputs, exits) on a held-out split to calibrate split-conformal sets per exit.
        alpha: conformal miscoverage level in (0, 1).
    """
    if not 0.0 < alpha < 1.0:
        raise EexitValueError(f"alpha must be in (0, 1), got {alpha}; e.g. alpha=0.1 for 90 % coverage.")
    n = out.labels.shape[0]
    chosen = out.logits[taken, torch.arange(n)]  # [N, C]
    mean_flops, backbone_flops = mean_costs(ee, out, taken)
    per_exit = metrics.per_exit_accuracy(out.logits, out.labels, taken)
    conformal = None
    if calibration is not None:
        cal, cal_taken = calibration
        qhat = metrics.conformal_calibrate(cal.logits, cal.labels, cal_taken, alpha)
        sets = metrics.conformal_sets(chosen, taken, qhat)
        coverage, size = metrics.conformal_coverage_and_size(sets, out.labels)
        conformal = {"alpha": alpha, "coverage": coverage, "mean_set_size": size, "qhat": qhat.tolist()}
    return EvaluationReport(
        num_samples=n,
        accuracy=metrics.accuracy(chosen, out.labels),
        mean_gflops=mean_flops / 1e9,
        mean_gmacs=mean_flops / 2e9,
        cost_fraction=mean_flops / backbone_flops,
        backbone_accuracy=metrics.accuracy(out.logits[-1], out.labels) if ee.has_backbone_head else float("nan"),
        backbone_gflops=backbone_flops / 1e9,
        exit_rates=metrics.exit_rates(taken, ee.num_exits).tolist(),
        exit_accuracy_all=per_exit.on_all.tolist(),
        exit_accuracy_exited=per_exit.on_exited.tolist(),
        ece_width=metrics.expected_calibration_error(chosen, out.labels, 15, "width"),
        ece_mass=metrics.expected_calibration_error(chosen, out.labels, 15, "mass"),
        conformal=conformal,
    )
