"""What refusing NaN/Inf images costs at inference (`EarlyExitModel.check_inputs`), against a forward.

    python benchmarks/input_check.py [--model vit_small_patch16_224] [--batches 1,64] [--device cpu]

The check (``torch.aminmax`` of the batch, then one host sync) is timed alone over many calls, and the full
early-exit forward (every sample to the last exit) with and without it, interleaved (A B A B ...), medians: the
check is below a forward's run-to-run noise, so its own time is the number that says what it costs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import timm
import torch
from speed import _time  # this folder is on the path when a script here runs

import eexit
from eexit._checks import all_finite


def _median_time(fn, repeats: int, device: torch.device) -> float:
    return statistics.median(_time(fn, device) for _ in range(repeats))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vit_small_patch16_224")
    parser.add_argument("--batches", default="1,64")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    ee = eexit.attach(timm.create_model(args.model, pretrained=False, num_classes=100)).to(device).eval()
    rows = []
    for batch in (int(b) for b in args.batches.split(",")):
        x = torch.randn(batch, 3, 224, 224, device=device)
        policy = eexit.FixedExitPolicy(torch.full((batch,), ee.num_exits - 1))  # all run to the end: a full forward
        check = _median_time(lambda x=x: all_finite(x), 200, device)
        forwards: dict[bool, list[float]] = {True: [], False: []}
        with torch.inference_mode():
            ee(x, policy=policy)  # warm-up
            for _ in range(args.repeats):
                for flag in (True, False):
                    ee.check_inputs = flag
                    forwards[flag].append(_median_time(lambda x=x, p=policy: ee(x, policy=p), 1, device))
        on, off = statistics.median(forwards[True]), statistics.median(forwards[False])
        rows.append({"batch": batch, "check_ms": 1e3 * check, "forward_ms_check_on": 1e3 * on,
                     "forward_ms_check_off": 1e3 * off, "check_share_of_forward": check / off})  # fmt: skip
        print(json.dumps(rows[-1]))
    print(json.dumps({"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
                      "torch": torch.__version__, "device": str(device)}))  # fmt: skip


if __name__ == "__main__":
    main()
