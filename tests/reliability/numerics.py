"""What the numerics modules share: hypothesis settings and strategies, the float64 / 50-digit references,
the stated tolerances, the float64 network walk and the Monte-Carlo check (not a test module)."""

from __future__ import annotations

import collections
import math
import os

import mpmath
import numpy as np
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from pfp.backends import torch_ref as ref
from pfp.backends.covariance import covariance_block
from pfp.spec import ModelSpec

#: examples per operator: together with the TVM module well under a minute on a quiet host
#: (PFP_NUMERICS_EXAMPLES raises it for a longer hunt)
EXAMPLES = int(os.environ.get("PFP_NUMERICS_EXAMPLES", "40"))
#: the quick suite draws the same examples every run (CI stays reproducible); a longer hunt
#: (PFP_NUMERICS_EXAMPLES set) draws new ones each time
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, database=None,
                    derandomize="PFP_NUMERICS_EXAMPLES" not in os.environ,
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


def linear_tolerances(mean, var, p: ref.GaussianLayerParams, conv_padding: int | None = None, *,
                      flushed: bool = False):
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
    if flushed:
        # the compiled kernels flush subnormals (denormals-are-zero): an input, an input's square or a
        # weight below float32's normal range counts as 0, so its terms may be missing from the result
        tiny = float(np.finfo(np.float32).tiny)
        small_mean = torch.where(mean < tiny, mean, 0.0)
        small_var = torch.where(var < tiny, var, 0.0) + torch.where(mean**2 < tiny, mean**2, 0.0)
        small_wm, small_m2 = torch.where(wm < tiny, wm, 0.0), torch.where(m2 < tiny, m2, 0.0)
        flushed_mean = (op(small_mean, wm) + op(mean, small_wm)).numpy()
        flushed_var = (op(small_var, m2) + op(var + mean**2, small_m2)).numpy()
    else:
        flushed_mean = flushed_var = 0.0
    # products below float32's normal range (1e-45 x 1e-45) flush towards 0: 1e-36 covers the sum of a few
    floor = 1e-36
    return ((1e-6 * mean_terms).numpy() + floor + flushed_mean,
            (1e-6 * var_terms + 1e-13 * op(mean**2, m2)).numpy() + floor + flushed_var)


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
