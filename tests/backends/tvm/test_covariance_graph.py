"""The covariance-aware PFP compiled by TVM (graph epilogue + ops/covariance) against the PyTorch reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("tvm")

from pfp.backends import base  # noqa: E402
from pfp.backends import torch_ref as ref  # noqa: E402
from pfp.backends.base import Backend  # noqa: E402
from pfp.backends.tvm import graph, pipeline  # noqa: E402
from pfp.convert import PFPModel  # noqa: E402
from pfp.spec import Conv2d, Dense, Flatten, MaxPool2d, ModelSpec, ReLU, build_spec  # noqa: E402

from .helpers import assert_close, random_params  # noqa: E402

SMALL_CONV = ModelSpec("small_conv", (1, 8, 8), (Conv2d("conv1", 1, 3, 3, padding=1), MaxPool2d(), ReLU(), Flatten(),
                                                 Dense("fc1", 48, 12), ReLU(), Dense("fc2", 12, 9), ReLU(),
                                                 Dense("fc3", 9, 4)))


@pytest.mark.parametrize(("spec", "layers", "scale"), [
    (build_spec("mlp"), 2, 1.0),
    (build_spec("mlp"), 3, 0.5),  # the block starts at the deterministic input: no boundary term
    (SMALL_CONV, 2, 1.0),
    (SMALL_CONV, 3, 2.0),  # the boundary is the pooled conv output
])
def test_compiled_correction_matches_reference(spec, layers, scale):
    params = random_params(spec, seed=7)
    x = torch.randn(3, *spec.input_shape, generator=torch.Generator().manual_seed(1))
    runner = pipeline.compile_pfp(spec, params, batch_size=3, covariance_layers=layers, variance_scale=scale)
    mean, var = runner(x.numpy())
    with torch.no_grad():
        ref_mean, ref_var = ref.pfp_forward(spec, params, x, covariance_layers=layers, variance_scale=scale)
        plain_var = ref.pfp_forward(spec, params, x, variance_scale=scale)[1]
    assert not torch.allclose(ref_var, plain_var, rtol=1e-3), "the correction must change something to be tested"
    assert_close(mean, ref_mean, what="mean")
    assert_close(var, ref_var, rtol=2e-4, what="var")  # a difference of sums: a little looser than plain PFP's


def test_weight_parameters_carry_the_block_weights():
    spec = build_spec("mlp")
    params = random_params(spec, seed=2)
    arrays = graph.pfp_weight_arrays(spec, params, covariance_layers=2)
    assert {"fc2_weight_mean_padded", "fc2_weight_mean_sq_t", "fc3_weight_mean_sq_t"} <= set(arrays)
    assert "fc3_weight_mean_padded" not in arrays  # the last layer seeds the Jacobian from W itself
    # the GEMM weights: the output axis zero-padded to a whole number of SIMD registers
    padded, w = arrays["fc2_weight_mean_padded"], arrays["fc2_weight_mean"]
    assert padded.shape == (100, 112)
    np.testing.assert_array_equal(padded[:, :100], w)
    assert not padded[:, 100:].any()
    squared_t = arrays["fc3_weight_mean_sq_t"]
    assert squared_t.shape == (100, 16)
    np.testing.assert_array_equal(squared_t[:, :10], (arrays["fc3_weight_mean"] ** 2).T)
    assert not squared_t[:, 10:].any()
    x = torch.randn(2, *spec.input_shape, generator=torch.Generator().manual_seed(3))
    runner = pipeline.compile_pfp(spec, params, batch_size=2, covariance_layers=2, weights_as_params=True)
    _, var = runner(x.numpy())
    assert_close(var, ref.pfp_forward(spec, params, x, covariance_layers=2)[1], rtol=2e-4, what="var (weight parameters)")


def test_tvm_pfp_cov_variant_runs_the_models_option():
    spec = build_spec("mlp")
    model = PFPModel(spec, random_params(spec, seed=4), covariance_layers=2)
    x = np.random.default_rng(0).standard_normal((2, 1, 28, 28)).astype(np.float32)
    compiled = base.create(Backend.TVM, "pfp_cov", model, batch_size=2, variance_scale=0.7)
    assert compiled.describe()["covariance_layers"] == 2
    expected = ref.pfp_forward(spec, model.params, torch.from_numpy(x), variance_scale=0.7, covariance_layers=2)[1]
    assert_close(compiled.predict(x)[1], expected, rtol=2e-4, what="pfp_cov")
