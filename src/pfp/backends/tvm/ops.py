"""Tensor-expression (TE) operators of the Probabilistic Forward Pass for TVM 0.27.

Every Gaussian activation is a pair of float32 tensors ``(mean, var)`` shaped like the
activation (batch first, NCHW for images). The operators implement the same equations and the
same numerically careful forms as :mod:`pfp.backends.torch_ref` (the ground truth they are
tested against):

* linear layers use the all-positive variance form
  ``var = var_x * E[w^2] + mu_x^2 * sigma_w^2 + var_b`` (first layer: ``x^2 * sigma_w^2 + var_b``);
  the weight terms ``E[w^2]`` and ``sigma_w^2`` are separate input arrays precomputed at
  conversion time, never recomputed per inference;
* ReLU and Clark's max use ``var * (Phi(a) + h(a))`` / ``var1 Phi(a) + var2 Phi(-a) + t^2 h(a)``
  with ``h(a) = a^2 Phi(a) Phi(-a) + a phi(a) (Phi(-a) - Phi(a)) - phi(a)^2``, standardised
  arguments clamped to +-40.

Joint operators (``*_joint``) compute mean and variance in ONE reduction: a tuple
``te.comm_reducer`` (sum of pairs) gives one TIR block with two accumulators that share the
loads of the input and of the weights; the bias is added by an epilogue block of the same
operator (TE's ``init=`` argument of a reduction is silently dropped by
``te.create_prim_func`` in TVM 0.27, so the bias cannot be the accumulator's initial value).
The separate-path operators (``*_mean`` / ``*_var``) are two ordinary single-output
reductions, for the ablation. The deterministic operators serve the deterministic twin.

The standard normal cdf is evaluated from an accurate upper-tail function
``Q(|a|) = erfc(|a|/sqrt 2)/2 = phi(a) t G(t) sqrt(pi/2)`` with ``t = 1/(1 + |a|/(2 sqrt 2))`` and
``G`` a polynomial fit of the scaled ``erfcx`` (float32 relative error < 7e-7 for ``|a| < 5``, then
growing like ``a^2/2`` float32 epsilons from the rounding of ``a^2``), so ``Phi(a)``
and ``Phi(-a)`` both keep their relative accuracy in the tails, and ``Phi`` costs no exp beyond
the one ``phi`` needs. TVM has no ``erfc`` intrinsic, and ``(1 + erf)/2`` loses all relative
accuracy below a ~ -4.

All functions take and return ``te.Tensor`` objects, so they plug into
``relax.BlockBuilder.emit_te`` (see :mod:`pfp.backends.tvm.build`) or into
``te.create_prim_func`` (see :func:`make_prim_func`) for per-operator tests and tuning.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import tvm
from tvm import te, tirx

__all__ = [
    "CLARK_EPS",
    "MAX_STD_ARG",
    "RELU_VAR_EPS",
    "conv2d",
    "conv2d_ensemble",
    "conv2d_joint",
    "conv2d_joint_first",
    "conv2d_var",
    "conv2d_var_first",
    "channels_last_suits",
    "conv_output_size",
    "dense",
    "dense_ensemble",
    "dense_joint",
    "dense_joint_first",
    "dense_var",
    "dense_var_first",
    "flatten",
    "flatten_gaussian",
    "CompiledOp",
    "make_prim_func",
    "maxpool2x2",
    "maxpool2x2_gaussian",
    "relu",
    "relu_gaussian",
]

DTYPE = "float32"
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


def _f(value: float) -> tirx.PrimExpr:
    return tirx.const(value, DTYPE)


def _ints(shape) -> tuple[int, ...]:
    """Static shape as Python ints (TE shapes are IntImm, int32 or int64)."""
    try:
        return tuple(int(dim) for dim in shape)
    except TypeError:
        raise ValueError(f"the PFP operators need static shapes, got {list(shape)}") from None


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


def _clark_h(a, cdf, cdf_neg, pdf) -> tirx.PrimExpr:
    """h(a) = a^2 Phi(a) Phi(-a) + a phi(a) (Phi(-a) - Phi(a)) - phi(a)^2 (<= 0)."""
    return a * a * cdf * cdf_neg + a * pdf * (cdf_neg - cdf) - pdf * pdf


def _max2(lets: _Lets, mean1, var1, mean2, var2) -> tuple[tirx.PrimExpr, tirx.PrimExpr]:
    """Clark's moment matching of max(X1, X2); returns unbound (mean, var) expressions."""
    var1 = lets("var1", tirx.max(var1, _f(0.0)))
    var2 = lets("var2", tirx.max(var2, _f(0.0)))
    t2 = lets("t2", var1 + var2 + _f(CLARK_EPS))
    t = lets("t", tirx.sqrt(t2))
    a = lets("a", _clamp_std_arg((mean1 - mean2) / t))
    cdf, cdf_neg, pdf = _normal_stats(lets, a)
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


