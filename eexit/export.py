"""Export an early-exit model as one graph per segment plus a JSON manifest, for serving without eexit's forward.

``ee.export(folder)`` writes::

    folder/
      eexit_export.json     the manifest: exit order and names, costs, gate kind and threshold, input shape,
                            each graph's file, sha256 and input / output names, the backbone's and the
                            adapter's fingerprints
      segment_0.onnx ...    one graph per exit (``format="onnx"``), batch axis dynamic (batch 1 included)
      segment_0.pt2 ...     or torch.export programs (``format="torch"``)

:class:`eexit.runtime.OnnxEarlyExit` runs an ONNX export with ONNX Runtime and shrinks the batch between
segments exactly as the eager forward does. onnx, onnxscript and onnxruntime come with the ``eexit[export]``
extra and are imported only here and in the runtime.

The folder is written beside the target and renamed into place, so a failed export never leaves a half-written
folder, and an existing export is replaced only with ``overwrite=True``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ._version import __version__
from .backbones.base import StagedSpec
from .errors import EexitValueError
from .segments import carry_names, output_names, probe_images, run_all

if TYPE_CHECKING:
    from .model import EarlyExitModel

__all__ = ["MANIFEST_NAME", "adapter_fingerprint", "export", "require"]

MANIFEST_NAME = "eexit_export.json"
MANIFEST_VERSION = 1
FORMATS = {"onnx": ".onnx", "torch": ".pt2"}


def require(module: str, what: str) -> Any:
    """Import an optional dependency, or say which extra installs it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(
            f"{what} needs the optional package {module!r}, which is not installed ({err}). Install eexit's export "
            "extra: pip install 'eexit[export]'."
        ) from None


def adapter_fingerprint(ee: EarlyExitModel) -> str:
    """sha256 of the active adapter's tensors (names, dtypes, shapes, values) and its gate threshold."""
    from ._format import safetensors_bytes

    state = {k: v.detach().to("cpu").contiguous() for k, v in sorted(ee.adapter_state_dict().items())}
    digest = hashlib.sha256(safetensors_bytes(state, metadata={"threshold": repr(float(ee.config.threshold))}))
    return "sha256:" + digest.hexdigest()


def _example_carries(ee: EarlyExitModel, batch: int) -> list[tuple[torch.Tensor, ...]]:
    """Each segment's input on a random batch (nobody exits), to trace the graphs with."""
    assert ee.cost_table is not None
    images = probe_images(ee, batch, ee.cost_table.input_shape)
    with torch.no_grad():
        outputs = run_all(ee.segments, images)
    return [(images,)] + [tuple(out[2:]) for out in outputs[:-1]]


def _state_tensors(ee: EarlyExitModel, carries: list[tuple[torch.Tensor, ...]]) -> int:
    if not isinstance(ee.spec, StagedSpec) or len(carries) < 2:
        return 0
    return len(carries[1]) - (2 if ee.uses_history else 0) - 1  # carry_1 = history, logits_0, state


