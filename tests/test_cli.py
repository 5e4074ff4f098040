"""The command line end to end on real digit images: fit, evaluate, sweep, export, push, resume, bad input."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from sklearn.datasets import load_digits

import eexit
from eexit._runs import load_backbone
from eexit.cli import build_parser, main

TINY = "img_size=32,patch_size=8,embed_dim=32,depth=4,num_heads=2"


@pytest.fixture(scope="module", autouse=True)
def hermetic_datasets_cache(tmp_path_factory):
    """`datasets` keeps its arrow cache under ~/.cache/huggingface: point it at a temporary folder instead (the
    variable is read when `datasets` is imported, so its config is patched too)."""
    import datasets

    folder = tmp_path_factory.mktemp("hf-datasets")
    patch = pytest.MonkeyPatch()
    patch.setattr(datasets.config, "HF_DATASETS_CACHE", folder)
    patch.setenv("HF_DATASETS_CACHE", str(folder))  # for the launched processes
    yield folder
    patch.undo()


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """Real handwritten digits as PNG class folders (train/val/test) and a trained-looking tiny ViT checkpoint."""
    root = tmp_path_factory.mktemp("cli")
    digits = load_digits()
    for split, (lo, hi) in {"train": (0, 300), "val": (300, 450), "test": (450, 600)}.items():
        for i in range(lo, hi):
            folder = root / split / str(digits.target[i])
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray((digits.images[i] * 255 / 16).astype(np.uint8)).save(folder / f"{i}.png")
    torch.manual_seed(0)
    model = timm.create_model(
        "vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2, num_classes=10
    )
    save_file(model.state_dict(), str(root / "weights.safetensors"))
    return root


def _fit_args(ws: Path, out: str, *extra: str) -> list[str]:
    return [
        "fit", "--model", "timm:vit_tiny_patch16_224", "--model-kwargs", TINY, "--num-classes", "10",
        "--checkpoint", str(ws / "weights.safetensors"), "--dataset", f"imagefolder:{ws / 'train'}",
        "--val-dataset", str(ws / "val"), "--lam", "0.3", "--epochs", "3", "--warmup-epochs", "1",
        "--cache-dir", str(ws / "cache"), "--out", str(ws / out), *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def run(workspace) -> Path:
    assert main(_fit_args(workspace, "run")) == 0
    return workspace / "run"


def test_fit_writes_a_complete_run_folder(run):
    for name in ("eexit_config.json", "eexit_adapter.safetensors", "README.md", "run.json", "results.json"):
        assert (run / name).is_file(), name
    assert (run / "accuracy_cost.png").stat().st_size > 1000
    results = json.loads((run / "results.json").read_text())
    assert len(results["history"]) == 3 and 0 <= results["val"]["accuracy"] <= 1
    costs = [p["cost_fraction"] for p in results["val_thresholds"]]
    assert costs == sorted(costs) and costs[-1] > costs[0]  # a higher threshold never exits earlier
    assert json.loads((run / "run.json").read_text())["model_kwargs"]["img_size"] == 32


def test_evaluate_at_a_budget(run, workspace, capsys):
    assert main(["evaluate", str(run), "--dataset", str(workspace / "test"), "--budget", "0.6"]) == 0
    report = json.loads((run / "evaluation-budget0.6.json").read_text())
    assert report["num_samples"] == 150 and abs(report["cost_fraction"] - 0.6) < 0.15  # met on val, seen on test
    assert report["conformal"] is not None and (run / "evaluation-budget0.6-exits.png").is_file()
    assert "| accuracy |" in capsys.readouterr().out


def test_resume_of_a_finished_run_keeps_its_adapter(run, workspace):
    before = load_file(str(run / "eexit_adapter.safetensors"))
    assert main([*_fit_args(workspace, "run"), "--resume"]) == 0
    after = load_file(str(run / "eexit_adapter.safetensors"))
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_sweep_trains_one_adapter_per_lambda(workspace):
    args = _fit_args(workspace, "sweep")
    args[0] = "sweep"
    lam = args.index("--lam")
    del args[lam : lam + 2]
    assert main([*args, "--lams", "0.05,1", "--test-dataset", str(workspace / "test")]) == 0
    results = json.loads((workspace / "sweep" / "results.json").read_text())
    assert [p["lam"] for p in results["points"]] == [0.05, 1.0] and results["split"] == "test"
    cheap, dear = (p["test"]["cost_fraction"] for p in results["points"])
    assert dear < cheap  # a higher price of computation exits earlier
    for folder in ("lam_0.05", "lam_1"):
        assert (workspace / "sweep" / folder / "eexit_adapter.safetensors").is_file()
        assert (workspace / "sweep" / folder / "run.json").is_file()


def test_push_uploads_the_adapter_loaded_onto_its_backbone(run, monkeypatch):
    import huggingface_hub

    calls = {}

    class FakeApi:
        def __init__(self, token=None):
            calls["token"] = token

        def create_repo(self, repo_id, **kwargs):
            calls["repo"] = repo_id
            return huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}")

        def create_commit(self, repo_id, operations, **kwargs):
            calls["files"] = sorted(op.path_in_repo for op in operations)
            return type("Info", (), {"commit_url": f"https://huggingface.co/{repo_id}/commit/1"})()

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    assert main(["push", str(run), "me/tiny-exits", "--token", "t"]) == 0
    assert calls == {
        "token": "t",
        "repo": "me/tiny-exits",
        "files": ["README.md", "eexit_adapter.safetensors", "eexit_config.json"],
    }


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (["--num-classes", "5", "--checkpoint", None], "has 10 classes"),
        (["--dataset", "imagefolder:/does/not/exist"], "does not exist"),
        (["--model", "timm:no_such_model"], "timm has no model"),
        (["--model", "resnet50"], "expected timm:NAME"),
        (["--checkpoint", "weights.pt"], "only .safetensors"),
        (["--num-classes", "5"], "does not fit the model"),
        (["--model-kwargs", "no_such_option=1"], "does not take them"),
        (["--lam", "-1"], "--lam -1"),
        (["--out", "run"], "already holds a run"),
    ],
)
def test_fit_bad_input_exits_2_with_one_line(run, workspace, capsys, change, message):
    args = _fit_args(workspace, "bad")
    for flag, value in zip(change[::2], change[1::2]):
        i = args.index(flag)
        if value is None:
            del args[i : i + 2]
        else:
            args[i + 1] = str(workspace / value) if flag == "--out" else value
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("eexit fit: error:") and message in err


def test_evaluate_bad_input(run, workspace, capsys):
    assert main(["evaluate", str(run), "--dataset", str(workspace / "test"), "--budget", "0.05"]) == 2
    assert "outside what these exits can spend" in capsys.readouterr().err
    assert main(["evaluate", str(workspace / "nowhere"), "--dataset", str(workspace / "test")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["evaluate", str(workspace / "train"), "--dataset", str(workspace / "test")]) == 2
    assert "not an eexit run folder" in capsys.readouterr().err
    args = ["evaluate", str(run), "--dataset", str(workspace / "test"), "--budget", "0.5", "--threshold", "0.5"]
    assert main(args) == 2
    assert "not both" in capsys.readouterr().err


@pytest.mark.skipif(importlib.util.find_spec("onnxruntime") is None, reason="the export extra is missing")
def test_export_writes_graphs_the_runtime_serves_like_the_run(run, workspace, capsys):
    from eexit.runtime import OnnxEarlyExit

    out = workspace / "deploy"
    assert main(["export", str(run), str(out), "--threshold", "0.4"]) == 0
    assert "eexit_export.json written" in capsys.readouterr().out
    runtime = OnnxEarlyExit(out)
    assert runtime.manifest["threshold"] == 0.4
    run_info = json.loads((run / "run.json").read_text())
    backbone = load_backbone(run_info["model"], run_info["checkpoint"], 10, run_info["model_kwargs"])
    ee = eexit.from_pretrained(backbone, run)
    images = torch.randn(9, *ee.cost_table.input_shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = ee(images, policy=ee.default_policy(0.4))
    got = runtime(images)
    assert torch.equal(got.exit_index, want.exit_index)
    torch.testing.assert_close(got.logits, want.logits, rtol=1e-4, atol=1e-4)
    assert main(["export", str(run), str(out)]) == 1  # exists: OSError, one line
    assert "overwrite" in capsys.readouterr().err
    assert main(["export", str(run), str(workspace / "x"), "--threshold", "1.5"]) == 2
    assert "threshold" in capsys.readouterr().err and not (workspace / "x").exists()


@pytest.mark.parametrize("command", ["fit", "sweep", "evaluate", "export", "push", "demo"])
def test_help_explains_every_flag(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    sub = next(a for a in build_parser()._subparsers._group_actions[0].choices.items() if a[0] == command)[1]
    for action in sub._actions:
        if action.option_strings and action.dest != "help":
            assert action.help, f"{command} {action.option_strings} has no help"
            assert action.option_strings[0] in text


@pytest.mark.slow
def test_accelerate_launch_two_processes_matches_one(run, workspace):
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision"]
    cmd += ["no", "--dynamo_backend", "no", "-m", "eexit", *_fit_args(workspace, "two")]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    one = load_file(str(run / "eexit_adapter.safetensors"))
    two = load_file(str(workspace / "two" / "eexit_adapter.safetensors"))
    for key in one:
        if key.startswith("heads"):
            torch.testing.assert_close(two[key], one[key], atol=1e-5, rtol=1e-5)
    assert json.loads((workspace / "two" / "results.json").read_text())["val"]["num_samples"] == 150
