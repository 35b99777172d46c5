"""Fidelity of PFP to the BNN it approximates: PFP's Gaussian logits against a whole-weight
Monte-Carlo reference of the *same* mean-field posterior (unscaled: the BNN itself).

The reference draws ``samples`` complete weight sets and runs each as an ordinary network on the
converted layer order (``pfp_model.spec``: a max-pool before its ReLU is exact for a deterministic
network). Draw ``d`` depends only on ``(seed, d)``, so the result does not depend on how draws and
images are chunked (the chunks only bound memory).

Per option (a name -> callable ``x -> (logit_mean, logit_var)``) and per set:

- ``var_ratio_p10 / _median / _p90``: quantiles over every (image, class) of PFP var / MC var;
- ``mean_error_sd``: mean over logits of |mu_pfp - mu_mc| / sd_mc;
- ``mi_pfp``, ``mi_mc``, ``mi_ratio``: mean mutual information of PFP (its Gaussian logits, the
  estimator of :mod:`pfp.predictive`, temperature 1) and of the sampled softmaxes, and their ratio;
- the Monte-Carlo error: ``var_ratio_median_se`` and ``mi_ratio_se`` (bootstrap over the draws)
  and ``var_rel_se_single`` = sqrt(2 / (S - 1)), the relative s.e. of one sampled variance.

``python -m pfp.fidelity --model mlp --workspace DIR`` prints the table for a DVC workspace
(:mod:`pfp.fidelity.__main__`, kept apart so the stages importing this module do not import the CLI's loaders).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import torch

from pfp import metrics
from pfp.backends.torch_ref import ensemble_forward
from pfp.backends.weights import sample_stacked_weights
from pfp.bnn import Posterior
from pfp.convert import PFPModel, predict_pfp
from pfp.predictive import gaussian_logit_softmax_samples
from pfp.spec import ModelSpec

__all__ = ["DRAW_CHUNK", "IMAGE_CHUNK", "FidelityReport", "MCReference", "compare", "fidelity_report", "mc_logits",
           "mc_reference", "pfp_moments", "pfp_options"]

#: weight draws and images per ensemble pass: LeNet's first conv output is draws x images x 6 x 28 x 28 floats
#: (50 x 100 -> 94 MB)
DRAW_CHUNK = 50
IMAGE_CHUNK = 100
#: bootstrap resamples of the draws for the Monte-Carlo error of the medians and MI
BOOTSTRAP = 200

#: what an option computes: normalised images (N, ...) -> logit mean and variance, each (N, C)
Moments = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def _draw_generator(seed: int, draw: int) -> torch.Generator:
    # one stream per (seed, draw): the draws are the same whatever the chunking. torch's CPU generator
    # keeps only 32 bits of its seed, so (seed, draw) is hashed into them rather than packed
    return torch.Generator().manual_seed(int(np.random.SeedSequence((int(seed), draw)).generate_state(1)[0]))


def mc_logits(posterior: Posterior, spec: ModelSpec, x: torch.Tensor, *, samples: int, seed: int,
              draw_chunk: int = DRAW_CHUNK, image_chunk: int = IMAGE_CHUNK) -> torch.Tensor:
    """Logits of ``samples`` whole-weight draws of the posterior on ``x``: (S, N, C).

    ``spec`` is the layer order to run (the converted one, ``pfp_model.spec``); its parametric
    layers must be the posterior's.
    """
    if samples < 2:
        raise ValueError(f"samples is {samples}; the Monte-Carlo variance needs at least 2 draws")
    rows = []
    with torch.no_grad():
        for start in range(0, samples, draw_chunk):
            draws = [sample_stacked_weights(posterior, 1, _draw_generator(seed, d))
                     for d in range(start, min(start + draw_chunk, samples))]
            weights = {name: tuple(torch.cat([draw[name][i] for draw in draws]) for i in range(2)) for name in draws[0]}
            rows.append(torch.cat([ensemble_forward(spec, weights, x[i : i + image_chunk])
                                   for i in range(0, x.shape[0], image_chunk)], dim=1))
    return torch.cat(rows)


@dataclass
class MCReference:
    """Moments of the sampled logits and their bootstrap replicates (over the draws)."""

    mean: np.ndarray  # (N, C) float64
    var: np.ndarray  # (N, C), unbiased
    mi: np.ndarray  # (N,) mutual information of the sampled softmaxes
    boot_var: np.ndarray  # (B, N, C)
    boot_mi: np.ndarray  # (B,) mean MI per resample
    samples: int

    @property
    def images(self) -> int:
        return self.mean.shape[0]


def mc_reference(logits: torch.Tensor, *, seed: int, bootstrap: int = BOOTSTRAP) -> MCReference:
    """Moments and MI of sampled logits (S, N, C), with ``bootstrap`` resamples of the draws.

    A resample is a vector of draw counts (multinomial), so every bootstrap moment is one
    matrix product over the draws instead of a copy of the samples.
    """
    z = logits.double().numpy()
    samples, n, c = z.shape
    flat = z.reshape(samples, -1)
    probs = torch.softmax(logits.double(), dim=-1).numpy()
    entropies = metrics.entropy(probs)  # (S, N)
    counts = np.random.default_rng(seed).multinomial(samples, np.full(samples, 1.0 / samples), size=bootstrap) / samples
    m1, m2 = counts @ flat, counts @ flat**2
    boot_var = ((m2 - m1**2) * samples / (samples - 1)).reshape(bootstrap, n, c)
    boot_probs = (counts @ probs.reshape(samples, -1)).reshape(bootstrap, n, c)
    boot_mi = (metrics.entropy(boot_probs) - counts @ entropies).clip(min=0).mean(axis=1)
    return MCReference(mean=z.mean(0), var=z.var(0, ddof=1), mi=metrics.mutual_information(probs), boot_var=boot_var,
                       boot_mi=boot_mi, samples=samples)


def _mi(logit_mean: torch.Tensor, logit_var: torch.Tensor, *, logit_samples: int, seed: int) -> np.ndarray:
    return metrics.mutual_information(gaussian_logit_softmax_samples(logit_mean.float(), logit_var.float(),
                                                                     num_samples=logit_samples, seed=seed))


def compare(logit_mean: torch.Tensor, logit_var: torch.Tensor, reference: MCReference, *, logit_samples: int,
            seed: int) -> tuple[dict[str, float], np.ndarray]:
    """The fidelity statistics of one option on one set (module docstring) and the per-logit ratios (N * C,)."""
    mean, var = logit_mean.double().numpy(), logit_var.double().numpy()
    if mean.shape != reference.mean.shape:
        raise ValueError(f"PFP logits {mean.shape} vs Monte-Carlo {reference.mean.shape}")
    ratio = var / reference.var
    p10, median, p90 = np.quantile(ratio, [0.1, 0.5, 0.9])
    mi_pfp = float(_mi(logit_mean, logit_var, logit_samples=logit_samples, seed=seed).mean())
    mi_mc = float(reference.mi.mean())
    boot_medians = np.median((var / reference.boot_var).reshape(reference.boot_var.shape[0], -1), axis=1)
    return {
        "images": reference.images,
        "samples": reference.samples,
        "var_ratio_p10": float(p10),
        "var_ratio_median": float(median),
        "var_ratio_p90": float(p90),
        "var_ratio_median_se": float(boot_medians.std(ddof=1)),
        "var_rel_se_single": math.sqrt(2.0 / (reference.samples - 1)),
        "mean_error_sd": float(np.mean(np.abs(mean - reference.mean) / np.sqrt(reference.var))),
        "mi_pfp": mi_pfp,
        "mi_mc": mi_mc,
        "mi_ratio": mi_pfp / mi_mc if mi_mc > 0 else float("nan"),
        "mi_ratio_se": float((mi_pfp / reference.boot_mi).std(ddof=1)) if mi_mc > 0 else float("nan"),
    }, ratio.ravel()


@dataclass
class FidelityReport:
    table: dict[str, dict[str, dict[str, float]]]  # option -> set -> statistics
    ratios: dict[str, dict[str, np.ndarray]]  # option -> set -> per-logit variance ratio PFP / MC


def fidelity_report(posterior: Posterior, spec: ModelSpec, inputs: Mapping[str, torch.Tensor],
                    options: Mapping[str, Moments], *, samples: int, seed: int, logit_samples: int = 100,
                    draw_chunk: int = DRAW_CHUNK, image_chunk: int = IMAGE_CHUNK,
                    bootstrap: int = BOOTSTRAP) -> FidelityReport:
    """Every option against the Monte-Carlo reference (``samples`` draws, ``seed``) on every set of ``inputs``."""
    table: dict[str, dict[str, dict[str, float]]] = {name: {} for name in options}
    ratios: dict[str, dict[str, np.ndarray]] = {name: {} for name in options}
    for set_name, x in inputs.items():
        reference = mc_reference(mc_logits(posterior, spec, x, samples=samples, seed=seed, draw_chunk=draw_chunk,
                                           image_chunk=image_chunk), seed=seed, bootstrap=bootstrap)
        for name, moments in options.items():
            with torch.no_grad():
                logit_mean, logit_var = moments(x)
            table[name][set_name], ratios[name][set_name] = compare(logit_mean, logit_var, reference,
                                                                    logit_samples=logit_samples, seed=seed)
    return FidelityReport(table, ratios)


def pfp_moments(pfp_model: PFPModel, *, variance_scale: float = 1.0, covariance_layers: int = 0) -> Moments:
    """The option ``x -> predict_pfp(pfp_model, x, ...)`` (``covariance_layers`` 0: plain PFP)."""
    extra = {"covariance_layers": covariance_layers} if hasattr(pfp_model, "covariance_layers") else {}
    if covariance_layers and not extra:
        raise ValueError("this PFP model has no covariance-aware variant")
    return lambda x: predict_pfp(pfp_model, x, variance_scale=variance_scale, **extra)


def pfp_options(pfp_model: PFPModel, *, scales: Mapping[str, float] | None = None,
                covariance_layers: int | None = None) -> dict[str, Moments]:
    """The options the evaluate stage reports, at variance scale 1 (the BNN itself): plain PFP
    (``pfp``) and the covariance-aware PFP (``pfp_cov``; ``covariance_layers``, None: the model's
    own setting; none if 0). The model's own PFP (``pfp_cov`` if it carries covariance, else
    ``pfp``: the one its calibration was fitted on) also at every scale of ``scales`` (label ->
    scale, e.g. each calibration objective's fit), as ``NAME_LABEL`` (``pfp_cov_mc_variance``)."""
    own = getattr(pfp_model, "covariance_layers", 0)
    covariance = own if covariance_layers is None else covariance_layers
    variants = {"pfp": 0, **({"pfp_cov": covariance} if covariance else {})}
    own_name = "pfp_cov" if own else "pfp"
    options = {}
    for name, layers in variants.items():
        options[name] = pfp_moments(pfp_model, covariance_layers=layers)
        if name == own_name:
            for label, scale in (scales or {}).items():
                options[f"{name}_{label}"] = pfp_moments(pfp_model, variance_scale=scale, covariance_layers=layers)
    return options


COLUMNS = ("var_ratio_p10", "var_ratio_median", "var_ratio_median_se", "var_ratio_p90", "mean_error_sd", "mi_pfp",
           "mi_mc", "mi_ratio", "mi_ratio_se")


def format_table(table: Mapping[str, Mapping[str, Mapping[str, float]]]) -> str:
    """A Markdown table, one row per option and set."""
    lines = ["| option | set | " + " | ".join(COLUMNS) + " |", "|---|---|" + "---:|" * len(COLUMNS)]
    for option, per_set in table.items():
        for set_name, row in per_set.items():
            lines.append(f"| {option} | {set_name} | " + " | ".join(f"{row[c]:.4g}" for c in COLUMNS) + " |")
    return "\n".join(lines)
