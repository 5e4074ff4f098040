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

    class LastExit(torch.nn.Module):  # stage 0 trains on the merged exit (the model returns four)
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, x):
            return sum(self.model(x)) / 4  # all four exits learn, as in the original's training

    train_classifier(LastExit(backbone), train_loader, epochs=30, lr=3e-3, progress=False)
else:
    backbone = timm.create_model("reg800m_perceiver_t128", num_classes=1000)
    load_official_dyn_perceiver_checkpoint(backbone, "reg800m_perceiver_t128.pth")
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    train_loader, val_loader, test_loader, _ = pretrained_loaders("uoft-cs/cifar100", 224, mean, std)""",
    ),
}


def build(slug: str) -> nbf.NotebookNode:
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
    nb = nbf.v4.new_notebook()
    nb.cells = [nbf.v4.new_markdown_cell(s) if k == "md" else nbf.v4.new_code_cell(s) for k, s in cells]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    return nb


if __name__ == "__main__":
    for slug in sys.argv[1:] or NOTEBOOKS:
        nbf.write(build(slug), f"examples/{slug}.ipynb")
        print("wrote", f"examples/{slug}.ipynb")
