"""Artifacts know what they are: header (kind, model, parent hash, format), validated readers that
refuse another model's file, a stale one, or invalid values, with the file and both models named."""

from __future__ import annotations

import hashlib
import json
import math

import numpy as np
import pytest

from pfp.artifacts import (
    FORMAT_VERSIONS,
    HEADER_KEY,
    ArtifactError,
    ArtifactHeader,
    ArtifactKind,
    CalibrationError,
    load_calibration,
    load_pfp_params,
    load_posterior,
    save_calibration,
    save_pfp_params,
    save_posterior,
    sha256_of,
)
from pfp.bnn import PosteriorError
from pfp.calibrate import CalibrationResult
from pfp.convert import convert_posterior
from pfp.data.idx import DataError

from .common import random_posterior


def calibration_result(**overrides) -> CalibrationResult:
    values = {"variance_scale": 0.5, "temperature": 1.2, "nll_before": 0.9, "nll_after": 0.7, "ece_before": 0.1,
              "ece_after": 0.05, "grid": [{"variance_scale": 0.5, "temperature": 1.2, "nll": 0.7}]}
    return CalibrationResult(**{**values, **overrides})


def npz_header(path) -> dict:
    with np.load(path) as archive:
        return json.loads(str(archive[HEADER_KEY]))


def refusal(error_type, call, *fragments) -> str:
    with pytest.raises(error_type) as info:
        call()
    assert isinstance(info.value, ArtifactError) and isinstance(info.value, DataError)  # exit code 2 in the stages
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    return message


# --------------------------------------------------------------------------- the header


def test_header_round_trip_and_sha256(tmp_path):
    path = tmp_path / "blob"
    path.write_bytes(b"x" * 3_000_000)
    assert sha256_of(path) == hashlib.sha256(path.read_bytes()).hexdigest()
    header = ArtifactHeader(kind="tvm_library", model="lenet", parent_sha256=sha256_of(path), format=2)
    assert ArtifactHeader.from_json(header.to_json()) == header
    assert ArtifactHeader.from_dict({"kind": "posterior", "model": "mlp", "format": 1}).parent_sha256 is None


@pytest.mark.parametrize("value", [
    "[1, 2]",
    '{"kind": "posterior", "model": "mlp"}',
    '{"kind": "posterior", "model": "mlp", "format": 1, "colour": "red"}',
    '{"kind": "posterior", "model": "", "format": 1}',
    '{"kind": "posterior", "model": "mlp", "format": 0}',
    '{"kind": "posterior", "model": "mlp", "format": 1, "parent_sha256": "abc"}',
    "not json",
], ids=["list", "no-format", "unknown-key", "empty-model", "format-0", "short-sha", "not-json"])
def test_malformed_header_is_refused(value):
    with pytest.raises(ValueError):
        ArtifactHeader.from_json(value)


# --------------------------------------------------------------------------- posterior


def test_posterior_records_kind_model_format_and_parent(tmp_path):
    manifest = tmp_path / "manifest.json"
    manifest.write_text('{"data_hash": "x"}')
    posterior = random_posterior("lenet")
    header = save_posterior(posterior, tmp_path / "posterior.npz", parent=manifest)
    assert npz_header(tmp_path / "posterior.npz") == header.to_dict() == {
        "kind": "posterior", "model": "lenet", "format": FORMAT_VERSIONS[ArtifactKind.POSTERIOR],
        "parent_sha256": sha256_of(manifest)}
    loaded = load_posterior(tmp_path / "posterior.npz", "lenet", parent=manifest)
    assert loaded.spec == posterior.spec
    assert all(np.array_equal(loaded.scale[site], posterior.scale[site]) for site in posterior.scale)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json", "posterior.npz"]  # atomic: no temp file


def test_lenet_posterior_in_the_mlp_slot_is_refused(tmp_path):
    """Reported: LeNet's posterior copied into the MLP's slot was converted without a word."""
    path = tmp_path / "models" / "mlp" / "posterior.npz"
    save_posterior(random_posterior("lenet"), path)
    refusal(PosteriorError, lambda: load_posterior(path, "mlp"),
            str(path), "posterior file of model 'lenet', expected 'mlp'", "belongs to another model", "train@mlp")


