"""The one model description every backend is built from.

A :class:`ModelSpec` is an ordered list of layers with shapes. The Pyro BNN, the
deterministic twin, the PyTorch PFP reference and the TVM builder all walk the same
list, so adding a layer type means one entry here and one implementation per backend.

Example::

    >>> spec = build_spec(Architecture.LENET)
    >>> [layer.name for layer in spec.parametric_layers()]
    ['conv1', 'conv2', 'fc1', 'fc2', 'fc3']
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from enum import Enum
from typing import Union

INPUT_SHAPE = (1, 28, 28)
NUM_CLASSES = 10


class Architecture(str, Enum):
    MLP = "mlp"
    LENET = "lenet"


@dataclass(frozen=True)
class Dense:
    name: str
    in_features: int
    out_features: int
    kind: str = "dense"

    @property
    def weight_shape(self) -> tuple[int, ...]:
        return (self.out_features, self.in_features)

    @property
    def bias_shape(self) -> tuple[int, ...]:
        return (self.out_features,)


@dataclass(frozen=True)
class Conv2d:
    name: str
    in_channels: int
    out_channels: int
    kernel_size: int
    stride: int = 1
    padding: int = 0
    kind: str = "conv2d"

    @property
    def weight_shape(self) -> tuple[int, ...]:
        return (self.out_channels, self.in_channels, self.kernel_size, self.kernel_size)

    @property
    def bias_shape(self) -> tuple[int, ...]:
        return (self.out_channels,)


@dataclass(frozen=True)
class ReLU:
    kind: str = "relu"


@dataclass(frozen=True)
class MaxPool2d:
    """2x2 max-pooling with stride 2 (the only pooling PFP implements)."""

    kind: str = "maxpool2d"


@dataclass(frozen=True)
class Flatten:
    kind: str = "flatten"


Layer = Union[Dense, Conv2d, ReLU, MaxPool2d, Flatten]
ParametricLayer = Union[Dense, Conv2d]
_LAYER_TYPES = {cls.kind: cls for cls in (Dense, Conv2d, ReLU, MaxPool2d, Flatten)}


@dataclass(frozen=True)
class ModelSpec:
    name: str
    input_shape: tuple[int, int, int]
    layers: tuple[Layer, ...]

    def parametric_layers(self) -> list[ParametricLayer]:
        return [layer for layer in self.layers if isinstance(layer, (Dense, Conv2d))]

    def output_shapes(self) -> list[tuple[int, ...]]:
        """Per-example activation shape after each layer (checks the spec is consistent)."""
        shape: tuple[int, ...] = tuple(self.input_shape)
        shapes = []
        for layer in self.layers:
            if isinstance(layer, Flatten):
                size = 1
                for dim in shape:
                    size *= dim
                shape = (size,)
            elif isinstance(layer, Dense):
                if shape != (layer.in_features,):
                    raise ValueError(f"{self.name}.{layer.name}: expects ({layer.in_features},), gets {shape}")
                shape = (layer.out_features,)
            elif isinstance(layer, Conv2d):
                if len(shape) != 3 or shape[0] != layer.in_channels:
                    raise ValueError(f"{self.name}.{layer.name}: expects {layer.in_channels} channels, gets {shape}")
                _, height, width = shape
                out_h = (height + 2 * layer.padding - layer.kernel_size) // layer.stride + 1
                out_w = (width + 2 * layer.padding - layer.kernel_size) // layer.stride + 1
                shape = (layer.out_channels, out_h, out_w)
            elif isinstance(layer, MaxPool2d):
                if len(shape) != 3 or shape[1] % 2 or shape[2] % 2:
                    raise ValueError(f"{self.name}: 2x2 max-pool needs even height/width, gets {shape}")
                shape = (shape[0], shape[1] // 2, shape[2] // 2)
            shapes.append(shape)
        return shapes

    @property
    def num_outputs(self) -> int:
        return self.output_shapes()[-1][0]

    def to_json(self) -> str:
        return json.dumps({"name": self.name, "input_shape": list(self.input_shape),
                           "layers": [asdict(layer) for layer in self.layers]})

    @classmethod
    def from_json(cls, text: str) -> "ModelSpec":
        raw = json.loads(text)
        layers = []
        for entry in raw["layers"]:
            kind = entry.get("kind")
            if kind not in _LAYER_TYPES:
                raise ValueError(f"unknown layer kind {kind!r} in model spec")
            try:
                layers.append(_LAYER_TYPES[kind](**entry))
            except TypeError as error:
                raise ValueError(f"invalid {kind} layer {entry} in model spec: {error}") from None
        return cls(name=raw["name"], input_shape=tuple(raw["input_shape"]), layers=tuple(layers))


def mlp_spec() -> ModelSpec:
    """MLP 784-100-100-10 with ReLU."""
    return ModelSpec(
        name=Architecture.MLP.value,
        input_shape=INPUT_SHAPE,
        layers=(
            Flatten(),
            Dense("fc1", 784, 100), ReLU(),
            Dense("fc2", 100, 100), ReLU(),
            Dense("fc3", 100, NUM_CLASSES),
        ),
    )


def lenet_spec() -> ModelSpec:
    """LeNet-5: conv 1->6 5x5 pad 2, pool, conv 6->16 5x5, pool, fc 400-120-84-10."""
    return ModelSpec(
        name=Architecture.LENET.value,
        input_shape=INPUT_SHAPE,
        layers=(
            Conv2d("conv1", 1, 6, 5, padding=2), ReLU(), MaxPool2d(),
            Conv2d("conv2", 6, 16, 5), ReLU(), MaxPool2d(),
            Flatten(),
            Dense("fc1", 400, 120), ReLU(),
            Dense("fc2", 120, 84), ReLU(),
            Dense("fc3", 84, NUM_CLASSES),
        ),
    )


def build_spec(architecture: Architecture | str) -> ModelSpec:
    try:
        architecture = Architecture(architecture)
    except ValueError:
        choices = ", ".join(a.value for a in Architecture)
        raise ValueError(f"unknown model {architecture!r}; choose one of: {choices}") from None
    spec = {Architecture.MLP: mlp_spec, Architecture.LENET: lenet_spec}[architecture]()
    spec.output_shapes()  # fail early on an inconsistent description
    return spec
