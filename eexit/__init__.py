"""eexit: turn a pretrained vision backbone into an early-exit network.

Exits (small classifiers, "IMs") and learned exit gates are hooked onto a timm or transformers vision
transformer without editing it, trained with the JEI-DNN objective (Regol, Chataoui & Coates, ICLR 2024), and
at inference each sample really stops computing at its exit.

>>> ee = eexit.attach(model)                       # doctest: +SKIP
>>> eexit.fit(ee, train_loader, val_loader, lam=0.5)  # doctest: +SKIP
>>> out = ee(images); out.logits, out.exit_index, out.cost  # doctest: +SKIP
"""

from __future__ import annotations

from ._timm_models import install as _install_timm_models
from ._version import __version__
from .attaching import attach, detach, from_pretrained
from .backbones.base import list_specs, register_spec
from .backbones.generic import GenericSpec
from .config import ExitConfig, FitConfig
from .errors import (
    AdapterError,
    BackboneError,
    EexitError,
    EexitTypeError,
    EexitValueError,
    SegmentsUnavailable,
    TrainingError,
)
from .evaluation import EvaluationReport, evaluate
from .inference import ExitPolicy, FixedExitPolicy, GatePolicy, ThresholdPolicy
from .model import AllExitsOutput, EarlyExitModel, EarlyExitOutput
from .train import fit

_install_timm_models()  # timm.create_model("t2t_vit_14") works once timm is imported; timm is not imported here

__all__ = [
    "AdapterError",
    "AllExitsOutput",
    "BackboneError",
    "EarlyExitModel",
    "EarlyExitOutput",
    "EexitError",
    "EexitTypeError",
    "EexitValueError",
    "EvaluationReport",
    "ExitConfig",
    "ExitPolicy",
    "FitConfig",
    "FixedExitPolicy",
    "GatePolicy",
    "GenericSpec",
    "SegmentsUnavailable",
    "ThresholdPolicy",
    "TrainingError",
    "__version__",
    "attach",
    "detach",
    "evaluate",
    "fit",
    "from_pretrained",
    "list_specs",
    "register_spec",
]
