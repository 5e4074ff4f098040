"""The CI slice of the accuracy-cost benchmark: every method's code path on a few thousand real images."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from eexit import fashion_mnist

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "accuracy_cost.py"


def _has_fashion_mnist() -> bool:
    try:
        fashion_mnist.find_fashion_mnist()
    except ValueError:
        return False
    return True


@pytest.mark.slow
@pytest.mark.skipif(not _has_fashion_mnist(), reason="Fashion-MNIST missing: apt-get install dataset-fashion-mnist")
def test_fashion_mnist_slice_runs_every_method(tmp_path):
    spec = importlib.util.spec_from_file_location("accuracy_cost", BENCH)
    bench = importlib.util.module_from_spec(spec)
    sys.modules["accuracy_cost"] = bench  # dataclasses look their module up while the script loads
    spec.loader.exec_module(bench)
    args = ["--dataset", "fashion-mnist", "--quick", "--out", str(tmp_path), "--cache", str(tmp_path / "cache")]
    assert bench.main(args) == 0
    table = (tmp_path / "accuracy_cost_fashion_mnist_quick.md").read_text()
    for name in (bench.DEFAULT, bench.PAPER_NAME, bench.THRESHOLD_MSDNET, bench.THRESHOLD_TUNED, "oracle", "Ablation"):
        assert name in table
    data = json.loads((tmp_path / "accuracy_cost_fashion_mnist_quick.json").read_text())
    run = data["runs"][0]["results"]
    for method, points in run.items():
        for point in points.values():
            assert 0.0 <= point["accuracy"] <= 1.0, method
    oracle = run["oracle (warm-up IMs)"]
    for budget, point in run[bench.DEFAULT].items():
        assert point["accuracy"] <= oracle[budget]["accuracy"] + 0.05  # the oracle is a ceiling (up to cost slack)
    assert (tmp_path / "accuracy_cost_fashion_mnist_quick.png").stat().st_size > 1000
