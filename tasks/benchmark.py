"""DVC stage `benchmark`: latency of every predictor per model and batch size -> metrics/latency.json."""

from pfp import plots, tracking
from pfp.bench import benchmark_model
from pfp.bnn import Posterior
from pfp.convert import PFPModel
from pfp.io import atomic_write_json
from pfp.stage import METRICS_DIR, PLOTS_DIR, pfp_params_path, posterior_path, run_stage


def main(params, argv):
    config = params.benchmark
    results = {}
    with tracking.stage_run("benchmark", params=config.model_dump()) as run:
        for model in (m.value for m in params.models):
            posterior, pfp_model = Posterior.load(posterior_path(model)), PFPModel.load(pfp_params_path(model))
            results[model] = {}
            for batch in config.batch_sizes:
                print(f"benchmark {model} batch {batch} ...", flush=True)
                results[model][f"batch_{batch}"] = benchmark_model(posterior, pfp_model, batch, svi_samples=config.svi_samples,
                                                                   repeat=config.repeat, tvm_number=config.tvm_number,
                                                                   tvm_repeat=config.tvm_repeat)
            series = {}
            for batch in config.batch_sizes:
                for name, value in results[model][f"batch_{batch}"].items():
                    if name.endswith("_ms"):
                        series.setdefault(name, {})[batch] = value
            run.log_artifact(plots.latency_vs_batch(series, PLOTS_DIR / model / "benchmark" / "latency.png",
                                                    title=f"{model}: latency per batch (host CPU)"))
        atomic_write_json(METRICS_DIR / "latency.json", results)
        run.log_metrics(results)
        run.log_artifact(METRICS_DIR / "latency.json")


if __name__ == "__main__":
    run_stage(main)
