"""Numerical robustness of the compiled (TVM) Gaussian kernels over extreme inputs (issue 22).

Each operator is built once, at a small fixed shape, with the hand schedule and the deployed TIR
pipeline (subnormals flushed to zero, as in every compiled network); hypothesis then feeds it arrays
drawn over the same extremes as the PyTorch module (variances 0, subnormal, 1e-30 .. 1e6, |means| up
to 1e4, all zeros). Every output must be finite, every variance >= 0, and agree with the same
float64 / 50-digit references (:mod:`tests.reliability.test_numerics_torch`).
"""

from __future__ import annotations

import collections
import functools

import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

pytest.importorskip("tvm")

import torch  # noqa: E402
import tvm  # noqa: E402
from scipy.special import ndtr  # noqa: E402

from pfp.backends import torch_ref as ref  # noqa: E402
from pfp.backends.tvm import ops  # noqa: E402
from pfp.backends.tvm.ops import covariance as cov_ops  # noqa: E402
from pfp.backends.tvm.passes import register_pipeline  # noqa: E402
from pfp.backends.tvm.schedules import schedule_prim_func  # noqa: E402
from pfp.head import head_draws, head_reference  # noqa: E402
from tests.reliability.numerics import (  # noqa: E402
    EPS_MEAN,
    F32,
    MC_SAMPLES,
    SETTINGS,
    _f64,
    _mc_check,
    assert_moments,
    conv_reference,
    dense_reference,
    gaussian_arrays,
    layer_params,
    linear_tolerances,
    maxpool_reference,
    pool_tolerances,
    relu_reference,
    variances,
)
from tests.reliability.report import record  # noqa: E402

TARGET = tvm.target.Target({"kind": "llvm"})
COUNTS: collections.Counter = collections.Counter()


class Kernel:
    """One operator, hand-scheduled and compiled once (the deployed TIR pipeline: subnormals flushed)."""

    def __init__(self, op, shapes, **kwargs) -> None:
        compiled = ops.CompiledOp(op, shapes, target=TARGET, **kwargs)  # for its PrimFunc and output shapes
        self.shapes, self.output_shapes = compiled.input_shapes, compiled.output_shapes
        func = schedule_prim_func(compiled.prim_func)
        self.executable = tvm.tirx.build(tvm.IRModule({"main": func}), target=TARGET, pipeline=register_pipeline())

    def __call__(self, *inputs) -> list[np.ndarray]:
        device = tvm.cpu()
        args = [tvm.runtime.tensor(np.ascontiguousarray(a, dtype=F32).reshape(shape), device)
                for a, shape in zip(inputs, self.shapes)]
        outputs = [tvm.runtime.empty(shape, "float32", device) for shape in self.output_shapes]
        self.executable["main"](*args, *outputs)
        return [out.numpy() for out in outputs]


@functools.cache
def kernel(name: str) -> Kernel:
    return Kernel(*KERNELS[name][:2], **KERNELS[name][2])


POOL = (1, 2, 4, 4)
KERNELS = {
    "relu_gaussian": (ops.relu_gaussian, [(2, 2, 4, 4)] * 2, {}),
    "relu_slope": (cov_ops.relu_slope, [(2, 16)] * 2, {}),
    "maxpool2x2 clark": (ops.maxpool2x2_gaussian, [POOL] * 2, {"rule": "clark"}),
    "maxpool2x2 clark_logistic": (ops.maxpool2x2_gaussian, [POOL] * 2, {"rule": "clark_logistic"}),
    "maxpool2x2 argmax_mean": (ops.maxpool2x2_gaussian, [POOL] * 2, {"rule": "argmax_mean"}),
    "dense_joint_first": (ops.dense_joint_first, [(2, 8), (5, 8), (5, 8), (5,), (5,)], {}),
    "dense_joint": (ops.dense_joint, [(2, 8), (2, 8), (5, 8), (5, 8), (5, 8), (5,), (5,)], {}),
    "conv2d_joint_first": (ops.conv2d_joint_first, [(1, 1, 6, 6), (2, 1, 3, 3), (2, 1, 3, 3), (2,), (2,)],
                           {"padding": 1}),
    "conv2d_joint": (ops.conv2d_joint, [(1, 2, 6, 6), (1, 2, 6, 6)] + [(3, 2, 3, 3)] * 3 + [(3,)] * 2, {}),
    # LeNet's conv2 takes the channels-last form (16 output channels: one channel vector)
    "conv2d_joint channels_last": (ops.conv2d_joint, [(1, 2, 6, 6), (1, 2, 6, 6)] + [(2, 3, 3, 16)] * 3 + [(16,)] * 2,
                                   {"channels_last": True}),
    "covariance_exact": (cov_ops.covariance_exact, [(2 * 3, 8), (2, 8)], {"classes": 3}),
    "covariance_forward": (cov_ops.covariance_forward, [(2, 8), (8, 16), (2, 5), (2, 5)], {"out_units": 5}),
    "covariance_combine": (cov_ops.covariance_combine, [(2, 3)] * 3, {}),
}


