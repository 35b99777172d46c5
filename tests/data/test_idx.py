"""Tests for pfp.data.idx: IDX round trips, validation errors, real data, downloads."""

from __future__ import annotations

import gzip
import hashlib
import struct
from pathlib import Path

import numpy as np
import pytest

from pfp.data.idx import (
    MIRRORS,
    DataError,
    download_dataset,
    load_split,
    read_idx_images,
    read_idx_labels,
    sha256_file,
    write_idx_images,
    write_idx_labels,
)

SHARED = Path("/work/shared/data")


def _images(n: int = 7, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, 28, 28), dtype=np.uint8)


def _labels(n: int = 7, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 10, size=n).astype(np.uint8)


def _raw_images_bytes(images: np.ndarray, magic: int = 0x803) -> bytes:
    return struct.pack(">IIII", magic, *images.shape) + images.tobytes()


def _raw_labels_bytes(labels: np.ndarray, magic: int = 0x801) -> bytes:
    return struct.pack(">II", magic, labels.shape[0]) + labels.astype(np.uint8).tobytes()


def _write_split(folder: Path, split: str, images, labels, gz: bool = True) -> None:
    ext = ".gz" if gz else ""
    write_idx_images(folder / f"{split}-images-idx3-ubyte{ext}", images)
    write_idx_labels(folder / f"{split}-labels-idx1-ubyte{ext}", labels)


# ------------------------------------------------------------------ round trips


@pytest.mark.parametrize("ext", [".gz", ""])
def test_round_trip(tmp_path, ext):
    images, labels = _images(), _labels()
    ip = tmp_path / f"x-images-idx3-ubyte{ext}"
    lp = tmp_path / f"x-labels-idx1-ubyte{ext}"
    write_idx_images(ip, images)
    write_idx_labels(lp, labels)
    assert (ip.read_bytes()[:2] == b"\x1f\x8b") == (ext == ".gz")
    got_i, got_l = read_idx_images(ip), read_idx_labels(lp)
    assert got_i.dtype == np.uint8 and got_i.shape == (7, 28, 28)
    np.testing.assert_array_equal(got_i, images)
    np.testing.assert_array_equal(got_l, labels)
    # atomic write leaves no temp files behind
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([ip.name, lp.name])


def test_raw_file_matches_spec_bytes(tmp_path):
    images, labels = _images(3), _labels(3)
    write_idx_images(tmp_path / "i", images)
    write_idx_labels(tmp_path / "l", labels)
    assert (tmp_path / "i").read_bytes() == _raw_images_bytes(images)
    assert (tmp_path / "l").read_bytes() == _raw_labels_bytes(labels)


def test_gzip_output_is_deterministic(tmp_path):
    write_idx_images(tmp_path / "a.gz", _images())
    write_idx_images(tmp_path / "b.gz", _images())
    assert sha256_file(tmp_path / "a.gz") == sha256_file(tmp_path / "b.gz")
    assert sha256_file(tmp_path / "a.gz") == hashlib.sha256(
        (tmp_path / "a.gz").read_bytes()).hexdigest()


def test_load_split_gz_and_raw(tmp_path):
    _write_split(tmp_path, "train", _images(5), _labels(5), gz=True)
    _write_split(tmp_path, "t10k", _images(4, 1), _labels(4, 1), gz=False)
    ti, tl = load_split(tmp_path, "train")
    assert ti.shape == (5, 28, 28) and tl.shape == (5,)
    si, sl = load_split(tmp_path, "t10k")
    np.testing.assert_array_equal(si, _images(4, 1))
    np.testing.assert_array_equal(sl, _labels(4, 1))


# ------------------------------------------------------------------- real data


