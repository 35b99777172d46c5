"""Operators of the covariance-aware PFP's correction (:mod:`pfp.backends.covariance`).

The Jacobian rows of the ``C`` logits are carried as one 2-D tensor ``G`` of shape
``(B * C, units)`` (row ``b * C + c``), so every backward step is one GEMM (``B * C`` rows times
a weight matrix) that the Meta Scheduler can tune; its weights are stored (reduction, outputs) with
the output axis zero-padded, which the hand schedule vectorises (:data:`GEMM_ANNOTATION`).
"""

from __future__ import annotations

from tvm import te, tirx

from pfp.backends.tvm.ops.common import _check, _f, _ints
from pfp.backends.tvm.ops.gaussian import RELU_VAR_EPS, _clamp_std_arg, _Lets, _normal_stats

__all__ = ["GEMM_ANNOTATION", "GEMM_PAD", "covariance_backprop", "covariance_combine", "covariance_exact",
           "covariance_forward", "covariance_noise", "gemm_padded_width", "relu_slope"]


def relu_slope(mean: te.Tensor, var: te.Tensor) -> te.Tensor:
    """E[ReLU'(X)] = Phi(mean / std) for X ~ N(mean, var), elementwise; a step where var vanishes."""
    _check(_ints(mean.shape) == _ints(var.shape), "relu_slope: mean and variance differ in shape")

    def fcompute(*index):
        lets = _Lets()
        mu = lets("mu", mean[index])
        v = lets("v", tirx.max(var[index], _f(0.0)))
        std = lets("std", tirx.sqrt(tirx.max(v, _f(RELU_VAR_EPS))))
        cdf, _, _ = _normal_stats(lets, lets("a", _clamp_std_arg(mu / std)))
        step = tirx.Select(mu > _f(0.0), _f(1.0), _f(0.0))
        return lets.wrap(tirx.Select(v <= _f(RELU_VAR_EPS), step, cdf))

    return te.compute(mean.shape, fcompute, name="relu_slope")


#: Annotation on a row-times-matrix accumulator whose weight is stored (reduction, padded outputs):
#: the hand schedule vectorises the output axis and keeps a register tile of rows x whole padded
#: rows (see :func:`pfp.backends.tvm.schedules.reductions._schedule_gemm`).
GEMM_ANNOTATION = "pfp.gemm"
#: The output axis of those weights is zero-padded to a multiple of this (one AVX-512 register, two
#: AVX2 ones, four NEON ones): 100 units split into 4-lane partial sums ran at a quarter of the speed.
GEMM_PAD = 16


