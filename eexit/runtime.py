"""Serve an exported early-exit model: ONNX Runtime sessions, one per segment, with eexit's exit bookkeeping.

``OnnxEarlyExit(folder)`` reads the manifest :func:`eexit.export.export` wrote, checks every graph file against
the sha256 recorded there, opens one ONNX Runtime session per segment and runs them as the eager forward runs its
segments (:func:`eexit.segments.run_segments`): after each segment the same :class:`~eexit.recorder.ExitRecorder`
and policy decide who stops, and only the samples that go on are fed to the next graph. Outputs, exit indices
and costs come back in input order as an :class:`~eexit.outputs.EarlyExitOutput`.

Only JSON and the ``.onnx`` graphs (protobuf, never unpickled) are read. onnxruntime comes with the
``eexit[export]`` extra.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ._checks import all_finite
from .errors import AdapterError, EexitTypeError, EexitValueError
from .export import MANIFEST_NAME, MANIFEST_VERSION, adapter_fingerprint, require
from .inference import ExitPolicy, GatePolicy
from .outputs import EarlyExitOutput
from .recorder import ExitRecorder
from .segments import run_segments

__all__ = ["OnnxEarlyExit", "read_manifest"]

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "float64": torch.float64}


def read_manifest(folder: str | os.PathLike[str], graph_format: str | None = None) -> dict[str, Any]:
    """Read and check an export's manifest: its fields, and every graph file against its recorded sha256.

    Raises:
        AdapterError: no manifest, a malformed one, another graph format, or a graph file that is missing or is not
            the one exported (sha256 differs).
    """
    root = Path(folder)
    path = root / MANIFEST_NAME
    if not path.is_file():
        raise AdapterError(f"{root} holds no {MANIFEST_NAME}; is it a folder written by ee.export()?")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise AdapterError(f"{path} is not valid JSON ({err}); export the model again.") from None
    need = ("format", "manifest_version", "graph_format", "num_exits", "gates", "threshold", "segments", "exit_flops")
    missing = [key for key in need if not isinstance(manifest, dict) or key not in manifest]
    if missing or manifest.get("format") != "eexit-segments":
        raise AdapterError(f"{path} is not an eexit export manifest (missing {missing}); export the model again.")
    if not isinstance(manifest["manifest_version"], int) or not isinstance(manifest["segments"], list):
        raise AdapterError(f"{path} is not an eexit export manifest (malformed fields); export the model again.")
    if manifest["manifest_version"] > MANIFEST_VERSION:
        raise AdapterError(
            f"{path} has manifest version {manifest['manifest_version']}, newer than this eexit reads "
            f"({MANIFEST_VERSION}); upgrade eexit."
        )
    if graph_format is not None and manifest["graph_format"] != graph_format:
        raise AdapterError(f"{root} holds {manifest['graph_format']!r} graphs, not {graph_format!r} ones.")
    segments = manifest["segments"]
    if len(segments) != manifest["num_exits"] or len(manifest["exit_flops"]) != manifest["num_exits"]:
        raise AdapterError(f"{path}: {manifest['num_exits']} exits but {len(segments)} segments; export again.")
    if not all(isinstance(entry, dict) and isinstance(entry.get("file"), str) for entry in segments):
        raise AdapterError(f"{path}: malformed segment entries; export the model again.")
    files = dict(manifest.get("files") or {})
    for entry in segments:
        files.setdefault(entry["file"], entry.get("sha256"))
    for name, digest in files.items():
        file = root / name
        if Path(name).name != name or not file.is_file():
            raise AdapterError(f"{root}: {name!r}, a file of this export, is missing; export the model again.")
        if hashlib.sha256(file.read_bytes()).hexdigest() != digest:
            raise AdapterError(
                f"{file} is not the file this export's manifest records (sha256 differs): the folder mixes files "
                "of different exports. Export the model again into an empty folder."
            )
    return manifest


def _segments_compute_exits(*args: Any) -> Any:
    raise AssertionError("the recorder's exit function is never called here: the segments compute the exits")


class OnnxEarlyExit:
    """Early exit with ONNX Runtime over an exported folder (``ee.export(folder)``).

    Args:
        folder: the export.
        providers: ONNX Runtime execution providers (default: CPU; e.g. ``["CUDAExecutionProvider"]``).
        expected_adapter: refuse the export unless it was made from this adapter: an
            :class:`~eexit.EarlyExitModel` (its active adapter's fingerprint is compared) or a fingerprint string
            (``"sha256:..."``, as :func:`eexit.export.adapter_fingerprint` gives).
        session_options: an ``onnxruntime.SessionOptions`` for every session. The default uses torch's thread count
            and turns ONNX Runtime's thread spinning off: the segments' sessions run one after another, and a
            session whose idle threads spin would take the cores the next one needs (measured: 5x slower at batch 1
            with 12 spinning sessions on 2 cores).

    Call it on images ``[B, C, H, W]`` (numpy or torch, the manifest's dtype) for an
    :class:`~eexit.outputs.EarlyExitOutput` (torch tensors on the CPU).
    """

    def __init__(
        self,
        folder: str | os.PathLike[str],
        *,
        providers: Sequence[str] | None = None,
        expected_adapter: Any = None,
        session_options: Any = None,
    ) -> None:
        ort = require("onnxruntime", "eexit.runtime.OnnxEarlyExit")
        self.folder = Path(folder)
        self.manifest = read_manifest(self.folder, "onnx")
        if expected_adapter is not None:
            self._check_adapter(expected_adapter)
        providers = list(providers) if providers is not None else ["CPUExecutionProvider"]
        if session_options is None:
            session_options = ort.SessionOptions()
            session_options.intra_op_num_threads = torch.get_num_threads()
            session_options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.sessions = [
            ort.InferenceSession(str(self.folder / entry["file"]), sess_options=session_options, providers=providers)
            for entry in self.manifest["segments"]
        ]
        self._inputs = [[i.name for i in session.get_inputs()] for session in self.sessions]
        for k, (names, entry) in enumerate(zip(self._inputs, self.manifest["segments"])):
            if names != entry["inputs"]:
                raise AdapterError(f"segment {k}'s graph takes {names}, its manifest says {entry['inputs']}.")
        self.num_exits = int(self.manifest["num_exits"])
        self.input_shape = [int(s) for s in self.manifest.get("input_shape", [])]
        dtype = self.manifest.get("input_dtype", "float32")
        if dtype not in _DTYPES:
            raise AdapterError(f"{self.folder}: graphs taking {dtype} images cannot run here; export in float32.")
        self.dtype = _DTYPES[dtype]
        self.num_classes = int(self.manifest.get("num_classes", 0))
        self._flops = torch.tensor(self.manifest["exit_flops"], dtype=torch.float64)
        #: Refuse images with NaN or Inf pixels (set False to skip the check for a trusted pipeline).
        self.check_inputs = True

    def _check_adapter(self, expected: Any) -> None:
        fingerprint = expected if isinstance(expected, str) else adapter_fingerprint(expected)
        if fingerprint != self.manifest.get("adapter_fingerprint"):
            recorded = self.manifest.get("adapter_fingerprint")
            raise AdapterError(
                f"{self.folder} was exported from another adapter (fingerprint {recorded}, expected {fingerprint}): "
                "the IMs, gates or threshold changed since. Export the model again."
            )

    def default_policy(self, threshold: float | None = None) -> GatePolicy:
        """The gates' rule at ``threshold`` (default: the threshold the model had when exported)."""
        return GatePolicy(self.manifest["threshold"] if threshold is None else threshold, self.manifest["gates"])

    def _segment(self, k: int) -> Any:
        session, names = self.sessions[k], self._inputs[k]

        def run(*carry: torch.Tensor) -> list[torch.Tensor]:
            feeds = {name: tensor.numpy() for name, tensor in zip(names, carry)}
            return [torch.from_numpy(out) for out in session.run(None, feeds)]

        return run

    def _check(self, images: Any) -> torch.Tensor:
        if isinstance(images, np.ndarray):
            images = torch.from_numpy(images)
        if not isinstance(images, torch.Tensor):
            raise EexitTypeError(f"expected images as a numpy array or torch.Tensor, got {type(images).__name__}.")
        images = images.detach().cpu()
        if images.dim() != 4 or (self.input_shape and list(images.shape[1:]) != self.input_shape):
            raise EexitValueError(
                f"expected images of shape [B, {', '.join(map(str, self.input_shape))}] (the exported input size), "
                f"got {tuple(images.shape)}."
            )
        if images.dtype != self.dtype:
            raise EexitTypeError(f"images are {images.dtype} but the graphs take {self.dtype}; convert them first.")
        if self.check_inputs and not all_finite(images):
            raise EexitValueError("images contain NaN or Inf pixels; clean or re-normalise the input.")
        return images.contiguous()

    def __call__(self, images: Any, policy: ExitPolicy | None = None) -> EarlyExitOutput:
        """Early exit on ``images``; ``policy`` defaults to the gates at the exported threshold."""
        images = self._check(images)
        if policy is None:
            policy = self.default_policy()
        elif isinstance(policy, GatePolicy) and policy.gates != self.manifest["gates"]:
            raise EexitValueError(
                f"{policy!r} reads {policy.gates!r} gates, but these graphs hold {self.manifest['gates']!r} gates; "
                f"use .default_policy({policy.threshold:g})."
            )
        if images.shape[0] == 0:  # nothing to run; the shapes an eager forward returns
            empty = torch.zeros(0, self.num_classes, dtype=images.dtype)
            return EarlyExitOutput(empty, torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.float64))
        recorder = ExitRecorder(_segments_compute_exits, self.num_exits, images.shape[0], images.device, policy)
        run_segments([self._segment(k) for k in range(self.num_exits)], images, recorder)
        logits, exit_index = recorder.finish()
        return EarlyExitOutput(logits=logits, exit_index=exit_index, cost=self._flops[exit_index])

    def __repr__(self) -> str:
        return f"OnnxEarlyExit({str(self.folder)!r}, exits={self.num_exits}, gates={self.manifest['gates']!r})"
