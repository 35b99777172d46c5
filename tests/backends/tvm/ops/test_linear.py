"""Dense and conv2d operators (joint, separate, deterministic, channels-last) against the PyTorch reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("tvm")


from pfp.backends import torch_ref as ref  # noqa: E402
from pfp.backends.tvm import ops  # noqa: E402

from ..helpers import assert_close, gaussian_input, layer_params, run_op  # noqa: E402

# --------------------------------------------------------------------------- dense

DENSE_BATCH, DENSE_IN, DENSE_OUT = 3, 37, 11


@pytest.fixture(scope="module")
def dense_case():
    p = layer_params((DENSE_OUT, DENSE_IN), seed=1)
    x = torch.randn(DENSE_BATCH, DENSE_IN, generator=torch.Generator().manual_seed(2))
    mean, var = gaussian_input((DENSE_BATCH, DENSE_IN), seed=3)
    return p, x, mean, var


def test_dense_joint_first(dense_case):
    p, x, _, _ = dense_case
    mean, var = run_op("dense_joint_first", x, p.weight_mean, p.weight_var, p.bias_mean, p.bias_var)
    ref_mean, ref_var = ref.dense_first(x, p)
    assert_close(mean, ref_mean, what="mean")
    assert_close(var, ref_var, what="var")


def test_dense_joint_hidden(dense_case):
    p, _, m, v = dense_case
    mean, var = run_op("dense_joint", m, v, p.weight_mean, p.weight_m2, p.weight_var, p.bias_mean, p.bias_var)
    ref_mean, ref_var = ref.dense(m, v, p)
    assert_close(mean, ref_mean, what="mean")
    assert_close(var, ref_var, what="var")


def test_dense_separate_first(dense_case):
    p, x, _, _ = dense_case
    (mean,) = run_op("dense", x, p.weight_mean, p.bias_mean)
    (var,) = run_op("dense_var_first", x, p.weight_var, p.bias_var)
    ref_mean, ref_var = ref.dense_first(x, p)
    assert_close(mean, ref_mean, what="mean")
    assert_close(var, ref_var, what="var")


def test_dense_separate_hidden(dense_case):
    p, _, m, v = dense_case
    (mean,) = run_op("dense", m, p.weight_mean, p.bias_mean)
    (var,) = run_op("dense_var", m, v, p.weight_m2, p.weight_var, p.bias_var)
    ref_mean, ref_var = ref.dense(m, v, p)
    assert_close(mean, ref_mean, what="mean")
    assert_close(var, ref_var, what="var")


def test_dense_deterministic(dense_case):
    p, x, _, _ = dense_case
    (out,) = run_op("dense", x, p.weight_mean, p.bias_mean)
    assert_close(out, F.linear(x, p.weight_mean, p.bias_mean))


def _reduction_blocks(op, shapes, **kwargs) -> list[str]:
    """Script text of every reduction block (the ones with an init) of the operator's PrimFunc."""
    script = ops.make_prim_func(op, shapes, **kwargs).script()
    blocks = script.split("with T.sblock(")[1:]
    return [block for block in blocks if "T.init()" in block]


@pytest.mark.parametrize("op, shapes, kwargs", [
    (ops.dense_joint_first, [(2, 8), (4, 8), (4, 8), (4,), (4,)], {}),
    (ops.dense_joint, [(2, 8), (2, 8), (4, 8), (4, 8), (4, 8), (4,), (4,)], {}),
    (ops.conv2d_joint_first, [(1, 2, 6, 6), (3, 2, 3, 3), (3, 2, 3, 3), (3,), (3,)], {"padding": 1}),
    (ops.conv2d_joint, [(1, 2, 6, 6)] * 2 + [(3, 2, 3, 3)] * 3 + [(3,), (3,)], {"stride": 2}),
])
def test_joint_operator_is_one_reduction_with_two_outputs(op, shapes, kwargs):
    blocks = _reduction_blocks(op, shapes, **kwargs)
    assert len(blocks) == 1, "a joint operator must have exactly one reduction"
    writes = blocks[0].split("T.writes(")[1].split(")\n")[0]
    assert writes.count("_v0[") == 1 and writes.count("_v1[") == 1, f"expected two accumulators, got {writes}"


