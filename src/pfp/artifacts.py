"""The pipeline's artifacts, each written and read through one validated writer / reader.

- posterior: ``models/M/posterior.npz``, made from ``data/prepared/manifest.json``, written by ``train@M``;
- PFP parameters: ``models/M/pfp.npz``, made from ``models/M/posterior.npz``, written by ``convert@M``;
- calibration: ``models/M/calibration.json``, made from ``models/M/pfp.npz``, written by ``calibrate@M``.

Every artifact carries an :class:`ArtifactHeader`: its kind, the model it belongs to (the spec
name, ``mlp`` or ``lenet``), the format version and the sha256 of the file it was made from.
In an ``.npz`` archive the header is the JSON string entry ``artifact``; in a JSON file it is the
top-level key ``artifact``. Files are written atomically (:mod:`pfp.io`).

A reader is given the model the caller expects and refuses, with a message naming the file, the
model it belongs to, the one expected and the problem (``PosteriorError`` for the posterior and
the PFP parameters, as before; :class:`CalibrationError` for a calibration; both are
:class:`ArtifactError`, a ``DataError``: the stages turn it into a one-line message and exit
code 2). Given the parent file, it also checks the recorded parent hash: an artifact made from
another parent is stale.

The header helpers (:class:`ArtifactHeader`, :func:`sha256_of`, :func:`check_header`,
:func:`check_parent`, :func:`header_entry`, :func:`read_npz_header`) carry no knowledge of
the three kinds here, for other artifacts (the compiled libraries' metadata) to reuse.

Example::

    >>> save_posterior(posterior, "models/mlp/posterior.npz")
    >>> save_pfp_params(convert_posterior(posterior), "models/mlp/pfp.npz", parent="models/mlp/posterior.npz")
    >>> load_pfp_params("models/mlp/pfp.npz", "mlp", parent="models/mlp/posterior.npz")
"""

from __future__ import annotations

import hashlib
import json
import math
import zipfile
from dataclasses import asdict, dataclass, fields
from enum import Enum
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch

from pfp.backends.torch_ref import GaussianLayerParams
from pfp.bnn import Posterior, PosteriorError, site_names
from pfp.calibrate import CalibrationResult
from pfp.convert import PFPModel
from pfp.data.idx import DataError
from pfp.io import atomic_savez, atomic_write_json
from pfp.spec import ModelSpec

PathLike = Union[str, Path]

#: the npz entry / JSON key holding the header
HEADER_KEY = "artifact"
#: the npz entry holding the model description (ModelSpec JSON)
SPEC_KEY = "spec"


class ArtifactKind(str, Enum):
    """What an artifact is; the value is recorded in its header."""

    POSTERIOR = "posterior"  # constrained mean-field posterior: loc and scale per sample site
    PFP_PARAMS = "pfp_params"  # Gaussian parameters per layer (mean, variance, E[w^2]) and the converted spec
    CALIBRATION = "calibration"  # fitted variance scale and softmax temperature

    @property
    def title(self) -> str:
        """What a message calls a file of this kind: ``posterior``, ``PFP parameter``, ``calibration``."""
        return _TITLES[self]

    @property
    def stage(self) -> str:
        """The DVC stage that writes this kind (``stage@MODEL``)."""
        return _STAGES[self]


_TITLES = {ArtifactKind.POSTERIOR: "posterior", ArtifactKind.PFP_PARAMS: "PFP parameter",
           ArtifactKind.CALIBRATION: "calibration"}
_STAGES = {ArtifactKind.POSTERIOR: "train", ArtifactKind.PFP_PARAMS: "convert", ArtifactKind.CALIBRATION: "calibrate"}

#: the format version each writer records; a reader accepts versions 1 up to this
FORMAT_VERSIONS = {ArtifactKind.POSTERIOR: 1, ArtifactKind.PFP_PARAMS: 1, ArtifactKind.CALIBRATION: 1}


class ArtifactError(DataError):
    """An artifact is missing, unreadable, of another kind or model, stale, or holds invalid values."""


class ParameterFileError(ArtifactError, PosteriorError):
    """A posterior or PFP parameter file is refused (a ``PosteriorError``, as these always were)."""


class CalibrationError(ArtifactError):
    """A calibration file is refused."""


_ERRORS: dict[ArtifactKind, type[ArtifactError]] = {
    ArtifactKind.POSTERIOR: ParameterFileError, ArtifactKind.PFP_PARAMS: ParameterFileError,
    ArtifactKind.CALIBRATION: CalibrationError}


