"""DVC stage `calibrate@MODEL`: fit PFP variance scale and temperature on validation data."""

import numpy as np

from pfp import tracking
from pfp.calibrate import ValidationSet, fit_calibration
from pfp.convert import PFPModel
from pfp.data.dirty_mnist import load_prepared, normalise
from pfp.io import atomic_write_json
from pfp.stage import METRICS_DIR, PREPARED_DIR, calibration_path, model_argument, pfp_params_path, run_stage


def main(params, argv):
    model = model_argument(params, argv)
    with tracking.stage_run(f"calibrate@{model}", params={"model": model, **params.calibrate.model_dump()}) as run:
        arrays = load_prepared(PREPARED_DIR)
        sets = [ValidationSet(normalise(arrays[f"{name}_x"]), np.asarray(arrays[f"{name}_y"])) for name in ("mnist_val", "ambiguous_val")]
        result = fit_calibration(PFPModel.load(pfp_params_path(model)), sets, params.calibrate,
                                 seed=params.seed, ece_bins=params.evaluate.ece_bins)
        atomic_write_json(calibration_path(model), result.to_dict())
        summary = {k: v for k, v in result.to_dict().items() if k != "grid"}
        atomic_write_json(METRICS_DIR / f"calibrate_{model}.json", summary)
        run.log_metrics(summary)
        run.log_artifact(calibration_path(model))


if __name__ == "__main__":
    run_stage(main)
