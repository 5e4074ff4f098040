"""Make the reference adapters in ``adapters/`` from a tiny ViT trained on scikit-learn's digits.

Each adapter folder holds the three saved files (``eexit_config.json``, ``eexit_adapter.safetensors``,
``README.md``) plus two test fixtures that ``tests/test_adapters_folder.py`` uses to check, forever, that the
folder still loads and still predicts the same:

* ``_test_backbone.safetensors``: the backbone's weights, with the timm model name and arguments that rebuild
  it in the metadata. The backbone is rounded to float16-representable values once trained, so these weights
  are stored in float16 (half the size) and become the exact float32 backbone again on load;
* ``_test_io.safetensors``: stored inputs and the outputs this eexit computed on them (logits, exit indices,
  every exit's logits and the gate logits). Inputs whose exit decision lies within ``MARGIN`` of the gate
  threshold are left out, so that float noise across machines cannot flip a stored decision.

Run from the repository root (under a minute on a CPU)::

    python examples/make_reference_adapters.py
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import timm
import torch
from sklearn.datasets import load_digits
from torch.utils.data import DataLoader, TensorDataset

import eexit
from eexit import metrics
from eexit._format import safetensors_bytes  # deterministic bytes: regenerating unchanged files changes nothing
from eexit.hub import save_pretrained
from eexit.inference import ExitState

BACKBONE = {
    "model_name": "vit_tiny_patch16_224",
    "kwargs": {
        "img_size": 8,
        "patch_size": 2,
        "in_chans": 1,
        "embed_dim": 32,
        "depth": 4,
        "num_heads": 2,
        "num_classes": 10,
    },
}
# name -> attach overrides and fit settings
# The first three are format version 1 (made before gate kinds existed, paper gates); regenerating them with this
# eexit would write version 2, so they are kept as they are (``--only`` makes the others).
ADAPTERS = {
    "digits-vit-lam0.02": ({"gates": "paper"}, {"lam": 0.02}),
    "digits-vit-lam0.5": ({"gates": "paper"}, {"lam": 0.5}),
    "digits-vit-mlp-lam0.2": ({"gates": "paper", "head": "mlp", "head_hidden": 16}, {"lam": 0.2}),
    "digits-vit-hazard-lam0.1": ({}, {"lam": 0.1}),  # format version 2: hazard gates with cross-exit inputs
}
MARGIN = 0.02  # stored inputs decide at least this far from the gate threshold
NUM_IO = 48


def digits_splits(seed: int = 0) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Digits as [N, 1, 8, 8] float images in [-1, 1], split 1000 / 397 / 400 (train / val / test)."""
    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 8.0 - 1.0  # pixels are 0..16
    labels = torch.tensor(data.target, dtype=torch.long)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    cuts = {"train": order[:1000], "val": order[1000:1397], "test": order[1397:]}
    return {k: (images[i], labels[i]) for k, i in cuts.items()}


def build_backbone() -> torch.nn.Module:
    model = timm.create_model(BACKBONE["model_name"], pretrained=False, **BACKBONE["kwargs"])
    # Trained here from scratch: record no Hub checkpoint as its base model.
    model.pretrained_cfg = {**model.pretrained_cfg, "hf_hub_id": None, "tag": None}
    return model


def train_backbone(splits: dict, epochs: int = 40) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_backbone()
    loader = DataLoader(
        TensorDataset(*splits["train"]), batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(0)
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.05)
    model.train()
    for _ in range(epochs):
        for x, y in loader:
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():  # make every weight float16-representable, so the fixture can be stored in float16
        for tensor in model.state_dict().values():
            if tensor.is_floating_point():
                tensor.copy_(tensor.half().float())
    return model