# --------------------------------------------------------------------------- the generic header


@dataclass(frozen=True)
class ArtifactHeader:
    """What an artifact is, whose it is, in which format, and what it was made from.

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


def _describe(path: PathLike, title: str, owner: Optional[str], expected: Optional[str]) -> str:
    """``path (posterior of model 'lenet', expected 'mlp')``, with the parts that are known."""
    if owner is not None:
        return f"{path} ({title} of model {owner!r}" + (f", expected {expected!r})" if expected is not None else ")")
    return f"{path} ({title}, expected model {expected!r})" if expected is not None else str(path)


def _where(kind: ArtifactKind, path: PathLike, owner: Optional[str], expected: Optional[str]) -> str:
    return _describe(path, f"{kind.title} file", owner, expected)


def check_header(header: ArtifactHeader, path: PathLike, *, kind: str, model: Optional[str], title: str,
                 stage: str, max_format: int, error: type[Exception] = ArtifactError) -> None:
    """Refuse a header of another kind or model, or of a format newer than this code reads.

    ``model`` None accepts any model (tools that only inspect a file).
    """
    where = _describe(path, f"{title} file", header.model, model)
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
    where = _describe(path, f"{title} file", header.model, model)
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


def header_entry(header: ArtifactHeader) -> np.ndarray:
    """The header as an npz entry (a 0-d unicode array: no pickling needed to read it)."""
    return np.array(header.to_json())


def read_npz_header(archive: Any) -> Optional[ArtifactHeader]:
    """The header of an open npz archive, or None when it has none (raises ``ValueError`` if malformed)."""
    if HEADER_KEY not in archive.files:
        return None
    return ArtifactHeader.from_json(str(archive[HEADER_KEY]))


# --------------------------------------------------------------------------- shared reading


def _header_for(kind: ArtifactKind, model: str, parent: Optional[PathLike]) -> ArtifactHeader:
    return ArtifactHeader(kind=kind.value, model=model, parent_sha256=None if parent is None else sha256_of(parent),
                          format=FORMAT_VERSIONS[kind])


def _accept(kind: ArtifactKind, path: Path, header: Optional[ArtifactHeader], model: Optional[str],
            parent: Optional[PathLike]) -> ArtifactHeader:
    error = _ERRORS[kind]
    if header is None:
        owner = model or "MODEL"
        raise error(f"{_where(kind, path, None, model)}: no artifact header (written by an older version "
                    f"of the pipeline, or not by it); re-run the {kind.stage}@{owner} stage")
    check_header(header, path, kind=kind.value, model=model, title=kind.title, stage=kind.stage,
                 max_format=FORMAT_VERSIONS[kind], error=error)
    if parent is not None:
        check_parent(header, path, parent, title=kind.title, stage=kind.stage, model=model, error=error)
    return header


def _read_npz(kind: ArtifactKind, path: PathLike, model: Optional[str],
              parent: Optional[PathLike]) -> tuple[ArtifactHeader, ModelSpec, dict[str, np.ndarray], str]:
    """Header, spec and arrays of an npz artifact, header checked; returns also the message prefix."""
    path, error = Path(path), _ERRORS[kind]
    if not path.is_file():
        raise error(f"{_where(kind, path, None, model)}: {kind.title} file not found"
                    f"; run the {kind.stage}@{model or 'MODEL'} stage first")
    try:
        with np.load(path, allow_pickle=False) as archive:
            header = read_npz_header(archive)
            spec = ModelSpec.from_json(str(archive[SPEC_KEY]))
            arrays = {key: archive[key] for key in archive.files if key not in (SPEC_KEY, HEADER_KEY)}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as problem:
        raise error(f"{_where(kind, path, None, model)}: not a readable {kind.title} file ({problem})") from None
    header = _accept(kind, path, header, model, parent)
    where = _where(kind, path, header.model, model)
    if spec.name != header.model:
        raise error(f"{where}: its spec describes model {spec.name!r}; the file is inconsistent, re-run the "
                    f"{kind.stage}@{header.model} stage")
    return header, spec, arrays, where


def _checked_array(arrays: dict[str, np.ndarray], key: str, shape: tuple, where: str, error: type[Exception]) -> np.ndarray:
    if key not in arrays:
        raise error(f"{where}: missing array {key!r}")
    if tuple(arrays[key].shape) != tuple(shape):
        raise error(f"{where}: {key} has shape {arrays[key].shape}, spec says {shape}")
    if not np.all(np.isfinite(arrays[key])):
        raise error(f"{where}: {key} contains NaN or infinite values")
    return arrays[key]


# --------------------------------------------------------------------------- posterior


def save_posterior(posterior: Posterior, path: PathLike, *, parent: Optional[PathLike] = None) -> ArtifactHeader:
    """Write ``models/M/posterior.npz`` (float32 loc and scale per site, the spec, the header).

    Parameters
    ----------
    posterior
        The trained posterior; its spec name is the model the file belongs to.
    path
        Where to write (atomically).
    parent
        The file it was made from (the prepared data's manifest), or None.

    Returns
    -------
    ArtifactHeader
        The header written.
    """
    header = _header_for(ArtifactKind.POSTERIOR, posterior.spec.name, parent)
    arrays = {HEADER_KEY: header_entry(header), SPEC_KEY: np.array(posterior.spec.to_json())}
    for name in posterior.loc:
        arrays[f"{name}.loc"] = posterior.loc[name].detach().cpu().numpy().astype(np.float32)
        arrays[f"{name}.scale"] = posterior.scale[name].detach().cpu().numpy().astype(np.float32)
    atomic_savez(path, arrays)
    return header


def load_posterior(path: PathLike, model: Optional[str], *, parent: Optional[PathLike] = None) -> Posterior:
    """Read and validate a posterior of ``model`` (None: whichever model it belongs to).

    Refuses (``PosteriorError``) a missing or unreadable file, one without a header or of another
    kind or model, a missing array, a shape the spec does not give, NaN / infinite values and
    non-positive scales; with ``parent``, a posterior made from another file.
    """
    kind, error = ArtifactKind.POSTERIOR, _ERRORS[ArtifactKind.POSTERIOR]
    _, spec, arrays, where = _read_npz(kind, path, None if model is None else model_name(model), parent)
    loc, scale = {}, {}
    for layer in spec.parametric_layers():
        for site, shape in zip(site_names(layer.name), (layer.weight_shape, layer.bias_shape)):
            site_loc = _checked_array(arrays, f"{site}.loc", shape, where, error)
            site_scale = _checked_array(arrays, f"{site}.scale", shape, where, error)
            if np.any(site_scale <= 0):
                bad = int(np.sum(site_scale <= 0))
                raise error(f"{where}: {site}.scale has {bad} non-positive value(s); scales must be > 0")
            loc[site], scale[site] = torch.from_numpy(site_loc), torch.from_numpy(site_scale)
    return Posterior(spec=spec, loc=loc, scale=scale)


# --------------------------------------------------------------------------- PFP parameters

_PFP_FIELDS = ("weight_mean", "weight_var", "weight_m2", "bias_mean", "bias_var")
_VARIANCE_FIELDS = ("weight_var", "weight_m2", "bias_var")


def save_pfp_params(pfp_model: PFPModel, path: PathLike, *, parent: Optional[PathLike]) -> ArtifactHeader:
    """Write ``models/M/pfp.npz``: the converted spec, five float32 arrays per layer, the header.

    ``parent`` is the posterior file it was converted from (None only for a model made in memory).
    """
    header = _header_for(ArtifactKind.PFP_PARAMS, pfp_model.spec.name, parent)
    arrays = {HEADER_KEY: header_entry(header), SPEC_KEY: np.array(pfp_model.spec.to_json())}
    for name, layer in pfp_model.params.items():
        for field_name in _PFP_FIELDS:
            arrays[f"{name}.{field_name}"] = getattr(layer, field_name).numpy().astype(np.float32)
    atomic_savez(path, arrays)
    return header


def load_pfp_params(path: PathLike, model: Optional[str], *, parent: Optional[PathLike] = None) -> PFPModel:
    """Read and validate the PFP parameters of ``model`` (None: whichever model).

    Refuses (``PosteriorError``) what :func:`load_posterior` refuses, with negative variances
    or E[w^2] in place of non-positive scales; with ``parent`` (the posterior file), parameters
    converted from another posterior.
    """
    kind, error = ArtifactKind.PFP_PARAMS, _ERRORS[ArtifactKind.PFP_PARAMS]
    _, spec, arrays, where = _read_npz(kind, path, None if model is None else model_name(model), parent)
    params = {}
    for layer in spec.parametric_layers():
        values = {}
        for field_name in _PFP_FIELDS:
            key = f"{layer.name}.{field_name}"
            shape = layer.bias_shape if field_name.startswith("bias") else layer.weight_shape
            value = _checked_array(arrays, key, shape, where, error)
            if field_name in _VARIANCE_FIELDS and np.any(value < 0):
                raise error(f"{where}: {key} has negative values; variances must be >= 0")
            values[field_name] = torch.from_numpy(value)
        params[layer.name] = GaussianLayerParams(**values)
    return PFPModel(spec=spec, params=params)


# --------------------------------------------------------------------------- calibration

_CALIBRATION_FIELDS = {f.name for f in fields(CalibrationResult)}
_CALIBRATION_REQUIRED = _CALIBRATION_FIELDS - {"grid"}


def save_calibration(result: CalibrationResult, path: PathLike, *, model: str,
                     parent: Optional[PathLike]) -> ArtifactHeader:
    """Write ``models/M/calibration.json``: the header under ``artifact``, then the result's fields.

    ``parent`` is the PFP parameter file the calibration was fitted on.
    """
    _check_calibration_values(result.to_dict(), Path(path), model_name(model), model_name(model), CalibrationError)
    header = _header_for(ArtifactKind.CALIBRATION, model_name(model), parent)
    atomic_write_json(path, {HEADER_KEY: header.to_dict(), **result.to_dict()})
    return header


def load_calibration(path: PathLike, model: Optional[str], *, parent: Optional[PathLike] = None) -> CalibrationResult:
    """Read and validate the calibration of ``model`` (None: whichever model).

    Refuses (:class:`CalibrationError`) a missing or unreadable file, one without a header or of
    another kind or model, missing or unknown fields, and a variance scale or temperature that is
    not a finite number > 0 (or non-finite NLL, ECE outside [0, 1]); with ``parent`` (the PFP
    parameter file), a calibration fitted on other parameters.
    """
    kind, error = ArtifactKind.CALIBRATION, CalibrationError
    path = Path(path)
    expected = None if model is None else model_name(model)
    if not path.is_file():
        raise error(f"{_where(kind, path, None, expected)}: calibration file not found"
                    f"; run the {kind.stage}@{expected or 'MODEL'} stage first")
    try:
        payload = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as problem:
        raise error(f"{_where(kind, path, None, expected)}: not a readable calibration file ({problem})") from None
    if not isinstance(payload, dict):
        raise error(f"{_where(kind, path, None, expected)}: not a readable calibration file (not a JSON object)")
    header = None
    if HEADER_KEY in payload:
        try:
            header = ArtifactHeader.from_dict(payload.pop(HEADER_KEY))
        except (TypeError, ValueError) as problem:
            raise error(f"{_where(kind, path, None, expected)}: not a readable calibration file ({problem})") from None
    header = _accept(kind, path, header, expected, parent)
    _check_calibration_values(payload, path, header.model, expected, error)
    return CalibrationResult(**payload)


def _check_calibration_values(values: dict, path: Path, owner: str, expected: Optional[str],
                              error: type[Exception]) -> None:
    where = _describe(path, "calibration file", owner, expected)
    missing, unknown = sorted(_CALIBRATION_REQUIRED - set(values)), sorted(set(values) - _CALIBRATION_FIELDS)
    if missing:
        raise error(f"{where}: missing field(s) {', '.join(missing)}")
    if unknown:
        raise error(f"{where}: unknown field(s) {', '.join(unknown)}")

    def number(name: str) -> float:
        value = values[name]
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise error(f"{where}: {name} is {value!r}, not a number")
        return float(value)

    for name in ("variance_scale", "temperature"):
        value = number(name)
        if not (math.isfinite(value) and value > 0):
            raise error(f"{where}: {name} is {value}; it must be a finite number > 0 (re-run the calibrate@{owner} stage)")
    for name in ("nll_before", "nll_after"):
        if not math.isfinite(number(name)):
            raise error(f"{where}: {name} is {values[name]}; it must be finite")
    for name in ("ece_before", "ece_after"):
        value = number(name)
        if not (0.0 <= value <= 1.0):
            raise error(f"{where}: {name} is {value}; it must be in [0, 1]")
    grid = values.get("grid", [])
    if not isinstance(grid, list) or not all(isinstance(row, dict) for row in grid):
        raise error(f"{where}: grid must be a list of objects")
