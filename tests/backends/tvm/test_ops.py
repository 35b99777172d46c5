"""Every TE operator of the TVM backend, compiled for llvm, against the PyTorch reference."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("tvm")
import tvm  # noqa: E402
from tvm import te  # noqa: E402

from pfp.backends import torch_ref as ref  # noqa: E402
from pfp.backends.tvm import ops  # noqa: E402

from .helpers import assert_close, layer_params  # noqa: E402


@functools.cache
def _compiled(op_name: str, shapes: tuple, **kwargs) -> ops.CompiledOp:
    """Compile each (operator, shapes, options) once per test session."""
    return ops.CompiledOp(getattr(ops, op_name), shapes, **kwargs)


def run(op_name: str, *arrays, **kwargs) -> list[np.ndarray]:
    arrays = [a.detach().numpy() if isinstance(a, torch.Tensor) else np.asarray(a, np.float32) for a in arrays]
    return _compiled(op_name, tuple(a.shape for a in arrays), **kwargs)(*arrays)


def gaussian_input(shape, seed: int, var_range=(1e-3, 0.5)):
    generator = torch.Generator().manual_seed(seed)
    mean = torch.randn(shape, generator=generator)
    var = var_range[0] + (var_range[1] - var_range[0]) * torch.rand(shape, generator=generator)
    return mean, var


def test_constants_match_reference():
    assert ops.CLARK_EPS == ref.CLARK_EPS
    assert ops.RELU_VAR_EPS == ref.RELU_VAR_EPS
    assert ops.MAX_STD_ARG == ref._MAX_STD_ARG


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
    mean, var = run("dense_joint_first", x, p.weight_mean, p.weight_var, p.bias_mean, p.bias_var)
    ref_mean, ref_var = ref.dense_first(x, p)
    assert_close(mean, ref_mean, what="mean")
    assert_close(var, ref_var, what="var")


def test_dense_joint_hidden(dense_case):
    p, _, m, v = dense_case
    mean, var = run("dense_joint", m, v, p.weight_mean, p.weight_m2, p.weight_var, p.bias_mean, p.bias_var)
    ref_mean, ref_var = ref.dense(m, v, p)
    assert_close(mean, ref_mean, what="mean")
    assert_close(var, ref_var, what="var")


def test_dense_separate_first(dense_case):
    p, x, _, _ = dense_case
    (mean,) = run("dense", x, p.weight_mean, p.bias_mean)
    (var,) = run("dense_var_first", x, p.weight_var, p.bias_var)
    ref_mean, ref_var = ref.dense_first(x, p)
    assert_close(mean, ref_mean, what="mean")
    assert_close(var, ref_var, what="var")


def test_dense_separate_hidden(dense_case):
    p, _, m, v = dense_case
    (mean,) = run("dense", m, p.weight_mean, p.bias_mean)
    (var,) = run("dense_var", m, v, p.weight_m2, p.weight_var, p.bias_var)
    ref_mean, ref_var = ref.dense(m, v, p)
    assert_close(mean, ref_mean, what="mean")
    assert_close(var, ref_var, what="var")


def test_dense_deterministic(dense_case):
    p, x, _, _ = dense_case
    (out,) = run("dense", x, p.weight_mean, p.bias_mean)
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
    mean, var = run("conv2d_joint_first", x, p.weight_mean, p.weight_var, p.bias_mean, p.bias_var,
                    stride=stride, padding=padding)
    ref_mean, ref_var = ref.conv2d_first(x, p, stride, padding)
    assert_close(mean, ref_mean, what="mean")
    assert_close(var, ref_var, what="var")


@pytest.mark.parametrize("stride, padding, height, width", CONV_CASES)
def test_conv2d_joint_hidden(conv_params, stride, padding, height, width):
    p = conv_params
    _, m, v = _conv_inputs(height, width)
    mean, var = run("conv2d_joint", m, v, p.weight_mean, p.weight_m2, p.weight_var, p.bias_mean, p.bias_var,
                    stride=stride, padding=padding)
    ref_mean, ref_var = ref.conv2d(m, v, p, stride, padding)
    assert_close(mean, ref_mean, what="mean")
    assert_close(var, ref_var, what="var")


@pytest.mark.parametrize("stride, padding, height, width", CONV_CASES)
def test_conv2d_separate(conv_params, stride, padding, height, width):
    p = conv_params
    x, m, v = _conv_inputs(height, width)
    kw = {"stride": stride, "padding": padding}
    (mean_first,) = run("conv2d", x, p.weight_mean, p.bias_mean, **kw)
    (var_first,) = run("conv2d_var_first", x, p.weight_var, p.bias_var, **kw)
    ref_mean, ref_var = ref.conv2d_first(x, p, stride, padding)
    assert_close(mean_first, ref_mean, what="first mean")
    assert_close(var_first, ref_var, what="first var")
    (mean,) = run("conv2d", m, p.weight_mean, p.bias_mean, **kw)
    (var,) = run("conv2d_var", m, v, p.weight_m2, p.weight_var, p.bias_var, **kw)
    ref_mean, ref_var = ref.conv2d(m, v, p, stride, padding)
    assert_close(mean, ref_mean, what="hidden mean")
    assert_close(var, ref_var, what="hidden var")


@pytest.mark.parametrize("stride, padding, height, width", CONV_CASES)
def test_conv2d_deterministic(conv_params, stride, padding, height, width):
    p = conv_params
    x, _, _ = _conv_inputs(height, width)
    (out,) = run("conv2d", x, p.weight_mean, p.bias_mean, stride=stride, padding=padding)
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
    mean, var = run("conv2d_joint_first", x, _channels_last(p.weight_mean), _channels_last(p.weight_var), p.bias_mean,
                    p.bias_var, **cl)
    ref_mean, ref_var = ref.conv2d_first(x, p, 1, padding)
    assert_close(mean, ref_mean, what="first mean")
    assert_close(var, ref_var, what="first var")
    (var_first,) = run("conv2d_var_first", x, _channels_last(p.weight_var), p.bias_var, **cl)
    assert_close(var_first, ref_var, what="separate first var")
    mean, var = run("conv2d_joint", m, v, _channels_last(p.weight_mean), _channels_last(p.weight_m2),
                    _channels_last(p.weight_var), p.bias_mean, p.bias_var, **cl)
    ref_mean, ref_var = ref.conv2d(m, v, p, 1, padding)
    assert_close(mean, ref_mean, what="hidden mean")
    assert_close(var, ref_var, what="hidden var")
    (var_sep,) = run("conv2d_var", m, v, _channels_last(p.weight_m2), _channels_last(p.weight_var), p.bias_var, **cl)
    assert_close(var_sep, ref_var, what="separate hidden var")
    (out,) = run("conv2d", x, _channels_last(p.weight_mean), p.bias_mean, **cl)
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

def _relu_inputs():
    """Every regime: a = mean/std from -45 to 45, tiny variances, exactly deterministic inputs."""
    a = torch.linspace(-45.0, 45.0, 181)
    std = torch.tensor([1e-3, 0.3, 1.0, 7.0])
    mean = (a[:, None] * std[None, :]).reshape(-1)
    var = (std**2).repeat(len(a))
    extra_mean = torch.tensor([-2.0, -1e-3, 0.0, 1e-3, 2.0, -1.0, 1.0, 3.0])
    extra_var = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 1e-13, 1e-13, 1e-11])  # at / around RELU_VAR_EPS
    mean, var = torch.cat([mean, extra_mean]), torch.cat([var, extra_var])
    return mean.reshape(4, -1), var.reshape(4, -1)  # 2-D on purpose: the op works for any rank


def test_relu_gaussian_matches_reference():
    m, v = _relu_inputs()
    mean, var = run("relu_gaussian", m, v)
    ref_mean, ref_var = ref.relu(m, v)
    assert_close(mean, ref_mean, what="mean")
    assert_close(var, ref_var, what="var")
    assert np.all(var >= 0)


def test_relu_gaussian_nchw_random():
    m, v = gaussian_input((2, 3, 4, 5), seed=7)
    mean, var = run("relu_gaussian", m, v)
    ref_mean, ref_var = ref.relu(m, v)
    assert_close(mean, ref_mean, what="mean")
    assert_close(var, ref_var, what="var")


def test_relu_gaussian_deterministic_inputs_are_exact():
    m = torch.tensor([[-2.0, -1e-3, 0.0, 1e-3, 2.0]])
    mean, var = run("relu_gaussian", m, torch.zeros_like(m))
    np.testing.assert_array_equal(mean, torch.relu(m).numpy())
    np.testing.assert_array_equal(var, np.zeros_like(var))


def test_relu_gaussian_tails_are_accurate():
    """Against an accurate float64 evaluation (scipy's ndtr is erfc-based) for a >= -6.

    The float32 torch reference is not accurate there (see helpers.ATOL_FRACTION); this checks
    the TVM operator on its own.
    """
    special = pytest.importorskip("scipy.special")
    a = np.linspace(-6.0, 12.0, 721)
    std = 0.7
    m = (a * std).astype(np.float32)
    v = np.full_like(m, std * std)
    mean, var = run("relu_gaussian", m[None], v[None])
    a64 = m.astype(np.float64) / std
    cdf, cdf_neg = special.ndtr(a64), special.ndtr(-a64)
    pdf = np.exp(-0.5 * a64 * a64) / np.sqrt(2 * np.pi)
    exact_mean = m * cdf + std * pdf
    exact_var = std**2 * (cdf + a64 * a64 * cdf * cdf_neg + a64 * pdf * (cdf_neg - cdf) - pdf * pdf)
    np.testing.assert_allclose(mean[0], exact_mean, rtol=1e-4, atol=0)
    np.testing.assert_allclose(var[0], exact_var, rtol=2e-3, atol=0)  # cdf + h cancels ~a^4-fold


def test_relu_deterministic():
    x = torch.randn(3, 4, 5, generator=torch.Generator().manual_seed(8))
    (out,) = run("relu", x)
    np.testing.assert_array_equal(out, torch.relu(x).numpy())


# --------------------------------------------------------------------------- max-pool

def _pool_inputs():
    """Distinct statistics at every position, plus ties, deterministic and dominated entries."""
    m, v = gaussian_input((2, 3, 6, 8), seed=9, var_range=(1e-3, 1.0))
    m[0, 0, 0, :4] = 1.5  # ties of equal Gaussians
    v[0, 0, 0, :4] = 0.2
    m[0, 1, :2, :2] = torch.tensor([[1.0, -1.0], [0.5, 0.25]])  # a deterministic window
    v[0, 1, :2, :2] = 0.0
    m[1, 2, 2, 4] = 30.0  # a window dominated by one entry
    v[1, 2, :, 0] = 0.0  # deterministic next to Gaussian inputs
    return m, v


def test_maxpool2x2_gaussian_matches_reference():
    m, v = _pool_inputs()
    mean, var = run("maxpool2x2_gaussian", m, v)
    ref_mean, ref_var = ref.maxpool2x2(m, v)
    assert mean.shape == (2, 3, 3, 4)
    assert_close(mean, ref_mean, what="mean")
    assert_close(var, ref_var, what="var")


def test_maxpool2x2_gaussian_every_output_reads_its_own_window():
    """Near-deterministic inputs with a unique value everywhere: out(i, j) = max of window (i, j)."""
    generator = torch.Generator().manual_seed(10)
    m = torch.randperm(2 * 3 * 6 * 8, generator=generator).float().reshape(2, 3, 6, 8)
    v = torch.full_like(m, 1e-6)
    mean, var = run("maxpool2x2_gaussian", m, v)
    np.testing.assert_allclose(mean, F.max_pool2d(m, 2).numpy(), rtol=0, atol=1e-3)
    np.testing.assert_allclose(var, np.full_like(var, 1e-6), rtol=1e-3)
    # every output position is a different value: no duplicated or shifted quadrant
    assert len(np.unique(mean.round(2))) == mean.size


def test_maxpool2x2_deterministic():
    m, _ = _pool_inputs()
    (out,) = run("maxpool2x2", m)
    np.testing.assert_array_equal(out, F.max_pool2d(m, 2).numpy())


def test_maxpool2x2_rejects_odd_sizes():
    with pytest.raises(ValueError, match="even height and width"):
        ops.make_prim_func(ops.maxpool2x2_gaussian, [(1, 1, 5, 4), (1, 1, 5, 4)])


# --------------------------------------------------------------------------- flatten

def test_flatten():
    m, v = gaussian_input((2, 3, 4, 5), seed=11)
    mean, var = run("flatten_gaussian", m, v)
    np.testing.assert_array_equal(mean, m.flatten(1).numpy())
    np.testing.assert_array_equal(var, v.flatten(1).numpy())
    (out,) = run("flatten", m)
    np.testing.assert_array_equal(out, m.flatten(1).numpy())


# --------------------------------------------------------------------------- argument checks

def test_shape_mismatches_raise_clear_errors():
    with pytest.raises(ValueError, match="does not match input"):
        ops.make_prim_func(ops.dense_joint_first, [(2, 8), (4, 7), (4, 7), (4,), (4,)])
    with pytest.raises(ValueError, match="mean and variance inputs differ"):
        ops.make_prim_func(ops.dense_joint, [(2, 8), (2, 9), (4, 8), (4, 8), (4, 8), (4,), (4,)])
    with pytest.raises(ValueError, match="NCHW"):
        ops.make_prim_func(ops.conv2d, [(2, 8), (4, 2, 3, 3), (4,)])
    op = _compiled("relu", ((2, 3),))
    with pytest.raises(ValueError, match="expected shape"):
        op(np.zeros((3, 2), np.float32))


def test_normal_cdf_pdf_keep_relative_accuracy_in_both_tails():
    """Phi(a), Phi(-a) and phi(a) against float64 scipy, in relative error, wherever they are normal floats.

    Phi comes from phi times a polynomial fit of erfcx (no second exp): a wrong coefficient or a
    lost tail shows up here before it reaches a network.
    """
    special = pytest.importorskip("scipy.special")
    grid = np.concatenate([np.linspace(-13.0, 13.0, 2601), [-40.0, -20.0, 20.0, 40.0]]).astype(np.float32)
    a = te.placeholder(grid.shape, "float32", name="a")

    def stat(which):
        def fcompute(i):
            lets = ops._Lets()
            return lets.wrap(ops._normal_stats(lets, a[i])[which])
        return te.compute(grid.shape, fcompute, name=f"stat{which}")

    outputs = [stat(k) for k in range(3)]
    func = te.create_prim_func([a, *outputs]).with_attr("global_symbol", "main")
    executable = tvm.compile(func, target=tvm.target.Target({"kind": "llvm"}))
    device = tvm.cpu()
    buffers = [tvm.runtime.empty(grid.shape, "float32", device) for _ in outputs]
    executable["main"](tvm.runtime.tensor(grid, device), *buffers)
    cdf, cdf_neg, pdf = (buffer.numpy().astype(np.float64) for buffer in buffers)
    a64 = grid.astype(np.float64)
    expected = {"Phi(a)": (cdf, special.ndtr(a64)), "Phi(-a)": (cdf_neg, special.ndtr(-a64)),
                "phi(a)": (pdf, np.exp(-0.5 * a64**2) / np.sqrt(2 * np.pi))}
    tiny = np.finfo(np.float32).tiny
    for name, (got, exact) in expected.items():
        normal = exact > 1e3 * tiny
        # float32 rounding of a^2 alone costs ~(a^2/2) 6e-8 relative in exp(-a^2/2): the bound grows with it
        relative = np.abs(got[normal] / exact[normal] - 1.0) / (1.0 + 0.5 * a64[normal] ** 2)
        assert relative.max() < 5e-7, f"{name}: scaled relative error {relative.max():.2e} at a={grid[normal][relative.argmax()]}"
        assert np.all(np.abs(got[~normal]) < 1e3 * tiny), f"{name}: beyond float32's range it must underflow to ~0"
    assert np.all((cdf >= 0) & (cdf <= 1) & (cdf_neg >= 0) & (cdf_neg <= 1))
