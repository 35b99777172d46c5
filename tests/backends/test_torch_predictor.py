"""The PyTorch reference as a Predictor: every variant satisfies the protocol, exports and loads back."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pfp.backends import base
from pfp.backends.base import Backend, Predictor, PredictorKind
from pfp.config import Variant

from ..common import predictor_options

VARIANTS = [Variant.PFP, Variant.PFP_SEPARATE, Variant.DET, Variant.SVI]


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: v.value)
def test_torch_predictor_satisfies_the_protocol(models, x, variant, tmp_path):
    posterior, pfp_model = models
    predictor = base.create(Backend.TORCH, variant, pfp_model, posterior, **predictor_options(2))
    assert isinstance(predictor, Predictor)
    assert predictor.kind is base.VARIANT_KIND[variant.value]
    outputs = predictor.predict(x)
    assert isinstance(outputs, tuple)
    shapes = {PredictorKind.PFP: [(5, 10), (5, 10)], PredictorKind.DETERMINISTIC: [(5, 10)],
              PredictorKind.ENSEMBLE: [(3, 5, 10)]}[predictor.kind]
    assert [out.shape for out in outputs] == shapes
    timing = predictor.time(number=2, repeat=3, x=x[:2])
    assert timing["median_ms"] > 0 and timing["number"] == 2 and timing["repeat"] == 3
    assert predictor.profile(number=1) == []
    info = predictor.describe()
    assert json.loads(json.dumps(info)) == info
    assert info["backend"] == "torch" and info["variant"] == variant.value and info["model"] == "mlp"
    loaded = base.load(predictor.export(tmp_path / "predictor.npz"))
    assert loaded.kind is predictor.kind and loaded.describe() == info
    for got, expected in zip(loaded.predict(x), outputs):
        np.testing.assert_array_equal(got, expected)


def test_torch_predictor_needs_the_posterior_for_the_baselines(models):
    _, pfp_model = models
    with pytest.raises(ValueError, match="pass posterior="):
        base.create(Backend.TORCH, Variant.DET, pfp_model, batch_size=1)


def test_torch_predictor_checks_the_input(models):
    _, pfp_model = models
    predictor = base.create(Backend.TORCH, Variant.PFP, pfp_model, batch_size=1)
    with pytest.raises(ValueError, match="wrong input shape"):
        predictor.predict(np.zeros((2, 784), np.float32))
