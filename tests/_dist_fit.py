"""A fit of a tiny backbone's exits, run by the distributed tests as a script (one process or under a launcher).

Usage: python tests/_dist_fit.py OUT CACHE_DIR. Writes OUT/adapter-{hazard,paper,backbone} and
OUT/backbone.safetensors (main process only) and, on every rank, OUT/cache-rank<k>.safetensors with the feature
cache it trained on.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
from conftest import tiny_timm_vit  # this folder is on the path: the script lives in it
from safetensors.torch import save_file
from sklearn.datasets import load_digits

import eexit
from eexit.distributed import current
from eexit.feature_store import disk_cache


def data() -> tuple[torch.utils.data.TensorDataset, torch.utils.data.TensorDataset]:
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).div(16).unsqueeze(1).repeat(1, 3, 2, 2)  # real digits, 16 px
    y = torch.tensor(digits.target) % 5
    return torch.utils.data.TensorDataset(x[:500], y[:500]), torch.utils.data.TensorDataset(x[500:900], y[500:900])


def model() -> torch.nn.Module:
    return tiny_timm_vit(img_size=16, patch_size=4)  # the suite's tiny ViT, on the 16 px digits


def main(out: Path, cache_dir: Path) -> None:
    dist = current()
    if os.environ.get("EEXIT_TEST_DIE_RANK") == str(dist.rank):
        raise SystemExit(f"rank {dist.rank} dies on purpose")
    train, val = data()
    loaders = [torch.utils.data.DataLoader(d, batch_size=32) for d in (train, val)]
    for gates in ("hazard", "paper"):
        torch.manual_seed(0)
        ee = eexit.attach(model(), gates=gates)
        eexit.fit(
            ee,
            *loaders,
            lam=0.3,
            epochs=3,
            warmup_epochs=1,
            batch_size=24,
            phase_batches=2,
            cache_dir=cache_dir,
            progress=False,
        )
        if dist.is_main:
            ee.save_pretrained(out / f"adapter-{gates}")
            (out / f"history-{gates}.json").write_text(json.dumps(ee.history))
    # End to end: the backbone trains too (no cache; each rank runs its share of every loader batch).
    torch.manual_seed(0)
    ee_bb = eexit.attach(model(), gates="paper")
    small = [torch.utils.data.DataLoader(torch.utils.data.Subset(d, range(96)), batch_size=32) for d in (train, val)]
    eexit.fit(ee_bb, *small, lam=0.3, epochs=2, warmup_epochs=1, phase_batches=1, train_backbone=True, progress=False)
    if dist.is_main:
        ee_bb.save_pretrained(out / "adapter-backbone")
        save_file(
            {k: v.contiguous() for k, v in ee_bb.backbone.state_dict().items()}, str(out / "backbone.safetensors")
        )
    cache = disk_cache(ee, train, cache_dir, progress=False)
    save_file(
        {"features": torch.cat(cache.features, 1).float().contiguous(), "labels": cache.labels.clone()},
        str(out / f"cache-rank{dist.rank}.safetensors"),
    )


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
