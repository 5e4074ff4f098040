"""The embedded default data: scikit-learn's handwritten digits (1,797 real 8x8 images, 10 classes).

No dataset can be downloaded on every machine eexit is tested on, and ``load_digits`` ships inside
scikit-learn. The split is fixed (stratified, seeded) so that the demo, the benchmarks and the end-to-end tests
see the same train / validation / test images.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from tqdm.auto import tqdm

__all__ = ["DigitsSplits", "load_digits_splits", "make_digits_vit", "train_classifier"]


@dataclass
class DigitsSplits:
    """Train / validation / test tensors: images ``[N, 1, 8, 8]`` (standardised), labels ``[N]``."""

    train: TensorDataset
    val: TensorDataset
    test: TensorDataset

    def loaders(self, batch_size: int = 64, seed: int = 0) -> tuple[DataLoader, DataLoader, DataLoader]:
        g = torch.Generator().manual_seed(seed)
        return (
            DataLoader(self.train, batch_size=batch_size, shuffle=True, generator=g),
            DataLoader(self.val, batch_size=batch_size),
            DataLoader(self.test, batch_size=batch_size),
        )


def load_digits_splits(
    val_fraction: float = 0.2, test_fraction: float = 0.2, seed: int = 0, image_size: int = 8, channels: int = 1
) -> DigitsSplits:
    """Load the digits with a fixed stratified split (60 / 20 / 20 by default).

    Args:
        val_fraction, test_fraction: split sizes; the rest is the training set.
        seed: seed of the split.
        image_size: side of the returned images; the 8x8 digits are resized bilinearly (for backbones that need
            a larger input, e.g. 32 px).
        channels: 1, or 3 to repeat the grey channel for RGB backbones.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0  # [N, 1, 8, 8] in [0, 1]
    if image_size != 8:
        x = nn.functional.interpolate(x, size=image_size, mode="bilinear", align_corners=False)
    x = x.repeat(1, channels, 1, 1)  # [N, channels, S, S]
    y = torch.tensor(data.target, dtype=torch.long)
    idx = torch.arange(len(y)).numpy()
    rest, test = train_test_split(idx, test_size=test_fraction, stratify=y.numpy(), random_state=seed)
    train, val = train_test_split(
        rest, test_size=val_fraction / (1 - test_fraction), stratify=y[rest].numpy(), random_state=seed
    )
    train_t = torch.as_tensor(train)
    mean, std = x[train_t].mean(), x[train_t].std()  # statistics of the training images only
    x = (x - mean) / std

    def subset(ix) -> TensorDataset:
        ix = torch.as_tensor(ix)
        return TensorDataset(x[ix], y[ix])

    return DigitsSplits(subset(train), subset(val), subset(test))


def make_digits_vit(depth: int = 6, embed_dim: int = 64, num_heads: int = 4, seed: int = 0) -> nn.Module:
    """A small timm ViT for 8x8 one-channel digits: 2x2 patches (16 tokens + CLS), ``depth`` blocks."""
    import timm

    torch.manual_seed(seed)
    return timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=8,
        patch_size=2,
        in_chans=1,
        embed_dim=embed_dim,
        depth=depth,
        num_heads=num_heads,
        num_classes=10,
        drop_path_rate=0.1,
    )


def train_classifier(
    model: nn.Module, loader: DataLoader, epochs: int = 40, lr: float = 2e-3, progress: bool = True
) -> nn.Module:
    """Train a backbone end to end with AdamW and a one-cycle schedule (stage 0, before eexit)."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * len(loader), pct_start=0.1)
    model.train()
    for _ in tqdm(range(epochs), desc="training the backbone", disable=not progress):
        for x, y in loader:
            # small random shifts: the digits are few, and a ViT overfits them quickly without augmentation
            x = torch.roll(x, shifts=tuple(torch.randint(-1, 2, (2,)).tolist()), dims=(2, 3))
            out = model(x)
            logits = out if isinstance(out, torch.Tensor) else out.logits  # timm, or transformers outputs
            loss = nn.functional.cross_entropy(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()
