"""Stage `evaluate@MODEL`: svi / pfp / det metrics -> metrics/evaluate/MODEL.json + plots.

``pfp.fidelity``: the fidelity report (PFP against whole-weight Monte-Carlo of the same posterior,
per option and set; ``plots/MODEL/evaluate/fidelity.png``), ``pfp.objectives``: the PFP metrics at
each calibration objective's fit side by side; see :mod:`pfp.evaluation`.

The figures go to ``plots/MODEL/evaluate/``, their data (ROC, reliability and the training loss
per epoch, from ``metrics/train_MODEL.json``) as CSV to ``plots/MODEL/series/`` for ``dvc plots diff``.

``deployed``: the host bundle of the bundle stage on the test sets at its OOD threshold
(:func:`pfp.evaluation.deployed_metrics`).

The pfp metrics come from ``evaluate.pfp_backend``: with ``tvm`` the tune stage's host PFP
library (largest batch), or, when the libraries were tuned for a board, a PFP predictor
compiled here with the hand schedules.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from pfp import plots
from pfp.artifacts.trained import load_trained, trained_digests
from pfp.backends.base import Predictor
from pfp.config import CompileTarget, EvaluateConfig, PFPBackend, TuneParams, Variant
from pfp.data.dirty_mnist import load_prepared
from pfp.data.idx import DataError
from pfp.evaluation import deployed_metrics, evaluate_model
from pfp.io import atomic_write_json
from pfp.stage import METRICS_DIR, PLOTS_DIR, PREPARED_DIR, bundle_dir, tvm_dir
from pfp.tuning import library_path, load_library
from pfp_runtime import BundleError, load_bundle

__all__ = ["EvaluateOutcome", "plot_dir", "results_path", "run", "series_dir", "tuned_pfp_library"]


def results_path(model: str) -> Path:
    return METRICS_DIR / "evaluate" / f"{model}.json"


def plot_dir(model: str) -> Path:
    return PLOTS_DIR / model / "evaluate"


def series_dir(model: str) -> Path:
    return PLOTS_DIR / model / "series"


def write_loss_series(model: str) -> Path | None:
    """The train stage's ELBO loss per epoch (``metrics/train_MODEL.json``) as ``series/loss.csv``; None if it has none."""
    path = METRICS_DIR / f"train_{model}.json"
    try:
        losses = json.loads(path.read_text())["elbo_loss"]
    except FileNotFoundError:
        raise DataError(f"{path}: not found; run the train@{model} stage first") from None
    except (ValueError, KeyError, TypeError) as error:
        raise DataError(f"{path}: no elbo_loss list ({error}); re-run the train@{model} stage") from None
    return plots.loss_series(losses, series_dir(model) / "loss.csv") if losses else None


def tuned_pfp_library(model: str, tune: TuneParams, variance_scale: float,
                      variant: Variant = Variant.PFP) -> tuple[Predictor | None, str]:
    """The tune stage's host library of the model's PFP ``variant`` (largest batch) and its path;
    (None, note) for a board target or when the variant was not tuned."""
    if tune.target is not CompileTarget.HOST:
        return None, f"compiled here with hand schedules (tune.target {tune.target.value} is a board)"
    if variant not in tune.variants:
        return None, f"compiled here with hand schedules (tune.variants has no {variant.value})"
    batch = max(tune.batch_sizes)
    path = library_path(tvm_dir(model), tune.target, variant, batch)
    library = load_library(tvm_dir(model), tune.target, variant, batch, model=model,
                           made_from=trained_digests(model))
    compiled_scale = library.describe().get("variance_scale")
    if compiled_scale is None or abs(compiled_scale - variance_scale) > 1e-12:
        raise DataError(f"{path}: compiled with variance scale {compiled_scale}, calibration says {variance_scale}; "
                        "re-run tune")
    return library, str(path)


@dataclass
class EvaluateOutcome:
    results: dict  # what metrics/evaluate/MODEL.json holds
    results_path: Path
    plot_dir: Path
    tags: dict[str, str] = field(default_factory=dict)  # for the tracking run


def run(model: str, config: EvaluateConfig, tune: TuneParams, *, seed: int) -> EvaluateOutcome:
    """Evaluate ``model`` (in the DVC workspace, the working folder)."""
    trained = load_trained(model)
    calibration = trained.calibration
    library, source = None, None
    if config.pfp_backend is PFPBackend.TVM:
        library, source = tuned_pfp_library(model, tune, calibration.variance_scale,
                                            Variant(trained.pfp_model.pfp_variant))
    arrays = load_prepared(PREPARED_DIR)
    write_loss_series(model)
    results = evaluate_model(trained.posterior, trained.pfp_model,
                             calibration, arrays, config, seed=seed, plot_dir=plot_dir(model),
                             pfp_library=library, series_dir=series_dir(model))
    host_bundle = bundle_dir(model, CompileTarget.HOST.value)
    try:
        results["deployed"] = {"bundle": str(host_bundle),
                               **deployed_metrics(load_bundle(host_bundle, expected_model=model), arrays)}
    except BundleError as error:
        raise DataError(f"{error}; run the bundle@{model} stage first") from None
    results["pfp"]["backend"] = config.pfp_backend.value
    tags = {"pfp.backend": config.pfp_backend.value, "calibrate.objective": calibration.objective}
    if source is not None:
        results["pfp"]["library"] = source
        tags["pfp.library"] = source
    atomic_write_json(results_path(model), results)
    return EvaluateOutcome(results, results_path(model), plot_dir(model), tags)
