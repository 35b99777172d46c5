"""Evaluate the three predictors of one trained BNN on Dirty-MNIST and Fashion-MNIST.

- ``svi``: Monte-Carlo over the posterior (``svi_samples`` weight draws, network passes each);
- ``pfp``: one probabilistic forward pass, calibrated, Monte-Carlo over the Gaussian logits only;
- ``det``: the posterior means as an ordinary network.

For every method and set: accuracy, NLL, ECE, Brier, mean MI and SME; OOD AUROC
(MNIST test vs Fashion-MNIST) for MI, SME and mean logit variance.

PFP's entry also holds ``fidelity`` (:mod:`pfp.fidelity`: PFP against whole-weight Monte-Carlo of
the same posterior, per option and set) and ``objectives`` (the PFP metrics at each calibration
objective's fit, side by side; the PyTorch reference, so no extra compilation).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from enum import Enum
from pathlib import Path

import numpy as np
import torch

from pfp import fidelity, metrics, plots
from pfp.backends import base
from pfp.backends.base import Backend, Predictor
from pfp.bnn import Posterior, predict_deterministic, predict_svi
from pfp.calibrate import CalibrationResult
from pfp.config import EvaluateConfig, PFPBackend
from pfp.convert import PFPModel
from pfp.data.dirty_mnist import normalise
from pfp.predictive import gaussian_logit_softmax_samples, softmax_samples


class Method(str, Enum):
    SVI = "svi"
    PFP = "pfp"
    DET = "det"


class EvalSet(str, Enum):
    MNIST = "mnist"
    AMBIGUOUS = "ambiguous"
    FASHION = "fashion"


SET_ARRAYS = {EvalSet.MNIST: "mnist_test", EvalSet.AMBIGUOUS: "ambiguous_test", EvalSet.FASHION: "ood_test"}


@dataclass
class Prediction:
    """Per-example outputs of one method on one set."""

    probs: np.ndarray  # (N, C) predictive mean
    mutual_information: np.ndarray  # (N,)
    softmax_entropy: np.ndarray  # (N,)
    logit_variance: np.ndarray  # (N,) mean over classes


def _from_sample_probs(sample_probs: np.ndarray, logit_variance: np.ndarray) -> Prediction:
    probs = sample_probs.mean(0)
    return Prediction(probs, metrics.mutual_information(sample_probs), metrics.softmax_entropy(probs), logit_variance)


def pfp_predictor(pfp_model: PFPModel, *, variance_scale: float, config: EvaluateConfig, batch_size: int) -> Predictor:
    """The PFP predictor of ``config.pfp_backend``, made once per model, backend, scale and batch size."""
    cache = pfp_model.__dict__.setdefault("_predictors", {})
    key = (config.pfp_backend.value, variance_scale, batch_size)
    if key not in cache:  # a compiling backend (TVM) compiles here: only when asked for
        cache[key] = base.create(config.pfp_backend, pfp_model.pfp_variant, pfp_model, batch_size=batch_size,
                                 variance_scale=variance_scale)
    return cache[key]


def pfp_logit_moments(pfp_model: PFPModel, x: torch.Tensor, *, variance_scale: float,
                      config: EvaluateConfig, library: Predictor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """PFP logit mean and variance from the configured backend (compiled TVM or the torch reference).

    ``library`` is a PFP predictor to use (e.g. the tune stage's library); without it the
    predictor of ``config.pfp_backend`` is made here (compiled with the hand schedules).
    """
    if library is None:
        library = pfp_predictor(pfp_model, variance_scale=variance_scale, config=config,
                                batch_size=min(config.batch_size, x.shape[0]))
    mean, var = library.predict(x.numpy())
    return torch.from_numpy(mean), torch.from_numpy(var)


def predict(method: Method, posterior: Posterior, pfp_model: PFPModel, calibration: CalibrationResult,
            x: torch.Tensor, config: EvaluateConfig, *, seed: int, pfp_library: Predictor | None = None) -> Prediction:
    if method is Method.SVI:
        logits = predict_svi(posterior, x, num_samples=config.svi_samples, seed=seed, batch_size=config.batch_size)
        return _from_sample_probs(softmax_samples(logits), logits.var(0).mean(-1).numpy())
    if method is Method.PFP:
        logit_mean, logit_var = pfp_logit_moments(pfp_model, x, variance_scale=calibration.variance_scale, config=config,
                                                  library=pfp_library)
        sample_probs = gaussian_logit_softmax_samples(logit_mean, logit_var, num_samples=config.logit_samples,
                                                      temperature=calibration.temperature, seed=seed)
        return _from_sample_probs(sample_probs, logit_var.mean(-1).numpy())
    logits = predict_deterministic(posterior, x, batch_size=config.batch_size)
    return _from_sample_probs(softmax_samples(logits)[None], np.zeros(x.shape[0], dtype=np.float32))


def _set_metrics(prediction: Prediction, labels: np.ndarray, ece_bins: int) -> dict[str, float]:
    return {
        "accuracy": metrics.accuracy(prediction.probs, labels),
        "nll": metrics.nll(prediction.probs, labels),
        "ece": metrics.expected_calibration_error(prediction.probs, labels, n_bins=ece_bins),
        "brier": metrics.brier(prediction.probs, labels),
        "mi": float(prediction.mutual_information.mean()),
        "sme": float(prediction.softmax_entropy.mean()),
    }


def _auroc_scores(prediction_in: Prediction, prediction_out: Prediction) -> dict[str, float]:
    return {
        "mi": metrics.auroc(prediction_in.mutual_information, prediction_out.mutual_information),
        "sme": metrics.auroc(prediction_in.softmax_entropy, prediction_out.softmax_entropy),
        "var": metrics.auroc(prediction_in.logit_variance, prediction_out.logit_variance),
    }


def _concat(a: Prediction, b: Prediction) -> Prediction:
    return Prediction(*(np.concatenate([getattr(a, f), getattr(b, f)]) for f in Prediction.__dataclass_fields__))


def moment_errors(posterior: Posterior, pfp_model: PFPModel, x: torch.Tensor, *, num_samples: int, seed: int,
                  variance_scale: float = 1.0) -> dict[str, float]:
    """Relative error of PFP's logit mean/variance (the PyTorch reference) against SVI's sampled moments."""
    logits = predict_svi(posterior, x, num_samples=num_samples, seed=seed)
    reference = base.create(Backend.TORCH, pfp_model.pfp_variant, pfp_model, batch_size=1000, variance_scale=variance_scale)
    logit_mean, logit_var = reference.predict(x.numpy())
    return {
        "logit_mean_rel_error": metrics.relative_error(logit_mean, logits.mean(0).numpy()),
        "logit_var_rel_error": metrics.relative_error(logit_var, logits.var(0).numpy()),
    }


def calibration_fits(calibration: CalibrationResult) -> dict[str, dict[str, float]]:
    """Each objective's fit in the calibration; a file from before objectives: its one (NLL) fit."""
    return calibration.fits or {calibration.objective: {"variance_scale": calibration.variance_scale,
                                                        "temperature": calibration.temperature}}


def objective_metrics(posterior: Posterior, pfp_model: PFPModel, calibration: CalibrationResult,
                      inputs: dict[EvalSet, torch.Tensor], labels: dict[EvalSet, np.ndarray], config: EvaluateConfig, *,
                      seed: int) -> dict[str, dict[str, float]]:
    """PFP (the PyTorch reference) at every calibration objective's scale and temperature, on the test
    and OOD sets: accuracy, NLL, ECE (MNIST test), mean MI per set, OOD AUROC of MI."""
    reference = config.model_copy(update={"pfp_backend": PFPBackend.TORCH})
    results = {}
    for objective, fit in calibration_fits(calibration).items():
        fitted = replace(calibration, variance_scale=fit["variance_scale"], temperature=fit["temperature"])
        prediction = {s: predict(Method.PFP, posterior, pfp_model, fitted, inputs[s], reference, seed=seed) for s in EvalSet}
        mnist = _set_metrics(prediction[EvalSet.MNIST], labels[EvalSet.MNIST], config.ece_bins)
        results[objective] = {
            "chosen": objective == calibration.objective,
            "variance_scale": fit["variance_scale"], "temperature": fit["temperature"],
            **{k: mnist[k] for k in ("accuracy", "nll", "ece")},
            **{f"mi_{s.value}": float(prediction[s].mutual_information.mean()) for s in EvalSet},
            "auroc_mi": metrics.auroc(prediction[EvalSet.MNIST].mutual_information,
                                      prediction[EvalSet.FASHION].mutual_information),
        }
    return results


def fidelity_metrics(posterior: Posterior, pfp_model: PFPModel, calibration: CalibrationResult,
                     inputs: dict[EvalSet, torch.Tensor], config: EvaluateConfig, *,
                     seed: int) -> fidelity.FidelityReport:
    """The fidelity report on the first ``config.fidelity_images`` images of every set, against
    ``config.fidelity_samples`` whole-weight draws (options: :func:`pfp.fidelity.pfp_options`, at scale 1
    and at each calibration objective's scale)."""
    return fidelity.fidelity_report(
        posterior, pfp_model.spec, {s.value: x[: config.fidelity_images] for s, x in inputs.items()},
        fidelity.pfp_options(pfp_model, scales={name: fit["variance_scale"] for name, fit in calibration_fits(calibration).items()}),
        samples=config.fidelity_samples, seed=seed, logit_samples=config.logit_samples)


def evaluate_model(posterior: Posterior, pfp_model: PFPModel, calibration: CalibrationResult,
                   arrays: dict[str, np.ndarray], config: EvaluateConfig, *, seed: int,
                   plot_dir: str | Path | None = None, pfp_library: Predictor | None = None,
                   series_dir: str | Path | None = None) -> dict[str, dict]:
    """Metrics per method (see module docstring); writes plots to ``plot_dir`` when given, and the
    ROC, reliability and variance-ratio series behind them as CSV to ``series_dir`` (``roc.csv``,
    ``reliability.csv``, ``fidelity.csv``).

    ``pfp_library``: the PFP predictor the pfp metrics come from (else one of ``config.pfp_backend``).
    """
    inputs = {s: normalise(arrays[f"{SET_ARRAYS[s]}_x"]) for s in EvalSet}
    labels = {s: arrays[f"{SET_ARRAYS[s]}_y"] for s in EvalSet}
    results: dict[str, dict] = {}
    predictions: dict[Method, dict[EvalSet, Prediction]] = {}
    for method in Method:
        predictions[method] = {s: predict(method, posterior, pfp_model, calibration, inputs[s], config, seed=seed,
                                          pfp_library=pfp_library) for s in EvalSet}
        per_set = {s.value: _set_metrics(predictions[method][s], labels[s], config.ece_bins) for s in EvalSet}
        ood = _auroc_scores(predictions[method][EvalSet.MNIST], predictions[method][EvalSet.FASHION])
        dirty = _concat(predictions[method][EvalSet.MNIST], predictions[method][EvalSet.AMBIGUOUS])
        ood_dirty = _auroc_scores(dirty, predictions[method][EvalSet.FASHION])
        results[method.value] = {
            **{k: per_set["mnist"][k] for k in ("accuracy", "nll", "ece", "brier")},
            **{f"auroc_{k}": v for k, v in ood.items()},
            **{f"auroc_{k}_dirty": v for k, v in ood_dirty.items()},
            "mi_id": per_set["mnist"]["mi"], "mi_ood": per_set["fashion"]["mi"], "mi_ambiguous": per_set["ambiguous"]["mi"],
            "sme_id": per_set["mnist"]["sme"], "sme_ood": per_set["fashion"]["sme"], "sme_ambiguous": per_set["ambiguous"]["sme"],
            "sets": per_set,
        }
    count = min(config.moment_images, inputs[EvalSet.MNIST].shape[0])
    moment_x = inputs[EvalSet.MNIST][:count]
    results[Method.PFP.value].update(moment_errors(posterior, pfp_model, moment_x, num_samples=config.moment_samples, seed=seed + 1))
    calibrated = moment_errors(posterior, pfp_model, moment_x, num_samples=config.moment_samples, seed=seed + 1,
                               variance_scale=calibration.variance_scale)
    results[Method.PFP.value].update({f"{k}_calibrated": v for k, v in calibrated.items()})
    report = fidelity_metrics(posterior, pfp_model, calibration, inputs, config, seed=seed + 2)
    # under pfp, so every top-level key stays a method (the run summary and the report list them as such)
    results[Method.PFP.value]["fidelity"] = report.table
    results[Method.PFP.value]["objectives"] = objective_metrics(posterior, pfp_model, calibration, inputs, labels, config,
                                                                seed=seed)
    if plot_dir is not None:
        write_plots(Path(plot_dir), posterior.spec.name, predictions, labels, config.ece_bins,
                    series_dir=Path(series_dir) if series_dir is not None else None)
        if series_dir is not None:
            plots.fidelity_series(report.ratios, Path(series_dir) / "fidelity.csv")
        plots.uncertainty_histograms({option: {s: np.log2(r) for s, r in per_set.items()}
                                      for option, per_set in report.ratios.items()}, Path(plot_dir) / "fidelity.png",
                                     title=f"{posterior.spec.name}: PFP / Monte-Carlo logit variance",
                                     xlabel="log2(var PFP / var MC) per logit (0: faithful)")
    return results


def write_plots(plot_dir: Path, model_name: str, predictions: dict[Method, dict[EvalSet, Prediction]],
                labels: dict[EvalSet, np.ndarray], ece_bins: int, series_dir: Path | None = None) -> list[Path]:
    mnist, fashion = EvalSet.MNIST, EvalSet.FASHION
    bins = {m.value: metrics.reliability_bins(p[mnist].probs, labels[mnist], n_bins=ece_bins) for m, p in predictions.items()}
    curves, series = {}, {}
    for method, per_set in predictions.items():
        for score, short in (("mutual_information", "mi"), ("softmax_entropy", "sme")):
            scores_in, scores_out = getattr(per_set[mnist], score), getattr(per_set[fashion], score)
            fpr, tpr = metrics.roc_curve_points(scores_in, scores_out)
            curves[f"{method.value} {score.replace('_', ' ')}"] = series[f"{method.value}_{short}"] = (
                fpr, tpr, metrics.auroc(scores_in, scores_out))
    written = []
    if series_dir is not None:  # the data of the figures, for `dvc plots diff` (dvc.yaml's top-level plots)
        written += [plots.roc_series(series, series_dir / "roc.csv"),
                    plots.reliability_series(bins, series_dir / "reliability.csv")]

    def per_set_values(field: str) -> dict[str, dict[str, np.ndarray]]:
        return {m.value: {s.value: getattr(p[s], field) for s in EvalSet} for m, p in predictions.items() if m is not Method.DET}

    return written + [
        plots.reliability_diagram(bins, plot_dir / "reliability.png", title=f"{model_name}: reliability (MNIST test)"),
        plots.roc_curves(curves, plot_dir / "roc.png", title=f"{model_name}: OOD ROC, MNIST vs Fashion-MNIST"),
        plots.uncertainty_histograms(per_set_values("mutual_information"), plot_dir / "mi_hist.png",
                                     title=f"{model_name}: mutual information", xlabel="MI (nats)", log_y=True),
        plots.uncertainty_histograms(per_set_values("softmax_entropy"), plot_dir / "sme_hist.png",
                                     title=f"{model_name}: softmax entropy", xlabel="SME (nats)"),
    ]


def deployed_metrics(predictor, arrays: dict[str, np.ndarray]) -> dict:
    """The deployed bundle (a :class:`pfp_runtime.Predictor`) on the test sets, at its own OOD threshold.

    In-distribution (clean MNIST) images are the positives: ``tpr_mnist`` is the fraction of the
    MNIST test set accepted (not flagged), ``fpr`` per other set the fraction accepted although
    it should be flagged: Fashion-MNIST (out of distribution) and Ambiguous-MNIST (aleatoric,
    which a purely epistemic score such as MI is not meant to flag). Also the accuracy of the
    bundle on MNIST test, and the fraction flagged per set.
    """
    ood = predictor.bundle.metadata["ood"]
    flagged, accuracy = {}, None
    for eval_set, key in SET_ARRAYS.items():
        prediction = predictor.predict(arrays[f"{key}_x"])
        flagged[eval_set.value] = float(np.mean(prediction.ood))
        if eval_set is EvalSet.MNIST:
            accuracy = float(np.mean(prediction.predicted == np.asarray(arrays[f"{key}_y"])))
    return {"score": ood["score"], "threshold": ood["threshold"], "target_tpr": ood["target_tpr"],
            "validation_tpr": ood.get("validation_tpr"), "accuracy": accuracy, "flagged": flagged,
            "tpr_mnist": 1.0 - flagged[EvalSet.MNIST.value],
            "fpr": {EvalSet.FASHION.value: 1.0 - flagged[EvalSet.FASHION.value],
                    EvalSet.AMBIGUOUS.value: 1.0 - flagged[EvalSet.AMBIGUOUS.value]}}
