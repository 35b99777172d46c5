"""Numerical robustness of the PyTorch reference's Gaussian operators over extreme inputs (issue 22).

Hypothesis draws inputs over the ranges a network can hand an operator -- variances 0, subnormal,
1e-30 .. 1e6, |means| up to 1e4, all-zero tensors -- and every float32 result must be finite, every
variance >= 0, and each result must agree with an independent float64 reference: the textbook
formulas of ``docs/pfp-notes.md`` in 50-digit arithmetic (mpmath) for ReLU and Clark's max, and the
textbook ``E[x^2] E[w^2] - mu_x^2 mu_w^2`` in float64 for the linear layers (the operators use other,
cancellation-free forms, so the two share no code). A few fixed points are checked against
Monte-Carlo sampling. The references here also serve the TVM and whole-network modules.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from pfp.backends import torch_ref as ref
from pfp.backends.covariance import covariance_block
from pfp.head import head_draws, head_reference
from pfp.spec import Dense, Flatten, ModelSpec, ReLU
from tests.reliability.numerics import (
    COUNTS,
    EPS_MEAN,
    F32,
    MC_SAMPLES,
    SETTINGS,
    _f64,
    _mc_check,
    _t,
    assert_moments,
    conv_reference,
    dense_reference,
    gaussian_arrays,
    layer_params,
    linear_tolerances,
    maxpool_reference,
    means,
    pool_tolerances,
    relu_reference,
    walk64,
)
from tests.reliability.report import record

# --------------------------------------------------------------------------- ReLU

@SETTINGS
@given(gaussian_arrays((2, 3, 4)))
def _relu_examples(pair):
    mean, var = pair
    got = ref.relu(_t(mean), _t(var))
    expected = relu_reference(mean, var)
    std = np.sqrt(np.maximum(_f64(var), 0))
    assert_moments("relu", *got, *expected, mean_atol=1e-6 * std + EPS_MEAN + 1e-38,
                   var_atol=1e-6 * np.maximum(_f64(var), 0) + 1e-38)
    COUNTS["relu_gaussian (torch)"] += 1


def test_relu_gaussian_extremes():
    _relu_examples()
    record("property", "relu_gaussian (torch)", tried=COUNTS["relu_gaussian (torch)"],
           survived=COUNTS["relu_gaussian (torch)"])


# --------------------------------------------------------------------------- max-pool, three rules

@pytest.mark.parametrize("rule", ["clark", "clark_logistic", "argmax_mean"])
def test_maxpool_extremes(rule):
    row = f"maxpool2x2 {rule} (torch)"

    @SETTINGS
    @given(gaussian_arrays((1, 2, 4, 4)))
    def examples(pair):
        mean, var = pair
        got = ref.maxpool2x2(_t(mean), _t(var), rule)
        expected = maxpool_reference(mean, var, rule)
        assert_moments(f"maxpool {rule}", *got, *expected, *pool_tolerances(mean, var, rule),
                       rtol=0 if rule == "argmax_mean" else 2e-5)
        COUNTS[row] += 1

    COUNTS[row] = 0
    examples()
    record("property", row, tried=COUNTS[row], survived=COUNTS[row])


def test_logistic_pool_worst_window_is_within_the_bound_over_any_window():
    """Probe: the documented LOGISTIC_POOL_MEAN_ERROR (3.5e-3 s, measured on random windows) was exceeded
    (hypothesis found 7.1e-3 s; optimisation 1.36e-2 s): two near-deterministic elements tie and two lie
    far below with large variances. Fixed by stating the bound over all windows, LOGISTIC_POOL_MEAN_ERROR_ANY."""
    mean = torch.tensor([[[[-3.7110, 1.7899], [-1.7810, 1.7902]]]], dtype=torch.float64)
    var = torch.tensor([[[[4.4023, 1.8e-3], [2.0356, 1e-4]]]], dtype=torch.float64)
    exact_mean, exact_var = ref.maxpool2x2(mean, var, "clark")
    mean_l, var_l = ref.maxpool2x2(mean, var, "clark_logistic")
    s = float(var.sum().sqrt())
    error = float((mean_l - exact_mean).abs()) / s
    assert ref.LOGISTIC_POOL_MEAN_ERROR < error <= ref.LOGISTIC_POOL_MEAN_ERROR_ANY, error
    assert float((var_l - exact_var).abs()) <= ref.LOGISTIC_POOL_VAR_ERROR * s**2
    # and the hypothesis example that found it (three deterministic zeros), in float32
    mean32 = np.zeros(POOL_PROBE, F32)
    var32 = np.zeros(POOL_PROBE, F32)
    mean32[0, 0, 2, 0], var32[0, 0, 2, 0] = -4.0, 2.0
    got = ref.maxpool2x2(_t(mean32), _t(var32), "clark_logistic")
    assert_moments("logistic pool probe", *got, *maxpool_reference(mean32, var32, "clark_logistic"),
                   *pool_tolerances(mean32, var32, "clark_logistic"))
    record("probe", "logistic max-pool mean error bound understated ~4x (tied near-deterministic elements)",
           tried=1, survived=1)


POOL_PROBE = (1, 2, 4, 4)


# --------------------------------------------------------------------------- linear layers

@st.composite
def dense_case(draw):
    batch, fan_in, fan_out = 2, draw(st.integers(1, 8)), draw(st.integers(1, 5))
    return draw(gaussian_arrays((batch, fan_in))), draw(layer_params((fan_out, fan_in)))


@SETTINGS
@given(dense_case(), st.booleans())
def _dense_examples(case, first):
    (mean, var), p = case
    if first:  # a deterministic input: the first layer
        got, expected = ref.dense_first(_t(mean), p), dense_reference(mean, None, p)
        tolerance = linear_tolerances(mean, None, p)
    else:
        got, expected = ref.dense(_t(mean), _t(var), p), dense_reference(mean, var, p)
        tolerance = linear_tolerances(mean, var, p)
    assert_moments("dense_first" if first else "dense", *got, *expected, *tolerance)
    COUNTS["dense mean+variance (torch)"] += 1


def test_dense_extremes():
    _dense_examples()
    record("property", "dense mean+variance (torch)", tried=COUNTS["dense mean+variance (torch)"],
           survived=COUNTS["dense mean+variance (torch)"])


@st.composite
def conv_case(draw):
    channels, out_channels, kernel = draw(st.integers(1, 2)), draw(st.integers(1, 3)), draw(st.sampled_from([1, 3]))
    return (draw(gaussian_arrays((1, channels, 4, 4))), draw(layer_params((out_channels, channels, kernel, kernel))),
            draw(st.integers(0, kernel // 2)))


@SETTINGS
@given(conv_case(), st.booleans())
def _conv_examples(case, first):
    (mean, var), p, padding = case
    if first:
        got, expected = ref.conv2d_first(_t(mean), p, 1, padding), conv_reference(mean, None, p, padding)
        tolerance = linear_tolerances(mean, None, p, padding)
    else:
        got, expected = ref.conv2d(_t(mean), _t(var), p, 1, padding), conv_reference(mean, var, p, padding)
        tolerance = linear_tolerances(mean, var, p, padding)
    assert_moments("conv2d_first" if first else "conv2d", *got, *expected, *tolerance)
    COUNTS["conv2d mean+variance (torch)"] += 1


def test_conv2d_extremes():
    _conv_examples()
    record("property", "conv2d mean+variance (torch)", tried=COUNTS["conv2d mean+variance (torch)"],
           survived=COUNTS["conv2d mean+variance (torch)"])


# --------------------------------------------------------------------------- the covariance correction

TAIL = ModelSpec("tail", (1, 1, 6), (Flatten(), Dense("fc1", 6, 5), ReLU(), Dense("fc2", 5, 4), ReLU(),
                                     Dense("fc3", 4, 3)))


def covariance_reference(spec: ModelSpec, params: dict, x, layers: int) -> np.ndarray:
    """Logit variance of the covariance-aware PFP from full covariance matrices in float64.

    PFP's variance (float64 walk) + diag(C_exact) - diag(C_indep): both matrices propagate the block
    linearised at PFP's means (ReLU slope Phi(mu/sigma)), every dense layer adding its weight noise
    sigma_w^2 (mu^2 + v) + sigma_b^2; C_exact keeps every covariance, C_indep only the diagonal.
    Independent of :func:`pfp.backends.torch_ref.covariance_correction` (which never forms a matrix).
    """
    pfp_mean, pfp_var = walk64(spec, params, x, 0)
    block = covariance_block(spec, layers)
    records, state, batch = [], (np.asarray(x, np.float64).reshape(len(x), -1), None), len(x)
    for index, layer in enumerate(spec.layers):  # the plain float64 walk again, keeping the block's inputs
        mean, var = state
        if index >= block.start and layer.kind in ("dense", "relu"):
            records.append((layer, mean, var))
        if layer.kind == "dense":
            p = params[layer.name]
            state = dense_reference(mean, var, p)
        elif layer.kind == "relu":
            state = relu_reference(mean, var) if var is not None else (np.maximum(mean, 0), None)
    corrected = pfp_var.copy()
    for b in range(batch):
        first_var = records[0][2]
        exact = np.diag(np.zeros(records[0][1].shape[1]) if first_var is None else np.maximum(first_var[b], 0))
        indep = exact.copy()
        for layer, mean, var in records:
            if layer.kind == "dense":
                p = params[layer.name]
                wm, wv, bv = _f64(p.weight_mean), _f64(p.weight_var), _f64(p.bias_var)
                v = np.zeros_like(mean[b]) if var is None else np.maximum(var[b], 0)
                noise = np.diag(wv @ (mean[b] ** 2 + v) + bv)
                exact, indep = wm @ exact @ wm.T + noise, np.diag(np.diag(wm @ indep @ wm.T)) + noise
            else:
                std = np.sqrt(np.maximum(var[b], ref.RELU_VAR_EPS))
                slope = np.where(var[b] <= ref.RELU_VAR_EPS, (mean[b] > 0).astype(float),
                                 _normal_cdf(np.clip(mean[b] / std, -40, 40)))
                exact, indep = exact * np.outer(slope, slope), indep * np.outer(slope, slope)
        corrected[b] = corrected[b] + np.diag(exact) - np.diag(indep)
    return np.maximum(corrected, 0)


def envelopes(spec: ModelSpec, params: dict, x) -> tuple[np.ndarray, np.ndarray]:
    """Upper envelopes of what float32 rounding can reach the logits with, float64:

    * mean: the network of absolute values (|x|, |W|, |b|, ReLU the identity) -- a sum of terms ~1e4 that
      cancel to ~1e-4 is only accurate to ~1e-7 of the terms;
    * variance: the network with every ReLU passing its input variance on unchanged.
    """
    magnitude = np.abs(np.asarray(x, np.float64).reshape(len(x), -1))
    mean, var = np.asarray(x, np.float64).reshape(len(x), -1), None
    for layer in spec.layers:
        if layer.kind == "dense":
            p = params[layer.name]
            magnitude = magnitude @ np.abs(_f64(p.weight_mean)).T + np.abs(_f64(p.bias_mean))
            mean, var = dense_reference(mean, var, p)
        elif layer.kind == "relu":
            mean = relu_reference(mean, var)[0] if var is not None else np.maximum(mean, 0)
    return magnitude, var


def _normal_cdf(a):
    from scipy.special import ndtr

    return ndtr(a)


@st.composite
def tail_case(draw):
    params = {layer.name: draw(layer_params(layer.weight_shape)) for layer in TAIL.parametric_layers()}
    x = draw(hnp.arrays(F32, (2, 1, 1, 6), elements=means))
    if draw(st.booleans()):
        x = np.zeros_like(x) if draw(st.booleans()) else x
    return params, x, draw(st.sampled_from([2, 3]))


def _cancelling_tail_case():
    """Found by hypothesis: the input's 1e4 and -1e4 cancel to 4.8e-4 in the first layer (float32 keeps ~1e-3)."""
    params = {layer.name: ref.GaussianLayerParams.from_mean_var(torch.ones(layer.weight_shape), torch.zeros(layer.weight_shape),
                                                                torch.zeros(layer.bias_shape), torch.zeros(layer.bias_shape))
              for layer in TAIL.parametric_layers()}
    x = np.array([0, 0, 0, 1e4, -1e4, 4.8e-4], F32).reshape(1, 1, 1, 6).repeat(2, 0)
    return params, x, 2


