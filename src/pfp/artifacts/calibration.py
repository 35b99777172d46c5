"""The calibration artifact, ``models/M/calibration.json``: the header under the top-level key
``artifact``, then the fields of :class:`~pfp.calibrate.CalibrationResult`; its parent the PFP
parameter file it was fitted on."""

from __future__ import annotations

import json
import math
from dataclasses import fields
from pathlib import Path
from typing import Optional

from pfp.artifacts.header import HEADER_KEY, ArtifactError, ArtifactHeader, ArtifactKind, PathLike, accept, describe, model_name
from pfp.calibrate import CalibrationResult
from pfp.config import CalibrationObjective
from pfp.io import atomic_write_json


class CalibrationError(ArtifactError):
    """A calibration file is refused."""


_CALIBRATION_FIELDS = {f.name for f in fields(CalibrationResult)}
# objective and fits came later: a file without them is an NLL calibration (the only objective then)
_CALIBRATION_REQUIRED = _CALIBRATION_FIELDS - {"grid", "objective", "fits"}
_OBJECTIVES = [o.value for o in CalibrationObjective]


def save_calibration(result: CalibrationResult, path: PathLike, *, model: str,
                     parent: Optional[PathLike]) -> ArtifactHeader:
    """Write ``models/M/calibration.json``: the header under ``artifact``, then the result's fields.

    ``parent`` is the PFP parameter file the calibration was fitted on.
    """
    _check_calibration_values(result.to_dict(), Path(path), model_name(model), model_name(model))
    header = ArtifactHeader.for_kind(ArtifactKind.CALIBRATION, model_name(model), parent)
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
        raise error(f"{describe(path, kind.title, None, expected)}: calibration file not found"
                    f"; run the {kind.stage}@{expected or 'MODEL'} stage first")
    try:
        payload = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as problem:
        raise error(f"{describe(path, kind.title, None, expected)}: not a readable calibration file ({problem})") from None
    if not isinstance(payload, dict):
        raise error(f"{describe(path, kind.title, None, expected)}: not a readable calibration file (not a JSON object)")
    header = None
    if HEADER_KEY in payload:
        try:
            header = ArtifactHeader.from_dict(payload.pop(HEADER_KEY))
        except (TypeError, ValueError) as problem:
            raise error(f"{describe(path, kind.title, None, expected)}: not a readable calibration file ({problem})") from None
    header = accept(kind, path, header, expected, parent, error)
    _check_calibration_values(payload, path, header.model, expected)
    return CalibrationResult(**payload)


def _check_calibration_values(values: dict, path: Path, owner: str, expected: Optional[str]) -> None:
    error = CalibrationError
    where = describe(path, ArtifactKind.CALIBRATION.title, owner, expected)
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
    objective = values.get("objective", CalibrationObjective.NLL.value)
    if objective not in _OBJECTIVES:
        raise error(f"{where}: objective is {objective!r}; expected one of {', '.join(_OBJECTIVES)}")
    fits = values.get("fits", {})
    if not isinstance(fits, dict) or not all(isinstance(fit, dict) for fit in fits.values()):
        raise error(f"{where}: fits must be an object of objects (objective -> fit)")
    if unknown := sorted(set(fits) - set(_OBJECTIVES)):
        raise error(f"{where}: fits has unknown objective(s) {', '.join(unknown)}")
    for name, fit in fits.items():
        for key in ("variance_scale", "temperature"):
            value = fit.get(key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
                raise error(f"{where}: fits.{name}.{key} is {value!r}; it must be a finite number > 0")
    if fits:
        chosen = fits.get(objective)
        if chosen is None:
            raise error(f"{where}: objective {objective} has no fit in fits (re-run the calibrate@{owner} stage)")
        if (chosen["variance_scale"], chosen["temperature"]) != (number("variance_scale"), number("temperature")):
            raise error(f"{where}: variance_scale/temperature are not those of fits.{objective} "
                        f"(re-run the calibrate@{owner} stage)")
