"""Post-hoc calibration of the PFP on Dirty-MNIST validation data (never on OOD data).

Two knobs:

- ``variance_scale`` multiplies every weight variance before the forward pass. Two objectives
  fit it (``calibrate.objective`` picks the one downstream stages use; both are recorded):

  - ``nll``: validation NLL of the predictive E[softmax(z)] over a grid (one PFP pass per value);
  - ``mc_variance`` (label-free): PFP's logit variance at scale s matches the whole-weight
    Monte-Carlo logit variance of the *unscaled* posterior (the BNN itself) on at most
    ``fidelity_images`` validation images: the root of the median log-ratio in log s (Brent's
    method; the median log-ratio is continuous and increasing in s, so a root-finder lands on the
    crossing in about ten cheap PFP passes, where a grid would quantise s to its spacing);

- ``temperature`` divides the Gaussian logits, fitted by validation NLL at the chosen scale
  for either objective (a bounded 1-D search; it costs no network pass).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from scipy.optimize import brentq, minimize_scalar

from pfp import metrics
from pfp.bnn import Posterior
from pfp.config import CalibrateConfig, CalibrationObjective
from pfp.convert import PFPModel, predict_pfp
from pfp.fidelity import mc_logits, mc_reference
from pfp.predictive import gaussian_logit_noise, gaussian_logit_softmax_samples

TEMPERATURE_BOUNDS = (0.2, 5.0)
#: the search interval of the mc_variance objective's scale
MC_SCALE_BOUNDS = (0.01, 100.0)


@dataclass
class CalibrationResult:
    """The chosen fit (``variance_scale``, ``temperature``: what downstream stages use), the
    objective that chose it, and ``fits``: every objective's fit, {objective: {variance_scale,
    temperature, nll, ece, var_ratio_median, ...}} (``var_ratio_median``: validation median of PFP
    logit variance / Monte-Carlo variance). Files written before objectives existed load with
    objective ``nll`` and no fits."""

    variance_scale: float
    temperature: float
    nll_before: float
    nll_after: float
    ece_before: float
    ece_after: float
    grid: list[dict[str, float]] = field(default_factory=list)
    objective: str = CalibrationObjective.NLL.value
    fits: dict[str, dict[str, float]] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class ValidationSet:
    """Normalised images and their labels ((N,) or multi-label (N, L))."""

    x: torch.Tensor
    labels: np.ndarray


def _pairs(probs: np.ndarray, sets: list[ValidationSet]) -> tuple[np.ndarray, np.ndarray]:
    all_probs, all_labels, start = [], [], 0
    for item in sets:
        stop = start + item.x.shape[0]
        p, y = metrics.expand_labels(probs[start:stop], item.labels)
        all_probs.append(p)
        all_labels.append(y)
        start = stop
    return np.concatenate(all_probs), np.concatenate(all_labels)


def fidelity_subset(count: int, limit: int) -> np.ndarray:
    """``limit`` indices spread evenly over ``count`` images (every validation split contributes)."""
    return np.unique(np.linspace(0, count - 1, min(limit, count)).round().astype(int))


def median_log_ratio(logit_var: torch.Tensor, reference_var: torch.Tensor) -> float:
    return float(np.median(np.log(logit_var.double().numpy() / reference_var.double().numpy())))


def fit_mc_scale(model: PFPModel, x: torch.Tensor, reference_var: torch.Tensor) -> tuple[float, dict]:
    """The scale s whose PFP logit variance on ``x`` has median log-ratio 0 to ``reference_var``,
    and how it was found; a bound of :data:`MC_SCALE_BOUNDS` when the root is outside them."""

    def gap(log_scale: float) -> float:
        return median_log_ratio(predict_pfp(model, x, variance_scale=math.exp(log_scale))[1], reference_var)

    low, high = (math.log(b) for b in MC_SCALE_BOUNDS)
    gap_low, gap_high = gap(low), gap(high)
    if gap_low >= 0 or gap_high <= 0:  # no crossing inside: the closer bound
        return math.exp(low if abs(gap_low) < abs(gap_high) else high), {"bracketed": False}
    log_scale, info = brentq(gap, low, high, xtol=1e-4, full_output=True)
    return math.exp(log_scale), {"bracketed": True, "passes": info.function_calls + 2}


def fit_calibration(model: PFPModel, sets: list[ValidationSet], config: CalibrateConfig, *, seed: int, ece_bins: int = 15,
                    posterior: Posterior | None = None) -> CalibrationResult:
    """Fit the NLL objective and, with ``posterior`` (the BNN ``model`` was converted from), the
    mc_variance objective; the result's scale and temperature are those of ``config.objective``."""
    objective = CalibrationObjective(config.objective)
    if posterior is None and objective is CalibrationObjective.MC_VARIANCE:
        raise ValueError("calibrate.objective mc_variance needs the posterior (the whole-weight Monte-Carlo reference)")
    x = torch.cat([item.x for item in sets])
    noise = None

    def evaluate(logit_mean, logit_var, temperature):
        probs = gaussian_logit_softmax_samples(logit_mean, logit_var, temperature=temperature, noise=noise).mean(0)
        return _pairs(probs, sets)

    def nll_at(logit_mean, logit_var, temperature):
        return metrics.nll(*evaluate(logit_mean, logit_var, temperature))

    def fit_temperature(logit_mean, logit_var) -> tuple[float, float]:
        if not config.fit_temperature:
            return 1.0, nll_at(logit_mean, logit_var, 1.0)
        search = minimize_scalar(lambda log_t: nll_at(logit_mean, logit_var, math.exp(log_t)),
                                 bounds=tuple(math.log(b) for b in TEMPERATURE_BOUNDS), method="bounded",
                                 options={"xatol": 1e-3})
        return math.exp(search.x), float(search.fun)

    grid, best = [], None
    before = None
    for scale in sorted(set(config.variance_scales) | {1.0}):
        logit_mean, logit_var = predict_pfp(model, x, variance_scale=scale)
        if noise is None:
            noise = gaussian_logit_noise(config.logit_samples, tuple(logit_mean.shape), seed)
        if scale == 1.0:
            before = evaluate(logit_mean, logit_var, 1.0)
        temperature, value = fit_temperature(logit_mean, logit_var)
        grid.append({"variance_scale": scale, "temperature": temperature, "nll": value})
        # 1.0 (no rescaling) is always a candidate, so calibration never makes validation NLL worse.
        if best is None or value < best[2]:
            best = (scale, temperature, value, (logit_mean, logit_var))
    scale, temperature, value, (logit_mean, logit_var) = best
    after = evaluate(logit_mean, logit_var, temperature)
    fits = {CalibrationObjective.NLL.value: {"variance_scale": scale, "temperature": temperature, "nll": value,
                                             "ece": metrics.expected_calibration_error(*after, n_bins=ece_bins)}}
    if posterior is not None:
        subset = torch.from_numpy(fidelity_subset(x.shape[0], config.fidelity_images))
        reference = mc_reference(mc_logits(posterior, model.spec, x[subset], samples=config.fidelity_samples, seed=seed),
                                 seed=seed)
        reference_var = torch.from_numpy(reference.var)

        def ratio_at(fitted_scale: float) -> dict[str, float]:
            """The validation median variance ratio at a scale and its Monte-Carlo s.e. (bootstrap over draws)."""
            var = predict_pfp(model, x[subset], variance_scale=fitted_scale)[1].double().numpy()
            boot = np.median((var / reference.boot_var).reshape(reference.boot_var.shape[0], -1), axis=1)
            return {"var_ratio_median": float(np.median(var / reference.var)), "var_ratio_median_se": float(boot.std(ddof=1))}

        fits[CalibrationObjective.NLL.value].update(ratio_at(scale))
        mc_scale, search = fit_mc_scale(model, x[subset], reference_var)
        mc_mean, mc_var = predict_pfp(model, x, variance_scale=mc_scale)
        mc_temperature, mc_nll = fit_temperature(mc_mean, mc_var)
        fits[CalibrationObjective.MC_VARIANCE.value] = {
            "variance_scale": mc_scale, "temperature": mc_temperature, "nll": mc_nll,
            "ece": metrics.expected_calibration_error(*evaluate(mc_mean, mc_var, mc_temperature), n_bins=ece_bins),
            **ratio_at(mc_scale), "images": int(subset.numel()), "samples": config.fidelity_samples, **search}
    chosen = fits[objective.value]
    return CalibrationResult(
        variance_scale=chosen["variance_scale"],
        temperature=chosen["temperature"],
        nll_before=metrics.nll(*before),
        nll_after=chosen["nll"],
        ece_before=metrics.expected_calibration_error(*before, n_bins=ece_bins),
        ece_after=chosen["ece"],
        grid=grid,
        objective=objective.value,
        fits=fits,
    )
