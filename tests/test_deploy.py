"""Serving paths: ``ee.compile`` (one compilation per segment, whatever the batch), ``ee.export`` to ONNX and
torch.export, and ``eexit.runtime.OnnxEarlyExit``; each must equal the eager early exit."""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest
import timm
import torch
from backbone_zoo import ZOO
from torch._dynamo.utils import counters

import eexit
import eexit.compiling
import eexit.export
import eexit.recorder
from eexit.errors import AdapterError, EexitTypeError, EexitValueError
from eexit.runtime import OnnxEarlyExit, read_manifest
from eexit.segments import run_segments

HAS_ONNX = all(importlib.util.find_spec(m) is not None for m in ("onnx", "onnxscript", "onnxruntime"))
needs_onnx = pytest.mark.skipif(not HAS_ONNX, reason="the export extra (onnx, onnxscript, onnxruntime) is missing")
BATCHES = (1, 7, 64)


def _attach(name: str) -> eexit.EarlyExitModel:
    entry = ZOO[name]
    return eexit.attach(entry.build(), **entry.attach)


def _images(ee: eexit.EarlyExitModel, batch: int, seed: int = 5) -> torch.Tensor:
    return torch.randn(batch, *ee.cost_table.input_shape, generator=torch.Generator().manual_seed(seed))


def _policy(ee: eexit.EarlyExitModel) -> eexit.GatePolicy:
    """The gates at a threshold that sends the samples of a batch to different exits."""
    with torch.no_grad():
        gates = torch.sigmoid(ee(_images(ee, 64), all_exits=True).gate_logits)
    return ee.default_policy(float(gates.median().clamp(0.05, 0.95)))


def _assert_same(got: eexit.EarlyExitOutput, want: eexit.EarlyExitOutput) -> None:
    assert torch.equal(got.exit_index, want.exit_index)
    scale = float(want.logits.abs().max()) + 1.0
    torch.testing.assert_close(got.logits, want.logits, rtol=1e-4, atol=1e-4 * scale)
    torch.testing.assert_close(got.cost.double(), want.cost.double())


# ---------------------------------------------------------------------- torch.compile
def _compile_and_compare(name: str, backend: str, batches=BATCHES) -> None:
    ee = _attach(name)
    policy = _policy(ee)
    with torch.no_grad():
        eager = {b: ee(_images(ee, b), policy=policy) for b in batches}
        everyone = ee.default_policy(1.0)  # nobody leaves early: every segment runs (and compiles) at the first call
        torch._dynamo.reset()
        counters.clear()
        ee.compile(backend=backend)
        assert ee.is_compiled
        ee(_images(ee, batches[0]), policy=everyone)
        compiled_once = counters["stats"]["unique_graphs"]
        assert compiled_once == ee.num_exits  # one graph per segment
        for b in batches:
            _assert_same(ee(_images(ee, b), policy=policy), eager[b])
        for b in range(1, 65, 9):  # every batch size the shrinking may hand a segment
            ee(_images(ee, b), policy=policy)
        assert counters["stats"]["unique_graphs"] == compiled_once, "a batch size recompiled a segment"
        ee.uncompile()
        assert not ee.is_compiled
        _assert_same(ee(_images(ee, 7), policy=policy), eager[7])


@pytest.mark.parametrize("name", ["timm_vit_cls", "hf_vit_cls", "t2t_vit", "dyn_perceiver"])
def test_compile_traces_each_segment_once_and_equals_eager(name):
    _compile_and_compare(name, "aot_eager")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["timm_vit_cls", "dyn_perceiver"])
def test_inductor_compile_equals_eager_without_recompiles(name):
    _compile_and_compare(name, "inductor")


def test_compile_options_are_checked():
    ee = _attach("timm_vit_cls")
    with pytest.raises(EexitValueError, match="inductor backend only"):
        ee.compile(backend="eager", mode="max-autotune")
    with pytest.raises(EexitValueError, match="not both"):
        ee.compile(mode="max-autotune", max_autotune=True)


# ---------------------------------------------------------------------- ONNX export and runtime
@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """name -> (model, its policy, export folder), built once for the module (exports take seconds each)."""
    made = {}

    def get(name: str):
        if name not in made:
            ee = _attach(name)
            folder = ee.export(tmp_path_factory.mktemp(name) / "onnx")
            made[name] = (ee, _policy(ee), folder)
        return made[name]

    return get


