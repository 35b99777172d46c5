"""Reading, writing and downloading MNIST-style IDX files.

The IDX format (http://yann.lecun.com/exdb/mnist/) is a big-endian header

* 4-byte magic number ``0x00 0x00 <dtype> <ndim>`` (dtype 0x08 = unsigned byte),
* ``ndim`` 4-byte big-endian dimension sizes,

followed by the raw payload. Images are ``0x00000803`` (N, rows, cols), labels are
``0x00000801`` (N,). Files may be gzip-compressed (the usual ``.gz`` distribution) or
raw; both are accepted when reading. Every problem with the input raises
:class:`DataError`, whose message names the offending file (or folder) and the problem.

Example::

    >>> images, labels = load_split("/work/shared/data/mnist", "t10k")  # doctest: +SKIP
    >>> images.shape, labels.shape                                     # doctest: +SKIP
    ((10000, 28, 28), (10000,))
"""

from __future__ import annotations

import gzip
import hashlib
import math
import os
import struct
import tempfile
import urllib.error
import urllib.request
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Optional, Union

import numpy as np

PathLike = Union[str, "os.PathLike[str]"]

IMAGES_MAGIC = 0x00000803
LABELS_MAGIC = 0x00000801
IMAGE_SHAPE = (28, 28)
NUM_CLASSES = 10
SPLITS = ("train", "t10k")

_GZIP_MAGIC = b"\x1f\x8b"
_CHUNK = 1 << 16

# Canonical mirrors and the published MD5 checksums (as listed by torchvision).
# Only files the project downloads itself are checked against these; local folders
# (e.g. /work/shared/data) are validated structurally instead.
MIRRORS: dict[str, dict[str, object]] = {
    "mnist": {
        "base_url": "https://ossci-datasets.s3.amazonaws.com/mnist/",
        "md5": {
            "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
            "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
            "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
            "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
        },
    },
    "fashion-mnist": {
        "base_url": "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
        "md5": {
            "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
            "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
            "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
            "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
        },
    },
}


class DataError(ValueError):
    """Bad input data: missing/corrupt/malformed file, failed download, bad checksum."""


# --------------------------------------------------------------------------- helpers


def _hash_file(path: PathLike, algorithm: str) -> str:
    h = hashlib.new(algorithm)
    try:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(_CHUNK), b""):
                h.update(chunk)
    except OSError as exc:
        raise DataError(f"{path}: cannot read file for {algorithm}: {exc}") from exc
    return h.hexdigest()


def sha256_file(path: PathLike) -> str:
    """Hex SHA-256 of a file's bytes (as stored, i.e. of the .gz if compressed)."""
    return _hash_file(path, "sha256")


def md5_file(path: PathLike) -> str:
    """Hex MD5 of a file's bytes (used to check downloads against published sums)."""
    return _hash_file(path, "md5")


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# Mode a normally created file gets (mkstemp files are 0600); umask read once at import
# because os.umask is process-global.
_FILE_MODE = 0o666 & ~_read_umask()


def _read_bytes(path: PathLike) -> bytes:
    """Whole (decompressed) content of ``path``; gzip detected by suffix or magic."""
    p = Path(path)
    try:
        if not p.exists():
            raise DataError(f"{p}: file does not exist" + (" (a broken symbolic link)" if p.is_symlink() else ""))
        if not p.is_file():
            raise DataError(f"{p}: not a regular file")
        raw = p.read_bytes()
    except OSError as exc:  # e.g. a folder on the way that cannot be searched
        raise DataError(f"{p}: cannot read file: {exc.strerror or exc}") from exc
    if p.name.endswith(".gz") or raw[:2] == _GZIP_MAGIC:
        try:
            return gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as exc:
            raise DataError(f"{p}: corrupt or truncated gzip data: {exc}") from exc
    return raw


def _parse_idx(path: PathLike, data: bytes, magic: int, ndim: int) -> np.ndarray:
    if len(data) < 4:
        raise DataError(f"{path}: file too short ({len(data)} bytes) to hold an IDX header")
    (got_magic,) = struct.unpack(">I", data[:4])
    if got_magic != magic:
        raise DataError(
            f"{path}: wrong IDX magic number 0x{got_magic:08x}, expected 0x{magic:08x} "
            f"({'images' if magic == IMAGES_MAGIC else 'labels'})"
        )
    header_len = 4 + 4 * ndim
    if len(data) < header_len:
        raise DataError(
            f"{path}: truncated IDX header: {len(data)} bytes, need {header_len} "
            f"for {ndim} dimension sizes"
        )
    dims = struct.unpack(f">{ndim}I", data[4:header_len])
    expected = math.prod(dims)  # Python ints: np.prod would wrap around in int64 for absurd header dims
    payload = len(data) - header_len
    if payload < expected:
        raise DataError(
            f"{path}: truncated payload: header dims {tuple(dims)} need {expected} bytes, "
            f"found {payload}"
        )
    if payload > expected:
        raise DataError(
            f"{path}: {payload - expected} trailing bytes after payload: header dims "
            f"{tuple(dims)} need {expected} bytes, found {payload}"
        )
    arr = np.frombuffer(data, dtype=np.uint8, offset=header_len).reshape(dims)
    return arr.copy()  # writable, owns its memory


