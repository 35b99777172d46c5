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

import collections
import math
import os

import mpmath
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from pfp.backends import torch_ref as ref
from pfp.backends.covariance import covariance_block
from pfp.head import head_draws, head_reference
from pfp.spec import Dense, Flatten, ModelSpec, ReLU
from tests.reliability.report import record

#: examples per operator: together with the TVM module well under a minute on a quiet host
#: (PFP_NUMERICS_EXAMPLES raises it for a longer hunt)
EXAMPLES = int(os.environ.get("PFP_NUMERICS_EXAMPLES", "40"))
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
F32 = np.float32
SUBNORMAL = float(np.finfo(F32).smallest_subnormal)  # 1.4e-45
TINY = float(np.finfo(F32).tiny)  # smallest normal float32, 1.2e-38
#: the documented floor of the reference's approximations: below RELU_VAR_EPS a ReLU is deterministic,
#: and CLARK_EPS is added to t^2 -- either moves a mean by at most sqrt(1e-12) phi(0) = 4e-7
EPS_MEAN = math.sqrt(ref.RELU_VAR_EPS) / math.sqrt(2 * math.pi) * 1.01
mpmath.mp.dps = 50

# --------------------------------------------------------------------------- strategies

MEAN_SPECIALS = [0.0, -0.0, SUBNORMAL, -SUBNORMAL, 1e-40, TINY, 1e-30, 1.0, -1.0, 1e4, -1e4, 9999.0]
VAR_SPECIALS = [0.0, SUBNORMAL, 1e-40, TINY, 1e-30, 1e-13, 1e-12, 1.1e-12, 1e-6, 1.0, 1e6]

means = st.one_of(st.sampled_from(MEAN_SPECIALS), st.floats(-1e4, 1e4, width=32),
                  st.builds(lambda s, e: s * 10.0 ** e, st.sampled_from([-1.0, 1.0]), st.floats(-30, 4)))
variances = st.one_of(st.sampled_from(VAR_SPECIALS), st.floats(0.0, 1e6, width=32),
                      st.builds(lambda e: 10.0 ** e, st.floats(-30, 6)))


@st.composite
def gaussian_arrays(draw, shape):
    """(mean, var) float32 arrays: elementwise mixtures of the extremes, or all zeros, or one shared scale."""
    mode = draw(st.sampled_from(["mixed", "mixed", "mixed", "zeros", "scaled"]))
    if mode == "zeros":
        return np.zeros(shape, F32), np.zeros(shape, F32)
    mean = draw(hnp.arrays(F32, shape, elements=means))
    var = draw(hnp.arrays(F32, shape, elements=variances))
    if mode == "scaled":  # one scale for the whole tensor: a layer whose every unit is tiny or huge
        scale = draw(st.sampled_from([1e-30, 1e-12, 1e-6, 1e3]))
        var = np.clip(var.astype(np.float64) * scale**2, 0, 1e6).astype(F32)
        mean = np.clip(mean.astype(np.float64) * scale, -1e4, 1e4).astype(F32)
    return mean, var


weight_means = st.one_of(st.sampled_from([0.0, 1.0, -1.0, 1e-30]), st.floats(-1.0, 1.0, width=32))
weight_vars = st.one_of(st.sampled_from([0.0, SUBNORMAL, 1e-30, 1e-12, 1.0]), st.floats(0.0, 1.0, width=32))


@st.composite
def layer_params(draw, weight_shape):
    """float32 Gaussian layer parameters (means within +-1, variances 0 .. 1, some exactly 0 or subnormal)."""
    bias_shape = weight_shape[:1]
    arrays = [draw(hnp.arrays(F32, shape, elements=elements)) for shape, elements in
              ((weight_shape, weight_means), (weight_shape, weight_vars), (bias_shape, weight_means),
               (bias_shape, weight_vars))]
    return ref.GaussianLayerParams.from_mean_var(*(torch.from_numpy(a) for a in arrays))


COUNTS: collections.Counter = collections.Counter()


def _t(array) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array))


def _f64(tensor) -> np.ndarray:
    return np.asarray(tensor.detach().numpy() if isinstance(tensor, torch.Tensor) else tensor, np.float64)


def assert_moments(what, got_mean, got_var, mean, var, mean_atol, var_atol, rtol=2e-5):
    """Finite, variance >= 0, |got - reference| <= rtol |reference| + atol (atol per element)."""
    got_mean, got_var = _f64(got_mean), _f64(got_var)
    assert np.all(np.isfinite(got_mean)) and np.all(np.isfinite(got_var)), f"{what}: non-finite output"
    assert np.all(got_var >= 0), f"{what}: negative variance {got_var.min()}"
    for name, got, expected, atol in (("mean", got_mean, mean, mean_atol), ("var", got_var, var, var_atol)):
        error = np.abs(got - expected)
        bound = rtol * np.abs(expected) + atol
        worst = np.unravel_index(np.argmax(error - bound), error.shape)
        assert np.all(error <= bound), (f"{what} {name}: {got[worst]!r} vs float64 {expected[worst]!r} "
                                        f"(error {error[worst]:.3g} > bound {bound[worst]:.3g}) at {worst}")


