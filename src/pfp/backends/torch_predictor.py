"""The PyTorch reference as a :class:`~pfp.backends.base.Predictor`: PFP, deterministic twin, ensemble.

Runs :mod:`pfp.backends.torch_ref` on the CPU with torch's thread pool; any batch size
(``batch_size`` only chunks ``predict`` so memory stays bounded). Exported predictors are one
``.npz`` (arrays + a JSON ``meta`` entry holding the spec and the provenance).
"""

from __future__ import annotations

import json
import statistics
import time
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pfp.backends.base import VARIANT_KIND, Backend, PredictorKind, Schedule
from pfp.backends.covariance import variant_covariance_layers
from pfp.backends.torch_ref import GaussianLayerParams, deterministic_forward, ensemble_forward, pfp_forward
from pfp.backends.weights import ensemble_weights
from pfp.spec import ModelSpec

__all__ = ["FACTORY", "TorchBackend", "TorchPredictor"]

_FORMAT = 1
_PFP_FIELDS = ("weight_mean", "weight_var", "weight_m2", "bias_mean", "bias_var")


class TorchPredictor:
    """One network of the PyTorch reference: ``kind`` says what :meth:`predict` returns.

    ``weights`` per layer: :class:`GaussianLayerParams` (PFP), or ``(weight, bias)`` (the twin;
    the ensemble's with a leading member axis).
    """

    backend = Backend.TORCH

    def __init__(self, kind: PredictorKind | str, spec: ModelSpec, weights: Mapping[str, Any], *,
                 variance_scale: float = 1.0, batch_size: int = 1000, info: Mapping[str, Any] | None = None,
                 covariance_layers: int = 0) -> None:
        self.kind = PredictorKind(kind)
        self.covariance_layers = int(covariance_layers)
        self.spec = spec
        self.weights = dict(weights)
        self.variance_scale = float(variance_scale)
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        self.batch_size = batch_size
        self.info = dict(info or {})
        self._forward: Callable[[torch.Tensor], tuple[torch.Tensor, ...]] = {
            PredictorKind.PFP: lambda x: pfp_forward(spec, self.weights, x, variance_scale=self.variance_scale,
                                                     covariance_layers=self.covariance_layers),
            PredictorKind.DETERMINISTIC: lambda x: (deterministic_forward(spec, self.weights, x),),
            PredictorKind.ENSEMBLE: lambda x: (ensemble_forward(spec, self.weights, x),),
        }[self.kind]

    def _check_input(self, x) -> torch.Tensor:
        x = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
        if tuple(x.shape[1:]) != tuple(self.spec.input_shape):
            raise ValueError(f"wrong input shape: expected (N, {', '.join(map(str, self.spec.input_shape))}), "
                             f"got {tuple(x.shape)}")
        return x

    def predict(self, x: np.ndarray) -> tuple[np.ndarray, ...]:
        """All outputs for any number of examples, in chunks of ``batch_size`` (the ensemble's member axis first)."""
        x = self._check_input(x)
        if x.shape[0] == 0:
            raise ValueError("predict() needs at least one example")
        axis = 1 if self.kind is PredictorKind.ENSEMBLE else 0
        chunks = []
        with torch.no_grad():
            for start in range(0, x.shape[0], self.batch_size):
                chunks.append(self._forward(x[start:start + self.batch_size]))
        return tuple(torch.cat(parts, dim=axis).numpy() for parts in zip(*chunks))

    def time(self, *, number: int, repeat: int, x: np.ndarray | None = None) -> dict[str, float]:
        """Milliseconds per call of one batch (``x``, default zeros of ``batch_size``): ``repeat`` means of ``number`` calls."""
        x = self._check_input(np.zeros((self.batch_size, *self.spec.input_shape), np.float32) if x is None else x)
        results_ms = []
        with torch.no_grad():
            for _ in range(repeat):
                start = time.perf_counter()
                for _ in range(number):
                    self._forward(x)
                results_ms.append((time.perf_counter() - start) / number * 1e3)
        return {"mean_ms": float(np.mean(results_ms)), "median_ms": float(statistics.median(results_ms)),
                "std_ms": float(np.std(results_ms)), "number": number, "repeat": repeat}

    def profile(self, *, number: int = 20, x: np.ndarray | None = None) -> list[dict]:
        """Not measured for the reference: an empty list."""
        return []

    def export(self, path: str | Path) -> Path:
        """Write ``path`` (``.npz``): the weights and a ``meta`` entry (spec, kind, variance scale, info)."""
        from pfp.io import atomic_savez

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {"format": _FORMAT, "backend": self.backend.value, "kind": self.kind.value, "spec": self.spec.to_json(),
                "variance_scale": self.variance_scale, "covariance_layers": self.covariance_layers,
                "batch_size": self.batch_size, "info": self.info}
        arrays = {"meta": np.array(json.dumps(meta))}
        for name, entry in self.weights.items():
            if isinstance(entry, GaussianLayerParams):
                arrays.update({f"{name}.{field}": getattr(entry, field).numpy() for field in _PFP_FIELDS})
            else:
                weight, bias = entry
                arrays[f"{name}.weight"], arrays[f"{name}.bias"] = np.asarray(weight), np.asarray(bias)
        atomic_savez(path, arrays)
        return path

    def describe(self) -> dict[str, Any]:
        return {"backend": self.backend.value, "kind": self.kind.value, "model": self.spec.name,
                "batch_size": self.batch_size, "variance_scale": self.variance_scale,
                "covariance_layers": self.covariance_layers, "threads": torch.get_num_threads(), **self.info}