@SETTINGS
@given(tail_case())
@example(_cancelling_tail_case())
def _covariance_examples(case):
    params, x, layers = case
    with torch.no_grad():
        mean, var = ref.pfp_forward(TAIL, params, _t(x), covariance_layers=layers)
        plain_var = ref.pfp_forward(TAIL, params, _t(x))[1]
    expected_mean, _ = walk64(TAIL, params, x)
    expected_var = covariance_reference(TAIL, params, x, layers)
    # the correction adds and subtracts terms as large as the linearised block's variance: its float32
    # error is ~1e-6 of the largest of them, not of the (possibly much smaller) corrected variance; and a
    # ReLU far in its negative tail keeps only ~1e-6 of its *input* variance exactly (relu test), which the
    # envelope (every ReLU passing its input variance on) bounds
    mean_envelope, var_envelope = envelopes(TAIL, params, x)
    scale = np.maximum(np.abs(expected_var), _f64(plain_var)) + _f64(var.abs()) + var_envelope
    magnitude = mean_envelope.max(-1, keepdims=True) + 1e-30
    assert_moments(f"covariance correction k={layers}", mean, var, expected_mean, expected_var,
                   mean_atol=1e-5 * magnitude, var_atol=1e-4 * scale.max(-1, keepdims=True) + 1e-30, rtol=1e-4)
    COUNTS["covariance correction (torch)"] += 1