def _run(row: str, examples) -> None:
    """Run a hypothesis test; when every example passed, record how many ran (per call: parametrised tests share rows)."""
    COUNTS[row] = 0
    examples()
    record("property", row, tried=COUNTS[row], survived=COUNTS[row])


# --------------------------------------------------------------------------- ReLU and its slope

def test_relu_gaussian_extremes():
    run = kernel("relu_gaussian")

    @SETTINGS
    @given(gaussian_arrays((2, 2, 4, 4)))
    def examples(pair):
        mean, var = pair
        got = run(mean, var)
        expected = relu_reference(mean, var)
        std = np.sqrt(np.maximum(_f64(var), 0))
        assert_moments("relu (tvm)", *got, *expected, mean_atol=1e-6 * std + EPS_MEAN + 1e-37,
                       var_atol=1e-6 * np.maximum(_f64(var), 0) + 1e-37)
        COUNTS["relu_gaussian (tvm)"] += 1

    _run("relu_gaussian (tvm)", examples)


def test_relu_slope_extremes():
    """The covariance epilogue's ReLU slope Phi(mu/sigma) lies in [0, 1] and matches float64 ndtr."""
    run = kernel("relu_slope")

    @SETTINGS
    @given(gaussian_arrays((2, 16)))
    def examples(pair):
        mean, var = pair
        (slope,) = run(mean, var)
        m, v = _f64(mean), np.maximum(_f64(var), 0)
        # flushed subnormal means compare as 0 (the step is then 0)
        m = np.where(np.abs(m) < np.finfo(F32).tiny, 0.0, m)
        expected = np.where(v <= ref.RELU_VAR_EPS, (m > 0).astype(float),
                            ndtr(np.clip(m / np.sqrt(np.maximum(v, ref.RELU_VAR_EPS)), -40, 40)))
        assert np.all(np.isfinite(slope)) and np.all((slope >= 0) & (slope <= 1))
        np.testing.assert_allclose(slope, expected, rtol=1e-5, atol=1e-6)
        COUNTS["relu_slope (tvm)"] += 1

    _run("relu_slope (tvm)", examples)


# --------------------------------------------------------------------------- max-pool

@pytest.mark.parametrize("rule", ["clark", "clark_logistic", "argmax_mean"])
def test_maxpool_extremes(rule):
    run, row = kernel(f"maxpool2x2 {rule}"), f"maxpool2x2 {rule} (tvm)"

    @SETTINGS
    @given(gaussian_arrays(POOL))
    def examples(pair):
        mean, var = pair
        if rule == "argmax_mean":  # compare on the values the flushing kernel sees
            mean, var = _flush(mean), _flush(var)
        got = run(mean, var)
        expected = maxpool_reference(mean, var, rule)
        mean_atol, var_atol = pool_tolerances(mean, var, rule)
        assert_moments(f"maxpool {rule} (tvm)", *got, *expected, mean_atol + 1e-37, var_atol + 1e-37,
                       rtol=0 if rule == "argmax_mean" else 2e-5)
        COUNTS[row] += 1

    _run(row, examples)


def _flush(array: np.ndarray) -> np.ndarray:
    return np.where(np.abs(array) < np.finfo(F32).tiny, F32(0), array).astype(F32)


# --------------------------------------------------------------------------- linear layers

def _params_arrays(p, channels_last: bool = False):
    arrays = [_f64(t).astype(F32) for t in (p.weight_mean, p.weight_m2, p.weight_var, p.bias_mean, p.bias_var)]
    if channels_last:  # (O, C, kh, kw) -> (C, kh, kw, O)
        arrays[:3] = [np.ascontiguousarray(a.transpose(1, 2, 3, 0)) for a in arrays[:3]]
    return arrays