def _pair_sum():
    """Commutative reducer over pairs: (a0, a1) + (b0, b1) = (a0 + b0, a1 + b1)."""
    return te.comm_reducer(lambda a, b: (a[0] + b[0], a[1] + b[1]),
                           lambda t0, t1: (tirx.const(0, t0), tirx.const(0, t1)),
                           name="pair_sum")


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


# --------------------------------------------------------------------------- dense

def _dense_shapes(x: te.Tensor, weight: te.Tensor, bias: te.Tensor) -> tuple[int, int, int]:
    batch, in_features = _ints(x.shape)
    out_features, w_in = _ints(weight.shape)
    _check(w_in == in_features, f"dense: weight {_ints(weight.shape)} does not match input {_ints(x.shape)}")
    _check(_ints(bias.shape) == (out_features,), f"dense: bias {_ints(bias.shape)} does not match weight")
    return batch, in_features, out_features


def _bias_epilogue(acc: Sequence[te.Tensor], biases: Sequence[te.Tensor], names: Sequence[str]) -> list[te.Tensor]:
    """out[b, o, ...] = acc[b, o, ...] + bias[o] for each (accumulator, bias) pair."""
    def make(a: te.Tensor, bias: te.Tensor):
        return lambda b, o, *rest: a[(b, o, *rest)] + bias[o]

    return [te.compute(a.shape, make(a, bias), name=name) for a, bias, name in zip(acc, biases, names)]


def dense_joint_first(x: te.Tensor, weight_mean: te.Tensor, weight_var: te.Tensor,
                      bias_mean: te.Tensor, bias_var: te.Tensor) -> list[te.Tensor]:
    """Gaussian dense on a deterministic input x (B, in): [mean, var], each (B, out).

    mean = x W_mu^T + b_mu, var = x^2 sigma_w^2^T + var_b, in one pair reduction.
    """
    batch, in_features, out_features = _dense_shapes(x, weight_mean, bias_mean)
    k = te.reduce_axis((0, in_features), name="k")
    pair = _pair_sum()
    acc = te.compute(
        (batch, out_features),
        lambda b, o: pair((x[b, k] * weight_mean[o, k], x[b, k] * x[b, k] * weight_var[o, k]), axis=k),
        name="dense_joint_first_acc")
    return _bias_epilogue(acc, (bias_mean, bias_var), ("dense_mean", "dense_var"))


def dense_joint(mean: te.Tensor, var: te.Tensor, weight_mean: te.Tensor, weight_m2: te.Tensor,
                weight_var: te.Tensor, bias_mean: te.Tensor, bias_var: te.Tensor) -> list[te.Tensor]:
    """Gaussian dense on independent Gaussian inputs N(mean, var) (B, in): [mean, var] (B, out).

    mean = mu_x W_mu^T + b_mu; var = var_x E[w^2]^T + mu_x^2 sigma_w^2^T + var_b (all-positive
    form, no cancellation), both accumulated in ONE reduction over the input features.
    """
    batch, in_features, out_features = _dense_shapes(mean, weight_mean, bias_mean)
    _check(_ints(var.shape) == (batch, in_features), "dense: mean and variance inputs differ in shape")
    k = te.reduce_axis((0, in_features), name="k")
    pair = _pair_sum()
    acc = te.compute(
        (batch, out_features),
        lambda b, o: pair((mean[b, k] * weight_mean[o, k],
                           var[b, k] * weight_m2[o, k] + mean[b, k] * mean[b, k] * weight_var[o, k]), axis=k),
        name="dense_joint_acc")
    return _bias_epilogue(acc, (bias_mean, bias_var), ("dense_mean", "dense_var"))


def dense(x: te.Tensor, weight: te.Tensor, bias: te.Tensor) -> te.Tensor:
    """Ordinary dense layer x W^T + b (deterministic twin; also the separate-path mean)."""
    batch, in_features, out_features = _dense_shapes(x, weight, bias)
    k = te.reduce_axis((0, in_features), name="k")
    acc = te.compute((batch, out_features), lambda b, o: te.sum(x[b, k] * weight[o, k], axis=k), name="dense_acc")
    return _bias_epilogue([acc], [bias], ["dense"])[0]


