"""DVC stage `evaluate@MODEL`: svi / pfp / det metrics -> metrics/evaluate_MODEL.json + plots."""

import json

from pfp import tracking
from pfp.bnn import Posterior
from pfp.calibrate import CalibrationResult
from pfp.config import CompileTarget, PFPBackend, Variant
from pfp.convert import PFPModel
from pfp.data.dirty_mnist import load_prepared
from pfp.data.idx import DataError
from pfp.evaluation import evaluate_model
from pfp.io import atomic_write_json
from pfp.stage import (
    METRICS_DIR,
    PLOTS_DIR,
    PREPARED_DIR,
    calibration_path,
    model_argument,
    pfp_params_path,
    posterior_path,
    run_stage,
    tvm_dir,
)
from pfp.tuning import library_path, load_library


def main(params, argv):
    model = model_argument(params, argv)
    plot_dir = PLOTS_DIR / model / "evaluate"
    with tracking.stage_run(f"evaluate@{model}", params={"model": model, **params.evaluate.model_dump()}) as run:
        calibration = CalibrationResult(**json.loads(calibration_path(model).read_text()))
        library, source = None, None
        if params.evaluate.pfp_backend is PFPBackend.TVM:
            library, source = tuned_pfp_library(model, params.tune, calibration.variance_scale)
        results = evaluate_model(Posterior.load(posterior_path(model)), PFPModel.load(pfp_params_path(model)),
                                 calibration, load_prepared(PREPARED_DIR), params.evaluate, seed=params.seed,
                                 plot_dir=plot_dir, pfp_library=library)
        results["pfp"]["backend"] = params.evaluate.pfp_backend.value
        if source is not None:
            results["pfp"]["library"] = source
            run.set_tags({"pfp.library": source})
        atomic_write_json(METRICS_DIR / "evaluate" / f"{model}.json", results)
        run.log_metrics(results)
        run.set_tags({"pfp.backend": params.evaluate.pfp_backend.value})
        run.log_artifact(plot_dir, artifact_path="plots")


def tuned_pfp_library(model, tune, variance_scale):
    """The tune stage's host PFP library (largest batch) and its path; (None, note) for a board target."""
    if tune.target is not CompileTarget.HOST:
        return None, f"compiled here with hand schedules (tune.target {tune.target.value} is a board)"
    batch = max(tune.batch_sizes)
    library = load_library(tvm_dir(model), tune.target, Variant.PFP, batch)
    if abs(library.info.get("variance_scale", float("nan")) - variance_scale) > 1e-12:
        raise DataError(f"{library_path(tvm_dir(model), tune.target, Variant.PFP, batch)}: compiled with variance "
                        f"scale {library.info.get('variance_scale')}, calibration says {variance_scale}; re-run tune")
    return library, str(library_path(tvm_dir(model), tune.target, Variant.PFP, batch))


if __name__ == "__main__":
    run_stage(main)
