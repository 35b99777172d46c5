"""Stage `tune@MODEL`: every variant x batch size tuned and exported -> models/MODEL/tvm, metrics/tune_MODEL.json.

The tuning itself is :func:`pfp.tuning.tune_model`; this module reads the stage's inputs,
writes its summary and says what to log.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pfp.artifacts.trained import load_trained, trained_digests
from pfp.config import TuneParams
from pfp.io import atomic_write_json
from pfp.stage import METRICS_DIR, tvm_dir
from pfp.tuning import tune_model

__all__ = ["TuneOutcome", "run", "runner_name", "summary_path", "tags"]


def summary_path(model: str) -> Path:
    return METRICS_DIR / f"tune_{model}.json"


def runner_name(params: TuneParams) -> str:
    """``local``, or ``rpc:KEY@TRACKER`` for a board."""
    return f"rpc:{params.rpc.key}@{params.rpc.tracker}" if params.rpc.tracker else "local"


def tags(params: TuneParams) -> dict[str, Any]:
    """The stage run's tags: where the timings were measured."""
    return {"tune.target": params.target.value, "tune.runner": runner_name(params), "tune.emulated": params.rpc.emulated}


@dataclass
class TuneOutcome:
    summary: dict  # what metrics/tune_MODEL.json holds
    summary_path: Path
    library_dir: Path  # models/MODEL/tvm: libraries and tuning databases
    metrics: dict[str, Any] = field(default_factory=dict)  # flat, for the tracking run


def run(model: str, params: TuneParams, *, seed: int) -> TuneOutcome:
    """Tune ``model``'s predictors as ``params`` says (in the DVC workspace, the working folder)."""
    trained = load_trained(model)
    calibration = trained.calibration
    libraries = tune_model(trained.posterior, trained.pfp_model, params, tvm_dir(model),
                           variance_scale=calibration.variance_scale, seed=seed, made_from=trained_digests(model))
    # timings here were measured on the tuning runner: an emulated board's are emulated, never host figures
    search_trials = sum(lib.report["search_trials"] for lib in libraries)
    search_seconds = sum(lib.report["search_seconds"] for lib in libraries)
    summary = {"target": params.target.value, "runner": runner_name(params), "emulated": params.rpc.emulated,
               "trials_per_task": params.trials_per_task, "variance_scale": calibration.variance_scale,
               "seconds": sum(lib.report["seconds"] for lib in libraries),
               # the boards that measured (per library, each measurement: libraries[*].measurements); a list,
               # as DVC's metrics view would split the addresses' dots into keys
               "rpc_workers": max((lib.report["rpc_workers"] for lib in libraries), default=1),
               "boards": [{"board": board, "measurements": count} for board, count in _board_counts(libraries)],
               "search_trials": search_trials,
               "search_trials_per_second": search_trials / search_seconds if search_trials and search_seconds else 0.0,
               # the whole-model guard of each library (libraries[*].guard): tuned vs all-hand, which was exported
               "guard": [{"library": f"{lib.variant.value}_b{lib.batch_size}",
                          **{key: lib.report["guard"][key] for key in ("kept", "tuned_ms", "hand_ms", "ratio", "host_busy")}}
                         for lib in libraries],
               "libraries": [lib.as_dict() for lib in libraries]}
    atomic_write_json(summary_path(model), summary)
    metrics = {"seconds": summary["seconds"], "boards": len(summary["boards"]),
               "search_trials_per_second": summary["search_trials_per_second"],
               "guard_kept_hand": sum(lib.report["guard"]["kept"] == "hand" for lib in libraries),
               "guard_host_busy": sum(bool(lib.report["guard"]["host_busy"]) for lib in libraries), **{
        f"{lib.variant.value}_b{lib.batch_size}.kept_{source}": count
        for lib in libraries for source, count in lib.kept_counts().items()}, **{
        f"{lib.variant.value}_b{lib.batch_size}.guard_{key}": lib.report["guard"][key]
        for lib in libraries for key in ("tuned_ms", "hand_ms", "ratio")}}
    return TuneOutcome(summary, summary_path(model), tvm_dir(model), metrics)


def _board_counts(libraries) -> list[tuple[str, int]]:
    counts: dict[str, int] = {}
    for lib in libraries:
        for board, count in lib.report["boards"].items():
            counts[board] = counts.get(board, 0) + count
    return sorted(counts.items())