@pytest.mark.parametrize("first", [True, False], ids=["first", "hidden"])
def test_dense_joint_extremes(first):
    name = "dense_joint_first" if first else "dense_joint"
    run, row = kernel(name), "dense mean+variance (tvm)"

    @SETTINGS
    @given(gaussian_arrays((2, 8)), layer_params((5, 8)))
    def examples(pair, p):
        mean, var = pair
        wm, m2, wv, bm, bv = _params_arrays(p)
        got = run(mean, wm, wv, bm, bv) if first else run(mean, var, wm, m2, wv, bm, bv)
        var_in = None if first else var
        assert_moments(name, *got, *dense_reference(mean, var_in, p), *linear_tolerances(mean, var_in, p, flushed=True))
        COUNTS[row] += 1

    _run(row, examples)


@pytest.mark.parametrize("name", ["conv2d_joint_first", "conv2d_joint", "conv2d_joint channels_last"])
def test_conv2d_joint_extremes(name):
    run, row = kernel(name), "conv2d mean+variance (tvm)"
    shapes = KERNELS[name][1]
    first, channels_last = name == "conv2d_joint_first", "channels_last" in name
    padding = KERNELS[name][2].get("padding", 0)
    weight_shape = shapes[1 if first else 2]
    if channels_last:
        weight_shape = (weight_shape[3], *weight_shape[:3])

    @SETTINGS
    @given(gaussian_arrays(shapes[0]), layer_params(weight_shape))
    def examples(pair, p):
        mean, var = pair
        wm, m2, wv, bm, bv = _params_arrays(p, channels_last)
        got = run(mean, wm, wv, bm, bv) if first else run(mean, var, wm, m2, wv, bm, bv)
        var_in = None if first else var
        assert_moments(name, *got, *conv_reference(mean, var_in, p, padding),
                       *linear_tolerances(mean, var_in, p, padding, flushed=True))
        COUNTS[row] += 1

    # found in CI: subnormal weight variances (flushed to 0 by the kernels) times a 1e4 input squared
    mean = np.zeros(shapes[0], F32)
    mean.flat[-1] = 1e4
    out_channels = weight_shape[0]
    subnormal = ref.GaussianLayerParams.from_mean_var(torch.zeros(weight_shape), torch.full(weight_shape, 3.6304e-40),
                                                      torch.zeros(out_channels), torch.zeros(out_channels))
    examples = example((mean, np.zeros(shapes[0], F32)), subnormal)(examples)
    _run(row, examples)


# --------------------------------------------------------------------------- covariance epilogue

@st.composite
def covariance_case(draw):
    jacobian = draw(hnp.arrays(F32, (6, 8), elements=st.floats(-1.0, 1.0, width=32)))
    var = draw(hnp.arrays(F32, (2, 8), elements=variances))
    weight_sq_t = np.zeros((8, 16), F32)
    weight_sq_t[:, :5] = draw(hnp.arrays(F32, (8, 5), elements=st.floats(0.0, 1.0, width=32)))
    noise = draw(hnp.arrays(F32, (2, 5), elements=variances))
    slope = draw(hnp.arrays(F32, (2, 5), elements=st.floats(0.0, 1.0, width=32)))
    plain, independent, exact = (draw(hnp.arrays(F32, (2, 3), elements=variances)) for _ in range(3))
    return jacobian, var, weight_sq_t, noise, slope, plain, independent, exact


