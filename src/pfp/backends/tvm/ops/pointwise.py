"""Non-linearities and reshapes: moment-matched ReLU, 2x2 max-pool (pairwise Clark max or argmax of means), flatten."""

from __future__ import annotations

import math

from tvm import te, tirx

from pfp.backends.tvm.ops.common import _check, _f, _ints
from pfp.backends.tvm.ops.gaussian import _Lets, _max2, _relu_moments
from pfp.spec import PoolRule, pool_rule

__all__ = ["flatten", "flatten_gaussian", "maxpool2x2", "maxpool2x2_gaussian", "relu", "relu_gaussian"]


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


def maxpool2x2_gaussian(mean: te.Tensor, var: te.Tensor, rule: PoolRule | str = PoolRule.CLARK) -> list[te.Tensor]:
    """2x2 max-pool, stride 2 (NCHW), by ``rule`` (:class:`pfp.spec.PoolRule`): [mean, var].

    As :func:`pfp.backends.torch_ref.maxpool2x2`: ``clark`` / ``clark_logistic`` by pairwise Clark
    max, horizontal pairs first, ``(i, 2j) | (i, 2j+1)`` -> (B, C, H, W/2), then vertical pairs
    ``(2i, j) | (2i+1, j)`` of that -> (B, C, H/2, W/2): output (i, j) reads exactly its own
    window (rows 2i, 2i+1, columns 2j, 2j+1). Two stages rather than one fused expression: the
    same arithmetic (each output block evaluates 3 Clark maxima either way), but a fused expression
    nests ~40 ``let`` bindings, which makes TVM 0.27's LLVM code generation ~30x slower (2 s
    instead of 0.07 s per operator). ``argmax_mean``: one stage of comparisons and selects.
    """
    _check(_ints(mean.shape) == _ints(var.shape), "maxpool2x2: mean and variance differ in shape")
    rule = pool_rule(rule)
    batch, channels, out_h, out_w = _pool_shape(mean)
    out_shape = (batch, channels, out_h, out_w)
    if rule is PoolRule.ARGMAX_MEAN:
        return _maxpool2x2_argmax_mean(mean, var, out_shape)
    logistic = rule is PoolRule.CLARK_LOGISTIC

    def make(src_mean: te.Tensor, src_var: te.Tensor, which: int, horizontal: bool):
        def fcompute(b, c, i, j):
            lets = _Lets()
            if horizontal:
                first, second = (b, c, i, 2 * j), (b, c, i, 2 * j + 1)
            else:
                first, second = (b, c, 2 * i, j), (b, c, 2 * i + 1, j)
            moments = _max2(lets, src_mean[first], src_var[first], src_mean[second], src_var[second], logistic=logistic)
            return lets.wrap(moments[which])
        return fcompute

    row_shape = (batch, channels, 2 * out_h, out_w)
    row_mean = te.compute(row_shape, make(mean, var, 0, True), name="maxpool_row_mean")
    row_var = te.compute(row_shape, make(mean, var, 1, True), name="maxpool_row_var")
    return [te.compute(out_shape, make(row_mean, row_var, 0, False), name="maxpool_mean"),
            te.compute(out_shape, make(row_mean, row_var, 1, False), name="maxpool_var")]


def _maxpool2x2_argmax_mean(mean: te.Tensor, var: te.Tensor, out_shape) -> list[te.Tensor]:
    """The (mean, var) of each window's element with the largest mean, the first in row-major order on ties."""

    def make(which: int):
        def fcompute(b, c, i, j):
            at = [(b, c, 2 * i + di, 2 * j + dj) for di in (0, 1) for dj in (0, 1)]
            m = [mean[index] for index in at]
            source = [m, [var[index] for index in at]][which]
            # strict '>': a pair keeps its first element on a tie, and the top row wins a tie with the bottom
            top_second, bottom_second = m[1] > m[0], m[3] > m[2]
            top_mean = tirx.Select(top_second, m[1], m[0])
            bottom_mean = tirx.Select(bottom_second, m[3], m[2])
            top = tirx.Select(top_second, source[1], source[0])
            bottom = tirx.Select(bottom_second, source[3], source[2])
            out = tirx.Select(bottom_mean > top_mean, bottom, top)
            return out if which == 0 else tirx.max(out, _f(0.0))
        return fcompute

    return [te.compute(out_shape, make(0), name="maxpool_mean"), te.compute(out_shape, make(1), name="maxpool_var")]


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