# --------------------------------------------------------------------------- float64 references (shared with the TVM tests)

def relu_reference(mean, var) -> tuple[np.ndarray, np.ndarray]:
    """Rectified-Gaussian moments by the textbook E[relu], E[relu^2] - E[relu]^2 in 50 digits.

    Deterministic below RELU_VAR_EPS, as the operator is defined (its documented floor).
    """
    out_mean, out_var = np.zeros(np.shape(mean)), np.zeros(np.shape(mean))
    for index, (m, v) in enumerate(zip(np.ravel(mean), np.ravel(var))):
        m, v = mpmath.mpf(float(m)), max(mpmath.mpf(float(v)), 0)
        if v <= ref.RELU_VAR_EPS:
            out_mean.flat[index] = float(max(m, 0))
            continue
        s = mpmath.sqrt(v)
        cdf, pdf = mpmath.ncdf(m / s), mpmath.npdf(m / s)
        e1 = m * cdf + s * pdf
        out_mean.flat[index] = float(e1)
        out_var.flat[index] = float((m * m + v) * cdf + m * s * pdf - e1 * e1)
    return out_mean, out_var


def _clark_mp(m1, v1, m2, v2):
    """Clark's max in 50 digits, E2 - mu^2 of the notes (the operator uses another, cancellation-free form)."""
    v1, v2 = max(v1, 0), max(v2, 0)
    t = mpmath.sqrt(v1 + v2 + ref.CLARK_EPS)
    a = (m1 - m2) / t
    cdf, cdf_neg, pdf = mpmath.ncdf(a), mpmath.ncdf(-a), mpmath.npdf(a)
    mu = m1 * cdf + m2 * cdf_neg + t * pdf
    e2 = (v1 + m1 * m1) * cdf + (v2 + m2 * m2) * cdf_neg + (m1 + m2) * t * pdf
    return mu, max(e2 - mu * mu, 0)


