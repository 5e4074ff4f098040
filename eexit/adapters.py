"""Named adapters: the typed record of one adapter, and the set of adapters one model holds.

An :class:`~eexit.EarlyExitModel` holds one *active* adapter, live in its heads and gates, and any number of
stored ones (PEFT's ``add_adapter`` / ``set_adapter`` / ``load_adapter``). Each is an :class:`AdapterRecord`:
its tensors, how it was trained, how it scored, and the gate threshold it runs with. The file format and the Hub
see adapters only as such snapshots (:meth:`~eexit.EarlyExitModel.adapter_record`), never the model's insides.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from .config import FitConfig
from .errors import EexitValueError

__all__ = ["AdapterRecord", "AdapterSet", "check_adapter_name"]


def check_adapter_name(name: object, error: type[Exception] = EexitValueError) -> str:
    """Refuse a name that could not be saved as a subfolder (``save_pretrained(selected_adapters=...)`` writes
    every adapter but ``"default"`` to a folder of its name), so that a bad name fails when it is given, not at
    the first save."""
    if not isinstance(name, str) or not name:
        raise error(f"an adapter name must be a non-empty string, got {name!r}.")
    if name in (".", "..") or "/" in name or "\\" in name or name != name.strip():
        raise error(
            f"adapter name {name!r} cannot be a folder name (it is saved as a subfolder); use letters, digits, "
            "'-', '_' or '.', e.g. 'lam_0.1'."
        )
    return name


@dataclass
class AdapterRecord:
    """One adapter: everything ``save_pretrained`` writes besides what the model itself describes.

    Attributes:
        state: IM and gate tensors under ``heads.{l}.*`` / ``gates.{l}.*``.
        fit_config: the settings :func:`eexit.fit` trained it with (``None`` if it was not trained by fit).
        history: fit's per-epoch record.
        evaluation: a stored :class:`~eexit.evaluation.EvaluationReport` as a dict (``None`` if none was kept).
        threshold: the gate threshold τ it runs with (``None``: the model's configured one).
        boosted: for IMs trained as a BoostedNet ensemble, ``{"gamma": γ, "boost_head": bool}``, what predicting
            with them needs (:meth:`eexit.baselines.BoostedNet.from_model`); ``None`` otherwise.
    """

    state: dict[str, torch.Tensor]
    fit_config: FitConfig | None = None
    history: list[dict[str, float]] = field(default_factory=list)
    evaluation: dict[str, Any] | None = None
    threshold: float | None = None
    boosted: dict[str, Any] | None = None

    @classmethod
    def coerce(cls, record: AdapterRecord | Mapping[str, Any]) -> AdapterRecord:
        """An :class:`AdapterRecord` from itself or from the dict form ``{"state": ..., "fit_config": ...}``."""
        if isinstance(record, AdapterRecord):
            return record
        if not isinstance(record, Mapping) or "state" not in record:
            raise EexitValueError(
                "an adapter record must be an AdapterRecord or a dict with at least 'state', got "
                f"{type(record).__name__}."
            )
        unknown = sorted(set(record) - {"state", "fit_config", "history", "evaluation", "threshold", "boosted"})
        if unknown:
            raise EexitValueError(f"unknown adapter record fields {unknown}; AdapterRecord has no such fields.")
        threshold = record.get("threshold")
        return cls(
            state=dict(record["state"]),
            fit_config=record.get("fit_config"),
            history=list(record.get("history") or []),
            evaluation=record.get("evaluation"),
            threshold=float(threshold) if threshold is not None else None,
            boosted=record.get("boosted"),
        )


class AdapterSet:
    """The adapters of one model: the active one's name and the stored (inactive) records.

    The active adapter's record is not kept here: its tensors live in the model's heads and gates, and the model
    builds its snapshot on demand. Names are checked once, when an adapter enters the set.
    """

    def __init__(self, active: str = "default") -> None:
        self.active = check_adapter_name(active)
        self._stored: dict[str, AdapterRecord] = {}

    @property
    def names(self) -> list[str]:
        """Every adapter's name, the active one included, sorted."""
        return sorted({self.active, *self._stored})

    def __contains__(self, name: object) -> bool:
        return name == self.active or name in self._stored

    def check_new(self, name: object, error: type[Exception] = EexitValueError) -> str:
        """``name`` if it is a valid name not used yet; else the error saying which."""
        check_adapter_name(name, error)
        if name in self:
            raise error(f"an adapter named {name!r} exists already; names here: {self.names}.")
        return name  # type: ignore[return-value]

    def store(self, name: str, record: AdapterRecord) -> None:
        """Keep ``record`` under ``name`` (inactive)."""
        self._stored[name] = record

    def stored(self, name: str) -> AdapterRecord:
        """The stored record called ``name``."""
        if name not in self._stored:
            raise EexitValueError(f"no adapter named {name!r}; this model holds {self.names}.")
        return self._stored[name]

    def swap(self, name: str, outgoing: AdapterRecord) -> AdapterRecord:
        """Make ``name`` active: store the active adapter's ``outgoing`` snapshot, return ``name``'s record."""
        incoming = self.stored(name)
        del self._stored[name]
        self._stored[self.active] = outgoing
        self.active = name
        return incoming

    def rename_active(self, name: str) -> None:
        """Give the active adapter another name (loading one with :func:`eexit.from_pretrained`)."""
        self.active = self.check_new(name) if name != self.active else name
