"""The bundle format: one folder per model and target, checked before any of its code is loaded.

A bundle folder holds

* ``bundle.json`` (:data:`METADATA_FILE`): the model (name, spec, classes), the target (TVM target,
  architecture, the CPU features the code was compiled for), the libraries by batch size, the
  input normalisation, the calibration (temperature, variance scale), the uncertainty head, the
  out-of-distribution threshold, versions and provenance;
* one shared library per compiled batch size (``pfp_b1.so``, ...): ``main(x)`` with ``x`` the
  normalised images (batch, 1, 28, 28) returns one packed (batch, 3 C + 2) tensor, columns
  ``[probs | logit_mean | logit_var | mi | sme]`` (:func:`packed_columns`);
* ``SHA256SUMS`` (:data:`CHECKSUM_FILE`): the sha256 of every other file, in ``sha256sum``'s
  format (``sha256sum -c SHA256SUMS`` checks a copy by hand).

A ``.tar``/``.tar.gz`` archive of such a folder loads as well (unpacked to a temporary folder).

Before any library is mapped, :func:`read_bundle` checks the fields, every checksum, and that each
library is a whole ELF shared library for ``target.arch`` (:mod:`pfp_runtime.library`: a truncated
one would end the process with SIGBUS even when ``SHA256SUMS`` was re-made after the damage); the
predictor then runs each library once and refuses one whose output does not fit ``bundle.json``.
"""

from __future__ import annotations

import atexit
import json
import math
import shutil
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pfp_runtime._cpu import host_arch, host_cpu_features
from pfp_runtime.library import LibraryError, elf_arch, file_sha256

__all__ = ["BUNDLE_FORMAT", "CHECKSUM_FILE", "HEAD_OUTPUTS", "METADATA_FILE", "Bundle", "BundleError", "file_sha256",
           "packed_columns", "read_bundle", "write_checksums"]

BUNDLE_FORMAT = 1
METADATA_FILE = "bundle.json"
CHECKSUM_FILE = "SHA256SUMS"
#: the outputs packed side by side in every bundle library's output, in order, with their widths (C: classes)
HEAD_OUTPUTS = (("probs", "C"), ("logit_mean", "C"), ("logit_var", "C"), ("mi", 1), ("sme", 1))


def packed_columns(classes: int) -> dict[str, slice | int]:
    """Output name -> its column slice (C wide) or column index (one) in the packed output."""
    columns: dict[str, slice | int] = {}
    start = 0
    for name, width in HEAD_OUTPUTS:
        if width == "C":
            columns[name] = slice(start, start + classes)
            start += classes
        else:
            columns[name] = start
            start += 1
    return columns
_REQUIRED_KEYS = ("format", "model", "classes", "target", "libraries", "input", "calibration", "head", "ood")


class BundleError(RuntimeError):
    """A bundle that cannot be used here: missing or corrupt files, another model, architecture or CPU."""


def write_checksums(folder: str | Path) -> Path:
    """Write ``SHA256SUMS`` for every other file of ``folder`` (sorted names)."""
    folder = Path(folder)
    lines = [f"{file_sha256(path)}  {path.name}\n" for path in sorted(folder.iterdir())
             if path.is_file() and path.name != CHECKSUM_FILE]
    target = folder / CHECKSUM_FILE
    tmp = folder / f".{CHECKSUM_FILE}.tmp"
    tmp.write_text("".join(lines))
    tmp.replace(target)
    return target


@dataclass(frozen=True)
class Bundle:
    """A checked bundle: its folder and metadata."""

    folder: Path
    metadata: dict[str, Any]

    @property
    def model(self) -> str:
        return self.metadata["model"]

    @property
    def classes(self) -> int:
        return int(self.metadata["classes"])

    @property
    def libraries(self) -> dict[int, Path]:
        """Compiled batch size -> library path."""
        return {int(size): self.folder / name for size, name in self.metadata["libraries"].items()}

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(int(d) for d in self.metadata["input"]["shape"])

    @property
    def ood_threshold(self) -> float:
        return float(self.metadata["ood"]["threshold"])

    @property
    def ood_score(self) -> str:
        return str(self.metadata["ood"]["score"])


