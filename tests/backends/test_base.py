"""The backend interface: the registry makes and loads predictors of every backend, and they
satisfy :class:`Predictor`; torch and TVM predictors of the same small random model agree."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pfp.backends import base
from pfp.backends.base import Backend, Predictor, PredictorKind, Schedule
from pfp.config import Variant
from pfp.convert import convert_posterior
from tests._fixtures import random_posterior

VARIANTS = [Variant.PFP, Variant.PFP_SEPARATE, Variant.DET, Variant.SVI]


@pytest.fixture(scope="module")
def models():
    posterior = random_posterior("mlp", seed=5)
    return posterior, convert_posterior(posterior)


@pytest.fixture(scope="module")
def x():
    return np.random.default_rng(0).standard_normal((5, 1, 28, 28)).astype(np.float32)


def _options(batch_size: int) -> dict:
    return {"batch_size": batch_size, "variance_scale": 0.7, "svi_samples": 3, "seed": 2}


def test_base_imports_neither_torch_nor_tvm():
    import subprocess
    import sys

    code = "import sys; import pfp.backends.base; print('torch' in sys.modules, 'tvm' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_unknown_backend_names_the_choices():
    with pytest.raises(ValueError, match="unknown backend 'onnx'; choose one of: torch, tvm"):
        base.factory("onnx")


def test_load_picks_the_backend_by_file_ending(tmp_path):
    with pytest.raises(ValueError, match="cannot tell the backend"):
        base.load(tmp_path / "model.bin")
    with pytest.raises(FileNotFoundError):
        base.load(tmp_path / "model.npz")


def test_a_backend_can_be_registered(monkeypatch):
    monkeypatch.setattr(base, "_MODULES", dict(base._MODULES))
    monkeypatch.setattr(base, "_FACTORIES", {})
    base.register_backend(Backend.TORCH, "pfp.backends.torch_predictor")
    assert base.factory("torch").backend is Backend.TORCH


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: v.value)
def test_torch_predictor_satisfies_the_protocol(models, x, variant, tmp_path):
    posterior, pfp_model = models
    predictor = base.create(Backend.TORCH, variant, pfp_model, posterior, **_options(2))
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


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: v.value)
def test_tvm_and_torch_predictors_agree(models, x, variant, tmp_path):
    pytest.importorskip("tvm")
    from tests.backends.tvm.helpers import assert_close

    posterior, pfp_model = models
    reference = base.create(Backend.TORCH, variant, pfp_model, posterior, **_options(2))
    compiled = base.create(Backend.TVM, variant, pfp_model, posterior, **_options(2), schedule=Schedule.HAND)
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
    pytest.importorskip("tvm")
    posterior, pfp_model = models
    memory = base.factory(Backend.TVM).memory(Variant.DET, pfp_model, posterior, batch_size=2)
    assert memory["weight_bytes"] == 4 * sum(int(np.prod(layer.weight_shape)) + int(np.prod(layer.bias_shape))
                                             for layer in pfp_model.spec.parametric_layers())
    assert memory["total_bytes"] == memory["activation_bytes"] + memory["weight_bytes"]
    assert base.factory(Backend.TORCH).memory(Variant.DET, pfp_model, posterior, batch_size=2) is None
