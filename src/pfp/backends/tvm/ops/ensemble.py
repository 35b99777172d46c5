"""Ensembles (the SVI baseline): S weight draws of a layer in one pass, member-major rows."""

from __future__ import annotations

from collections.abc import Callable

from tvm import te

from pfp.backends.tvm.ops.common import DTYPE, _check, _ints
from pfp.backends.tvm.ops.linear import _conv_axes, _conv_shapes, _ConvGrid

__all__ = ["conv2d_ensemble", "dense_ensemble"]


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