def dense_var_first(x: te.Tensor, weight_var: te.Tensor, bias_var: te.Tensor) -> te.Tensor:
    """Separate-path variance of the first dense layer: x^2 sigma_w^2^T + var_b."""
    batch, in_features, out_features = _dense_shapes(x, weight_var, bias_var)
    k = te.reduce_axis((0, in_features), name="k")
    acc = te.compute((batch, out_features), lambda b, o: te.sum(x[b, k] * x[b, k] * weight_var[o, k], axis=k),
                     name="dense_var_first_acc")
    return _bias_epilogue([acc], [bias_var], ["dense_var"])[0]


def dense_var(mean: te.Tensor, var: te.Tensor, weight_m2: te.Tensor, weight_var: te.Tensor,
              bias_var: te.Tensor) -> te.Tensor:
    """Separate-path variance of a hidden dense layer: var_x E[w^2]^T + mu_x^2 sigma_w^2^T + var_b."""
    batch, in_features, out_features = _dense_shapes(mean, weight_var, bias_var)
    _check(_ints(var.shape) == (batch, in_features), "dense: mean and variance inputs differ in shape")
    k = te.reduce_axis((0, in_features), name="k")
    acc = te.compute(
        (batch, out_features),
        lambda b, o: te.sum(var[b, k] * weight_m2[o, k] + mean[b, k] * mean[b, k] * weight_var[o, k], axis=k),
        name="dense_var_acc")
    return _bias_epilogue([acc], [bias_var], ["dense_var"])[0]


# --------------------------------------------------------------------------- conv2d (NCHW)

