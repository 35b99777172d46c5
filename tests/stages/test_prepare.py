"""Stage prepare: the embedded IDX sample -> data/prepared (arrays + manifest) under the workspace."""

from __future__ import annotations

import json
from pathlib import Path

from pfp.config import parse_params
from pfp.data.dirty_mnist import SPLIT_KEYS, load_prepared
from pfp.stages.prepare import prepare

EMBEDDED = Path(__file__).resolve().parents[2] / "data" / "embedded"


def test_prepare_writes_arrays_and_manifest(tmp_path):
    params = parse_params({
        "seed": 0, "models": ["mlp"], "train": {"mlp": {}},
        "data": {"mnist_dir": str(EMBEDDED / "mnist"), "ood_dir": str(EMBEDDED / "fashion-mnist"), "val_size": 20,
                 "train_size": 60, "test_size": 10, "ood_size": 10},
        "ambiguous": {"train_images": 4, "val_images": 2, "test_images": 2, "labels_per_image": 2, "max_mi": 1.0,
                      "min_entropy": 0.0, "vae": {"epochs": 1, "hidden": [16], "latent_dim": 2},
                      "ensemble": {"members": 2, "epochs": 1}}})
    result = prepare(params, root=tmp_path, progress=False)
    assert result.folder == tmp_path / "data" / "prepared"
    assert sorted(p.name for p in result.folder.iterdir()) == ["dirty_mnist.npz", "manifest.json"]
    assert json.loads(result.manifest_path.read_text()) == result.manifest
    assert result.data_hash == result.manifest["data_hash"] and len(result.data_hash) == 64
    arrays = load_prepared(result.folder)
    assert result.metrics()["count"] == {key: int(arrays[f"{key}_x"].shape[0]) for key in SPLIT_KEYS}
    assert result.metrics()["count"]["mnist_val"] == 20 and result.metrics()["count"]["ambiguous_train"] == 4
