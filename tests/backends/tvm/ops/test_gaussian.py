"""Gaussian math: constants shared with the reference, Phi and phi accurate in both tails."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("tvm")

import tvm  # noqa: E402
from tvm import te  # noqa: E402

from pfp.backends import torch_ref as ref  # noqa: E402
from pfp.backends.tvm import ops  # noqa: E402
from pfp.backends.tvm.ops import gaussian  # noqa: E402


def test_constants_match_reference():
    assert ops.CLARK_EPS == ref.CLARK_EPS
    assert ops.RELU_VAR_EPS == ref.RELU_VAR_EPS
    assert ops.MAX_STD_ARG == ref._MAX_STD_ARG
    assert (gaussian.LOGISTIC_C1, gaussian.LOGISTIC_C3) == (ref.LOGISTIC_C1, ref.LOGISTIC_C3)


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
            lets = gaussian._Lets()
            return lets.wrap(gaussian._normal_stats(lets, a[i])[which])
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
