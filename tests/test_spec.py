"""Model descriptions: shapes, names, JSON round trip and consistency checks."""

from __future__ import annotations

import json

import pytest

from pfp.spec import (
    INPUT_SHAPE,
    Architecture,
    Conv2d,
    Dense,
    Flatten,
    MaxPool2d,
    ModelSpec,
    ReLU,
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
