"""DVC stage `tune@MODEL`: Meta Scheduler tuning + compiled libraries -> models/MODEL/tvm, metrics/tune_MODEL.json."""

import json

from pfp import tracking
from pfp.backends.tvm.tune import ScheduleSource
from pfp.bnn import Posterior
from pfp.calibrate import CalibrationResult
from pfp.convert import PFPModel
from pfp.io import atomic_write_json
from pfp.stage import METRICS_DIR, calibration_path, model_argument, pfp_params_path, posterior_path, run_stage, tvm_dir
from pfp.tuning import tune_model


def main(params, argv):
    model = model_argument(params, argv)
    config = params.tune
    runner = f"rpc:{config.rpc.key}@{config.rpc.tracker}" if config.rpc.tracker else "local"
    tags = {"tune.target": config.target.value, "tune.runner": runner, "tune.emulated": config.rpc.emulated}
    with tracking.stage_run(f"tune@{model}", params={"model": model, **config.model_dump(mode="json")}, tags=tags) as run:
        calibration = CalibrationResult(**json.loads(calibration_path(model).read_text()))
        libraries = tune_model(Posterior.load(posterior_path(model)), PFPModel.load(pfp_params_path(model)), config,
                               tvm_dir(model), variance_scale=calibration.variance_scale, seed=params.seed)
        # timings here were measured on the tuning runner: an emulated board's are emulated, never host figures
        summary = {"target": config.target.value, "runner": runner, "emulated": config.rpc.emulated,
                   "trials_per_task": config.trials_per_task, "variance_scale": calibration.variance_scale,
                   "seconds": sum(lib.report["seconds"] for lib in libraries),
                   "libraries": [lib.as_dict() for lib in libraries]}
        atomic_write_json(METRICS_DIR / f"tune_{model}.json", summary)
        run.log_metrics({"seconds": summary["seconds"], **{
            f"{lib.variant.value}_b{lib.batch_size}.kept_{source.value}": sum(
                row["kept"] == source.value for row in lib.report["tasks"])
            for lib in libraries for source in ScheduleSource}})
        run.log_artifact(METRICS_DIR / f"tune_{model}.json")
        run.log_artifact(tvm_dir(model), artifact_path="tvm")


if __name__ == "__main__":
    run_stage(main)