def test_posterior_without_header_is_refused(tmp_path):
    path = tmp_path / "posterior.npz"
    posterior = random_posterior("mlp")
    arrays = {"spec": np.array(posterior.spec.to_json())}
    for site in posterior.loc:
        arrays[f"{site}.loc"], arrays[f"{site}.scale"] = posterior.loc[site].numpy(), posterior.scale[site].numpy()
    np.savez(path, **arrays)  # the format before artifact headers
    refusal(PosteriorError, lambda: load_posterior(path, "mlp"), str(path), "expected model 'mlp'", "no artifact header",
            "re-run the train@mlp stage")


def test_other_kind_newer_format_and_inconsistent_spec_are_refused(tmp_path):
    posterior = random_posterior("mlp")
    pfp_path = tmp_path / "pfp.npz"
    save_pfp_params(convert_posterior(posterior), pfp_path, parent=None)
    refusal(PosteriorError, lambda: load_posterior(pfp_path, "mlp"), str(pfp_path), "holds a 'pfp_params' artifact, not a 'posterior'")

    path = tmp_path / "posterior.npz"
    save_posterior(posterior, path)
    with np.load(path) as archive:
        arrays = {key: archive[key] for key in archive.files}
    arrays[HEADER_KEY] = np.array(ArtifactHeader("posterior", "mlp", None, format=99).to_json())
    np.savez(path, **arrays)
    refusal(PosteriorError, lambda: load_posterior(path, "mlp"), "format 99 is newer than this code reads")

    arrays[HEADER_KEY] = np.array(ArtifactHeader("posterior", "lenet", None).to_json())  # header says lenet, spec mlp
    np.savez(path, **arrays)
    refusal(PosteriorError, lambda: load_posterior(path, None), str(path), "its spec describes model 'mlp'")


def test_posterior_values_are_still_checked_with_the_models_named(tmp_path):
    path = tmp_path / "models" / "mlp" / "posterior.npz"
    save_posterior(random_posterior("mlp"), path)
    with np.load(path) as archive:
        arrays = {key: archive[key] for key in archive.files}
    arrays["fc2_bias.scale"][1] = -1.0
    np.savez(path, **arrays)
    refusal(PosteriorError, lambda: load_posterior(path, "mlp"), str(path), "of model 'mlp', expected 'mlp'",
            "fc2_bias.scale has 1 non-positive value(s)")


# --------------------------------------------------------------------------- PFP parameters


def test_pfp_params_record_the_posterior_they_came_from(tmp_path):
    source = tmp_path / "posterior.npz"
    posterior = random_posterior("mlp")
    save_posterior(posterior, source)
    path = tmp_path / "pfp.npz"
    save_pfp_params(convert_posterior(posterior), path, parent=source)
    assert npz_header(path) == {"kind": "pfp_params", "model": "mlp", "format": 1, "parent_sha256": sha256_of(source)}
    assert load_pfp_params(path, "mlp", parent=source).spec == convert_posterior(posterior).spec


def test_lenet_pfp_params_are_refused_for_the_mlp(tmp_path):
    path = tmp_path / "models" / "mlp" / "pfp.npz"
    save_pfp_params(convert_posterior(random_posterior("lenet")), path, parent=None)
    refusal(PosteriorError, lambda: load_pfp_params(path, "mlp"),
            str(path), "PFP parameter file of model 'lenet', expected 'mlp'", "belongs to another model")


def test_pfp_params_from_another_posterior_are_stale(tmp_path):
    old, new = tmp_path / "old.npz", tmp_path / "posterior.npz"
    save_posterior(random_posterior("mlp", seed=1), old)
    save_posterior(random_posterior("mlp", seed=2), new)
    path = tmp_path / "pfp.npz"
    save_pfp_params(convert_posterior(random_posterior("mlp", seed=1)), path, parent=old)
    refusal(PosteriorError, lambda: load_pfp_params(path, "mlp", parent=new),
            str(path), "stale", "made from another posterior.npz", "re-run the convert@mlp stage")
    # no parent recorded: cannot be checked, so refused when a check is asked for
    save_pfp_params(convert_posterior(random_posterior("mlp", seed=2)), path, parent=None)
    refusal(PosteriorError, lambda: load_pfp_params(path, "mlp", parent=new), "records no parent")


# --------------------------------------------------------------------------- calibration


