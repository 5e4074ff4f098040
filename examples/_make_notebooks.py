"""Write the example notebooks with outputs cleared.

Run from the repository root: ``python examples/_make_notebooks.py [slug ...] && ruff format examples``.
"""

import sys

import nbformat as nbf

SETUP = """\
from pathlib import Path

import torch

import eexit
from eexit.digits import load_digits_splits, train_classifier

# False: a tiny backbone trained here on the digits that ship with scikit-learn (runs on a CPU in a minute).
# True: {pretrained_note}
USE_PRETRAINED = False
OUT_DIR = Path("outputs/{slug}")
LAMBDAS = (0.05, 1.0)
FIT_EPOCHS = 16
ATTACH_KWARGS = {{}}  # e.g. input_size=(3, H, W) for backbones that take several sizes
torch.manual_seed(0)"""

DATA_REAL = '''\
def pretrained_loaders(dataset: str, image_size: int, mean, std, batch_size: int = 64):
    """Train / validation / test loaders from a Hugging Face image dataset, preprocessed for the backbone."""
    from datasets import load_dataset
    from torchvision import transforms

    raw = load_dataset(dataset)
    image_key = next(k for k in ("img", "image") if k in raw["train"].features)
    label_key = next(k for k in ("fine_label", "label") if k in raw["train"].features)
    tf = transforms.Compose([transforms.Resize(image_size), transforms.CenterCrop(image_size),
                             transforms.ToTensor(), transforms.Normalize(mean, std)])

    def collate(rows):
        return (torch.stack([tf(r[image_key].convert("RGB")) for r in rows]),
                torch.tensor([r[label_key] for r in rows]))

    held_out = raw["train"].train_test_split(test_size=0.1, seed=0)  # validation carved from train, fixed seed

    def make(ds, shuffle):
        return torch.utils.data.DataLoader(ds, batch_size, shuffle=shuffle, collate_fn=collate)

    num_classes = raw["train"].features[label_key].num_classes
    return make(held_out["train"], True), make(held_out["test"], False), make(raw["test"], False), num_classes'''

EEXIT_CELLS = [
    (
        "md",
        "## Attach exits\n\nAn exit head (IM) and a gate after every block; the backbone is frozen and its "
        "code is not touched. The cost table is measured by `torch.utils.flop_counter` on one image: FLOPs to "
        "reach each exit, every IM and gate on the way included.",
    ),
    (
        "code",
        """\
ee = eexit.attach(backbone, **ATTACH_KWARGS)
print(ee.num_exits, "exits at", ee.exit_names)
print("cumulative cost per exit (% of the backbone):",
      [round(100 * f, 1) for f in ee.cost_table.fraction_of_backbone()])""",
    ),
    (
        "md",
        "## Train the exits with JEI-DNN\n\nOne adapter per λ: larger λ prices computation higher, so samples "
        "exit earlier. `evaluate` reports accuracy, cost, exit rates, ECE and conformal coverage on the whole "
        "test split.",
    ),
    (
        "code",
        """\
initial = ee.adapter_state_dict()
reports = {}
for lam in LAMBDAS:
    ee.load_adapter_state_dict(initial)
    eexit.fit(ee, train_loader, val_loader, lam=lam, epochs=FIT_EPOCHS, warmup_epochs=FIT_EPOCHS // 4,
              phase_batches=10, optimizer="adamw", lr=2e-2, min_lr=1e-4, progress=False)
    reports[lam] = eexit.evaluate(ee, test_loader, calibration_loader=val_loader, alpha=0.1)
    ee.add_adapter(f"lam_{lam:g}")
    print(f"λ = {lam}")
    print(reports[lam].to_markdown())""",
    ),
    (
        "md",
        "## Real early exit\n\nEach image stops at its own exit: the batch shrinks inside the backbone, "
        "which stops when no image is left.",
    ),
    (
        "code",
        """\
images, labels = next(iter(test_loader))
with torch.inference_mode():
    out = ee(images)
print("exit of the first 16 images:", out.exit_index[:16].tolist())
accuracy = (out.logits.argmax(-1) == labels).float().mean().item()
print(f"{out.gflops.mean().item():.5f} GFLOPs per image on average, accuracy {accuracy:.3f}")""",
    ),
    ("md", "## Accuracy vs cost"),
    (
        "code",
        """\
from eexit.plots import plot_accuracy_cost

first = next(iter(reports.values()))
fig = plot_accuracy_cost(
    {"JEI-DNN": [(r.mean_gflops, r.accuracy) for r in reports.values()]},
    OUT_DIR / "accuracy_cost.png",
    reference=(first.backbone_gflops, first.backbone_accuracy),
)""",
    ),
    (
        "md",
        "## Save the adapter\n\nOnly the exits (a few KB of safetensors + JSON), loadable with "
        "`eexit.from_pretrained(backbone, path)` or pushable with `ee.push_to_hub(repo_id)`.",
    ),
    (
        "code",
        """\
path = ee.save_pretrained(OUT_DIR / "adapter")
print(sorted(p.name for p in path.iterdir()))
backbone = ee.detach()  # the backbone is exactly as it was""",
    ),
]