def _export_onnx(segment: torch.nn.Module, args: tuple[torch.Tensor, ...], path: Path, names: tuple, opset: int | None):
    inputs, outputs = names
    batch = torch.export.Dim("batch", min=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's deprecation chatter is not the user's business
        program = torch.onnx.export(
            segment,
            args,
            dynamo=True,
            input_names=inputs,
            output_names=outputs,
            dynamic_shapes=(tuple({0: batch} for _ in args),),  # forward(*carry): one varargs tuple
            opset_version=opset,
            verbose=False,
            optimize=True,
        )
    program.save(str(path))


def _export_torch(segment: torch.nn.Module, args: tuple[torch.Tensor, ...], path: Path) -> None:
    batch = torch.export.Dim("batch", min=1)
    program = torch.export.export(segment, args, dynamic_shapes=(tuple({0: batch} for _ in args),))
    torch.export.save(program, str(path))


def export(
    ee: EarlyExitModel,
    folder: str | os.PathLike[str],
    format: str = "onnx",
    *,
    overwrite: bool = False,
    opset: int | None = None,
    example_batch: int = 2,
) -> Path:
    """Write one graph per segment of ``ee`` and a manifest into ``folder``.

    Args:
        ee: an attached model whose backbone can run as segments (``ee.segments``).
        folder: where to write; it must not exist unless ``overwrite=True``.
        format: ``"onnx"`` (ONNX Runtime, TensorRT, ...) or ``"torch"`` (``torch.export`` programs, ``.pt2``).
        overwrite: replace an existing export in ``folder``.
        opset: ONNX opset (default: the exporter's).
        example_batch: batch size traced with (the batch axis is dynamic either way; >= 2).

    Returns:
        The folder.

    Raises:
        SegmentsUnavailable: the backbone cannot be run as segments (the reason is named), or was detached.
        EexitValueError: an unknown format, ``example_batch`` < 2, a bf16 backbone for ONNX, no cost table.
        ImportError: the ``export`` extra is missing (for ONNX).
        FileExistsError: ``folder`` exists and ``overwrite`` is False, or it holds something else than an export.
    """
    if format not in FORMATS:
        raise EexitValueError(f"format={format!r} is not an export format; expected one of {sorted(FORMATS)}.")
    if isinstance(example_batch, bool) or not isinstance(example_batch, int) or example_batch < 2:
        raise EexitValueError(
            f"example_batch must be an int >= 2 (tracing specialises batch 1), got {example_batch!r}."
        )
    if ee.cost_table is None:
        raise EexitValueError("this model has no cost table; build it with eexit.attach before exporting.")
    segments = ee.segments  # raises with the reason when there are none (or the exits were detached)
    param = next(ee.backbone.parameters())
    if format == "onnx" and param.dtype not in (torch.float32, torch.float16):
        raise EexitValueError(
            f"the backbone is {param.dtype}; ONNX Runtime runs float32 or float16 graphs. Export a float32 copy: "
            "ee.float().export(...) (or .half())."
        )
    target = Path(folder)
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} exists; pass overwrite=True to replace the export there.")
    if target.exists() and not (target / MANIFEST_NAME).is_file():
        raise FileExistsError(
            f"{target} exists and holds no {MANIFEST_NAME}: overwrite=True replaces an earlier export only, never "
            "another folder. Choose a new folder."
        )
    if format == "onnx":
        require("onnx", "ee.export(format='onnx')")
        require("onnxscript", "ee.export(format='onnx')")
    was_training = ee.training
    ee.eval()  # before the example forward: in training mode it would update BatchNorm statistics
    staging = target.parent / f".{target.name}.{uuid.uuid4().hex}.tmp"
    entries = []
    try:
        carries = _example_carries(ee, example_batch)
        states = _state_tensors(ee, carries)
        staging.mkdir(parents=True)
        for k, (segment, args) in enumerate(zip(segments, carries)):
            names = (carry_names(ee, k, states), output_names(ee, k, states))
            path = staging / f"segment_{k}{FORMATS[format]}"
            if format == "onnx":
                _export_onnx(segment, args, path, names, opset)
            else:
                _export_torch(segment, args, path)
            entries.append(
                {
                    "file": path.name,
                    "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
                    "inputs": names[0],
                    "outputs": names[1],
                }
            )
        # Every file written (a graph over 2 GB brings its external-data file along) is checksummed.
        files = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(staging.iterdir())}
        (staging / MANIFEST_NAME).write_text(json.dumps(_manifest(ee, format, entries, files), indent=2) + "\n")
        # The old export is moved aside, the new one moved in, then the old one removed: at every instant one
        # complete export is at `target` or beside it.
        old = target.parent / f".{target.name}.{uuid.uuid4().hex}.old"
        if target.exists():
            os.replace(target, old)
        os.replace(staging, target)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        ee.train(was_training)
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target


def _manifest(ee: EarlyExitModel, format: str, segments: list[dict[str, Any]], files: dict[str, str]) -> dict[str, Any]:
    from ._fingerprint import backbone_fingerprint

    assert ee.cost_table is not None
    param = next(ee.backbone.parameters())
    return {
        "format": "eexit-segments",
        "manifest_version": MANIFEST_VERSION,
        "eexit_version": __version__,
        "torch_version": torch.__version__,
        "graph_format": format,
        "backbone": {
            "family": ee.spec.name,
            "model_class": type(ee.backbone).__name__,
            "fingerprint": backbone_fingerprint(ee.backbone),
        },
        "adapter_fingerprint": adapter_fingerprint(ee),
        "adapter_name": ee.active_adapter,
        "num_exits": ee.num_exits,
        "exit_names": list(ee.exit_names),
        "num_classes": ee.num_classes,
        "gates": ee.config.gates,
        "threshold": float(ee.config.threshold),
        "input_shape": list(ee.cost_table.input_shape),
        "input_dtype": str(param.dtype).removeprefix("torch."),
        "exit_flops": list(ee.cost_table.exit_flops),
        "backbone_flops": ee.cost_table.backbone_flops,
        "segments": segments,
        "files": files,
    }
