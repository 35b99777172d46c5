"""Gaussian math in TIR expressions: phi and Phi (one exp, an erfcx fit; or logistic), exp, Clark's max, ReLU moments.

Same constants and forms as :mod:`pfp.backends.torch_ref`; see the package docstring for the
accuracy of Phi in the tails.
"""

from __future__ import annotations

import math

from tvm import tirx

from pfp.backends.tvm.ops.common import DTYPE, _f

__all__ = ["CLARK_EPS", "LOGISTIC_C1", "LOGISTIC_C3", "MAX_STD_ARG", "RELU_VAR_EPS"]

#: Same constants as :mod:`pfp.backends.torch_ref` (a test checks they agree).
CLARK_EPS = 1e-12
RELU_VAR_EPS = 1e-12
MAX_STD_ARG = 40.0

_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_INV_SQRT_2 = 1.0 / math.sqrt(2.0)
# erfc(u) = t exp(-u^2) G(t), t = 1 / (1 + u/2), u = |a|/sqrt 2 in [0, MAX_STD_ARG/sqrt 2]: G(t) =
# erfcx(u)/t is smooth on t in [0.066, 1] (G(0+) = 1/(2 sqrt pi)). Degree-10 least-squares fit of G
# in relative error over that range (Chebyshev basis, from scipy.special.erfcx; max relative error
# 2.4e-8 in float64, 1.7e-7 evaluated in float32), coefficients from the constant term upwards.
# exp(-u^2) = exp(-a^2/2) = sqrt(2 pi) phi(a), so Q(|a|) = erfc(u)/2 needs no exp beyond phi's.
_ERFCX_COEFFS = (2.8209483662e-01, 2.8209079312e-01, 2.4694893259e-01, 1.7466044126e-01, 9.7172738404e-02,
                 -7.1896198497e-02, 1.5940363303e-01, -4.9187202767e-01, 5.2432411159e-01, -2.4894337666e-01,
                 4.6016139702e-02)


# --------------------------------------------------------------------------- expression helpers

class _Lets:
    """Collects ``let`` bindings so a scalar is computed once per element, then wraps a body.

    Without bindings a TE expression is a tree: a value used k times is copied k times, and
    nested Clark maxima would blow the expression up multiplicatively.
    """

    def __init__(self) -> None:
        self._bindings: list[tuple[tirx.Var, tirx.PrimExpr]] = []

    def __call__(self, name: str, value: tirx.PrimExpr) -> tirx.Var:
        var = tirx.Var(name, DTYPE)
        self._bindings.append((var, value))
        return var

    def wrap(self, body: tirx.PrimExpr) -> tirx.PrimExpr:
        for var, value in reversed(self._bindings):
            body = tirx.Let(var, value, body)
        return body


def _clamp_std_arg(a: tirx.PrimExpr) -> tirx.PrimExpr:
    return tirx.max(tirx.min(a, _f(MAX_STD_ARG)), _f(-MAX_STD_ARG))


# exp(x) = 2^n exp(r), n = round(x / ln 2), r = x - n ln 2 in [-ln2/2, ln2/2] (ln 2 split in two
# for an exact product); exp(r) by Cephes' expf polynomial (relative error < 2e-7).
_LN2_HI, _LN2_LO = 0.693359375, -2.12194440e-4
_EXP_COEFFS = (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1,
               5.0000001201e-1)
_EXP_MAX, _EXP_MIN = 88.0, -87.0  # 2^n stays a normal float32 within [-87, 88]


def _exp(lets: _Lets, x: tirx.PrimExpr) -> tirx.PrimExpr:
    """exp(x) in plain arithmetic (float32, relative error < 3e-7; 0 below exp(-87)).

    LLVM turns ``tirx.exp`` into one libm call per element even in a vectorised loop, which made
    the Gaussian ReLU / max-pool kernels ~10x slower than their arithmetic; this form vectorises.
    The reduced argument is bound once (``lets``): as a tree it would be copied into every use.
    """
    clamped = lets("exp_arg", tirx.min(tirx.max(x, _f(_EXP_MIN)), _f(_EXP_MAX)))
    n = lets("exp_n", tirx.floor(clamped * _f(1.0 / math.log(2.0)) + _f(0.5)))
    r = lets("exp_r", clamped - n * _f(_LN2_HI) - n * _f(_LN2_LO))
    poly = _f(_EXP_COEFFS[0])
    for coeff in _EXP_COEFFS[1:]:
        poly = poly * r + _f(coeff)
    exp_r = poly * r * r + r + _f(1.0)
    two_n = tirx.reinterpret(DTYPE, tirx.shift_left(tirx.Cast("int32", n) + 127, 23))
    return tirx.Select(x < _f(_EXP_MIN), _f(0.0), exp_r * two_n)


