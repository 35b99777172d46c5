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
from pfp.backends.tvm import graph, pipeline, runtime, targets
from pfp.backends.weights import ensemble_weights

__all__ = ["FACTORY", "TVMBackend", "build_variant_module"]


def _variant(variant) -> str:
    return str(getattr(variant, "value", variant))


def build_variant_module(variant: str, pfp_model, posterior=None, *, batch_size: int, variance_scale: float = 1.0,
                         svi_samples: int = 30, seed: int = 0):
    """The Relax module of one predictor (weights bound as constants)."""
    variant = _variant(variant)
    kind = VARIANT_KIND[variant]
    # every variant runs the converted layer order: the twin and the ensemble members compute
    # the same function in it (see pfp.convert.pool_before_relu), so the baselines get it too
    spec = pfp_model.spec
    if kind is PredictorKind.PFP:
        return graph.build_pfp_module(spec, pfp_model.params, batch_size=batch_size, joint=variant == "pfp",
                                      variance_scale=variance_scale)
    if posterior is None:
        raise ValueError(f"the {variant} predictor is built from the posterior: pass posterior=")
    if spec.parametric_layers() != posterior.spec.parametric_layers():
        raise ValueError(f"the PFP model ({spec.name}) and the posterior ({posterior.spec.name}) have different layers")
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
        classes = {PredictorKind.PFP: runtime.CompiledPFP, PredictorKind.DETERMINISTIC: runtime.CompiledDeterministic,
                   PredictorKind.ENSEMBLE: runtime.CompiledEnsemble}
        mod = build_variant_module(variant, pfp_model, posterior, batch_size=batch_size, variance_scale=variance_scale,
                                   svi_samples=svi_samples, seed=seed)
        schedule = Schedule(schedule)
        tvm_target = targets.make_target(_variant(target))
        executable = pipeline.compile_module(mod, tvm_target, schedule, database)
        info = {"model": pfp_model.spec.name, "variant": _variant(variant), "batch_size": batch_size, "schedule": schedule.value,
                "variance_scale": variance_scale, **(info or {})}
        if VARIANT_KIND[_variant(variant)] is PredictorKind.ENSEMBLE:
            info.update(svi_samples=svi_samples, seed=seed)
        return classes[VARIANT_KIND[_variant(variant)]](executable, (batch_size, *pfp_model.spec.input_shape),
                                                         target=tvm_target, info=info, model=pfp_model.spec.name)

    def load(self, path: str | Path, *, expected_model: str | None = None):
        return runtime.load(path, expected_model=expected_model)

    def memory(self, variant: str, pfp_model, posterior=None, *, batch_size: int, variance_scale: float = 1.0,
               svi_samples: int = 30, seed: int = 0) -> dict[str, int]:
        return pipeline.memory_estimate(build_variant_module(variant, pfp_model, posterior, batch_size=batch_size,
                                                    variance_scale=variance_scale, svi_samples=svi_samples, seed=seed))


FACTORY = TVMBackend()
