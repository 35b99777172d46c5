"""Whole networks in float32 against the same network in float64 (issue 22).

MLP and LeNet PFP, plain and covariance-aware (k = 2), on real MNIST test digits and on
adversarially scaled inputs (x 1e3, x 1e-6, all zeros, saturated white and black): the PyTorch
reference (float32, as every stage runs it) and the compiled TVM network (float32, hand schedules,
subnormals flushed) must both match the reference's layer walk run in float64, with finite logits
and non-negative variances. Random posteriors of the trained models' kind (N(0, 1/fan_in) means,
variances 1e-4 .. 1e-2, ``tests/backends/tvm/helpers.random_params``).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("tvm")

from pfp.backends import torch_ref as ref  # noqa: E402
from pfp.backends.tvm import pipeline  # noqa: E402
from pfp.convert import pool_before_relu, with_pool_rule  # noqa: E402
from pfp.data.dirty_mnist import normalise  # noqa: E402
from pfp.spec import build_spec  # noqa: E402
from tests.backends.tvm.helpers import random_params  # noqa: E402
from tests.reliability.numerics import walk64  # noqa: E402
from tests.reliability.report import record  # noqa: E402
from tests.servers import real_images  # noqa: E402

BATCH = 8
# (model, pool rule, covariance layers): plain PFP with exact Clark pooling, and the recorded run's
# configuration (argmax_mean pooling, covariance-aware k = 2)
VARIANTS = [("mlp", "clark", 0), ("mlp", "clark", 2), ("lenet", "clark", 0), ("lenet", "argmax_mean", 2)]


def input_sets() -> dict[str, np.ndarray]:
    """Five batches of BATCH images (B, 1, 28, 28), normalised as the pipeline does."""
    digits = real_images(BATCH, start=100)
    x = normalise(digits).numpy()
    return {
        "real": x,
        "real x 1e3": x * 1e3,
        "real x 1e-6": x * 1e-6,
        "zeros": np.zeros_like(x),
        "saturated": np.concatenate([normalise(np.full((BATCH // 2, 28, 28), 255, np.uint8)).numpy(),
                                     normalise(np.zeros((BATCH - BATCH // 2, 28, 28), np.uint8)).numpy()]),
    }


@pytest.fixture(scope="module")
def inputs():
    return input_sets()


def _network(model: str, rule: str):
    spec = with_pool_rule(pool_before_relu(build_spec(model)), rule)
    return spec, random_params(spec, seed=5)


def _assert_matches(what: str, mean, var, mean64, var64, var_scale):
    """Finite, var >= 0; mean within 1e-5 of the row's logit scale, var within 1e-5 of ``var_scale``.

    Measured: ~2e-7 for both backends (float32 rounding); the bounds leave 50x for other summation orders.
    """
    mean, var = np.asarray(mean, np.float64), np.asarray(var, np.float64)
    assert np.all(np.isfinite(mean)) and np.all(np.isfinite(var)), f"{what}: non-finite logits"
    assert np.all(var >= 0), f"{what}: negative variance {var.min()}"
    mean_scale = np.abs(mean64).max(-1, keepdims=True) + np.sqrt(var64.max(-1, keepdims=True)) + 1e-30
    assert np.all(np.abs(mean - mean64) <= 1e-5 * mean_scale), (
        f"{what} mean: max error {np.abs(mean - mean64).max():.3g}, scale {mean_scale.max():.3g}")
    assert np.all(np.abs(var - var64) <= 1e-5 * var_scale + 1e-5 * np.abs(var64)), (
        f"{what} var: max error {np.abs(var - var64).max():.3g}, scale {var_scale.max():.3g}")


@pytest.mark.parametrize(("model", "rule", "layers"), VARIANTS, ids=lambda v: str(v))
def test_float32_networks_match_float64(model, rule, layers, inputs):
    spec, params = _network(model, rule)
    compiled = pipeline.compile_pfp(spec, params, batch_size=BATCH, covariance_layers=layers)
    compared = 0
    for name, x in inputs.items():
        mean64, var64 = walk64(spec, params, x, layers)
        # the covariance correction adds and subtracts terms of the plain variance's size: its float32
        # error is relative to the larger of the two variances, not to the corrected one
        plain64 = var64 if layers == 0 else walk64(spec, params, x, 0)[1]
        var_scale = np.maximum(var64, plain64).max(-1, keepdims=True)
        with torch.no_grad():
            mean32, var32 = ref.pfp_forward(spec, params, torch.from_numpy(x), covariance_layers=layers)
        _assert_matches(f"{model}/{rule}/k={layers} torch {name}", mean32.numpy(), var32.numpy(), mean64, var64,
                        var_scale)
        _assert_matches(f"{model}/{rule}/k={layers} tvm {name}", *compiled(x), mean64, var64, var_scale)
        compared += len(x)
    record("property", "networks float32 vs float64 (torch)", tried=compared, survived=compared)
    record("property", "networks float32 vs float64 (tvm)", tried=compared, survived=compared)
