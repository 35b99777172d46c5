"""Shared fixtures of the tuning tests: a tiny network and one local tuning of it (once per package)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("tvm")


from pfp.backends import torch_ref as ref  # noqa: E402
from pfp.backends.tvm.graph import build_pfp_module  # noqa: E402
from pfp.backends.tvm.tuning.config import TuneReport  # noqa: E402
from pfp.backends.tvm.tuning.search import tune_module  # noqa: E402

from ..helpers import SPEC, fast_config, random_params  # noqa: E402


@pytest.fixture(scope="package")
def case():
    params = random_params(SPEC, seed=0)
    x = torch.randn(1, *SPEC.input_shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref_mean, ref_var = ref.pfp_forward(SPEC, params, x)
    mod = build_pfp_module(SPEC, params, batch_size=1)
    return mod, x.numpy(), ref_mean, ref_var


@pytest.fixture(scope="package")
def local_tuning(case, tmp_path_factory):
    mod = case[0]
    config = fast_config(tmp_path_factory.mktemp("tune_local"))
    report = TuneReport()
    database = tune_module(mod, config=config, report=report)
    return config, database, report
