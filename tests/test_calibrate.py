"""Post-hoc calibration: variance-scale grid + temperature, by validation NLL."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pfp.bnn import Posterior, site_names
from pfp.calibrate import TEMPERATURE_BOUNDS, CalibrationResult, ValidationSet, fit_calibration
from pfp.config import CalibrateConfig
from pfp.convert import PFPModel, convert_posterior, predict_pfp
from pfp.data.dirty_mnist import normalise
from pfp.data.idx import load_split
from pfp.fidelity import compare, mc_logits, mc_reference
from pfp.predictive import gaussian_logit_softmax_samples
from pfp.spec import build_spec

LOGIT_SAMPLES = 50


def overdispersed_model() -> PFPModel:
    """MLP with fan-in scaled means and posterior stds as large as the means' spread:
    the PFP predictive is much too flat for labels produced by the mean network."""
    return convert_posterior(fan_in_posterior(lambda z: 2.0 * z, 1.0))


def fan_in_posterior(mean_of, std: float) -> Posterior:
    """MLP posterior with means ``mean_of(N(0, 1)) / sqrt(fan_in)`` and stds ``std / sqrt(fan_in)`` (seeded)."""
    spec = build_spec("mlp")
    g = torch.Generator().manual_seed(0)
    loc, scale = {}, {}
    for layer in spec.parametric_layers():
        fan_in = int(np.prod(layer.weight_shape[1:]))
        for site, shape in zip(site_names(layer.name), (layer.weight_shape, layer.bias_shape)):
            loc[site] = mean_of(torch.randn(shape, generator=g)) / math.sqrt(fan_in)
            scale[site] = torch.full(shape, std / math.sqrt(fan_in))
    return Posterior(spec, loc, scale)


@pytest.fixture(scope="module")
def setup():
    model = overdispersed_model()
    images, _ = load_split("data/embedded/mnist", "t10k")
    x = normalise(images[:60])
    truth = predict_pfp(model, x, variance_scale=0.0)[0].argmax(1).numpy()  # the mean network's labels
    single = ValidationSet(x[:40], truth[:40])
    multi = ValidationSet(x[40:], np.stack([truth[40:]] * 2 + [(truth[40:] + 1) % 10], axis=1))  # (20, 3)
    return model, single, multi


def expected_nll(model, sets, scale, temperature, seed):
    """Independent recomputation: one PFP pass over all sets, K logit draws, then NLL over
    every (image, label) pair (an (N, L) set contributes L pairs per image)."""
    x = torch.cat([item.x for item in sets])
    mean, var = predict_pfp(model, x, variance_scale=scale)
    p = gaussian_logit_softmax_samples(mean, var, num_samples=LOGIT_SAMPLES, temperature=temperature, seed=seed).mean(0)
    probs, labels, start = [], [], 0
    for item in sets:
        rows = p[start : start + item.x.shape[0]]
        start += item.x.shape[0]
        y = np.asarray(item.labels)
        probs.append(rows if y.ndim == 1 else np.repeat(rows, y.shape[1], axis=0))
        labels.append(y.reshape(-1))
    probs, labels = np.concatenate(probs), np.concatenate(labels)
    assert probs.shape[0] == sum(np.asarray(item.labels).size for item in sets)
    return float(-np.mean(np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-12, None))))


def test_fit_picks_the_grid_minimum_and_improves_nll(setup):
    model, single, _ = setup
    config = CalibrateConfig(variance_scales=[0.01, 0.1, 0.5, 1.0, 2.0], logit_samples=LOGIT_SAMPLES)
    result = fit_calibration(model, [single], config, seed=0)
    assert isinstance(result, CalibrationResult)
    assert [row["variance_scale"] for row in result.grid] == [0.01, 0.1, 0.5, 1.0, 2.0]
    best = min(result.grid, key=lambda row: row["nll"])
    assert result.variance_scale == best["variance_scale"]
    assert result.temperature == best["temperature"]
    assert result.nll_after == pytest.approx(best["nll"], rel=1e-9)
    # too-large variances: the smallest scale wins and NLL drops a lot
    assert result.variance_scale == 0.01
    assert result.nll_after <= result.nll_before
    assert result.nll_after < 0.5 * result.nll_before
    # the grid's NLL grows with the variance for these labels
    nlls = [row["nll"] for row in result.grid]
    assert nlls == sorted(nlls)
    lo, hi = TEMPERATURE_BOUNDS
    for row in result.grid:
        assert lo - 1e-9 <= row["temperature"] <= hi + 1e-9
    assert 0.0 <= result.ece_after <= 1.0 and 0.0 <= result.ece_before <= 1.0
    assert result.ece_after < result.ece_before
    # nll_before is the uncalibrated PFP: scale 1, temperature 1
    assert result.nll_before == pytest.approx(expected_nll(model, [single], 1.0, 1.0, seed=0), rel=1e-6)
    # the recorded NLL at the chosen point is reproducible independently
    assert result.nll_after == pytest.approx(expected_nll(model, [single], result.variance_scale, result.temperature, seed=0), rel=1e-6)
    assert set(result.to_dict()) == {"variance_scale", "temperature", "nll_before", "nll_after", "ece_before", "ece_after", "grid",
                                     "objective", "fits"}
    assert result.objective == "nll" and set(result.fits) == {"nll"}  # no posterior: the NLL fit only


def test_fit_temperature_false_keeps_t1(setup):
    model, single, _ = setup
    config = CalibrateConfig(variance_scales=[0.5, 0.05], fit_temperature=False, logit_samples=LOGIT_SAMPLES)
    result = fit_calibration(model, [single], config, seed=1)
    assert result.temperature == 1.0
    assert all(row["temperature"] == 1.0 for row in result.grid)
    # 1.0 is always evaluated (it gives nll_before) and is always a candidate
    assert [row["variance_scale"] for row in result.grid] == [0.05, 0.5, 1.0]
    assert result.variance_scale == 0.05
    for row in result.grid:
        assert row["nll"] == pytest.approx(expected_nll(model, [single], row["variance_scale"], 1.0, seed=1), rel=1e-6)
    assert result.nll_after < result.nll_before


def test_calibration_never_worsens_nll(setup):
    model, single, _ = setup
    config = CalibrateConfig(variance_scales=[2.0, 3.0], fit_temperature=False, logit_samples=LOGIT_SAMPLES)
    result = fit_calibration(model, [single], config, seed=0)
    grid = {row["variance_scale"]: row["nll"] for row in result.grid}
    assert set(grid) == {1.0, 2.0, 3.0}
    assert grid[1.0] < grid[2.0] < grid[3.0]  # the unscaled model beats every offered scale
    assert result.variance_scale == 1.0
    assert result.nll_before == pytest.approx(grid[1.0])
    assert result.nll_after == pytest.approx(result.nll_before)


def test_multi_label_validation_set(setup):
    model, single, multi = setup
    config = CalibrateConfig(variance_scales=[0.1, 1.0], fit_temperature=False, logit_samples=LOGIT_SAMPLES)
    result = fit_calibration(model, [single, multi], config, seed=0)
    # every (image, label) pair counts: 40 single + 20 x 3 multi
    for row in result.grid:
        assert row["nll"] == pytest.approx(expected_nll(model, [single, multi], row["variance_scale"], 1.0, seed=0), rel=1e-6)
    # the wrong third label of each multi-label image makes it harder than the single set alone
    alone = fit_calibration(model, [single], config, seed=0)
    assert result.nll_after > alone.nll_after
    assert result.variance_scale in (0.1, 1.0)


def test_fitted_temperature_beats_t1_at_same_scale(setup):
    model, _, multi = setup
    fitted = fit_calibration(model, [multi], CalibrateConfig(variance_scales=[1.0], logit_samples=LOGIT_SAMPLES), seed=0)
    fixed = fit_calibration(model, [multi], CalibrateConfig(variance_scales=[1.0], fit_temperature=False, logit_samples=LOGIT_SAMPLES), seed=0)
    assert fitted.variance_scale == fixed.variance_scale == 1.0
    assert fitted.nll_before == pytest.approx(fixed.nll_before)
    assert fitted.nll_after <= fixed.nll_after + 1e-9
    assert fitted.temperature != 1.0
    assert TEMPERATURE_BOUNDS[0] <= fitted.temperature <= TEMPERATURE_BOUNDS[1]


def coherent_posterior() -> Posterior:
    """MLP whose mean weights share a positive part ((N(0, 1) + 1) / sqrt(fan_in), std 0.3 / sqrt(fan_in)):
    units of a layer co-vary through their shared inputs, and plain PFP, dropping that covariance,
    has about 0.85x the Monte-Carlo logit variance (random-sign means cancel it: ~0.98x)."""
    return fan_in_posterior(lambda z: z + 0.5, 0.3)


def test_mc_variance_matches_the_monte_carlo_variance_on_validation():
    """On a real-spec (MLP) posterior: the mc_variance scale makes PFP's validation logit variance match
    whole-weight Monte-Carlo, checked against an independent reference (other draws, more images)."""
    posterior = coherent_posterior()
    model = convert_posterior(posterior)
    images, labels = load_split("data/embedded/mnist", "t10k")
    sets = [ValidationSet(normalise(images[:40]), labels[:40].astype(np.int64))]
    config = CalibrateConfig(objective="mc_variance", variance_scales=[0.5, 2.0], logit_samples=LOGIT_SAMPLES,
                             fidelity_samples=400, fidelity_images=30)
    result = fit_calibration(model, sets, config, seed=0, posterior=posterior)
    assert result.objective == "mc_variance" and set(result.fits) == {"nll", "mc_variance"}
    fit = result.fits["mc_variance"]
    assert (result.variance_scale, result.temperature) == (fit["variance_scale"], fit["temperature"])
    assert (result.nll_after, result.ece_after) == (fit["nll"], fit["ece"])
    assert fit["bracketed"] and fit["images"] == 30 and fit["samples"] == 400
    assert fit["var_ratio_median"] == pytest.approx(1.0, abs=1e-3)  # the root, on its own reference
    # plain PFP drops the covariance of shared inputs: it needs more than the posterior's variance
    assert 1.08 < fit["variance_scale"] < 1.5
    # independent check: 1000 fresh draws on all 40 images, within 4 s.e. (both references' Monte-Carlo errors)
    x = sets[0].x
    check = mc_reference(mc_logits(posterior, model.spec, x, samples=1000, seed=11), seed=1)
    pfp_var = predict_pfp(model, x, variance_scale=fit["variance_scale"])[1]
    row, _ = compare(predict_pfp(model, x)[0], pfp_var, check, logit_samples=4, seed=0)
    assert 0 < fit["var_ratio_median_se"] < 0.1
    assert row["var_ratio_median"] == pytest.approx(1.0, abs=4 * math.hypot(fit["var_ratio_median_se"],
                                                                             row["var_ratio_median_se"]))
    unscaled, _ = compare(*predict_pfp(model, x), check, logit_samples=4, seed=0)
    assert unscaled["var_ratio_median"] < 0.92  # so the check above is not vacuous
    # the NLL fit is recorded beside it, with the same validation metrics
    assert result.fits["nll"]["variance_scale"] in (0.5, 1.0, 2.0)
    # temperature: still fitted by NLL at the mc_variance scale
    assert TEMPERATURE_BOUNDS[0] <= fit["temperature"] <= TEMPERATURE_BOUNDS[1]


def test_mc_variance_needs_the_posterior(setup):
    model, single, _ = setup
    with pytest.raises(ValueError, match="calibrate.objective mc_variance needs the posterior"):
        fit_calibration(model, [single], CalibrateConfig(objective="mc_variance"), seed=0)