def _normal_stats(lets: _Lets, a: tirx.PrimExpr) -> tuple[tirx.Var, tirx.Var, tirx.Var]:
    """(Phi(a), Phi(-a), phi(a)) with relative accuracy in both tails (one exp, one erfcx fit)."""
    minus_half_a2 = lets("minus_half_a2", _f(-0.5) * a * a)
    pdf = lets("pdf", _exp(lets, minus_half_a2) * _f(_INV_SQRT_2PI))
    t = lets("t", _f(1.0) / (_f(1.0) + _f(0.5 * _INV_SQRT_2) * tirx.abs(a)))
    scale = 0.5 * math.sqrt(2.0 * math.pi)  # Q = erfc(u)/2 = t G(t) sqrt(2 pi) phi / 2
    poly = _f(_ERFCX_COEFFS[-1] * scale)
    for coeff in reversed(_ERFCX_COEFFS[:-1]):
        poly = _f(coeff * scale) + t * poly
    upper = lets("q", t * poly * pdf)  # Q(|a|) = Phi(-|a|)
    nonneg = a >= _f(0.0)
    cdf = lets("cdf", tirx.Select(nonneg, _f(1.0) - upper, upper))
    cdf_neg = lets("cdf_neg", tirx.Select(nonneg, upper, _f(1.0) - upper))
    return cdf, cdf_neg, pdf


# Same approximation as pfp.backends.torch_ref.LOGISTIC_C1 (error bounds there; a test checks they agree).
LOGISTIC_C1, LOGISTIC_C3 = 1.5976, 0.07056


def _logistic_stats(lets: _Lets, a: tirx.PrimExpr) -> tuple[tirx.Var, tirx.Var, tirx.Var]:
    """(Phi_L(a), Phi_L(-a), phi_L(a)): Phi_L(a) = sigmoid(a (C1 + C3 a^2)), phi_L = Phi_L'.

    One exp and one division, against one exp, two divisions and the degree-10 erfcx fit of
    :func:`_normal_stats`. The sigmoid is evaluated on -|z| (e <= 1, no overflow) and mirrored.
    """
    a2 = lets("a2", a * a)
    z = lets("z", a * (_f(LOGISTIC_C1) + _f(LOGISTIC_C3) * a2))
    e = _exp(lets, _f(0.0) - tirx.abs(z))
    lower = lets("lower", e / (_f(1.0) + e))  # sigmoid(-|z|)
    nonneg = z >= _f(0.0)
    cdf = lets("cdf", tirx.Select(nonneg, _f(1.0) - lower, lower))
    cdf_neg = lets("cdf_neg", tirx.Select(nonneg, lower, _f(1.0) - lower))
    pdf = lets("pdf", lower * (_f(1.0) - lower) * (_f(LOGISTIC_C1) + _f(3.0 * LOGISTIC_C3) * a2))
    return cdf, cdf_neg, pdf


def _clark_h(a, cdf, cdf_neg, pdf) -> tirx.PrimExpr:
    """h(a) = a^2 Phi(a) Phi(-a) + a phi(a) (Phi(-a) - Phi(a)) - phi(a)^2 (<= 0)."""
    return a * a * cdf * cdf_neg + a * pdf * (cdf_neg - cdf) - pdf * pdf


def _max2(lets: _Lets, mean1, var1, mean2, var2, *, logistic: bool = False) -> tuple[tirx.PrimExpr, tirx.PrimExpr]:
    """Clark's moment matching of max(X1, X2); returns unbound (mean, var) expressions.

    ``logistic``: Phi and phi by the logistic approximation (:func:`_logistic_stats`).
    """
    var1 = lets("var1", tirx.max(var1, _f(0.0)))
    var2 = lets("var2", tirx.max(var2, _f(0.0)))
    t2 = lets("t2", var1 + var2 + _f(CLARK_EPS))
    t = lets("t", tirx.sqrt(t2))
    a = lets("a", _clamp_std_arg((mean1 - mean2) / t))
    cdf, cdf_neg, pdf = (_logistic_stats if logistic else _normal_stats)(lets, a)
    mean = mean1 * cdf + mean2 * cdf_neg + t * pdf
    var = tirx.max(var1 * cdf + var2 * cdf_neg + t2 * _clark_h(a, cdf, cdf_neg, pdf), _f(0.0))
    return mean, var


def _relu_moments(lets: _Lets, mean, var) -> tuple[tirx.PrimExpr, tirx.PrimExpr]:
    """Rectified-Gaussian mean and variance (unbound expressions)."""
    mean = lets("mu", mean)
    var = lets("v", tirx.max(var, _f(0.0)))
    std = lets("std", tirx.sqrt(tirx.max(var, _f(RELU_VAR_EPS))))
    a = lets("a", _clamp_std_arg(mean / std))
    cdf, cdf_neg, pdf = _normal_stats(lets, a)
    out_mean = mean * cdf + std * pdf
    out_var = tirx.max(var * (cdf + _clark_h(a, cdf, cdf_neg, pdf)), _f(0.0))
    # Vanishing variance: ReLU is deterministic there, apply it exactly.
    deterministic = var <= _f(RELU_VAR_EPS)
    return (tirx.Select(deterministic, tirx.max(mean, _f(0.0)), out_mean),
            tirx.Select(deterministic, _f(0.0), out_var))