def test_separate_operators_are_single_reductions():
    assert len(_reduction_blocks(ops.dense, [(2, 8), (4, 8), (4,)])) == 1
    assert len(_reduction_blocks(ops.dense_var, [(2, 8), (2, 8), (4, 8), (4, 8), (4,)])) == 1


# --------------------------------------------------------------------------- conv2d

CONV_CASES = [  # (stride, padding, input H, W)
    pytest.param(1, 0, 8, 9, id="stride1-pad0"),
    pytest.param(1, 2, 8, 9, id="stride1-pad2"),
    pytest.param(2, 0, 9, 8, id="stride2-pad0"),
    pytest.param(2, 2, 9, 8, id="stride2-pad2"),
]
CONV_BATCH, CONV_IN, CONV_OUT, CONV_K = 2, 3, 4, 5


@pytest.fixture(scope="module")
def conv_params():
    return layer_params((CONV_OUT, CONV_IN, CONV_K, CONV_K), seed=4)


def _conv_inputs(height, width):
    shape = (CONV_BATCH, CONV_IN, height, width)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(5))
    mean, var = gaussian_input(shape, seed=6)
    return x, mean, var


@pytest.mark.parametrize("stride, padding, height, width", CONV_CASES)
def test_conv2d_joint_first(conv_params, stride, padding, height, width):
    p = conv_params
    x, _, _ = _conv_inputs(height, width)
    mean, var = run_op("conv2d_joint_first", x, p.weight_mean, p.weight_var, p.bias_mean, p.bias_var,
                    stride=stride, padding=padding)
    ref_mean, ref_var = ref.conv2d_first(x, p, stride, padding)
    assert_close(mean, ref_mean, what="mean")
    assert_close(var, ref_var, what="var")


@pytest.mark.parametrize("stride, padding, height, width", CONV_CASES)
def test_conv2d_joint_hidden(conv_params, stride, padding, height, width):
    p = conv_params
    _, m, v = _conv_inputs(height, width)
    mean, var = run_op("conv2d_joint", m, v, p.weight_mean, p.weight_m2, p.weight_var, p.bias_mean, p.bias_var,
                    stride=stride, padding=padding)
    ref_mean, ref_var = ref.conv2d(m, v, p, stride, padding)
    assert_close(mean, ref_mean, what="mean")
    assert_close(var, ref_var, what="var")


@pytest.mark.parametrize("stride, padding, height, width", CONV_CASES)
def test_conv2d_separate(conv_params, stride, padding, height, width):
    p = conv_params
    x, m, v = _conv_inputs(height, width)
    kw = {"stride": stride, "padding": padding}
    (mean_first,) = run_op("conv2d", x, p.weight_mean, p.bias_mean, **kw)
    (var_first,) = run_op("conv2d_var_first", x, p.weight_var, p.bias_var, **kw)
    ref_mean, ref_var = ref.conv2d_first(x, p, stride, padding)
    assert_close(mean_first, ref_mean, what="first mean")
    assert_close(var_first, ref_var, what="first var")
    (mean,) = run_op("conv2d", m, p.weight_mean, p.bias_mean, **kw)
    (var,) = run_op("conv2d_var", m, v, p.weight_m2, p.weight_var, p.bias_var, **kw)
    ref_mean, ref_var = ref.conv2d(m, v, p, stride, padding)
    assert_close(mean, ref_mean, what="hidden mean")
    assert_close(var, ref_var, what="hidden var")