def _unpack(archive: Path) -> Path:
    folder = Path(tempfile.mkdtemp(prefix="pfp-bundle-"))
    atexit.register(shutil.rmtree, folder, True)
    try:
        with tarfile.open(archive) as tar:
            tar.extractall(folder, filter="data")
    except (tarfile.TarError, OSError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise BundleError(f"{archive}: not a readable bundle archive ({first_line})") from None
    found = sorted(folder.rglob(METADATA_FILE))
    if not found:
        raise BundleError(f"{archive}: the archive holds no {METADATA_FILE}")
    return found[0].parent


def _number(meta_path: Path, metadata: dict, section: str, key: str, *, positive: bool = False) -> None:
    value = metadata.get(section, {}).get(key) if isinstance(metadata.get(section), dict) else None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or (positive and not value > 0):
        raise BundleError(f"{meta_path}: {section}.{key} must be a {'positive ' if positive else ''}number, got {value!r}")


def _check_fields(meta_path: Path, metadata: dict) -> None:
    """The fields the predictor reads, with their types: a clear error here, not a KeyError later."""
    libraries = metadata["libraries"]
    if not isinstance(libraries, dict) or not libraries:
        raise BundleError(f"{meta_path}: libraries must map batch sizes to library files, got {libraries!r}")
    for size, name in libraries.items():
        if not str(size).isdigit() or int(size) < 1 or not isinstance(name, str) or "/" in name:
            raise BundleError(f"{meta_path}: libraries: {size!r}: {name!r} is not 'batch size': 'file name'")
    if not isinstance(metadata["model"], str) or not metadata["model"]:
        raise BundleError(f"{meta_path}: model must be the model's name, got {metadata['model']!r}")
    spec = metadata.get("spec")
    if spec is not None and not (isinstance(spec, dict) and spec.get("name") == metadata["model"]
                                 and isinstance(spec.get("layers"), list)):
        raise BundleError(f"{meta_path}: spec must describe the {metadata['model']!r} model (an object with its name "
                          "and layers)")
    if type(metadata["classes"]) is not int or metadata["classes"] < 2:
        raise BundleError(f"{meta_path}: classes must be an integer >= 2, got {metadata['classes']!r}")
    shape = metadata["input"].get("shape") if isinstance(metadata["input"], dict) else None
    if not isinstance(shape, list) or not shape or not all(isinstance(d, int) and d > 0 for d in shape):
        raise BundleError(f"{meta_path}: input.shape must be a list of positive integers, got {shape!r}")
    _number(meta_path, metadata, "input", "mean")
    _number(meta_path, metadata, "input", "std", positive=True)
    _number(meta_path, metadata, "calibration", "temperature", positive=True)
    threshold = metadata["ood"].get("threshold") if isinstance(metadata["ood"], dict) else None
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or threshold != threshold:
        raise BundleError(f"{meta_path}: ood.threshold must be a number, got {threshold!r}")  # inf: never flags OOD
    if metadata["ood"].get("score") not in ("mi", "sme"):
        raise BundleError(f"{meta_path}: ood.score must be 'mi' or 'sme', got {metadata['ood'].get('score')!r}")
    target = metadata["target"]
    if not isinstance(target, dict) or not isinstance(target.get("arch"), str):
        raise BundleError(f"{meta_path}: target must record the architecture (target.arch)")
    features = target.get("cpu_features", [])
    if not isinstance(features, list) or not all(isinstance(name, str) for name in features):
        raise BundleError(f"{meta_path}: target.cpu_features must be a list of CPU feature names, got {features!r}")


def _check_checksums(folder: Path, metadata: dict) -> None:
    sums = folder / CHECKSUM_FILE
    if not sums.is_file():
        raise BundleError(f"{sums}: checksum file missing; the bundle is incomplete")
    listed: dict[str, str] = {}
    for number, line in enumerate(sums.read_text().splitlines(), 1):
        digest, sep, name = line.partition("  ")
        if not sep or len(digest) != 64:
            raise BundleError(f"{sums}: line {number} is not '<sha256>  <file>'")
        listed[name.strip()] = digest
    needed = {METADATA_FILE, *metadata["libraries"].values()}
    unlisted = sorted(needed - set(listed))
    if unlisted:
        raise BundleError(f"{sums}: no checksum for {', '.join(unlisted)}")
    for name, digest in sorted(listed.items()):
        path = folder / name
        if not path.is_file():
            raise BundleError(f"{path}: listed in {CHECKSUM_FILE} but missing")
        actual = file_sha256(path)
        if actual != digest:
            raise BundleError(f"{path}: checksum mismatch (sha256 {actual[:12]}..., {CHECKSUM_FILE} says {digest[:12]}...): "
                              "the file is corrupt, truncated or was changed after the bundle was made")


def _check_libraries(folder: Path, metadata: dict) -> None:
    """Each library a whole ELF shared library for the bundle's architecture (before any is mapped: a
    truncated one would end the process with SIGBUS, whatever SHA256SUMS says)."""
    arch = metadata["target"]["arch"]
    for name in sorted(set(metadata["libraries"].values())):
        try:
            built_for = elf_arch(folder / name)
        except LibraryError as error:
            raise BundleError(str(error)) from None
        if built_for != arch:
            raise BundleError(f"{folder / name}: a library for {built_for}, but {METADATA_FILE} says target.arch {arch}")


def read_bundle(path: str | Path, *, expected_model: str | None = None, check_host: bool = True) -> Bundle:
    """Read and check a bundle folder (or archive).

    Refused with :class:`BundleError`, naming the file and the problem: a missing or invalid
    ``bundle.json``, an unknown format, a checksum mismatch or missing file, another model than
    ``expected_model``, and (``check_host``) another architecture or CPU features this host lacks.
    """
    path = Path(path)
    if path.is_file() and (path.suffix in (".tar", ".gz", ".tgz")):
        path = _unpack(path)
    if not path.is_dir():
        raise BundleError(f"{path}: bundle folder not found")
    meta_path = path / METADATA_FILE
    if not meta_path.is_file():
        raise BundleError(f"{meta_path}: not found; {path} is not a bundle")
    try:
        metadata = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise BundleError(f"{meta_path}: not valid JSON ({error})") from None
    if not isinstance(metadata, dict):
        raise BundleError(f"{meta_path}: expected a JSON object")
    missing = [key for key in _REQUIRED_KEYS if key not in metadata]
    if missing:
        raise BundleError(f"{meta_path}: missing field(s) {', '.join(missing)}")
    if metadata["format"] != BUNDLE_FORMAT:
        raise BundleError(f"{meta_path}: bundle format {metadata['format']!r}, this runtime reads format {BUNDLE_FORMAT}")
    _check_fields(meta_path, metadata)
    _check_checksums(path, metadata)
    _check_libraries(path, metadata)
    bundle = Bundle(path, metadata)
    if expected_model is not None and bundle.model != expected_model:
        raise BundleError(f"{path}: bundle of the {bundle.model!r} model, not the {expected_model!r} model asked for")
    if check_host:
        target = metadata["target"]
        arch = target.get("arch")
        if arch != host_arch():
            raise BundleError(f"{path}: bundle built for {arch} ({target.get('name')}), this host is {host_arch()}; "
                              f"use the bundle of this host's target")
        have = host_cpu_features()
        lacking = sorted(set(target.get("cpu_features") or []) - have) if have is not None else []
        if lacking:
            raise BundleError(f"{path}: compiled for CPU features this host lacks: {', '.join(lacking)} "
                              f"(target {target.get('name')}); build the bundle for this CPU")
    return bundle
