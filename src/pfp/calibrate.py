"""Post-hoc calibration of the PFP on Dirty-MNIST validation data (never on OOD data).

Two knobs, fitted by validation NLL of the predictive E[softmax(z)]:

- ``variance_scale`` multiplies every weight variance before the forward pass (a
  grid search: each value needs one PFP pass);
- ``temperature`` divides the Gaussian logits (a bounded 1-D search per grid value; it
  costs no network pass).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from scipy.optimize import minimize_scalar

from pfp import metrics
from pfp.config import CalibrateConfig
from pfp.convert import PFPModel, predict_pfp
from pfp.predictive import gaussian_logit_noise, gaussian_logit_softmax_samples

TEMPERATURE_BOUNDS = (0.2, 5.0)


@dataclass
class CalibrationResult:
    variance_scale: float
    temperature: float
    nll_before: float
    nll_after: float
    ece_before: float
    ece_after: float
    grid: list[dict[str, float]] = field(default_factory=list)

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


def fit_calibration(model: PFPModel, sets: list[ValidationSet], config: CalibrateConfig, *, seed: int, ece_bins: int = 15) -> CalibrationResult:
    x = torch.cat([item.x for item in sets])
    noise = None

    def evaluate(logit_mean, logit_var, temperature):
        probs = gaussian_logit_softmax_samples(logit_mean, logit_var, temperature=temperature, noise=noise).mean(0)
        return _pairs(probs, sets)

    def nll_at(logit_mean, logit_var, temperature):
        return metrics.nll(*evaluate(logit_mean, logit_var, temperature))

    grid, best = [], None
    before = None
    for scale in sorted(set(config.variance_scales) | {1.0}):
        logit_mean, logit_var = predict_pfp(model, x, variance_scale=scale)
        if noise is None:
            noise = gaussian_logit_noise(config.logit_samples, tuple(logit_mean.shape), seed)
        if scale == 1.0:
            before = evaluate(logit_mean, logit_var, 1.0)
        if config.fit_temperature:
            search = minimize_scalar(lambda log_t, m=logit_mean, v=logit_var: nll_at(m, v, math.exp(log_t)),
                                     bounds=tuple(math.log(b) for b in TEMPERATURE_BOUNDS), method="bounded",
                                     options={"xatol": 1e-3})
            temperature, value = math.exp(search.x), float(search.fun)
        else:
            temperature, value = 1.0, nll_at(logit_mean, logit_var, 1.0)
        grid.append({"variance_scale": scale, "temperature": temperature, "nll": value})
        # 1.0 (no rescaling) is always a candidate, so calibration never makes validation NLL worse.
        if best is None or value < best[2]:
            best = (scale, temperature, value, (logit_mean, logit_var))
    scale, temperature, value, (logit_mean, logit_var) = best
    after = evaluate(logit_mean, logit_var, temperature)
    return CalibrationResult(
        variance_scale=scale,
        temperature=temperature,
        nll_before=metrics.nll(*before),
        nll_after=metrics.nll(*after),
        ece_before=metrics.expected_calibration_error(*before, n_bins=ece_bins),
        ece_after=metrics.expected_calibration_error(*after, n_bins=ece_bins),
        grid=grid,
    )
