"""A bundle is checked before any of its code runs: files, checksums, fields, model, architecture, CPU features."""

from __future__ import annotations

import json
import shutil
import tarfile

import numpy as np
import pytest

from pfp_runtime import BundleError, load_bundle, read_bundle
from pfp_runtime.bundle import CHECKSUM_FILE, METADATA_FILE, write_checksums

from ..common import make_bundle

IMAGES = np.random.default_rng(1).integers(0, 256, (3, 28, 28), dtype=np.uint8)


@pytest.fixture
def copy(mlp_bundle, tmp_path):
    """A private copy of the MLP bundle to damage."""
    return shutil.copytree(mlp_bundle.folder, tmp_path / "bundle")


def _edit_metadata(folder, change, *, rechecksum=True):
    meta = json.loads((folder / METADATA_FILE).read_text())
    change(meta)
    (folder / METADATA_FILE).write_text(json.dumps(meta))
    if rechecksum:
        write_checksums(folder)


def test_a_good_bundle_lists_its_files_with_checksums(mlp_bundle):
    bundle = read_bundle(mlp_bundle.folder, expected_model="mlp")
    names = {line.split("  ")[1] for line in (mlp_bundle.folder / CHECKSUM_FILE).read_text().splitlines()}
    assert names == {METADATA_FILE, "pfp_b1.so", "pfp_b4.so"}
    assert sorted(bundle.libraries) == [1, 4] and bundle.classes == 10 and bundle.input_shape == (1, 28, 28)
    meta = bundle.metadata
    assert meta["target"]["arch"] == "x86_64" and meta["versions"]["tvm"].startswith("0.27")
    assert 0 < meta["ood"]["validation_tpr"] <= 1 and meta["ood"]["validation_tpr"] >= meta["ood"]["target_tpr"]


def test_checksum_mismatch_names_the_file(copy):
    library = copy / "pfp_b4.so"
    data = bytearray(library.read_bytes())
    data[len(data) // 2] ^= 0xFF
    library.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"pfp_b4.so: checksum mismatch .* corrupt, truncated or was changed"):
        load_bundle(copy)


def test_truncated_library_is_refused(copy):
    library = copy / "pfp_b1.so"
    library.write_bytes(library.read_bytes()[:1000])
    with pytest.raises(BundleError, match="pfp_b1.so: checksum mismatch"):
        load_bundle(copy)


def test_corrupt_library_with_matching_checksums_fails_to_load_cleanly(copy):
    (copy / "pfp_b1.so").write_bytes(b"\x7fELF not really a library")
    write_checksums(copy)
    with pytest.raises(BundleError, match="pfp_b1.so: truncated or corrupt ELF header"):
        load_bundle(copy)


def test_missing_pieces(copy, tmp_path):
    with pytest.raises(BundleError, match="bundle folder not found"):
        load_bundle(tmp_path / "nowhere")
    (copy / CHECKSUM_FILE).unlink()
    with pytest.raises(BundleError, match="SHA256SUMS: checksum file missing"):
        load_bundle(copy)
    write_checksums(copy)
    (copy / "pfp_b4.so").unlink()
    with pytest.raises(BundleError, match="pfp_b4.so: listed in SHA256SUMS but missing"):
        load_bundle(copy)
    (copy / METADATA_FILE).unlink()
    with pytest.raises(BundleError, match="bundle.json: not found"):
        load_bundle(copy)


@pytest.mark.parametrize("change, message", [
    (lambda m: m.update(format=99), "bundle format 99, this runtime reads format 1"),
    (lambda m: m.pop("ood"), "missing field\\(s\\) ood"),
    (lambda m: m.update(libraries={}), "libraries must map batch sizes"),
    (lambda m: m["input"].pop("std"), "input.std must be a positive number, got None"),
    (lambda m: m["calibration"].update(temperature=0), "calibration.temperature must be a positive number"),
    (lambda m: m["ood"].update(score="entropy"), "ood.score must be 'mi' or 'sme'"),
])
def test_invalid_metadata_names_the_field(copy, change, message):
    _edit_metadata(copy, change)
    with pytest.raises(BundleError, match=message):
        load_bundle(copy)


def test_edited_metadata_without_new_checksums_is_refused(copy):
    _edit_metadata(copy, lambda m: m["ood"].update(threshold=10.0), rechecksum=False)
    with pytest.raises(BundleError, match="bundle.json: checksum mismatch"):
        load_bundle(copy)


def test_invalid_json(copy):
    (copy / METADATA_FILE).write_text("{not json")
    with pytest.raises(BundleError, match="bundle.json: not valid JSON"):
        load_bundle(copy)


def test_another_model_architecture_or_cpu_is_refused(copy, tmp_path):
    with pytest.raises(BundleError, match="bundle of the 'mlp' model, not the 'lenet' model asked for"):
        load_bundle(copy, expected_model="lenet")
    _edit_metadata(copy, lambda m: m["target"].update(cpu_features=[*m["target"]["cpu_features"], "sve2_nowhere"]))
    with pytest.raises(BundleError, match="compiled for CPU features this host lacks: sve2_nowhere"):
        load_bundle(copy)
    board = make_bundle(tmp_path / "board", "mlp", target="rasp4b", batch_sizes=(1,))
    with pytest.raises(BundleError, match="bundle built for aarch64 \\(rasp4b\\), this host is x86_64"):
        load_bundle(board.folder)
    assert read_bundle(board.folder, check_host=False).metadata["target"]["cpu_features"] == ["asimd", "fp"]


def test_archive_loads_like_the_folder(mlp_bundle, tmp_path):
    archive = tmp_path / "mlp.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(mlp_bundle.folder, arcname="mlp")
    np.testing.assert_array_equal(load_bundle(archive).predict(IMAGES).probs, load_bundle(mlp_bundle.folder).predict(IMAGES).probs)
    (tmp_path / "bad.tar.gz").write_bytes(b"not an archive")
    with pytest.raises(BundleError, match="bad.tar.gz: not a readable bundle archive"):
        load_bundle(tmp_path / "bad.tar.gz")