def gemm_padded_width(units: int) -> int:
    """``units`` rounded up to a multiple of :data:`GEMM_PAD` (the stored width of a GEMM weight)."""
    return -(-units // GEMM_PAD) * GEMM_PAD


def _gemm(rows: int, row_value, weight: te.Tensor, name: str) -> te.Tensor:
    """``acc[r, n] = sum_k row_value(r, k) * weight[k, n]`` over the padded width of ``weight``."""
    reduction, width = _ints(weight.shape)
    k = te.reduce_axis((0, reduction), name="k")
    return te.compute((rows, width), lambda r, n: te.sum(row_value(r, k) * weight[k, n], axis=k),
                      name=name, attrs={GEMM_ANNOTATION: 1})


def covariance_backprop(jacobian: te.Tensor | tuple[te.Tensor, te.Tensor | None], weight_mean_padded: te.Tensor,
                        slope: te.Tensor | None, classes: int, batch: int, in_units: int) -> te.Tensor:
    """``G W`` (one dense layer backwards; ``weight_mean_padded`` is W, (out, in) with the in axis
    zero-padded, see :func:`gemm_padded_width`), times the slope of the ReLU before it when there is
    one: (B * C, in).

    ``jacobian`` is ``G`` (B * C, out), or the pair ``(W_last, slope_last)`` for the first step: then
    ``G[b*C + c, k] = W_last[c, k] * slope_last[b, k]`` is formed inside the reduction, never stored (a
    separate broadcasting kernel would be vectorised across rows into gathers).
    """
    if isinstance(jacobian, tuple):
        weight_last, seed_slope = jacobian
        classes_last, out_units = _ints(weight_last.shape)
        _check(classes_last == classes, f"covariance_backprop: last weight has {classes_last} rows, expected {classes}")
        if seed_slope is None:
            def g(r, k):
                return weight_last[r % classes, k]
        else:
            _check(_ints(seed_slope.shape) == (batch, out_units),
                   f"covariance_backprop: slope {_ints(seed_slope.shape)}, expected {(batch, out_units)}")

            def g(r, k):
                return weight_last[r % classes, k] * seed_slope[r // classes, k]
        rows = batch * classes
    else:
        rows, out_units = _ints(jacobian.shape)

        def g(r, k):
            return jacobian[r, k]
    weight_out, width = _ints(weight_mean_padded.shape)
    _check(out_units == weight_out, f"covariance_backprop: jacobian has {out_units} units, weight {weight_out}")
    _check(width == gemm_padded_width(in_units),
           f"covariance_backprop: weight width {width}, expected {in_units} units padded to {gemm_padded_width(in_units)}")
    acc = _gemm(rows, g, weight_mean_padded, "covariance_backprop_acc")
    if slope is None:
        return te.compute((rows, in_units), lambda r, j: acc[r, j], name="covariance_backprop")
    return te.compute((rows, in_units), lambda r, j: acc[r, j] * slope[r // classes, j], name="covariance_backprop")


def covariance_exact(jacobian: te.Tensor, var: te.Tensor, classes: int) -> te.Tensor:
    """``sum_j G[b*C + c, j]^2 var[b, j]``: the variance ``var`` (independent units) gives logit c, (B, C)."""
    rows, units = _ints(jacobian.shape)
    batch, var_units = _ints(var.shape)
    _check(rows == batch * classes and units == var_units,
           f"covariance_exact: jacobian {rows}x{units} does not match variance {batch}x{var_units} and {classes} classes")
    j = te.reduce_axis((0, units), name="j")
    return te.compute((batch, classes),
                      lambda b, c: te.sum(jacobian[b * classes + c, j] * jacobian[b * classes + c, j] * var[b, j], axis=j),
                      name="covariance_exact")


def covariance_noise(noise: te.Tensor, slope: te.Tensor | None) -> te.Tensor:
    """``noise * slope^2``: a block's first layer's injected noise after its ReLU (deterministic block input)."""
    if slope is None:
        return te.compute(noise.shape, lambda b, o: noise[b, o], name="covariance_noise")
    return te.compute(noise.shape, lambda b, o: noise[b, o] * slope[b, o] * slope[b, o], name="covariance_noise")


def covariance_forward(var: te.Tensor, weight_mean_sq_t: te.Tensor, noise: te.Tensor | None,
                       slope: te.Tensor | None, out_units: int) -> te.Tensor:
    """One dense layer of the linearised independent propagation: ``(var W^2^T + noise) * slope^2``.

    ``weight_mean_sq_t`` is W^2 transposed, (in, out) with the out axis zero-padded (:func:`gemm_padded_width`).
    """
    batch, in_units = _ints(var.shape)
    weight_in, width = _ints(weight_mean_sq_t.shape)
    _check(in_units == weight_in, f"covariance_forward: variance has {in_units} units, weight {weight_in}")
    _check(width == gemm_padded_width(out_units),
           f"covariance_forward: weight width {width}, expected {out_units} units padded to {gemm_padded_width(out_units)}")
    acc = _gemm(batch, lambda b, k: var[b, k], weight_mean_sq_t, "covariance_forward_acc")

    def epilogue(b, o):
        value = acc[b, o] if noise is None else acc[b, o] + noise[b, o]
        return value if slope is None else value * slope[b, o] * slope[b, o]

    return te.compute((batch, out_units), epilogue, name="covariance_forward")


def covariance_combine(var: te.Tensor, independent: te.Tensor | None, *exact: te.Tensor) -> te.Tensor:
    """``max(var + sum(exact) - independent, 0)``: PFP's logit variance with the dropped covariance added."""
    shape = _ints(var.shape)

    def fcompute(b, c):
        value = var[b, c]
        for term in exact:
            value = value + term[b, c]
        if independent is not None:
            value = value - independent[b, c]
        return tirx.max(value, _f(0.0))

    return te.compute(shape, fcompute, name="covariance_combine")
