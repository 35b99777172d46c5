"""The TVM backend's factory: Relax module per variant, compiled and wrapped as a predictor.

The compiled models (:class:`pfp.backends.tvm.runtime.CompiledModel`) are the backend's
:class:`~pfp.backends.base.Predictor`; this module is the one place that picks their class
and the one place the variant -> Relax module mapping lives.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pfp.backends.base import VARIANT_KIND, Backend, PredictorKind, Schedule
from pfp.backends.covariance import variant_covariance_layers
from pfp.backends.tvm import graph, pipeline, runtime
from pfp.backends.weights import ensemble_weights

__all__ = ["FACTORY", "TVMBackend", "build_variant_module"]


def _variant(variant) -> str:
    return str(getattr(variant, "value", variant))


def _covariance_layers(variant: str, pfp_model) -> int:
    return variant_covariance_layers(variant, getattr(pfp_model, "covariance_layers", 0))


def _checked(posterior, spec, variant: str):
    """The posterior the twin / ensemble is built from, checked to have the PFP model's layers."""
    if posterior is None:
        raise ValueError(f"the {variant} predictor is built from the posterior: pass posterior=")
    if spec.parametric_layers() != posterior.spec.parametric_layers():
        raise ValueError(f"the PFP model ({spec.name}) and the posterior ({posterior.spec.name}) have different layers")
    return posterior


def build_variant_module(variant: str, pfp_model, posterior=None, *, batch_size: int, variance_scale: float = 1.0,
                         svi_samples: int = 30, seed: int = 0):
    """The Relax module of one predictor (weights bound as constants)."""
    variant = _variant(variant)
    kind = VARIANT_KIND[variant]
    # every variant runs the converted layer order: the twin and the ensemble members compute
    # the same function in it (see pfp.convert.pool_before_relu), so the baselines get it too
    spec = pfp_model.spec
    if kind is PredictorKind.PFP:
        return graph.build_pfp_module(spec, pfp_model.params, batch_size=batch_size, joint=variant != "pfp_separate",
                                      variance_scale=variance_scale, covariance_layers=_covariance_layers(variant, pfp_model))
    posterior = _checked(posterior, spec, variant)
    if kind is PredictorKind.DETERMINISTIC:
        return graph.build_deterministic_module(spec, posterior.mean_weights(), batch_size=batch_size)
    return graph.build_ensemble_module(spec, ensemble_weights(posterior, svi_samples, seed), batch_size=batch_size)


class TVMBackend:
    """Compiles (``schedule``: default / hand / tuned with ``database``) and loads TVM predictors."""

    backend = Backend.TVM
    suffix = ".so"

    def create(self, variant: str, pfp_model, posterior=None, *, batch_size: int, variance_scale: float = 1.0,
               svi_samples: int = 30, seed: int = 0, schedule: Schedule = Schedule.HAND, target: str = "host",
               database: Any = None, info: Mapping[str, Any] | None = None):
        variant = _variant(variant)
        kind = VARIANT_KIND[variant]
        spec = pfp_model.spec
        options = {"batch_size": batch_size, "target": _variant(target), "schedule": Schedule(schedule),
                   "database": database}
        if kind is PredictorKind.PFP:
            layers = _covariance_layers(variant, pfp_model)
            compiled = pipeline.compile_pfp(spec, pfp_model.params, joint=variant != "pfp_separate",
                                            variance_scale=variance_scale, covariance_layers=layers, **options)
            compiled.info["covariance_layers"] = layers
        elif kind is PredictorKind.DETERMINISTIC:
            compiled = pipeline.compile_deterministic(spec, _checked(posterior, spec, variant).mean_weights(), **options)
        else:
            stacked = ensemble_weights(_checked(posterior, spec, variant), svi_samples, seed)
            compiled = pipeline.compile_ensemble(spec, stacked, **options)
        compiled.info.update({"variant": variant, "batch_size": batch_size, "schedule": Schedule(schedule).value,
                              "variance_scale": variance_scale, **(info or {})})
        if kind is PredictorKind.ENSEMBLE:
            compiled.info.update(svi_samples=svi_samples, seed=seed)
        return compiled

    def load(self, path: str | Path, *, expected_model: str | None = None):
        return runtime.load(path, expected_model=expected_model)

    def memory(self, variant: str, pfp_model, posterior=None, *, batch_size: int, variance_scale: float = 1.0,
               svi_samples: int = 30, seed: int = 0) -> dict[str, int]:
        return pipeline.memory_estimate(build_variant_module(variant, pfp_model, posterior, batch_size=batch_size,
                                                    variance_scale=variance_scale, svi_samples=svi_samples, seed=seed))


FACTORY = TVMBackend()