@needs_onnx
@pytest.mark.slow
@pytest.mark.parametrize("name", ["timm_vit_cls", "timm_deit_distilled", "hf_vit_cls", "t2t_vit", "dyn_perceiver"])
def test_onnx_runtime_equals_eager(exported, name):
    ee, policy, folder = exported(name)
    runtime = OnnxEarlyExit(folder, expected_adapter=ee)
    manifest = json.loads((folder / "eexit_export.json").read_text())
    assert manifest["num_exits"] == ee.num_exits == len(runtime.sessions)
    assert manifest["exit_flops"] == ee.cost_table.exit_flops
    for b in BATCHES:
        images = _images(ee, b, seed=b)
        with torch.no_grad():
            want = ee(images, policy=policy)
        _assert_same(runtime(images, policy=runtime.default_policy(policy.threshold)), want)
        _assert_same(runtime(images.numpy(), policy=runtime.default_policy(policy.threshold)), want)
    with torch.no_grad():  # the exported default threshold is the model's
        _assert_same(runtime(_images(ee, 7)), ee(_images(ee, 7)))


@needs_onnx
@pytest.mark.slow
def test_paper_gates_export_and_compile(tmp_path):
    entry = ZOO["timm_vit_cls"]
    ee = eexit.attach(entry.build(), gates="paper")
    policy = ee.default_policy(0.3)
    runtime = OnnxEarlyExit(ee.export(tmp_path / "paper"))
    with torch.no_grad():
        want = {b: ee(_images(ee, b), policy=policy) for b in BATCHES}
        ee.compile(backend="aot_eager")
        for b in BATCHES:
            _assert_same(runtime(_images(ee, b), policy=runtime.default_policy(0.3)), want[b])
            _assert_same(ee(_images(ee, b), policy=policy), want[b])


@needs_onnx
@pytest.mark.slow
def test_the_manifest_refuses_another_adapter_and_mixed_files(exported, tmp_path):
    ee, _, folder = exported("timm_vit_cls")
    other = _attach("timm_vit_cls")
    with torch.no_grad():
        other.gates[0].linear.bias.add_(1.0)  # the same backbone, another adapter
    with pytest.raises(AdapterError, match="another adapter"):
        OnnxEarlyExit(folder, expected_adapter=other)
    with pytest.raises(AdapterError, match="another adapter"):
        OnnxEarlyExit(folder, expected_adapter="sha256:" + "0" * 64)
    OnnxEarlyExit(folder, expected_adapter=eexit.export.adapter_fingerprint(ee))

    copy = tmp_path / "copy"
    copy.mkdir()
    for file in folder.iterdir():
        (copy / file.name).write_bytes(file.read_bytes())
    (copy / "segment_1.onnx").write_bytes((folder / "segment_0.onnx").read_bytes())
    with pytest.raises(AdapterError, match="sha256 differs"):
        OnnxEarlyExit(copy)
    (copy / "segment_1.onnx").unlink()
    with pytest.raises(AdapterError, match="missing"):
        OnnxEarlyExit(copy)
    manifest = json.loads((folder / "eexit_export.json").read_text())
    for change, message in (
        ({"manifest_version": 99}, "newer than this eexit reads"),
        ({"graph_format": "torch"}, "'torch' graphs, not 'onnx'"),
        ({"segments": [1, 2, 3, 4]}, "malformed segment entries"),
        ({"format": "something"}, "not an eexit export manifest"),
    ):
        (copy / "eexit_export.json").write_text(json.dumps({**manifest, **change}))
        with pytest.raises(AdapterError, match=message):
            OnnxEarlyExit(copy)
    (copy / "eexit_export.json").write_text("{not json")
    with pytest.raises(AdapterError, match="not valid JSON"):
        OnnxEarlyExit(copy)
    with pytest.raises(AdapterError, match=r"no eexit_export\.json"):
        OnnxEarlyExit(tmp_path)


@needs_onnx
@pytest.mark.slow
def test_runtime_refuses_bad_images(exported):
    ee, _, folder = exported("timm_vit_cls")
    runtime = OnnxEarlyExit(folder)
    images = _images(ee, 3)
    with pytest.raises(EexitValueError, match="shape"):
        runtime(images[:, :, :8])
    with pytest.raises(EexitTypeError, match="float64"):
        runtime(images.double())
    images[1, 0, 0, 0] = float("nan")
    with pytest.raises(EexitValueError, match="NaN"):
        runtime(images)
    runtime.check_inputs = False
    runtime(images)  # the switch skips the check
    with pytest.raises(EexitValueError, match="gates"):
        runtime(_images(ee, 2), policy=eexit.GatePolicy(0.5, gates="paper"))
    empty = runtime(_images(ee, 0))
    assert empty.logits.shape == (0, ee.num_classes) and empty.exit_index.shape == (0,)


@needs_onnx
@pytest.mark.slow
def test_export_writes_atomically_and_refuses_to_overwrite(exported, monkeypatch):
    ee, _, folder = exported("timm_vit_cls")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    with pytest.raises(FileExistsError, match="overwrite=True"):
        ee.export(folder)

    def broken(*args, **kwargs):
        raise RuntimeError("exporter crashed")

    monkeypatch.setattr(eexit.export, "_export_onnx", broken)
    with pytest.raises(RuntimeError, match="crashed"):
        ee.export(folder, overwrite=True)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before  # the previous export is intact
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]  # no staging folder left behind


