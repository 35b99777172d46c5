"""Stage ``calibrate@MODEL``: PFP variance scale and softmax temperature fitted on validation data."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pfp.artifacts.calibration import save_calibration
from pfp.artifacts.pfp_params import load_pfp_params
from pfp.artifacts.posterior import load_posterior
from pfp.calibrate import CalibrationResult, ValidationSet, fit_calibration
from pfp.config import CalibrateConfig
from pfp.data.dirty_mnist import load_prepared, normalise
from pfp.io import atomic_write_json
from pfp.stage import METRICS_DIR, PREPARED_DIR, calibration_path, pfp_params_path, posterior_path

#: the validation splits calibration is fitted on (Dirty-MNIST; never the OOD set)
VALIDATION_SPLITS = ("mnist_val", "ambiguous_val")


@dataclass(frozen=True)
class CalibrateResult:
    """The fitted calibration, where it was written, and the summary metrics file."""

    calibration: CalibrationResult
    path: Path
    summary: dict[str, Any]  # metrics/calibrate_MODEL.json: the calibration without the grid
    summary_path: Path


def validation_sets(arrays: dict[str, np.ndarray]) -> list[ValidationSet]:
    """The normalised validation splits of the prepared data."""
    return [ValidationSet(normalise(arrays[f"{name}_x"]), np.asarray(arrays[f"{name}_y"])) for name in VALIDATION_SPLITS]


def calibrate(model: str, config: CalibrateConfig, *, seed: int, ece_bins: int, root: Path = Path(".")) -> CalibrateResult:
    """Fit the calibration of ``model``'s PFP parameters and write ``models/MODEL/calibration.json``.

    ``models/MODEL/pfp.npz`` is refused if it belongs to another model, is invalid, or (when the
    posterior is at hand) was converted from another posterior than ``models/MODEL/posterior.npz``.
    The posterior is needed too: both objectives' fits are recorded, and the mc_variance one
    matches the whole-weight Monte-Carlo variance of the posterior.

    Parameters
    ----------
    model
        The architecture.
    config
        The ``calibrate`` section.
    seed
        Seeds the logit noise.
    ece_bins
        Bins of the expected calibration error (``evaluate.ece_bins``).
    root
        The workspace folder.
    """
    root = Path(root)
    source, posterior = root / pfp_params_path(model), root / posterior_path(model)
    pfp_model = load_pfp_params(source, model, parent=posterior if posterior.is_file() else None)
    posterior_model = load_posterior(posterior, model)
    sets = validation_sets(load_prepared(root / PREPARED_DIR))
    result = fit_calibration(pfp_model, sets, config, seed=seed, ece_bins=ece_bins, posterior=posterior_model)
    path = root / calibration_path(model)
    save_calibration(result, path, model=model, parent=source)
    summary = {k: v for k, v in result.to_dict().items() if k != "grid"}  # fits: both objectives, nested
    summary_path = root / METRICS_DIR / f"calibrate_{model}.json"
    atomic_write_json(summary_path, summary)
    return CalibrateResult(calibration=result, path=path, summary=summary, summary_path=summary_path)