NOTEBOOKS = {
    "timm_vit": dict(
        title="eexit on a timm Vision Transformer",
        intro="Attach early exits to a timm ViT, train them with JEI-DNN, exit early for real, evaluate, save.",
        pretrained_note="timm's pretrained vit_small_patch16_224, fine-tuned on CIFAR-100 (needs the internet).",
        backbone="""\
import timm

if not USE_PRETRAINED:
    splits = load_digits_splits()
    train_loader, val_loader, test_loader = splits.loaders(batch_size=64)
    backbone = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=8, patch_size=2, in_chans=1,
                                 embed_dim=48, depth=4, num_heads=4, num_classes=10)
    train_classifier(backbone, train_loader, epochs=30, lr=3e-3, progress=False)
else:
    backbone = timm.create_model("vit_small_patch16_224", pretrained=True, num_classes=100)
    cfg = backbone.pretrained_cfg
    train_loader, val_loader, test_loader, _ = pretrained_loaders("uoft-cs/cifar100", 224, cfg["mean"], cfg["std"])
    train_classifier(backbone, train_loader, epochs=3, lr=1e-4)  # fine-tune the new head and the blocks""",
    ),
    "hf_vit": dict(
        title="eexit on a Hugging Face transformers ViT",
        intro="The same steps on `transformers`' `ViTForImageClassification` (also `ViTModel` with "
        "`num_classes=`, and DeiT).",
        pretrained_note="google/vit-base-patch16-224-in21k fine-tuned on CIFAR-100 (needs the internet).",
        backbone="""\
from transformers import ViTConfig, ViTForImageClassification

if not USE_PRETRAINED:
    splits = load_digits_splits()
    train_loader, val_loader, test_loader = splits.loaders(batch_size=64)
    config = ViTConfig(image_size=8, patch_size=2, num_channels=1, hidden_size=48, num_hidden_layers=4,
                       num_attention_heads=4, intermediate_size=192, num_labels=10)
    backbone = ViTForImageClassification(config)
    train_classifier(backbone, train_loader, epochs=40, lr=4e-3, progress=False)
else:
    name = "google/vit-base-patch16-224-in21k"
    backbone = ViTForImageClassification.from_pretrained(name, num_labels=100)
    train_loader, val_loader, test_loader, _ = pretrained_loaders("uoft-cs/cifar100", 224, [0.5] * 3, [0.5] * 3)
    train_classifier(backbone, train_loader, epochs=3, lr=1e-4)""",
    ),
    "t2t_vit": dict(
        title="eexit on T2T-ViT (the JEI-DNN paper's backbone)",
        intro="T2T-ViT ships in `eexit.models.t2t_vit`, registered with timm. JEI-DNN put an IM after every "
        "block but the last, reading the CLS token through the final norm: that is what `attach` does.",
        pretrained_note="T2T-ViT-14 from the official ImageNet checkpoint file, fine-tuned on CIFAR-100.",
        backbone="""\
import timm

import eexit.models.t2t_vit  # registers t2t_vit_7 ... t2t_vit_24 with timm
from eexit.models.t2t_vit import load_official_t2t_checkpoint

if not USE_PRETRAINED:
    splits = load_digits_splits(image_size=32, channels=3)
    train_loader, val_loader, test_loader = splits.loaders(batch_size=64)
    backbone = timm.create_model("t2t_vit_tiny", num_classes=10, img_size=32)
    train_classifier(backbone, train_loader, epochs=40, lr=3e-3, progress=False)
else:
    backbone = timm.create_model("t2t_vit_14", num_classes=100, img_size=224)
    load_official_t2t_checkpoint(backbone, "81.5_T2T_ViT_14.pth.tar")  # safe loader: weights_only, allow-list
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    train_loader, val_loader, test_loader, _ = pretrained_loaders("uoft-cs/cifar100", 224, mean, std)
    train_classifier(backbone, train_loader, epochs=3, lr=1e-4)""",
    ),
    "dynamic_perceiver": dict(
        title="eexit on the Dynamic Perceiver",
        intro="The Dynamic Perceiver (Han et al., ICCV 2023) has four exits of its own; eexit puts JEI-DNN gates "
        "on the first three and really skips the later stages, in both branches, for images that exit.",
        pretrained_note="the official reg800m_perceiver_t128 ImageNet checkpoint (downloaded by hand) on CIFAR-100.",
        backbone="""\
import timm

import eexit.models.dynamic_perceiver  # registers the presets with timm
from eexit.models.dynamic_perceiver import load_official_dyn_perceiver_checkpoint

if not USE_PRETRAINED:
    splits = load_digits_splits(image_size=32, channels=3)
    train_loader, val_loader, test_loader = splits.loaders(batch_size=64)
    backbone = timm.create_model("dyn_perceiver_tiny", num_classes=10)
    ATTACH_KWARGS = {"input_size": (3, 32, 32)}  # the cost table is measured at the size the data has

    class AllExits(torch.nn.Module):  # stage 0 trains the model on the mean of its four exits
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, x):
            return sum(self.model.forward_exits(x)) / 4  # all four exits learn, as in the original's training

    train_classifier(AllExits(backbone), train_loader, epochs=30, lr=3e-3, progress=False)
else:
    backbone = timm.create_model("reg800m_perceiver_t128", num_classes=1000)
    load_official_dyn_perceiver_checkpoint(backbone, "reg800m_perceiver_t128.pth")
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    train_loader, val_loader, test_loader, _ = pretrained_loaders("uoft-cs/cifar100", 224, mean, std)""",
    ),
}