@pytest.mark.parametrize("stride, padding, height, width", CONV_CASES)
def test_conv2d_deterministic(conv_params, stride, padding, height, width):
    p = conv_params
    x, _, _ = _conv_inputs(height, width)
    (out,) = run_op("conv2d", x, p.weight_mean, p.bias_mean, stride=stride, padding=padding)
    assert_close(out, F.conv2d(x, p.weight_mean, p.bias_mean, stride=stride, padding=padding))


# the channels-last form: 16 output channels (one channel vector) and 32 (two, split by the schedule)
CHANNELS_LAST_CASES = [pytest.param(16, 0, id="16ch-pad0"), pytest.param(32, 2, id="32ch-pad2")]


def _channels_last(weight: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(weight.detach().numpy().transpose(1, 2, 3, 0))  # (O, C, kh, kw) -> (C, kh, kw, O)


@pytest.mark.parametrize("out_channels, padding", CHANNELS_LAST_CASES)
def test_conv2d_channels_last_matches_reference(out_channels, padding):
    """Every conv operator in the channels-last form (weights (C, kh, kw, O)) against the PyTorch reference."""
    p = layer_params((out_channels, CONV_IN, CONV_K, CONV_K), seed=7)
    x, m, v = _conv_inputs(8, 9)
    cl = {"padding": padding, "channels_last": True}
    mean, var = run_op("conv2d_joint_first", x, _channels_last(p.weight_mean), _channels_last(p.weight_var), p.bias_mean,
                    p.bias_var, **cl)
    ref_mean, ref_var = ref.conv2d_first(x, p, 1, padding)
    assert_close(mean, ref_mean, what="first mean")
    assert_close(var, ref_var, what="first var")
    (var_first,) = run_op("conv2d_var_first", x, _channels_last(p.weight_var), p.bias_var, **cl)
    assert_close(var_first, ref_var, what="separate first var")
    mean, var = run_op("conv2d_joint", m, v, _channels_last(p.weight_mean), _channels_last(p.weight_m2),
                    _channels_last(p.weight_var), p.bias_mean, p.bias_var, **cl)
    ref_mean, ref_var = ref.conv2d(m, v, p, 1, padding)
    assert_close(mean, ref_mean, what="hidden mean")
    assert_close(var, ref_var, what="hidden var")
    (var_sep,) = run_op("conv2d_var", m, v, _channels_last(p.weight_m2), _channels_last(p.weight_var), p.bias_var, **cl)
    assert_close(var_sep, ref_var, what="separate hidden var")
    (out,) = run_op("conv2d", x, _channels_last(p.weight_mean), p.bias_mean, **cl)
    assert_close(out, F.conv2d(x, p.weight_mean, p.bias_mean, padding=padding), what="deterministic")


def test_channels_last_suits_whole_channel_vectors_at_stride_1():
    assert ops.channels_last_suits(16, 1) and ops.channels_last_suits(32, 1)
    assert not ops.channels_last_suits(6, 1)  # LeNet's conv1: a partial vector
    assert not ops.channels_last_suits(16, 2)
    with pytest.raises(ValueError, match="channels-last form needs stride 1"):
        ops.make_prim_func(ops.conv2d, [(1, 3, 9, 9), (3, 3, 3, 16), (16,)], stride=2, channels_last=True)
    with pytest.raises(ValueError, match="does not match input"):  # an OIHW weight given as channels-last
        ops.make_prim_func(ops.conv2d, [(1, 3, 9, 9), (16, 3, 3, 3), (16,)], channels_last=True)


def test_conv2d_output_size_matches_spec_formula():
    assert ops.conv_output_size(28, 5, 1, 2) == 28
    assert ops.conv_output_size(9, 5, 2, 2) == 5
    assert ops.conv_output_size(14, 5, 1, 0) == 10


# --------------------------------------------------------------------------- ReLU

# --------------------------------------------------------------------------- max-pool

# --------------------------------------------------------------------------- flatten

# --------------------------------------------------------------------------- argument checks
