"""Operators of the covariance-aware PFP's correction (:mod:`pfp.backends.covariance`).

The Jacobian rows of the ``C`` logits are carried as one 2-D tensor ``G`` of shape
``(B * C, units)`` (row ``b * C + c``), so every backward step is a dense-like reduction the
hand schedules and the Meta Scheduler already handle.
"""

from __future__ import annotations

from tvm import te, tirx

from pfp.backends.tvm.ops.common import _check, _f, _ints
from pfp.backends.tvm.ops.gaussian import RELU_VAR_EPS, _clamp_std_arg, _Lets, _normal_stats

__all__ = ["covariance_backprop", "covariance_combine", "covariance_exact", "covariance_forward",
           "covariance_noise", "relu_slope"]


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


def covariance_backprop(jacobian: te.Tensor | tuple[te.Tensor, te.Tensor | None], weight_mean_t: te.Tensor,
                        slope: te.Tensor | None, classes: int, batch: int) -> te.Tensor:
    """``G W`` (one dense layer backwards; ``weight_mean_t`` is W transposed, (in, out)), times the
    slope of the ReLU before it when there is one: (B * C, in).

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
    in_units, weight_out = _ints(weight_mean_t.shape)
    _check(out_units == weight_out, f"covariance_backprop: jacobian has {out_units} units, weight {weight_out}")
    k = te.reduce_axis((0, out_units), name="k")
    acc = te.compute((rows, in_units), lambda r, j: te.sum(g(r, k) * weight_mean_t[j, k], axis=k),
                     name="covariance_backprop_acc")
    if slope is None:
        return acc
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


def covariance_forward(var: te.Tensor, weight_mean_sq: te.Tensor, noise: te.Tensor | None,
                       slope: te.Tensor | None) -> te.Tensor:
    """One dense layer of the linearised independent propagation: ``(var W^2^T + noise) * slope^2``."""
    batch, in_units = _ints(var.shape)
    out_units, weight_in = _ints(weight_mean_sq.shape)
    _check(in_units == weight_in, f"covariance_forward: variance has {in_units} units, weight {weight_in}")
    k = te.reduce_axis((0, in_units), name="k")
    acc = te.compute((batch, out_units), lambda b, o: te.sum(var[b, k] * weight_mean_sq[o, k], axis=k),
                     name="covariance_forward_acc")

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
