"""Dataset specs -> preprocessed (image, label) datasets, on real digit images the tests write (no downloads)."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys

import datasets
import huggingface_hub.constants
import numpy as np
import pytest
import timm
import torch
from PIL import Image
from sklearn.datasets import load_digits
from torch import nn

from eexit.errors import EexitTypeError, EexitValueError
from eexit.image_data import ImageDataset, load_image_dataset, preprocessing_for

CLASSES, PER_CLASS = 3, 5


def timm_vit(num_classes: int = CLASSES, img_size: int = 32, **kwargs) -> nn.Module:
    return timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        num_classes=num_classes,
        img_size=img_size,
        patch_size=8,
        depth=2,
        embed_dim=32,
        num_heads=2,
        **kwargs,
    ).eval()


def hf_vit(num_classes: int = CLASSES) -> nn.Module:
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(
        image_size=32,
        patch_size=8,
        num_hidden_layers=2,
        hidden_size=32,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=num_classes,
    )
    return ViTForImageClassification(config).eval()


def digit_images() -> list[tuple[Image.Image, int]]:
    """The first PER_CLASS scikit-learn digits (real 8x8 grey scans) of each of the first CLASSES classes."""
    digits = load_digits()
    pairs = []
    for label in range(CLASSES):
        for i in np.flatnonzero(digits.target == label)[:PER_CLASS]:
            pixels = (digits.images[i] * (255 / 16)).round().astype(np.uint8)  # 0..16 -> 0..255
            pairs.append((Image.fromarray(pixels, mode="L"), label))
    return pairs


@pytest.fixture
def cache(tmp_path) -> str:
    # datasets reads HF_DATASETS_CACHE once, at import, so an env var set here would be ignored: pass cache_dir.
    return str(tmp_path / "hf-cache")


@pytest.fixture
def folder(tmp_path):
    """An image folder: <root>/train/<class>/<i>.png, as grey PNGs."""
    root = tmp_path / "digits"
    for i, (image, label) in enumerate(digit_images()):
        (root / "train" / str(label)).mkdir(parents=True, exist_ok=True)
        image.save(root / "train" / str(label) / f"{i}.png")
    return root


def hf_dataset(**columns) -> datasets.Dataset:
    pairs = digit_images()
    data = {"image": [image for image, _ in pairs], "label": [label for _, label in pairs]}
    data.update(columns)
    features = {"image": datasets.Image(), "label": datasets.ClassLabel(names=["zero", "one", "two"])}
    features.update({k: datasets.Value("int64" if isinstance(v[0], int) else "string") for k, v in columns.items()})
    return datasets.Dataset.from_dict(data, features=datasets.Features(features))


@pytest.mark.parametrize("make_model", [timm_vit, hf_vit], ids=["timm", "transformers"])
def test_imagefolder_gives_model_ready_tensors_and_labels(folder, cache, make_model):
    model = make_model()
    ds = load_image_dataset(f"imagefolder:{folder}", model, CLASSES, cache_dir=cache)
    assert isinstance(ds, ImageDataset) and len(ds) == CLASSES * PER_CLASS
    assert ds.num_classes == CLASSES and ds.class_names == ["0", "1", "2"]
    image, label = ds[0]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32 and isinstance(label, int)
    assert sorted(ds[i][1] for i in range(len(ds))) == sorted([c for c in range(CLASSES) for _ in range(PER_CLASS)])
    images, labels = next(iter(torch.utils.data.DataLoader(pickle.loads(pickle.dumps(ds)), batch_size=6)))
    with torch.no_grad():
        out = model(images)
    logits = out.logits if hasattr(out, "logits") else out
    assert logits.shape == (6, CLASSES) and torch.isfinite(logits).all() and labels.dtype == torch.long


def test_bare_folder_is_an_imagefolder_and_grey_models_get_one_channel(folder, cache):
    ds = load_image_dataset(str(folder), timm_vit(in_chans=1), CLASSES, cache_dir=cache)
    assert ds[0][0].shape == (1, 32, 32)


def test_early_exit_model_uses_its_backbones_preprocessing():
    class Wrapper(nn.Module):  # stands in for EarlyExitModel: a class marker and a .backbone
        wraps_backbone = True

        def __init__(self, backbone):
            super().__init__()
            self.backbone = backbone

    backbone = timm_vit()
    assert repr(preprocessing_for(Wrapper(backbone))) == repr(preprocessing_for(backbone))
    assert "size=(32, 32)" in repr(preprocessing_for(backbone))  # the model's size, not its pretrained_cfg's 224
    with pytest.raises(EexitValueError, match="could not derive preprocessing"):
        preprocessing_for(nn.Linear(2, 2))
    with pytest.raises(EexitTypeError):
        preprocessing_for("vit")


def test_labels_beyond_the_models_class_count_are_refused(folder, cache):
    with pytest.raises(
        EexitValueError, match=r"has 3 classes \(0, 1, 2\) but the model has 2 outputs.*--num-classes 3"
    ):
        load_image_dataset(f"imagefolder:{folder}", timm_vit(num_classes=2), 2, cache_dir=cache)


def test_missing_folders_and_unknown_specs(tmp_path, cache):
    model = timm_vit()
    for spec in (f"imagefolder:{tmp_path}/nope", f"parquet:{tmp_path}/nope", f"{tmp_path}/nope", "./nope/x"):
        with pytest.raises(EexitValueError, match="does not exist"):
            load_image_dataset(spec, model, CLASSES, cache_dir=cache)
    for spec in ("csv:data", "digits"):
        with pytest.raises(EexitValueError, match=r"unknown dataset spec.*imagefolder:PATH, parquet:PATH, arrow:PATH"):
            load_image_dataset(spec, model, CLASSES, cache_dir=cache)


def test_parquet_and_arrow_folders_round_trip(tmp_path, cache):
    model = hf_vit()
    data = hf_dataset()
    (tmp_path / "pq").mkdir()
    data.to_parquet(str(tmp_path / "pq" / "train.parquet"))
    data.save_to_disk(str(tmp_path / "arrow"))
    datasets.DatasetDict({"train": data, "test": data.select(range(4))}).save_to_disk(str(tmp_path / "dict"))
    from_parquet = load_image_dataset(f"parquet:{tmp_path / 'pq'}", model, CLASSES, cache_dir=cache)
    from_arrow = load_image_dataset(f"arrow:{tmp_path / 'arrow'}", model, CLASSES)
    test_split = load_image_dataset(f"arrow:{tmp_path / 'dict'}", model, CLASSES, split="test")
    assert len(from_parquet) == len(from_arrow) == len(data) and len(test_split) == 4
    assert from_parquet.class_names == from_arrow.class_names == ["zero", "one", "two"]
    for i in (0, 7, 14):
        assert torch.equal(from_parquet[i][0], from_arrow[i][0]) and from_parquet[i][1] == from_arrow[i][1]
    with pytest.raises(EexitValueError, match=r"has splits \['test', 'train'\], not 'val'"):
        load_image_dataset(f"arrow:{tmp_path / 'dict'}", model, CLASSES, split="val")


@pytest.mark.parametrize(
    ("columns", "match"),
    [
        ({"label": None}, r"has columns \['image'\].*label column \(one of \['label', 'labels', 'target'"),
        ({"label": None, "target": [-1] * 15}, "has label -1"),
        ({"label": None, "target": ["a"] * 15}, "not class indices"),
    ],
    ids=["no-label-column", "negative-labels", "string-labels"],
)
def test_unusable_label_columns_are_refused(tmp_path, columns, match):
    data = hf_dataset(**{k: v for k, v in columns.items() if v is not None})
    data.remove_columns([k for k, v in columns.items() if v is None]).save_to_disk(str(tmp_path / "arrow"))
    with pytest.raises(EexitValueError, match=match):
        load_image_dataset(f"arrow:{tmp_path / 'arrow'}", timm_vit(), CLASSES)


@pytest.mark.parametrize("layout", ["no-files", "no-images", "no-rows"])
def test_empty_datasets_are_refused(tmp_path, cache, layout):
    root = tmp_path / "data"
    (root / "train" / "0").mkdir(parents=True)
    if layout == "no-images":
        (root / "train" / "0" / "notes.txt").write_text("not an image")
    if layout == "no-rows":
        hf_dataset().select([]).to_parquet(str(root / "train" / "0" / "train.parquet"))
    kind = "parquet" if layout == "no-rows" else "imagefolder"
    with pytest.raises(EexitValueError, match=r"is empty for split 'train'"):
        load_image_dataset(f"{kind}:{root}", timm_vit(), CLASSES, cache_dir=cache)


def test_fingerprint_follows_the_files_and_the_preprocessing(folder, cache):
    model, spec = timm_vit(), f"imagefolder:{folder}"
    first = load_image_dataset(spec, model, CLASSES, cache_dir=cache).fingerprint
    assert len(first) == 64 and int(first, 16) >= 0
    assert load_image_dataset(spec, timm_vit(), CLASSES, cache_dir=cache).fingerprint == first  # same inputs
    assert load_image_dataset(spec, timm_vit(img_size=48), CLASSES, cache_dir=cache).fingerprint != first
    png = next((folder / "train" / "1").iterdir())
    stat = png.stat()
    os.utime(png, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # "touched": same bytes, newer mtime
    assert load_image_dataset(spec, model, CLASSES, cache_dir=cache).fingerprint != first


@pytest.mark.slow
def test_fingerprint_is_stable_across_processes(folder, cache):
    code = (
        "import sys, timm; from eexit.image_data import load_image_dataset; "
        "m = timm.create_model('vit_tiny_patch16_224', num_classes=3, img_size=32, patch_size=8, depth=2, "
        "embed_dim=32, num_heads=2); print(load_image_dataset(sys.argv[1], m, 3, cache_dir=sys.argv[2]).fingerprint)"
    )
    spec = f"imagefolder:{folder}"
    here = load_image_dataset(spec, timm_vit(), CLASSES, cache_dir=cache).fingerprint
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "123"}  # another process, another str hash
    out = subprocess.run([sys.executable, "-c", code, spec, cache], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == here


def test_hub_names_fail_clearly_when_offline(monkeypatch, cache):
    # Both libraries read the offline flags at import, so patch their constants as well as the environment.
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.setenv(name, "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    for spec in ("hub:eexit-test/no-such-dataset", "eexit-test/no-such-dataset"):
        with pytest.raises(EexitValueError, match=r"Hub dataset 'eexit-test/no-such-dataset'.*local folder"):
            load_image_dataset(spec, timm_vit(), CLASSES, cache_dir=cache)
