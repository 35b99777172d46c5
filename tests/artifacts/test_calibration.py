"""The calibration artifact: header on top; temperature and variance scale finite and > 0, fields
checked; another model's or one fitted on another PFP file refused."""

from __future__ import annotations

import json
import math

import pytest

from pfp.artifacts.calibration import CalibrationError, load_calibration, save_calibration
from pfp.artifacts.header import HEADER_KEY, sha256_of
from pfp.artifacts.pfp_params import save_pfp_params
from pfp.calibrate import CalibrationResult
from pfp.convert import convert_posterior

from ..common import random_posterior, refusal


def calibration_result(**overrides) -> CalibrationResult:
    values = {"variance_scale": 0.5, "temperature": 1.2, "nll_before": 0.9, "nll_after": 0.7, "ece_before": 0.1,
              "ece_after": 0.05, "grid": [{"variance_scale": 0.5, "temperature": 1.2, "nll": 0.7}]}
    return CalibrationResult(**{**values, **overrides})


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


FITS = {"nll": {"variance_scale": 0.5, "temperature": 1.2, "nll": 0.7, "ece": 0.05, "var_ratio_median": 0.3},
        "mc_variance": {"variance_scale": 1.8, "temperature": 1.1, "nll": 0.75, "ece": 0.06, "var_ratio_median": 1.0,
                        "images": 300, "samples": 1000, "bracketed": True}}


def test_both_fits_round_trip_and_a_file_from_before_objectives_loads_as_nll(tmp_path):
    path = tmp_path / "calibration.json"
    chosen = calibration_result(variance_scale=1.8, temperature=1.1, objective="mc_variance", fits=FITS)
    save_calibration(chosen, path, model="mlp", parent=None)
    assert load_calibration(path, "mlp") == chosen
    # written before calibrate.objective existed: no objective, no fits -> an NLL calibration (the only objective then)
    payload = json.loads(path.read_text())
    for key in ("objective", "fits"):
        payload.pop(key)
    path.write_text(json.dumps(payload))
    old = load_calibration(path, "mlp")
    assert old.objective == "nll" and old.fits == {} and (old.variance_scale, old.temperature) == (1.8, 1.1)


@pytest.mark.parametrize(("edit", "problem"), [
    (lambda p: p.update(objective="labels"), "objective is 'labels'; expected one of nll, mc_variance"),
    (lambda p: p["fits"].pop("mc_variance"), "objective mc_variance has no fit in fits"),
    (lambda p: p.update(variance_scale=0.5), "variance_scale/temperature are not those of fits.mc_variance"),
    (lambda p: p["fits"]["nll"].update(variance_scale=-1), "fits.nll.variance_scale is -1"),
    (lambda p: p["fits"].update(bayes={"variance_scale": 1.0, "temperature": 1.0}), "fits has unknown objective(s) bayes"),
    (lambda p: p.update(fits=[1]), "fits must be an object of objects"),
], ids=["objective", "no-chosen-fit", "not-the-chosen-fit", "bad-fit-scale", "unknown-fit", "not-an-object"])
def test_objective_and_fits_are_checked(tmp_path, edit, problem):
    path = tmp_path / "calibration.json"
    save_calibration(calibration_result(variance_scale=1.8, temperature=1.1, objective="mc_variance", fits=FITS), path,
                     model="mlp", parent=None)
    payload = json.loads(path.read_text())
    edit(payload)
    path.write_text(json.dumps(payload))
    refusal(CalibrationError, lambda: load_calibration(path, "mlp"), str(path), problem)