GRIT_CELLS = [
    (
        "md",
        "# eexit on GRIT, a graph transformer\n\nThe JEI-DNN authors' third backbone: GRIT (Ma et al., ICML 2023) on "
        "superpixel graphs of images. Each image becomes a graph (SLIC superpixels, 8 nearest neighbours); exits "
        "after GRIT's layers; early exit removes the graphs that stop from the batch, so later layers never run for "
        "them. Each graph is charged its own cost (attention runs over all n² node pairs).\n\nRuns top to bottom "
        "on a CPU with a tiny GRIT on superpixel graphs of real digits by default; set `USE_PRETRAINED = True` for "
        "the LARGE MNIST configuration from a GraphGym checkpoint on the GNN-benchmark graphs (files by hand).",
    ),
    (
        "code",
        """\
from pathlib import Path

import torch
from torch_geometric.loader import DataLoader

import eexit
from eexit.models.grit import add_rrwp, grit_mnist_large, grit_tiny, load_graphgym_checkpoint
from eexit.superpixels import graph_size_stats, load_digits_superpixels, load_gnn_benchmark

# False: a tiny GRIT trained here on superpixel graphs of the scikit-learn digits (a few minutes on a CPU).
# True: the LARGE MNIST GRIT from a GraphGym checkpoint, on the GNN-benchmark MNIST graphs (download both by hand).
USE_PRETRAINED = False
OUT_DIR = Path("outputs/grit")
LAMBDAS = (0.05, 1.0)
FIT_EPOCHS = 16
torch.manual_seed(0)""",
    ),
    ("md", "## Graphs and the backbone"),
    (
        "code",
        """\
if not USE_PRETRAINED:
    # At most 25 superpixels per digit (the 8x8 digits hold 64 pixels): built once, then read from the cache.
    splits = load_digits_superpixels(n_segments=25)
    backbone = grit_tiny(num_classes=10)
else:
    splits = load_gnn_benchmark("data/GNNBenchmark", "MNIST")  # MNIST_v2 files put there by hand
    backbone = load_graphgym_checkpoint(grit_mnist_large(), "results/mnist-GRIT-RRWP-LARGE/0/ckpt/99.ckpt")
steps = backbone.config.rrwp_steps
train, val, test = ([add_rrwp(g, steps) for g in part] for part in (splits.train, splits.val, splits.test))
print("train graphs:", graph_size_stats(train))
train_loader = DataLoader(train, batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(0))
val_loader, test_loader = DataLoader(val, batch_size=128), DataLoader(test, batch_size=128)

if not USE_PRETRAINED:  # train the tiny GRIT (AdamW, one-cycle schedule)
    opt = torch.optim.AdamW(backbone.parameters(), lr=3e-3, weight_decay=1e-5)
    epochs = 10
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 3e-3, total_steps=epochs * len(train_loader))
    backbone.train()
    for _ in range(epochs):
        for batch in train_loader:
            loss = torch.nn.functional.cross_entropy(backbone(batch), batch.y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
backbone.eval()""",
    ),
    (
        "md",
        "## Attach exits\n\nAn IM and a gate after every GRIT layer but the last (the model's own graph head is "
        'the last exit); `head="graph_head"` makes each IM a fresh copy of that head, as the JEI-DNN authors '
        "did. The cost table holds each exit's exact FLOPs as a function of the graph size; the JEI-DNN objective "
        "prices the exits at a reference size.",
    ),
    (
        "code",
        """\
ee = eexit.attach(backbone, head="graph_head")
print(ee.num_exits, "exits at", ee.exit_names)
print("cumulative cost per exit (% of the backbone, reference graph):",
      [round(100 * f, 1) for f in ee.cost_table.fraction_of_backbone()])
batch = next(iter(test_loader))
flops, _ = ee.sample_costs(batch)
print("MFLOPs at the last exit of the 3 first test graphs:", (flops[:3, -1] / 1e6).round().tolist())""",
    ),
    *EEXIT_CELLS[2:4],  # train the exits with JEI-DNN: the same cells as every notebook
    (
        "md",
        "## Real early exit\n\nEach graph stops at its own exit: its nodes and pairs leave the batch, and the "
        "model stops when no graph is left.",
    ),
    (
        "code",
        """\
with torch.inference_mode():
    out = ee(batch)
print("exit of the first 16 images (their graphs):", out.exit_index[:16].tolist())
accuracy = (out.logits.argmax(-1) == batch.y).float().mean().item()
print(f"{out.gflops.mean().item():.5f} GFLOPs per graph on average, accuracy {accuracy:.3f}")""",
    ),
    ("md", "## Accuracy vs cost"),
    EEXIT_CELLS[-3],
    EEXIT_CELLS[-2],
    EEXIT_CELLS[-1],
]


def build(slug: str) -> nbf.NotebookNode:
    if slug == "grit":
        return _notebook(GRIT_CELLS)
    spec = NOTEBOOKS[slug]
    cells = [
        (
            "md",
            f"# {spec['title']}\n\n{spec['intro']}\n\nRuns top to bottom on a CPU with a tiny backbone on real "
            "digits by default; set `USE_PRETRAINED = True` for the real checkpoint and dataset.",
        ),
        ("code", SETUP.format(pretrained_note=spec["pretrained_note"], slug=slug)),
        ("code", DATA_REAL),
        ("md", "## The backbone"),
        ("code", spec["backbone"]),
        *EEXIT_CELLS,
    ]
    return _notebook(cells)


def _notebook(cells: list[tuple[str, str]]) -> nbf.NotebookNode:
    nb = nbf.v4.new_notebook()
    nb.cells = [nbf.v4.new_markdown_cell(s) if k == "md" else nbf.v4.new_code_cell(s) for k, s in cells]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    return nb


if __name__ == "__main__":
    for slug in sys.argv[1:] or [*NOTEBOOKS, "grit"]:
        nbf.write(build(slug), f"examples/{slug}.ipynb")
        print("wrote", f"examples/{slug}.ipynb")
