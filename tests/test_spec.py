"""Model descriptions: shapes, names, JSON round trip and consistency checks."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import pytest

from pfp.spec import (
    INPUT_SHAPE,
    Architecture,
    Conv2d,
    Dense,
    Flatten,
    MaxPool2d,
    ModelSpec,
    PoolRule,
    ReLU,
    SpecError,
    build_spec,
    lenet_spec,
    mlp_spec,
)


def test_mlp_layer_shapes():
    spec = build_spec("mlp")
    assert spec.name == "mlp"
    assert spec.input_shape == INPUT_SHAPE == (1, 28, 28)
    assert spec.output_shapes() == [(784,), (100,), (100,), (100,), (100,), (10,)]
    assert spec.num_outputs == 10


def test_lenet_layer_shapes_and_flatten_400():
    spec = build_spec(Architecture.LENET)
    assert spec.output_shapes() == [
        (6, 28, 28), (6, 28, 28), (6, 14, 14),  # conv1 (pad 2), relu, pool
        (16, 10, 10), (16, 10, 10), (16, 5, 5),  # conv2, relu, pool
        (400,),  # flatten
        (120,), (120,), (84,), (84,), (10,),
    ]
    flatten_index = next(i for i, layer in enumerate(spec.layers) if isinstance(layer, Flatten))
    assert spec.output_shapes()[flatten_index] == (400,)
    assert spec.num_outputs == 10


def test_parametric_layer_names_and_weight_shapes():
    mlp, lenet = mlp_spec(), lenet_spec()
    assert [layer.name for layer in mlp.parametric_layers()] == ["fc1", "fc2", "fc3"]
    assert [layer.name for layer in lenet.parametric_layers()] == ["conv1", "conv2", "fc1", "fc2", "fc3"]
    assert [(l.weight_shape, l.bias_shape) for l in mlp.parametric_layers()] == [
        ((100, 784), (100,)), ((100, 100), (100,)), ((10, 100), (10,))]
    assert [(l.weight_shape, l.bias_shape) for l in lenet.parametric_layers()] == [
        ((6, 1, 5, 5), (6,)), ((16, 6, 5, 5), (16,)),
        ((120, 400), (120,)), ((84, 120), (84,)), ((10, 84), (10,))]
    # Non-parametric layers are excluded.
    assert all(isinstance(l, (Dense, Conv2d)) for l in lenet.parametric_layers())


@pytest.mark.parametrize("name", ["mlp", "lenet"])
def test_json_round_trip(name):
    spec = build_spec(name)
    text = spec.to_json()
    raw = json.loads(text)
    assert raw["name"] == name and raw["input_shape"] == [1, 28, 28]
    back = ModelSpec.from_json(text)
    assert back == spec  # frozen dataclasses: field-by-field equality, layer types included
    assert back.output_shapes() == spec.output_shapes()
    assert type(back.input_shape) is tuple


def test_json_unknown_layer_kind_is_rejected():
    raw = json.loads(mlp_spec().to_json())
    raw["layers"][1]["kind"] = "dropout"
    with pytest.raises(ValueError, match="unknown layer kind 'dropout'"):
        ModelSpec.from_json(json.dumps(raw))


def test_unknown_model_name_names_the_choices():
    with pytest.raises(ValueError) as info:
        build_spec("resnet")
    message = str(info.value)
    assert "'resnet'" in message
    assert "mlp" in message and "lenet" in message


def test_inconsistent_dense_input_is_rejected():
    spec = ModelSpec("bad", INPUT_SHAPE, (Flatten(), Dense("fc1", 700, 10)))
    with pytest.raises(ValueError, match=r"bad\.fc1: expects \(700,\), gets \(784,\)"):
        spec.output_shapes()


def test_inconsistent_conv_channels_are_rejected():
    spec = ModelSpec("bad", INPUT_SHAPE, (Conv2d("conv1", 3, 6, 5),))
    with pytest.raises(ValueError, match=r"bad\.conv1: expects 3 channels"):
        spec.output_shapes()


def test_maxpool_on_odd_size_is_rejected():
    spec = ModelSpec("bad", INPUT_SHAPE, (Conv2d("conv1", 1, 2, 4), ReLU(), MaxPool2d()))  # 28 - 4 + 1 = 25
    with pytest.raises(ValueError, match="even height/width"):
        spec.output_shapes()


def test_from_json_rejects_unknown_layer_fields():
    text = build_spec("mlp").to_json().replace('"in_features"', '"in_feature"', 1)
    with pytest.raises(ValueError, match="invalid dense layer"):
        ModelSpec.from_json(text)


@pytest.mark.parametrize("rule", list(PoolRule))
def test_maxpool_rule_survives_the_json_round_trip(rule):
    spec = ModelSpec("toy", (1, 4, 4), (MaxPool2d(rule), ReLU(), MaxPool2d(), Flatten(), Dense("d", 1, 2)))
    loaded = ModelSpec.from_json(spec.to_json())
    assert loaded == spec
    assert [layer.rule for layer in loaded.layers if layer.kind == "maxpool2d"] == [rule, PoolRule.CLARK]
    assert json.loads(spec.to_json())["layers"][0]["rule"] == rule.value


def test_maxpool_rule_from_a_string_equals_the_enum_and_hashes_alike():
    assert MaxPool2d("argmax_mean") == MaxPool2d(PoolRule.ARGMAX_MEAN)
    assert hash(MaxPool2d("argmax_mean")) == hash(MaxPool2d(PoolRule.ARGMAX_MEAN))
    assert MaxPool2d().rule is PoolRule.CLARK


def test_json_written_before_pool_rules_loads_with_clark():
    raw = json.loads(build_spec("lenet").to_json())
    for layer in raw["layers"]:
        layer.pop("rule", None)
    assert ModelSpec.from_json(json.dumps(raw)) == build_spec("lenet")


def test_an_unknown_pool_rule_is_refused_by_name():
    raw = json.loads(build_spec("lenet").to_json())
    raw["layers"][2]["rule"] = "bilinear"
    with pytest.raises(SpecError, match="invalid maxpool2d layer.*'bilinear'.*clark, clark_logistic, argmax_mean"):
        ModelSpec.from_json(json.dumps(raw))
    with pytest.raises(SpecError, match="'bilinear'"):
        MaxPool2d("bilinear")


# --------------------------------------------------------------------------- one walk, every backend

def _import_every_backend() -> None:
    """Import every module under pfp.backends, so each LayerTable has registered itself."""
    import importlib
    import pkgutil

    import pfp.backends

    for module in pkgutil.walk_packages(pfp.backends.__path__, "pfp.backends."):
        importlib.import_module(module.name)
    importlib.import_module("pfp.covariance_curve")  # the linearised network of the fidelity curve


def test_every_backend_table_covers_every_layer_kind():
    from pfp.spec import LAYER_KINDS, LayerTable

    _import_every_backend()
    assert {"torch.pfp", "torch.deterministic", "torch.sampled", "torch.ensemble"} <= set(LayerTable.REGISTRY)
    gaps = {backend: table.missing_kinds() for backend, table in LayerTable.REGISTRY.items() if table.missing_kinds()}
    assert not gaps, f"backends without an implementation of a registered layer kind: {gaps}"
    assert set(LAYER_KINDS) == {"dense", "conv2d", "relu", "maxpool2d", "flatten"}


def test_a_backend_without_a_layer_kind_is_refused_by_name():
    from pfp.spec import LayerTable, SpecError

    partial = LayerTable("test.partial", {"flatten": lambda layer, index, h, ctx: h})
    try:
        assert partial.missing_kinds() == ["conv2d", "dense", "maxpool2d", "relu"]
        with pytest.raises(SpecError, match=r"mlp: backend 'test.partial' has no implementation of layer kind 'dense'"):
            partial.walk(build_spec("mlp"), 0)
    finally:
        del LayerTable.REGISTRY["test.partial"]


@dataclass(frozen=True)
class _Scale:
    """A toy layer kind: multiplies the activation by a constant (mean by c, variance by c^2)."""

    factor: float
    kind: str = "scale"
    parametric: ClassVar[bool] = False

    def output_shape(self, shape):
        return shape


def _toy_handlers() -> dict:
    """The toy kind's entry in each backend's table: what a developer adds for a new layer kind."""

    def pfp(layer, _index, state, _ctx):
        mean, var = state
        return mean * layer.factor, None if var is None else var * layer.factor**2

    def plain(layer, _index, h, _ctx):
        return h * layer.factor

    from tvm import relax

    def relax_scale(ctx, value, factor):
        return ctx.bb.emit(relax.op.multiply(value, relax.const(factor, "float32")))

    def tvm_pfp(layer, _index, state, ctx):
        mean, var = state
        return relax_scale(ctx, mean, layer.factor), None if var is None else relax_scale(ctx, var, layer.factor**2)

    def tvm_plain(layer, _index, h, ctx):
        return relax_scale(ctx, h, layer.factor)

    def tvm_ensemble(layer, _index, state, ctx):
        h, rows = state
        return relax_scale(ctx, h, layer.factor), rows

    def linearised(layer, _index, state, _ctx):
        h, var = state
        return h * layer.factor, None if var is None else var * layer.factor**2

    return {"torch.pfp": pfp, "torch.deterministic": plain, "torch.sampled": plain, "torch.ensemble": plain,
            "torch.linearised_independent": linearised,
            "tvm.pfp": tvm_pfp, "tvm.deterministic": tvm_plain, "tvm.ensemble": tvm_ensemble}


def test_a_toy_layer_kind_is_one_spec_entry_and_one_entry_per_backend(monkeypatch):
    import torch

    from pfp.backends import torch_ref
    from pfp.spec import LAYER_KINDS, LayerTable

    _import_every_backend()
    monkeypatch.setitem(LAYER_KINDS, "scale", _Scale)
    # registered but implemented nowhere: every backend reports the gap
    assert all("scale" in table.missing_kinds() for table in LayerTable.REGISTRY.values())
    handlers = _toy_handlers()
    unhandled = sorted(set(LayerTable.REGISTRY) - set(handlers))
    assert not unhandled, f"backends this test does not extend with the toy kind (add theirs): {unhandled}"
    for backend, handler in handlers.items():
        monkeypatch.setitem(LayerTable.REGISTRY[backend], "scale", handler)

    base = ModelSpec("toy", (1, 4, 4), (Conv2d("c", 1, 2, 3, padding=1), ReLU(), MaxPool2d(), Flatten(),
                                        Dense("d", 8, 3)))
    scaled = ModelSpec("toy", base.input_shape, (*base.layers[:2], _Scale(2.0), *base.layers[2:4], _Scale(-0.5),
                                                 base.layers[4]))
    assert ModelSpec.from_json(scaled.to_json()) == scaled
    assert scaled.output_shapes() == [(2, 4, 4), (2, 4, 4), (2, 4, 4), (2, 2, 2), (8,), (8,), (3,)]
    generator = torch.Generator().manual_seed(0)
    params = {layer.name: torch_ref.GaussianLayerParams.from_mean_var(
        torch.randn(layer.weight_shape, generator=generator), 0.1 * torch.rand(layer.weight_shape, generator=generator),
        torch.randn(layer.bias_shape, generator=generator), 0.1 * torch.rand(layer.bias_shape, generator=generator))
        for layer in base.parametric_layers()}
    x = torch.randn((5, *base.input_shape), generator=generator)
    # x2 after the ReLU (a positive factor commutes with ReLU and max), x(-0.5) on the features: logits x(-1) - ...
    means = {name: (p.weight_mean, p.bias_mean) for name, p in params.items()}
    reference = torch_ref.deterministic_forward(base, {"c": means["c"], "d": (-means["d"][0], means["d"][1])}, x)
    torch.testing.assert_close(torch_ref.deterministic_forward(scaled, means, x), reference)
    mean, var = torch_ref.pfp_forward(scaled, params, x)
    ref_params = dict(params, d=torch_ref.GaussianLayerParams.from_mean_var(
        -params["d"].weight_mean, params["d"].weight_var, params["d"].bias_mean, params["d"].bias_var))
    ref_mean, ref_var = torch_ref.pfp_forward(base, ref_params, x)
    torch.testing.assert_close(mean, ref_mean)
    torch.testing.assert_close(var, ref_var)
    stacked = {name: (w.unsqueeze(0).expand(3, *w.shape), b.unsqueeze(0).expand(3, *b.shape)) for name, (w, b) in means.items()}
    torch.testing.assert_close(torch_ref.ensemble_forward(scaled, stacked, x), reference.expand(3, *reference.shape))
    zero_var = {name: ((w, torch.zeros_like(w)), (b, torch.zeros_like(b))) for name, (w, b) in means.items()}
    torch.testing.assert_close(torch_ref.sampled_forward(scaled, zero_var, x), reference, atol=1e-5, rtol=1e-5)

    from pfp.backends.tvm import pipeline

    images = x.numpy()
    tvm_mean, tvm_var = pipeline.compile_pfp(scaled, params, batch_size=5).predict(images)
    np.testing.assert_allclose(tvm_mean, ref_mean.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(tvm_var, ref_var.numpy(), rtol=1e-4, atol=1e-5)
    (tvm_logits,) = pipeline.compile_deterministic(scaled, means, batch_size=5).predict(images)
    np.testing.assert_allclose(tvm_logits, reference.numpy(), rtol=1e-4, atol=1e-5)
    (tvm_members,) = pipeline.compile_ensemble(scaled, stacked, batch_size=5).predict(images)
    np.testing.assert_allclose(tvm_members, reference.expand(3, *reference.shape).numpy(), rtol=1e-4, atol=1e-5)