def maxpool_reference(mean, var, rule: str) -> tuple[np.ndarray, np.ndarray]:
    """2x2 pool, horizontal pairs then vertical: exact Clark in 50 digits (for both Clark rules) or the argmax."""
    batch, channels, height, width = np.shape(mean)
    out_mean, out_var = np.zeros((batch, channels, height // 2, width // 2)), np.zeros((batch, channels, height // 2, width // 2))
    for b, c, i, j in np.ndindex(out_mean.shape):
        window = [(float(mean[b, c, 2 * i + di, 2 * j + dj]), float(var[b, c, 2 * i + di, 2 * j + dj]))
                  for di in (0, 1) for dj in (0, 1)]
        if rule == "argmax_mean":
            top = window[1] if window[1][0] > window[0][0] else window[0]
            bottom = window[3] if window[3][0] > window[2][0] else window[2]
            m, v = bottom if bottom[0] > top[0] else top
            out_mean[b, c, i, j], out_var[b, c, i, j] = m, max(v, 0.0)
            continue
        window = [(mpmath.mpf(m), mpmath.mpf(v)) for m, v in window]
        top, bottom = _clark_mp(*window[0], *window[1]), _clark_mp(*window[2], *window[3])
        m, v = _clark_mp(*top, *bottom)
        out_mean[b, c, i, j], out_var[b, c, i, j] = float(m), float(v)
    return out_mean, out_var


def pool_tolerances(mean, var, rule: str) -> tuple[np.ndarray, np.ndarray]:
    """Per pooled output: absolute (mean, var) slack of a float32 pool against :func:`maxpool_reference`.

    s^2 = the window's summed variances + 3 CLARK_EPS; float32 rounding of a stage's mean (~1e-7 of the
    window's largest |mean|, u) can move the next stage's comparison, shifting its variance by ~u^2.
    The logistic rule adds its documented error over any window (LOGISTIC_POOL_MEAN_ERROR_ANY x s,
    LOGISTIC_POOL_VAR_ERROR x s^2).
    """
    windows = lambda a: np.stack([a[..., di::2, dj::2] for di in (0, 1) for dj in (0, 1)])  # noqa: E731
    s2 = windows(np.maximum(_f64(var), 0)).sum(0) + 3 * ref.CLARK_EPS
    u = 2e-6 * np.abs(windows(_f64(mean))).max(0)
    if rule == "argmax_mean":
        return np.zeros_like(s2), np.zeros_like(s2)
    mean_atol, var_atol = 1e-5 * np.sqrt(s2) + 3 * EPS_MEAN + u, 1e-5 * s2 + 4 * u**2 + 1e-11
    if rule == "clark_logistic":
        mean_atol = mean_atol + ref.LOGISTIC_POOL_MEAN_ERROR_ANY * np.sqrt(s2)
        var_atol = var_atol + ref.LOGISTIC_POOL_VAR_ERROR * s2
    return mean_atol, var_atol


def dense_reference(mean, var, p: ref.GaussianLayerParams):
    """float64 textbook moments: var = E[x^2] E[w^2] - mu_x^2 mu_w^2 + var_b (var None: deterministic input)."""
    wm, wv, bm, bv = (_f64(t) for t in (p.weight_mean, p.weight_var, p.bias_mean, p.bias_var))
    mean = _f64(mean)
    var = np.zeros_like(mean) if var is None else np.maximum(_f64(var), 0)
    out_var = (var + mean**2) @ (wv + wm**2).T - mean**2 @ (wm**2).T + bv
    return mean @ wm.T + bm, np.maximum(out_var, 0)


def conv_reference(mean, var, p: ref.GaussianLayerParams, padding: int):
    """float64 textbook moments of a Gaussian convolution (stride 1)."""
    wm, wv, bm, bv = (torch.from_numpy(_f64(t)) for t in (p.weight_mean, p.weight_var, p.bias_mean, p.bias_var))
    mean = torch.from_numpy(_f64(mean))
    var = torch.zeros_like(mean) if var is None else torch.from_numpy(np.maximum(_f64(var), 0))
    out_var = (F.conv2d(var + mean**2, wv + wm**2, bv, padding=padding) - F.conv2d(mean**2, wm**2, padding=padding))
    return F.conv2d(mean, wm, bm, padding=padding).numpy(), out_var.clamp_min(0).numpy()


def linear_tolerances(mean, var, p: ref.GaussianLayerParams, conv_padding: int | None = None):
    """Absolute slack of float32 linear moments: ~1e-6 of the summed magnitudes of the terms (float32
    summation of a few terms), plus float64's own cancellation in the textbook variance (1e-13 of mu^2 E[w^2]),
    plus float32's underflow floor."""
    wm, wv, m2, bm, bv = (torch.from_numpy(np.abs(_f64(t))) for t in
                          (p.weight_mean, p.weight_var, p.weight_m2, p.bias_mean, p.bias_var))
    mean = torch.from_numpy(np.abs(_f64(mean)))
    var = torch.zeros_like(mean) if var is None else torch.from_numpy(np.maximum(_f64(var), 0))
    if conv_padding is None:
        op = lambda x, w, b=None: F.linear(x, w, b)  # noqa: E731
    else:
        op = lambda x, w, b=None: F.conv2d(x, w, b, padding=conv_padding)  # noqa: E731
    mean_terms = op(mean, wm, bm)
    var_terms = op(var + mean**2, m2, bv)
    # products below float32's normal range (1e-45 x 1e-45) flush towards 0: 1e-36 covers the sum of a few
    floor = 1e-36
    return (1e-6 * mean_terms).numpy() + floor, (1e-6 * var_terms + 1e-13 * op(mean**2, m2)).numpy() + floor


def walk64(spec: ModelSpec, params: dict, x, covariance_layers: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The reference network (:func:`pfp.backends.torch_ref.pfp_forward`) run in float64.

    ``pfp_forward`` casts its input to float32 (its contract); the layer walk itself is dtype-generic.
    """
    params64 = {name: ref.GaussianLayerParams.from_mean_var(p.weight_mean, p.weight_var, p.bias_mean, p.bias_var)
                for name, p in params.items()}
    params64 = {name: ref.GaussianLayerParams(p.weight_mean.double(), p.weight_var.double(),
                                              p.weight_var.double() + p.weight_mean.double() ** 2,
                                              p.bias_mean.double(), p.bias_var.double())
                for name, p in params64.items()}
    ctx = ref._PFPContext(params64, 1.0, covariance_block(spec, covariance_layers))
    with torch.no_grad():
        mean, var = ref.PFP_LAYERS.walk(spec, (torch.as_tensor(np.asarray(x), dtype=torch.float64), None), ctx)
        if ctx.block is not None:
            var = (var + ref.covariance_correction(ctx)).clamp_min(0.0)
    return mean.numpy(), var.numpy()


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


# --------------------------------------------------------------------------- Monte-Carlo at fixed points

MC_SAMPLES = 400_000


def _mc_check(what, got_mean, got_var, samples):
    """Within 5 standard errors of the sample mean and variance (float64 samples)."""
    n = samples.shape[0]
    mean, var = samples.mean(0), samples.var(0)
    se_mean = np.sqrt(var / n)
    # s.e. of a sample variance: sqrt((m4 - var^2) / n)
    se_var = np.sqrt(np.maximum(((samples - mean) ** 4).mean(0) - var**2, 0) / n)
    assert np.all(np.abs(_f64(got_mean) - mean) <= 5 * se_mean + 1e-9), f"{what}: mean {got_mean} vs MC {mean}"
    assert np.all(np.abs(_f64(got_var) - var) <= 5 * se_var + 1e-9), f"{what}: var {got_var} vs MC {var}"


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
