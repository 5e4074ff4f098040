"""A fit killed mid-epoch resumes from its last epoch checkpoint and ends with the uninterrupted fit's adapter."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import IMG, tiny_timm_vit

import eexit
import eexit.train as train_module
from eexit.errors import EexitValueError


class Killed(Exception):
    pass


def _loaders():
    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(80, 3, IMG, IMG, generator=g), torch.arange(80) % 5)
    val = torch.utils.data.TensorDataset(torch.randn(40, 3, IMG, IMG, generator=g), torch.arange(40) % 5)
    return [torch.utils.data.DataLoader(d, batch_size=16) for d in (data, val)]


SETTINGS = {
    "hazard": dict(gates="hazard", fit=dict()),
    "paper-val": dict(gates="paper", fit=dict(gate_data="val", phase_batches=3, pos_weight="task")),
}


def _fit(kind: str, tmp_path, kill_at_step: int | None = None, resume: bool = False, monkeypatch=None, seed: int = 0):
    torch.manual_seed(seed)
    ee = eexit.attach(tiny_timm_vit(), gates=SETTINGS[kind]["gates"], head="mlp")
    fit_kwargs = SETTINGS[kind]["fit"]
    if kill_at_step is not None:
        make = train_module._make_optimizer

        def killing(ee_, config):
            optimizer = make(ee_, config)
            steps = [0]

            def hook(*_):
                steps[0] += 1
                if steps[0] == kill_at_step:
                    raise Killed

            optimizer.register_step_post_hook(hook)
            return optimizer

        monkeypatch.setattr(train_module, "_make_optimizer", killing)
    try:
        eexit.fit(
            ee,
            *_loaders(),
            lam=0.3,
            epochs=4,
            warmup_epochs=1,
            batch_size=16,
            optimizer="adamw",
            lr=3e-3,
            min_lr=1e-4,
            progress=False,
            checkpoint_dir=tmp_path / "ckpt",
            resume=resume,
            **fit_kwargs,
        )
    finally:
        if monkeypatch is not None:
            monkeypatch.undo()
    return ee


@pytest.mark.parametrize("kind", list(SETTINGS))
def test_resume_after_a_kill_gives_the_uninterrupted_adapter(kind, tmp_path, monkeypatch):
    whole = _fit(kind, tmp_path / "whole")
    with pytest.raises(Killed):  # 5 batches per epoch: killed in the middle of the third epoch
        _fit(kind, tmp_path / "killed", kill_at_step=13, monkeypatch=monkeypatch)
    latest = json.loads((tmp_path / "killed" / "ckpt" / "latest.json").read_text())
    assert latest["latest"].startswith("epoch-1-")
    assert [p.name for p in (tmp_path / "killed" / "ckpt").iterdir() if p.is_dir()] == [latest["latest"]]
    resumed = _fit(kind, tmp_path / "killed", resume=True)
    for key, value in whole.adapter_state_dict().items():
        torch.testing.assert_close(resumed.adapter_state_dict()[key], value, atol=1e-6, rtol=1e-6)
    assert resumed.history == whole.history


def test_resume_without_a_checkpoint_starts_afresh_and_bad_resumes_are_refused(tmp_path):
    fresh = _fit("hazard", tmp_path, resume=True)  # nothing to resume from: a normal fit
    assert len(fresh.history) == 4
    with pytest.raises(EexitValueError, match="another backbone"):
        _fit("hazard", tmp_path, resume=True, seed=1)
    ee = eexit.attach(tiny_timm_vit())
    with pytest.raises(EexitValueError, match="other settings"):
        eexit.fit(ee, *_loaders(), lam=0.9, epochs=4, progress=False, checkpoint_dir=tmp_path / "ckpt", resume=True)
    with pytest.raises(EexitValueError, match="needs checkpoint_dir"):
        eexit.fit(ee, *_loaders(), epochs=1, progress=False, resume=True)
    with pytest.raises(EexitValueError, match="mixed_precision"):
        eexit.fit(ee, *_loaders(), epochs=1, progress=False, mixed_precision="fp8")
    with pytest.raises(EexitValueError, match="other data"):
        loaders = _loaders()
        loaders[0] = torch.utils.data.DataLoader(torch.utils.data.Subset(loaders[0].dataset, range(64)), batch_size=16)
        torch.manual_seed(0)
        ee0 = eexit.attach(tiny_timm_vit(), head="mlp")
        eexit.fit(ee0, *loaders, lam=0.3, epochs=4, warmup_epochs=1, batch_size=16, optimizer="adamw", lr=3e-3,
                  min_lr=1e-4, progress=False, checkpoint_dir=tmp_path / "ckpt", resume=True)  # fmt: skip
    latest = json.loads((tmp_path / "ckpt" / "latest.json").read_text())["latest"]
    (tmp_path / "ckpt" / latest / "state.safetensors").write_bytes(b"garbage")
    with pytest.raises(EexitValueError, match="cannot be read"):
        eexit.fit(ee, *_loaders(), lam=0.3, epochs=4, progress=False, checkpoint_dir=tmp_path / "ckpt", resume=True)
    (tmp_path / "ckpt" / latest / "state.json").write_text("{broken")
    with pytest.raises(EexitValueError, match="cannot be read"):
        eexit.fit(ee, *_loaders(), lam=0.3, epochs=4, progress=False, checkpoint_dir=tmp_path / "ckpt", resume=True)
