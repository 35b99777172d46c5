"""The one interface every predictor backend offers (PyTorch reference, TVM, ...).

Evaluation, the benchmark and the stages talk to predictors only through :class:`Predictor`,
and make or load them through the backend registry (:func:`create`, :func:`load`), so a third
backend (ONNX Runtime, a C emitter) is one module with a ``FACTORY`` (:class:`BackendFactory`)
and one line in :data:`_MODULES`, and touches none of them. This module imports neither torch
nor TVM: a board's Python has only TVM's runtime and numpy.

Example::

    >>> from pfp.backends import base
    >>> predictor = base.create("tvm", "pfp", pfp_model, batch_size=10, schedule=base.Schedule.HAND)
    >>> logit_mean, logit_var = predictor.predict(images)
    >>> predictor.time(number=20, repeat=5)["median_ms"]
    >>> same = base.load(predictor.export("pfp_b10.so"))
"""

from __future__ import annotations

import importlib
from enum import Enum
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np


class PredictorKind(str, Enum):
    """What a predictor returns."""

    PFP = "pfp"  #: Gaussian logits: (mean, variance), each (N, C)
    DETERMINISTIC = "deterministic"  #: logits (N, C)
    ENSEMBLE = "ensemble"  #: logits of S members (S, N, C)


@runtime_checkable
class Predictor(Protocol):
    """A compiled (or reference) network with a fixed input layout (N, C, H, W) float32."""

    kind: PredictorKind

    def predict(self, x: np.ndarray) -> tuple[np.ndarray, ...]:
        """All outputs for any number of examples (N, C, H, W); see :class:`PredictorKind`."""

    def time(self, *, number: int, repeat: int, x: np.ndarray | None = None) -> dict[str, float]:
        """Latency of one batch in milliseconds: ``{"median_ms", "mean_ms", "std_ms", "number", "repeat"}``."""

    def profile(self, *, number: int = 20, x: np.ndarray | None = None) -> list[dict]:
        """Per-operator time ``[{"operator", "calls", "ms"}]``, slowest first (empty if not supported)."""

    def export(self, path: str | Path) -> Path:
        """Write the predictor so that the same backend can load it elsewhere; returns the main file."""

    def describe(self) -> dict[str, Any]:
        """Provenance: backend, kind, model, target, batch size, schedule, ... (JSON-serialisable)."""


# --------------------------------------------------------------------------- options


class Backend(str, Enum):
    """Who runs a predictor (the values match ``evaluate.pfp_backend``)."""

    TORCH = "torch"  #: the PyTorch reference (pfp.backends.torch_ref), any batch size, no compilation
    TVM = "tvm"  #: Apache TVM: compiled for a target with a fixed batch size, chunked by ``predict``


class Schedule(str, Enum):
    """How a compiling backend schedules its kernels (backends that compile nothing ignore it)."""

    DEFAULT = "default"  #: the compiler's default lowering (TVM: naive serial loops, the "untuned" baseline)
    HAND = "hand"  #: the hand-written schedule rules
    TUNED = "tuned"  #: the tuning database's best schedule per kernel (needs ``database``)


#: What each variant of :class:`pfp.config.Variant` returns.
VARIANT_KIND = {"pfp": PredictorKind.PFP, "pfp_separate": PredictorKind.PFP, "pfp_cov": PredictorKind.PFP,
                "det": PredictorKind.DETERMINISTIC,
                "svi": PredictorKind.ENSEMBLE}


# --------------------------------------------------------------------------- registry


class BackendFactory(Protocol):
    """What a backend module offers as ``FACTORY``: it makes and loads its predictors."""

    backend: Backend
    #: file name ending of :meth:`Predictor.export`'s main file (how :func:`load` picks the backend)
    suffix: str

    def create(self, variant: str, pfp_model: Any, posterior: Any | None = None, *, batch_size: int,
               variance_scale: float = 1.0, svi_samples: int = 30, seed: int = 0,
               schedule: Schedule = Schedule.HAND, target: str = "host", database: Any = None,
               info: dict[str, Any] | None = None) -> Predictor:
        """A predictor of ``variant`` (:class:`pfp.config.Variant`) built from the converted model.

        Every variant runs ``pfp_model.spec``'s (converted) layer order. The deterministic twin
        takes the posterior means and the SVI ensemble ``svi_samples`` draws seeded by ``seed``,
        so both need ``posterior``; PFP needs only ``pfp_model``. ``batch_size`` is the batch a
        compiled predictor is built for (``predict`` takes any number of examples).
        """

    def load(self, path: str | Path, *, expected_model: str | None = None) -> Predictor:
        """A predictor written by :meth:`Predictor.export`; refused if it holds another model than ``expected_model``."""

    def memory(self, variant: str, pfp_model: Any, posterior: Any | None = None, *, batch_size: int,
               variance_scale: float = 1.0, svi_samples: int = 30, seed: int = 0) -> dict[str, int] | None:
        """Bytes the predictor needs ``{"activation_bytes", "weight_bytes", "total_bytes"}``, or None if unknown."""


#: backend -> the module holding its ``FACTORY``; imported on first use (TVM's import takes seconds)
_MODULES: dict[Backend, str] = {
    Backend.TORCH: "pfp.backends.torch_predictor",
    Backend.TVM: "pfp.backends.tvm.predictor",
}
_FACTORIES: dict[Backend, BackendFactory] = {}


def factory(backend: Backend | str) -> BackendFactory:
    """The factory of ``backend`` (imports its module on first use)."""
    try:
        backend = Backend(backend)
    except ValueError:
        raise ValueError(f"unknown backend {backend!r}; choose one of: {', '.join(b.value for b in Backend)}") from None
    if backend not in _FACTORIES:
        _FACTORIES[backend] = importlib.import_module(_MODULES[backend]).FACTORY
    return _FACTORIES[backend]


def create(backend: Backend | str, variant: str, pfp_model: Any, posterior: Any | None = None,
           **options: Any) -> Predictor:
    """A predictor of ``variant`` on ``backend``; ``options`` as :meth:`BackendFactory.create`."""
    return factory(backend).create(variant, pfp_model, posterior, **options)


def load(path: str | Path, backend: Backend | str | None = None, *, expected_model: str | None = None) -> Predictor:
    """Load an exported predictor; without ``backend``, the one whose file ending ``path`` has.

    With ``expected_model`` (a spec name), a predictor of another model is refused, naming both.
    """
    if backend is None:
        matches = [b for b in Backend if str(path).endswith(factory(b).suffix)]
        if len(matches) != 1:
            raise ValueError(f"{path}: cannot tell the backend from the file name; pass backend=")
        backend = matches[0]
    return factory(backend).load(path, expected_model=expected_model)
