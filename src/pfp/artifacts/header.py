"""What every artifact records about itself, and the checks a reader makes with it.

Imports neither torch nor any artifact kind: the compiled libraries' metadata can use it too.

Example::

    >>> header = ArtifactHeader(kind="pfp_params", model="mlp", parent_sha256=sha256_of("posterior.npz"))
    >>> check_header(header, "pfp.npz", kind="pfp_params", model="mlp", title="PFP parameter file",
    ...              stage="convert", max_format=1)
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, fields
from enum import Enum
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np

from pfp.data.idx import DataError

PathLike = Union[str, Path]

#: the npz entry / JSON key holding the header
HEADER_KEY = "artifact"


class ArtifactKind(str, Enum):
    """What an artifact is; the value is recorded in its header."""

    POSTERIOR = "posterior"  # constrained mean-field posterior: loc and scale per sample site
    PFP_PARAMS = "pfp_params"  # Gaussian parameters per layer (mean, variance, E[w^2]) and the converted spec
    CALIBRATION = "calibration"  # fitted variance scale and softmax temperature

    @property
    def title(self) -> str:
        """What a message calls a file of this kind (``posterior file``, ``PFP parameter file``)."""
        return _TITLES[self]

    @property
    def stage(self) -> str:
        """The DVC stage that writes this kind (``stage@MODEL``)."""
        return _STAGES[self]

    @property
    def format(self) -> int:
        """The format version its writer records; readers accept 1 up to this."""
        return _FORMATS[self]


_TITLES = {ArtifactKind.POSTERIOR: "posterior file", ArtifactKind.PFP_PARAMS: "PFP parameter file",
           ArtifactKind.CALIBRATION: "calibration file"}
_STAGES = {ArtifactKind.POSTERIOR: "train", ArtifactKind.PFP_PARAMS: "convert", ArtifactKind.CALIBRATION: "calibrate"}
_FORMATS = {ArtifactKind.POSTERIOR: 1, ArtifactKind.PFP_PARAMS: 1, ArtifactKind.CALIBRATION: 1}


class ArtifactError(DataError):
    """An artifact is missing, unreadable, of another kind or model, stale, or holds invalid values.

    A ``DataError``: the stages print its one-line message and exit with code 2.
    """


@dataclass(frozen=True)
class ArtifactHeader:
    """What an artifact is, whose it is, what it was made from, and in which format.

    Parameters
    ----------
    kind
        What the artifact is (an :class:`ArtifactKind` value, or another artifact's own kind).
    model
        The model it belongs to: the spec name (``mlp``, ``lenet``).
    parent_sha256
        Hex sha256 of the file it was made from (None: made from nothing on disk).
    format
        Format version of the kind.
    """

    kind: str
    model: str
    parent_sha256: Optional[str] = None
    format: int = 1

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, value: Any) -> "ArtifactHeader":
        """Parse a header; raises ``ValueError`` naming what is wrong."""
        if not isinstance(value, dict):
            raise ValueError(f"artifact header is not a mapping: {value!r}")
        names = {f.name for f in fields(cls)}
        missing, unknown = sorted(names - {"parent_sha256"} - set(value)), sorted(set(value) - names)
        if missing or unknown:
            raise ValueError(f"artifact header: missing {missing}, unknown {unknown}")
        header = cls(**value)
        if not isinstance(header.kind, str) or not isinstance(header.model, str) or not header.model:
            raise ValueError(f"artifact header: kind and model must be non-empty strings: {value!r}")
        if not isinstance(header.format, int) or isinstance(header.format, bool) or header.format < 1:
            raise ValueError(f"artifact header: format must be a positive integer, got {header.format!r}")
        sha = header.parent_sha256
        if sha is not None and (not isinstance(sha, str) or len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha)):
            raise ValueError(f"artifact header: parent_sha256 is not a hex sha256: {sha!r}")
        return header

    @classmethod
    def from_json(cls, text: str) -> "ArtifactHeader":
        try:
            value = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"artifact header is not JSON ({error})") from None
        return cls.from_dict(value)

    @classmethod
    def for_kind(cls, kind: ArtifactKind, model: str, parent: Optional[PathLike]) -> "ArtifactHeader":
        """The header a writer of ``kind`` records: the current format and the parent's hash."""
        return cls(kind=kind.value, model=model, parent_sha256=None if parent is None else sha256_of(parent),
                   format=kind.format)


def sha256_of(path: PathLike) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def model_name(model: Any) -> str:
    """``"mlp"`` for ``"mlp"`` or ``Architecture.MLP``."""
    return str(getattr(model, "value", model))


def describe(path: PathLike, title: str, owner: Optional[str], expected: Optional[str]) -> str:
    """``path (posterior file of model 'lenet', expected 'mlp')``, with the parts that are known."""
    if owner is not None:
        return f"{path} ({title} of model {owner!r}" + (f", expected {expected!r})" if expected is not None else ")")
    return f"{path} ({title}, expected model {expected!r})" if expected is not None else str(path)


def check_header(header: ArtifactHeader, path: PathLike, *, kind: str, model: Optional[str], title: str,
                 stage: str, max_format: int, error: type[Exception] = ArtifactError) -> None:
    """Refuse a header of another kind or model, or of a format newer than this code reads.

    ``model`` None accepts any model (tools that only inspect a file).
    """
    where = describe(path, title, header.model, model)
    if header.kind != kind:
        raise error(f"{where}: the file holds a {header.kind!r} artifact, not a {kind!r} one")
    if header.format > max_format:
        raise error(f"{where}: format {header.format} is newer than this code reads ({max_format}); update the code")
    if model is not None and header.model != model:
        raise error(f"{where}: it belongs to another model (copied into the wrong slot?); "
                    f"re-run the {stage}@{model} stage, or give the {model} file")


def check_parent(header: ArtifactHeader, path: PathLike, parent: PathLike, *, title: str, stage: str,
                 model: Optional[str] = None, error: type[Exception] = ArtifactError) -> None:
    """Refuse an artifact that was not made from the file ``parent`` (stale: its parent changed since)."""
    where = describe(path, title, header.model, model)
    if header.parent_sha256 is None:
        raise error(f"{where}: records no parent, so it cannot be checked against {parent}; "
                    f"re-run the {stage}@{header.model} stage")
    parent = Path(parent)
    if not parent.is_file():
        raise error(f"{where}: its parent {parent} is not found")
    actual = sha256_of(parent)
    if actual != header.parent_sha256:
        raise error(f"{where}: stale: made from another {parent.name} (sha256 {header.parent_sha256[:12]}..., "
                    f"{parent} is {actual[:12]}...); re-run the {stage}@{header.model} stage")


def accept(kind: ArtifactKind, path: PathLike, header: Optional[ArtifactHeader], model: Optional[str],
           parent: Optional[PathLike], error: type[Exception] = ArtifactError) -> ArtifactHeader:
    """All the header checks of a reader of ``kind``: present, same kind and model, readable format,
    and (given ``parent``) made from that file."""
    if header is None:
        raise error(f"{describe(path, kind.title, None, model)}: no artifact header (written by an older version "
                    f"of the pipeline, or not by it); re-run the {kind.stage}@{model or 'MODEL'} stage")
    check_header(header, path, kind=kind.value, model=model, title=kind.title, stage=kind.stage,
                 max_format=kind.format, error=error)
    if parent is not None:
        check_parent(header, path, parent, title=kind.title, stage=kind.stage, model=model, error=error)
    return header


def header_entry(header: ArtifactHeader) -> np.ndarray:
    """The header as an npz entry (a 0-d unicode array: no pickling needed to read it)."""
    return np.array(header.to_json())


def read_npz_header(archive: Any) -> Optional[ArtifactHeader]:
    """The header of an open npz archive, or None when it has none (raises ``ValueError`` if malformed)."""
    if HEADER_KEY not in archive.files:
        return None
    return ArtifactHeader.from_json(str(archive[HEADER_KEY]))
