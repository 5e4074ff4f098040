"""Quickstart: early exits on a ViT, end to end, on real data that ships with scikit-learn.

    python examples/quickstart.py            # about 2 minutes on 2 CPU cores

The same steps work on any timm or transformers ViT: replace the backbone and the loaders.
(`python -m eexit demo` runs the fuller comparison: several λ and the threshold baseline.)
"""

from __future__ import annotations

import torch

import eexit
from eexit.digits import load_digits_splits, make_digits_vit, train_classifier


def main() -> None:
    torch.manual_seed(0)
    splits = load_digits_splits()  # 1,797 real 8x8 digits, fixed 60/20/20 split
    train_loader, val_loader, test_loader = splits.loaders(batch_size=64)

    # 0. a backbone: here a small timm ViT trained on the digits (yours would be pretrained)
    backbone = train_classifier(make_digits_vit(), train_loader, epochs=100)

    # 1. attach exits after every block; the backbone is frozen and left untouched
    ee = eexit.attach(backbone)
    print(
        f"{ee.num_exits} exits, cost to reach each (% of the backbone):",
        [round(100 * f) for f in ee.cost_table.fraction_of_backbone()],
    )

    # 2. train the IMs and gates with JEI-DNN (λ trades accuracy for cost)
    eexit.fit(
        ee,
        train_loader,
        val_loader,
        lam=0.1,
        epochs=60,
        warmup_epochs=15,
        phase_batches=10,
        optimizer="adamw",
        lr=2e-2,
        weight_decay=1e-4,
        min_lr=1e-4,
    )

    # 3. real early exit: each image stops at its own exit
    images, _ = next(iter(test_loader))
    with torch.inference_mode():
        out = ee(images)
    print("exit per image:", out.exit_index[:16].tolist(), "...")
    print(f"mean cost: {out.gflops.mean():.5f} GFLOPs per image")

    # 4. the honest report on the whole test split, with conformal sets calibrated on validation data
    report = eexit.evaluate(ee, test_loader, calibration_loader=val_loader, alpha=0.1)
    print(report.to_markdown())
    ee.evaluation = report.to_dict()  # saved with the adapter: its model card shows it

    # 5. save the adapter (only the exits: a few KB) and give the backbone back unchanged
    ee.save_pretrained("outputs/quickstart-adapter")
    ee.detach()


if __name__ == "__main__":
    main()