def test_export_arguments_are_checked(tmp_path):
    ee = _attach("timm_vit_cls")
    with pytest.raises(EexitValueError, match="not an export format"):
        ee.export(tmp_path / "x", format="tflite")
    with pytest.raises(EexitValueError, match="example_batch"):
        ee.export(tmp_path / "x", example_batch=1)
    assert not (tmp_path / "x").exists()
    data = tmp_path / "data"
    data.mkdir()
    (data / "keep.txt").write_text("not an export")
    with pytest.raises(FileExistsError, match="never another folder"):
        ee.export(data, overwrite=True)
    assert (data / "keep.txt").read_text() == "not an export"
    with pytest.raises(EexitValueError, match="float32"):
        ee.to(torch.bfloat16).export(tmp_path / "bf16")


def test_a_missing_extra_is_named(monkeypatch, tmp_path):
    for module in ("onnx", "onnxscript", "onnxruntime"):
        monkeypatch.setitem(sys.modules, module, None)  # what an install without the extra looks like to import
    ee = _attach("timm_vit_cls")
    with pytest.raises(ImportError, match=r"pip install 'eexit\[export\]'"):
        ee.export(tmp_path / "x")
    assert not (tmp_path / "x").exists() and not list(tmp_path.iterdir())
    with pytest.raises(ImportError, match=r"eexit\[export\]"):
        OnnxEarlyExit(tmp_path)


# ---------------------------------------------------------------------- torch.export programs
@pytest.mark.slow
def test_torch_export_programs_equal_eager(tmp_path):
    ee = _attach("timm_vit_cls")
    policy = _policy(ee)
    folder = ee.export(tmp_path / "pt2", format="torch")
    manifest = read_manifest(folder, "torch")
    # Programs this test wrote itself: torch.export.load is fine here (eexit never loads .pt2 files for a user).
    programs = [torch.export.load(str(folder / entry["file"])).module() for entry in manifest["segments"]]
    for b in BATCHES:
        images = _images(ee, b)
        recorder = eexit.recorder.ExitRecorder(None, ee.num_exits, b, images.device, policy)
        run_segments(programs, images, recorder)
        logits, exit_index = recorder.finish()
        with torch.no_grad():
            want = ee(images, policy=policy)
        assert torch.equal(exit_index, want.exit_index)
        torch.testing.assert_close(logits, want.logits, rtol=1e-4, atol=1e-4)


def test_compile_gives_every_segment_its_own_graph_beyond_dynamos_recompile_limit():
    # 12 exits: with one shared forward, dynamo would stop compiling after 8 variants and run the rest eagerly.
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=32, depth=12, num_heads=2,
                              num_classes=5)  # fmt: skip
    ee = eexit.attach(model.eval())
    assert ee.num_exits == 12 > torch._dynamo.config.recompile_limit
    torch._dynamo.reset()
    counters.clear()
    ee.compile(backend="aot_eager")
    with torch.no_grad():
        for b in (1, 5, 9):
            out = ee(_images(ee, b), policy=ee.default_policy(1.0))
            assert out.exit_index.eq(11).all()
    assert counters["stats"]["unique_graphs"] == 12


def test_compiled_model_in_training_mode_runs_eagerly_and_adapter_swaps_apply(monkeypatch):
    ee = _attach("timm_vit_cls")
    images = _images(ee, 6)
    ee.compile(backend="aot_eager")
    with torch.no_grad():
        before = ee(images)
        assert before.exit_index.eq(ee.num_exits - 1).all()  # these random gates send everyone to the end
        ee.add_adapter("other")  # a copy of the default adapter...
        ee.gates[0].linear.bias.add_(50.0)  # ...while the live default now sends everyone out at exit 0
        assert ee(images).exit_index.eq(0).all()  # the compiled graphs read the live weights, not a snapshot
        ee.set_adapter("other")  # swapping loads the other tensors into the same modules
        swapped = ee(images)
        assert torch.equal(swapped.exit_index, before.exit_index)
        torch.testing.assert_close(swapped.logits, before.logits)
        ee.set_adapter("default")
        assert ee(images).exit_index.eq(0).all()

    def refuse(*args, **kwargs):
        raise AssertionError("a compiled segment ran in training mode")

    monkeypatch.setattr(eexit.compiling.CompiledSegment, "__call__", refuse)
    ee.train()
    with torch.no_grad():
        ee(images)  # eager segments: no compiled call
    ee.eval()
    with pytest.raises(AssertionError, match="compiled segment ran"):
        ee(images)  # and in eval mode the compiled ones are used again