def test_covariance_correction_extremes():
    _covariance_examples()
    record("property", "covariance correction (torch)", tried=COUNTS["covariance correction (torch)"],
           survived=COUNTS["covariance correction (torch)"])


# --------------------------------------------------------------------------- the uncertainty head (float64 oracle)

@SETTINGS
@given(gaussian_arrays((3, 10)), st.sampled_from([0.5, 1.0, 3.0]))
def _head_examples(pair, temperature):
    mean, var = pair
    out = head_reference(mean, var, head_draws(16, 10), temperature)
    assert all(np.all(np.isfinite(value)) for value in out.values())
    np.testing.assert_allclose(out["probs"].sum(-1), 1.0, rtol=1e-12)
    assert np.all(out["probs"] >= 0)
    assert np.all(out["mi"] >= 0) and np.all(out["mi"] <= out["sme"] + 1e-12)
    assert np.all(out["sme"] <= math.log(10) + 1e-12)
    COUNTS["uncertainty head (numpy float64 oracle)"] += 1


def test_head_reference_extremes():
    _head_examples()
    row = "uncertainty head (numpy float64 oracle)"
    record("property", row, tried=COUNTS[row], survived=COUNTS[row])


def test_monte_carlo_at_fixed_points():
    rng = np.random.default_rng(0)
    mean = np.array([0.0, 1e4, -3.0, 2.5, 1e-3], F32)
    var = np.array([1.0, 1e6, 1.0, 1e-6, 1e-6], F32)
    x = mean + np.sqrt(var.astype(np.float64)) * rng.standard_normal((MC_SAMPLES, 5))
    _mc_check("relu", *ref.relu(_t(mean), _t(var)), np.maximum(x, 0))
    # Clark's max of two independent Gaussians is exact in its first two moments
    m2, v2 = np.array([0.0, 1e4 + 500, -2.0, 2.5, -1e-3], F32), np.array([4.0, 1e6, 0.0, 1e-6, 0.0], F32)
    y = m2 + np.sqrt(v2.astype(np.float64)) * rng.standard_normal((MC_SAMPLES, 5))
    _mc_check("clark max", *ref.max2(_t(mean), _t(var), _t(m2), _t(v2)), np.maximum(x, y))
    # a dense layer on Gaussian inputs with Gaussian weights: exact in its first two moments
    p = ref.GaussianLayerParams.from_mean_var(torch.tensor([[0.5, -1.0, 2.0, 0.1, 1.0]]), torch.tensor([[0.01, 0.2, 0.0, 1.0, 0.5]]),
                                              torch.tensor([0.3]), torch.tensor([0.04]))
    w = _f64(p.weight_mean)[0] + np.sqrt(_f64(p.weight_var)[0]) * rng.standard_normal((MC_SAMPLES, 5))
    bias = 0.3 + 0.2 * rng.standard_normal(MC_SAMPLES)
    small = np.array([[1.0, -2.0, 0.5, 3.0, 0.0]], F32), np.array([[0.5, 1.0, 0.0, 2.0, 1e-6]], F32)
    xs = small[0] + np.sqrt(small[1].astype(np.float64)) * rng.standard_normal((MC_SAMPLES, 5))
    _mc_check("dense", *ref.dense(_t(small[0]), _t(small[1]), p), ((xs * w).sum(-1) + bias)[:, None])
    record("property", "Monte-Carlo fixed points: relu, clark max, dense (torch)", tried=15, survived=15)
