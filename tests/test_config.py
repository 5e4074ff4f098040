"""Configs validate on construction and round-trip through JSON."""

from __future__ import annotations

import json

import pytest

from eexit.config import FORMAT_VERSION, ExitConfig, FitConfig
from eexit.errors import EexitValueError


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"lam": -0.1}, "lam"),
        ({"lam": float("nan")}, "lam"),
        ({"epochs": 0}, "epochs"),
        ({"warmup_epochs": 20}, "warmup_epochs"),
        ({"im_weighting": "softmax"}, "im_weighting"),
        ({"optimizer": "lbfgs"}, "optimizer"),
        ({"lr": 0.0}, "lr"),
        ({"min_lr": 1.0}, "min_lr"),
        ({"phase_batches": 0}, "phase_batches"),
        ({"cache_features": True, "train_backbone": True}, "cache_features"),
    ],
)
def test_fit_config_rejects(kwargs, match):
    with pytest.raises(EexitValueError, match=match):
        FitConfig(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"exit_blocks": ()}, "exit_blocks"),
        ({"exit_blocks": (3, 1)}, "increasing"),
        ({"head": "transformer"}, "head"),
        ({"gate_features": ("max_prob", "variance")}, "gate_features"),
        ({"threshold": 0.0}, "threshold"),
        ({"head_hidden": 0}, "head_hidden"),
    ],
)
def test_exit_config_rejects(kwargs, match):
    with pytest.raises(EexitValueError, match=match):
        ExitConfig(**kwargs)


def test_json_round_trip():
    for config in (ExitConfig(exit_blocks=(1, 3), head="mlp"), FitConfig(lam=1.5, epochs=4, warmup_epochs=1)):
        data = json.loads(json.dumps(config.to_dict()))
        assert data["format_version"] == FORMAT_VERSION
        assert type(config).from_dict(data) == config
        assert list(data) == sorted(data)


def test_unknown_keys_warn_and_are_dropped():
    data = FitConfig().to_dict() | {"future_knob": 3}
    with pytest.warns(UserWarning, match="future_knob"):
        assert FitConfig.from_dict(data) == FitConfig()


def test_newer_format_version_fails():
    data = ExitConfig().to_dict() | {"format_version": FORMAT_VERSION + 1}
    with pytest.raises(EexitValueError, match="Upgrade eexit"):
        ExitConfig.from_dict(data)
