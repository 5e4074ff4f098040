"""Segments: the backbone cut at its exits, which eager early exit, ``ee.compile`` and ``ee.export`` all run."""

from __future__ import annotations

import warnings

import pytest
import torch
from backbone_zoo import ZOO

import eexit
from eexit.gates import ExitHistory, Gate, gate_statistics
from eexit.inference import FixedExitPolicy, ThresholdPolicy, decide_exits
from eexit.segments import SegmentsUnavailable

#: the zoo entries whose spec runs as segments (the rest run through hooks)
SEGMENTED = ["timm_vit_cls", "timm_vit_headless", "timm_deit_distilled", "t2t_vit", "hf_vit_cls", "hf_vit_model",
             "hf_deit_teacher", "dyn_perceiver"]  # fmt: skip
HOOKED_ONLY = ["timm_swin", "timm_eva02", "hf_dinov2_cls", "generic"]


def _attach(name: str) -> eexit.EarlyExitModel:
    entry = ZOO[name]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a spec that claims segments must pass attach's check silently
        return eexit.attach(entry.build(), **entry.attach)


def _images(ee: eexit.EarlyExitModel, batch: int, seed: int = 3) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, *ee.cost_table.input_shape, generator=generator)


def _hooked(ee: eexit.EarlyExitModel, images: torch.Tensor, policy) -> eexit.EarlyExitOutput:
    """The same early exit through the hooks (what a model without segments runs)."""
    segments, ee._segments = ee._segments, None
    try:
        return ee(images, policy=policy)
    finally:
        ee._segments = segments


def _count_gate_steps(monkeypatch) -> list[int]:
    """A list that grows by one at every gate evaluated on the early-exit path."""
    calls: list[int] = []
    real = Gate.step
    monkeypatch.setattr(Gate, "step", lambda self, *a: calls.append(1) or real(self, *a))
    return calls


def _assert_exits_as_replay(ee: eexit.EarlyExitModel, images: torch.Tensor) -> None:
    with torch.no_grad():
        out, full = ee(images), ee(images, all_exits=True)
    assert torch.equal(out.exit_index, decide_exits(full.logits, full.gate_logits, ee.default_policy()))


def _spread_threshold(ee: eexit.EarlyExitModel, images: torch.Tensor) -> float:
    """A gate threshold at which the batch's samples leave at different exits (so shrinking is exercised)."""
    with torch.no_grad():
        gates = torch.sigmoid(ee(images, all_exits=True).gate_logits)
    return float(gates.median().clamp(0.05, 0.95))


@pytest.mark.parametrize("name", SEGMENTED)
def test_segmented_early_exit_equals_hooks_and_replay(name):
    ee = _attach(name)
    assert ee.segments and len(ee.segments) == ee.num_exits
    for batch in (1, 7, 64):
        images = _images(ee, batch)
        policy = ee.default_policy(_spread_threshold(ee, images))
        with torch.no_grad():
            out = ee(images, policy=policy)
            hooked = _hooked(ee, images, policy)
            full = ee(images, all_exits=True)
        assert torch.equal(out.exit_index, hooked.exit_index)
        assert torch.equal(out.exit_index, decide_exits(full.logits, full.gate_logits, policy))
        torch.testing.assert_close(out.logits, hooked.logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out.cost, hooked.cost)


@pytest.mark.parametrize("name", HOOKED_ONLY)
def test_specs_without_segments_refuse_compile_and_export_with_the_reason(name, tmp_path):
    ee = _attach(name)
    with pytest.raises(SegmentsUnavailable, match="does not describe its model as segments"):
        ee.compile(backend="eager")
    with pytest.raises(SegmentsUnavailable, match="hooks"):
        ee.export(tmp_path / "out")
    assert not (tmp_path / "out").exists()
    out = ee(_images(ee, 3))  # early exit itself still works, through the hooks
    assert out.logits.shape[0] == 3


def test_a_forward_the_spec_does_not_know_falls_back_to_hooks_with_a_warning():
    model = ZOO["timm_vit_cls"].build()
    # A customised model: its forward no longer calls _pos_embed as timm's does, so the segments (which do) differ.
    real_pos_embed = model._pos_embed
    model._pos_embed = lambda x: real_pos_embed(x) * 1.5
    model.forward_features = lambda x, **kwargs: model.norm(model.blocks(real_pos_embed(model.patch_embed(x))))
    with pytest.warns(UserWarning, match="does not reproduce its own forward"):
        ee = eexit.attach(model)
    with pytest.raises(SegmentsUnavailable, match="does not reproduce"):
        _ = ee.segments
    images = _images(ee, 5)
    _assert_exits_as_replay(ee, images)