# ------------------------------------------------------------------------ reading


def read_idx_images(path: PathLike) -> np.ndarray:
    """Read an IDX3 image file (gz or raw) into a ``uint8`` array of shape (N, 28, 28)."""
    data = _read_bytes(path)
    images = _parse_idx(path, data, IMAGES_MAGIC, 3)
    if images.shape[1:] != IMAGE_SHAPE:
        raise DataError(
            f"{path}: image size {images.shape[1]}x{images.shape[2]}, "
            f"expected {IMAGE_SHAPE[0]}x{IMAGE_SHAPE[1]}"
        )
    return images


def read_idx_labels(path: PathLike) -> np.ndarray:
    """Read an IDX1 label file (gz or raw) into a ``uint8`` array of shape (N,).

    Labels must lie in [0, 9]; the first bad index and value are reported otherwise.
    """
    data = _read_bytes(path)
    labels = _parse_idx(path, data, LABELS_MAGIC, 1)
    _check_label_range(path, labels)
    return labels


def _check_label_range(where: object, labels: np.ndarray) -> None:
    bad = np.flatnonzero((labels < 0) | (labels >= NUM_CLASSES))
    if bad.size:
        i = int(bad[0])
        raise DataError(
            f"{where}: label out of range [0, {NUM_CLASSES - 1}] at index {i} "
            f"(value {int(labels[i])}); {bad.size} bad label(s) in total"
        )


# ------------------------------------------------------------------------ writing


def _encode_idx(magic: int, arr: np.ndarray) -> bytes:
    header = struct.pack(">I", magic) + struct.pack(f">{arr.ndim}I", *arr.shape)
    return header + np.ascontiguousarray(arr, dtype=np.uint8).tobytes()


def _atomic_write(path: PathLike, payload: bytes) -> None:
    """Write ``payload`` (gzipped if the name ends in .gz) via temp file + os.replace.

    Gzip output is deterministic (mtime 0, no embedded file name), so identical arrays
    give byte-identical files and stable checksums.
    """
    p = Path(path)
    if not p.parent.is_dir():
        raise DataError(f"{p}: destination folder {p.parent} does not exist")
    fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            if p.name.endswith(".gz"):
                with gzip.GzipFile(filename="", mode="wb", fileobj=f, mtime=0,
                                   compresslevel=9) as gz:
                    gz.write(payload)
            else:
                f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _FILE_MODE)
        os.replace(tmp, p)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def write_idx_images(path: PathLike, images: np.ndarray) -> None:
    """Write a (N, 28, 28) uint8 array as an IDX3 file (gzip when ``path`` ends in .gz)."""
    arr = np.asarray(images)
    if arr.ndim != 3 or arr.shape[1:] != IMAGE_SHAPE:
        raise DataError(f"{path}: images must have shape (N, 28, 28), got {arr.shape}")
    if arr.dtype != np.uint8:
        raise DataError(f"{path}: images must be uint8, got {arr.dtype}")
    _atomic_write(path, _encode_idx(IMAGES_MAGIC, arr))


