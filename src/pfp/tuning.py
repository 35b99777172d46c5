"""The `tune` stage: compile every predictor of a model for a target, tuned, as shared libraries.

For each variant (:class:`~pfp.config.Variant`: PFP joint, PFP separate, deterministic twin,
SVI ensemble) and batch size, the Relax module is built from the one model description, its
tasks are measured with the hand schedules and tuned by the Meta Scheduler (local runner, or
the RPC board of ``tune.rpc``), and the module compiled with the faster schedule per task is
exported to ``<out_dir>/<target>/<variant>_b<batch>.so``. The tuning database of each module
lives next to it (``<variant>_b<batch>/``) so an interrupted stage resumes where it stopped.

Layout (``out_dir`` = ``models/<model>/tvm``)::

    host/pfp_b1.so, host/pfp_b1.so.json        # library + metadata (variant, schedule, scale)
    host/pfp_b1/database_*.json                # Meta Scheduler database (+ pfp_tune_state.json)
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from pfp.bnn import Posterior, site_names
from pfp.config import CompileTarget, TuneParams, Variant
from pfp.convert import PFPModel

logger = logging.getLogger(__name__)

__all__ = ["TunedLibrary", "build_variant_module", "ensemble_weights", "library_path", "load_library",
           "sample_stacked_weights", "tune_model"]


def library_path(out_dir: str | Path, target: CompileTarget | str, variant: Variant | str, batch_size: int) -> Path:
    return Path(out_dir) / CompileTarget(target).value / f"{Variant(variant).value}_b{batch_size}.so"


def sample_stacked_weights(posterior: Posterior, samples: int, generator: torch.Generator | None = None) -> dict:
    """``samples`` weight sets from the mean-field posterior, stacked per layer: {name: (w (S, ...), b (S, ...))}."""
    weights = {}
    for layer in posterior.spec.parametric_layers():
        pair = []
        for site in site_names(layer.name):
            loc, scale = posterior.loc[site], posterior.scale[site]
            pair.append(loc + scale * torch.randn((samples, *loc.shape), generator=generator))
        weights[layer.name] = tuple(pair)
    return weights


def ensemble_weights(posterior: Posterior, samples: int, seed: int) -> dict:
    """``samples`` weight sets drawn once from the posterior (fixed by ``seed``), stacked per layer."""
    return sample_stacked_weights(posterior, samples, torch.Generator().manual_seed(seed))


def build_variant_module(variant: Variant | str, posterior: Posterior, pfp_model: PFPModel, *, batch_size: int,
                         variance_scale: float = 1.0, svi_samples: int = 30, seed: int = 0):
    """The Relax module of one predictor (weights bound as constants)."""
    from pfp.backends.tvm import build

    variant = Variant(variant)
    # every variant runs the converted layer order: the twin and the ensemble members compute
    # the same function in it (see pfp.convert.pool_before_relu), so the baselines get it too
    spec = pfp_model.spec
    if spec.parametric_layers() != posterior.spec.parametric_layers():
        raise ValueError(f"the PFP model ({spec.name}) and the posterior ({posterior.spec.name}) have different layers")
    if variant in (Variant.PFP, Variant.PFP_SEPARATE):
        return build.build_pfp_module(spec, pfp_model.params, batch_size=batch_size, joint=variant is Variant.PFP,
                                      variance_scale=variance_scale)
    if variant is Variant.DET:
        return build.build_deterministic_module(spec, posterior.mean_weights(), batch_size=batch_size)
    return build.build_ensemble_module(spec, ensemble_weights(posterior, svi_samples, seed), batch_size=batch_size)


_COMPILED_CLASS = {Variant.PFP: "CompiledPFP", Variant.PFP_SEPARATE: "CompiledPFP", Variant.DET: "CompiledDeterministic",
                   Variant.SVI: "CompiledEnsemble"}


@dataclass
class TunedLibrary:
    variant: Variant
    batch_size: int
    path: Path
    report: dict

    def as_dict(self) -> dict:
        return {"variant": self.variant.value, "batch_size": self.batch_size, "library": str(self.path), **self.report}


def _tune_config(params: TuneParams, work_dir: Path):
    from pfp.backends.tvm.tune import TuneConfig

    trials = max(params.trials_per_task, 1)
    return TuneConfig(trials_per_task=trials, max_trials_global=100_000, num_trials_per_iter=min(trials, 16),
                      target=params.target.value, work_dir=str(work_dir), number=params.number, repeat=1,
                      min_repeat_ms=params.min_repeat_ms, population_size=params.population_size,
                      genetic_num_iters=2, init_min_unmeasured=min(16, params.population_size),
                      rpc_tracker=params.rpc.tracker, rpc_key=params.rpc.key, search=params.trials_per_task > 0,
                      finalists=params.finalists, selection_rounds=params.selection_rounds,
                      switch_margin=params.switch_margin)


def tune_model(posterior: Posterior, pfp_model: PFPModel, params: TuneParams, out_dir: str | Path, *,
               variance_scale: float = 1.0, seed: int = 0) -> list[TunedLibrary]:
    """Tune and export every variant x batch size of ``params``; returns what was written.

    ``params.trials_per_task == 0`` measures and records the hand schedules only.
    """
    from pfp.backends.tvm import build, tune

    out_dir = Path(out_dir)
    target_dir = out_dir / params.target.value
    results = []
    jobs = [(variant, batch) for variant in params.variants for batch in params.batch_sizes]
    for index, (variant, batch) in enumerate(jobs, 1):
        start = time.perf_counter()
        print(f"[tune {index}/{len(jobs)}] {posterior.spec.name} {variant.value} batch {batch} "
              f"({params.target.value}, {params.trials_per_task} trials/task)", flush=True)
        mod = build_variant_module(variant, posterior, pfp_model, batch_size=batch, variance_scale=variance_scale,
                                   svi_samples=params.svi_samples, seed=seed)
        work_dir = target_dir / f"{variant.value}_b{batch}"
        config = _tune_config(params, work_dir)
        report = tune.TuneReport()
        database = tune.tune_module(mod, config=config, report=report)
        _drop_logs(work_dir)
        executable = tune.compile_tuned(mod, config.target, database)
        cls = getattr(build, _COMPILED_CLASS[variant])
        info = {"variant": variant.value, "batch_size": batch, "schedule": "tuned", "variance_scale": variance_scale,
                "trials_per_task": params.trials_per_task}
        if variant is Variant.SVI:
            info.update(svi_samples=params.svi_samples, seed=seed)
        compiled = cls(executable, (batch, *posterior.spec.input_shape), target=build.make_target(config.target),
                       info=info)
        path = library_path(out_dir, params.target, variant, batch)
        compiled.export_library(path)
        seconds = time.perf_counter() - start
        results.append(TunedLibrary(variant, batch, path, {
            "seconds": seconds, "tasks": report.table(), "untunable": report.untunable,
            "records": report.records_after}))
        kept = report.kept()
        print(f"  {seconds:.0f} s; schedules kept: "
              + ", ".join(f"{name}={choice.value}" for name, choice in sorted(kept.items())), flush=True)
    return results


def _drop_logs(work_dir: Path) -> None:
    """The Meta Scheduler's per-task logs: large, only useful while debugging a run."""
    shutil.rmtree(work_dir / "logs", ignore_errors=True)


def load_library(out_dir: str | Path, target: CompileTarget | str, variant: Variant | str, batch_size: int):
    """Load a library written by :func:`tune_model` (host target only: it runs here)."""
    from pfp.backends.tvm.build import load_compiled

    path = library_path(out_dir, target, variant, batch_size)
    if not path.is_file():
        from pfp.data.idx import DataError

        raise DataError(f"{path}: compiled library not found; run the tune stage first (dvc repro tune)")
    return load_compiled(path)
