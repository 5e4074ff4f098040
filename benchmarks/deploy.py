"""Early exit where models are served: eager, torch.compile and ONNX Runtime, each against the bare backbone run
the same way, at batch 1 and 64.

    python benchmarks/deploy.py [--model vit_small_patch16_224] [--batches 1,64] [--modes eager,compiled,onnx]
                                [--repeats 5] [--repeats-b1 25] [--json benchmarks/deploy.json]
    python benchmarks/deploy.py --breakdown [--repeats-b1 40]   # where eager batch-1 overhead goes

For a timm ViT (random weights, 224 px, 11 IMs + the head) it measures, per mode and batch size:

* overhead with no exit: time(eexit, every sample to the last exit, every gate computed) / time(bare) - 1, with
  the model's own gate policy at τ = 1 (no gate says "exit"); and the same with a policy that reads no gate
  (confidence thresholds: the eager forward then skips the gates);
* realised / predicted speed-up at about 25 / 50 / 75 % of the backbone's cost: every sample leaves at the exit
  nearest the target ("one exit"), or at batch 64 also a share leaves at the first exit and the rest run to the
  end ("mixed"); exits are imposed (gates still computed), realised = time(bare) / time(eexit), predicted =
  backbone FLOPs / mean FLOPs of the pattern.

Bare references: eager = ``model(x)``; compiled = ``torch.compile(model)`` (static shapes, compiled per batch
size: the best case for the bare model); onnx = the whole backbone exported with a dynamic batch and run by ONNX
Runtime with the same threads and its default thread spinning (eexit's sessions do not spin: they run one after
another). Variants interleave (A B C A B C ...) and medians are reported, because these
machines are noisy. Endpoints fixed before running: overhead at batch 1 (goal <= 3 %, eager) and realised /
predicted (goal >= 0.9 everywhere).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import timm
import torch
from speed import _patterns, _time  # this folder is on the path when a script here runs

import eexit
from eexit.inference import FixedExitPolicy, ThresholdPolicy


def _onnx_bare(model: torch.nn.Module, folder: Path, threads: int) -> Callable[[torch.Tensor], object]:
    import onnxruntime as ort

    path = folder / "bare.onnx"
    batch = torch.export.Dim("batch", min=1)
    program = torch.onnx.export(
        model, (torch.randn(2, 3, 224, 224),), dynamo=True, dynamic_shapes=({0: batch},), verbose=False
    )
    program.save(str(path))
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda x: session.run(None, {name: x.numpy()})


def _runner(mode: str, model, ee, folder: Path, threads: int):
    """(bare forward, early-exit forward(x, policy)) for a mode."""
    if mode == "eager":
        return model, lambda x, policy: ee(x, policy=policy)
    if mode == "compiled":
        bare = torch.compile(model)
        ee.compile()
        return bare, lambda x, policy: ee(x, policy=policy)
    if mode == "onnx":
        from eexit.runtime import OnnxEarlyExit

        ee.uncompile()
        ee.export(folder / "segments", overwrite=True)
        runtime = OnnxEarlyExit(folder / "segments")  # its defaults: torch's threads, no spinning between sessions
        return _onnx_bare(model, folder, threads), lambda x, policy: runtime(x, policy=policy)
    raise SystemExit(f"unknown mode {mode!r}")


def _measure(mode: str, batch: int, bare, early, ee, args, setup: float) -> list[dict]:
    """Time the bare backbone and every eexit variant at one batch size, interleaved; the table rows."""
    fractions = ee.cost_table.fraction_of_backbone()
    last = ee.num_exits - 1
    x = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(batch))
    patterns = _patterns(fractions, batch, [0.25, 0.50, 0.75])
    if batch == 1:
        patterns = {k: v for k, v in patterns.items() if "mixed" not in k}
    no_gate = ThresholdPolicy([2.0] * last + [0.0])  # a confidence policy nobody passes
    runs: dict[str, Callable[[], object]] = {
        "bare": lambda: bare(x),
        "no exit, gates (overhead)": lambda: early(x, ee.default_policy(1.0)),
        "no exit, no gate read (overhead)": lambda: early(x, no_gate),
    }
    for name, index in patterns.items():
        if not name.startswith("no exit"):
            policy = FixedExitPolicy(index, reads_gates=True)  # imposed exits, the gates' cost kept in
            runs[name] = lambda policy=policy: early(x, policy)
    start = time.perf_counter()
    for fn in runs.values():  # warm-up (and the compilations, counted apart)
        fn()
    warm = time.perf_counter() - start
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.repeats_b1 if batch == 1 else args.repeats):
        for name, fn in runs.items():
            times[name].append(_time(fn, torch.device("cpu")))
    t_bare = statistics.median(times["bare"])
    print(f"\n{mode}, batch {batch}: bare {1000 * t_bare:.2f} ms (setup {setup:.0f} s, warm-up {warm:.0f} s)")
    print("| pattern | mean cost (% of backbone) | ms | realised | predicted | realised / predicted |")
    print("|---|---|---|---|---|---|")
    rows = []
    for name in runs:
        if name == "bare":
            continue
        t = statistics.median(times[name])
        overhead = name.startswith("no exit")
        frac = fractions[last] if overhead else sum(fractions[int(k)] for k in patterns[name]) / batch
        realised, predicted = t_bare / t, 1.0 / frac
        print(
            f"| {name} | {100 * frac:.1f} | {1000 * t:.2f} | {realised:.3f} | {predicted:.3f} | "
            f"{realised / predicted:.3f} |"
        )
        rows.append(
            {
                "mode": mode,
                "batch": batch,
                "pattern": name,
                "cost_fraction": frac,
                "ms": 1000 * t,
                "bare_ms": 1000 * t_bare,
                "overhead": t / t_bare - 1 if overhead else None,
                "realised": realised,
                "predicted": predicted,
                "spread_ms": [1000 * min(times[name]), 1000 * max(times[name])],
            }
        )
    return rows


def _breakdown(model, ee, repeats: int) -> list[dict]:
    """Where eager batch-1 overhead goes: the backbone run block by block with more of each exit added each time
    (no exit taken), against the bare forward, interleaved. Token backbones only."""
    from eexit.gates import ExitHistory

    spec, blocks = ee.spec, [module for _, module in ee.spec.blocks(model)]
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(1))

    def cut(level: int) -> Callable[[], object]:
        def run() -> object:
            hidden, history = spec.embed(model, x), ExitHistory()
            for k, block in enumerate(blocks):
                hidden = block(hidden)
                if k in ee.exit_blocks and level >= 1:
                    feature = spec.pool_at(model, hidden, k)
                    if level >= 2:
                        logits = ee.heads[ee.exit_blocks.index(k)](feature)
                        if level >= 3:
                            _, history = ee.gates[ee.exit_blocks.index(k)].step(logits, history)
            return spec.final_logits(model, hidden)

        return run

    runs = {
        "bare forward": lambda: model(x),
        "blocks one by one": cut(0),
        "+ pooling at each exit": cut(1),
        "+ IM heads": cut(2),
        "+ gates (statistics, Linear, next history)": cut(3),
        "eexit forward (+ policy, recorder, segments)": lambda: ee(x, policy=ee.default_policy(1.0)),
    }
    for fn in runs.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            times[name].append(_time(fn, torch.device("cpu")))
    bare = statistics.median(times["bare forward"])
    print("\nbatch-1 overhead, eager, cumulative (median ms, vs the bare forward)")
    rows = []
    for name, values in times.items():
        t = statistics.median(values)
        print(f"| {name} | {1000 * t:.2f} | {100 * (t / bare - 1):+.1f} % |")
        rows.append({"mode": "breakdown", "batch": 1, "pattern": name, "ms": 1000 * t, "overhead": t / bare - 1})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="vit_small_patch16_224")
    parser.add_argument("--batches", default="1,64")
    parser.add_argument("--modes", default="eager,compiled,onnx")
    parser.add_argument("--repeats", type=int, default=5, help="repeats at batch > 1")
    parser.add_argument("--repeats-b1", type=int, default=25, help="repeats at batch 1 (each run is short)")
    parser.add_argument("--json", default=None)
    parser.add_argument("--breakdown", action="store_true", help="only the eager batch-1 overhead, part by part")
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    threads = torch.get_num_threads()

    torch.manual_seed(0)
    model = timm.create_model(args.model, pretrained=False, num_classes=100).eval()
    ee = eexit.attach(model)
    results = {
        "model": args.model,
        "device": platform.processor() or "cpu",
        "cores": os.cpu_count(),
        "threads": threads,
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "rows": [],
    }
    print(f"{args.model}, {ee.num_exits} exits, cpu threads {threads}, torch {torch.__version__}")
    if args.breakdown:
        with torch.inference_mode():
            results["rows"] = _breakdown(model, ee, args.repeats_b1)
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
        return
    with tempfile.TemporaryDirectory() as tmp, torch.inference_mode():
        for mode in args.modes.split(","):
            start = time.perf_counter()
            bare, early = _runner(mode, model, ee, Path(tmp), threads)
            setup = time.perf_counter() - start
            for batch in batches:
                results["rows"] += _measure(mode, batch, bare, early, ee, args, setup)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
