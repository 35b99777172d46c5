"""Tests of the PyTorch PFP reference against independent oracles.

The main oracle is Monte Carlo: draw the random inputs AND the random (mean-field Gaussian)
weights, push every draw through the plain torch op (float64), and compare the sample
moments with the PFP moments within a few standard errors. The standard errors come from the
samples themselves (4th central moment for the variance), so heavy-tailed outputs such as
products of Gaussians get honest bounds. Where a moment is exact but MC is too coarse to
expose float32 cancellation, a float64 quadrature oracle is used instead.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from scipy import integrate, stats

from pfp.backends.torch_ref import (
    LOGISTIC_CDF_MAX_ERROR,
    LOGISTIC_MEAN_MAX_ERROR,
    LOGISTIC_PDF_MAX_ERROR,
    LOGISTIC_POOL_MEAN_ERROR,
    LOGISTIC_POOL_VAR_ERROR,
    LOGISTIC_VAR_MAX_ERROR,
    GaussianLayerParams,
    conv2d,
    conv2d_first,
    dense,
    dense_first,
    deterministic_forward,
    flatten,
    max2,
    maxpool2x2,
    pfp_forward,
    relu,
    scale_variance,
)
from pfp.spec import Dense, Flatten, ModelSpec, PoolRule, ReLU, SpecError, build_spec

N_SIGMA = 5.0  # each check is a 5-standard-error bound (false alarm ~6e-7 per element)


@pytest.fixture(autouse=True)
def _single_thread():
    """Run single-threaded: on the 2 shared cores of CI machines, intra-op threads that
    spin-wait against other jobs made the MC oracles 50x slower; one thread is predictable."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --------------------------------------------------------------------------- MC machinery

@dataclass
class MCMoments:
    mean: torch.Tensor
    var: torch.Tensor
    se_mean: torch.Tensor
    se_var: torch.Tensor


def mc_moments(draw: Callable[[int], torch.Tensor], n: int, chunk: int = 25_000) -> MCMoments:
    """Sample mean/variance (and their standard errors) of ``draw`` over n float64 draws.

    Streams chunks and accumulates power sums around a pilot shift (the first chunk's
    mean), so memory stays small and the raw->central moment conversion doesn't cancel.
    """
    sums = None
    shift = None
    done = 0
    while done < n:
        size = min(chunk, n - done)
        y = draw(size).to(torch.float64)
        if shift is None:
            shift = y.mean(0)
            sums = [torch.zeros_like(shift) for _ in range(4)]
        d = y - shift
        d2 = d * d
        sums[0] += d.sum(0)
        sums[1] += d2.sum(0)
        sums[2] += (d2 * d).sum(0)
        sums[3] += (d2 * d2).sum(0)
        done += size
    e1, e2, e3, e4 = (s / n for s in sums)
    m2 = e2 - e1 ** 2
    m4 = e4 - 4 * e1 * e3 + 6 * e1 ** 2 * e2 - 3 * e1 ** 4
    var = m2 * n / (n - 1)
    return MCMoments(mean=shift + e1, var=var, se_mean=torch.sqrt(var / n),
                     se_var=torch.sqrt((m4 - m2 ** 2).clamp_min(0) / n))


def assert_matches_mc(mean: torch.Tensor, var: torch.Tensor, mc: MCMoments, *,
                      n_sigma: float = N_SIGMA, atol: float = 1e-5, rtol: float = 1e-4) -> None:
    """PFP moments within n_sigma standard errors (+ float32 slack) of the MC moments."""
    assert mean.shape == mc.mean.shape and var.shape == mc.var.shape
    assert mean.dtype == torch.float32 and var.dtype == torch.float32
    for name, got, want, se in (("mean", mean, mc.mean, mc.se_mean), ("var", var, mc.var, mc.se_var)):
        got = got.to(torch.float64)
        bound = n_sigma * se + atol + rtol * want.abs()
        err = (got - want).abs()
        worst = int(torch.argmax(err / bound))
        assert bool((err <= bound).all()), (
            f"{name}: {int((err > bound).sum())} of {err.numel()} elements off; worst at flat index "
            f"{worst}: pfp={got.flatten()[worst]:.6g} mc={want.flatten()[worst]:.6g} "
            f"se={se.flatten()[worst]:.3g}")


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_params(weight_shape: tuple[int, ...], bias_shape: tuple[int, ...], g: torch.Generator,
                  mean_scale: float = 0.5, std_range: tuple[float, float] = (0.05, 0.5)
                  ) -> GaussianLayerParams:
    """Mean-field Gaussian parameters with random means and random (distinct) scales."""
    lo, hi = std_range

    def std(shape):
        return lo + (hi - lo) * torch.rand(shape, generator=g)

    return GaussianLayerParams.from_mean_var(
        torch.randn(weight_shape, generator=g) * mean_scale, std(weight_shape) ** 2,
        torch.randn(bias_shape, generator=g) * mean_scale, std(bias_shape) ** 2)


