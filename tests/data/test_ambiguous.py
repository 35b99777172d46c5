"""Ambiguous-MNIST: the seeded generator and the loader of DDU's original files."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pfp.config import AmbiguousConfig
from pfp.data.ambiguous import ORIGINAL_FILES, ORIGINAL_TRAIN_IMAGES, generate_ambiguous, load_original
from pfp.data.idx import DataError, load_split

TINY = {"train_images": 5, "val_images": 2, "test_images": 3, "labels_per_image": 4, "min_classes": 2, "max_classes": 2,
        "max_mi": 1.0, "min_entropy": 0.0, "vae": {"epochs": 1, "hidden": [32], "latent_dim": 4},
        "ensemble": {"members": 2, "epochs": 1}}


def tiny_config(**overrides) -> AmbiguousConfig:
    return AmbiguousConfig(**{**TINY, **overrides})


@pytest.fixture(scope="module")
def mnist_200():
    images, labels = load_split("data/embedded/mnist", "train")
    assert set(labels[:200].tolist()) == set(range(10))
    return images[:200], labels[:200]


def generate(images, labels, config, seed):
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return generate_ambiguous(images, labels, config, seed=seed, progress=False)
    finally:
        torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def generated(mnist_200):
    return generate(*mnist_200, tiny_config(), seed=0)


# --------------------------------------------------------------------------- generator


def test_generated_split_shapes_and_labels(generated):
    splits = generated
    for split, count in (("train", 5), ("val", 2), ("test", 3)):
        images, labels = getattr(splits, f"{split}_images"), getattr(splits, f"{split}_labels")
        assert images.shape == (count, 28, 28) and images.dtype == np.uint8
        assert labels.shape == (count, 4) and labels.dtype == np.int64
        assert labels.min() >= 0 and labels.max() <= 9
    everything = np.concatenate([generated.train_images, generated.val_images, generated.test_images])
    assert len({image.tobytes() for image in everything}) == 10  # ten different decoded mixtures
    assert everything.max() > 100  # decoded digits, not blank images
    assert generated.stats["candidates_tried"] == 2048
    assert generated.stats["acceptance_rate"] == pytest.approx(10 / 2048)
    assert 0.0 <= generated.stats["mean_label_entropy"] <= np.log(10)


def test_other_seed_gives_other_data(generated, mnist_200):
    other = generate(*mnist_200, tiny_config(), seed=1)
    assert not np.array_equal(other.train_images, generated.train_images)


def test_impossible_filter_names_the_params_to_loosen(mnist_200):
    # predictive entropy can never reach 2.3 (log 10 = 2.303 is the uniform distribution)
    config = tiny_config(min_entropy=2.3, max_candidates=1)
    with pytest.raises(DataError) as info:
        generate(*mnist_200, config, seed=0)
    message = str(info.value)
    assert "only 0 of 10 candidates passed the filter after 2048 tries" in message
    for key in ("ambiguous.max_mi", "ambiguous.min_entropy", "ambiguous.max_candidates"):
        assert key in message


def test_missing_digit_class_is_rejected(mnist_200):
    images, labels = mnist_200
    keep = labels != 7
    with pytest.raises(DataError, match="must hold every digit class"):
        generate(images[keep][:60], labels[keep][:60], tiny_config(), seed=0)


# --------------------------------------------------------------------------- original files

EXTRA = 40  # test-pool images after the training pool
N_ORIGINAL = ORIGINAL_TRAIN_IMAGES + EXTRA


def index_labels(n: int, width: int = 10) -> torch.Tensor:
    """Label row i spells i in decimal (all labels in [0, 9]), so every row names its index."""
    digits = [(torch.arange(n) // 10**k) % 10 for k in reversed(range(width))]
    return torch.stack(digits, 1).long()


def decode(labels: np.ndarray) -> np.ndarray:
    return (labels * 10 ** np.arange(labels.shape[1] - 1, -1, -1)).sum(1)


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    folder = tmp_path_factory.mktemp("amnist")
    g = torch.Generator().manual_seed(0)
    samples = torch.rand(N_ORIGINAL, 1, 28, 28, generator=g)
    samples[0, 0, 0, 0], samples[0, 0, 0, 1] = 1.7, -0.3  # out of range: clamped
    torch.save(samples, folder / ORIGINAL_FILES[0])
    torch.save(index_labels(N_ORIGINAL), folder / ORIGINAL_FILES[1])
    return folder, samples


ORIGINAL_CONFIG = AmbiguousConfig(train_images=30, val_images=10, test_images=20)


def test_load_original_splits(original):
    folder, samples = original
    splits = load_original(folder, ORIGINAL_CONFIG, seed=0)
    assert splits.train_images.shape == (30, 28, 28) and splits.train_images.dtype == np.uint8
    assert splits.train_labels.shape == (30, 10) and splits.train_labels.dtype == np.int64
    assert splits.val_images.shape == (10, 28, 28) and splits.test_images.shape == (20, 28, 28)
    assert splits.stats == {"source": str(folder)}
    train, val, test = (decode(getattr(splits, f"{s}_labels")) for s in ("train", "val", "test"))
    assert len(set(train)) == 30 and len(set(val)) == 10
    assert not set(train) & set(val)
    assert max(train.max(), val.max()) < ORIGINAL_TRAIN_IMAGES  # train/val from the training pool only
    assert test.tolist() == list(range(ORIGINAL_TRAIN_IMAGES, ORIGINAL_TRAIN_IMAGES + 20))  # test pool, in order
    # images stay with their labels; floats in [0, 1] become rounded uint8
    for images, index in ((splits.train_images, train), (splits.val_images, val), (splits.test_images, test)):
        expected = (samples[torch.from_numpy(index), 0].clamp(0, 1) * 255).round().to(torch.uint8).numpy()
        np.testing.assert_array_equal(images, expected)


def test_load_original_seed(original):
    folder, _ = original
    a = load_original(folder, ORIGINAL_CONFIG, seed=0)
    b = load_original(folder, ORIGINAL_CONFIG, seed=0)
    c = load_original(folder, ORIGINAL_CONFIG, seed=1)
    np.testing.assert_array_equal(a.train_labels, b.train_labels)
    assert not np.array_equal(decode(a.train_labels), decode(c.train_labels))
    np.testing.assert_array_equal(a.test_labels, c.test_labels)  # the test pool is not shuffled


def test_load_original_clamps(original):
    folder, _ = original
    # image 0 is in the training pool; find it wherever the permutation put it
    config = AmbiguousConfig(train_images=ORIGINAL_TRAIN_IMAGES - 1, val_images=1, test_images=1)
    splits = load_original(folder, config, seed=0)
    images = np.concatenate([splits.val_images, splits.train_images])
    index = np.concatenate([decode(splits.val_labels), decode(splits.train_labels)])
    assert sorted(index.tolist()) == list(range(ORIGINAL_TRAIN_IMAGES))
    zero = images[index.tolist().index(0)]
    assert zero[0, 0] == 255 and zero[0, 1] == 0


def write_pair(folder, samples, labels):
    folder.mkdir(exist_ok=True)
    torch.save(samples, folder / ORIGINAL_FILES[0])
    torch.save(labels, folder / ORIGINAL_FILES[1])
    return folder


def test_load_original_missing_folder_and_file(tmp_path):
    with pytest.raises(DataError, match="data.ambiguous_dir: folder .* does not exist"):
        load_original(tmp_path / "none", ORIGINAL_CONFIG, seed=0)
    folder = tmp_path / "half"
    folder.mkdir()
    torch.save(torch.rand(2, 1, 28, 28), folder / ORIGINAL_FILES[0])
    with pytest.raises(DataError) as info:
        load_original(folder, ORIGINAL_CONFIG, seed=0)
    assert str(folder / "amnist_labels.pt") in str(info.value) and "not found" in str(info.value)


def test_load_original_wrong_sample_shape(tmp_path):
    folder = write_pair(tmp_path / "a", torch.rand(5, 28, 28), torch.zeros(5, 10, dtype=torch.long))
    with pytest.raises(DataError) as info:
        load_original(folder, ORIGINAL_CONFIG, seed=0)
    assert "amnist_samples.pt: expected shape (N, 1, 28, 28), got (5, 28, 28)" in str(info.value)


def test_load_original_wrong_label_shape(tmp_path):
    folder = write_pair(tmp_path / "a", torch.rand(5, 1, 28, 28), torch.zeros(4, 10, dtype=torch.long))
    with pytest.raises(DataError, match=r"amnist_labels.pt: expected shape \(5, L\), got \(4, 10\)"):
        load_original(folder, ORIGINAL_CONFIG, seed=0)


def test_load_original_too_few_images(tmp_path):
    # fewer images than the training pool: an error naming the file, not an IndexError
    folder = write_pair(tmp_path / "a", torch.rand(100, 1, 28, 28), torch.zeros(100, 10, dtype=torch.long))
    with pytest.raises(DataError) as info:
        load_original(folder, ORIGINAL_CONFIG, seed=0)
    assert "amnist_samples.pt" in str(info.value) and str(ORIGINAL_TRAIN_IMAGES) in str(info.value)


def test_load_original_labels_out_of_range(original, tmp_path):
    _, samples = original
    labels = index_labels(N_ORIGINAL)
    labels[3, 2] = 10
    folder = write_pair(tmp_path / "a", samples, labels)
    with pytest.raises(DataError, match=r"labels must lie in \[0, 9\]"):
        load_original(folder, ORIGINAL_CONFIG, seed=0)


def test_load_original_corrupt_file(tmp_path):
    folder = tmp_path / "a"
    folder.mkdir()
    (folder / ORIGINAL_FILES[0]).write_bytes(b"not a torch file")
    torch.save(torch.zeros(1, 10, dtype=torch.long), folder / ORIGINAL_FILES[1])
    with pytest.raises(DataError, match="cannot read Ambiguous-MNIST files"):
        load_original(folder, ORIGINAL_CONFIG, seed=0)


def test_load_original_refuses_more_images_than_the_files_hold(tmp_path):
    samples = torch.rand(ORIGINAL_TRAIN_IMAGES + 5, 1, 28, 28)
    labels = torch.randint(0, 10, (ORIGINAL_TRAIN_IMAGES + 5, 10))
    torch.save(samples, tmp_path / "amnist_samples.pt")
    torch.save(labels, tmp_path / "amnist_labels.pt")
    too_many_test = AmbiguousConfig(train_images=10, val_images=5, test_images=6)
    with pytest.raises(DataError, match="test_images = 6"):
        load_original(tmp_path, too_many_test, seed=0)
    too_many_train = AmbiguousConfig(train_images=ORIGINAL_TRAIN_IMAGES, val_images=1, test_images=5)
    with pytest.raises(DataError, match="train_images"):
        load_original(tmp_path, too_many_train, seed=0)