@pytest.mark.skipif(not SHARED.is_dir(), reason="shared data folder absent")
@pytest.mark.parametrize(
    "sub,split,n",
    [("mnist", "train", 50000), ("mnist", "t10k", 10000), ("fashion-mnist", "t10k", 10000)],
)
def test_real_files(sub, split, n):
    folder = SHARED / sub
    if not folder.is_dir():
        pytest.skip(f"{folder} absent")
    images, labels = load_split(folder, split)
    assert images.shape == (n, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (n,)
    assert labels.min() == 0 and labels.max() == 9
    assert set(np.unique(labels)) == set(range(10))
    assert images.max() > 200  # real pixel data, not all zero


EMBEDDED = Path(__file__).resolve().parents[2] / "data" / "embedded"


@pytest.mark.skipif(not EMBEDDED.is_dir(), reason="embedded sample not generated")
@pytest.mark.parametrize(
    "sub,split,n",
    [("mnist", "train", 5000), ("mnist", "t10k", 1000), ("fashion-mnist", "t10k", 1000)],
)
def test_embedded_sample(sub, split, n):
    images, labels = load_split(EMBEDDED / sub, split)
    assert images.shape == (n, 28, 28) and labels.shape == (n,)
    assert np.bincount(labels, minlength=10).tolist() == [n // 10] * 10


# ------------------------------------------------------------------ bad inputs


def _assert_names(exc: pytest.ExceptionInfo, name: str) -> None:
    assert name in str(exc.value), str(exc.value)


def test_corrupt_gzip(tmp_path):
    p = tmp_path / "bad-images-idx3-ubyte.gz"
    good = gzip.compress(_raw_images_bytes(_images()))
    p.write_bytes(good[:10] + b"\x00garbage" * 20)
    with pytest.raises(DataError, match="gzip") as e:
        read_idx_images(p)
    _assert_names(e, p.name)


def test_truncated_gzip(tmp_path):
    p = tmp_path / "cut-labels-idx1-ubyte.gz"
    good = gzip.compress(_raw_labels_bytes(_labels(500)))
    p.write_bytes(good[: len(good) // 2])
    with pytest.raises(DataError) as e:
        read_idx_labels(p)
    _assert_names(e, p.name)


@pytest.mark.parametrize("gz", [True, False])
def test_truncated_file(tmp_path, gz):
    p = tmp_path / ("trunc-images-idx3-ubyte" + (".gz" if gz else ""))
    data = _raw_images_bytes(_images())[:-100]
    p.write_bytes(gzip.compress(data) if gz else data)
    with pytest.raises(DataError, match="truncated") as e:
        read_idx_images(p)
    _assert_names(e, p.name)


def test_truncated_header(tmp_path):
    p = tmp_path / "hdr-images-idx3-ubyte"
    p.write_bytes(struct.pack(">II", 0x803, 5))
    with pytest.raises(DataError, match="header") as e:
        read_idx_images(p)
    _assert_names(e, p.name)


def test_trailing_bytes(tmp_path):
    p = tmp_path / "trail-labels-idx1-ubyte"
    p.write_bytes(_raw_labels_bytes(_labels()) + b"\x00\x01")
    with pytest.raises(DataError, match="trailing") as e:
        read_idx_labels(p)
    _assert_names(e, p.name)


def test_wrong_magic(tmp_path):
    p = tmp_path / "magic-images-idx3-ubyte.gz"
    # a label file where an image file is expected
    p.write_bytes(gzip.compress(_raw_labels_bytes(_labels())))
    with pytest.raises(DataError, match="magic") as e:
        read_idx_images(p)
    _assert_names(e, p.name)
    q = tmp_path / "magic2-labels-idx1-ubyte"
    q.write_bytes(_raw_labels_bytes(_labels(), magic=0x12345678))
    with pytest.raises(DataError, match="0x12345678") as e:
        read_idx_labels(q)
    _assert_names(e, q.name)


def test_wrong_image_size(tmp_path):
    p = tmp_path / "size-images-idx3-ubyte"
    p.write_bytes(struct.pack(">IIII", 0x803, 2, 32, 32) + bytes(2 * 32 * 32))
    with pytest.raises(DataError, match="32x32") as e:
        read_idx_images(p)
    _assert_names(e, p.name)


def test_label_out_of_range(tmp_path):
    p = tmp_path / "range-labels-idx1-ubyte.gz"
    labels = _labels(20)
    labels[13] = 11
    p.write_bytes(gzip.compress(_raw_labels_bytes(labels)))
    with pytest.raises(DataError, match=r"index 13 \(value 11\)") as e:
        read_idx_labels(p)
    _assert_names(e, p.name)


def test_write_rejects_bad_labels(tmp_path):
    with pytest.raises(DataError, match="value 10"):
        write_idx_labels(tmp_path / "w-labels.gz", np.array([1, 10]))
    with pytest.raises(DataError, match="shape"):
        write_idx_images(tmp_path / "w-images.gz", np.zeros((2, 27, 28), np.uint8))
    assert list(tmp_path.iterdir()) == []


def test_mismatched_counts(tmp_path):
    write_idx_images(tmp_path / "train-images-idx3-ubyte.gz", _images(6))
    write_idx_labels(tmp_path / "train-labels-idx1-ubyte.gz", _labels(5))
    with pytest.raises(DataError, match="mismatch") as e:
        load_split(tmp_path, "train")
    _assert_names(e, str(tmp_path))
    _assert_names(e, "train-images-idx3-ubyte.gz")
    _assert_names(e, "6")


def test_missing_folder(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(DataError, match="does not exist") as e:
        load_split(missing, "train")
    _assert_names(e, str(missing))


def test_missing_file(tmp_path):
    write_idx_images(tmp_path / "t10k-images-idx3-ubyte.gz", _images(3))
    with pytest.raises(DataError, match="missing") as e:
        load_split(tmp_path, "t10k")
    msg = str(e.value)
    assert "looked for t10k-labels-idx1-ubyte.gz and t10k-labels-idx1-ubyte" in msg
    assert str(tmp_path) in msg


def test_unknown_split(tmp_path):
    with pytest.raises(DataError, match="split"):
        load_split(tmp_path, "valid")


def test_read_missing_file(tmp_path):
    p = tmp_path / "absent-images-idx3-ubyte.gz"
    with pytest.raises(DataError, match="does not exist") as e:
        read_idx_images(p)
    _assert_names(e, p.name)


# --------------------------------------------------------------------- download


def test_mirrors_table():
    assert MIRRORS["mnist"]["base_url"] == "https://ossci-datasets.s3.amazonaws.com/mnist/"
    assert MIRRORS["fashion-mnist"]["base_url"] == (
        "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/")
    assert MIRRORS["mnist"]["md5"]["train-images-idx3-ubyte.gz"] == (
        "f68b3c2dcbeaaa9fbdd348bbdeb94873")
    assert MIRRORS["fashion-mnist"]["md5"]["t10k-labels-idx1-ubyte.gz"] == (
        "bb300cfdad3c16e7a12a480ee83cd310")
    for entry in MIRRORS.values():
        assert len(entry["md5"]) == 4


def test_download_checksum_mismatch(tmp_path):
    served = tmp_path / "served"
    served.mkdir()
    # wrong content: valid IDX files, but not the published ones
    _write_split(served, "train", _images(4), _labels(4))
    _write_split(served, "t10k", _images(3), _labels(3))
    name = "train-images-idx3-ubyte.gz"  # first file in the table
    actual = hashlib.md5((served / name).read_bytes()).hexdigest()
    dest = tmp_path / "dest"
    with pytest.raises(DataError, match="checksum mismatch") as e:
        download_dataset("mnist", dest, base_url=served.as_uri(), progress=False)
    msg = str(e.value)
    assert name in msg
    assert "f68b3c2dcbeaaa9fbdd348bbdeb94873" in msg and actual in msg
    assert list(dest.iterdir()) == []  # temp file removed, nothing moved into place


def test_download_network_failure(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    dest = tmp_path / "dest"
    with pytest.raises(DataError) as e:
        download_dataset("fashion-mnist", dest, base_url=empty.as_uri(), progress=False)
    msg = str(e.value)
    assert "download from" in msg and "failed" in msg
    assert "data.mnist_dir" in msg and "data.ood_dir" in msg
    assert empty.as_uri() in msg
    assert list(dest.iterdir()) == []


def test_download_success_with_override(tmp_path):
    served = tmp_path / "served"
    served.mkdir()
    _write_split(served, "train", _images(4), _labels(4))
    _write_split(served, "t10k", _images(3, 1), _labels(3, 1))
    sums = {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in served.iterdir()}
    assert len(sums) == 4
    dest = tmp_path / "dest"
    out = download_dataset("mnist", dest, base_url=served.as_uri() + "/",
                           checksums=sums, progress=False)
    assert out == dest
    assert sorted(p.name for p in dest.iterdir()) == sorted(sums)
    images, labels = load_split(dest, "train")
    np.testing.assert_array_equal(images, _images(4))
    np.testing.assert_array_equal(labels, _labels(4))
    # second call: files present with right md5 -> skipped (served copies removed)
    for p in served.iterdir():
        p.unlink()
    download_dataset("mnist", dest, base_url=served.as_uri(), checksums=sums,
                     progress=False)


def test_download_rejects_unknown(tmp_path):
    with pytest.raises(DataError, match="unknown dataset"):
        download_dataset("cifar", tmp_path)
    with pytest.raises(DataError, match="unknown files"):
        download_dataset("mnist", tmp_path, checksums={"evil.bin": "0" * 32})