class TorchBackend:
    """Makes and loads :class:`TorchPredictor` (``schedule``, ``target`` and ``database`` do not apply)."""

    backend = Backend.TORCH
    suffix = ".npz"

    def create(self, variant: str, pfp_model, posterior=None, *, batch_size: int, variance_scale: float = 1.0,
               svi_samples: int = 30, seed: int = 0, schedule: Schedule = Schedule.HAND, target: str = "host",
               database: Any = None, info: Mapping[str, Any] | None = None) -> TorchPredictor:
        kind = VARIANT_KIND[str(getattr(variant, "value", variant))]
        spec = pfp_model.spec  # every variant runs the converted layer order (see pfp.convert.pool_before_relu)
        info = {"variant": str(getattr(variant, "value", variant)), **(info or {})}
        if kind is PredictorKind.PFP:
            layers = variant_covariance_layers(variant, getattr(pfp_model, "covariance_layers", 0))
            return TorchPredictor(kind, spec, pfp_model.params, variance_scale=variance_scale, batch_size=batch_size,
                                  info=info, covariance_layers=layers)
        if posterior is None:
            raise ValueError(f"the {info['variant']} predictor is built from the posterior: pass posterior=")
        if spec.parametric_layers() != posterior.spec.parametric_layers():
            raise ValueError(f"the PFP model ({spec.name}) and the posterior ({posterior.spec.name}) have different layers")
        if kind is PredictorKind.DETERMINISTIC:
            return TorchPredictor(kind, spec, posterior.mean_weights(), batch_size=batch_size, info=info)
        info.update(svi_samples=svi_samples, seed=seed)
        return TorchPredictor(kind, spec, ensemble_weights(posterior, svi_samples, seed), batch_size=batch_size,
                              info=info)

    def load(self, path: str | Path, *, expected_model: str | None = None) -> TorchPredictor:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: exported predictor not found")
        try:
            with np.load(path, allow_pickle=False) as archive:
                meta = json.loads(str(archive["meta"]))
                arrays = {key: torch.from_numpy(archive[key]) for key in archive.files if key != "meta"}
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as error:
            raise ValueError(f"{path}: not a readable exported torch predictor ({error})") from None
        if meta.get("format") != _FORMAT:
            raise ValueError(f"{path}: unsupported format {meta.get('format')!r}")
        spec, kind = ModelSpec.from_json(meta["spec"]), PredictorKind(meta["kind"])
        if expected_model is not None and spec.name != expected_model:
            raise ValueError(f"{path}: a predictor of the {spec.name!r} model, not of the {expected_model!r} model "
                             "asked for")
        names = [layer.name for layer in spec.parametric_layers()]
        if kind is PredictorKind.PFP:
            weights = {n: GaussianLayerParams(*(arrays[f"{n}.{field}"] for field in _PFP_FIELDS)) for n in names}
        else:
            weights = {n: (arrays[f"{n}.weight"], arrays[f"{n}.bias"]) for n in names}
        return TorchPredictor(kind, spec, weights, variance_scale=meta["variance_scale"],
                              batch_size=meta["batch_size"], info=meta["info"],
                              covariance_layers=meta.get("covariance_layers", 0))

    def memory(self, variant: str, pfp_model, posterior=None, *, batch_size: int, variance_scale: float = 1.0,
               svi_samples: int = 30, seed: int = 0) -> dict[str, int] | None:
        return None  # torch allocates as it goes: no planned figure to report


FACTORY = TorchBackend()
