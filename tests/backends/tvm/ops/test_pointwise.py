"""ReLU, 2x2 max-pool and flatten operators against the PyTorch reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("tvm")


from pfp.backends import torch_ref as ref  # noqa: E402
from pfp.backends.tvm import ops  # noqa: E402
from pfp.spec import PoolRule, SpecError  # noqa: E402

from ..helpers import assert_close, gaussian_input, run_op  # noqa: E402


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
    mean, var = run_op("relu_gaussian", m, v)
    ref_mean, ref_var = ref.relu(m, v)
    assert_close(mean, ref_mean, what="mean")
    assert_close(var, ref_var, what="var")
    assert np.all(var >= 0)


def test_relu_gaussian_nchw_random():
    m, v = gaussian_input((2, 3, 4, 5), seed=7)
    mean, var = run_op("relu_gaussian", m, v)
    ref_mean, ref_var = ref.relu(m, v)
    assert_close(mean, ref_mean, what="mean")
    assert_close(var, ref_var, what="var")


def test_relu_gaussian_deterministic_inputs_are_exact():
    m = torch.tensor([[-2.0, -1e-3, 0.0, 1e-3, 2.0]])
    mean, var = run_op("relu_gaussian", m, torch.zeros_like(m))
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
    mean, var = run_op("relu_gaussian", m[None], v[None])
    a64 = m.astype(np.float64) / std
    cdf, cdf_neg = special.ndtr(a64), special.ndtr(-a64)
    pdf = np.exp(-0.5 * a64 * a64) / np.sqrt(2 * np.pi)
    exact_mean = m * cdf + std * pdf
    exact_var = std**2 * (cdf + a64 * a64 * cdf * cdf_neg + a64 * pdf * (cdf_neg - cdf) - pdf * pdf)
    np.testing.assert_allclose(mean[0], exact_mean, rtol=1e-4, atol=0)
    np.testing.assert_allclose(var[0], exact_var, rtol=2e-3, atol=0)  # cdf + h cancels ~a^4-fold


def test_relu_deterministic():
    x = torch.randn(3, 4, 5, generator=torch.Generator().manual_seed(8))
    (out,) = run_op("relu", x)
    np.testing.assert_array_equal(out, torch.relu(x).numpy())


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


@pytest.mark.parametrize("rule", list(PoolRule))
def test_maxpool2x2_gaussian_matches_reference(rule):
    m, v = _pool_inputs()
    mean, var = run_op("maxpool2x2_gaussian", m, v, rule=rule.value)
    ref_mean, ref_var = ref.maxpool2x2(m, v, rule)
    assert mean.shape == (2, 3, 3, 4)
    if rule is PoolRule.ARGMAX_MEAN:  # selects only: bit for bit, ties to the same (first) element
        np.testing.assert_array_equal(mean, ref_mean.numpy())
        np.testing.assert_array_equal(var, ref_var.numpy())
        return
    assert_close(mean, ref_mean, what="mean")
    assert_close(var, ref_var, what="var")


def test_logistic_clark_pool_matches_reference_over_wide_ranges():
    """Scales 1e-3..1e3 and offsets up to 1e3 per channel: float32 TVM within 1e-4 of the float32 reference."""
    generator = torch.Generator().manual_seed(11)
    scale = 10 ** (6 * torch.rand(2, 8, 1, 1, generator=generator) - 3)
    m = 1e3 * torch.randn(2, 8, 1, 1, generator=generator) + 3 * scale * torch.randn(2, 8, 6, 6, generator=generator)
    v = (scale * torch.rand(2, 8, 6, 6, generator=generator)) ** 2
    mean, var = run_op("maxpool2x2_gaussian", m, v, rule="clark_logistic")
    ref_mean, ref_var = ref.maxpool2x2(m, v, "clark_logistic")
    # the mean: rounding of the 1e3 offset (float32 eps x 1e3) per Clark max, relative to the spread
    np.testing.assert_allclose(mean, ref_mean.numpy(), rtol=1e-6, atol=3e-4)
    np.testing.assert_allclose(var, ref_var.numpy(), rtol=1e-3, atol=1e-4 * float(ref_var.max()))


def test_maxpool2x2_gaussian_refuses_an_unknown_rule():
    with pytest.raises(SpecError, match="'mean'"):
        ops.make_prim_func(ops.maxpool2x2_gaussian, [(1, 1, 4, 4), (1, 1, 4, 4)], rule="mean")


def test_maxpool2x2_gaussian_every_output_reads_its_own_window():
    """Near-deterministic inputs with a unique value everywhere: out(i, j) = max of window (i, j)."""
    generator = torch.Generator().manual_seed(10)
    m = torch.randperm(2 * 3 * 6 * 8, generator=generator).float().reshape(2, 3, 6, 8)
    v = torch.full_like(m, 1e-6)
    mean, var = run_op("maxpool2x2_gaussian", m, v)
    np.testing.assert_allclose(mean, F.max_pool2d(m, 2).numpy(), rtol=0, atol=1e-3)
    np.testing.assert_allclose(var, np.full_like(var, 1e-6), rtol=1e-3)
    # every output position is a different value: no duplicated or shifted quadrant
    assert len(np.unique(mean.round(2))) == mean.size


def test_maxpool2x2_deterministic():
    m, _ = _pool_inputs()
    (out,) = run_op("maxpool2x2", m)
    np.testing.assert_array_equal(out, F.max_pool2d(m, 2).numpy())


def test_maxpool2x2_rejects_odd_sizes():
    with pytest.raises(ValueError, match="even height and width"):
        ops.make_prim_func(ops.maxpool2x2_gaussian, [(1, 1, 5, 4), (1, 1, 5, 4)])


def test_flatten():
    m, v = gaussian_input((2, 3, 4, 5), seed=11)
    mean, var = run_op("flatten_gaussian", m, v)
    np.testing.assert_array_equal(mean, m.flatten(1).numpy())
    np.testing.assert_array_equal(var, v.flatten(1).numpy())
    (out,) = run_op("flatten", m)
    np.testing.assert_array_equal(out, m.flatten(1).numpy())
