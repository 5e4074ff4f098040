"""eexit: turn a pretrained vision backbone into an early-exit network.

Exits (small classifiers, "IMs") and learned exit gates are hooked onto a timm or transformers vision
transformer without editing it, trained with the JEI-DNN objective (Regol, Chataoui & Coates, ICLR 2024), and
at inference each sample really stops computing at its exit.

>>> ee = eexit.attach(model)                       # doctest: +SKIP
>>> eexit.fit(ee, train_loader, val_loader, lam=0.5)  # doctest: +SKIP
>>> out = ee(images); out.logits, out.exit_index, out.cost  # doctest: +SKIP
"""

from __future__ import annotations

__version__ = "0.1.0.dev0"

from .attach import attach, detach
from .backbones.base import list_specs, register_spec
from .backbones.generic import GenericSpec
from .config import ExitConfig, FitConfig
from .errors import EexitError
from .evaluate import EvaluationReport, evaluate
from .hub import from_pretrained
from .model import AllExitsOutput, EarlyExitModel, EarlyExitOutput
from .train import fit

__all__ = [
    "AllExitsOutput",
    "EarlyExitModel",
    "EarlyExitOutput",
    "EexitError",
    "EvaluationReport",
    "ExitConfig",
    "FitConfig",
    "GenericSpec",
    "__version__",
    "attach",
    "detach",
    "evaluate",
    "fit",
    "from_pretrained",
    "list_specs",
    "register_spec",
]
