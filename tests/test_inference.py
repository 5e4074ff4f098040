"""Real early exit on one timm ViT: the batch shrinks, outputs come back in input order, policies replay, threads
stay apart, bad inputs fail clearly. The equality with "run every exit, decide afterwards" runs over the whole zoo
in test_conformance.py."""

from __future__ import annotations

import pytest
import torch
from backbone_zoo import spread_exits
from conftest import IMG, tiny_timm_vit

import eexit
from eexit.errors import EexitTypeError, EexitValueError
from eexit.inference import FixedExitPolicy, ThresholdPolicy, decide_exits


def test_batch_really_shrinks_and_backbone_stops(images):
    model = tiny_timm_vit().eval()
    seen: dict[int, list[int]] = {i: [] for i in range(len(model.blocks))}
    for i, block in enumerate(model.blocks):
        block.register_forward_pre_hook(lambda m, args, i=i: seen[i].append(args[0].shape[0]))
    head_calls = []
    model.head.register_forward_pre_hook(lambda m, args: head_calls.append(args[0].shape[0]))
    ee = eexit.attach(model)
    # samples 0-2 exit at exit 0, 3-4 at exit 1, the rest at the head
    target = torch.tensor([0, 0, 0, 1, 1, 3, 3])
    out = ee(images, policy=FixedExitPolicy(target))
    assert out.exit_index.tolist() == target.tolist()
    assert [seen[i][-1] for i in range(4)] == [7, 4, 2, 2]
    assert head_calls[-1] == 2
    # everyone exits at exit 0: blocks 1.. and the head never run
    calls_before = [len(seen[i]) for i in range(4)]
    head_before = len(head_calls)
    ee(images, policy=FixedExitPolicy(torch.zeros(7, dtype=torch.long)))
    assert [len(seen[i]) - calls_before[i] for i in range(4)] == [1, 0, 0, 0]
    assert len(head_calls) == head_before


def test_outputs_in_input_order(images):
    ee = eexit.attach(tiny_timm_vit())
    spread_exits(ee)
    target = torch.tensor([2, 0, 3, 1, 0, 2, 3])
    with torch.no_grad():
        full = ee(images, all_exits=True)
        out = ee(images, policy=FixedExitPolicy(target))
    assert torch.allclose(out.logits, full.logits[target, torch.arange(7)], atol=1e-5)


def test_threshold_policy_matches_replay():
    ee = eexit.attach(tiny_timm_vit())
    spread_exits(ee, seed=3)
    x = torch.randn(64, 3, IMG, IMG)
    policy = ThresholdPolicy([0.9, 0.8, 0.7])
    with torch.no_grad():
        full = ee(x, all_exits=True)
        out = ee(x, policy=policy)
    assert torch.equal(out.exit_index, decide_exits(full.logits, None, policy))


def test_threads_do_not_share_state():
    import concurrent.futures

    ee = eexit.attach(tiny_timm_vit())
    spread_exits(ee)
    xs = [torch.randn(16, 3, IMG, IMG, generator=torch.Generator().manual_seed(i)) for i in range(8)]
    with torch.no_grad():
        serial = [ee(x).exit_index for x in xs]
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            parallel = list(pool.map(lambda x: ee(x).exit_index, xs))
    assert all(torch.equal(a, b) for a, b in zip(serial, parallel))


@pytest.mark.parametrize(
    ("x", "error", "match"),
    [
        (torch.randn(3, IMG, IMG), EexitValueError, "unsqueeze"),
        (torch.randn(2, 1, IMG, IMG), EexitValueError, "resize"),
        (torch.randn(2, 3, 16, 16), EexitValueError, "resize"),
        (torch.zeros(2, 3, IMG, IMG, dtype=torch.uint8), EexitTypeError, "floating-point"),
        (torch.zeros(2, 3, IMG, IMG, dtype=torch.float64), EexitTypeError, "float32"),
        ([[1.0]], EexitTypeError, "torch.Tensor"),
    ],
)
def test_bad_inputs(x, error, match):
    ee = eexit.attach(tiny_timm_vit())
    with pytest.raises(error, match=match):
        ee(x)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_images_with_nan_or_inf_are_refused_unless_the_check_is_off(images, bad):
    ee = eexit.attach(tiny_timm_vit())
    dirty = images.clone()
    dirty[2, 1, 3, 4] = bad
    dirty[5, 0, 0, 0] = bad
    for call in (lambda: ee(dirty), lambda: ee(dirty, all_exits=True)):
        with pytest.raises(EexitValueError, match=r"images \[2, 5\] of the batch contain NaN or Inf"):
            call()
    ee.check_inputs = False  # serving a trusted pipeline: no check, the garbage flows through
    out = ee(dirty)
    assert not torch.isfinite(out.logits[2]).all()
    ee.check_inputs = True
    assert torch.isfinite(ee(images).logits).all()  # clean images pass
