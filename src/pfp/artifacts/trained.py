"""A model's trained artifacts as the later stages read them: each checked against the others.

The tune, evaluate and benchmark stages need the posterior, the PFP parameters and the
calibration of one model. :func:`load_trained` reads all three through their validated readers:
each must belong to ``model``, the PFP parameters must have been converted from this posterior
and the calibration fitted on these PFP parameters (parent hashes), else a clear error names
the stale file and the stage to re-run.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pfp.artifacts.calibration import load_calibration
from pfp.artifacts.header import sha256_of
from pfp.artifacts.pfp_params import load_pfp_params
from pfp.artifacts.posterior import load_posterior
from pfp.bnn import Posterior
from pfp.calibrate import CalibrationResult
from pfp.convert import PFPModel
from pfp.stage import calibration_path, pfp_params_path, posterior_path


@dataclass(frozen=True)
class TrainedModel:
    posterior: Posterior
    pfp_model: PFPModel
    calibration: CalibrationResult


def load_trained(model: str, root: Path = Path(".")) -> TrainedModel:
    """The train, convert and calibrate stages' outputs of ``model`` in the workspace ``root``."""
    posterior_file, pfp_file = root / posterior_path(model), root / pfp_params_path(model)
    return TrainedModel(posterior=load_posterior(posterior_file, model),
                        pfp_model=load_pfp_params(pfp_file, model, parent=posterior_file),
                        calibration=load_calibration(root / calibration_path(model), model, parent=pfp_file))


def trained_digests(model: str, root: Path = Path(".")) -> dict[str, str]:
    """sha256 of each trained artifact of ``model`` that exists: what a compiled library records it was made from."""
    paths = {"posterior": posterior_path(model), "pfp_params": pfp_params_path(model),
             "calibration": calibration_path(model)}
    return {kind: sha256_of(root / path) for kind, path in paths.items() if (root / path).is_file()}