def test_calibration_round_trip_with_header_on_top(tmp_path):
    pfp_path = tmp_path / "pfp.npz"
    save_pfp_params(convert_posterior(random_posterior("mlp")), pfp_path, parent=None)
    path = tmp_path / "calibration.json"
    result = calibration_result()
    save_calibration(result, path, model="mlp", parent=pfp_path)
    payload = json.loads(path.read_text())
    assert list(payload)[0] == HEADER_KEY
    assert payload[HEADER_KEY] == {"kind": "calibration", "model": "mlp", "format": 1, "parent_sha256": sha256_of(pfp_path)}
    assert load_calibration(path, "mlp", parent=pfp_path) == result


@pytest.mark.parametrize("field", ["temperature", "variance_scale"])
@pytest.mark.parametrize("value", [-0.5, 0.0, math.nan, math.inf], ids=["negative", "zero", "nan", "inf"])
def test_calibration_with_a_bad_temperature_or_scale_is_refused(tmp_path, field, value):
    """Reported: a calibration file with a negative (or zero, NaN) temperature or variance scale ran to the end."""
    path = tmp_path / "models" / "mlp" / "calibration.json"
    save_calibration(calibration_result(), path, model="mlp", parent=None)
    payload = json.loads(path.read_text())
    payload[field] = value
    path.write_text(json.dumps(payload))  # a hand-edited file (json writes NaN / Infinity)
    refusal(CalibrationError, lambda: load_calibration(path, "mlp"), str(path),
            "calibration file of model 'mlp', expected 'mlp'", f"{field} is {value}", "finite number > 0")
    with pytest.raises(CalibrationError, match=field):  # nor can such a result be written
        save_calibration(calibration_result(**{field: value}), tmp_path / "other.json", model="mlp", parent=None)
    assert not (tmp_path / "other.json").exists()


@pytest.mark.parametrize(("edit", "problem"), [
    (lambda p: p.pop("temperature"), "missing field(s) temperature"),
    (lambda p: p.update(colour="red"), "unknown field(s) colour"),
    (lambda p: p.update(temperature="warm"), "temperature is 'warm', not a number"),
    (lambda p: p.update(ece_after=1.5), "ece_after is 1.5; it must be in [0, 1]"),
    (lambda p: p.update(nll_after=math.nan), "nll_after is nan"),
    (lambda p: p.pop(HEADER_KEY), "no artifact header"),
], ids=["missing", "unknown", "not-a-number", "ece", "nll", "no-header"])
def test_calibration_fields_are_checked(tmp_path, edit, problem):
    path = tmp_path / "calibration.json"
    save_calibration(calibration_result(), path, model="lenet", parent=None)
    payload = json.loads(path.read_text())
    edit(payload)
    path.write_text(json.dumps(payload))
    refusal(CalibrationError, lambda: load_calibration(path, "lenet"), str(path), problem)


def test_unreadable_or_missing_calibration(tmp_path):
    path = tmp_path / "calibration.json"
    refusal(CalibrationError, lambda: load_calibration(path, "mlp"), "calibration file not found", "calibrate@mlp")
    path.write_text("{not json")
    refusal(CalibrationError, lambda: load_calibration(path, "mlp"), str(path), "not a readable calibration file")


def test_lenet_calibration_is_refused_for_the_mlp(tmp_path):
    path = tmp_path / "models" / "mlp" / "calibration.json"
    save_calibration(calibration_result(), path, model="lenet", parent=None)
    refusal(CalibrationError, lambda: load_calibration(path, "mlp"), str(path),
            "calibration file of model 'lenet', expected 'mlp'", "belongs to another model")


def test_calibration_made_from_another_pfp_file_is_stale(tmp_path):
    fitted_on, current = tmp_path / "old_pfp.npz", tmp_path / "pfp.npz"
    save_pfp_params(convert_posterior(random_posterior("mlp", seed=1)), fitted_on, parent=None)
    save_pfp_params(convert_posterior(random_posterior("mlp", seed=2)), current, parent=None)
    path = tmp_path / "calibration.json"
    save_calibration(calibration_result(), path, model="mlp", parent=fitted_on)
    refusal(CalibrationError, lambda: load_calibration(path, "mlp", parent=current), str(path), "stale",
            "made from another pfp.npz", "re-run the calibrate@mlp stage")
    assert load_calibration(path, "mlp", parent=fitted_on) == calibration_result()