def evaluate(ee: eexit.EarlyExitModel, images: torch.Tensor, labels: torch.Tensor) -> dict:
    with torch.no_grad():
        out = ee(images)
        every = ee(images, all_exits=True)
    per_exit = metrics.per_exit_accuracy(every.logits, labels, out.exit_index)
    ic = ee.cost_table.ic.double()
    return {
        "split": f"digits test ({len(labels)} images)",
        "accuracy": metrics.accuracy(out.logits, labels),
        "cost_fraction": metrics.expected_cost(out.exit_index, ic),
        "gflops_per_image": metrics.expected_cost(out.exit_index, ee.cost_table.exit_flops) / 1e9,
        "exit_rate": metrics.exit_rates(out.exit_index, ee.num_exits).tolist(),
        "exit_accuracy": per_exit.on_all.tolist(),
        "accuracy_of_exited": per_exit.on_exited.tolist(),
    }


def decision_margin(ee: eexit.EarlyExitModel, gate_logits: torch.Tensor, exit_index: torch.Tensor) -> torch.Tensor:
    """Per sample, the smallest |P(G=l)/P(G>=l) - threshold| over the exits it visited, ``[B]``."""
    batch = gate_logits.shape[1]
    policy = ee.default_policy()
    state = ExitState.start(batch, gate_logits.device)
    margin = torch.full((batch,), float("inf"))
    for k in range(gate_logits.shape[0]):
        visited = exit_index >= k
        distance = (policy.score(k, None, gate_logits[k], state) - policy.threshold).abs()
        margin = torch.where(visited, torch.minimum(margin, distance), margin)
        state.advance(gate_logits[k])
    return margin


def write_fixtures(folder: Path, ee: eexit.EarlyExitModel, backbone: torch.nn.Module, images: torch.Tensor) -> None:
    weights = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in backbone.state_dict().items()}
    meta = {
        "builder": "timm",
        "spec": json.dumps(BACKBONE, sort_keys=True),
        "stored_dtype": "float16",
        "load_dtype": "float32",
    }
    (folder / "_test_backbone.safetensors").write_bytes(safetensors_bytes(weights, meta))
    with torch.no_grad():
        out = ee(images)
        every = ee(images, all_exits=True)
    keep = decision_margin(ee, every.gate_logits, out.exit_index) > MARGIN
    chosen = keep.nonzero().squeeze(1)[:NUM_IO]
    io = {
        "inputs": images[chosen],
        "logits": out.logits[chosen],
        "exit_index": out.exit_index[chosen],
        "all_logits": every.logits[:, chosen],
        "gate_logits": every.gate_logits[:, chosen],
    }
    meta = {"eexit_version": eexit.__version__, "margin": str(MARGIN)}
    (folder / "_test_io.safetensors").write_bytes(safetensors_bytes({k: v.contiguous() for k, v in io.items()}, meta))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "adapters")
    parser.add_argument("--only", nargs="+", choices=list(ADAPTERS), help="make only these adapters")
    args = parser.parse_args()
    # One thread: these tensors are tiny (threads only add overhead), and the run repeats bit for bit.
    torch.set_num_threads(1)
    splits = digits_splits()
    backbone = train_backbone(splits)
    train = DataLoader(
        TensorDataset(*splits["train"]), batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(0)
    )
    val = DataLoader(TensorDataset(*splits["val"]), batch_size=128)
    for name, (exit_overrides, fit_overrides) in ADAPTERS.items():
        if args.only and name not in args.only:
            continue
        torch.manual_seed(0)
        ee = eexit.attach(backbone, **exit_overrides)
        eexit.fit(
            ee,
            train,
            val,
            epochs=20,
            warmup_epochs=5,
            phase_batches=8,
            lr=0.05,
            min_lr=1e-4,
            progress=False,
            **fit_overrides,
        )
        ee.evaluation = evaluate(ee, *splits["test"])
        folder = args.out / name
        if folder.exists():
            shutil.rmtree(folder)  # a fresh card too: save_pretrained never overwrites one
        save_pretrained(ee, folder)
        write_fixtures(folder, ee, backbone, splits["test"][0])
        size = sum(p.stat().st_size for p in folder.iterdir())
        print(
            f"{name}: accuracy {ee.evaluation['accuracy']:.3f}, cost {ee.evaluation['cost_fraction']:.3f}, "
            f"exit rates {[round(r, 2) for r in ee.evaluation['exit_rate']]}, {size / 1024:.0f} KiB"
        )
        eexit.detach(ee)


if __name__ == "__main__":
    main()
