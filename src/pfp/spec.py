"""The one model description every backend is built from.

A :class:`ModelSpec` is an ordered list of layers. Each layer kind is a frozen dataclass
registered with :func:`layer_kind` that owns its shape rule (``output_shape``). Every backend
(PyTorch PFP reference, deterministic twin, sampled SVI member, batched ensemble, each TVM
graph builder) is a :class:`LayerTable` from kind to implementation, and its one
:meth:`LayerTable.walk` drives it. Adding a layer kind is one class here and one entry per
table; ``tests/test_spec.py`` checks that every registered table covers every kind.

Example::

    >>> spec = build_spec(Architecture.LENET)
    >>> [layer.name for layer in spec.parametric_layers()]
    ['conv1', 'conv2', 'fc1', 'fc2', 'fc3']
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from enum import Enum
from typing import Any, ClassVar, TypeVar, Union

INPUT_SHAPE = (1, 28, 28)
NUM_CLASSES = 10

Shape = tuple[int, ...]


class Architecture(str, Enum):
    MLP = "mlp"
    LENET = "lenet"


class SpecError(ValueError):
    """A model description that is inconsistent or names a layer kind nobody registered."""


#: kind name -> layer class; :func:`layer_kind` adds to it (and so does a test's toy kind)
LAYER_KINDS: dict[str, type] = {}


def layer_kind(cls: type) -> type:
    """Class decorator: register a layer dataclass under its ``kind`` (the name in the JSON form)."""
    LAYER_KINDS[cls.kind] = cls
    return cls


@layer_kind
@dataclass(frozen=True)
class Dense:
    name: str
    in_features: int
    out_features: int
    kind: str = "dense"
    parametric: ClassVar[bool] = True

    @property
    def weight_shape(self) -> Shape:
        return (self.out_features, self.in_features)

    @property
    def bias_shape(self) -> Shape:
        return (self.out_features,)

    def output_shape(self, shape: Shape) -> Shape:
        if shape != (self.in_features,):
            raise SpecError(f"{self.name}: expects ({self.in_features},), gets {shape}")
        return (self.out_features,)


@layer_kind
@dataclass(frozen=True)
class Conv2d:
    name: str
    in_channels: int
    out_channels: int
    kernel_size: int
    stride: int = 1
    padding: int = 0
    kind: str = "conv2d"
    parametric: ClassVar[bool] = True

    @property
    def weight_shape(self) -> Shape:
        return (self.out_channels, self.in_channels, self.kernel_size, self.kernel_size)

    @property
    def bias_shape(self) -> Shape:
        return (self.out_channels,)

    def output_shape(self, shape: Shape) -> Shape:
        if len(shape) != 3 or shape[0] != self.in_channels:
            raise SpecError(f"{self.name}: expects {self.in_channels} channels, gets {shape}")
        _, height, width = shape
        out_h = (height + 2 * self.padding - self.kernel_size) // self.stride + 1
        out_w = (width + 2 * self.padding - self.kernel_size) // self.stride + 1
        return (self.out_channels, out_h, out_w)


@layer_kind
@dataclass(frozen=True)
class ReLU:
    kind: str = "relu"
    parametric: ClassVar[bool] = False

    def output_shape(self, shape: Shape) -> Shape:
        return shape


class PoolRule(str, Enum):
    """How PFP moment-matches the max of a 2x2 window of independent Gaussians (deterministic backends ignore it).

    * ``clark``: pairwise Clark max (rows, then the two row maxima), exact normal cdf/pdf;
    * ``clark_logistic``: the same with the logistic approximation
      ``Phi(a) ~ sigmoid(1.5976 a + 0.07056 a^3)`` and its derivative for phi (one exp, no erfc fit;
      max abs error 1.5e-4 on Phi, 4.6e-4 on phi: each Clark max then errs by at most 4.8e-4 t on the
      mean and 1.3e-3 t^2 on the variance, t^2 = var1 + var2; a whole pool by < 3.5e-3 s and 2.5e-3 s^2,
      s^2 the window's summed variance; see ``pfp.backends.torch_ref.LOGISTIC_*``);
    * ``argmax_mean``: mean and variance of the window element with the largest mean (first in row-major
      order on ties); no transcendental function.
    """

    CLARK = "clark"
    CLARK_LOGISTIC = "clark_logistic"
    ARGMAX_MEAN = "argmax_mean"


def pool_rule(value: PoolRule | str) -> PoolRule:
    """``value`` as a :class:`PoolRule`; a :class:`SpecError` naming it and the choices otherwise."""
    try:
        return PoolRule(value)
    except ValueError:
        choices = ", ".join(rule.value for rule in PoolRule)
        raise SpecError(f"unknown max-pool rule {value!r}; choose one of: {choices}") from None


@layer_kind
@dataclass(frozen=True)
class MaxPool2d:
    """2x2 max-pooling with stride 2 (the only pooling PFP implements); ``rule``: PFP's moment matching."""

    rule: PoolRule = PoolRule.CLARK
    kind: str = "maxpool2d"
    parametric: ClassVar[bool] = False

    def __post_init__(self) -> None:
        # always the enum (JSON gives a str): equal layers then hash alike
        object.__setattr__(self, "rule", pool_rule(self.rule))

    def output_shape(self, shape: Shape) -> Shape:
        if len(shape) != 3 or shape[1] % 2 or shape[2] % 2:
            raise SpecError(f"2x2 max-pool needs even height/width, gets {shape}")
        return (shape[0], shape[1] // 2, shape[2] // 2)


@layer_kind
@dataclass(frozen=True)
class Flatten:
    kind: str = "flatten"
    parametric: ClassVar[bool] = False

    def output_shape(self, shape: Shape) -> Shape:
        return (math.prod(shape),)


Layer = Union[Dense, Conv2d, ReLU, MaxPool2d, Flatten]
ParametricLayer = Union[Dense, Conv2d]

State = TypeVar("State")
#: ``handler(layer, index, state, context) -> state``: one layer of one backend
Handler = Callable[[Any, int, Any, Any], Any]


class LayerTable(dict):
    """One backend's implementation of every layer kind, and the one walk over a model.

    A backend (the PyTorch PFP reference, the deterministic twin, a TVM graph builder, ...) is
    a table from layer kind to a handler ``(layer, index, state, context) -> state``; :meth:`walk`
    folds the spec's layers through it. Every table registers itself in :attr:`REGISTRY` under its
    backend name, so a test can check that each one covers every kind in :data:`LAYER_KINDS`.

    Example::

        >>> twin = LayerTable("torch.deterministic", {"relu": lambda layer, i, h, ctx: h.clamp_min(0), ...})
        >>> logits = twin.walk(spec, images, context=weights)
    """

    REGISTRY: ClassVar[dict[str, LayerTable]] = {}

    def __init__(self, backend: str, handlers: dict[str, Handler]) -> None:
        super().__init__(handlers)
        self.backend = backend
        LayerTable.REGISTRY[backend] = self

    def missing_kinds(self) -> list[str]:
        return sorted(kind for kind in LAYER_KINDS if kind not in self)

    def walk(self, spec: ModelSpec, state: State, context: Any = None) -> State:
        """Run ``state`` through every layer of ``spec``; refuses a kind this backend lacks."""
        for index, layer in enumerate(spec.layers):
            try:
                handler = self[layer.kind]
            except KeyError:
                raise SpecError(f"{spec.name}: backend {self.backend!r} has no implementation of layer kind "
                                f"{layer.kind!r}") from None
            state = handler(layer, index, state, context)
        return state


def layer_entry(table: Mapping[str, Any], name: str) -> Any:
    """A backend's per-layer parameters ``table[name]``, with an error naming what it has."""
    try:
        return table[name]
    except KeyError:
        raise KeyError(f"no parameters for layer {name!r}; have {sorted(table)}") from None


@dataclass(frozen=True)
class ModelSpec:
    name: str
    input_shape: tuple[int, int, int]
    layers: tuple[Layer, ...]

    def parametric_layers(self) -> list[ParametricLayer]:
        return [layer for layer in self.layers if layer.parametric]

    def output_shapes(self) -> list[Shape]:
        """Per-example activation shape after each layer (checks the spec is consistent)."""
        shape: Shape = tuple(self.input_shape)
        shapes = []
        for layer in self.layers:
            try:
                shape = layer.output_shape(shape)
            except SpecError as error:
                raise SpecError(f"{self.name}.{error}") from None
            shapes.append(shape)
        return shapes

    @property
    def num_outputs(self) -> int:
        return self.output_shapes()[-1][0]

    def to_json(self) -> str:
        return json.dumps({"name": self.name, "input_shape": list(self.input_shape),
                           "layers": [asdict(layer) for layer in self.layers]})

    @classmethod
    def from_json(cls, text: str) -> ModelSpec:
        raw = json.loads(text)
        layers = []
        for entry in raw["layers"]:
            kind = entry.get("kind")
            if kind not in LAYER_KINDS:
                raise SpecError(f"unknown layer kind {kind!r} in model spec")
            try:
                layers.append(LAYER_KINDS[kind](**entry))
            except SpecError as error:
                raise SpecError(f"invalid {kind} layer {entry} in model spec: {error}") from None
            except TypeError as error:
                raise SpecError(f"invalid {kind} layer {entry} in model spec: {error}") from None
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
        raise SpecError(f"unknown model {architecture!r}; choose one of: {choices}") from None
    spec = {Architecture.MLP: mlp_spec, Architecture.LENET: lenet_spec}[architecture]()
    spec.output_shapes()  # fail early on an inconsistent description
    return spec
