"""DVC stage `evaluate@MODEL`: svi / pfp / det metrics -> metrics/evaluate_MODEL.json + plots."""

import json

from pfp import tracking
from pfp.bnn import Posterior
from pfp.calibrate import CalibrationResult
from pfp.convert import PFPModel
from pfp.data.dirty_mnist import load_prepared
from pfp.evaluation import evaluate_model
from pfp.io import atomic_write_json
from pfp.stage import METRICS_DIR, PLOTS_DIR, PREPARED_DIR, calibration_path, model_argument, pfp_params_path, posterior_path, run_stage


def main(params, argv):
    model = model_argument(params, argv)
    plot_dir = PLOTS_DIR / model / "evaluate"
    with tracking.stage_run(f"evaluate@{model}", params={"model": model, **params.evaluate.model_dump()}) as run:
        calibration = CalibrationResult(**json.loads(calibration_path(model).read_text()))
        results = evaluate_model(Posterior.load(posterior_path(model)), PFPModel.load(pfp_params_path(model)),
                                 calibration, load_prepared(PREPARED_DIR), params.evaluate, seed=params.seed, plot_dir=plot_dir)
        results["pfp"]["backend"] = params.evaluate.pfp_backend.value
        atomic_write_json(METRICS_DIR / "evaluate" / f"{model}.json", results)
        run.log_metrics(results)
        run.set_tags({"pfp.backend": params.evaluate.pfp_backend.value})
        run.log_artifact(plot_dir, artifact_path="plots")


if __name__ == "__main__":
    run_stage(main)
