"""Scale-out measurements: the cached λ sweep, the disk feature cache's memory and throughput, 1 vs 2 processes.

    python benchmarks/scale.py sweep  [--train 2000 --val 500 --epochs 5]   # cached sweep vs refitting each λ
    python benchmarks/scale.py store  [--sizes 25000,100000,400000] [--memory-limit 1G]
    python benchmarks/scale.py ranks  [--train 2000 --val 500 --epochs 5]   # 1 vs 2 processes (gloo on CPU)
    python benchmarks/scale.py epochs [--train 4000 --val 500 --epochs 5]   # fits on the disk cache vs in RAM

All on real Fashion-MNIST images (Debian's dataset-fashion-mnist) through a ViT-S-shaped timm backbone (384 wide,
12 blocks, 6 heads; 28 px in 7 px patches; random weights: these are timings, not accuracies).

* sweep: four λ (0.01, 0.1, 0.3, 1) trained (a) one fit per λ with the backbone in the loop (cache_features=False)
  and (b) on one disk feature cache (built once, included in the time). Ratio = time (a) / time (b).
* store: the cache's own cost, backbone excluded (the exits' features are stubbed at ViT-S widths, 11 exits x 384
  + 10 head logits: 8.5 kB per image in fp16): build and shuffled-read throughput and the process's peak
  anonymous RSS (what the process itself needs; mapped file pages are the kernel's to drop) per cache size. With
  --memory-limit, every size runs in a memory cgroup capped at that limit (cgroup v1, needs root).
* epochs: fits on the disk cache against fits on the same features in RAM (fp32), interleaved, medians.
* ranks: the same fit under `accelerate launch --multi_gpu --num_processes 2` and in one process: adapter
  difference, cache build time and time per epoch.

Results go to benchmarks/scale.json (and are printed); RESULTS.md has the tables.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, Subset

import eexit
from eexit.feature_store import disk_cache

HERE = Path(__file__).resolve().parent
LAMS = [0.01, 0.1, 0.3, 1.0]


def backbone(seed: int = 0) -> torch.nn.Module:
    import timm

    torch.manual_seed(seed)
    return timm.create_model(
        "vit_small_patch16_224", pretrained=False, img_size=28, patch_size=7, in_chans=1, num_classes=10
    ).eval()


def fashion(train: int, val: int) -> tuple[Dataset, Dataset]:
    from eexit.fashion_mnist import load_fashion_mnist

    splits = load_fashion_mnist()
    return Subset(splits.train, range(train)), Subset(splits.val, range(val))


class _Peak:
    """Samples this process's RssAnon (and RssFile) every 20 ms; keeps the peaks."""

    def __init__(self) -> None:
        self.anon = self.file = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def read() -> tuple[int, int]:
        fields = {}
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(("RssAnon", "RssFile")):
                    key, value = line.split(":")
                    fields[key] = int(value.split()[0]) * 1024
        return fields["RssAnon"], fields["RssFile"]

    def _run(self) -> None:
        while not self._stop.is_set():
            anon, file = self.read()
            self.anon, self.file = max(self.anon, anon), max(self.file, file)
            time.sleep(0.02)

    def __enter__(self) -> _Peak:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def bench_sweep(args: argparse.Namespace) -> dict:
    train, val = fashion(args.train, args.val)
    loaders = [DataLoader(d, batch_size=64) for d in (train, val)]
    settings = dict(epochs=args.epochs, warmup_epochs=1, progress=False)
    start = time.perf_counter()
    for lam in LAMS:
        ee = eexit.attach(backbone())
        eexit.fit(ee, *loaders, lam=lam, cache_features=False, **settings)
    refit = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as cache_dir:
        start = time.perf_counter()
        ee = eexit.attach(backbone())
        caches = [disk_cache(ee, d, cache_dir, name=n, progress=False) for d, n in ((train, "train"), (val, "val"))]
        built = time.perf_counter() - start
        initial = ee.adapter_state_dict()
        for lam in LAMS:
            ee.load_adapter_state_dict(initial)
            eexit.fit(ee, *caches, lam=lam, **settings)
        cached = time.perf_counter() - start
    row = {"train": args.train, "val": args.val, "epochs": args.epochs, "lams": LAMS, "refit_s": refit,
           "cached_s": cached, "cache_build_s": built, "ratio": refit / cached,
           "build_images_per_s": (args.train + args.val) / built}  # fmt: skip
    print(json.dumps(row, indent=1))
    return row