def test_policies_that_read_no_gate_skip_them(monkeypatch):
    ee = _attach("timm_vit_cls")
    images = _images(ee, 9)
    calls = _count_gate_steps(monkeypatch)
    thresholds = ThresholdPolicy([0.3] * (ee.num_exits - 1) + [0.0])
    with torch.no_grad():
        out = ee(images, policy=thresholds)
        full = ee(images, all_exits=True)
    assert not calls
    assert torch.equal(out.exit_index, decide_exits(full.logits, None, thresholds))
    with torch.no_grad():
        ee(images, policy=FixedExitPolicy(torch.full((9,), ee.num_exits - 1), reads_gates=True))
        ee(images)  # the gates' own policy reads them
    assert len(calls) == 2 * (ee.num_exits - 1)


@pytest.mark.parametrize("features", [("max_prob", "entropy"), None])
def test_gate_step_equals_forward_and_history(features):
    gate = Gate(features) if features else Gate(eexit.config.GATE_FEATURES + eexit.config.HISTORY_FEATURES)
    torch.manual_seed(0)
    gate.linear.weight.data.normal_()
    first = torch.randn(6, 5) * 4
    logits = torch.cat([first[:3], torch.randn(3, 5)])  # three samples agree with the previous exit
    history = ExitHistory().after(first) if gate.uses_history else None
    with torch.no_grad():
        got, after = gate.step(logits, history)
        assert torch.equal(got, gate(logits, history))
        if history is None:
            assert after is None
        else:
            want = history.after(logits)
            assert torch.equal(after.log_probs, want.log_probs) and torch.equal(after.run, want.run)
            assert after.run[:3].tolist() == [1.0, 1.0, 1.0]
        assert gate_statistics(logits, gate.features, history).shape == (6, len(gate.features))


def test_an_empty_batch_returns_empty_outputs():
    ee = _attach("timm_vit_cls")
    out = ee(_images(ee, 0))
    assert out.logits.shape == (0, 5) and out.exit_index.shape == (0,) and out.cost.shape == (0,)


def test_a_spec_whose_embed_fails_falls_back_to_hooks(monkeypatch):
    from eexit.backbones.timm_vit import TimmViTSpec

    def broken(self, model, pixel_values):
        raise AttributeError("this timm version has no _pos_embed")

    monkeypatch.setattr(TimmViTSpec, "embed", broken)
    with pytest.warns(UserWarning, match="as segments failed"):
        ee = eexit.attach(ZOO["timm_vit_cls"].build())
    with pytest.raises(SegmentsUnavailable, match="_pos_embed"):
        ee.compile(backend="eager")
    images = _images(ee, 4)
    _assert_exits_as_replay(ee, images)


def test_thresholds_on_a_staged_backbone_skip_its_gates_and_match_replay(monkeypatch):
    ee = _attach("dyn_perceiver")
    images = _images(ee, 9)
    calls = _count_gate_steps(monkeypatch)
    with torch.no_grad():
        full = ee(images, all_exits=True)
        confidence = torch.softmax(full.logits.double(), -1).amax(-1)  # [E, B]
        policy = ThresholdPolicy(confidence.median(dim=1).values.tolist())  # about half leave at each exit
        out = ee(images, policy=policy)
    assert not calls
    target = decide_exits(full.logits, None, policy)
    assert torch.equal(out.exit_index, target) and len(set(target.tolist())) > 1
    torch.testing.assert_close(out.logits, full.logits[target, torch.arange(9)], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["timm_vit_cls", "dyn_perceiver"])
def test_paper_gates_run_as_segments(name):
    entry = ZOO[name]
    ee = eexit.attach(entry.build(), **entry.attach, gates="paper")
    assert not ee.uses_history and ee.segments
    images = _images(ee, 16)
    policy = ee.default_policy(0.3)
    with torch.no_grad():
        out = ee(images, policy=policy)
        full = ee(images, all_exits=True)
        hooked = _hooked(ee, images, policy)
    assert torch.equal(out.exit_index, decide_exits(full.logits, full.gate_logits, policy))
    assert torch.equal(out.exit_index, hooked.exit_index)


def test_detached_exits_refuse_segments_compile_and_export(tmp_path):
    ee = _attach("timm_vit_cls")
    backbone = ee.detach()
    for action in (lambda: ee.segments, lambda: ee.compile(backend="eager"), lambda: ee.export(tmp_path / "x")):
        with pytest.raises(SegmentsUnavailable, match="detached"):
            action()
    assert not (tmp_path / "x").exists()
    again = eexit.attach(backbone)  # a new attach has segments again
    assert len(again.segments) == again.num_exits
