"""DVC stage `evaluate`: svi / pfp / det metrics for every model -> metrics/evaluate.json + plots."""

import json

from pfp import tracking
from pfp.bnn import Posterior
from pfp.calibrate import CalibrationResult
from pfp.convert import PFPModel
from pfp.data.dirty_mnist import load_prepared
from pfp.evaluation import evaluate_model
from pfp.io import atomic_write_json
from pfp.stage import METRICS_DIR, PLOTS_DIR, PREPARED_DIR, calibration_path, pfp_params_path, posterior_path, run_stage


def main(params, argv):
    arrays = load_prepared(PREPARED_DIR)
    results = {}
    for model in (m.value for m in params.models):
        with tracking.stage_run(f"evaluate@{model}", params={"model": model, **params.evaluate.model_dump()}) as run:
            calibration = CalibrationResult(**json.loads(calibration_path(model).read_text()))
            results[model] = evaluate_model(Posterior.load(posterior_path(model)), PFPModel.load(pfp_params_path(model)),
                                            calibration, arrays, params.evaluate, seed=params.seed, plot_dir=PLOTS_DIR)
            results[model]["pfp"]["backend"] = "torch"
            run.log_metrics(results[model])
            run.set_tags({"pfp.backend": "torch"})
            run.log_artifact(PLOTS_DIR, artifact_path="plots")
    atomic_write_json(METRICS_DIR / "evaluate.json", results)


if __name__ == "__main__":
    run_stage(main)
