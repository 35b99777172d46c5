"""prepare_dirty_mnist on the embedded real-data sample, with a tiny ambiguous generator."""

from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import pytest
import torch

from pfp.config import parse_params
from pfp.data.dirty_mnist import (
    MNIST_MEAN,
    MNIST_STD,
    SPLIT_KEYS,
    load_prepared,
    normalise,
    prepare_dirty_mnist,
    save_prepared,
    training_set,
)
from pfp.data.idx import DataError, load_split

MNIST = "data/embedded/mnist"
FASHION = "data/embedded/fashion-mnist"
# sha256 of the embedded files, as published in data/embedded/README.md
EMBEDDED_SHA256 = {
    f"{FASHION}/t10k-images-idx3-ubyte.gz": "2dd86633624be9f4238480a24d29ff758e2dc7d9f4090abd43d9ac0af8ea811d",
    f"{FASHION}/t10k-labels-idx1-ubyte.gz": "de556c6a20733ec252de283171c1b2f32c97556f7668ce049c3c4420bced86f1",
    f"{MNIST}/t10k-images-idx3-ubyte.gz": "f0b1cd1d7a9a1eee3d5b7f5f994c89a37d7f9dca4de90dc34cae38dfbd84f85c",
    f"{MNIST}/t10k-labels-idx1-ubyte.gz": "6c3e8520eff57878cd36f24ea577a12062629e946fa6ce78f5260acfac7b807c",
    f"{MNIST}/train-images-idx3-ubyte.gz": "5070459d9ec85451d410d28643f246948fc62eff61b8f4e081d66e26b7cce838",
    f"{MNIST}/train-labels-idx1-ubyte.gz": "615a90b65c3cf8be2ceb1cc54f6dc15f7508d0c16de2552966c4c1114a64b232",
}
COUNTS = {"mnist_train": 300, "mnist_val": 50, "mnist_test": 40, "ambiguous_train": 12,
          "ambiguous_val": 4, "ambiguous_test": 6, "ood_test": 30}
LABELS_PER_IMAGE = 3


def make_params(seed=0, **data):
    raw = {
        "seed": seed, "models": ["mlp"], "train": {"mlp": {}},
        "data": {"mnist_dir": MNIST, "ood_dir": FASHION, "val_size": 50, "train_size": 300, "test_size": 40, "ood_size": 30, **data},
        "ambiguous": {"train_images": 12, "val_images": 4, "test_images": 6, "labels_per_image": LABELS_PER_IMAGE,
                      "max_mi": 1.0, "min_entropy": 0.0,
                      "vae": {"epochs": 1, "hidden": [32], "latent_dim": 4}, "ensemble": {"members": 2, "epochs": 1}},
    }
    return parse_params(raw)


def _prepare(params):
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return prepare_dirty_mnist(params, progress=False)
    finally:
        torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def prepared():
    return _prepare(make_params())


def rows(images: np.ndarray) -> set[bytes]:
    return {image.tobytes() for image in images}


def test_split_sizes_match_params(prepared):
    arrays, manifest = prepared
    assert set(arrays) == {f"{key}_{part}" for key in SPLIT_KEYS for part in "xy"}
    for key, count in COUNTS.items():
        x, y = arrays[f"{key}_x"], arrays[f"{key}_y"]
        assert x.shape == (count, 28, 28) and x.dtype == np.uint8, key
        expected_y = (count, LABELS_PER_IMAGE) if key.startswith("ambiguous") else (count,)
        assert y.shape == expected_y and y.dtype == np.int64, key
    assert manifest["counts"] == COUNTS
    assert manifest["pairs"] == {k: v * (LABELS_PER_IMAGE if k.startswith("ambiguous") else 1) for k, v in COUNTS.items()}


def test_val_and_train_are_disjoint_subsets_of_mnist_train(prepared):
    arrays, _ = prepared
    source_x, source_y = load_split(MNIST, "train")
    assert len(rows(source_x)) == len(source_x)  # no duplicate images: row identity is index identity
    train, val = rows(arrays["mnist_train_x"]), rows(arrays["mnist_val_x"])
    assert len(train) == 300 and len(val) == 50
    assert not train & val
    assert train | val <= rows(source_x)
    # labels travel with their images
    lookup = {image.tobytes(): label for image, label in zip(source_x, source_y)}
    for split in ("mnist_train", "mnist_val"):
        assert [lookup[i.tobytes()] for i in arrays[f"{split}_x"]] == arrays[f"{split}_y"].tolist()
    # test and OOD are the first rows of their files
    test_x, test_y = load_split(MNIST, "t10k")
    np.testing.assert_array_equal(arrays["mnist_test_x"], test_x[:40])
    np.testing.assert_array_equal(arrays["mnist_test_y"], test_y[:40])
    ood_x, _ = load_split(FASHION, "t10k")
    np.testing.assert_array_equal(arrays["ood_test_x"], ood_x[:30])


