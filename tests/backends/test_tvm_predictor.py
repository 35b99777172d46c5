"""The TVM backend's factory: compiled predictors satisfy the protocol and agree with the torch
predictors of the same small random model (tolerances of tests/backends/tvm/helpers.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("tvm")

from pfp.backends import base  # noqa: E402
from pfp.backends.base import Backend, Predictor, Schedule  # noqa: E402
from pfp.config import Variant  # noqa: E402
from tests.backends.tvm.helpers import assert_close  # noqa: E402

from ..common import predictor_options  # noqa: E402

VARIANTS = [Variant.PFP, Variant.PFP_SEPARATE, Variant.DET, Variant.SVI]


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: v.value)
def test_tvm_and_torch_predictors_agree(models, x, variant, tmp_path):
    posterior, pfp_model = models
    reference = base.create(Backend.TORCH, variant, pfp_model, posterior, **predictor_options(2))
    compiled = base.create(Backend.TVM, variant, pfp_model, posterior, **predictor_options(2), schedule=Schedule.HAND)
    assert isinstance(compiled, Predictor)
    assert compiled.kind == reference.kind
    expected = reference.predict(x)
    got = compiled.predict(x)  # 5 examples in batches of 2: the last one padded
    assert isinstance(got, tuple) and len(got) == len(expected)
    for index, (actual, value) in enumerate(zip(got, expected)):
        assert_close(actual, value, what=f"{variant.value} output {index}")
    info = compiled.describe()
    assert json.loads(json.dumps(info)) == info
    assert info["backend"] == "tvm" and info["variant"] == variant.value and info["schedule"] == "hand"
    assert info["model"] == "mlp" and info["kind"] == reference.describe()["kind"]
    assert info["batch_size"] == 2 and info["variance_scale"] == 0.7
    if variant is Variant.PFP:
        timing = compiled.time(number=2, repeat=2, x=x[:2])
        assert timing["median_ms"] > 0 and timing["repeat"] == 2
        rows = compiled.profile(number=1)
        assert rows and {"operator", "calls", "ms"} <= set(rows[0])
        loaded = base.load(compiled.export(tmp_path / "pfp_b2.so"))
        assert isinstance(loaded, Predictor) and loaded.describe() == info
        for actual, value in zip(loaded.predict(x), expected):
            assert_close(actual, value, what="loaded")


def test_tvm_memory_estimate_through_the_factory(models):
    posterior, pfp_model = models
    memory = base.factory(Backend.TVM).memory(Variant.DET, pfp_model, posterior, batch_size=2)
    assert memory["weight_bytes"] == 4 * sum(int(np.prod(layer.weight_shape)) + int(np.prod(layer.bias_shape))
                                             for layer in pfp_model.spec.parametric_layers())
    assert memory["total_bytes"] == memory["activation_bytes"] + memory["weight_bytes"]
    assert base.factory(Backend.TORCH).memory(Variant.DET, pfp_model, posterior, batch_size=2) is None
