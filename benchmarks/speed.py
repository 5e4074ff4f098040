"""Speed of real early exit, measured side by side in one run.

On a vit_small-sized timm ViT (random weights, 224 px, batch 64 by default) this measures

(a) the overhead of the attached exits when no sample exits: time(eexit, everyone to the last exit) /
    time(bare backbone) - 1  (target: <= 5 %);
(b) the realised speed-up for exit patterns costing about 25 / 50 / 75 % of the full model, against the
    speed-up the FLOPs predict: realised = time(bare) / time(eexit), predicted = backbone FLOPs / mean FLOPs
    (target: realised >= 0.85 x predicted).

Two patterns per cost: "one exit" (every sample leaves at the exit nearest the target) and "mixed" (a share
leaves at the first exit, the rest run to the end: the batch drops sharply once, the hard case for shrinking).
Timings interleave the variants (A B C A B C ...) and report medians, because these machines are noisy.

    python benchmarks/speed.py [--model vit_small_patch16_224] [--batch 64] [--repeats 5] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable

import timm
import torch

import eexit
from eexit.inference import FixedExitPolicy


def _time(fn: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def _patterns(fractions: list[float], batch: int, targets: list[float]) -> dict[str, torch.Tensor]:
    """Exit index per sample for each (target cost, pattern)."""
    num_exits = len(fractions)
    out: dict[str, torch.Tensor] = {"no exit (overhead)": torch.full((batch,), num_exits - 1)}
    for target in targets:
        nearest = min(range(num_exits), key=lambda k: abs(fractions[k] - target))
        out[f"{target:.0%} one exit"] = torch.full((batch,), nearest)
        # p * f0 + (1 - p) * f_last = target  ->  share p leaves at exit 0
        share = (fractions[-1] - target) / (fractions[-1] - fractions[0])
        n_early = round(share * batch)
        mixed = torch.full((batch,), num_exits - 1)
        mixed[torch.randperm(batch, generator=torch.Generator().manual_seed(0))[:n_early]] = 0
        out[f"{target:.0%} mixed"] = mixed
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="vit_small_patch16_224")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = parser.parse_args()

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    torch.manual_seed(0)
    model = timm.create_model(args.model, pretrained=False, num_classes=100).to(device, dtype).eval()
    x = torch.randn(args.batch, 3, 224, 224, device=device, dtype=dtype)

    with torch.inference_mode():
        bare_ref = model(x)
    ee = eexit.attach(model)
    table = ee.cost_table
    fractions = table.fraction_of_backbone()
    patterns = _patterns(fractions, args.batch, [0.25, 0.50, 0.75])
    # reads_gates=True: the gates are computed as a gate policy would (the cost this benchmark has always measured)
    policies = {name: FixedExitPolicy(index.to(device), reads_gates=True) for name, index in patterns.items()}

    runs: dict[str, Callable[[], object]] = {"bare backbone": lambda: model(x)}
    for name, policy in policies.items():
        runs[name] = lambda policy=policy: ee(x, policy=policy)

    times: dict[str, list[float]] = {name: [] for name in runs}
    with torch.inference_mode():
        # the hooks are inactive outside an eexit call: the bare run measures the untouched backbone
        assert torch.equal(model(x), bare_ref)
        for fn in runs.values():  # warm-up
            fn()
        for _ in range(args.repeats):
            for name, fn in runs.items():
                times[name].append(_time(fn, device))

    bare = statistics.median(times["bare backbone"])
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(
        f"\n{args.model}, batch {args.batch}, {args.dtype}, {device.type} ({device_name}), "
        f"threads {torch.get_num_threads()}, cores {os.cpu_count()}, torch {torch.__version__}, "
        f"median of {args.repeats}"
    )
    print(f"bare backbone: {1000 * bare:.1f} ms per batch, {table.backbone_flops / 1e9:.3f} GFLOPs per image\n")
    print(
        "| pattern | mean cost (% of backbone) | time (ms) | realised speed-up | predicted speed-up | "
        "realised / predicted |"
    )
    print("|---|---|---|---|---|---|")
    results = {"model": args.model, "batch": args.batch, "device": device_name, "bare_ms": 1000 * bare, "rows": []}
    for name, index in patterns.items():
        t = statistics.median(times[name])
        frac = sum(fractions[int(k)] for k in index) / len(index)
        realised, predicted = bare / t, 1.0 / frac
        print(
            f"| {name} | {100 * frac:.1f} | {1000 * t:.1f} | {realised:.3f} | {predicted:.3f} | "
            f"{realised / predicted:.3f} |"
        )
        results["rows"].append(
            {"pattern": name, "cost_fraction": frac, "ms": 1000 * t, "realised": realised, "predicted": predicted}
        )
    overhead = statistics.median(times["no exit (overhead)"]) / bare - 1
    print(f"\noverhead with no exit: {100 * overhead:+.2f} % (target <= 5 %)")
    results["overhead"] = overhead
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2)


if __name__ == "__main__":
    main()