def test_ambiguous_splits(prepared):
    arrays, manifest = prepared
    for split in ("train", "val", "test"):
        labels = arrays[f"ambiguous_{split}_y"]
        assert labels.min() >= 0 and labels.max() <= 9
    all_ambiguous = np.concatenate([arrays[f"ambiguous_{s}_x"] for s in ("train", "val", "test")])
    assert len(rows(all_ambiguous)) == 22  # distinct generated images
    assert not rows(all_ambiguous) & rows(arrays["mnist_train_x"])
    stats = manifest["ambiguous"]
    assert stats["source"] == "generated"
    assert stats["candidates_tried"] == 2048  # one batch suffices with the loose filter
    assert stats["acceptance_rate"] == pytest.approx(22 / 2048)
    assert 0 < stats["mean_label_entropy"] <= np.log(10)


def test_manifest_hashes(prepared):
    arrays, manifest = prepared
    assert manifest["seed"] == 0
    assert manifest["source_sha256"] == EMBEDDED_SHA256
    assert set(manifest["array_sha256"]) == set(arrays)
    for key, value in arrays.items():
        assert manifest["array_sha256"][key] == hashlib.sha256(np.ascontiguousarray(value).tobytes()).hexdigest()
    expected = hashlib.sha256(json.dumps(manifest["array_sha256"], sort_keys=True).encode()).hexdigest()
    assert manifest["data_hash"] == expected
    json.dumps(manifest)  # serialisable as is


def test_same_seed_gives_identical_data(prepared):
    arrays, manifest = prepared
    again, manifest_again = _prepare(make_params())
    assert manifest_again["data_hash"] == manifest["data_hash"]
    for key in arrays:
        np.testing.assert_array_equal(again[key], arrays[key])


def test_val_size_too_large():
    with pytest.raises(DataError) as info:
        prepare_dirty_mnist(make_params(val_size=5000), progress=False)
    assert "data.val_size" in str(info.value)
    assert "5000" in str(info.value)


def test_missing_mnist_folder(tmp_path):
    missing = tmp_path / "no-mnist"
    with pytest.raises(DataError) as info:
        prepare_dirty_mnist(make_params(mnist_dir=str(missing)), progress=False)
    assert "data.mnist_dir" in str(info.value) and str(missing) in str(info.value)


def test_missing_ood_folder(tmp_path):
    with pytest.raises(DataError, match="data.ood_dir"):
        prepare_dirty_mnist(make_params(ood_dir=str(tmp_path / "nope")), progress=False)


def test_missing_idx_file_is_named(tmp_path):
    folder = tmp_path / "mnist"
    folder.mkdir()
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz", "train-images-idx3-ubyte.gz"):
        shutil.copy(f"{MNIST}/{name}", folder / name)
    with pytest.raises(DataError, match="train-labels-idx1-ubyte"):
        prepare_dirty_mnist(make_params(mnist_dir=str(folder)), progress=False)


def test_save_load_prepared_and_training_set(prepared, tmp_path):
    arrays, manifest = prepared
    save_prepared(tmp_path / "prepared", arrays, manifest)
    assert sorted(p.name for p in (tmp_path / "prepared").iterdir()) == ["dirty_mnist.npz", "manifest.json"]
    assert json.loads((tmp_path / "prepared" / "manifest.json").read_text()) == manifest
    loaded = load_prepared(tmp_path / "prepared")
    assert loaded.keys() == arrays.keys()
    for key in arrays:
        np.testing.assert_array_equal(loaded[key], arrays[key])
    x, y = training_set(loaded)
    assert x.shape == (300 + 12 * LABELS_PER_IMAGE, 1, 28, 28) and y.shape == (336,)
    assert y.dtype == torch.int64
    assert y[:300].tolist() == arrays["mnist_train_y"].tolist()
    assert y[300:].tolist() == arrays["ambiguous_train_y"].reshape(-1).tolist()
    # every ambiguous image is repeated once per label, next to its labels
    torch.testing.assert_close(x[300], x[302])
    torch.testing.assert_close(x[300], normalise(arrays["ambiguous_train_x"][:1])[0])


def test_load_prepared_errors(prepared, tmp_path):
    with pytest.raises(DataError, match="prepared data not found"):
        load_prepared(tmp_path)
    arrays, _ = prepared
    partial = {k: v for k, v in arrays.items() if k != "ood_test_y"}
    np.savez(tmp_path / "dirty_mnist.npz", **partial)
    with pytest.raises(DataError, match="missing arrays ood_test_y"):
        load_prepared(tmp_path)


def test_normalise():
    images = np.array([[[0] * 28] * 28, [[255] * 28] * 28], dtype=np.uint8)
    out = normalise(images)
    assert out.shape == (2, 1, 28, 28) and out.dtype == torch.float32
    assert out[0, 0, 0, 0].item() == pytest.approx(-MNIST_MEAN / MNIST_STD)
    assert out[1, 0, 5, 5].item() == pytest.approx((1 - MNIST_MEAN) / MNIST_STD)
