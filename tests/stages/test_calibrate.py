"""Stage calibrate: fitted on the prepared validation splits, written with its parent; another
model's or a stale PFP parameter file is refused before any work."""

from __future__ import annotations

import json

import pytest

from pfp.artifacts.calibration import load_calibration
from pfp.artifacts.pfp_params import save_pfp_params
from pfp.artifacts.posterior import save_posterior
from pfp.bnn import PosteriorError
from pfp.config import CalibrateConfig
from pfp.convert import convert_posterior
from pfp.stages.calibrate import calibrate

from ..common import random_posterior, write_prepared

CONFIG = CalibrateConfig(variance_scales=[0.5], fit_temperature=False, logit_samples=4, fidelity_samples=20, fidelity_images=10)


def converted_slot(root, model="mlp", seed=0):
    """models/MODEL/{posterior,pfp}.npz as the train and convert stages leave them."""
    posterior = random_posterior(model, seed=seed)
    source = root / "models" / model / "posterior.npz"
    save_posterior(posterior, source)
    save_pfp_params(convert_posterior(posterior), root / "models" / model / "pfp.npz", parent=source)
    return source, root / "models" / model / "pfp.npz"


def test_calibrate_writes_the_calibration_and_its_summary(tmp_path):
    write_prepared(tmp_path)
    _, pfp_path = converted_slot(tmp_path)
    result = calibrate("mlp", CONFIG, seed=0, ece_bins=5, root=tmp_path)
    assert result.path == tmp_path / "models" / "mlp" / "calibration.json"
    assert load_calibration(result.path, "mlp", parent=pfp_path) == result.calibration
    assert [row["variance_scale"] for row in result.calibration.grid] == [0.5, 1.0]
    assert json.loads(result.summary_path.read_text()) == result.summary
    assert result.summary_path == tmp_path / "metrics" / "calibrate_mlp.json" and "grid" not in result.summary
    # both objectives' fits, the default (nll) chosen
    assert result.summary["objective"] == "nll" and set(result.summary["fits"]) == {"nll", "mc_variance"}
    assert result.calibration.variance_scale == result.calibration.fits["nll"]["variance_scale"]
    assert result.calibration.fits["mc_variance"]["images"] == 10


def test_calibrate_needs_the_posterior(tmp_path):
    write_prepared(tmp_path)
    source, _ = converted_slot(tmp_path)
    source.unlink()
    with pytest.raises(PosteriorError, match="posterior.npz"):
        calibrate("mlp", CONFIG, seed=0, ece_bins=5, root=tmp_path)


def test_mlp_calibration_on_lenets_pfp_file_is_refused(tmp_path):
    """Reported: an MLP calibration was fitted on LeNet's PFP file."""
    posterior = random_posterior("lenet")
    path = tmp_path / "models" / "mlp" / "pfp.npz"
    save_pfp_params(convert_posterior(posterior), path, parent=None)
    with pytest.raises(PosteriorError) as info:
        calibrate("mlp", CONFIG, seed=0, ece_bins=5, root=tmp_path)  # refused before the (absent) data is read
    for fragment in (str(path), "PFP parameter file of model 'lenet', expected 'mlp'", "belongs to another model"):
        assert fragment in str(info.value)
    assert not (tmp_path / "models" / "mlp" / "calibration.json").exists()


def test_pfp_file_converted_from_another_posterior_is_stale(tmp_path):
    source, path = converted_slot(tmp_path, seed=0)
    save_posterior(random_posterior("mlp", seed=5), source)  # retrained since the conversion
    with pytest.raises(PosteriorError) as info:
        calibrate("mlp", CONFIG, seed=0, ece_bins=5, root=tmp_path)
    for fragment in (str(path), "stale", "re-run the convert@mlp stage"):
        assert fragment in str(info.value)
