"""Bad data: corrupted IDX files (hypothesis), broken data folders, and the prepare stage's entry point on them.

Every corruption ends in a :class:`DataError` naming the file (or folder), or -- when the corruption
leaves a valid file (a flipped pixel, a flipped gzip timestamp) -- in a data set of the original
shape and counts. Anything else (another exception, a hang) fails the property.
"""

from __future__ import annotations

import gzip
import os
import shutil
import stat
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pfp.config import parse_params
from pfp.data.dirty_mnist import prepare_dirty_mnist
from pfp.data.idx import NUM_CLASSES, DataError, load_split, write_idx_images, write_idx_labels
from tests.reliability.report import record

REPO = Path(__file__).resolve().parents[2]
EMBEDDED = REPO / "data" / "embedded"
N = 12  # images per synthetic split: small, the checks are per byte and per header field
SETTINGS = settings(max_examples=200, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])



def _split(folder: Path, gz: bool) -> tuple[Path, Path, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (N, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, NUM_CLASSES, N).astype(np.uint8)
    ext = ".gz" if gz else ""
    folder.mkdir(parents=True, exist_ok=True)
    img, lbl = folder / f"t10k-images-idx3-ubyte{ext}", folder / f"t10k-labels-idx1-ubyte{ext}"
    write_idx_images(img, images)
    write_idx_labels(lbl, labels)
    return img, lbl, images, labels


def _content(path: Path) -> bytes:
    raw = path.read_bytes()
    return gzip.decompress(raw) if path.name.endswith(".gz") else raw


def _store(path: Path, content: bytes) -> None:
    path.write_bytes(gzip.compress(content, mtime=0) if path.name.endswith(".gz") else content)


def _outcome(folder: Path, target: Path, images: np.ndarray, labels: np.ndarray) -> str:
    """Load the corrupted split: a DataError naming the file, or a data set passing the shape/count checks."""
    try:
        got_images, got_labels = load_split(folder, "t10k")
    except DataError as error:
        message = str(error)
        # the file itself, or (image/label count mismatch) its folder and its name
        assert str(target) in message or (str(folder) in message and target.name in message), message
        return "refused"
    assert got_images.shape == images.shape and got_labels.shape == labels.shape
    assert got_images.dtype == np.uint8 and int(got_labels.max()) < NUM_CLASSES
    return "valid"


_case = st.tuples(st.booleans(), st.sampled_from(["images", "labels"]))


def _fresh(tmp_path: Path) -> Path:
    """A new folder per example (tmp_path is shared by all of a hypothesis test's examples)."""
    return Path(tempfile.mkdtemp(dir=tmp_path))


@SETTINGS
@given(case=_case, data=st.data())
def test_flipped_bytes_are_refused_or_harmless(tmp_path, case, data):
    gz, which = case
    folder = _fresh(tmp_path)
    img, lbl, images, labels = _split(folder, gz)
    target = img if which == "images" else lbl
    stored = bytearray(target.read_bytes())
    positions = data.draw(st.lists(st.integers(0, len(stored) - 1), min_size=1, max_size=8, unique=True))
    for position in positions:
        stored[position] ^= data.draw(st.integers(1, 255))
    target.write_bytes(bytes(stored))
    _outcome(folder, target, images, labels)
    record("bad_input", "IDX: bytes flipped", tried=1, survived=1)


@SETTINGS
@given(case=_case, data=st.data())
def test_truncated_files_are_refused(tmp_path, case, data):
    gz, which = case
    folder = _fresh(tmp_path)
    img, lbl, images, labels = _split(folder, gz)
    target = img if which == "images" else lbl
    stored = target.read_bytes()
    target.write_bytes(stored[: data.draw(st.integers(0, len(stored) - 1))])
    assert _outcome(folder, target, images, labels) == "refused"
    record("bad_input", "IDX: truncated", tried=1, survived=1)


@SETTINGS
@given(case=_case, data=st.data())
def test_edited_headers_are_refused(tmp_path, case, data):
    gz, which = case
    folder = _fresh(tmp_path)
    img, lbl, images, labels = _split(folder, gz)
    target = img if which == "images" else lbl
    content = bytearray(_content(target))
    header = 16 if which == "images" else 8  # magic + 3 or 1 dimension sizes
    position = data.draw(st.integers(0, header - 1))
    content[position] = data.draw(st.integers(0, 255).filter(lambda v: v != content[position]))
    _store(target, bytes(content))
    # one header byte changed: another magic, dtype, rank or size, never a file of the same shape
    assert _outcome(folder, target, images, labels) == "refused"
    record("bad_input", "IDX: header edited", tried=1, survived=1)


@SETTINGS
@given(case=_case, count=st.integers(0, 2**32 - 1).filter(lambda c: c != N), trim=st.booleans())
def test_changed_counts_are_refused(tmp_path, case, count, trim):
    """The count field edited; with ``trim`` the payload is cut (or padded) to match it, so the file is a
    valid IDX file of another length and only the image/label comparison can catch it."""
    gz, which = case
    folder = _fresh(tmp_path)
    img, lbl, images, labels = _split(folder, gz)
    target = img if which == "images" else lbl
    content = _content(target)
    header, item = (16, 28 * 28) if which == "images" else (8, 1)
    payload = content[header:]
    if trim:
        count = count % (2 * N + 1)
        count = count if count != N else N + 1
        payload = (payload * 3)[: count * item]
    _store(target, content[:4] + struct.pack(">I", count) + content[8:header] + payload)
    assert _outcome(folder, target, images, labels) == "refused"
    record("bad_input", "IDX: counts changed", tried=1, survived=1)


# ------------------------------------------------------------------------------------ data folders


def _params(mnist: Path, ood: Path, **data) -> object:
    return parse_params({"models": ["mlp"], "train": {"mlp": {}},
                         "data": {"mnist_dir": str(mnist), "ood_dir": str(ood), "val_size": 20, "train_size": 60,
                                  "test_size": 10, "ood_size": 10, **data},
                         "ambiguous": {"train_images": 4, "val_images": 2, "test_images": 2, "labels_per_image": 2,
                                       "max_mi": 1.0, "min_entropy": 0.0, "vae": {"epochs": 1, "hidden": [16], "latent_dim": 2},
                                       "ensemble": {"members": 2, "epochs": 1}}})


def _embedded_copy(root: Path) -> tuple[Path, Path]:
    mnist, ood = root / "mnist", root / "fashion-mnist"
    shutil.copytree(EMBEDDED / "mnist", mnist)
    shutil.copytree(EMBEDDED / "fashion-mnist", ood)
    return mnist, ood


def _empty_folder(mnist, ood):
    shutil.rmtree(mnist)
    mnist.mkdir()
    return mnist, mnist


def _folder_is_a_file(mnist, ood):
    shutil.rmtree(ood)
    ood.write_text("not a folder\n")
    return ood, ood


def _folder_is_a_fifo(mnist, ood):
    shutil.rmtree(ood)
    os.mkfifo(ood)
    return ood, ood


def _folder_is_a_broken_link(mnist, ood):
    shutil.rmtree(ood)
    ood.symlink_to(ood.parent / "gone")
    return ood, ood


def _file_is_a_folder(mnist, ood):
    target = ood / "t10k-images-idx3-ubyte.gz"
    target.unlink()
    target.mkdir()
    return target, target


def _file_is_a_fifo(mnist, ood):
    # a FIFO would block a reader forever: it must be refused before anything opens it
    target = mnist / "train-labels-idx1-ubyte.gz"
    target.unlink()
    os.mkfifo(target)
    return target, target


def _file_is_a_broken_link(mnist, ood):
    target = mnist / "t10k-images-idx3-ubyte.gz"
    target.unlink()
    target.symlink_to(mnist / "elsewhere.gz")
    return target, target


def _png_named_idx(mnist, ood):
    target = mnist / "t10k-images-idx3-ubyte.gz"
    target.unlink()
    target = mnist / "t10k-images-idx3-ubyte"
    target.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    return target, target


def _text_gzip(mnist, ood):
    target = ood / "t10k-labels-idx1-ubyte.gz"
    target.write_bytes(gzip.compress(b"label,image\n3,img0.png\n"))
    return target, target


def _gz_that_is_not_gzip(mnist, ood):
    target = mnist / "train-images-idx3-ubyte.gz"
    target.write_text("plain text, not gzip\n")
    return target, target


def _wrong_image_size(mnist, ood):
    target = ood / "t10k-images-idx3-ubyte.gz"
    write_idx_images_any(target, np.zeros((10, 32, 32), np.uint8))
    return target, target


def _zero_test_images(mnist, ood):
    # a valid pair of files with no images: the test split would be empty (evaluate would fail much later)
    target = mnist / "t10k-images-idx3-ubyte.gz"
    write_idx_images(target, np.zeros((0, 28, 28), np.uint8))
    write_idx_labels(mnist / "t10k-labels-idx1-ubyte.gz", np.zeros(0, np.uint8))
    return target, target


def _zero_ood_images(mnist, ood):
    target = ood / "t10k-images-idx3-ubyte.gz"
    write_idx_images(target, np.zeros((0, 28, 28), np.uint8))
    write_idx_labels(ood / "t10k-labels-idx1-ubyte.gz", np.zeros(0, np.uint8))
    return target, target


def write_idx_images_any(path: Path, images: np.ndarray) -> None:
    """An IDX3 file of any image size (write_idx_images refuses anything but 28x28)."""
    header = struct.pack(">IIII", 0x00000803, *images.shape)
    path.write_bytes(gzip.compress(header + images.tobytes(), mtime=0))


FOLDER_CASES = [_empty_folder, _folder_is_a_file, _folder_is_a_fifo, _folder_is_a_broken_link, _file_is_a_folder,
                _file_is_a_fifo, _file_is_a_broken_link, _png_named_idx, _text_gzip, _gz_that_is_not_gzip, _wrong_image_size,
                _zero_test_images, _zero_ood_images]


@pytest.mark.parametrize("breakage", FOLDER_CASES, ids=lambda f: f.__name__.strip("_"))
def test_broken_data_folders_are_refused_naming_the_path(tmp_path, breakage):
    mnist, ood = _embedded_copy(tmp_path)
    named, _ = breakage(mnist, ood)
    with pytest.raises(DataError) as error:
        prepare_dirty_mnist(_params(mnist, ood), progress=False)
    assert str(named) in str(error.value), str(error.value)
    record("bad_input", "data folders: empty/unreadable/non-image", tried=1, survived=1)
    if breakage in (_zero_test_images, _zero_ood_images):
        assert "holds no images" in str(error.value)
        record("probe", f"{breakage.__name__.strip('_').replace('_', ' ')}: refused at prepare (was a traceback in evaluate)",
               tried=1, survived=1)


def _ambiguous(folder: Path, samples, labels) -> None:
    import torch

    folder.mkdir()
    torch.save(samples, folder / "amnist_samples.pt")
    torch.save(labels, folder / "amnist_labels.pt")


def _ambiguous_not_tensors(folder):
    import torch

    _ambiguous(folder, {"samples": torch.zeros(3, 1, 28, 28)}, torch.zeros(3, 10, dtype=torch.long))
    return folder / "amnist_samples.pt"


def _ambiguous_nan_pixels(folder):
    import torch

    samples = torch.rand(3, 1, 28, 28)
    samples[1, 0, 5, 5] = float("nan")
    _ambiguous(folder, samples, torch.zeros(3, 10, dtype=torch.long))
    return folder / "amnist_samples.pt"


def _ambiguous_nan_labels(folder):
    import torch

    labels = torch.zeros(3, 10)
    labels[2, 3] = float("nan")
    _ambiguous(folder, torch.rand(3, 1, 28, 28), labels)
    return folder / "amnist_labels.pt"


def _ambiguous_garbage(folder):
    folder.mkdir()
    (folder / "amnist_samples.pt").write_bytes(b"PK\x03\x04 not a torch archive")
    (folder / "amnist_labels.pt").write_bytes(b"")
    return folder


@pytest.mark.parametrize("breakage", [_ambiguous_not_tensors, _ambiguous_nan_pixels, _ambiguous_nan_labels, _ambiguous_garbage],
                         ids=lambda f: f.__name__.strip("_"))
def test_broken_original_ambiguous_files_are_refused(tmp_path, breakage):
    """data.ambiguous_dir (DDU's .pt files): a pickle of something else, NaN pixels or labels -> DataError naming the file."""
    from pfp.config import AmbiguousConfig
    from pfp.data.ambiguous import load_original

    named = breakage(tmp_path / "amnist")
    with pytest.raises(DataError) as error:
        load_original(tmp_path / "amnist", AmbiguousConfig(), seed=0)
    assert str(named) in str(error.value), str(error.value)
    record("bad_input", "data folders: empty/unreadable/non-image", tried=1, survived=1)
    if breakage is _ambiguous_not_tensors:
        record("probe", "original Ambiguous-MNIST file holding no tensor: refused (was an AttributeError traceback)",
               tried=1, survived=1)


# ------------------------------------------------------------------------- the stage's entry point


def _run_prepare(workspace: Path, mnist: Path, ood: Path, *, drop_root_file_access: bool = False):
    """``python -m tasks.prepare`` in ``workspace`` as dvc.yaml runs it (MLflow: a SQLite store there)."""
    params = {"models": ["mlp"], "train": {"mlp": {}},
              "data": {"mnist_dir": str(mnist), "ood_dir": str(ood), "val_size": 20, "train_size": 60, "test_size": 10,
                       "ood_size": 10}}
    (workspace / "params.yaml").write_text(yaml.safe_dump(params))
    env = {**os.environ, "PYTHONPATH": f"{REPO / 'src'}{os.pathsep}{REPO}", "MLFLOW_TRACKING_URI": "", "GIT_PYTHON_REFRESH": "quiet",
           "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "tasks.prepare"]
    if drop_root_file_access:
        # we run as root, whom chmod 000 does not stop: drop the capabilities that bypass file permissions
        caps = "-dac_override,-dac_read_search"
        command = ["setpriv", f"--inh-caps={caps}", f"--bounding-set={caps}", "--", *command]
    return subprocess.run(command, cwd=workspace, env=env, capture_output=True, text=True, timeout=300)


def _corrupt_gzip(mnist, ood):
    target = mnist / "t10k-images-idx3-ubyte.gz"
    stored = bytearray(target.read_bytes())
    stored[len(stored) // 2] ^= 0xFF
    target.write_bytes(bytes(stored))
    return target


def _unreadable_folder(mnist, ood):
    ood.chmod(0)
    return ood


@pytest.mark.parametrize("breakage", [_corrupt_gzip, _zero_ood_images, _unreadable_folder], ids=lambda f: f.__name__.strip("_"))
def test_prepare_entry_point_fails_cleanly(tmp_path, breakage):
    mnist, ood = _embedded_copy(tmp_path / "data")
    workspace = tmp_path / "workspace"
    workspace.mkdir()
    result = breakage(mnist, ood)
    named = result[0] if isinstance(result, tuple) else result
    try:
        done = _run_prepare(workspace, mnist, ood, drop_root_file_access=breakage is _unreadable_folder)
    finally:
        ood.chmod(stat.S_IRWXU)
    assert done.returncode == 2, done.stderr[-3000:]
    # one error line last (MLflow may log its store's creation before it)
    assert "Traceback" not in done.stderr and done.stderr.splitlines()[-1].startswith("error: "), done.stderr[-3000:]
    assert str(named) in done.stderr, done.stderr
    # nothing half-written: no prepared folder, no temporary file anywhere in the workspace
    assert not (workspace / "data" / "prepared").exists()
    assert not [p for p in workspace.rglob("*") if ".tmp" in p.name or p.name.endswith(".part")]
    if breakage is _unreadable_folder:
        assert "Permission denied" in done.stderr
        record("probe", "unreadable data folder: clear error (was a PermissionError traceback)", tried=1, survived=1)
    else:
        record("bad_input", "prepare stage entry point: bad data (exit 2, file named, nothing written)", tried=1, survived=1)

