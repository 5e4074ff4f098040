"""timm's own model tests (``tests/test_models.py`` of the installed timm release) on eexit's timm models.

eexit registers T2T-ViT and the Dynamic Perceiver with timm, so users treat them as timm models. The surest
check that they behave as such is timm's own test file, run unchanged except for one thing: timm sorts its
models into groups by name filters, and eexit's models are added to the groups timm uses for comparable
models of its own:

- ``NON_STD_FILTERS`` (transformer / hybrid models whose features are tokens or several tensors, judged by
  ``test_model_default_cfgs_non_std``, not by the NCHW contract of CNNs): ``t2t_vit_*`` as timm's ViTs, and
  the Dynamic Perceiver as timm's multi-branch hybrids (CrossViT, CoaT, LeViT), since its head reads both
  branches.
- ``FEAT_INTER_FILTERS`` (modules with ``forward_intermediates`` and ``features_only`` through it): the
  ``t2t_vit`` module as ``vision_transformer``, ``dynamic_perceiver`` as ``coat`` / ``crossvit``.

The file is not vendored (we copy no code): it comes from the timm sdist of the installed version on PyPI
(``pip download``; cached under ``~/.cache/eexit``), or from ``EEXIT_TIMM_TESTS=/path/to/timm/tests/test_models.py``.
Only the tests parametrised by a model name that eexit registers are kept. Run it alone with
``./run test tests/test_timm_suite.py``.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tarfile
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

timm = pytest.importorskip("timm")

# Added to timm's filter lists, right before ``NUM_NON_STD = len(NON_STD_FILTERS)``.
FILTER_ADDITIONS = """
# --- added by eexit's tests/test_timm_suite.py: eexit's models, in the groups of comparable timm models ---
NON_STD_FILTERS += ['t2t_vit_*', '*_perceiver_t128', 'dyn_perceiver_*']
FEAT_INTER_FILTERS += ['t2t_vit', 'dynamic_perceiver']
"""
ANCHOR = "NUM_NON_STD = len(NON_STD_FILTERS)"

# Makes ``import eexit`` register the models before timm's file builds its parameter lists, and keeps only
# the tests of eexit's models (every other timm model is deselected, not run).
CONFTEST = """
import eexit  # noqa: F401  (registers eexit's models with timm)
import timm

EEXIT_MODELS = set(timm.list_models(module=["t2t_vit", "dynamic_perceiver"]))


def pytest_collection_modifyitems(config, items):
    keep, drop = [], []
    for item in items:
        name = getattr(getattr(item, "callspec", None), "params", {}).get("model_name")
        (keep if name in EEXIT_MODELS else drop).append(item)
    items[:] = keep
    config.hook.pytest_deselected(items=drop)
"""

# Every eexit model must meet at least these tests (a guard against a filter that silently selects nothing).
MUST_RUN = (
    "test_model_forward",
    "test_model_backward",
    "test_model_default_cfgs_non_std",
    "test_model_forward_torchscript",
    "test_model_forward_intermediates",
    "test_model_forward_intermediates_features",
    "test_model_forward_fx",
    "test_model_backward_fx",
    "test_model_forward_fx_torchscript",
    "test_prune_intermediate_layers_contract",
)


def _cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "eexit" / f"timm-{timm.__version__}-tests"


def timm_test_file() -> Path:
    """timm's ``tests/test_models.py`` for the installed timm: from EEXIT_TIMM_TESTS, the cache, or PyPI."""
    given = os.environ.get("EEXIT_TIMM_TESTS")
    if given:
        path = Path(given)
        if not path.is_file():
            raise FileNotFoundError(f"EEXIT_TIMM_TESTS={given} is not a file; point it at timm's tests/test_models.py.")
        return path
    cached = _cache_dir() / "test_models.py"
    if cached.is_file():
        return cached
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:"]
        cmd += ["-d", tmp, f"timm=={timm.__version__}"]
        try:
            subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=300)
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as err:
            detail = getattr(err, "stderr", "") or str(err)
            pytest.skip(
                f"could not download the timm {timm.__version__} sdist from PyPI for its test file "
                f"({detail.strip()[-300:]}); set EEXIT_TIMM_TESTS=/path/to/timm/tests/test_models.py"
            )
        (sdist,) = Path(tmp).glob("timm-*.tar.gz")
        with tarfile.open(sdist) as tar:
            member = tar.getmember(f"timm-{timm.__version__}/tests/test_models.py")
            text = tar.extractfile(member).read()  # type: ignore[union-attr]
    cached.parent.mkdir(parents=True, exist_ok=True)
    partial = cached.with_suffix(".partial")
    partial.write_bytes(text)
    partial.replace(cached)
    return cached