def bench_epochs(args: argparse.Namespace) -> dict:
    """Fits on the disk cache against fits on the same features held in RAM (fp32), interleaved, medians."""
    import statistics

    from eexit.data import FeatureCache

    train, val = fashion(args.train, args.val)
    ee = eexit.attach(backbone())
    with tempfile.TemporaryDirectory() as cache_dir:
        disk = [disk_cache(ee, d, cache_dir, name=n, progress=False) for d, n in ((train, "train"), (val, "val"))]
        ram = [FeatureCache([f.float().clone() for f in c.features], c.final_logits.float().clone(), c.labels.clone())
               for c in disk]  # fmt: skip
        initial = ee.adapter_state_dict()
        times: dict[str, list[float]] = {"disk": [], "ram": []}
        for _ in range(args.repeats):
            for name, caches in (("disk", disk), ("ram", ram)):
                ee.load_adapter_state_dict(initial)
                start = time.perf_counter()
                eexit.fit(ee, *caches, lam=0.3, epochs=args.epochs, warmup_epochs=1, progress=False)
                times[name].append(time.perf_counter() - start)
    row = {name: statistics.median(t) for name, t in times.items()}
    row.update({"all": times, "disk_over_ram": row["disk"] / row["ram"], "train": args.train, "epochs": args.epochs})
    print(json.dumps(row, indent=1))
    return row


