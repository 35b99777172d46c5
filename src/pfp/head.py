"""The uncertainty head's draws and its numpy reference (the oracle of the compiled head).

The compiled head (:mod:`pfp.backends.tvm.ops.head`) turns Gaussian logits into probabilities,
mutual information and softmax entropy with ``S`` fixed draws per class: a scrambled Sobol
sequence mapped through the normal quantile, so ``S`` draws cover the Gaussian far more evenly
than ``S`` random ones. :func:`monte_carlo_reference` is the many-draw estimate they approximate.
"""

from __future__ import annotations

import numpy as np
from scipy.special import ndtri
from scipy.stats import qmc

__all__ = ["head_draws", "head_reference", "monte_carlo_reference"]


def head_draws(samples: int, classes: int, *, seed: int = 0) -> np.ndarray:
    """``samples`` quasi-random standard-normal draws per class, (samples, classes) float32."""
    if samples < 2:
        raise ValueError(f"the head needs at least 2 draws, got {samples}")
    points = qmc.Sobol(d=classes, scramble=True, seed=seed).random(samples)
    return ndtri(np.clip(points, 1e-7, 1 - 1e-7)).astype(np.float32)


def head_reference(mean: np.ndarray, var: np.ndarray, draws: np.ndarray, temperature: float) -> dict[str, np.ndarray]:
    """probs (N, C), mi (N,), sme (N,) of Gaussian logits with the given draws (S, C), in float64."""
    mean, var, draws = (np.asarray(a, np.float64) for a in (mean, var, draws))
    logits = (mean[:, None, :] + np.sqrt(np.maximum(var, 0))[:, None, :] * draws[None]) / temperature
    return _summaries(logits)


def monte_carlo_reference(mean: np.ndarray, var: np.ndarray, temperature: float, *, draws: int = 10_000,
                          seed: int = 0, chunk: int = 64) -> dict[str, np.ndarray]:
    """The same summaries from ``draws`` independent random draws per image (the reference the head approximates)."""
    rng = np.random.default_rng(seed)
    mean, var = np.asarray(mean, np.float64), np.asarray(var, np.float64)
    parts = []
    for start in range(0, mean.shape[0], chunk):
        m, v = mean[start:start + chunk], var[start:start + chunk]
        noise = rng.standard_normal((m.shape[0], draws, m.shape[1]))
        parts.append(_summaries((m[:, None, :] + np.sqrt(np.maximum(v, 0))[:, None, :] * noise) / temperature))
    return {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}


def _summaries(logits: np.ndarray) -> dict[str, np.ndarray]:
    """From logits (N, S, C): mean softmax, its entropy (SME) and the mutual information."""
    shifted = logits - logits.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    total = exp.sum(axis=-1, keepdims=True)
    p = exp / total
    probs = p.mean(axis=1)
    entropy_per_draw = np.log(total[..., 0]) - (p * shifted).sum(axis=-1)
    sme = -(probs * np.log(np.maximum(probs, 1e-30))).sum(axis=-1)
    mi = np.maximum(sme - entropy_per_draw.mean(axis=1), 0.0)
    return {"probs": probs, "mi": mi, "sme": sme}
