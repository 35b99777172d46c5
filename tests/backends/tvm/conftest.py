"""Shared fixtures of the TVM backend tests: networks with random posteriors and their compiled runners."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("tvm")

from pfp.backends import torch_ref as ref  # noqa: E402
from pfp.backends.tvm import pipeline, targets  # noqa: E402
from pfp.convert import pool_before_relu  # noqa: E402
from pfp.spec import Architecture, build_spec  # noqa: E402

from .helpers import BATCH, random_params  # noqa: E402


@pytest.fixture(scope="module", params=[Architecture.MLP, Architecture.LENET], ids=lambda a: a.value)
def network(request):
    """(spec, params, x, reference mean, reference var), per architecture, in the converted layer order."""
    spec = pool_before_relu(build_spec(request.param))
    params = random_params(spec, seed=0)
    x = torch.randn(BATCH, *spec.input_shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref_mean, ref_var = ref.pfp_forward(spec, params, x)
    return spec, params, x, ref_mean, ref_var


@pytest.fixture(scope="module")
def joint_runner(network):
    spec, params, *_ = network
    return pipeline.compile_pfp(spec, params, batch_size=BATCH, joint=True)


@pytest.fixture(scope="module")
def mlp_case():
    spec = build_spec("mlp")
    params = random_params(spec, seed=2)
    x = torch.randn(BATCH, *spec.input_shape, generator=torch.Generator().manual_seed(3))
    return spec, params, x


@pytest.fixture(scope="module")
def mlp_params_runner(mlp_case):
    spec, params, _ = mlp_case
    return pipeline.compile_pfp(spec, params, batch_size=BATCH, weights_as_params=True)


@pytest.fixture(scope="module")
def arm_runner(mlp_case):
    spec, params, _ = mlp_case
    return pipeline.compile_pfp(spec, params, batch_size=BATCH, target=targets.TargetName.RASP4B)