def prepared_suite(source: Path, workdir: Path) -> Path:
    """timm's file with eexit's models added to its filter lists, and the conftest that selects them."""
    text = source.read_text()
    if ANCHOR not in text:
        raise AssertionError(
            f"{source} has no line {ANCHOR!r}: this timm's test file is laid out differently; update "
            "tests/test_timm_suite.py (FILTER_ADDITIONS / ANCHOR) for it."
        )
    (workdir / "test_models.py").write_text(text.replace(ANCHOR, FILTER_ADDITIONS + ANCHOR, 1))
    (workdir / "conftest.py").write_text(CONFTEST)
    (workdir / "pytest.ini").write_text("[pytest]\n")  # not eexit's settings (testpaths, markers)
    return workdir / "test_models.py"


def _results(junit: Path) -> dict[str, str]:
    """Test id -> "passed" / "failed" / "skipped" from pytest's JUnit XML."""
    out = {}
    for case in ET.parse(junit).getroot().iter("testcase"):
        status = "passed"
        for child in case:
            if child.tag in ("failure", "error"):
                status = "failed"
            elif child.tag == "skipped" and status == "passed":
                status = "skipped"
        out[case.get("name", "")] = status
    return out


def _test_and_model(test_id: str) -> tuple[str, str]:
    """``"test_model_forward[1-t2t_vit_7]"`` -> ``("test_model_forward", "t2t_vit_7")`` (timm's names have no "-")."""
    test, _, params = test_id.partition("[")
    names = [p for p in params.rstrip("]").split("-") if p and not p.isdigit()]
    return test, names[-1] if names else ""


def test_test_ids_are_read_as_test_and_model():
    assert _test_and_model("test_model_forward[1-t2t_vit_7]") == ("test_model_forward", "t2t_vit_7")
    assert _test_and_model("test_prune_intermediate_layers_contract[dyn_perceiver_tiny]") == (
        "test_prune_intermediate_layers_contract",
        "dyn_perceiver_tiny",
    )


@pytest.mark.slow
def test_timm_model_suite_passes_on_eexit_models(tmp_path):
    suite = prepared_suite(timm_test_file(), tmp_path)
    junit = tmp_path / "junit.xml"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    env.pop("GITHUB_ACTIONS", None)  # the full local selection, not timm's reduced CI one
    cmd = [sys.executable, "-m", "pytest", str(suite), "-q", "-p", "no:cacheprovider", "-p", "no:logging"]
    cmd += ["-c", str(tmp_path / "pytest.ini"), "--rootdir", str(tmp_path), f"--junitxml={junit}", "-W", "ignore"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=3600)
    results = _results(junit) if junit.exists() else {}
    failed = sorted(name for name, status in results.items() if status == "failed")
    assert proc.returncode == 0 and not failed, (
        f"timm's tests fail on eexit's models ({len(failed)}): {failed}\n{proc.stdout[-6000:]}\n{proc.stderr[-2000:]}"
    )
    import eexit  # noqa: F401  (registers eexit's models with timm)

    models = timm.list_models(module=["t2t_vit", "dynamic_perceiver"])
    assert len(models) == 12, models  # 7 T2T-ViTs, 5 Dynamic Perceivers
    ran = {_test_and_model(name) for name, status in results.items() if status == "passed"}
    missing = [f"{test}[{m}]" for m in models for test in MUST_RUN if (test, m) not in ran]
    assert not missing, f"timm tests that did not run (or were skipped) on eexit's models: {missing}"


@pytest.mark.slow  # may download timm's sdist
def test_filters_apply_to_timm_file_layout(tmp_path):
    """The anchor exists and the additions land before the lists are read (fast; uses the cached file if any)."""
    source = timm_test_file()
    suite = prepared_suite(source, tmp_path).read_text()
    lines = suite.splitlines()
    added = lines.index("FEAT_INTER_FILTERS += ['t2t_vit', 'dynamic_perceiver']")
    first_use = next(i for i, line in enumerate(lines) if re.search(r"list_models\(", line) and "def " not in line)
    assert added < first_use