def test_covariance_epilogue_extremes():
    exact_op, forward_op, combine_op = (kernel(n) for n in ("covariance_exact", "covariance_forward", "covariance_combine"))
    row = "covariance epilogue: exact, forward, combine (tvm)"

    @SETTINGS
    @given(covariance_case())
    def examples(case):
        jacobian, var, weight_sq_t, noise, slope, plain, independent, exact = case
        j64, v64 = _f64(jacobian), _f64(_flush(var))
        (got_exact,) = exact_op(jacobian, var)
        expected = np.einsum("bcj,bj->bc", (j64**2).reshape(2, 3, 8), v64)
        # squares below float32's normal range are flushed to 0 by the kernel: their terms may be missing
        squares_flushed = np.where(j64**2 < np.finfo(F32).tiny, j64**2, 0.0)
        bound = (1e-5 * np.einsum("bcj,bj->bc", (j64**2).reshape(2, 3, 8), v64) + 1e-36
                 + np.einsum("bcj,bj->bc", squares_flushed.reshape(2, 3, 8), v64))
        assert np.all(np.isfinite(got_exact)) and np.all(got_exact >= 0)
        assert np.all(np.abs(got_exact - expected) <= bound), "covariance_exact"
        (got_forward,) = forward_op(var, weight_sq_t, noise, slope)
        # the kernels flush subnormals (weights too): the reference reads them as 0 as well
        expected = (v64 @ _f64(_flush(weight_sq_t))[:, :5] + _f64(_flush(noise))) * _f64(_flush(slope)) ** 2
        assert np.all(np.isfinite(got_forward)) and np.all(got_forward >= 0)
        np.testing.assert_allclose(got_forward, expected, rtol=1e-5, atol=1e-36)
        (got_combined,) = combine_op(plain, independent, exact)
        p, i, e = (_f64(_flush(a)) for a in (plain, independent, exact))
        expected = np.maximum(p + e - i, 0)
        assert np.all(np.isfinite(got_combined)) and np.all(got_combined >= 0)
        # one float32 rounding per term, of the largest of them
        assert np.all(np.abs(got_combined - expected) <= 2.5e-7 * np.maximum(np.maximum(p, i), e) + 1e-36)
        COUNTS[row] += 1

    _run(row, examples)


# --------------------------------------------------------------------------- uncertainty head

def test_uncertainty_head_extremes():
    """Gaussian logits -> probs, MI, SME: finite, probabilities summing to 1, 0 <= MI <= SME <= log C,
    and the float64 oracle with the same draws, to within the float32 rounding of the logits."""
    draws = head_draws(16, 10)
    heads = {temperature: Kernel(ops.uncertainty_head, [(3, 10), (3, 10), draws.shape],
                                 inverse_temperature=1.0 / temperature) for temperature in (0.5, 2.0)}
    row = "uncertainty head (tvm)"

    @SETTINGS
    @given(gaussian_arrays((3, 10)), st.sampled_from(sorted(heads)))
    def examples(pair, temperature):
        mean, var = pair
        probs, mi, sme = heads[temperature](mean, var, draws)
        expected = head_reference(_flush(mean), _flush(var), draws, temperature)
        for name, value in (("probs", probs), ("mi", mi), ("sme", sme)):
            assert np.all(np.isfinite(value)), f"head {name}: non-finite"
        np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-5)
        assert np.all(probs >= 0) and np.all(mi >= 0) and np.all(mi <= sme + 1e-5) and np.all(sme <= np.log(10) + 1e-5)
        # float32 logits err by ~1e-7 of their size: probabilities and entropies move by at most that (x a few)
        logit_scale = (np.abs(_f64(mean)) + 4.5 * np.sqrt(np.maximum(_f64(var), 0))).max(-1) / temperature
        slack = 2e-6 * (1.0 + logit_scale)
        np.testing.assert_allclose(probs, expected["probs"], atol=float(slack.max()), rtol=0)
        for name, value in (("mi", mi), ("sme", sme)):
            assert np.all(np.abs(value - expected[name]) <= 4 * slack), f"head {name}: {value} vs {expected[name]}"
        COUNTS[row] += 1

    _run(row, examples)



def test_relu_monte_carlo_at_fixed_points():
    """The compiled ReLU against sampling at the torch module's points (the rectified Gaussian is exact)."""
    rng = np.random.default_rng(1)
    points_mean = np.array([0.0, 1e4, -3.0, 2.5, 1e-3], F32)
    points_var = np.array([1.0, 1e6, 1.0, 1e-6, 1e-6], F32)
    mean = np.zeros(KERNELS["relu_gaussian"][1][0], F32)
    var = np.zeros_like(mean)
    mean.flat[:5], var.flat[:5] = points_mean, points_var
    got_mean, got_var = kernel("relu_gaussian")(mean, var)
    samples = points_mean + np.sqrt(points_var.astype(np.float64)) * rng.standard_normal((MC_SAMPLES, 5))
    _mc_check("relu (tvm)", got_mean.flat[:5], got_var.flat[:5], np.maximum(samples, 0))
    record("property", "Monte-Carlo fixed points: relu (tvm)", tried=5, survived=5)
