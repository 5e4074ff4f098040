"""Superpixel graphs: the construction against brute force, the on-disk cache, and the split loaders."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch

pytest.importorskip("torch_geometric")
pytest.importorskip("skimage")

from eexit import fashion_mnist
from eexit import superpixels as sp
from eexit.digits import load_digits_splits
from eexit.errors import EexitTypeError, EexitValueError


def _images(n: int = 6, size: int = 28, seed: int = 0) -> np.ndarray:
    """Blob images: smooth bright shapes on a dark background, like digits or clothes."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[:size, :size] / size
    out = np.zeros((n, size, size))
    for i in range(n):
        for _ in range(3):
            r, c, s = rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8), rng.uniform(0.05, 0.2)
            out[i] += np.exp(-((rows - r) ** 2 + (cols - c) ** 2) / (2 * s**2))
    return np.clip(out, 0, 1)


@pytest.fixture(scope="module")
def graphs():
    return [sp.image_to_graph(img, label=i % 10) for i, img in enumerate(_images())]


def _brute_force_edges(pos: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k nearest by distance per node (by sorting, per node), and the benchmark's weight for each pair."""
    n = len(pos)
    d = np.array([[np.linalg.norm(pos[i] - pos[j]) for j in range(n)] for i in range(n)])
    kk = min(k, n - 1)
    others = [sorted((d[i, j], j) for j in range(n) if j != i) for i in range(n)]
    nbrs = np.array([[j for _, j in others[i][:kk]] for i in range(n)])
    sigma = np.array([np.mean([v for v, _ in others[i][:k]]) + 1e-8 if n > k else 1 + 1e-8 for i in range(n)])
    w = np.exp(-((d / sigma[:, None]) ** 2))
    return nbrs, 0.5 * (w + w.T)


def test_node_features_are_intensity_and_centroids_in_range(graphs):
    for g, img in zip(graphs, _images()):
        n = g.num_nodes
        assert 30 <= n <= 75
        assert g.x.shape == (n, 3) and g.x.dtype == torch.float32
        assert torch.equal(g.pos, g.x[:, 1:])
        assert float(g.x[:, 0].min()) >= img.min() - 1e-6 and float(g.x[:, 0].max()) <= img.max() + 1e-6
        assert float(g.pos.min()) >= 0 and float(g.pos.max()) < 1
        assert g.y.tolist() == [graphs.index(g) % 10]


def test_features_match_the_segmentation():
    img = _images(1)[0]
    labels = sp._superpixels(img, 75, 0.25)
    g = sp.image_to_graph(img)
    for s in range(g.num_nodes):
        mask = labels == s
        rows, cols = np.nonzero(mask)
        expected = [img[mask].mean(), rows.mean() / 28, cols.mean() / 28]
        np.testing.assert_allclose(g.x[s].numpy(), expected, rtol=1e-5, atol=1e-6)


def test_edges_are_the_k_nearest_with_the_benchmark_weight(graphs):
    for g in graphs:
        n, k = g.num_nodes, 8
        src, dst = g.edge_index
        assert g.edge_index.dtype == torch.int64 and g.edge_attr.shape == (g.num_edges, 1)
        assert g.edge_attr.dtype == torch.float32
        assert bool((src != dst).all())  # no self loops
        assert torch.equal(src, torch.sort(src, stable=True).values)  # grouped by source
        assert torch.bincount(src, minlength=n).tolist() == [min(k, n - 1)] * n
        pos = g.pos.double().numpy()
        nbrs, w = _brute_force_edges(pos, k)
        d = np.linalg.norm(pos[:, None] - pos[None], axis=-1)
        chosen = d[np.arange(n)[:, None], dst.view(n, -1).numpy()]
        np.testing.assert_allclose(chosen, d[np.arange(n)[:, None], nbrs], rtol=0, atol=1e-12)  # the k nearest
        assert (np.diff(chosen, axis=1) >= -1e-12).all()  # nearest first
        assert (dst.view(n, -1).numpy() == nbrs).mean() > 0.95  # the same nodes, but for exact (grid) ties
        np.testing.assert_allclose(g.edge_attr[:, 0].numpy(), w[src.numpy(), dst.numpy()], rtol=1e-6)
        assert float(g.edge_attr.min()) > 0 and float(g.edge_attr.max()) <= 1


def test_small_graphs_are_complete_and_use_the_fallback_scale():
    img = _images(1)[0]
    g = sp.image_to_graph(img, n_segments=5, k=8)
    n = g.num_nodes
    assert 2 <= n <= 5 and g.num_edges == n * (n - 1)
    nbrs, w = _brute_force_edges(g.pos.double().numpy(), 8)
    src, dst = g.edge_index.numpy()
    assert dst.reshape(n, -1).tolist() == nbrs.tolist()
    np.testing.assert_allclose(g.edge_attr[:, 0].numpy(), w[src, dst], rtol=1e-6)


def test_superpixel_search_equals_knyazevs_lowering_loop():
    from skimage.segmentation import slic

    for img in _images(3, seed=1):
        q, n = 95, 10**6
        while n > 75:
            labels = slic(img, n_segments=q, compactness=0.25, channel_axis=None, start_label=0)
            n, q = len(np.unique(labels)), q - 1
        assert np.array_equal(
            np.unique(labels, return_inverse=True)[1].reshape(img.shape), sp._superpixels(img, 75, 0.25)
        )


def test_blank_image_is_one_node_without_edges():
    from torch_geometric.loader import DataLoader

    g = sp.image_to_graph(np.zeros((28, 28)), label=3)
    assert g.num_nodes == 1 and g.num_edges == 0
    assert g.edge_index.shape == (2, 0) and g.edge_attr.shape == (0, 1)
    assert g.x[0].tolist() == pytest.approx([0.0, 13.5 / 28, 13.5 / 28])
    g.validate(raise_on_error=True)
    batch = next(iter(DataLoader([g, sp.image_to_graph(_images(1)[0], label=1)], batch_size=2)))
    assert batch.num_graphs == 2 and batch.y.tolist() == [3, 1]


def test_accepted_shapes_and_dtypes():
    img = _images(1)[0]
    ref = sp.image_to_graph(img)
    for variant in (torch.tensor(img), img[None], torch.tensor(img)[None]):
        assert torch.equal(sp.image_to_graph(variant).edge_index, ref.edge_index)
    as_uint8 = sp.image_to_graph((img * 255).round().astype(np.uint8))  # divided by 255
    assert float(as_uint8.x[:, 0].max()) <= 1


@pytest.mark.parametrize(
    ("bad", "error", "match"),
    [
        (np.zeros((3, 28, 28)), EexitValueError, "colour image"),
        (np.zeros((28, 28, 3)), EexitValueError, "colour image"),
        (np.zeros((2, 2, 28, 28)), EexitValueError, r"\[H, W\]"),
        (np.zeros((0, 28)), EexitValueError, "empty"),
        (np.array([["a", "b"], ["c", "d"]]), EexitTypeError, "numbers"),
        (np.full((4, 4), np.nan), EexitValueError, "NaN"),
        ("image.png", EexitTypeError, "numbers"),
    ],
)
def test_bad_images_are_refused_with_the_fix(bad, error, match):
    with pytest.raises(error, match=match):
        sp.image_to_graph(bad)


def test_bad_parameters_are_refused():
    img = _images(1)[0]
    with pytest.raises(EexitValueError, match="n_segments"):
        sp.image_to_graph(img, n_segments=0)
    with pytest.raises(EexitTypeError, match="k must be an int"):
        sp.image_to_graph(img, k=2.5)
    with pytest.raises(EexitValueError, match="compactness"):
        sp.image_to_graph(img, compactness=0)
    with pytest.raises(EexitValueError, match="labels"):
        sp.graphs_from_images(_images(3), [0, 1], progress=False)


def test_many_images_with_a_pool_equal_one_by_one():
    images = _images(300, size=16)
    labels = np.arange(300) % 10
    pooled = sp.graphs_from_images(images, labels, n_segments=20, progress=False, workers=2)
    single = [sp.image_to_graph(im, n_segments=20, label=int(y)) for im, y in zip(images[:5], labels[:5])]
    assert len(pooled) == 300
    for a, b in zip(pooled, single):
        for key in ("x", "pos", "edge_index", "edge_attr", "y"):
            assert torch.equal(a[key], b[key]), key
    stats = sp.graph_size_stats(pooled)
    assert stats["graphs"] == 300 and stats["nodes_min"] <= stats["nodes_mean"] <= stats["nodes_max"] <= 20


def _assert_same(a_list, b_list):
    assert len(a_list) == len(b_list)
    for a, b in zip(a_list, b_list):
        assert set(a.keys()) == set(b.keys())
        for key in a.keys():
            assert torch.equal(a[key], b[key]), key


def test_cache_round_trip_is_exact(tmp_path, graphs):
    path = tmp_path / "g.safetensors"
    sp.save_graphs([*graphs, sp.image_to_graph(np.zeros((28, 28)), label=0)], path, {"source": "t", "n": 1})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.json", "g.safetensors"]
    back = sp.load_graphs(path, {"source": "t", "n": 1})
    _assert_same(back, [*graphs, sp.image_to_graph(np.zeros((28, 28)), label=0)])
    meta = json.loads((tmp_path / "g.json").read_text())
    assert meta["format_version"] == sp.FORMAT_VERSION and meta["num_graphs"] == len(graphs) + 1


def test_mismatched_or_corrupted_cache_is_refused(tmp_path, graphs):
    path = tmp_path / "g.safetensors"
    sp.save_graphs(graphs, path, {"params": {"k": 8}})
    with pytest.raises(EexitValueError, match="differs in: params"):
        sp.load_graphs(path, {"params": {"k": 4}})
    blob = bytearray(path.read_bytes())
    blob[-3] ^= 0xFF  # one flipped bit in the data
    path.write_bytes(bytes(blob))
    with pytest.raises(EexitValueError, match="sha256"):
        sp.load_graphs(path)
    path.write_bytes(bytes(blob[:100]))  # truncated
    with pytest.raises(EexitValueError, match="sha256"):
        sp.load_graphs(path)
    (tmp_path / "g.json").write_text("{not json")
    with pytest.raises(EexitValueError, match="JSON"):
        sp.load_graphs(path)
    with pytest.raises(FileNotFoundError, match="no superpixel cache"):
        sp.load_graphs(tmp_path / "other.safetensors")


def test_failed_write_keeps_the_previous_cache(tmp_path, graphs, monkeypatch):
    path = tmp_path / "g.safetensors"
    sp.save_graphs(graphs[:2], path, {"v": 1})
    before = (path.read_bytes(), (tmp_path / "g.json").read_bytes())

    def half_then_fail(handle, data):
        handle.write(data[: len(data) // 2])
        raise OSError("disk full")

    monkeypatch.setattr(sp, "_write_bytes", half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        sp.save_graphs(graphs, path, {"v": 2})
    assert (path.read_bytes(), (tmp_path / "g.json").read_bytes()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.json", "g.safetensors"]  # no temporary left
    _assert_same(sp.load_graphs(path, {"v": 1}), graphs[:2])


@pytest.fixture(scope="module")
def digits_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("sp-cache")


def test_digits_splits_match_eexit_digits_and_are_cached(digits_cache):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    splits = sp.load_digits_superpixels(cache_dir=digits_cache)
    ref = load_digits_splits()
    for name in ("train", "val", "test"):
        graphs, (_, y) = getattr(splits, name), getattr(ref, name).tensors
        assert len(graphs) == len(y)
        assert torch.cat([g.y for g in graphs]).tolist() == y.tolist()
    assert 30 <= sp.graph_size_stats(splits.train)["nodes_mean"] <= 60
    # the graphs are made from the raw pixels of the right images (the split of load_digits_splits, re-derived)
    data = load_digits()
    idx = np.arange(len(data.target))
    _, test_ix = train_test_split(idx, test_size=0.2, stratify=data.target, random_state=0)
    for g, i in zip(splits.test[:3], test_ix[:3]):
        raw = torch.tensor(data.images[i] / 16.0, dtype=torch.float32)[None, None]
        up = torch.nn.functional.interpolate(raw, size=28, mode="bilinear", align_corners=False)[0, 0]
        _assert_same([g], [sp.image_to_graph(up, n_segments=50, label=int(data.target[i]))])
    # loaded again from the cache, identical, without a warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = sp.load_digits_superpixels(cache_dir=digits_cache)
    _assert_same(again.test, splits.test)
    train, _, test = again.loaders(batch_size=32, seed=0)
    batch = next(iter(train))
    assert batch.x.shape[1] == 3 and batch.edge_attr.shape[1] == 1 and batch.num_graphs == 32
    assert torch.equal(next(iter(again.loaders(batch_size=32, seed=0)[0])).y, batch.y)  # the shuffle is seeded
    assert torch.cat([b.y for b in test]).tolist() == ref.test.tensors[1].tolist()  # test in order


def test_a_cache_built_with_other_settings_is_rebuilt(digits_cache):
    splits = sp.load_digits_superpixels(cache_dir=digits_cache)
    folder = next(digits_cache.iterdir())
    meta_path = folder / "val.json"
    meta = json.loads(meta_path.read_text())
    meta["meta"]["params"]["k"] = 4  # as if another construction had written this folder
    meta_path.write_text(json.dumps(meta))
    with pytest.warns(UserWarning, match="other settings.*Rebuilding"):
        again = sp.load_digits_superpixels(cache_dir=digits_cache)
    _assert_same(again.val, splits.val)
    assert json.loads(meta_path.read_text())["meta"]["params"]["k"] == 8


def test_missing_gnn_benchmark_says_where_to_put_the_files(tmp_path):
    with pytest.raises(EexitValueError, match=r"MNIST_v2\.pt.*download https://"):
        sp.load_gnn_benchmark(tmp_path)
    with pytest.raises(EexitValueError, match="MNIST' or 'CIFAR10"):
        sp.load_gnn_benchmark(tmp_path, "ZINC")


def test_concat_pos_transform():
    from torch_geometric.data import Data

    d = Data(x=torch.rand(5, 1), pos=torch.rand(5, 2), edge_index=torch.zeros(2, 0, dtype=torch.long))
    out = sp.ConcatPos()(d)
    assert out.x.shape == (5, 3) and torch.equal(out.x[:, 1:], d.pos) and d.x.shape == (5, 1)


def _have_fashion_mnist() -> bool:
    try:
        fashion_mnist.find_fashion_mnist()
    except EexitValueError:
        return False
    return True


@pytest.mark.skipif(
    not _have_fashion_mnist(), reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)"
)
def test_fashion_mnist_slice(tmp_path):
    splits = sp.load_fashion_mnist_superpixels(limit=50, cache_dir=tmp_path, progress=False)
    ref = fashion_mnist.load_fashion_mnist(limit=50)
    for name in ("train", "val", "test"):
        graphs = getattr(splits, name)
        assert len(graphs) == 50
        assert torch.cat([g.y for g in graphs]).tolist() == getattr(ref, name).tensors[1].tolist()
        for g in graphs:
            assert 30 <= g.num_nodes <= 75
            assert float(g.x[:, 0].min()) >= 0 and float(g.x[:, 0].max()) <= 1
    stats = sp.graph_size_stats(splits.train)
    assert 40 <= stats["nodes_mean"] <= 75
    (folder,) = tmp_path.iterdir()
    assert "limit" in json.loads((folder / "train.json").read_text())["meta"]["params"]
    _assert_same(sp.load_fashion_mnist_superpixels(limit=50, cache_dir=tmp_path, progress=False).train, splits.train)


def test_gnn_benchmark_wrapper_on_a_small_fake_folder(tmp_path):
    # PyG's raw file: one list of graph dicts per split (written here with torch.save, read by PyG, not by eexit)
    g = torch.Generator().manual_seed(0)

    def graph(n: int) -> dict[str, torch.Tensor]:
        return {
            "x": torch.rand(n, 1, generator=g),
            "pos": torch.rand(n, 2, generator=g),
            "edge_index": torch.stack([torch.arange(n), torch.arange(n).roll(1)]),
            "edge_attr": torch.rand(n, generator=g),
            "y": torch.tensor([n % 10]),
        }

    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    torch.save([[graph(5), graph(6)], [graph(7)], [graph(8), graph(9), graph(4)]], raw / "MNIST_v2.pt")
    splits = sp.load_gnn_benchmark(tmp_path, "MNIST")
    assert (len(splits.train), len(splits.val), len(splits.test)) == (2, 1, 3)
    first = splits.train[0]
    assert first.x.shape == (5, 3) and torch.equal(first.x[:, 1:], first.pos)
    batch = next(iter(splits.loaders(batch_size=4)[2]))
    assert batch.x.shape == (21, 3) and batch.y.tolist() == [8, 9, 4]