class _Noise(Dataset):
    """Index-seeded random images: the data themselves take no memory."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return torch.zeros(1, 28, 28), i % 10


def _stub_features(ee: eexit.EarlyExitModel) -> None:
    """Replace the backbone pass by random features of the right widths: the store alone is measured."""
    widths, with_head = ee.feature_layout()

    def exit_features(images: torch.Tensor):
        b = images.shape[0]
        return [torch.randn(b, w) for w in widths], (torch.randn(b, ee.num_classes) if with_head else None)

    ee.exit_features = exit_features  # type: ignore[method-assign]


def store_one(size: int, root: str) -> dict:
    ee = eexit.attach(backbone())
    _stub_features(ee)
    data = _Noise(size)
    baseline = _Peak.read()[0]
    with _Peak() as peak:
        start = time.perf_counter()
        cache = disk_cache(ee, data, root, batch_size=1024, progress=False, data_key=f"noise-{size}")
        build = time.perf_counter() - start
    nbytes = os.path.getsize(cache.path / "features.safetensors")
    with _Peak() as read_peak:
        start = time.perf_counter()
        rows = 0
        for feats, _final, labels in cache.batches(1024, True, torch.Generator().manual_seed(0)):
            rows += labels.shape[0]
            float(feats[-1][0, 0])  # touch the batch
        read = time.perf_counter() - start
    return {"samples": size, "cache_MB": nbytes / 1e6, "build_s": build, "build_MB_per_s": nbytes / 1e6 / build,
            "build_images_per_s": size / build, "read_s": read, "read_MB_per_s": nbytes / 1e6 / read,
            "read_images_per_s": rows / read, "rss_anon_before_MB": baseline / 1e6,
            "peak_rss_anon_build_MB": peak.anon / 1e6, "peak_rss_file_build_MB": peak.file / 1e6,
            "peak_rss_anon_read_MB": read_peak.anon / 1e6, "peak_rss_file_read_MB": read_peak.file / 1e6}  # fmt: skip


def _cgroup(limit: str) -> Path:
    group = Path("/sys/fs/cgroup/memory") / f"eexit-bench-{os.getpid()}"
    group.mkdir()
    (group / "memory.limit_in_bytes").write_text(limit)
    return group


def bench_store(args: argparse.Namespace) -> list[dict]:
    rows = []
    for size in args.sizes:
        root = tempfile.mkdtemp(dir=args.cache_root)
        try:
            cmd = [sys.executable, __file__, "store-one", str(size), root]
            if args.memory_limit:
                group = _cgroup(args.memory_limit)
                cmd = ["sh", "-c", f"echo $$ > {group}/cgroup.procs && exec {' '.join(cmd)}"]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                print(done.stderr[-2000:])
                row = {"samples": size, "failed": done.returncode}
            else:
                row = json.loads(done.stdout.strip().splitlines()[-1])
            if args.memory_limit:
                row["memory_limit"] = args.memory_limit
                row["cgroup_max_usage_MB"] = int((group / "memory.max_usage_in_bytes").read_text()) / 1e6
                row["cgroup_failcnt"] = int((group / "memory.failcnt").read_text())
                group.rmdir()
            print(json.dumps(row))
            rows.append(row)
        finally:
            shutil.rmtree(root, ignore_errors=True)
    return rows


def worker(out: str, cache_dir: str, train: int, val: int, epochs: int) -> None:
    """One fit on the disk cache (run alone or under a launcher); rank 0 writes the adapter and timings."""
    from eexit.distributed import current

    dist = current()
    train_set, val_set = fashion(train, val)
    ee = eexit.attach(backbone(), gates="paper")  # SGD gates: the whole fit runs through the gradient exchange
    start = time.perf_counter()
    caches = [disk_cache(ee, d, cache_dir, name=n, progress=False) for d, n in ((train_set, "train"), (val_set, "val"))]
    built = time.perf_counter() - start
    start = time.perf_counter()
    eexit.fit(ee, *caches, lam=0.3, epochs=epochs, warmup_epochs=1, batch_size=64, progress=False)
    fitted = time.perf_counter() - start
    if dist.is_main:
        ee.save_pretrained(Path(out) / "adapter")
        (Path(out) / "times.json").write_text(json.dumps({"world": dist.world, "build_s": built, "fit_s": fitted}))


def bench_ranks(args: argparse.Namespace) -> dict:
    from safetensors.torch import load_file

    result = {}
    with tempfile.TemporaryDirectory() as tmp:
        accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent))
        for world in (1, 2):
            out = Path(tmp) / f"w{world}"
            out.mkdir()
            job = [
                "worker",
                str(out),
                str(Path(tmp) / f"cache{world}"),
                str(args.train),
                str(args.val),
                str(args.epochs),
            ]
            if world == 1:
                cmd = [sys.executable, __file__, *job]
                env = {**os.environ, "OMP_NUM_THREADS": "2"}
            else:
                cmd = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                       "--mixed_precision", "no", "--dynamo_backend", "no", __file__, *job]  # fmt: skip
                env = {**os.environ, "OMP_NUM_THREADS": "1"}
            done = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if done.returncode != 0:
                raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
            times = json.loads((out / "times.json").read_text())
            result[f"world{world}"] = {**times, "fit_s_per_epoch": times["fit_s"] / args.epochs}
        one = load_file(str(Path(tmp) / "w1" / "adapter" / "eexit_adapter.safetensors"))
        two = load_file(str(Path(tmp) / "w2" / "adapter" / "eexit_adapter.safetensors"))
        result["max_abs_adapter_difference"] = max(float((one[k] - two[k]).abs().max()) for k in one)
    result["train"], result["val"], result["epochs"] = args.train, args.val, args.epochs
    print(json.dumps(result, indent=1))
    return result


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "store-one":
        print(json.dumps(store_one(int(sys.argv[2]), sys.argv[3])))
        return
    if len(sys.argv) > 1 and sys.argv[1] == "worker":
        worker(sys.argv[2], sys.argv[3], *(int(v) for v in sys.argv[4:7]))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part", choices=["sweep", "store", "ranks", "epochs"])
    parser.add_argument("--repeats", type=int, default=3, help="epochs part: interleaved runs per variant")
    parser.add_argument("--train", type=int, default=2000)
    parser.add_argument("--val", type=int, default=500)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--sizes", type=lambda s: [int(v) for v in s.split(",")], default=[25_000, 100_000, 400_000])
    parser.add_argument("--memory-limit", help="cap each store run with a memory cgroup, e.g. 1G (cgroup v1, root)")
    parser.add_argument("--cache-root", default=None, help="where the store's caches are written (default: /tmp)")
    args = parser.parse_args()
    parts = {"sweep": bench_sweep, "store": bench_store, "ranks": bench_ranks, "epochs": bench_epochs}
    result = parts[args.part](args)
    path = HERE / "scale.json"
    everything = json.loads(path.read_text()) if path.is_file() else {}
    key = args.part + (f"-limit{args.memory_limit}" if args.part == "store" and args.memory_limit else "")
    key += f"-n{args.train}-e{args.epochs}" if args.part == "sweep" else ""
    everything[key] = {
        "result": result,
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}",
        "command": " ".join(["python", "benchmarks/scale.py", *sys.argv[1:]]),
    }
    path.write_text(json.dumps(everything, indent=1))


if __name__ == "__main__":
    main()