def write_idx_labels(path: PathLike, labels: np.ndarray) -> None:
    """Write a (N,) integer label array with values in [0, 9] as an IDX1 file."""
    arr = np.asarray(labels)
    if arr.ndim != 1:
        raise DataError(f"{path}: labels must be 1-D, got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer):
        raise DataError(f"{path}: labels must be integers, got {arr.dtype}")
    _check_label_range(path, arr)
    _atomic_write(path, _encode_idx(LABELS_MAGIC, arr.astype(np.uint8)))


# ------------------------------------------------------------------------- splits


def _split_filenames(split: str) -> tuple[str, str]:
    return f"{split}-images-idx3-ubyte", f"{split}-labels-idx1-ubyte"


def _find(folder: Path, stem: str) -> Path:
    candidates = [folder / f"{stem}.gz", folder / stem]
    try:
        for c in candidates:
            if c.is_file():
                return c
        for c in candidates:  # present, but not a file we can read (a folder, a FIFO, a dangling link)
            if c.is_symlink() and not c.exists():
                raise DataError(f"{c}: broken symbolic link (its target {os.readlink(c)} does not exist)")
            if c.exists():
                raise DataError(f"{c}: not a regular file")
    except OSError as exc:  # the folder cannot be listed or searched
        raise DataError(f"{exc.filename or folder}: cannot read the data folder: {exc.strerror or exc}") from exc
    raise DataError(
        f"{folder}: missing file; looked for " + " and ".join(c.name for c in candidates)
    )


def split_files(folder: PathLike, split: str) -> tuple[Path, Path]:
    """The image and label files of ``split`` in ``folder`` (gz preferred), as :func:`load_split` reads them."""
    img_stem, lbl_stem = _split_filenames(split)
    return _find(Path(folder), img_stem), _find(Path(folder), lbl_stem)


def load_split(folder: PathLike, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Load ``{split}-images-idx3-ubyte[.gz]`` and ``{split}-labels-idx1-ubyte[.gz]``.

    ``split`` is ``"train"`` or ``"t10k"``. Returns ``(images (N,28,28) uint8,
    labels (N,) uint8)`` after checking that both files hold the same count.
    """
    if split not in SPLITS:
        raise DataError(f"{folder}: unknown split {split!r}, expected one of {SPLITS}")
    d = Path(folder)
    try:
        if not d.exists():
            raise DataError(f"{d}: data folder does not exist")
        if not d.is_dir():
            raise DataError(f"{d}: data folder path is not a directory")
    except OSError as exc:
        raise DataError(f"{d}: cannot read the data folder: {exc.strerror or exc}") from exc
    img_path, lbl_path = split_files(d, split)
    images = read_idx_images(img_path)
    labels = read_idx_labels(lbl_path)
    if images.shape[0] != labels.shape[0]:
        raise DataError(
            f"{d}: image/label count mismatch for split {split!r}: "
            f"{img_path.name} has {images.shape[0]} images, "
            f"{lbl_path.name} has {labels.shape[0]} labels"
        )
    return images, labels


# ------------------------------------------------------------------------ download


def _download_one(url: str, dest: Path, expected_md5: str, timeout: float,
                  progress: bool) -> None:
    """Stream ``url`` into a temp file next to ``dest``, verify MD5, then os.replace."""
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    md5 = hashlib.md5()
    try:
        try:
            with os.fdopen(fd, "wb") as f, urllib.request.urlopen(url, timeout=timeout) as r:
                total = r.headers.get("Content-Length") if r.headers else None
                bar = None
                if progress:
                    try:
                        from tqdm import tqdm

                        bar = tqdm(total=int(total) if total else None, unit="B",
                                   unit_scale=True, desc=dest.name, leave=False)
                    except ImportError:  # progress is cosmetic
                        bar = None
                try:
                    for chunk in iter(lambda: r.read(_CHUNK), b""):
                        f.write(chunk)
                        md5.update(chunk)
                        if bar is not None:
                            bar.update(len(chunk))
                finally:
                    if bar is not None:
                        bar.close()
                f.flush()
                os.fsync(f.fileno())
        except (urllib.error.URLError, OSError, ValueError) as exc:
            raise DataError(
                f"{dest.name}: download from {url} failed: {exc}. If this machine has no "
                f"internet access, set params data.mnist_dir / data.ood_dir to local "
                f"folders holding the IDX files instead."
            ) from exc
        actual = md5.hexdigest()
        if actual != expected_md5.lower():
            raise DataError(
                f"{dest.name}: checksum mismatch for download from {url}: "
                f"expected md5 {expected_md5}, got {actual}"
            )
        os.chmod(tmp, _FILE_MODE)
        os.replace(tmp, dest)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def download_dataset(
    name: str,
    dest_folder: PathLike,
    *,
    base_url: Optional[str] = None,
    timeout: float = 30,
    checksums: Optional[Mapping[str, str]] = None,
    progress: bool = True,
) -> Path:
    """Download the IDX files of ``name`` ("mnist" or "fashion-mnist") into ``dest_folder``.

    Each file is fetched from ``base_url`` (default: the canonical mirror in
    :data:`MIRRORS`), its MD5 checked against the published sum, and moved into place
    atomically. Files already present with the right MD5 are skipped.

    ``checksums`` (mainly for tests) replaces the file -> md5 table: only the files it
    names are fetched, and each must be one of the dataset's known file names.
    Returns the destination folder.
    """
    if name not in MIRRORS:
        raise DataError(f"{name!r}: unknown dataset, expected one of {sorted(MIRRORS)}")
    mirror = MIRRORS[name]
    known: Mapping[str, str] = mirror["md5"]  # type: ignore[assignment]
    if checksums is None:
        table = dict(known)
    else:
        unknown = sorted(set(checksums) - set(known))
        if unknown:
            raise DataError(
                f"{name}: checksums override names unknown files {unknown}; "
                f"expected a subset of {sorted(known)}"
            )
        table = dict(checksums)
    url_root = (base_url or mirror["base_url"]).rstrip("/") + "/"  # type: ignore[union-attr]

    dest = Path(dest_folder)
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"{dest}: cannot create download folder: {exc}") from exc

    for filename, expected in table.items():
        target = dest / filename
        if target.is_file() and md5_file(target) == expected.lower():
            continue
        _download_one(url_root + filename, target, expected, timeout, progress)
    return dest
