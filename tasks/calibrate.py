"""DVC stage `calibrate@MODEL`: fit PFP variance scale and temperature on validation data (logic: pfp.stages.calibrate)."""

from pfp import tracking
from pfp.stage import model_argument, run_stage
from pfp.stages.calibrate import calibrate


def main(params, argv):
    model = model_argument(params, argv)
    with tracking.stage_run(f"calibrate@{model}", params={"model": model, **params.calibrate.model_dump(mode="json")},
                            datasets=["validation"]) as run:
        result = calibrate(model, params.calibrate, seed=params.seed, ece_bins=params.evaluate.ece_bins)
        run.log_metrics(result.summary)  # numbers only: fits.OBJECTIVE.{variance_scale,nll,ece,var_ratio_median,...}
        run.set_tags({"calibrate.objective": result.calibration.objective})
        run.log_artifact(result.path)


if __name__ == "__main__":
    run_stage(main)
