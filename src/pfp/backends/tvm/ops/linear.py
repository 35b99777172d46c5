"""Linear layers: dense and conv2d (NCHW), joint (one pair reduction), separate-path and deterministic.

Convolutions read their input through :class:`_ConvGrid`: the flat form for stride 1, the
padded NCHW input otherwise, or the channels-last form (:func:`channels_last_suits`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from tvm import te, tirx

from pfp.backends.tvm.ops.common import _check, _f, _ints

__all__ = ["CHANNELS_LAST_ANNOTATION", "CHANNEL_VECTOR", "FLAT_ALIGN", "FLAT_ALIGN_TWO_INPUTS", "FLAT_ROW_ANNOTATION",
           "LIGHT_ANNOTATION", "channels_last_suits", "conv2d", "conv2d_joint", "conv2d_joint_first", "conv2d_var",
           "conv2d_var_first", "conv_output_size", "dense", "dense_joint", "dense_joint_first", "dense_var",
           "dense_var_first"]


def _pair_sum():
    """Commutative reducer over pairs: (a0, a1) + (b0, b1) = (a0 + b0, a1 + b1)."""
    return te.comm_reducer(lambda a, b: (a[0] + b[0], a[1] + b[1]),
                           lambda t0, t1: (tirx.const(0, t0), tirx.const(0, t1)),
                           name="pair_sum")


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
#: vectors (see schedules.reductions._conv_position_lanes).
FLAT_ALIGN = 16
#: ... except the hidden-layer joint and variance convolutions (two inputs per term): their schedule
#: keeps one-register vectors, so 8 suffices (LeNet's conv2: 136 positions, not 144).
FLAT_ALIGN_TWO_INPUTS = 8
#: Annotation on a flat conv input block: its padded row width (the schedule vectorises it row by row).
FLAT_ROW_ANNOTATION = "pfp.flat_row"
#: Annotation on a block of a load or two per element (a convolution's padded input, its bias
#: epilogue): the schedule parallelises it only when large (see schedules.common.PARALLEL_MIN_LIGHT).
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
