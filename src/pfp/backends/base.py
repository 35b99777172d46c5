"""The one interface every predictor backend offers (PyTorch reference, TVM, ...).

Evaluation, the benchmark and the stages talk to predictors only through :class:`Predictor`,
so a third backend (ONNX Runtime, a C emitter) touches none of them. This module imports
neither torch nor TVM: a board's Python has only TVM's runtime and numpy.
"""

from __future__ import annotations

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