def conv_output_size(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


def _conv_shapes(x: te.Tensor, weight: te.Tensor, bias: te.Tensor, stride: int, padding: int,
                 channels_last: bool = False):
    _check(len(x.shape) == 4, f"conv2d: input must be NCHW, got shape {_ints(x.shape)}")
    _check(len(weight.shape) == 4, f"conv2d: weight must have 4 dims, got shape {_ints(weight.shape)}")
    batch, channels, height, width = _ints(x.shape)
    if channels_last:
        w_channels, kh, kw, out_channels = _ints(weight.shape)
        _check(stride == 1, f"conv2d: the channels-last form needs stride 1, got {stride}")
    else:
        out_channels, w_channels, kh, kw = _ints(weight.shape)
    _check(w_channels == channels, f"conv2d: weight {_ints(weight.shape)} does not match input {_ints(x.shape)}")
    _check(_ints(bias.shape) == (out_channels,), f"conv2d: bias {_ints(bias.shape)} does not match weight")
    _check(stride >= 1 and padding >= 0, f"conv2d: invalid stride {stride} / padding {padding}")
    out_h = conv_output_size(height, kh, stride, padding)
    out_w = conv_output_size(width, kw, stride, padding)
    _check(out_h >= 1 and out_w >= 1, f"conv2d: kernel {kh}x{kw} larger than padded input {_ints(x.shape)}")
    return (batch, out_channels, out_h, out_w), (channels, kh, kw)


#: Flat stride-1 convolutions compute a multiple of this many output positions: two SIMD registers
#: of the widest target we schedule for (AVX2: 2 x 8), so the schedule can cut them into two-register
#: vectors (see schedules._conv_position_lanes).
FLAT_ALIGN = 16
#: ... except the hidden-layer joint and variance convolutions (two inputs per term): their schedule
#: keeps one-register vectors, so 8 suffices (LeNet's conv2: 136 positions, not 144).
FLAT_ALIGN_TWO_INPUTS = 8
#: Annotation on a flat conv input block: its padded row width (the schedule vectorises it row by row).
FLAT_ROW_ANNOTATION = "pfp.flat_row"
#: Annotation on a block of a load or two per element (a convolution's padded input, its bias
#: epilogue): the schedule parallelises it only when large (see schedules.PARALLEL_MIN_LIGHT).
LIGHT_ANNOTATION = "pfp.light"
#: Annotation on a channels-last accumulator block (see :func:`channels_last_suits`).
CHANNELS_LAST_ANNOTATION = "pfp.channels_last"
#: Output channels a channels-last convolution vectorises at a time: two AVX2 registers, one
#: AVX-512 register, four NEON registers.
CHANNEL_VECTOR = 16


def channels_last_suits(out_channels: int, stride: int) -> bool:
    """Whether a convolution should take the channels-last form (``channels_last=True`` of the conv ops).

    That form vectorises the output channels: each input element is broadcast once and
    multiplies a vector of weights, ``(C, kh, kw, O)``-ordered so that the weights of consecutive
    channels are adjacent; the accumulator is ``(B, oh, ow, O)``. It computes exactly the output
    positions, where the flat form computes whole padded rows (LeNet's conv2: 136 positions for
    100), and needs whole channel vectors: stride 1 and ``out_channels`` a multiple of
    :data:`CHANNEL_VECTOR`.
    """
    return stride == 1 and out_channels % CHANNEL_VECTOR == 0


class _ConvGrid:
    """Where a convolution's reductions read their input and write their output.

    Stride 1 (LeNet's convolutions) uses the *flat* form: the zero-padded input planes are laid out
    as rows of width ``Wp`` in one flat buffer per (batch, channel), and the accumulator runs over
    flat positions ``p = i * Wp + j``, reading ``x[p + ry * Wp + rx]``: consecutive positions read
    consecutive inputs across row ends, so every SIMD vector is full (LeNet's 10-wide output rows
    had become an 8-lane and a shuffled 2-lane vector). The ``Wp - out_w`` positions past each row's
    end are computed and never read; the bias epilogue picks ``acc[i * Wp + j]``. Other strides read
    the padded NCHW input directly, one output row at a time.
    """

    def __init__(self, x: te.Tensor, out_shape: tuple[int, ...], reduce_shape: tuple[int, int, int], stride: int,
                 padding: int, align: int = FLAT_ALIGN, channels_last: bool = False) -> None:
        self.batch, self.channels, self.height, self.width = _ints(x.shape)
        self.out_shape, self.stride, self.padding = out_shape, stride, padding
        _, kh, kw = reduce_shape
        self.channels_last = channels_last
        self.flat = stride == 1 and not channels_last
        self.row = self.width + 2 * padding
        out_h, out_w = out_shape[2:]
        self.positions = -(-((out_h - 1) * self.row + out_w) // align) * align
        # rows of the flat buffer: the last position's window must stay inside (zeros past the padded input)
        self.rows = -(-(self.positions + (kh - 1) * self.row + kw - 1) // self.row)

    @property
    def acc_shape(self) -> tuple[int, ...]:
        if self.channels_last:
            batch, out_channels, out_h, out_w = self.out_shape
            return (batch, out_h, out_w, out_channels)
        return (*self.out_shape[:2], self.positions) if self.flat else self.out_shape

    def accumulate(self, fcompute: Callable, name: str):
        """The accumulator block(s): ``fcompute(b, o, *position)`` summed per output."""
        if not self.channels_last:
            return te.compute(self.acc_shape, fcompute, name=name)
        return te.compute(self.acc_shape, lambda b, i, j, o: fcompute(b, o, i, j), name=name,
                          attrs={CHANNELS_LAST_ANNOTATION: 1})

    def weight(self, w: te.Tensor, o, c, ry, rx, *lead) -> tirx.PrimExpr:
        """Weight of output channel ``o``, input channel ``c``, tap (ry, rx) in this form's layout
        (after the ``lead`` indices, e.g. an ensemble member's)."""
        return w[(*lead, c, ry, rx, o)] if self.channels_last else w[(*lead, o, c, ry, rx)]

    def prepare(self, x: te.Tensor, name: str) -> te.Tensor:
        """The input as the reductions read it: padded (and, when flat, laid out in rows of ``Wp``)."""
        padding, height, width = self.padding, self.height, self.width
        if not self.flat:
            if padding == 0:
                return x

            def padded(b, c, i, j):
                inside = tirx.all(i >= padding, i < height + padding, j >= padding, j < width + padding)
                return tirx.if_then_else(inside, x[b, c, i - padding, j - padding], _f(0.0))

            return te.compute((self.batch, self.channels, height + 2 * padding, width + 2 * padding), padded,
                              name=name)
        row = self.row

        def flat(b, c, p):
            i, j = p // row - padding, p % row - padding
            inside = tirx.all(i >= 0, i < height, j >= 0, j < width)
            return tirx.if_then_else(inside, x[b, c, i, j], _f(0.0))

        return te.compute((self.batch, self.channels, self.rows * row), flat, name=name,
                          attrs={FLAT_ROW_ANNOTATION: row, LIGHT_ANNOTATION: 1})

    def read(self, xp: te.Tensor, b, c, position: Sequence, ry, rx) -> tirx.PrimExpr:
        """Input element under kernel tap (ry, rx) of output ``position`` ((p,) flat, else (i, j))."""
        if self.flat:
            (p,) = position
            return xp[b, c, p + ry * self.row + rx]
        i, j = position
        return xp[b, c, i * self.stride + ry, j * self.stride + rx]

    def at(self, acc: te.Tensor, b, o, i, j) -> tirx.PrimExpr:
        """The accumulator of output (b, o, i, j)."""
        if self.channels_last:
            return acc[b, i, j, o]
        return acc[b, o, i * self.row + j] if self.flat else acc[b, o, i, j]

    def epilogue(self, acc: Sequence[te.Tensor], biases: Sequence[te.Tensor], names: Sequence[str]) -> list[te.Tensor]:
        """out[b, o, i, j] = accumulator + bias[o], shaped NCHW."""
        def make(a: te.Tensor, bias: te.Tensor):
            return lambda b, o, i, j: self.at(a, b, o, i, j) + bias[o]

        return [te.compute(self.out_shape, make(a, bias), name=name, attrs={LIGHT_ANNOTATION: 1})
                for a, bias, name in zip(acc, biases, names)]


def _conv_axes(reduce_shape):
    channels, kh, kw = reduce_shape
    return (te.reduce_axis((0, channels), name="rc"), te.reduce_axis((0, kh), name="ry"),
            te.reduce_axis((0, kw), name="rx"))


def conv2d_joint_first(x: te.Tensor, weight_mean: te.Tensor, weight_var: te.Tensor, bias_mean: te.Tensor,
                       bias_var: te.Tensor, stride: int = 1, padding: int = 0,
                       channels_last: bool = False) -> list[te.Tensor]:
    """Gaussian conv2d (NCHW) on a deterministic input: [mean, var] in one pair reduction.

    Weights are (O, C, kh, kw), or (C, kh, kw, O) with ``channels_last`` (see :func:`channels_last_suits`).
    """
    out_shape, reduce_shape = _conv_shapes(x, weight_mean, bias_mean, stride, padding, channels_last)
    grid = _ConvGrid(x, out_shape, reduce_shape, stride, padding, channels_last=channels_last)
    xp = grid.prepare(x, "pad_x")
    rc, ry, rx = _conv_axes(reduce_shape)
    pair = _pair_sum()

    def fcompute(b, o, *position):
        xv = grid.read(xp, b, rc, position, ry, rx)
        return pair((xv * grid.weight(weight_mean, o, rc, ry, rx), xv * xv * grid.weight(weight_var, o, rc, ry, rx)),
                    axis=[rc, ry, rx])

    acc = grid.accumulate(fcompute, "conv2d_joint_first_acc")
    return grid.epilogue(acc, (bias_mean, bias_var), ("conv2d_mean", "conv2d_var"))


def conv2d_joint(mean: te.Tensor, var: te.Tensor, weight_mean: te.Tensor, weight_m2: te.Tensor,
                 weight_var: te.Tensor, bias_mean: te.Tensor, bias_var: te.Tensor, stride: int = 1,
                 padding: int = 0, channels_last: bool = False) -> list[te.Tensor]:
    """Gaussian conv2d (NCHW) on Gaussian inputs: [mean, var] in one pair reduction (all-positive var).

    Weights are (O, C, kh, kw), or (C, kh, kw, O) with ``channels_last`` (see :func:`channels_last_suits`).
    """
    out_shape, reduce_shape = _conv_shapes(mean, weight_mean, bias_mean, stride, padding, channels_last)
    _check(_ints(var.shape) == _ints(mean.shape), "conv2d: mean and variance inputs differ in shape")
    grid = _ConvGrid(mean, out_shape, reduce_shape, stride, padding, FLAT_ALIGN_TWO_INPUTS, channels_last)
    mp = grid.prepare(mean, "pad_mean")
    vp = grid.prepare(var, "pad_var")
    rc, ry, rx = _conv_axes(reduce_shape)
    pair = _pair_sum()

    def fcompute(b, o, *position):
        m = grid.read(mp, b, rc, position, ry, rx)
        return pair((m * grid.weight(weight_mean, o, rc, ry, rx),
                     grid.read(vp, b, rc, position, ry, rx) * grid.weight(weight_m2, o, rc, ry, rx)
                     + m * m * grid.weight(weight_var, o, rc, ry, rx)),
                    axis=[rc, ry, rx])

    acc = grid.accumulate(fcompute, "conv2d_joint_acc")
    return grid.epilogue(acc, (bias_mean, bias_var), ("conv2d_mean", "conv2d_var"))


def conv2d(x: te.Tensor, weight: te.Tensor, bias: te.Tensor, stride: int = 1, padding: int = 0,
           channels_last: bool = False) -> te.Tensor:
    """Ordinary conv2d NCHW + bias (deterministic twin; also the separate-path mean).

    The weight is (O, C, kh, kw), or (C, kh, kw, O) with ``channels_last`` (see :func:`channels_last_suits`).
    """
    out_shape, reduce_shape = _conv_shapes(x, weight, bias, stride, padding, channels_last)
    grid = _ConvGrid(x, out_shape, reduce_shape, stride, padding, channels_last=channels_last)
    xp = grid.prepare(x, "pad_x")
    rc, ry, rx = _conv_axes(reduce_shape)
    acc = grid.accumulate(
        lambda b, o, *position: te.sum(grid.read(xp, b, rc, position, ry, rx) * grid.weight(weight, o, rc, ry, rx),
                                       axis=[rc, ry, rx]),
        "conv2d_acc")
    return grid.epilogue([acc], [bias], ["conv2d"])[0]


def conv2d_var_first(x: te.Tensor, weight_var: te.Tensor, bias_var: te.Tensor, stride: int = 1,
                     padding: int = 0, channels_last: bool = False) -> te.Tensor:
    """Separate-path variance of a first conv layer: conv(x^2, sigma_w^2) + var_b."""
    out_shape, reduce_shape = _conv_shapes(x, weight_var, bias_var, stride, padding, channels_last)
    grid = _ConvGrid(x, out_shape, reduce_shape, stride, padding, channels_last=channels_last)
    xp = grid.prepare(x, "pad_x")
    rc, ry, rx = _conv_axes(reduce_shape)

    def fcompute(b, o, *position):
        xv = grid.read(xp, b, rc, position, ry, rx)
        return te.sum(xv * xv * grid.weight(weight_var, o, rc, ry, rx), axis=[rc, ry, rx])

    acc = grid.accumulate(fcompute, "conv2d_var_first_acc")
    return grid.epilogue([acc], [bias_var], ["conv2d_var"])[0]


def conv2d_var(mean: te.Tensor, var: te.Tensor, weight_m2: te.Tensor, weight_var: te.Tensor,
               bias_var: te.Tensor, stride: int = 1, padding: int = 0, channels_last: bool = False) -> te.Tensor:
    """Separate-path variance of a hidden conv layer: conv(var, E[w^2]) + conv(mu^2, sigma_w^2) + var_b."""
    out_shape, reduce_shape = _conv_shapes(mean, weight_var, bias_var, stride, padding, channels_last)
    _check(_ints(var.shape) == _ints(mean.shape), "conv2d: mean and variance inputs differ in shape")
    grid = _ConvGrid(mean, out_shape, reduce_shape, stride, padding, FLAT_ALIGN_TWO_INPUTS, channels_last)
    mp = grid.prepare(mean, "pad_mean")
    vp = grid.prepare(var, "pad_var")
    rc, ry, rx = _conv_axes(reduce_shape)

    def fcompute(b, o, *position):
        m = grid.read(mp, b, rc, position, ry, rx)
        return te.sum(grid.read(vp, b, rc, position, ry, rx) * grid.weight(weight_m2, o, rc, ry, rx)
                      + m * m * grid.weight(weight_var, o, rc, ry, rx), axis=[rc, ry, rx])

    acc = grid.accumulate(fcompute, "conv2d_var_acc")
    return grid.epilogue([acc], [bias_var], ["conv2d_var"])[0]


# --------------------------------------------------------------------------- ensembles (SVI baseline)

def _member_rows(x: te.Tensor, members: int, batch: int, rows: int) -> Callable:
    """Row ``n`` of member ``n // batch``: the shared input (batch rows) or the member's own rows."""
    if rows == batch:
        return lambda n: n % batch
    _check(rows == members * batch, f"ensemble: input has {rows} rows, expected {batch} or {members * batch}")
    return lambda n: n


def dense_ensemble(x: te.Tensor, weight: te.Tensor, bias: te.Tensor, batch: int) -> te.Tensor:
    """S weight draws in one pass: x (B or S*B, in), weight (S, out, in), bias (S, out) -> (S*B, out).

    Row ``s*B + b`` is member ``s`` applied to example ``b``; a (B, in) input is shared by all
    members (the first layer), so the batch is never copied S times.
    """
    members, out_features, in_features = _ints(weight.shape)
    rows, x_in = _ints(x.shape)
    _check(x_in == in_features, f"dense_ensemble: weight {_ints(weight.shape)} does not match input {_ints(x.shape)}")
    _check(_ints(bias.shape) == (members, out_features), f"dense_ensemble: bias {_ints(bias.shape)} does not match weight")
    row = _member_rows(x, members, batch, rows)
    k = te.reduce_axis((0, in_features), name="k")
    acc = te.compute((members * batch, out_features),
                     lambda n, o: te.sum(x[row(n), k] * weight[n // batch, o, k], axis=k), name="dense_ensemble_acc")
    return te.compute(acc.shape, lambda n, o: acc[n, o] + bias[n // batch, o], name="dense_ensemble")


def conv2d_ensemble(x: te.Tensor, weight: te.Tensor, bias: te.Tensor, batch: int, stride: int = 1,
                    padding: int = 0, channels_last: bool = False) -> te.Tensor:
    """S weight draws of a conv2d (NCHW): x (B or S*B, C, H, W), weight (S, O, C, kh, kw) -> (S*B, O, oh, ow).

    With ``channels_last`` each member's weight is (C, kh, kw, O): weight (S, C, kh, kw, O).
    """
    members = _ints(weight.shape)[0]
    rows = _ints(x.shape)[0]
    out_shape, reduce_shape = _conv_shapes(x, te.placeholder(_ints(weight.shape)[1:], DTYPE),
                                           te.placeholder(_ints(bias.shape)[1:], DTYPE), stride, padding, channels_last)
    _check(_ints(bias.shape)[0] == members, f"conv2d_ensemble: bias {_ints(bias.shape)} does not match weight")
    row = _member_rows(x, members, batch, rows)
    grid = _ConvGrid(x, (members * batch, *out_shape[1:]), reduce_shape, stride, padding, channels_last=channels_last)
    xp = grid.prepare(x, "pad_x")
    rc, ry, rx = _conv_axes(reduce_shape)

    acc = grid.accumulate(
        lambda n, o, *position: te.sum(grid.read(xp, row(n), rc, position, ry, rx)
                                       * grid.weight(weight, o, rc, ry, rx, n // batch), axis=[rc, ry, rx]),
        "conv2d_ensemble_acc")
    return te.compute(grid.out_shape, lambda n, o, i, j: grid.at(acc, n, o, i, j) + bias[n // batch, o],
                      name="conv2d_ensemble")


# --------------------------------------------------------------------------- non-linearities

def relu_gaussian(mean: te.Tensor, var: te.Tensor) -> list[te.Tensor]:
    """Moment-matched ReLU of N(mean, var), elementwise (any rank): [mean, var].

    Each output is its own block (TE gives a multi-output elementwise compute one block per
    output); each block evaluates only the expressions its output needs.
    """
    _check(_ints(mean.shape) == _ints(var.shape), "relu: mean and variance differ in shape")

    def make(which: int):
        def fcompute(*index):
            lets = _Lets()
            out = _relu_moments(lets, mean[index], var[index])[which]
            return lets.wrap(out)
        return fcompute

    return [te.compute(mean.shape, make(0), name="relu_mean"), te.compute(mean.shape, make(1), name="relu_var")]


def relu(x: te.Tensor) -> te.Tensor:
    """Deterministic ReLU."""
    return te.compute(x.shape, lambda *index: tirx.max(x[index], _f(0.0)), name="relu")


def _pool_shape(x: te.Tensor) -> tuple[int, int, int, int]:
    _check(len(x.shape) == 4, f"maxpool2x2: input must be NCHW, got shape {_ints(x.shape)}")
    batch, channels, height, width = _ints(x.shape)
    _check(height % 2 == 0 and width % 2 == 0, f"maxpool2x2: needs even height and width, got {height}x{width}")
    return batch, channels, height // 2, width // 2


def maxpool2x2_gaussian(mean: te.Tensor, var: te.Tensor) -> list[te.Tensor]:
    """2x2 max-pool, stride 2 (NCHW), by pairwise Clark max: [mean, var].

    Horizontal pairs first, ``(i, 2j) | (i, 2j+1)`` -> (B, C, H, W/2), then vertical pairs
    ``(2i, j) | (2i+1, j)`` of that -> (B, C, H/2, W/2): output (i, j) reads exactly its own
    window (rows 2i, 2i+1, columns 2j, 2j+1), in the order of
    :func:`pfp.backends.torch_ref.maxpool2x2`.

    Two stages rather than one fused expression: the same arithmetic (each output block
    evaluates 3 Clark maxima either way), but a fused expression nests ~40 ``let`` bindings,
    which makes TVM 0.27's LLVM code generation ~30x slower (2 s instead of 0.07 s per operator).
    """
    _check(_ints(mean.shape) == _ints(var.shape), "maxpool2x2: mean and variance differ in shape")
    batch, channels, out_h, out_w = _pool_shape(mean)

    def make(src_mean: te.Tensor, src_var: te.Tensor, which: int, horizontal: bool):
        def fcompute(b, c, i, j):
            lets = _Lets()
            if horizontal:
                first, second = (b, c, i, 2 * j), (b, c, i, 2 * j + 1)
            else:
                first, second = (b, c, 2 * i, j), (b, c, 2 * i + 1, j)
            moments = _max2(lets, src_mean[first], src_var[first], src_mean[second], src_var[second])
            return lets.wrap(moments[which])
        return fcompute

    row_shape = (batch, channels, 2 * out_h, out_w)
    row_mean = te.compute(row_shape, make(mean, var, 0, True), name="maxpool_row_mean")
    row_var = te.compute(row_shape, make(mean, var, 1, True), name="maxpool_row_var")
    out_shape = (batch, channels, out_h, out_w)
    return [te.compute(out_shape, make(row_mean, row_var, 0, False), name="maxpool_mean"),
            te.compute(out_shape, make(row_mean, row_var, 1, False), name="maxpool_var")]


def maxpool2x2(x: te.Tensor) -> te.Tensor:
    """Deterministic 2x2 max-pool, stride 2 (NCHW)."""
    out_shape = _pool_shape(x)

    def fcompute(b, c, i, j):
        top = tirx.max(x[b, c, 2 * i, 2 * j], x[b, c, 2 * i, 2 * j + 1])
        bottom = tirx.max(x[b, c, 2 * i + 1, 2 * j], x[b, c, 2 * i + 1, 2 * j + 1])
        return tirx.max(top, bottom)

    return te.compute(out_shape, fcompute, name="maxpool")


def flatten(x: te.Tensor) -> te.Tensor:
    """(B, d1, d2, ...) -> (B, d1 * d2 * ...), row-major (C, H, W order like torch.flatten(1))."""
    dims = _ints(x.shape)
    batch, rest = dims[0], dims[1:]
    size = math.prod(rest)

    def fcompute(b, k):
        index = []
        for dim in reversed(rest):
            index.append(k % dim)
            k = k // dim
        return x[(b, *reversed(index))]

    return te.compute((batch, size), fcompute, name="flatten")


def flatten_gaussian(mean: te.Tensor, var: te.Tensor) -> list[te.Tensor]:
    return [flatten(mean), flatten(var)]


# --------------------------------------------------------------------------- stand-alone kernels

def _op_prim_func(op, input_shapes, kwargs) -> tuple[tvm.tirx.PrimFunc, list[tuple[int, ...]]]:
    inputs = [te.placeholder(tuple(int(d) for d in shape), DTYPE, name=f"in{index}")
              for index, shape in enumerate(input_shapes)]
    outputs = op(*inputs, **kwargs)
    outputs = list(outputs) if isinstance(outputs, list | tuple) else [outputs]
    func = te.create_prim_func(inputs + outputs).with_attr("global_symbol", "main")
    return func, [_ints(out.shape) for out in outputs]


def make_prim_func(op: Callable[..., te.Tensor | Sequence[te.Tensor]], input_shapes: Sequence[Sequence[int]],
                   **kwargs) -> tvm.tirx.PrimFunc:
    """A stand-alone PrimFunc ``main`` of one operator: parameters are the inputs, then the outputs.

    For per-operator benchmarks and ``meta_schedule.tune_tir``::

        f = make_prim_func(dense_joint_first, [(8, 784), (100, 784), (100, 784), (100,), (100,)])
    """
    return _op_prim_func(op, input_shapes, kwargs)[0]


class CompiledOp:
    """One operator compiled on its own; ``op(*numpy_inputs) -> list of numpy outputs``."""

    def __init__(self, op: Callable, input_shapes: Sequence[Sequence[int]], target=None, **kwargs) -> None:
        self.input_shapes = [tuple(int(d) for d in shape) for shape in input_shapes]
        self.prim_func, self.output_shapes = _op_prim_func(op, self.input_shapes, kwargs)
        self.target = target if target is not None else tvm.target.Target({"kind": "llvm"})
        self.executable = tvm.compile(self.prim_func, target=self.target)
        self._device = tvm.cpu()

    def __call__(self, *inputs) -> list:
        import numpy as np

        if len(inputs) != len(self.input_shapes):
            raise ValueError(f"expected {len(self.input_shapes)} inputs, got {len(inputs)}")
        args = []
        for index, (value, shape) in enumerate(zip(inputs, self.input_shapes)):
            value = np.ascontiguousarray(value, dtype=np.float32)
            if value.shape != shape:
                raise ValueError(f"input {index}: expected shape {shape}, got {value.shape}")
            args.append(tvm.runtime.tensor(value, self._device))
        outputs = [tvm.runtime.empty(shape, DTYPE, self._device) for shape in self.output_shapes]
        self.executable["main"](*args, *outputs)
        return [out.numpy() for out in outputs]
