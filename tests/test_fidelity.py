"""The fidelity report: PFP against whole-weight Monte-Carlo of the same posterior.

Two networks whose answer is known: a one-hidden-layer net, where PFP is exact (hidden units
depend on disjoint weights given the input, the ReLU moments are exact for its Gaussian
pre-activations), and a net where K second-layer units share one random input and are summed
with mean weight 1, where the true logit variance is K^2 var(h1) and PFP's (independence
assumed) K var(h1): ratio 1/K.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pfp.bnn import Posterior, site_names
from pfp.convert import convert_posterior
from pfp.fidelity import compare, fidelity_report, format_table, mc_logits, mc_reference, pfp_moments, pfp_options
from pfp.spec import Dense, Flatten, ModelSpec, ReLU


def posterior_of(spec: ModelSpec, loc: dict, scale: dict) -> Posterior:
    return Posterior(spec, {k: torch.as_tensor(v, dtype=torch.float32) for k, v in loc.items()},
                     {k: torch.as_tensor(v, dtype=torch.float32) for k, v in scale.items()})


def one_hidden_layer(weight_std: float, seed: int = 0) -> Posterior:
    spec = ModelSpec("one_hidden", (1, 4, 4), (Flatten(), Dense("fc1", 16, 8), ReLU(), Dense("fc2", 8, 3)))
    g = torch.Generator().manual_seed(seed)
    loc, scale = {}, {}
    for layer in spec.parametric_layers():
        for site, shape in zip(site_names(layer.name), ((layer.out_features, layer.in_features), (layer.out_features,))):
            loc[site] = 0.5 * torch.randn(shape, generator=g)
            scale[site] = torch.full(shape, weight_std)
    return posterior_of(spec, loc, scale)


def shared_input_net(units: int) -> Posterior:
    """x -> h1 = relu(w1 x), w1 ~ N(10, 1) (the ReLU is the identity: Phi(10) = 1) -> ``units``
    copies h2_k = relu(w2_k h1), w2_k ~ N(1, tiny) -> 2 logits z = sum_k w3_k h2_k, w3 ~ N(1, tiny)."""
    tiny = 1e-3
    spec = ModelSpec("shared", (1, 1, 1), (Flatten(), Dense("fc1", 1, 1), ReLU(), Dense("fc2", 1, units), ReLU(),
                                           Dense("fc3", units, 2)))
    loc = {"fc1_weight": [[10.0]], "fc1_bias": [0.0], "fc2_weight": np.ones((units, 1)), "fc2_bias": np.zeros(units),
           "fc3_weight": np.ones((2, units)), "fc3_bias": np.zeros(2)}
    scale = {"fc1_weight": [[1.0]], "fc1_bias": [tiny], "fc2_weight": np.full((units, 1), tiny),
             "fc2_bias": np.full(units, tiny), "fc3_weight": np.full((2, units), tiny), "fc3_bias": np.full(2, tiny)}
    return posterior_of(spec, loc, scale)


def images(spec: ModelSpec, count: int, seed: int = 1) -> torch.Tensor:
    return torch.randn((count, *spec.input_shape), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("weight_std", [0.01, 0.2])
def test_pfp_matches_monte_carlo_where_it_is_exact(weight_std):
    posterior = one_hidden_layer(weight_std)
    model = convert_posterior(posterior)
    x = images(posterior.spec, 10)
    samples = 4000
    report = fidelity_report(posterior, model.spec, {"set": x}, {"pfp": pfp_moments(model)}, samples=samples, seed=0,
                             logit_samples=200)
    row = report.table["pfp"]["set"]
    assert row["var_rel_se_single"] == pytest.approx(math.sqrt(2 / (samples - 1)))
    # the median of 30 ratios, each off by ~2.2 % (one variance's s.e.): within 3 stated s.e. of 1
    assert abs(row["var_ratio_median"] - 1) < 3 * row["var_ratio_median_se"] + 1e-3
    assert 0 < row["var_ratio_median_se"] < row["var_rel_se_single"]
    assert 0.9 < row["var_ratio_p10"] <= row["var_ratio_median"] <= row["var_ratio_p90"] < 1.1
    assert row["mean_error_sd"] < 0.1  # the sampled mean's own error is 1/sqrt(S) = 0.016 sd
    if weight_std == 0.2:  # enough spread for a measurable MI (the small posterior's is ~1e-5 nats)
        assert row["mi_ratio"] == pytest.approx(1, abs=0.1)


@pytest.mark.parametrize("units", [2, 4])
def test_dropped_covariance_of_shared_inputs_shows_as_ratio_one_over_k(units):
    posterior = shared_input_net(units)
    model = convert_posterior(posterior)
    x = 0.5 + torch.rand((6, 1, 1, 1), generator=torch.Generator().manual_seed(0))
    samples = 3000
    report = fidelity_report(posterior, model.spec, {"set": x}, {"pfp": pfp_moments(model)}, samples=samples, seed=3)
    row = report.table["pfp"]["set"]
    expected = 1 / units
    # every logit has ratio 1/K; all share the draws, so the median is off by about one variance's s.e.
    assert row["var_ratio_median"] == pytest.approx(expected, rel=4 * row["var_rel_se_single"])
    assert row["var_ratio_median_se"] == pytest.approx(expected * row["var_rel_se_single"], rel=0.5)
    assert row["var_ratio_p90"] < 1.2 * expected
    assert row["mean_error_sd"] < 0.1  # the means are exact here: only the covariance is dropped
    assert report.ratios["pfp"]["set"].shape == (6 * 2,)


def test_statistics_on_hand_built_logits():
    # 2 classes, draws alternate between [L, 0] and [0, L]: sampled MI = ln 2, the mean is L/2, var L^2/4 * S/(S-1)
    samples, n, big = 400, 5, 30.0
    draws = torch.zeros((samples, n, 2))
    draws[0::2, :, 0] = big
    draws[1::2, :, 1] = big
    reference = mc_reference(draws, seed=0, bootstrap=50)
    mc_var = big**2 / 4 * samples / (samples - 1)
    np.testing.assert_allclose(reference.var, mc_var, rtol=1e-12)
    assert reference.mi.mean() == pytest.approx(math.log(2), abs=1e-9)
    # PFP variances at known ratios to the MC ones: 0.1, 0.2, ..., 1.0; means 2 sd off
    ratios = torch.arange(1, 11, dtype=torch.float64).reshape(n, 2) / 10
    mean = torch.from_numpy(reference.mean) + 2 * math.sqrt(mc_var)
    row, flat = compare(mean, ratios * mc_var, reference, logit_samples=10, seed=0)
    np.testing.assert_allclose(flat, ratios.ravel().numpy(), rtol=1e-12)
    assert row["var_ratio_median"] == pytest.approx(0.55)
    assert row["var_ratio_p90"] == pytest.approx(0.91)  # numpy's linear interpolation: 0.9 + 0.1 * 0.1
    assert row["var_ratio_p10"] == pytest.approx(0.19)
    assert row["mean_error_sd"] == pytest.approx(2.0)
    assert row["mi_mc"] == pytest.approx(math.log(2), abs=1e-9)
    assert row["mi_ratio"] == pytest.approx(row["mi_pfp"] / math.log(2))
    # no spread in PFP: no MI, and the ratio says so
    row, _ = compare(mean, torch.zeros(n, 2), reference, logit_samples=10, seed=0)
    assert row["mi_pfp"] == 0 and row["mi_ratio"] == 0 and row["var_ratio_median"] == 0
    assert "| pfp | set | 0 | 0 |" in format_table({"pfp": {"set": row}})


def test_chunking_does_not_change_the_draws():
    posterior = one_hidden_layer(0.1)
    model = convert_posterior(posterior)
    x = images(posterior.spec, 23)
    whole = mc_logits(posterior, model.spec, x, samples=60, seed=5, draw_chunk=60, image_chunk=100)
    chunked = mc_logits(posterior, model.spec, x, samples=60, seed=5, draw_chunk=7, image_chunk=4)
    torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(mc_logits(posterior, model.spec, x, samples=60, seed=6), whole)
    reports = [fidelity_report(posterior, model.spec, {"set": x}, {"pfp": pfp_moments(model)}, samples=60, seed=5,
                               draw_chunk=d, image_chunk=i).table for d, i in ((60, 100), (7, 4))]
    for key, value in reports[0]["pfp"]["set"].items():
        assert reports[1]["pfp"]["set"][key] == pytest.approx(value, rel=1e-4), key


def test_options_cover_the_calibrated_scales():
    model = convert_posterior(one_hidden_layer(0.1))
    x = images(model.spec, 4)
    assert list(pfp_options(model)) == ["pfp"]
    options = pfp_options(model, scales={"nll": 1.0, "mc_variance": 2.0})
    assert list(options) == ["pfp", "pfp_nll", "pfp_mc_variance"]
    torch.testing.assert_close(options["pfp_nll"](x)[1], options["pfp"](x)[1])
    torch.testing.assert_close(options["pfp_mc_variance"](x)[1], pfp_moments(model, variance_scale=2.0)(x)[1])
    # the logit variance grows with the scale, close to linearly (the ReLU moments are not linear in it)
    ratio = options["pfp_mc_variance"](x)[1] / options["pfp"](x)[1]
    assert 1.5 < float(ratio.min()) and float(ratio.max()) < 2.5


@pytest.mark.parametrize("units", [2, 4])
def test_covariance_aware_option_restores_the_shared_input_variance(units):
    """The covariance-aware PFP (last 2 dense layers) adds the dropped covariance back: ratio ~1, not 1/K."""
    posterior = shared_input_net(units)
    model = convert_posterior(posterior, covariance_layers=2)
    options = pfp_options(model, scales={"mc_variance": 1.5})
    assert list(options) == ["pfp", "pfp_cov", "pfp_cov_mc_variance"]  # calibrated: the model's own PFP only
    # a model converted without it: the option on request, the calibrated scales on plain PFP (its own)
    plain_model = convert_posterior(posterior)
    assert list(pfp_options(plain_model, scales={"nll": 0.5}, covariance_layers=2)) == ["pfp", "pfp_nll", "pfp_cov"]
    x = 0.5 + torch.rand((6, 1, 1, 1), generator=torch.Generator().manual_seed(0))
    report = fidelity_report(posterior, model.spec, {"set": x}, {k: options[k] for k in ("pfp", "pfp_cov")},
                             samples=3000, seed=3)
    plain, covariance = report.table["pfp"]["set"], report.table["pfp_cov"]["set"]
    assert plain["var_ratio_median"] == pytest.approx(1 / units, rel=4 * plain["var_rel_se_single"])
    assert covariance["var_ratio_median"] == pytest.approx(1.0, rel=4 * covariance["var_rel_se_single"])
