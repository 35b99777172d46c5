"""DVC stage `benchmark`: latency of every predictor per model and batch size -> metrics/latency.json,
per-operator profile and memory of the PFP vs deterministic modules -> metrics/profile.json.

Host CPU figures only: libraries tuned for a board (tune.target != host) are not run here; the
compiled variants are then built with the hand schedules (``schedules`` in latency.json says so).
"""

import json

from pfp import plots, tracking
from pfp.bench import benchmark_model
from pfp.bnn import Posterior
from pfp.calibrate import CalibrationResult
from pfp.config import CompileTarget, Variant
from pfp.convert import PFPModel
from pfp.io import atomic_write_json
from pfp.stage import METRICS_DIR, PLOTS_DIR, calibration_path, pfp_params_path, posterior_path, run_stage, tvm_dir
from pfp.tuning import build_variant_module, library_path, load_library


def host_libraries(model, tune, batch):
    """The tune stage's host libraries for this batch size (variants it did not build are absent)."""
    if tune.target is not CompileTarget.HOST:
        return {}
    return {variant: load_library(tvm_dir(model), tune.target, variant, batch) for variant in Variant
            if library_path(tvm_dir(model), tune.target, variant, batch).is_file()}


def main(params, argv):
    from pfp.backends.tvm.build import memory_estimate

    config = params.benchmark
    results, profile = {}, {}
    with tracking.stage_run("benchmark", params=config.model_dump()) as run:
        for model in (m.value for m in params.models):
            posterior, pfp_model = Posterior.load(posterior_path(model)), PFPModel.load(pfp_params_path(model))
            scale = CalibrationResult(**json.loads(calibration_path(model).read_text())).variance_scale
            results[model], profile[model] = {}, {}
            for batch in config.batch_sizes:
                print(f"benchmark {model} batch {batch} ...", flush=True)
                libraries = host_libraries(model, params.tune, batch)
                results[model][f"batch_{batch}"] = benchmark_model(
                    posterior, pfp_model, batch, svi_samples=config.svi_samples, repeat=config.repeat,
                    tvm_number=config.tvm_number, tvm_repeat=config.tvm_repeat, libraries=libraries,
                    variance_scale=scale, seed=params.seed)
                entry = {"memory": {variant.value: memory_estimate(build_variant_module(
                    variant, posterior, pfp_model, batch_size=batch, variance_scale=scale,
                    svi_samples=config.svi_samples, seed=params.seed)) for variant in (Variant.PFP, Variant.DET)}}
                if Variant.PFP in libraries:
                    entry["pfp_operators"] = libraries[Variant.PFP].profile(number=config.tvm_number)
                profile[model][f"batch_{batch}"] = entry
            series = {}
            for batch in config.batch_sizes:
                for name, value in results[model][f"batch_{batch}"].items():
                    if name.endswith("_ms"):
                        series.setdefault(name, {})[batch] = value
            run.log_artifact(plots.latency_vs_batch(series, PLOTS_DIR / model / "benchmark" / "latency.png",
                                                    title=f"{model}: latency per batch (host CPU)"))
        atomic_write_json(METRICS_DIR / "latency.json", results)
        atomic_write_json(METRICS_DIR / "profile.json", profile)
        run.log_metrics(results)
        run.log_metrics({model: {batch: {f"memory.{variant}.total_bytes": values["memory"][variant]["total_bytes"]
                                         for variant in values["memory"]} for batch, values in per_batch.items()}
                         for model, per_batch in profile.items()})
        run.log_artifact(METRICS_DIR / "latency.json")
        run.log_artifact(METRICS_DIR / "profile.json")


if __name__ == "__main__":
    run_stage(main)