def sample_weights(p: GaussianLayerParams, n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """n float64 draws of (weight, bias), each (n, *shape)."""
    w = p.weight_mean.double() + p.weight_var.double().sqrt() * torch.randn(
        (n, *p.weight_mean.shape), generator=g, dtype=torch.float64)
    b = p.bias_mean.double() + p.bias_var.double().sqrt() * torch.randn(
        (n, *p.bias_mean.shape), generator=g, dtype=torch.float64)
    return w, b


def sample_gaussian(mean: torch.Tensor, var: torch.Tensor, n: int, g: torch.Generator) -> torch.Tensor:
    return mean.double() + var.double().sqrt() * torch.randn((n, *mean.shape), generator=g, dtype=torch.float64)


def random_activation(shape: tuple[int, ...], g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian activation with random means and random positive variances."""
    return torch.randn(shape, generator=g), 0.05 + 0.6 * torch.rand(shape, generator=g)


# --------------------------------------------------------------------------- dense

def test_dense_first_matches_mc():
    g = gen(1)
    p = random_params((3, 5), (3,), g)
    x = torch.randn(2, 5, generator=g)
    mean, var = dense_first(x, p)

    def draw(n):
        w, b = sample_weights(p, n, g)
        return torch.einsum("bi,noi->nbo", x.double(), w) + b[:, None, :]

    assert_matches_mc(mean, var, mc_moments(draw, 200_000))


def test_dense_gaussian_input_matches_mc():
    g = gen(2)
    p = random_params((4, 6), (4,), g)
    x_mean, x_var = random_activation((2, 6), g)
    mean, var = dense(x_mean, x_var, p)

    def draw(n):
        w, b = sample_weights(p, n, g)
        x = sample_gaussian(x_mean, x_var, n, g)
        return torch.einsum("nbi,noi->nbo", x, w) + b[:, None, :]

    assert_matches_mc(mean, var, mc_moments(draw, 200_000))


def test_dense_variance_accurate_when_tiny_next_to_means():
    """The all-positive variance form stays accurate where the E[x^2]E[w^2] - mu^2 mu_w^2
    difference would be float32 rounding noise."""
    g = gen(3)
    w_mean = 10 + torch.rand(3, 8, generator=g)
    p = GaussianLayerParams.from_mean_var(w_mean, torch.full((3, 8), 1e-8), torch.zeros(3), torch.zeros(3))
    x_mean = 100 + torch.rand(2, 8, generator=g)
    x_var = torch.full((2, 8), 1e-6)
    _, var = dense(x_mean, x_var, p)
    d = {k: v.double() for k, v in {"mx": x_mean, "vx": x_var, "mw": w_mean, "vw": p.weight_var}.items()}
    want = (d["vx"] @ (d["vw"] + d["mw"] ** 2).T + d["mx"] ** 2 @ d["vw"].T)
    torch.testing.assert_close(var.double(), want, rtol=1e-5, atol=0)
    # The textbook difference in float32 is useless here (documents why we don't use it).
    naive = (x_var + x_mean ** 2) @ p.weight_m2.T - x_mean ** 2 @ (w_mean ** 2).T
    assert (naive.double() - want).abs().max() > 0.1 * want.abs().max()


# --------------------------------------------------------------------------- conv

CONV_CASES = [  # (stride, padding)
    pytest.param(1, 2, id="pad2"),
    pytest.param(2, 0, id="stride2"),
    pytest.param(2, 2, id="stride2-pad2"),
]


def _sample_conv(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, stride: int, padding: int) -> torch.Tensor:
    """Per-draw convolution: x (n, B, C, H, W) or shared (B, C, H, W), w (n, O, C, k, k), b (n, O).

    Draw k convolves with its own filters: unfold the input patches once and contract them
    with every draw's filters in one batched matmul; checked against F.conv2d for draw 0.
    """
    n, _, _, k, _ = w.shape
    xs = x.expand(n, *x.shape) if x.dim() == 4 else x
    batch, _, height, width = xs.shape[1:]
    out_h = (height + 2 * padding - k) // stride + 1
    out_w = (width + 2 * padding - k) // stride + 1
    cols = F.unfold(xs.flatten(0, 1), k, padding=padding, stride=stride)  # (n*B, C*k*k, L)
    cols = cols.unflatten(0, (n, batch))
    y = torch.matmul(w.flatten(2)[:, None], cols) + b[:, None, :, None]  # (n, B, O, L)
    y = y.unflatten(-1, (out_h, out_w))
    ref = F.conv2d(xs[0], w[0], b[0], stride=stride, padding=padding)
    torch.testing.assert_close(y[0], ref)  # the oracle itself uses the plain torch op's semantics
    return y


@pytest.mark.parametrize("stride, padding", CONV_CASES)
def test_conv2d_first_matches_mc(stride, padding):
    g = gen(10 + stride + padding)
    p = random_params((3, 2, 3, 3), (3,), g)
    x = torch.randn(2, 2, 5, 6, generator=g)  # non-square, so an H/W mix-up shows
    mean, var = conv2d_first(x, p, stride=stride, padding=padding)
    assert mean.shape == F.conv2d(x, p.weight_mean, stride=stride, padding=padding).shape

    def draw(n):
        w, b = sample_weights(p, n, g)
        return _sample_conv(x.double(), w, b, stride, padding)

    assert_matches_mc(mean, var, mc_moments(draw, 60_000, chunk=20_000))


@pytest.mark.parametrize("stride, padding", CONV_CASES)
def test_conv2d_gaussian_input_matches_mc(stride, padding):
    g = gen(20 + stride + padding)
    p = random_params((3, 2, 3, 3), (3,), g)
    x_mean, x_var = random_activation((2, 2, 5, 6), g)
    mean, var = conv2d(x_mean, x_var, p, stride=stride, padding=padding)

    def draw(n):
        w, b = sample_weights(p, n, g)
        return _sample_conv(sample_gaussian(x_mean, x_var, n, g), w, b, stride, padding)

    assert_matches_mc(mean, var, mc_moments(draw, 60_000, chunk=20_000))


# --------------------------------------------------------------------------- relu

# (mean, var): moderate cases plus strongly negative / positive means and near-zero variance.
RELU_CASES = torch.tensor([
    [0.0, 1.0], [0.7, 0.3], [-0.4, 2.0], [1.5, 0.01],
    [-6.0, 0.25], [8.0, 0.5], [-30.0, 1.0], [30.0, 1e-4], [1e-3, 1e-8],
])


def test_relu_matches_mc():
    g = gen(30)
    m, v = RELU_CASES[:, 0], RELU_CASES[:, 1]
    mean, var = relu(m, v)
    mc = mc_moments(lambda n: torch.relu(sample_gaussian(m, v, n, g)), 400_000, chunk=100_000)
    assert_matches_mc(mean, var, mc, atol=1e-7)


def _gauss_expect(f, mu: float, s: float) -> float:
    """E[f(mu + s Z)], Z ~ N(0, 1), by float64 quadrature in standardised coordinates (so a
    narrow Gaussian far from 0 is integrated as accurately as a wide one); the ReLU kink at
    z = -mu/s is passed as a break point."""
    kink = -mu / s
    pts = [kink] if -40 < kink < 40 else None
    return integrate.quad(lambda z: f(mu + s * z) * stats.norm.pdf(z), -40, 40, points=pts,
                          epsabs=0, epsrel=1e-12, limit=200)[0]


def test_relu_matches_quadrature():
    """Float64 quadrature: exposes float32 cancellation that MC noise would hide."""
    m, v = RELU_CASES[:, 0], RELU_CASES[:, 1]
    mean, var = relu(m, v)
    for i, (mu, s2) in enumerate(RELU_CASES.double().tolist()):
        s = math.sqrt(s2)
        want_mean = _gauss_expect(lambda z: max(z, 0.0), mu, s)
        want_var = _gauss_expect(lambda z, m=want_mean: (max(z, 0.0) - m) ** 2, mu, s)
        assert mean[i].item() == pytest.approx(want_mean, rel=1e-5, abs=1e-12), (mu, s2)
        assert var[i].item() == pytest.approx(want_var, rel=1e-4, abs=1e-12), (mu, s2)


def test_relu_zero_variance_is_deterministic_relu():
    m = torch.tensor([-5.0, -1e-3, 0.0, 1e-3, 4.0, 1e4])
    for v in (torch.zeros_like(m), torch.full_like(m, 1e-20), torch.full_like(m, -1e-9)):
        mean, var = relu(m, v)
        assert torch.isfinite(mean).all() and torch.isfinite(var).all()
        torch.testing.assert_close(mean, torch.relu(m), rtol=0, atol=0)
        assert (var == 0).all()


# --------------------------------------------------------------------------- max

# (mean1, var1, mean2, var2): equal stats, far apart, one or both deterministic, large means.
MAX2_CASES = torch.tensor([
    [0.0, 1.0, 0.0, 1.0], [0.5, 0.2, -0.3, 1.5], [3.0, 1.0, -3.0, 1.0], [-2.0, 0.1, 2.0, 4.0],
    [0.2, 0.0, 0.0, 1.0], [1.0, 0.5, 1.0, 0.0], [100.0, 0.01, 100.1, 0.02], [50.0, 1.0, 0.0, 1.0],
])


def test_max2_matches_mc():
    g = gen(40)
    m1, v1, m2, v2 = MAX2_CASES.T
    mean, var = max2(m1, v1, m2, v2)
    mc = mc_moments(lambda n: torch.maximum(sample_gaussian(m1, v1, n, g), sample_gaussian(m2, v2, n, g)),
                    400_000, chunk=100_000)
    assert_matches_mc(mean, var, mc)


def _max2_quadrature(mu1, s1, mu2, s2):
    """Exact moments of max(X1, X2) from its density f1 F2 + f2 F1 (float64 quadrature)."""
    d1, d2 = stats.norm(mu1, s1), stats.norm(mu2, s2)

    def pdf(z):
        return d1.pdf(z) * d2.cdf(z) + d2.pdf(z) * d1.cdf(z)

    lo = min(mu1 - 40 * s1, mu2 - 40 * s2)
    hi = max(mu1 + 40 * s1, mu2 + 40 * s2)
    pts = sorted({mu1, mu2})
    m = integrate.quad(lambda z: z * pdf(z), lo, hi, points=pts, epsabs=0, epsrel=1e-12, limit=200)[0]
    v = integrate.quad(lambda z: (z - m) ** 2 * pdf(z), lo, hi, points=pts, epsabs=0, epsrel=1e-12,
                       limit=200)[0]
    return m, v


def test_max2_matches_quadrature():
    cases = MAX2_CASES[(MAX2_CASES[:, 1] > 0) & (MAX2_CASES[:, 3] > 0)]
    mean, var = max2(*cases.T)
    for i, (mu1, v1, mu2, v2) in enumerate(cases.double().tolist()):
        want_mean, want_var = _max2_quadrature(mu1, math.sqrt(v1), mu2, math.sqrt(v2))
        assert mean[i].item() == pytest.approx(want_mean, rel=1e-5, abs=1e-6)
        assert var[i].item() == pytest.approx(want_var, rel=1e-4)


def test_max2_both_deterministic():
    a = torch.tensor([1.0, -2.0, 3.0, 0.0])
    b = torch.tensor([0.5, -1.0, 3.0, 0.0])
    zero = torch.zeros_like(a)
    mean, var = max2(a, zero, b, zero)
    torch.testing.assert_close(mean, torch.maximum(a, b), rtol=0, atol=1e-6)
    assert torch.isfinite(var).all() and (var >= 0).all() and (var <= 1e-12).all()


def _distinct_pool_input(g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(1, 2, 4, 4) map where every position has its own statistics and every 2x2 window a
    clearly different level (window (i, j) of channel c sits around 4 * (2i + j) + 2c), so an
    output taken from the wrong window cannot pass."""
    level = torch.tensor([[0.0, 4.0], [8.0, 12.0]]).repeat_interleave(2, 0).repeat_interleave(2, 1)
    level = torch.stack([level, level + 2.0])[None]
    mean = level + torch.randn(1, 2, 4, 4, generator=g)
    var = 0.1 + 0.9 * torch.rand(1, 2, 4, 4, generator=g)
    return mean, var


def test_maxpool2x2_matches_mc_at_every_position():
    g = gen(50)
    mean_in, var_in = _distinct_pool_input(g)
    mean, var = maxpool2x2(mean_in, var_in)
    assert mean.shape == var.shape == (1, 2, 2, 2)
    mc = mc_moments(lambda n: F.max_pool2d(sample_gaussian(mean_in, var_in, n, g).flatten(0, 1), 2)
                    .unflatten(0, (n, 1)), 200_000, chunk=50_000)
    # Sequential Clark is an approximation (the intermediate max is not Gaussian): allow a
    # small fraction of the output spread on the mean, still far below the 2+ unit gap
    # between windows (which is what catches an output computed from the wrong window).
    # The variance error of sequential Clark reaches ~20% here, so only a loose factor.
    std = mc.var.sqrt()
    assert ((mean.double() - mc.mean).abs() <= 0.05 * std + N_SIGMA * mc.se_mean).all(), (mean, mc.mean)
    assert ((var.double() - mc.var).abs() <= 0.3 * mc.var + N_SIGMA * mc.se_var).all(), (var, mc.var)


def test_maxpool2x2_is_pairwise_clark_horizontal_then_vertical():
    g = gen(51)
    mean_in, var_in = random_activation((2, 3, 6, 8), g)
    mean, var = maxpool2x2(mean_in, var_in)
    assert mean.shape == (2, 3, 3, 4)
    for i in range(3):
        for j in range(4):
            def at(t, di, dj, i=i, j=j):
                return t[..., 2 * i + di, 2 * j + dj]
            top = max2(at(mean_in, 0, 0), at(var_in, 0, 0), at(mean_in, 0, 1), at(var_in, 0, 1))
            bottom = max2(at(mean_in, 1, 0), at(var_in, 1, 0), at(mean_in, 1, 1), at(var_in, 1, 1))
            want_mean, want_var = max2(*top, *bottom)
            torch.testing.assert_close(mean[..., i, j], want_mean, rtol=0, atol=0)
            torch.testing.assert_close(var[..., i, j], want_var, rtol=0, atol=0)


def test_maxpool2x2_output_depends_only_on_its_window():
    g = gen(52)
    mean_in, var_in = _distinct_pool_input(g)
    base_mean, base_var = maxpool2x2(mean_in, var_in)
    for y in range(4):
        for x in range(4):
            m, v = mean_in.clone(), var_in.clone()
            m[..., y, x] += 50.0  # becomes the window's max for sure
            v[..., y, x] += 3.0
            new_mean, new_var = maxpool2x2(m, v)
            changed = (new_mean != base_mean) | (new_var != base_var)
            expected = torch.zeros_like(changed)
            expected[..., y // 2, x // 2] = True
            assert torch.equal(changed, expected), (y, x)


# --------------------------------------------------------------------------- max-pool rules

def _logistic_stats_f64(a: torch.Tensor):
    from pfp.backends.torch_ref import _logistic_stats
    return _logistic_stats(a.double())


def test_logistic_normal_approximation_error_is_as_stated_over_the_real_line():
    """Max abs error of Phi_L / phi_L and of the normalised Clark moments: within the stated bounds, and
    the bounds are tight (the worst error reaches at least 90 % of each)."""
    a = torch.linspace(-40.0, 40.0, 800_001, dtype=torch.float64)
    cdf, cdf_neg, pdf = _logistic_stats_f64(a)
    exact_cdf = torch.from_numpy(stats.norm.cdf(a.numpy()))
    exact_pdf = torch.from_numpy(stats.norm.pdf(a.numpy()))
    torch.testing.assert_close(cdf + cdf_neg, torch.ones_like(a), rtol=0, atol=1e-15)  # symmetric, like Phi
    cdf_error, pdf_error = (cdf - exact_cdf).abs().max(), (pdf - exact_pdf).abs().max()
    # Clark: mean = mu2 + t (a Phi + phi); var / t^2 = w Phi(a) + (1 - w) Phi(-a) + h(a), w in [0, 1]
    mean_error = (a * (cdf - exact_cdf) + pdf - exact_pdf).abs().max()

    def h(p, pn, d):
        return a * a * p * pn + a * d * (pn - p) - d * d

    var_error = ((cdf - exact_cdf).abs() + (h(cdf, cdf_neg, pdf) - h(exact_cdf, 1 - exact_cdf, exact_pdf)).abs()).max()
    for got, bound in ((cdf_error, LOGISTIC_CDF_MAX_ERROR), (pdf_error, LOGISTIC_PDF_MAX_ERROR),
                       (mean_error, LOGISTIC_MEAN_MAX_ERROR), (var_error, LOGISTIC_VAR_MAX_ERROR)):
        assert 0.9 * bound <= float(got) <= bound, (float(got), bound)
    # beyond the clamp (|a| = 40) both tails are exactly saturated
    far = torch.tensor([-1e4, -40.0, 40.0, 1e4], dtype=torch.float64)
    torch.testing.assert_close(_logistic_stats_f64(far)[0], torch.tensor([0.0, 0.0, 1.0, 1.0], dtype=torch.float64))


def _wide_pairs(seed: int, count: int = 4000):
    """(mean1, var1, mean2, var2) over wide ranges: scales 1e-3..1e3, offsets up to 1e3, gaps up to 60 scales."""
    g = gen(seed)
    scale = 10 ** (6 * torch.rand(count, generator=g, dtype=torch.float64) - 3)
    offset = 1e3 * torch.randn(count, generator=g, dtype=torch.float64)
    gap = 20 * torch.randn(count, generator=g, dtype=torch.float64) * scale
    v1 = (scale * (0.01 + 2 * torch.rand(count, generator=g, dtype=torch.float64))) ** 2
    v2 = (scale * (0.01 + 2 * torch.rand(count, generator=g, dtype=torch.float64))) ** 2
    v2[::7] = 0.0  # one deterministic input
    return offset + gap, v1, offset, v2


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_logistic_clark_max_is_within_the_stated_bound_of_exact_clark(seed):
    m1, v1, m2, v2 = _wide_pairs(seed)
    exact_mean, exact_var = max2(m1, v1, m2, v2)
    mean, var = max2(m1, v1, m2, v2, logistic=True)
    t2 = v1 + v2
    slack = 1e-12 * (m1.abs() + m2.abs() + 1)  # float64 rounding of the mean terms
    assert ((mean - exact_mean).abs() <= LOGISTIC_MEAN_MAX_ERROR * t2.sqrt() + slack).all()
    assert ((var - exact_var).abs() <= LOGISTIC_VAR_MAX_ERROR * t2 + 1e-12 * t2).all()
    # and the approximation is not the exact formula in disguise
    assert (mean - exact_mean).abs().max() > 0.1 * LOGISTIC_MEAN_MAX_ERROR * t2.sqrt().max() / 1e3


@pytest.mark.parametrize("seed", [100, 101])
def test_logistic_clark_pool_is_within_the_stated_bound_of_exact_clark_pool(seed):
    """The whole 2x2 pool (three maxima) with the logistic cdf, against exact Clark, in float64 (windows unlike
    the ones the bounds were measured on: other seeds, offsets up to 1e3)."""
    g = gen(seed)
    windows = 20_000
    scale = 10 ** (6 * torch.rand(windows, 1, 1, generator=g, dtype=torch.float64) - 3)
    spread = 4 * torch.rand(windows, 1, 1, generator=g, dtype=torch.float64)
    mean = (1e3 * torch.randn(windows, 1, 1, generator=g, dtype=torch.float64)
            + spread * scale * torch.randn(windows, 2, 2, generator=g, dtype=torch.float64))
    var = (scale * (0.01 + 2 * torch.rand(windows, 2, 2, generator=g, dtype=torch.float64))) ** 2
    var[::5, 1, 1] = 0.0
    exact_mean, exact_var = maxpool2x2(mean[None], var[None], PoolRule.CLARK)
    mean_l, var_l = maxpool2x2(mean[None], var[None], PoolRule.CLARK_LOGISTIC)
    s2 = var.sum((1, 2)).reshape(exact_mean.shape)
    mean_error, var_error = (mean_l - exact_mean).abs() / s2.sqrt(), (var_l - exact_var).abs() / s2
    assert mean_error.max() <= LOGISTIC_POOL_MEAN_ERROR and var_error.max() <= LOGISTIC_POOL_VAR_ERROR
    assert mean_error.max() >= 0.2 * LOGISTIC_POOL_MEAN_ERROR  # the bound is not vacuous


def _random_windows(seed: int, windows: int = 48) -> tuple[torch.Tensor, torch.Tensor]:
    """(1, windows, 2, 2) maps: per window a scale 1e-2..1e2, an offset, means spread over 0..3 scales, distinct stds."""
    g = gen(seed)
    scale = 10 ** (4 * torch.rand(windows, 1, 1, generator=g) - 2)
    spread = 3 * torch.rand(windows, 1, 1, generator=g)
    mean = 10 * torch.randn(windows, 1, 1, generator=g) + spread * scale * torch.randn(windows, 2, 2, generator=g)
    std = scale * (0.05 + 2 * torch.rand(windows, 2, 2, generator=g))
    return mean[None], (std**2)[None]


def _mc_max4(mean: torch.Tensor, var: torch.Tensor, g: torch.Generator, n: int = 100_000) -> MCMoments:
    """MC moments of the max of each window's 4 independent Gaussians, (1, windows, 1, 1)."""
    return mc_moments(lambda k: F.max_pool2d(sample_gaussian(mean, var, k, g).flatten(0, 1), 2).unflatten(0, (k, 1)),
                      n, chunk=25_000)


#: Pairwise Clark's own bias for the max of 4 (the row maxima are not Gaussian): over 300 random windows of
#: scales 1e-3..1e3 (float64, 20k MC draws), mean -0.08..+0.10 output sd, variance -55 %..+5 % (-58..+7 %
#: with the logistic cdf). The bounds below add 5 MC standard errors to these.
CLARK_MEAN_BIAS_SD, CLARK_VAR_BIAS = 0.12, (-0.6, 0.1)


@pytest.mark.parametrize("rule", [PoolRule.CLARK, PoolRule.CLARK_LOGISTIC])
@pytest.mark.parametrize("seed", [60, 61])
def test_clark_pool_rules_match_mc_of_max_of_four_within_clarks_bias(rule, seed):
    mean_in, var_in = _random_windows(seed)
    mean, var = maxpool2x2(mean_in, var_in, rule)
    mc = _mc_max4(mean_in, var_in, gen(seed + 100))
    mean, var = mean.double(), var.double()
    sd = mc.var.sqrt()
    assert ((mean - mc.mean).abs() <= CLARK_MEAN_BIAS_SD * sd + N_SIGMA * mc.se_mean + 1e-6 * mc.mean.abs()).all()
    low, high = CLARK_VAR_BIAS
    assert ((var >= (1 + low) * mc.var - N_SIGMA * mc.se_var) & (var <= (1 + high) * mc.var + N_SIGMA * mc.se_var)).all()


@pytest.mark.parametrize("seed", [62, 63])
def test_argmax_mean_rule_is_the_largest_mean_element_and_never_above_mc(seed):
    mean_in, var_in = _random_windows(seed)
    mean, var = maxpool2x2(mean_in, var_in, PoolRule.ARGMAX_MEAN)
    # exactly the moments of the element with the largest mean
    flat_mean, flat_var = mean_in.flatten(2), var_in.flatten(2)
    best = flat_mean.argmax(2, keepdim=True)
    assert torch.equal(mean.flatten(2), flat_mean.gather(2, best))
    assert torch.equal(var.flatten(2), flat_var.gather(2, best))
    # E[max] >= max E (Jensen): the rule's mean is a lower bound of the true one
    mc = _mc_max4(mean_in, var_in, gen(seed + 100))
    assert (mean.double() <= mc.mean + N_SIGMA * mc.se_mean + 1e-6 * mc.mean.abs()).all()


@pytest.mark.parametrize("rule", list(PoolRule))
def test_every_rule_is_exact_when_one_mean_dominates(rule):
    """A window whose largest mean is >= 10 combined sd above the rest: each rule gives that element's
    moments, and MC of the max agrees within its standard errors (the bias bound of argmax_mean: 0 here)."""
    g = gen(64)
    windows = 32
    scale = 10 ** (4 * torch.rand(windows, 1, generator=g) - 2)
    std = scale * (0.1 + torch.rand(windows, 4, generator=g))
    mean = 5 * torch.randn(windows, 1, generator=g) + scale * torch.randn(windows, 4, generator=g)
    winner = torch.randint(0, 4, (windows,), generator=g)
    lead = mean.max(1).values + 10 * 2 * std.max(1).values  # >= 10 sd of (winner - any other)
    mean[torch.arange(windows), winner] = lead
    mean_in, var_in = mean.reshape(1, windows, 2, 2), (std**2).reshape(1, windows, 2, 2)
    out_mean, out_var = maxpool2x2(mean_in, var_in, rule)
    torch.testing.assert_close(out_mean.flatten(), lead, rtol=1e-6, atol=1e-6 * scale.max().item())
    torch.testing.assert_close(out_var.flatten(), std[torch.arange(windows), winner] ** 2, rtol=1e-4, atol=0.0)
    assert_matches_mc(out_mean, out_var, _mc_max4(mean_in, var_in, gen(65)))


def test_argmax_mean_rule_takes_the_first_of_tied_means():
    mean = torch.tensor([[1.0, 1.0], [1.0, 1.0]]).reshape(1, 1, 2, 2).repeat(1, 3, 1, 1)
    mean[0, 1, 0, 0] = 0.0  # ties among the other three: (0, 1) is first
    mean[0, 2, :1] = 0.0  # ties in the bottom row: (1, 0)
    var = torch.tensor([[0.1, 0.2], [0.3, 0.4]]).reshape(1, 1, 2, 2).repeat(1, 3, 1, 1)
    _, out_var = maxpool2x2(mean, var, "argmax_mean")
    torch.testing.assert_close(out_var.flatten(), torch.tensor([0.1, 0.2, 0.3]))


def test_maxpool2x2_refuses_an_unknown_rule():
    with pytest.raises(SpecError, match="'softmax'.*clark, clark_logistic, argmax_mean"):
        maxpool2x2(torch.zeros(1, 1, 2, 2), torch.ones(1, 1, 2, 2), "softmax")


def test_pfp_forward_runs_each_layers_pool_rule():
    """The PFP table reads the rule of each MaxPool2d: a spec with argmax_mean gives what maxpool2x2 does."""
    from pfp.convert import with_pool_rule
    from pfp.spec import Conv2d, MaxPool2d

    g = gen(66)
    base = ModelSpec("toy", (1, 4, 4), (Conv2d("c", 1, 2, 3, padding=1), MaxPool2d(), ReLU(), Flatten(), Dense("d", 8, 3)))
    params = {"c": random_params((2, 1, 3, 3), (2,), g), "d": random_params((3, 8), (3,), g)}
    x = torch.randn(5, 1, 4, 4, generator=g)
    outputs = {}
    for rule in PoolRule:
        spec = with_pool_rule(base, rule)
        c_mean, c_var = conv2d_first(x, params["c"], 1, 1)
        want = dense(*flatten(*relu(*maxpool2x2(c_mean, c_var, rule))), params["d"])
        outputs[rule] = pfp_forward(spec, params, x)
        torch.testing.assert_close(outputs[rule], want, rtol=0, atol=0)
    assert not torch.equal(outputs[PoolRule.CLARK][1], outputs[PoolRule.ARGMAX_MEAN][1])


def test_flatten_matches_torch_order():
    g = gen(60)
    mean_in, var_in = random_activation((3, 2, 4, 5), g)
    mean, var = flatten(mean_in, var_in)
    assert mean.shape == var.shape == (3, 40)
    # C, H, W order: the order the dense weights after a Flatten layer were trained with
    assert torch.equal(mean, mean_in.reshape(3, -1)) and torch.equal(var, var_in.reshape(3, -1))
    assert mean[1, 1 * 20 + 2 * 5 + 3] == mean_in[1, 1, 2, 3]


# --------------------------------------------------------------------------- whole network

def random_spec_params(spec: ModelSpec, g: torch.Generator, zero_var: bool = False
                       ) -> dict[str, GaussianLayerParams]:
    params = {}
    for layer in spec.parametric_layers():
        fan_in = math.prod(layer.weight_shape[1:])
        p = random_params(layer.weight_shape, layer.bias_shape, g, mean_scale=1.5 / math.sqrt(fan_in),
                          std_range=(0.1 / math.sqrt(fan_in), 0.5 / math.sqrt(fan_in)))
        params[layer.name] = scale_variance(p, 0.0) if zero_var else p
    return params


@pytest.mark.parametrize("arch", ["mlp", "lenet"])
def test_pfp_forward_zero_variance_equals_deterministic(arch):
    g = gen(70)
    spec = build_spec(arch)
    params = random_spec_params(spec, g, zero_var=True)
    x = torch.randn(3, *spec.input_shape, generator=g)
    mean, var = pfp_forward(spec, params, x)
    det = deterministic_forward(spec, {k: (p.weight_mean, p.bias_mean) for k, p in params.items()}, x)
    assert mean.shape == var.shape == det.shape == (3, spec.num_outputs)
    assert det.abs().max() > 0.1  # not a degenerate all-zero network
    torch.testing.assert_close(mean, det, rtol=1e-4, atol=1e-4)
    assert (var >= 0).all() and var.max() < 1e-9


@pytest.mark.parametrize("arch", ["mlp", "lenet"])
def test_pfp_forward_variance_scale(arch):
    g = gen(71)
    spec = build_spec(arch)
    params = random_spec_params(spec, g)
    x = torch.randn(2, *spec.input_shape, generator=g)
    mean, var = pfp_forward(spec, params, x, variance_scale=0.3)
    scaled = {k: GaussianLayerParams.from_mean_var(p.weight_mean, 0.3 * p.weight_var, p.bias_mean, 0.3 * p.bias_var)
              for k, p in params.items()}
    want_mean, want_var = pfp_forward(spec, scaled, x)
    torch.testing.assert_close(mean, want_mean)
    torch.testing.assert_close(var, want_var)
    # more weight noise, more logit variance (and never negative)
    _, var_full = pfp_forward(spec, params, x)
    assert (var >= 0).all() and (var_full.sum() > var.sum())
    # variance_scale=0 is the network of the means
    mean0, var0 = pfp_forward(spec, params, x, variance_scale=0.0)
    det = deterministic_forward(spec, {k: (p.weight_mean, p.bias_mean) for k, p in params.items()}, x)
    torch.testing.assert_close(mean0, det, rtol=1e-4, atol=1e-4)
    assert var0.max() < 1e-9


def test_pfp_forward_rejects_wrong_input_shape():
    spec = build_spec("mlp")
    params = random_spec_params(spec, gen(72))
    with pytest.raises(ValueError):
        pfp_forward(spec, params, torch.zeros(2, 784))


def _tiny_spec(hidden: tuple[int, ...]) -> ModelSpec:
    sizes = (4, *hidden, 3)
    layers = [Flatten()]
    for k, (fan_in, fan_out) in enumerate(itertools.pairwise(sizes)):
        layers += [Dense(f"fc{k + 1}", fan_in, fan_out), ReLU()]
    return ModelSpec(name="tiny", input_shape=(1, 2, 2), layers=tuple(layers[:-1]))


def _mc_network(spec: ModelSpec, params: dict[str, GaussianLayerParams], x: torch.Tensor,
                n: int, g: torch.Generator) -> MCMoments:
    def draw(size):
        h = x.double().flatten(1).expand(size, *x.flatten(1).shape)  # (n, B, in)
        for layer in spec.layers:
            if isinstance(layer, Dense):
                w, b = sample_weights(params[layer.name], size, g)
                h = torch.einsum("nbi,noi->nbo", h, w) + b[:, None, :]
            elif isinstance(layer, ReLU):
                h = torch.relu(h)
        return h

    return mc_moments(draw, n)


def test_pfp_forward_two_layer_net_matches_mc():
    """Dense-ReLU-Dense on a deterministic input: the first-layer units are independent
    exact Gaussians (distinct weight rows), so both logit moments are exact here."""
    g = gen(80)
    spec = _tiny_spec((6,))
    params = random_spec_params(spec, g)
    x = torch.randn(2, 1, 2, 2, generator=g)
    mean, var = pfp_forward(spec, params, x)
    assert_matches_mc(mean, var, _mc_network(spec, params, x, 200_000, g))


def test_pfp_forward_deeper_net_roughly_matches_mc():
    """With two hidden layers the second-layer units share inputs, so PFP's independence
    assumption is only approximate: loose agreement only."""
    g = gen(81)
    spec = _tiny_spec((8, 8))
    params = random_spec_params(spec, g)
    x = torch.randn(2, 1, 2, 2, generator=g)
    mean, var = pfp_forward(spec, params, x)
    mc = _mc_network(spec, params, x, 100_000, g)
    std = mc.var.sqrt()
    assert ((mean.double() - mc.mean).abs() <= 0.25 * std + N_SIGMA * mc.se_mean).all(), (mean, mc.mean)
    assert ((var.double() / mc.var).log().abs() <= math.log(2.0)).all(), (var, mc.var)


def test_relu_moments_stay_accurate_in_the_lower_tail():
    # ndtr's (1 + erf) / 2 loses the lower tail in float32 (ndtr(-6) == 0); the erfc form does not.
    mean = torch.tensor([-5.0, -4.0, -3.0, -1.0, 2.0])
    var = torch.ones(5)
    relu_mean, _ = relu(mean, var)
    a = mean.double()
    exact = a * stats.norm.cdf(a.numpy()) + stats.norm.pdf(a.numpy())
    assert torch.allclose(relu_mean.double(), torch.as_tensor(exact), rtol=1e-4, atol=0)
