"""Dirty-MNIST = MNIST + Ambiguous-MNIST, with Fashion-MNIST as the OOD set.

:func:`prepare_dirty_mnist` reads (or downloads) the IDX files, splits them, builds the
ambiguous half and returns every split as uint8 arrays plus a manifest (counts, seeds,
content hashes). Ambiguous splits carry ``L`` labels per image (shape ``(N, L)``).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pfp.config import PipelineParams
from pfp.data.ambiguous import generate_ambiguous, load_original
from pfp.data.idx import DataError, download_dataset, load_split, sha256_file, split_files
from pfp.io import atomic_savez, atomic_write_text

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
SPLIT_KEYS = ("mnist_train", "mnist_val", "mnist_test", "ambiguous_train", "ambiguous_val", "ambiguous_test", "ood_test")


def normalise(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, 28, 28) -> float32 (N, 1, 28, 28) with MNIST's mean/std."""
    return ((torch.from_numpy(images).float() / 255.0 - MNIST_MEAN) / MNIST_STD).unsqueeze(1)


def _source_folder(configured: str | None, dataset: str, download_dir: str, key: str) -> Path:
    if configured is None:
        return download_dataset(dataset, Path(download_dir) / dataset)
    folder = Path(configured)
    try:
        if not folder.is_dir():
            what = "is not a folder" if folder.exists() else "does not exist"
            raise DataError(f"data.{key}: folder {folder} {what}")
        next(folder.iterdir(), None)  # listable: the manifest hashes every file in it
    except OSError as exc:
        raise DataError(f"data.{key}: cannot read the data folder {folder}: {exc.strerror or exc}") from exc
    return folder


#: where each prepared split comes from (for the message when one would be empty)
_SPLIT_SOURCES = {"mnist_test": ("mnist_dir", "t10k"), "ood_test": ("ood_dir", "t10k"), "mnist_train": ("mnist_dir", "train"),
                  "mnist_val": ("mnist_dir", "train")}


def _refuse_empty_splits(arrays: dict[str, np.ndarray], folders: dict[str, Path]) -> None:
    """An empty split prepares fine and fails much later (evaluate): refuse it here, naming its source file."""
    for key in SPLIT_KEYS:
        if f"{key}_x" not in arrays or arrays[f"{key}_x"].shape[0]:
            continue
        if key in _SPLIT_SOURCES:
            param, split = _SPLIT_SOURCES[key]
            images, _ = split_files(folders[param], split)
            raise DataError(f"{images}: holds no images, so the {key} split would be empty (data.{param})")
        raise DataError(f"ambiguous: the {key} split would be empty (check the ambiguous section of the params)")


def _array_hash(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def prepare_dirty_mnist(params: PipelineParams, *, progress: bool = True) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    data = params.data
    mnist_dir = _source_folder(data.mnist_dir, "mnist", data.download_dir, "mnist_dir")
    ood_dir = _source_folder(data.ood_dir, "fashion-mnist", data.download_dir, "ood_dir")
    train_images, train_labels = load_split(mnist_dir, "train")
    test_images, test_labels = load_split(mnist_dir, "t10k")
    ood_images, ood_labels = load_split(ood_dir, "t10k")

    if data.val_size >= len(train_images):
        raise DataError(f"data.val_size: {data.val_size} leaves no training images ({mnist_dir} holds {len(train_images)})")
    rng = np.random.default_rng(params.seed)
    order = rng.permutation(len(train_images))
    val_index = order[: data.val_size]
    train_index = order[data.val_size :][: data.train_size]
    arrays: dict[str, np.ndarray] = {
        "mnist_train_x": train_images[train_index], "mnist_train_y": train_labels[train_index].astype(np.int64),
        "mnist_val_x": train_images[val_index], "mnist_val_y": train_labels[val_index].astype(np.int64),
        "mnist_test_x": test_images[: data.test_size], "mnist_test_y": test_labels[: data.test_size].astype(np.int64),
        "ood_test_x": ood_images[: data.ood_size], "ood_test_y": ood_labels[: data.ood_size].astype(np.int64),
    }
    _refuse_empty_splits(arrays, {"mnist_dir": mnist_dir, "ood_dir": ood_dir})
    if data.ambiguous_dir is not None:
        ambiguous = load_original(data.ambiguous_dir, params.ambiguous, seed=params.seed)
        ambiguous_source = "original"
    else:
        ambiguous = generate_ambiguous(arrays["mnist_train_x"], arrays["mnist_train_y"], params.ambiguous, seed=params.seed, progress=progress)
        ambiguous_source = "generated"
    for split in ("train", "val", "test"):
        arrays[f"ambiguous_{split}_x"] = getattr(ambiguous, f"{split}_images")
        arrays[f"ambiguous_{split}_y"] = getattr(ambiguous, f"{split}_labels")
    _refuse_empty_splits(arrays, {"mnist_dir": mnist_dir, "ood_dir": ood_dir})

    source_files = sorted(p for folder in (mnist_dir, ood_dir) for p in folder.iterdir() if "ubyte" in p.name)
    manifest = {
        "seed": params.seed,
        "counts": {key: int(arrays[f"{key}_x"].shape[0]) for key in SPLIT_KEYS},
        "pairs": {key: int(arrays[f"{key}_y"].size) for key in SPLIT_KEYS},
        "ambiguous": {"source": ambiguous_source, **ambiguous.stats},
        "source_sha256": {str(p): sha256_file(p) for p in source_files},
        "array_sha256": {key: _array_hash(value) for key, value in sorted(arrays.items())},
    }
    manifest["data_hash"] = hashlib.sha256(json.dumps(manifest["array_sha256"], sort_keys=True).encode()).hexdigest()
    return arrays, manifest


def save_prepared(folder: str | Path, arrays: dict[str, np.ndarray], manifest: dict[str, Any]) -> None:
    folder = Path(folder)
    atomic_savez(folder / "dirty_mnist.npz", arrays)
    atomic_write_text(folder / "manifest.json", json.dumps(manifest, indent=2))


def load_prepared(folder: str | Path) -> dict[str, np.ndarray]:
    path = Path(folder) / "dirty_mnist.npz"
    if not path.is_file():
        raise DataError(f"{path}: prepared data not found; run the prepare stage first")
    with np.load(path, allow_pickle=False) as archive:
        arrays = {key: archive[key] for key in archive.files}
    missing = [f"{key}_{part}" for key in SPLIT_KEYS for part in "xy" if f"{key}_{part}" not in arrays]
    if missing:
        raise DataError(f"{path}: missing arrays {', '.join(missing)}")
    return arrays


def training_set(arrays: dict[str, np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """MNIST train + every (ambiguous image, label) pair, normalised, as torch tensors."""
    ambiguous_y = arrays["ambiguous_train_y"]
    repeats = ambiguous_y.shape[1]
    x = np.concatenate([arrays["mnist_train_x"], np.repeat(arrays["ambiguous_train_x"], repeats, axis=0)])
    y = np.concatenate([arrays["mnist_train_y"], ambiguous_y.reshape(-1)])
    return normalise(x), torch.from_numpy(y.astype(np.int64))
