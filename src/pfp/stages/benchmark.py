"""Stage `benchmark`: latency of every predictor per model and batch size, the peers a user might
pick instead among them (torch.compile, ONNX Runtime; pfp.peers) -> metrics/latency.json,
per-operator profile and memory of the PFP vs deterministic predictors -> metrics/profile.json,
serving from raw images (runtime bundle, twin, SVI-30 Pyro and compiled, bare PFP call; quiet and
with a core kept busy; the runtime's thread choice; the uncertainty head's error) -> metrics/serving.json.

Host CPU figures only: libraries tuned for a board (tune.target != host) are not run here; the
compiled variants are then built with the hand schedules (``schedules`` in latency.json says so).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from pfp import plots
from pfp.artifacts.trained import load_trained, trained_digests
from pfp.backends import base
from pfp.backends.base import Backend, Predictor
from pfp.bench import benchmark_model
from pfp.config import BenchmarkConfig, CompileTarget, TuneParams, Variant
from pfp.data.dirty_mnist import load_prepared
from pfp.io import atomic_write_json
from pfp.serving_bench import ServingModel, benchmark_serving, serving_images
from pfp.stage import METRICS_DIR, PLOTS_DIR, PREPARED_DIR, bundle_dir, tvm_dir
from pfp.tuning import library_path, load_library

__all__ = ["BenchmarkOutcome", "benchmark_plots_dir", "host_libraries", "latency_path", "memory_metrics", "profile_path", "run",
           "serving_path"]

#: the backend whose compiled predictors (and memory plan) the benchmark reports
COMPILED_BACKEND = Backend.TVM


def latency_path() -> Path:
    return METRICS_DIR / "latency.json"


def profile_path() -> Path:
    return METRICS_DIR / "profile.json"


def serving_path() -> Path:
    return METRICS_DIR / "serving.json"


def benchmark_plots_dir() -> Path:
    """One folder for every configured model's plots (``MODEL/latency.png``): dvc.yaml declares this folder,
    so the stage's outputs follow the params' model list."""
    return PLOTS_DIR / "benchmark"


def host_libraries(model: str, tune: TuneParams, batch: int) -> dict[Variant, Predictor]:
    """The tune stage's host libraries for this batch size (variants it did not build are absent)."""
    if tune.target is not CompileTarget.HOST:
        return {}
    made_from = trained_digests(model)
    return {variant: load_library(tvm_dir(model), tune.target, variant, batch, model=model, made_from=made_from)
            for variant in Variant
            if library_path(tvm_dir(model), tune.target, variant, batch).is_file()}


def memory_metrics(profile: dict) -> dict:
    """``{model: {batch_B: {"memory.VARIANT.total_bytes": n}}}`` of a profile.json."""
    return {model: {batch: {f"memory.{variant}.total_bytes": values["memory"][variant]["total_bytes"]
                            for variant in values["memory"]} for batch, values in per_batch.items()}
            for model, per_batch in profile.items()}


@dataclass
class BenchmarkOutcome:
    latency: dict  # metrics/latency.json
    profile: dict  # metrics/profile.json
    latency_path: Path
    profile_path: Path
    serving: dict = field(default_factory=dict)  # metrics/serving.json
    serving_path: Path = field(default_factory=serving_path)
    plots: list[Path] = field(default_factory=list)


def run(models: list[str], config: BenchmarkConfig, tune: TuneParams, *, seed: int) -> BenchmarkOutcome:
    """Benchmark every model (in the DVC workspace, the working folder)."""
    compiler = base.factory(COMPILED_BACKEND)
    results, profile, written, serving_models = {}, {}, [], {}
    images = serving_images(load_prepared(PREPARED_DIR), max(config.head_images, *config.serving_batch_sizes))
    for model in models:
        trained = load_trained(model)
        serving_models[model] = ServingModel(trained.posterior, trained.pfp_model, trained.calibration.variance_scale,
                                             trained_digests(model), bundle_dir(model, CompileTarget.HOST.value),
                                             tvm_dir(model), images)
        posterior, pfp_model, scale = trained.posterior, trained.pfp_model, trained.calibration.variance_scale
        results[model], profile[model] = {}, {}
        for batch in config.batch_sizes:
            print(f"benchmark {model} batch {batch} ...", flush=True)
            libraries = host_libraries(model, tune, batch)
            results[model][f"batch_{batch}"] = benchmark_model(
                posterior, pfp_model, batch, svi_samples=config.svi_samples, repeat=config.repeat,
                warmup=config.warmup, tvm_number=config.tvm_number, tvm_repeat=config.tvm_repeat,
                libraries=libraries, variance_scale=scale, seed=seed, peers=config.peers)
            entry = {"memory": {variant.value: compiler.memory(
                variant, pfp_model, posterior, batch_size=batch, variance_scale=scale, svi_samples=config.svi_samples,
                seed=seed) for variant in config.memory_variants}}
            shipped = Variant(pfp_model.pfp_variant)  # the model's PFP: pfp_cov when it carries covariance
            if shipped in libraries:
                entry["pfp_operators"] = libraries[shipped].profile(number=config.tvm_number)
                entry["pfp_operators_variant"] = shipped.value
            profile[model][f"batch_{batch}"] = entry
        series = {}
        for batch in config.batch_sizes:
            for name, value in results[model][f"batch_{batch}"].items():
                if name.endswith("_ms"):
                    series.setdefault(name, {})[batch] = value
        written.append(plots.latency_vs_batch(series, benchmark_plots_dir() / model / "latency.png",
                                              title=f"{model}: latency per batch (host CPU)"))
    atomic_write_json(latency_path(), results)
    atomic_write_json(profile_path(), profile)
    serving = benchmark_serving(serving_models, config, tune, seed=seed)
    atomic_write_json(serving_path(), serving)
    return BenchmarkOutcome(results, profile, latency_path(), profile_path(), serving, serving_path(), written)
