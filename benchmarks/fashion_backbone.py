"""The Fashion-MNIST backbone of the accuracy-cost benchmark: a small timm ViT, trained once per seed and cached.

    python benchmarks/fashion_backbone.py --seeds 0 1      # train (or find) the backbones, print test accuracy

28x28 one-channel images in 7x7 patches (16 tokens + CLS), 6 blocks, 64 wide, 4 heads: the library's
defaults that issue 8 measured. Trained on the 50,000 training images only (validation and test never seen),
AdamW with a one-cycle schedule and ±1-pixel shifts (``eexit.digits.train_classifier``). The weights go to
``outputs/fashion-vit/seed{seed}-e{epochs}.safetensors``; a rerun with the same seed and epochs loads them.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import DataLoader

from eexit.digits import train_classifier
from eexit.fashion_mnist import FashionMNISTSplits, load_fashion_mnist

CACHE = Path(__file__).resolve().parent.parent / "outputs" / "fashion-vit"


def make_fashion_vit(seed: int, depth: int = 6, embed_dim: int = 64) -> nn.Module:
    import timm

    torch.manual_seed(seed)
    return timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=28,
        patch_size=7,
        in_chans=1,
        embed_dim=embed_dim,
        depth=depth,
        num_heads=4,
        num_classes=10,
        drop_path_rate=0.1,
    )


def fashion_backbone(
    seed: int, splits: FashionMNISTSplits, epochs: int = 10, cache: Path = CACHE, progress: bool = False
) -> tuple[nn.Module, float]:
    """The trained backbone of ``seed`` (from the cache when there) and the seconds spent training it."""
    model = make_fashion_vit(seed)
    path = cache / f"seed{seed}-e{epochs}-n{len(splits.train)}.safetensors"
    if path.is_file():
        model.load_state_dict(load_file(str(path)))
        return model.eval(), 0.0
    start = time.time()
    loader = DataLoader(splits.train, batch_size=256, shuffle=True, generator=torch.Generator().manual_seed(seed))
    train_classifier(model, loader, epochs=epochs, lr=3e-3, progress=progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
    tmp.replace(path)
    return model.eval(), time.time() - start


@torch.no_grad()
def accuracy(model: nn.Module, data) -> float:
    x, y = data.tensors
    pred = torch.cat([model(x[i : i + 1000]).argmax(-1) for i in range(0, len(y), 1000)])
    return float((pred == y).double().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    splits = load_fashion_mnist()
    for seed in args.seeds:
        model, seconds = fashion_backbone(seed, splits, args.epochs, progress=True)
        print(f"seed {seed}: test accuracy {100 * accuracy(model, splits.test):.2f} %, trained in {seconds:.0f} s")


if __name__ == "__main__":
    main()
